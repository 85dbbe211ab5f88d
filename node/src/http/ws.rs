//! The WebSocket upgrade, and the adapter from axum's socket to the session's transport.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt, future};

use crate::Services;
use crate::session::{self, WireIn, WireOut};

/// tungstenite's read buffer: allocated whole for every connection, and also the
/// most one socket read takes. An idle connection's largest single allocation, so
/// it is small: client frames (heartbeats, cursors, sends of a chat message) fit
/// in one read; a larger frame grows the buffer to its size (and keeps it) and is
/// read in steps of this size.
const READ_BUFFER_BYTES: usize = 512;
/// Bytes tungstenite gathers before writing to the socket. Not allocated up front;
/// it bounds how far the write buffer grows during a burst of small frames, which
/// it then keeps (tungstenite never shrinks it).
const WRITE_BUFFER_BYTES: usize = 4 * 1024;

pub(super) async fn upgrade(State(svc): State<Arc<Services>>, ws: WebSocketUpgrade) -> Response {
    // Frames up to max_frame_bytes get a polite error; twice that is the hard cap
    // where the transport gives up on the connection.
    let cap = svc.config.max_frame_bytes.saturating_mul(2);
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // Room for one whole frame beyond the write buffer; frames are at most about
        // max_frame_bytes (sync batches are cut to fit).
        .max_write_buffer_size(cap.saturating_mul(2).max(WRITE_BUFFER_BYTES * 2))
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
