//! The async client library: the HTTP API through [`Client`] and [`AuthedClient`], and
//! one WebSocket session per device through [`Connection`].
//!
//! The WebSocket layer is a thin typed wrapper: it turns [`ClientFrame`]s into text
//! messages and text messages into [`ServerFrame`]s, and runs no background task.
//! Heartbeats, cursor acknowledgements and reconnects are the caller's business
//! (the terminal client in [`crate::chat`] shows one way).

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use reqwest::{Method, RequestBuilder, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http::{
    AddMember, ChannelList, CreateGroup, Credentials, DeviceList, HistoryPage, Me, MemberList,
    NewPushTarget, OpenDirect, PresenceList, Problem, Profile, PushSettings, PushTarget,
    PushTargetList, Session, VapidKey,
};
use crate::model::ChannelSummary;
use crate::{ClientFrame, ErrorCode, PROTOCOL_VERSION, ServerFrame, close};

/// Close code reported when the connection ended without a close frame (RFC 6455
/// reserves 1006 for exactly this; it is never sent on the wire).
pub const ABNORMAL_CLOSE: u16 = 1006;

/// How long connecting, upgrading and waiting for `ready` may take together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Connection::close`] waits for the server's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the reading half waits for the server to end the connection after a
/// close frame (the server closes TCP right after the close handshake).
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Per-request timeout of the HTTP API; history and lists are small, so a slow
/// answer means a stuck server rather than a big body.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket buffers: chat frames are small, and tungstenite's 128 KiB defaults cost
/// memory per connection (tungstenite allocates its read buffer eagerly).
const WS_BUFFER_BYTES: usize = 4 * 1024;
/// Largest incoming message or frame. A `sync` frame holds up to 500 events of up to
/// 16 KiB of text each, so 1 MiB would be too small (protocol.md 5.1 asks for at
/// least 16 MiB). This is only a cap: buffers grow to it only for such a frame.
const WS_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Close code of a server that failed (for example reading the backlog).
const SERVER_ERROR_CLOSE: u16 = 1011;
/// Longest response body quoted in [`ClientError::UnexpectedStatus`].
const QUOTED_BODY_CHARS: usize = 512;

/// The WebSocket stream [`connect_session`] opens.
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Result alias of this module.
pub(crate) type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a Hearth node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server URL cannot be used: not http(s)/ws(s), or cannot carry a path.
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An id passed as a path segment is empty, `.` or `..`, which no URL can carry.
    #[error("invalid {what} {value:?}")]
    InvalidArgument {
        /// What the value names ("user id", "channel id", ...).
        what: &'static str,
        /// The value as given.
        value: String,
    },
    /// The server refused an HTTP request with a problem document.
    #[error("{code} ({status}): {detail}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: ErrorCode,
        /// The server's explanation.
        detail: String,
    },
    /// The server answered with an error status but no problem document this client
    /// understands (a proxy's error page, or a code newer than this crate).
    #[error("unexpected HTTP status {status}: {body}")]
    UnexpectedStatus {
        /// HTTP status.
        status: u16,
        /// Start of the response body, for diagnosis.
        body: String,
    },
    /// The HTTP request could not be sent or its answer not read.
    #[error("HTTP request failed")]
    Http(#[from] reqwest::Error),
    /// A successful HTTP response body did not have the documented shape.
    #[error("malformed response from server")]
    Decode(#[source] serde_json::Error),
    /// The WebSocket transport failed (connect, upgrade, read or write).
    #[error("WebSocket transport failed")]
    WebSocket(#[source] Box<WsError>),
    /// A WebSocket frame from the server is not a valid [`ServerFrame`]. The
    /// connection is still usable: the caller may log this and read on (a newer
    /// server may send frame types this crate does not know).
    #[error("malformed frame from server")]
    BadFrame(#[source] serde_json::Error),
    /// The server answered the `auth` frame with an `error` frame.
    #[error("session refused: {code}: {message}")]
    Refused {
        /// Stable error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server closed the session with a close code other than normal closure,
    /// or the connection dropped without one ([`ABNORMAL_CLOSE`]). See
    /// [`crate::close`] for the codes Hearth uses.
    #[error("session closed with code {code}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    Closed {
        /// WebSocket close code.
        code: u16,
        /// Close reason sent by the server (may be empty).
        reason: String,
    },
    /// A frame to send is larger than the server accepts (`max_frame_bytes` of `ready`).
    #[error("frame of {size} bytes exceeds the server's limit of {max} bytes")]
    FrameTooLarge {
        /// Encoded size of the frame.
        size: usize,
        /// The server's limit.
        max: usize,
    },
    /// The server broke the session protocol (for example a first frame other than
    /// `ready`, or another protocol version).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server did not complete the session handshake in time.
    #[error("no answer from server within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// The stable error code, for errors the server explained with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The WebSocket close code, for sessions that ended with one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ClientError::Closed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying later (a new request or a new session) can succeed: network
    /// trouble, server restarts and overload, as opposed to refusals that will repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Http(_) | ClientError::WebSocket(_) | ClientError::Timeout(_) => true,
            ClientError::Server { code, .. } | ClientError::Refused { code, .. } => {
                matches!(code, ErrorCode::RateLimited | ErrorCode::Internal)
            }
            ClientError::UnexpectedStatus { status, .. } => *status >= 500 || *status == 429,
            // protocol.md section 9: stop on 4001/4002/4006 and 1009, reconnect otherwise.
            ClientError::Closed { code, .. } => matches!(
                *code,
                close::NORMAL
                    | close::GOING_AWAY
                    | ABNORMAL_CLOSE
                    | SERVER_ERROR_CLOSE
                    | close::AUTH_TIMEOUT
                    | close::HEARTBEAT_TIMEOUT
                    | close::TOO_SLOW
            ),
            _ => false,
        }
    }
}

impl From<WsError> for ClientError {
    fn from(e: WsError) -> Self {
        ClientError::WebSocket(Box::new(e))
    }
}

/// Maps a non-success HTTP answer to an error: the problem document if there is
/// one this crate understands, the status and the start of the body otherwise.
pub(crate) fn error_from_response(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<Problem>(body) {
        Ok(problem) => ClientError::Server {
            // The status line is what actually happened; the document's copy is informative.
            status,
            code: problem.code,
            detail: problem.detail,
        },
        Err(_) => ClientError::UnexpectedStatus {
            status,
            body: String::from_utf8_lossy(body)
                .chars()
                .take(QUOTED_BODY_CHARS)
                .collect(),
        },
    }
}

/// Parses and checks a server base URL (`http://host:port`, optionally with a path prefix).
fn parse_base(base_url: &str) -> Result<Url> {
    let invalid = |reason| ClientError::InvalidUrl {
        url: base_url.to_owned(),
        reason,
    };
    let mut url = Url::parse(base_url).map_err(|_| invalid("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("scheme must be http or https"));
    }
    if url.cannot_be_a_base() {
        return Err(invalid("cannot carry a path"));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Appends path segments to a base URL, percent-encoding each one, so ids with `/`,
/// `?`, `#`, `%` or spaces stay one segment. `@` is legal in a path segment (RFC 3986
/// `pchar`) and is left as is.
fn join_segments(base: &Url, segments: &[(&'static str, &str)]) -> Result<Url> {
    let mut url = base.clone();
    for (what, value) in segments {
        // The url crate silently drops `.` and `..` segments; refuse them instead of
        // sending the request somewhere else.
        if value.is_empty() || *value == "." || *value == ".." {
            return Err(ClientError::InvalidArgument {
                what,
                value: (*value).to_owned(),
            });
        }
    }
    url.path_segments_mut()
        .map_err(|()| ClientError::InvalidUrl {
            url: base.to_string(),
            reason: "cannot carry a path",
        })?
        .pop_if_empty()
        .extend(segments.iter().map(|(_, value)| *value));
    Ok(url)
}

/// The session URL of a node: `{base}/v1/ws` with `http` turned into `ws` and
/// `https` into `wss`. A `ws`/`wss` base is accepted as is.
pub fn ws_url(base_url: &str) -> Result<String> {
    let invalid = |reason| ClientError::InvalidUrl {
        url: base_url.to_owned(),
        reason,
    };
    let mut url = Url::parse(base_url).map_err(|_| invalid("not a URL"))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return Err(invalid("scheme must be http, https, ws or wss")),
    };
    url.set_scheme(scheme)
        .map_err(|()| invalid("cannot change the scheme"))?;
    url.set_query(None);
    url.set_fragment(None);
    Ok(join_segments(&url, &[("path", "v1"), ("path", "ws")])?.into())
}

/// Unauthenticated entry point to a node's HTTP API: registers and logs in.
/// Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// A client for the node at `base_url`, e.g. `http://127.0.0.1:8080`.
    pub fn new(base_url: &str) -> Result<Self> {
        let base = parse_base(base_url)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("hearth-client-api/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .build()?;
        Ok(Client { http, base })
    }

    /// The node's base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// The node's session URL (`ws://.../v1/ws`).
    pub fn ws_url(&self) -> Result<String> {
        ws_url(self.base.as_str())
    }

    /// `POST /v1/register`: creates an account and logs its first device in.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        device_name: Option<&str>,
    ) -> Result<Session> {
        let body = credentials(username, password, device_name);
        let request = self.request(Method::POST, &["v1", "register"])?.json(&body);
        send_json(request).await
    }

    /// `POST /v1/login`: logs a new device in.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_name: Option<&str>,
    ) -> Result<Session> {
        let body = credentials(username, password, device_name);
        let request = self.request(Method::POST, &["v1", "login"])?.json(&body);
        send_json(request).await
    }

    /// `GET /v1/push/vapid`: the node's VAPID public key (no token needed).
    pub async fn vapid_key(&self) -> Result<VapidKey> {
        let request = self.request(Method::GET, &["v1", "push", "vapid"])?;
        send_json(request).await
    }

    /// An authenticated handle using a device's access token.
    pub fn with_token(&self, token: impl Into<String>) -> AuthedClient {
        AuthedClient {
            client: self.clone(),
            token: token.into(),
        }
    }

    /// Opens and authenticates a WebSocket session for the device owning `token`.
    pub async fn connect_session(&self, token: &str) -> Result<Connection> {
        connect_session(&self.ws_url()?, token).await
    }

    /// A request to a fixed route (segments are constants, never user input).
    fn request(&self, method: Method, segments: &[&'static str]) -> Result<RequestBuilder> {
        let named: Vec<(&'static str, &str)> = segments.iter().map(|s| ("path", *s)).collect();
        Ok(self
            .http
            .request(method, join_segments(&self.base, &named)?))
    }
}

fn credentials(username: &str, password: &str, device_name: Option<&str>) -> Credentials {
    Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
        device_name: device_name.map(str::to_owned),
    }
}

/// Sends a request and decodes a JSON answer.
async fn send_json<T: DeserializeOwned>(request: RequestBuilder) -> Result<T> {
    let body = send(request).await?;
    serde_json::from_slice(body.as_ref()).map_err(ClientError::Decode)
}

/// Sends a request and returns the body of a successful answer.
async fn send(request: RequestBuilder) -> Result<impl AsRef<[u8]>> {
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(error_from_response(status.as_u16(), &body))
    }
}

/// The HTTP API as one logged-in device. Cheap to clone.
#[derive(Clone)]
pub struct AuthedClient {
    client: Client,
    token: String,
}

impl fmt::Debug for AuthedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential: keep it out of logs.
        f.debug_struct("AuthedClient")
            .field("base", &self.client.base.as_str())
            .finish_non_exhaustive()
    }
}

impl AuthedClient {
    /// The unauthenticated client this handle was made from.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The device's access token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Opens and authenticates this device's WebSocket session.
    pub async fn connect_session(&self) -> Result<Connection> {
        self.client.connect_session(&self.token).await
    }

    /// `POST /v1/logout`: revokes this device's token.
    pub async fn logout(&self) -> Result<()> {
        self.no_content(Method::POST, &[("path", "logout")], None::<&()>)
            .await
    }

    /// `POST /v1/logout/all`: revokes every device of the user.
    pub async fn logout_all(&self) -> Result<()> {
        self.no_content(
            Method::POST,
            &[("path", "logout"), ("path", "all")],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/me`.
    pub async fn me(&self) -> Result<Me> {
        self.json(Method::GET, &[("path", "me")], None::<&()>).await
    }

    /// `GET /v1/devices`.
    pub async fn devices(&self) -> Result<DeviceList> {
        self.json(Method::GET, &[("path", "devices")], None::<&()>)
            .await
    }

    /// `DELETE /v1/devices/{device}`: logs one of the user's devices out.
    pub async fn delete_device(&self, device: &str) -> Result<()> {
        self.no_content(
            Method::DELETE,
            &[("path", "devices"), ("device id", device)],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/profile/{user}`.
    pub async fn profile(&self, user: &str) -> Result<Profile> {
        self.json(
            Method::GET,
            &[("path", "profile"), ("user id", user)],
            None::<&()>,
        )
        .await
    }

    /// `PUT /v1/profile`: sets the caller's profile (`user` is ignored).
    pub async fn set_profile(&self, profile: &Profile) -> Result<Profile> {
        self.json(Method::PUT, &[("path", "profile")], Some(profile))
            .await
    }

    /// `GET /v1/channels`: the caller's channels, most recently active first.
    pub async fn channels(&self) -> Result<ChannelList> {
        self.json(Method::GET, &[("path", "channels")], None::<&()>)
            .await
    }

    /// `POST /v1/channels`: creates a group with the caller as admin.
    pub async fn create_group(&self, name: &str, members: &[String]) -> Result<ChannelSummary> {
        let body = CreateGroup {
            name: name.to_owned(),
            members: members.to_vec(),
        };
        self.json(Method::POST, &[("path", "channels")], Some(&body))
            .await
    }

    /// `POST /v1/direct`: finds or creates the direct channel with `user`.
    pub async fn open_direct(&self, user: &str) -> Result<ChannelSummary> {
        let body = OpenDirect {
            user: user.to_owned(),
        };
        self.json(Method::POST, &[("path", "direct")], Some(&body))
            .await
    }

    /// `GET /v1/channels/{id}`.
    pub async fn channel(&self, channel: &str) -> Result<ChannelSummary> {
        self.json(
            Method::GET,
            &[("path", "channels"), ("channel id", channel)],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/channels/{id}/members`.
    pub async fn members(&self, channel: &str) -> Result<MemberList> {
        self.json(
            Method::GET,
            &[
                ("path", "channels"),
                ("channel id", channel),
                ("path", "members"),
            ],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/channels/{id}/members`: an admin adds `user` to a group.
    pub async fn add_member(&self, channel: &str, user: &str) -> Result<MemberList> {
        let body = AddMember {
            user: user.to_owned(),
        };
        self.json(
            Method::POST,
            &[
                ("path", "channels"),
                ("channel id", channel),
                ("path", "members"),
            ],
            Some(&body),
        )
        .await
    }

    /// `DELETE /v1/channels/{id}/members/{user}`: an admin removes `user` from a group.
    pub async fn remove_member(&self, channel: &str, user: &str) -> Result<MemberList> {
        self.json(
            Method::DELETE,
            &[
                ("path", "channels"),
                ("channel id", channel),
                ("path", "members"),
                ("user id", user),
            ],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/channels/{id}/leave`: the caller leaves a group.
    pub async fn leave(&self, channel: &str) -> Result<()> {
        self.no_content(
            Method::POST,
            &[
                ("path", "channels"),
                ("channel id", channel),
                ("path", "leave"),
            ],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/channels/{id}/messages`: one page of history, newest first. Pass the
    /// previous page's `next` as `before` to page back; `limit` defaults server-side.
    pub async fn history(
        &self,
        channel: &str,
        before: Option<&str>,
        limit: Option<u32>,
    ) -> Result<HistoryPage> {
        let mut url = self.url(&[
            ("path", "channels"),
            ("channel id", channel),
            ("path", "messages"),
        ])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(before) = before {
                query.append_pair("before", before);
            }
            if let Some(limit) = limit {
                query.append_pair("limit", &limit.to_string());
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        send_json(self.authed(Method::GET, url)).await
    }

    /// `GET /v1/presence?users=...`: presence of the given users (those that exist).
    pub async fn presence<I, S>(&self, users: I) -> Result<PresenceList>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let users: Vec<S> = users.into_iter().collect();
        let joined = users
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<&str>>()
            .join(",");
        let mut url = self.url(&[("path", "presence")])?;
        url.query_pairs_mut().append_pair("users", &joined);
        send_json(self.authed(Method::GET, url)).await
    }

    /// `GET /v1/push/targets`: every push target of the user's devices.
    pub async fn push_targets(&self) -> Result<PushTargetList> {
        self.json(
            Method::GET,
            &[("path", "push"), ("path", "targets")],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/push/targets`: registers a push target for this device.
    pub async fn add_push_target(&self, target: &NewPushTarget) -> Result<PushTarget> {
        self.json(
            Method::POST,
            &[("path", "push"), ("path", "targets")],
            Some(target),
        )
        .await
    }

    /// `DELETE /v1/push/targets/{id}`: removes one of the user's push targets.
    pub async fn remove_push_target(&self, id: &str) -> Result<()> {
        self.no_content(
            Method::DELETE,
            &[("path", "push"), ("path", "targets"), ("target id", id)],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/push/settings`.
    pub async fn push_settings(&self) -> Result<PushSettings> {
        self.json(
            Method::GET,
            &[("path", "push"), ("path", "settings")],
            None::<&()>,
        )
        .await
    }

    /// `PUT /v1/push/settings`: turns message previews in notifications on or off.
    pub async fn set_push_settings(&self, settings: &PushSettings) -> Result<PushSettings> {
        self.json(
            Method::PUT,
            &[("path", "push"), ("path", "settings")],
            Some(settings),
        )
        .await
    }

    /// `/v1/` followed by the given segments.
    fn url(&self, segments: &[(&'static str, &str)]) -> Result<Url> {
        let mut all = Vec::with_capacity(segments.len() + 1);
        all.push(("path", "v1"));
        all.extend_from_slice(segments);
        join_segments(&self.client.base, &all)
    }

    fn authed(&self, method: Method, url: Url) -> RequestBuilder {
        self.client
            .http
            .request(method, url)
            .bearer_auth(&self.token)
    }

    async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[(&'static str, &str)],
        body: Option<&B>,
    ) -> Result<T> {
        let mut request = self.authed(method, self.url(segments)?);
        if let Some(body) = body {
            request = request.json(body);
        }
        send_json(request).await
    }

    async fn no_content<B: Serialize>(
        &self,
        method: Method,
        segments: &[(&'static str, &str)],
        body: Option<&B>,
    ) -> Result<()> {
        let mut request = self.authed(method, self.url(segments)?);
        if let Some(body) = body {
            request = request.json(body);
        }
        send(request).await.map(drop)
    }
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A user, `name@server`: the direct chat with them (created on first message).
    User(String),
    /// A channel id.
    Channel(String),
}

impl ClientFrame {
    /// A `send` frame of `body` to `target` with idempotency key `key`.
    pub fn send(key: impl Into<String>, target: Target, body: impl Into<String>) -> Self {
        let (to, channel) = match target {
            Target::User(user) => (Some(user), None),
            Target::Channel(channel) => (None, Some(channel)),
        };
        ClientFrame::Send {
            key: key.into(),
            to,
            channel,
            body: body.into(),
        }
    }
}

/// The session parameters the server announced in its `ready` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The authenticated user.
    pub user: String,
    /// The authenticated device.
    pub device: String,
    /// The device's stored cursor; the backlog (`sync` frames) starts after it.
    pub cursor: u64,
    /// Send a frame at least this often or be disconnected.
    pub heartbeat_timeout: Duration,
    /// Largest frame the server accepts, in bytes.
    pub max_frame_bytes: usize,
}

impl Ready {
    /// A heartbeat period that keeps the session alive with margin: a third of the
    /// timeout (so one late or lost heartbeat is survivable), at least 100 ms.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout / 3).max(Duration::from_millis(100))
    }
}

/// Generates idempotency keys for `send` frames: a random 64-bit prefix per
/// generator plus a counter, so keys never repeat across devices or restarts.
#[derive(Debug, Clone)]
pub struct KeyGen {
    prefix: u64,
    counter: u64,
}

impl KeyGen {
    /// A generator with a fresh random prefix.
    pub fn new() -> Self {
        // std's RandomState is seeded from the OS RNG; mixing in the clock and pid
        // guards against a platform where it is not. Keys need uniqueness, not secrecy.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        KeyGen {
            prefix: hasher.finish(),
            counter: 0,
        }
    }

    /// The next key (at most 33 characters, within the protocol's 64).
    pub fn next_key(&mut self) -> String {
        self.counter = self.counter.wrapping_add(1);
        format!("{:016x}-{:x}", self.prefix, self.counter)
    }
}

impl Default for KeyGen {
    fn default() -> Self {
        Self::new()
    }
}

/// The WebSocket settings of a client session: small buffers, protocol-sized limits.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        // Must exceed write_buffer_size; bounds what piles up while writes fail.
        .max_write_buffer_size(WS_MAX_MESSAGE_BYTES + WS_BUFFER_BYTES)
        .max_message_size(Some(WS_MAX_MESSAGE_BYTES))
        .max_frame_size(Some(WS_MAX_MESSAGE_BYTES))
}

/// Opens the WebSocket at `ws_url` (see [`ws_url`]), sends the `auth` frame with
/// `token` and waits for `ready`.
///
/// Fails with [`ClientError::Refused`] if the server answers with an `error` frame,
/// [`ClientError::Closed`] if it closes the session (the code says why, e.g.
/// [`close::UNAUTHORIZED`]), [`ClientError::Server`] if the upgrade itself is refused
/// with a problem document, and [`ClientError::Timeout`] after 30 seconds.
pub async fn connect_session(ws_url: &str, token: &str) -> Result<Connection> {
    let handshake = async {
        let request = ws_url.into_client_request()?;
        // Nagle off: chat frames are small and latency matters more than packet count.
        let (stream, _response) =
            tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true)
                .await
                .map_err(upgrade_error)?;
        Connection::authenticate(stream, token).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ClientError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// A refused upgrade carries an HTTP answer: report its problem document if any.
fn upgrade_error(e: WsError) -> ClientError {
    match e {
        WsError::Http(response) => {
            let body = response.body().as_deref().unwrap_or_default();
            error_from_response(response.status().as_u16(), body)
        }
        other => other.into(),
    }
}

/// An authenticated WebSocket session.
///
/// Generic over the underlying message stream so the session logic can be driven
/// by an in-memory stream in tests; [`connect_session`] gives a `Connection<WsStream>`.
/// Use [`Connection::split`] to read in one task and write in another.
pub struct Connection<S = WsStream> {
    sender: SessionSender<S>,
    receiver: SessionReceiver<S>,
    ready: Ready,
}

impl<S> fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl<S> Connection<S>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    /// Authenticates an already open WebSocket: sends `auth` and waits for `ready`.
    /// No timeout is applied here; [`connect_session`] bounds the whole handshake.
    pub async fn authenticate(stream: S, token: &str) -> Result<Self> {
        let (sink, stream) = stream.split();
        let mut sender = SessionSender {
            sink,
            // Unknown until `ready`; the auth frame is tiny.
            max_frame_bytes: usize::MAX,
        };
        let mut receiver = SessionReceiver::new(stream);
        sender
            .send(&ClientFrame::Auth {
                v: PROTOCOL_VERSION,
                token: token.to_owned(),
            })
            .await?;
        match receiver.next_frame().await? {
            Some(ServerFrame::Ready {
                v,
                user,
                device,
                cursor,
                heartbeat_timeout_ms,
                max_frame_bytes,
            }) => {
                if v != PROTOCOL_VERSION {
                    return Err(ClientError::Protocol(format!(
                        "server speaks protocol version {v}, this client {PROTOCOL_VERSION}"
                    )));
                }
                sender.max_frame_bytes = max_frame_bytes;
                Ok(Connection {
                    sender,
                    receiver,
                    ready: Ready {
                        user,
                        device,
                        cursor,
                        heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
                        max_frame_bytes,
                    },
                })
            }
            Some(ServerFrame::Error { code, message, .. }) => {
                Err(ClientError::Refused { code, message })
            }
            Some(other) => Err(ClientError::Protocol(format!(
                "expected a ready frame, got {}",
                frame_type(&other)
            ))),
            None => Err(ClientError::Closed {
                code: close::NORMAL,
                reason: "closed before ready".to_owned(),
            }),
        }
    }

    /// What the server announced in `ready`.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Sends any client frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.sender.send(frame).await
    }

    /// Sends a message; the server answers with `ack` (or `error`) carrying `key`.
    pub async fn send_message(
        &mut self,
        key: impl Into<String>,
        target: Target,
        body: impl Into<String>,
    ) -> Result<()> {
        self.sender.send_message(key, target, body).await
    }

    /// Acknowledges every event up to and including stream position `pos`.
    pub async fn ack_cursor(&mut self, pos: u64) -> Result<()> {
        self.sender.ack_cursor(pos).await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&mut self) -> Result<()> {
        self.sender.heartbeat().await
    }

    /// The next frame from the server; see [`SessionReceiver::next_frame`].
    pub async fn next_frame(&mut self) -> Result<Option<ServerFrame>> {
        self.receiver.next_frame().await
    }

    /// Splits the session into a sending and a receiving half, usable from two tasks.
    pub fn split(self) -> (SessionSender<S>, SessionReceiver<S>, Ready) {
        (self.sender, self.receiver, self.ready)
    }

    /// Closes the session cleanly: sends a normal close and waits (up to 5 seconds)
    /// for the server's reply, discarding frames that arrive meanwhile.
    pub async fn close(mut self) -> Result<()> {
        self.sender.close().await?;
        let drain = async {
            while let Ok(Some(_)) | Err(ClientError::BadFrame(_)) = self.receiver.next_frame().await
            {
            }
        };
        // A server that never answers the close is its problem, not the caller's.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
        Ok(())
    }
}

/// The writing half of a session.
pub struct SessionSender<S = WsStream> {
    sink: SplitSink<S, Message>,
    max_frame_bytes: usize,
}

impl<S> fmt::Debug for SessionSender<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSender")
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish_non_exhaustive()
    }
}

impl<S> SessionSender<S>
where
    S: Sink<Message, Error = WsError>,
{
    /// Sends any client frame (and flushes it). Frames larger than the server's
    /// `max_frame_bytes` are refused locally rather than getting the session closed.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        let text = serde_json::to_string(frame)
            .map_err(|e| ClientError::Protocol(format!("cannot encode frame: {e}")))?;
        if text.len() > self.max_frame_bytes {
            return Err(ClientError::FrameTooLarge {
                size: text.len(),
                max: self.max_frame_bytes,
            });
        }
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }

    /// Sends a message; the server answers with `ack` (or `error`) carrying `key`.
    pub async fn send_message(
        &mut self,
        key: impl Into<String>,
        target: Target,
        body: impl Into<String>,
    ) -> Result<()> {
        self.send(&ClientFrame::send(key, target, body)).await
    }

    /// Acknowledges every event up to and including stream position `pos`.
    pub async fn ack_cursor(&mut self, pos: u64) -> Result<()> {
        self.send(&ClientFrame::Cursor { pos }).await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(&mut self) -> Result<()> {
        self.send(&ClientFrame::Heartbeat).await
    }

    /// Sends a normal close. The receiving half then ends with `Ok(None)` once the
    /// server replies. Closing an already closed session is not an error.
    pub async fn close(&mut self) -> Result<()> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match self.sink.send(Message::Close(Some(frame))).await {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The reading half of a session.
pub struct SessionReceiver<S = WsStream> {
    stream: SplitStream<S>,
    state: ReceiveState,
}

/// Where the reading half is in the session's life.
#[derive(Debug)]
enum ReceiveState {
    Open,
    /// A close frame arrived; what to report once the close reply has gone out.
    Closing(Option<ClientError>),
    /// Nothing more will come.
    Ended,
}

impl<S> fmt::Debug for SessionReceiver<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionReceiver")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<S> SessionReceiver<S>
where
    S: Stream<Item = Result<Message, WsError>>,
{
    fn new(stream: SplitStream<S>) -> Self {
        SessionReceiver {
            stream,
            state: ReceiveState::Open,
        }
    }

    /// The next frame from the server.
    ///
    /// Returns `Ok(None)` once the session has closed cleanly (normal closure, or
    /// after an earlier close was reported), [`ClientError::Closed`] when the server
    /// closed with another code or the connection dropped, and
    /// [`ClientError::BadFrame`] for an undecodable frame (reading may go on).
    ///
    /// Cancel safe: a frame is never lost if the future is dropped, so it can be
    /// used in `tokio::select!` alongside a heartbeat timer.
    pub async fn next_frame(&mut self) -> Result<Option<ServerFrame>> {
        loop {
            match &mut self.state {
                ReceiveState::Open => {}
                ReceiveState::Closing(outcome) => {
                    let outcome = outcome.take();
                    self.finish_close().await;
                    self.state = ReceiveState::Ended;
                    return outcome.map_or(Ok(None), Err);
                }
                ReceiveState::Ended => return Ok(None),
            }
            let message = match self.stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    self.state = ReceiveState::Ended;
                    return Ok(None);
                }
                Some(Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)))
                | None => {
                    self.state = ReceiveState::Ended;
                    return Err(dropped());
                }
                Some(Err(e)) => {
                    self.state = ReceiveState::Ended;
                    return Err(e.into());
                }
            };
            match message {
                Message::Text(text) => return decode_frame(text.as_bytes()).map(Some),
                // The protocol is text, but JSON in a binary message is unambiguous.
                Message::Binary(bytes) => return decode_frame(&bytes).map(Some),
                Message::Close(frame) => {
                    // Recorded before any further await, so a cancelled call loses nothing.
                    self.state = ReceiveState::Closing(match frame {
                        Some(frame) if u16::from(frame.code) != close::NORMAL => {
                            Some(ClientError::Closed {
                                code: frame.code.into(),
                                reason: frame.reason.to_string(),
                            })
                        }
                        _ => None,
                    });
                }
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// tungstenite queues the reply to a close frame and sends it on the next read;
    /// read on (briefly) so the reply goes out and the server sees a clean close.
    async fn finish_close(&mut self) {
        let drain = async { while let Some(Ok(_)) = self.stream.next().await {} };
        let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, drain).await;
    }
}

/// The connection ended without a close frame.
fn dropped() -> ClientError {
    ClientError::Closed {
        code: ABNORMAL_CLOSE,
        reason: "connection dropped".to_owned(),
    }
}

fn decode_frame(bytes: &[u8]) -> Result<ServerFrame> {
    serde_json::from_slice(bytes).map_err(ClientError::BadFrame)
}

/// The `type` tag of a server frame, for messages.
fn frame_type(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Ready { .. } => "ready",
        ServerFrame::Sync { .. } => "sync",
        ServerFrame::Event { .. } => "event",
        ServerFrame::Ack { .. } => "ack",
        ServerFrame::Presence(_) => "presence",
        ServerFrame::Error { .. } => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, EventContent, MembershipAction, PresenceInfo, PresenceStatus};
    use serde_json::json;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn base() -> Url {
        parse_base("http://127.0.0.1:8080").unwrap()
    }

    #[test]
    fn ws_url_is_derived_from_http_base() {
        assert_eq!(
            ws_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/ws"
        );
        assert_eq!(
            ws_url("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080/v1/ws"
        );
        assert_eq!(
            ws_url("https://chat.example.org/hearth/").unwrap(),
            "wss://chat.example.org/hearth/v1/ws"
        );
        assert_eq!(
            ws_url("ws://localhost:9000?x=1#y").unwrap(),
            "ws://localhost:9000/v1/ws"
        );
        assert!(matches!(
            ws_url("ftp://example.org"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(matches!(
            ws_url("not a url"),
            Err(ClientError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn client_accepts_only_http_bases() {
        assert!(Client::new("http://localhost:8080").is_ok());
        assert!(matches!(
            Client::new("ws://localhost:8080"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Client::new("localhost:8080"),
            Err(ClientError::InvalidUrl { .. })
        ));
        let client = Client::new("http://localhost:8080/prefix").unwrap();
        assert_eq!(client.ws_url().unwrap(), "ws://localhost:8080/prefix/v1/ws");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        let url = join_segments(
            &base(),
            &[
                ("path", "v1"),
                ("path", "channels"),
                ("channel id", "k3j4h5@localhost"),
                ("path", "members"),
                ("user id", "a/b c?#%@x"),
            ],
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/v1/channels/k3j4h5@localhost/members/a%2Fb%20c%3F%23%25@x"
        );
        for bad in ["", ".", ".."] {
            assert!(matches!(
                join_segments(&base(), &[("channel id", bad)]),
                Err(ClientError::InvalidArgument {
                    what: "channel id",
                    ..
                })
            ));
        }
    }

    #[test]
    fn query_strings_are_encoded() {
        let client = Client::new("http://h:1").unwrap().with_token("t");
        let mut url = client.url(&[("path", "presence")]).unwrap();
        url.query_pairs_mut().append_pair("users", "a@x,b c@x&d");
        assert_eq!(
            url.as_str(),
            "http://h:1/v1/presence?users=a%40x%2Cb+c%40x%26d"
        );
    }

    #[test]
    fn problem_documents_become_server_errors() {
        let body = json!({
            "type": "urn:hearth:error:not_member",
            "title": "Not a member",
            "status": 403,
            "code": "not_member",
            "detail": "you are not a member of k3j4h5@localhost"
        });
        let error = error_from_response(403, body.to_string().as_bytes());
        match &error {
            ClientError::Server {
                status,
                code,
                detail,
            } => {
                assert_eq!(*status, 403);
                assert_eq!(*code, ErrorCode::NotMember);
                assert_eq!(detail, "you are not a member of k3j4h5@localhost");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(error.code(), Some(ErrorCode::NotMember));
        assert!(!error.is_transient());
        assert_eq!(
            error.to_string(),
            "not_member (403): you are not a member of k3j4h5@localhost"
        );
    }

    #[test]
    fn other_error_bodies_keep_status_and_text() {
        let error = error_from_response(502, b"<html>Bad Gateway</html>");
        assert!(matches!(
            &error,
            ClientError::UnexpectedStatus { status: 502, body } if body == "<html>Bad Gateway</html>"
        ));
        assert!(error.is_transient());

        // A code newer than this crate is not a crash, just an unexpected status.
        let body = json!({
            "type": "urn:hearth:error:brand_new",
            "title": "New",
            "status": 400,
            "code": "brand_new",
            "detail": "d"
        });
        assert!(matches!(
            error_from_response(400, body.to_string().as_bytes()),
            ClientError::UnexpectedStatus { status: 400, .. }
        ));

        let long = "x".repeat(10_000);
        match error_from_response(500, long.as_bytes()) {
            ClientError::UnexpectedStatus { body, .. } => {
                assert_eq!(body.len(), QUOTED_BODY_CHARS)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refused_upgrade_maps_its_problem_document() {
        let body = json!({
            "type": "urn:hearth:error:unauthorized",
            "title": "Unauthorized",
            "status": 401,
            "code": "unauthorized",
            "detail": "no token"
        });
        let response = tokio_tungstenite::tungstenite::http::Response::builder()
            .status(401)
            .body(Some(body.to_string().into_bytes()))
            .unwrap();
        let error = upgrade_error(WsError::Http(Box::new(response)));
        assert_eq!(error.code(), Some(ErrorCode::Unauthorized));
    }

    /// Serialises `frame`, checks it equals `expected`, and parses it back.
    fn client_round_trip(frame: ClientFrame, expected: serde_json::Value) {
        assert_eq!(serde_json::to_value(&frame).unwrap(), expected);
        let back: ClientFrame = serde_json::from_value(expected).unwrap();
        assert_eq!(back, frame);
    }

    fn server_round_trip(frame: ServerFrame, expected: serde_json::Value) {
        assert_eq!(serde_json::to_value(&frame).unwrap(), expected);
        let back: ServerFrame = serde_json::from_value(expected).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn client_frames_have_the_documented_json() {
        client_round_trip(
            ClientFrame::Auth {
                v: 1,
                token: "tok".into(),
            },
            json!({"type": "auth", "v": 1, "token": "tok"}),
        );
        client_round_trip(
            ClientFrame::send("k1", Target::User("bob@localhost".into()), "hi"),
            json!({"type": "send", "key": "k1", "to": "bob@localhost", "body": "hi"}),
        );
        client_round_trip(
            ClientFrame::send("k2", Target::Channel("k3j4h5@localhost".into()), "yo"),
            json!({"type": "send", "key": "k2", "channel": "k3j4h5@localhost", "body": "yo"}),
        );
        client_round_trip(
            ClientFrame::Cursor { pos: 42 },
            json!({"type": "cursor", "pos": 42}),
        );
        client_round_trip(ClientFrame::Heartbeat, json!({"type": "heartbeat"}));
    }

    fn message_event() -> (Event, serde_json::Value) {
        let event = Event {
            id: "ev1".into(),
            channel: "k3j4h5@localhost".into(),
            sender: "bob@localhost".into(),
            origin: "localhost".into(),
            seq: 7,
            ts: 1_700_000_000_000,
            pos: Some(12),
            content: EventContent::Message { body: "hi".into() },
        };
        let json = json!({
            "id": "ev1", "channel": "k3j4h5@localhost", "sender": "bob@localhost",
            "origin": "localhost", "seq": 7, "ts": 1_700_000_000_000u64, "pos": 12,
            "kind": "message", "content": {"body": "hi"}
        });
        (event, json)
    }

    #[test]
    fn server_frames_have_the_documented_json() {
        server_round_trip(
            ServerFrame::Ready {
                v: 1,
                user: "alice@localhost".into(),
                device: "d1".into(),
                cursor: 0,
                heartbeat_timeout_ms: 30_000,
                max_frame_bytes: 65_536,
            },
            json!({"type": "ready", "v": 1, "user": "alice@localhost", "device": "d1",
                   "cursor": 0, "heartbeat_timeout_ms": 30000, "max_frame_bytes": 65536}),
        );
        let (event, event_json) = message_event();
        let membership = Event {
            id: "ev2".into(),
            pos: None,
            content: EventContent::Membership {
                action: MembershipAction::Create,
                user: "alice@localhost".into(),
                version: 1,
                name: Some("team".into()),
            },
            ..event.clone()
        };
        let membership_json = json!({
            "id": "ev2", "channel": "k3j4h5@localhost", "sender": "bob@localhost",
            "origin": "localhost", "seq": 7, "ts": 1_700_000_000_000u64,
            "kind": "membership",
            "content": {"action": "create", "user": "alice@localhost", "version": 1, "name": "team"}
        });
        server_round_trip(
            ServerFrame::Sync {
                events: vec![event.clone(), membership],
                more: false,
            },
            json!({"type": "sync", "events": [event_json.clone(), membership_json], "more": false}),
        );
        server_round_trip(
            ServerFrame::Event { event },
            json!({"type": "event", "event": event_json}),
        );
        server_round_trip(
            ServerFrame::Ack {
                key: "k1".into(),
                event_id: "ev1".into(),
                channel: "k3j4h5@localhost".into(),
                ts: 123,
            },
            json!({"type": "ack", "key": "k1", "event_id": "ev1",
                   "channel": "k3j4h5@localhost", "ts": 123}),
        );
        server_round_trip(
            ServerFrame::Presence(PresenceInfo {
                user: "bob@localhost".into(),
                status: PresenceStatus::Online,
                last_active_at: Some(99),
            }),
            json!({"type": "presence", "user": "bob@localhost", "status": "online",
                   "last_active_at": 99}),
        );
        server_round_trip(
            ServerFrame::Error {
                code: ErrorCode::NotMember,
                message: "not a member".into(),
                key: Some("k1".into()),
            },
            json!({"type": "error", "code": "not_member", "message": "not a member", "key": "k1"}),
        );
        server_round_trip(
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                key: None,
            },
            json!({"type": "error", "code": "rate_limited", "message": "slow down"}),
        );
    }

    #[test]
    fn key_generator_yields_distinct_short_keys() {
        let mut a = KeyGen::new();
        let mut b = KeyGen::new();
        let keys: std::collections::HashSet<String> = (0..100)
            .flat_map(|_| [a.next_key(), b.next_key()])
            .collect();
        assert_eq!(keys.len(), 200);
        assert!(keys.iter().all(|k| (1..=64).contains(&k.len())));
    }

    #[test]
    fn heartbeat_interval_is_a_third_of_the_timeout() {
        let ready = Ready {
            user: "u".into(),
            device: "d".into(),
            cursor: 0,
            heartbeat_timeout: Duration::from_secs(30),
            max_frame_bytes: 1,
        };
        assert_eq!(ready.heartbeat_interval(), Duration::from_secs(10));
    }

    type MemWs = WebSocketStream<tokio::io::DuplexStream>;

    /// A client and a server WebSocket joined in memory, no handshake needed.
    async fn ws_pair() -> (MemWs, MemWs) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(ws_config())).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, server)
    }

    async fn recv_json(server: &mut MemWs) -> serde_json::Value {
        match server.next().await {
            Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn send_json_frame(server: &mut MemWs, value: serde_json::Value) {
        server.send(Message::text(value.to_string())).await.unwrap();
    }

    fn ready_json() -> serde_json::Value {
        json!({"type": "ready", "v": 1, "user": "alice@localhost", "device": "d1",
               "cursor": 5, "heartbeat_timeout_ms": 30000, "max_frame_bytes": 200})
    }

    #[tokio::test]
    async fn session_authenticates_sends_and_receives() {
        let (client, mut server) = ws_pair().await;
        let fake_server = tokio::spawn(async move {
            assert_eq!(
                recv_json(&mut server).await,
                json!({"type": "auth", "v": 1, "token": "secret"})
            );
            send_json_frame(&mut server, ready_json()).await;
            assert_eq!(
                recv_json(&mut server).await,
                json!({"type": "send", "key": "k1", "to": "bob@localhost", "body": "hi"})
            );
            assert_eq!(
                recv_json(&mut server).await,
                json!({"type": "cursor", "pos": 6})
            );
            assert_eq!(recv_json(&mut server).await, json!({"type": "heartbeat"}));
            send_json_frame(
                &mut server,
                json!({"type": "ack", "key": "k1", "event_id": "e", "channel": "c@x", "ts": 1}),
            )
            .await;
            send_json_frame(&mut server, json!({"type": "from_the_future"})).await;
            server
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                })))
                .await
                .unwrap();
            // Let the client's close reply arrive before the socket drops.
            while let Some(Ok(_)) = server.next().await {}
        });

        let conn = Connection::authenticate(client, "secret").await.unwrap();
        assert_eq!(conn.ready().user, "alice@localhost");
        assert_eq!(conn.ready().cursor, 5);
        assert_eq!(conn.ready().heartbeat_timeout, Duration::from_secs(30));

        let (mut tx, mut rx, _ready) = conn.split();
        tx.send_message("k1", Target::User("bob@localhost".into()), "hi")
            .await
            .unwrap();
        tx.ack_cursor(6).await.unwrap();
        tx.heartbeat().await.unwrap();
        // Larger than the announced max_frame_bytes (200): refused before sending.
        assert!(matches!(
            tx.send_message("k2", Target::Channel("c@x".into()), "x".repeat(300))
                .await,
            Err(ClientError::FrameTooLarge { max: 200, .. })
        ));

        assert!(matches!(
            rx.next_frame().await,
            Ok(Some(ServerFrame::Ack { key, .. })) if key == "k1"
        ));
        assert!(matches!(
            rx.next_frame().await,
            Err(ClientError::BadFrame(_))
        ));
        assert!(matches!(rx.next_frame().await, Ok(None)));
        assert!(matches!(rx.next_frame().await, Ok(None)));
        fake_server.await.unwrap();
    }

    #[tokio::test]
    async fn error_frame_before_ready_is_a_refusal() {
        let (client, mut server) = ws_pair().await;
        tokio::spawn(async move {
            recv_json(&mut server).await;
            send_json_frame(
                &mut server,
                json!({"type": "error", "code": "unsupported_version", "message": "v2 only"}),
            )
            .await;
            while let Some(Ok(_)) = server.next().await {}
        });
        let error = Connection::authenticate(client, "t").await.unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::UnsupportedVersion));
    }

    #[tokio::test]
    async fn close_before_ready_exposes_the_close_code() {
        let (client, mut server) = ws_pair().await;
        tokio::spawn(async move {
            recv_json(&mut server).await;
            server
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::from(close::UNAUTHORIZED),
                    reason: "bad token".into(),
                })))
                .await
                .unwrap();
            while let Some(Ok(_)) = server.next().await {}
        });
        let error = Connection::authenticate(client, "t").await.unwrap_err();
        assert!(matches!(
            &error,
            ClientError::Closed { code: close::UNAUTHORIZED, reason } if reason == "bad token"
        ));
        assert_eq!(error.close_code(), Some(close::UNAUTHORIZED));
        assert!(!error.is_transient());
    }

    #[tokio::test]
    async fn dropped_connection_is_an_abnormal_close() {
        let (client, mut server) = ws_pair().await;
        tokio::spawn(async move {
            recv_json(&mut server).await;
            send_json_frame(&mut server, ready_json()).await;
            // Dropping the server end without a close frame.
        });
        let mut conn = Connection::authenticate(client, "t").await.unwrap();
        let error = conn.next_frame().await.unwrap_err();
        assert_eq!(error.close_code(), Some(ABNORMAL_CLOSE), "{error:?}");
        assert!(error.is_transient());
    }

    #[tokio::test]
    async fn close_completes_the_closing_handshake() {
        let (client, mut server) = ws_pair().await;
        let fake_server = tokio::spawn(async move {
            recv_json(&mut server).await;
            send_json_frame(&mut server, ready_json()).await;
            let event = json!({"type": "presence", "user": "bob@localhost", "status": "offline"});
            send_json_frame(&mut server, event).await;
            loop {
                match server.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        return frame.map(|f| u16::from(f.code));
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("expected close, got {other:?}"),
                }
            }
        });
        let conn = Connection::authenticate(client, "t").await.unwrap();
        conn.close().await.unwrap();
        assert_eq!(fake_server.await.unwrap(), Some(close::NORMAL));
    }
}
