//! The WebSocket upgrade, and the adapter from axum's socket to the session's transport.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::{Sink, SinkExt, Stream, StreamExt};

use crate::Services;
use crate::session::{self, WireIn, WireOut};

/// tungstenite's read buffer: allocated whole for every connection, and also the
/// most one socket read takes. An idle connection's largest single allocation, so
/// it is small: client frames (heartbeats, cursors, sends of a chat message) fit
/// in one read; a larger frame grows the buffer to its size (and keeps it) and is
/// read in steps of this size.
const READ_BUFFER_BYTES: usize = 256;
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

fn transport(socket: WebSocket) -> Transport {
    Transport(socket)
}

/// axum's socket seen as the session's transport. A struct of its own rather than
/// `filter_map` and `with` adapters, which each keep a slot for an item in flight:
/// the session holds its transport for the whole connection.
struct Transport(WebSocket);

impl Stream for Transport {
    type Item = WireIn;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WireIn>> {
        loop {
            let wire = match ready!(self.0.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Ok(Message::Text(t))) => WireIn::Text(t.as_str().to_owned()),
                Some(Ok(Message::Binary(_))) => WireIn::Binary,
                Some(Ok(Message::Close(_))) => WireIn::CloseRequested,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("Space limit") {
                        WireIn::TooBig
                    } else {
                        WireIn::Closed
                    }
                }
            };
            return Poll::Ready(Some(wire));
        }
    }
}

impl Sink<WireOut> for Transport {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, out: WireOut) -> Result<(), Self::Error> {
        let msg = match out {
            WireOut::Text(t) => Message::Text(t.as_ref().into()),
            WireOut::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        };
        self.0.start_send_unpin(msg)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_close_unpin(cx)
    }
}
