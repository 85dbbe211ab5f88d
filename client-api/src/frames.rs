//! WebSocket frames, client to server and server to client, as JSON objects tagged by `type`.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;
use crate::model::{Event, PresenceInfo};

/// The client protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame of every session: protocol version and the device's access token.
    Auth {
        /// Protocol version the client speaks.
        v: u32,
        /// The device's access token, as returned by register or login.
        token: String,
    },
    /// Send a message, to a user (direct chat) or to a channel. Exactly one of `to`
    /// and `channel` is set.
    Send {
        /// Client idempotency key (1 to 64 characters), unique per user. A resend
        /// with the same key returns the original `ack` and is never delivered twice.
        key: String,
        /// Recipient user for a direct chat, `name@server`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Target channel id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// Message text.
        body: String,
    },
    /// Advance this device's sync cursor: everything up to and including `pos` has
    /// been received and need not be sent again on reconnect.
    Cursor {
        /// Stream position of the newest event the device holds.
        pos: u64,
    },
    /// Keep-alive; any frame counts, this one carries nothing else.
    Heartbeat,
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Authentication succeeded; backlog (`sync` frames) follows.
    Ready {
        /// Protocol version the server speaks on this session.
        v: u32,
        /// The authenticated user.
        user: String,
        /// The authenticated device.
        device: String,
        /// The device's stored cursor; backlog starts after it.
        cursor: u64,
        /// Send a frame at least this often (milliseconds) or be disconnected.
        heartbeat_timeout_ms: u64,
        /// Largest frame the server accepts, in bytes.
        max_frame_bytes: usize,
    },
    /// A batch of backlog events (everything after the cursor), oldest first.
    Sync {
        /// Events in stream order.
        events: Vec<Event>,
        /// More backlog follows in further `sync` frames.
        more: bool,
    },
    /// A live event, in stream order after the backlog.
    Event {
        /// The event.
        event: Event,
    },
    /// A message was stored durably.
    Ack {
        /// The client's idempotency key.
        key: String,
        /// The message's event id.
        event_id: String,
        /// The channel it went to (created for the first direct message).
        channel: String,
        /// Timestamp (milliseconds since the Unix epoch) of the event.
        ts: u64,
    },
    /// A presence change of a user who shares a conversation with this user.
    Presence(PresenceInfo),
    /// A frame was refused; the connection stays open.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// The idempotency key of the `send` this answers, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
}
