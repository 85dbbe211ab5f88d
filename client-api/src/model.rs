//! The chat domain as clients see it: events, channels, members, presence, devices.

use serde::{Deserialize, Serialize};

/// What an event records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "content", rename_all = "snake_case")]
pub enum EventContent {
    /// A chat message.
    Message {
        /// The text.
        body: String,
    },
    /// A change of a channel's membership.
    Membership {
        /// What happened.
        action: MembershipAction,
        /// The member concerned.
        user: String,
        /// The channel's membership version after this change.
        version: u64,
        /// The group's name, on `create` only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// A membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipAction {
    /// The group was created; `user` is its creator and first admin.
    Create,
    /// An admin added `user`.
    Add,
    /// An admin removed `user`.
    Remove,
    /// `user` left.
    Leave,
}

/// An event as delivered to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique event id.
    pub id: String,
    /// Channel the event belongs to.
    pub channel: String,
    /// Who caused it, `name@server`.
    pub sender: String,
    /// Server that created the event.
    pub origin: String,
    /// Per-origin, per-channel sequence number.
    pub seq: u64,
    /// Milliseconds since the Unix epoch (hybrid logical clock).
    pub ts: u64,
    /// Position in the receiving user's stream (absent in history pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    /// What the event records.
    #[serde(flatten)]
    pub content: EventContent,
}

/// Direct (one-to-one) or group channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Exactly two members, created by the first message between them.
    Direct,
    /// A named group with admins.
    Group,
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May add and remove members.
    Admin,
    /// May read and send.
    Member,
}

/// A channel as listed for one of its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSummary {
    /// Channel id, `random@server`.
    pub id: String,
    /// Direct or group.
    pub kind: ChannelKind,
    /// Group name; for a direct channel, the other member's id.
    pub name: String,
    /// Number of members.
    pub member_count: usize,
    /// Current membership version.
    pub version: u64,
    /// Newest event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<Event>,
}

/// A channel member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// User id.
    pub user: String,
    /// Role in the channel.
    pub role: Role,
    /// When they joined (milliseconds since the Unix epoch).
    pub joined_at: u64,
}

/// Online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// At least one device is connected and sending heartbeats.
    Online,
    /// No device is connected.
    Offline,
}

/// A user's presence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceInfo {
    /// User id.
    pub user: String,
    /// Online or offline.
    pub status: PresenceStatus,
    /// Last activity (milliseconds since the Unix epoch), if the user was ever active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<u64>,
}

/// One logged-in device of the calling user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id.
    pub id: String,
    /// Name given at login.
    pub name: String,
    /// When it logged in (milliseconds since the Unix epoch).
    pub created_at: u64,
    /// Its sync cursor.
    pub cursor: u64,
    /// Whether it is connected now.
    pub online: bool,
    /// Whether it is the device making this request.
    pub current: bool,
}
