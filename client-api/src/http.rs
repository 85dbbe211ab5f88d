//! Request and response bodies of the stateless HTTP API (`/v1/...`).

use serde::{Deserialize, Serialize};

use crate::ErrorCode;
use crate::model::{ChannelSummary, DeviceInfo, Event, Member, PresenceInfo};

/// `POST /v1/register` and `POST /v1/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// Local part of the user id: 1 to 32 of `a-z 0-9 . _ -`.
    pub username: String,
    /// 8 to 1024 bytes.
    pub password: String,
    /// Name for the new device (defaults to "unnamed device").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
}

/// A new device session, answer to register and login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Full user id, `name@server`.
    pub user: String,
    /// The new device's id.
    pub device: String,
    /// Bearer token for HTTP and the WebSocket `auth` frame.
    pub token: String,
}

/// `GET /v1/me`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Me {
    /// User id.
    pub user: String,
    /// Device id of this token.
    pub device: String,
    /// Display name, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The server's name.
    pub server: String,
}

/// `GET /v1/profile/{user}`, and the body of `PUT /v1/profile`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    /// User id (ignored on `PUT`).
    #[serde(default)]
    pub user: String,
    /// Display name, up to 64 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// `GET /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceList {
    /// The caller's devices.
    pub devices: Vec<DeviceInfo>,
}

/// `POST /v1/channels`: create a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroup {
    /// Group name, 1 to 64 characters.
    pub name: String,
    /// Users to add besides the creator.
    #[serde(default)]
    pub members: Vec<String>,
}

/// `POST /v1/direct`: find or create the direct channel with a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenDirect {
    /// The other user.
    pub user: String,
}

/// `GET /v1/channels`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelList {
    /// The caller's channels, most recently active first.
    pub channels: Vec<ChannelSummary>,
}

/// `GET /v1/channels/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberList {
    /// Membership version these members belong to.
    pub version: u64,
    /// The members.
    pub members: Vec<Member>,
}

/// `POST /v1/channels/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddMember {
    /// The user to add.
    pub user: String,
}

/// `GET /v1/channels/{id}/messages`: one page of history, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Events, newest first.
    pub events: Vec<Event>,
    /// Pass as `before` to get the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /v1/presence?users=a,b`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceList {
    /// One entry per asked user that exists.
    pub presence: Vec<PresenceInfo>,
}

/// Every HTTP error: an RFC 9457 problem document (`application/problem+json`)
/// extended with the stable `code`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:hearth:error:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the HTTP status (e.g. "Forbidden").
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// Stable code.
    pub code: ErrorCode,
    /// Human explanation of this occurrence.
    pub detail: String,
}
