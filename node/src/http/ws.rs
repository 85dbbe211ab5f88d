//! The WebSocket upgrade, and the adapter from axum's socket to the session's transport.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt, future};

use crate::Services;
use crate::session::{self, WireIn, WireOut};

/// Read and write buffers per connection. tungstenite's defaults (128 KiB each)
/// would dominate a connection's memory; frames are small.
const BUFFER_BYTES: usize = 4 * 1024;

pub(super) async fn upgrade(State(svc): State<Arc<Services>>, ws: WebSocketUpgrade) -> Response {
    // Frames up to max_frame_bytes get a polite error; twice that is the hard cap
    // where the transport gives up on the connection.
    let cap = svc.config.max_frame_bytes.saturating_mul(2);
    ws.read_buffer_size(BUFFER_BYTES)
        .write_buffer_size(BUFFER_BYTES)
        // Room for one whole frame beyond the write buffer; frames are at most about
        // max_frame_bytes (sync batches are cut to fit).
        .max_write_buffer_size(cap.saturating_mul(2).max(BUFFER_BYTES * 2))
        .max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| session::run(transport(socket), svc))
}

fn transport(
    socket: WebSocket,
) -> impl futures_util::Stream<Item = WireIn> + futures_util::Sink<WireOut, Error = axum::Error> + Unpin
{
    socket
        .filter_map(|msg| {
            future::ready(match msg {
                Ok(Message::Text(t)) => Some(WireIn::Text(t.as_str().to_owned())),
                Ok(Message::Binary(_)) => Some(WireIn::Binary),
                Ok(Message::Close(_)) => Some(WireIn::CloseRequested),
                Ok(Message::Ping(_) | Message::Pong(_)) => None,
                Err(e) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("Space limit") {
                        Some(WireIn::TooBig)
                    } else {
                        Some(WireIn::Closed)
                    }
                }
            })
        })
        .with(|out: WireOut| {
            future::ready(Ok::<_, axum::Error>(match out {
                WireOut::Text(t) => Message::Text(t.as_ref().into()),
                WireOut::Close(code, reason) => Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })),
            }))
        })
}
