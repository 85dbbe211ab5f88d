//! Stable machine-readable error codes and WebSocket close codes shared by server and clients.

use serde::{Deserialize, Serialize};

/// Why a request or frame was refused. The wire form is the snake_case name,
/// which never changes once published; new codes may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body or frame is not valid JSON, or not of the documented shape.
    BadRequest,
    /// A field has a value outside what is allowed (names, lengths, ids).
    InvalidField,
    /// The frame's `type` is not one this server knows.
    UnknownFrame,
    /// The frame or HTTP body is larger than the server accepts.
    TooLarge,
    /// No access token, or one that is unknown or revoked.
    Unauthorized,
    /// Wrong username or password.
    BadCredentials,
    /// The account has been disabled by an administrator.
    AccountDisabled,
    /// Registration is closed on this server; an administrator creates accounts.
    RegistrationClosed,
    /// The username is already registered.
    UserExists,
    /// The user does not exist.
    UnknownUser,
    /// The channel does not exist.
    UnknownChannel,
    /// The device does not exist or belongs to someone else.
    UnknownDevice,
    /// The caller is not a member of the channel.
    NotMember,
    /// Only a channel admin may do this.
    NotChannelAdmin,
    /// The user is already a member of the channel.
    AlreadyMember,
    /// The group has reached its member limit.
    GroupFull,
    /// The operation does not apply to a direct (one-to-one) channel.
    DirectChannel,
    /// A message to oneself is not a conversation.
    InvalidRecipient,
    /// Too many frames or requests; slow down and retry.
    RateLimited,
    /// The WebSocket session must authenticate before anything else.
    NotAuthenticated,
    /// The client speaks a protocol version this server does not.
    UnsupportedVersion,
    /// The route does not exist.
    NotFound,
    /// The route exists but does not take this HTTP method.
    MethodNotAllowed,
    /// The push target does not exist or belongs to another user.
    UnknownPushTarget,
    /// The user already has the most push targets a user may have.
    TooManyPushTargets,
    /// The server failed; the request may be retried.
    Internal,
}

impl ErrorCode {
    /// The wire name, as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnknownFrame => "unknown_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::AccountDisabled => "account_disabled",
            ErrorCode::RegistrationClosed => "registration_closed",
            ErrorCode::UserExists => "user_exists",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::UnknownDevice => "unknown_device",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotChannelAdmin => "not_channel_admin",
            ErrorCode::AlreadyMember => "already_member",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::DirectChannel => "direct_channel",
            ErrorCode::InvalidRecipient => "invalid_recipient",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UnknownPushTarget => "unknown_push_target",
            ErrorCode::TooManyPushTargets => "too_many_push_targets",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code on the stateless API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidField
            | ErrorCode::UnknownFrame
            | ErrorCode::DirectChannel
            | ErrorCode::InvalidRecipient
            | ErrorCode::UnsupportedVersion => 400,
            ErrorCode::Unauthorized | ErrorCode::BadCredentials | ErrorCode::NotAuthenticated => {
                401
            }
            ErrorCode::AccountDisabled
            | ErrorCode::RegistrationClosed
            | ErrorCode::NotMember
            | ErrorCode::NotChannelAdmin => 403,
            ErrorCode::UnknownUser
            | ErrorCode::UnknownChannel
            | ErrorCode::UnknownDevice
            | ErrorCode::UnknownPushTarget
            | ErrorCode::NotFound => 404,
            ErrorCode::UserExists
            | ErrorCode::AlreadyMember
            | ErrorCode::GroupFull
            | ErrorCode::TooManyPushTargets => 409,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the server uses, beyond the standard 1000/1001/1009.
pub mod close {
    /// Normal closure (client asked, or server finished).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect later.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame exceeded the hard size cap; the connection cannot continue.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The token in the `auth` frame is missing, unknown or revoked.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The client's protocol version is not supported.
    pub const UNSUPPORTED_VERSION: u16 = 4002;
    /// No `auth` frame arrived within the authentication timeout.
    pub const AUTH_TIMEOUT: u16 = 4003;
    /// No frame (heartbeat or other) arrived within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4004;
    /// The client did not read fast enough and its queue overflowed; reconnect and
    /// resync from the cursor.
    pub const TOO_SLOW: u16 = 4005;
    /// The device was logged out (or the account disabled) while connected.
    pub const LOGGED_OUT: u16 = 4006;
    /// The server failed while serving the session; reconnect.
    pub const SERVER_ERROR: u16 = 1011;
}
