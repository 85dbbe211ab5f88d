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

/// `GET /v1/push/vapid`: the node's VAPID public key, for `PushManager.subscribe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VapidKey {
    /// The uncompressed P-256 public key (65 bytes, starting 0x04), unpadded base64url:
    /// the `applicationServerKey` a browser subscribes with.
    pub public_key: String,
}

/// How the node reaches a push target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PushKind {
    /// A Web Push subscription (RFC 8030): encrypted (RFC 8291) and signed with VAPID (RFC 8292).
    WebPush,
    /// A plain HTTPS POST of the notification as JSON (UnifiedPush-style endpoint).
    Webhook,
}

/// The keys of a Web Push subscription, as `PushSubscription.toJSON().keys` gives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebPushKeys {
    /// The subscription's P-256 public key, uncompressed, base64url.
    pub p256dh: String,
    /// The subscription's 16-byte authentication secret, base64url.
    pub auth: String,
}

/// `POST /v1/push/targets`: registers a push target for the calling device. For Web
/// Push the body is the browser's `PushSubscription.toJSON()` plus `"kind": "web_push"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPushTarget {
    /// Web Push or webhook.
    pub kind: PushKind,
    /// Where to send: the subscription's endpoint, or the webhook URL (`http` or `https`).
    pub endpoint: String,
    /// Required for Web Push; ignored for webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<WebPushKeys>,
}

/// A registered push target (its keys are never sent back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTarget {
    /// The target's id.
    pub id: String,
    /// Web Push or webhook.
    pub kind: PushKind,
    /// Where notifications go.
    pub endpoint: String,
    /// The device that registered it; logging that device out removes the target.
    pub device: String,
    /// Whether that device is the one making the request.
    pub current: bool,
    /// Milliseconds since the epoch.
    pub created_at: u64,
}

/// `GET /v1/push/targets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushTargetList {
    /// Every push target of the caller's devices.
    pub targets: Vec<PushTarget>,
}

/// `GET` and `PUT /v1/push/settings`: the caller's notification settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushSettings {
    /// Whether notifications carry the newest message's text (default false: only the
    /// conversation, the sender and a count).
    #[serde(default)]
    pub previews: bool,
}

/// What a push target receives: the decrypted Web Push payload, or the webhook's
/// JSON body. One notification stands for `count` messages of one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushNotification {
    /// Format version, 1.
    pub v: u32,
    /// The recipient, `name@server`.
    pub user: String,
    /// The conversation (channel id).
    pub channel: String,
    /// Sender of the newest message counted.
    pub sender: String,
    /// Messages this notification stands for (at least 1).
    pub count: u64,
    /// Timestamp of the newest message counted (ms since the epoch).
    pub ts: u64,
    /// The newest message's text, only when the user turned previews on; cut at
    /// 1000 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
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
