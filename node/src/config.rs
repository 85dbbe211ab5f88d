//! Node configuration: typed settings with defaults, then a TOML file, then `HEARTH_*` variables, then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::NodeError;

/// Names of every setting, which are also the `HEARTH_*` variables' suffixes.
pub const SETTINGS: &[&str] = &[
    "server_name",
    "data_dir",
    "listen",
    "registration",
    "max_group_members",
    "presence_push_max_members",
    "heartbeat_timeout_secs",
    "auth_timeout_secs",
    "max_frame_bytes",
    "max_body_bytes",
    "rate_limit_per_sec",
    "rate_limit_burst",
    "session_queue",
    "sync_batch",
    "idempotency_retention_secs",
    "log_format",
    "log",
    "federation_listen",
    "bootstrap",
    "peers",
    "strict_keys",
    "allow_servers",
    "deny_servers",
    "mdns",
    "catchup_interval_secs",
    "presence_refresh_secs",
    "outbox_retention_secs",
    "push_coalesce_ms",
    "push_timeout_secs",
    "push_contact",
    "push_allow_private",
];

/// A server this node knows of by configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its server name.
    pub name: String,
    /// Where to dial it (a multiaddress such as `/ip4/10.0.0.2/tcp/7070`).
    #[serde(default)]
    pub addr: Option<String>,
    /// Its ed25519 public key (unpadded base64): pinned, and any other key is refused.
    #[serde(default)]
    pub key: Option<String>,
}

/// Who may create accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// Anyone who can reach the node may register.
    Open,
    /// Only an administrator creates accounts (`hearth user add`).
    Closed,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Every setting of a node. Field docs are the operator's reference; docs/operations.md
/// repeats them with their environment variable names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This server's name; users are `name@server_name`.
    pub server_name: String,
    /// Folder holding the store; created if missing.
    pub data_dir: PathBuf,
    /// Address of the client API (HTTP and WebSocket).
    pub listen: SocketAddr,
    /// `open` or `closed`.
    pub registration: Registration,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Presence changes are pushed to members of groups up to this size; larger
    /// groups look presence up on demand.
    pub presence_push_max_members: usize,
    /// Seconds without any frame after which a session is closed and, if it was
    /// the user's last, the user goes offline.
    pub heartbeat_timeout_secs: u64,
    /// Seconds a new WebSocket has to send its `auth` frame.
    pub auth_timeout_secs: u64,
    /// Largest WebSocket frame (bytes) the node accepts with an error frame; a
    /// frame beyond twice this closes the connection.
    pub max_frame_bytes: usize,
    /// Largest message body in bytes.
    pub max_body_bytes: usize,
    /// Frames per second one connection may send, sustained.
    pub rate_limit_per_sec: u32,
    /// Frames one connection may send in a burst.
    pub rate_limit_burst: u32,
    /// Events queued for one connection before it is considered too slow and
    /// disconnected (it resyncs from its cursor on reconnect).
    pub session_queue: usize,
    /// Events per `sync` frame during catch-up.
    pub sync_batch: usize,
    /// Seconds a send's idempotency key is remembered: a resend with the key within
    /// this gets the original ack, a later one is a new message.
    pub idempotency_retention_secs: u64,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Log filter, as in `RUST_LOG` (e.g. `info`, `hearth_node=debug`).
    pub log: String,
    /// libp2p addresses to listen on for other servers; empty means federation is off.
    pub federation_listen: Vec<String>,
    /// Servers to dial at start (multiaddresses, with `/p2p/<peer id>` where known).
    pub bootstrap: Vec<String>,
    /// Servers known by name, with an address and optionally a pinned key.
    pub peers: Vec<PeerConfig>,
    /// Refuse servers whose key is not pinned in `peers` (no trust on first use).
    pub strict_keys: bool,
    /// If not empty, federate only with these servers.
    pub allow_servers: Vec<String>,
    /// Never federate with these servers.
    pub deny_servers: Vec<String>,
    /// Discover servers on the local network with mDNS.
    pub mdns: bool,
    /// Seconds between catch-up rounds with connected servers.
    pub catchup_interval_secs: u64,
    /// Seconds between re-announcements of who is online here.
    pub presence_refresh_secs: u64,
    /// Seconds an event waits in the outbox for a server that cannot be reached;
    /// older entries are dropped and that server gets them by catch-up.
    pub outbox_retention_secs: u64,
    /// Push notifications: messages of one conversation arriving within this many
    /// milliseconds of the first become one notification.
    pub push_coalesce_ms: u64,
    /// Push notifications: seconds a push service or webhook has to answer.
    pub push_timeout_secs: u64,
    /// Push notifications: the contact (`mailto:` or `https:` URI) sent to Web Push
    /// services in the VAPID token; empty means `mailto:postmaster@<server_name>`.
    pub push_contact: String,
    /// Push notifications: allow endpoints on loopback, private and link-local
    /// addresses (off: a user could otherwise make the node call internal services).
    pub push_allow_private: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost".into(),
            data_dir: PathBuf::from("./hearth-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            registration: Registration::Open,
            max_group_members: 100,
            presence_push_max_members: 25,
            heartbeat_timeout_secs: 30,
            auth_timeout_secs: 10,
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            rate_limit_per_sec: 100,
            rate_limit_burst: 200,
            session_queue: 1024,
            sync_batch: 500,
            idempotency_retention_secs: 86_400,
            log_format: LogFormat::Text,
            log: "info".into(),
            federation_listen: Vec::new(),
            bootstrap: Vec::new(),
            peers: Vec::new(),
            strict_keys: false,
            allow_servers: Vec::new(),
            deny_servers: Vec::new(),
            mdns: false,
            catchup_interval_secs: 30,
            presence_refresh_secs: 20,
            outbox_retention_secs: 259_200,
            push_coalesce_ms: 2000,
            push_timeout_secs: 10,
            push_contact: String::new(),
            push_allow_private: false,
        }
    }
}

impl Config {
    /// Layers defaults, the optional TOML file, `HEARTH_*` environment variables and
    /// the given overrides (from command-line flags), in that order.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, NodeError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(NodeError::Config(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(Env::prefixed("HEARTH_").only(SETTINGS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses settings the node cannot run with.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: &str| Err(NodeError::Config(m.to_string()));
        if !crate::accounts::valid_server_name(&self.server_name) {
            return bad("server_name must be a domain-like name such as acme.example");
        }
        if self.max_group_members < 2 {
            return bad("max_group_members must be at least 2");
        }
        if self.heartbeat_timeout_secs == 0 || self.auth_timeout_secs == 0 {
            return bad("heartbeat_timeout_secs and auth_timeout_secs must be positive");
        }
        if self.max_frame_bytes < 1024 || self.max_body_bytes == 0 {
            return bad("max_frame_bytes must be at least 1024 and max_body_bytes positive");
        }
        if self.max_body_bytes > self.max_frame_bytes / 2 {
            return bad("max_body_bytes must be at most half of max_frame_bytes");
        }
        if self.rate_limit_per_sec == 0 || self.rate_limit_burst == 0 {
            return bad("rate limits must be positive");
        }
        if self.session_queue == 0 || self.sync_batch == 0 {
            return bad("session_queue and sync_batch must be positive");
        }
        if self.idempotency_retention_secs == 0 {
            return bad("idempotency_retention_secs must be positive");
        }
        if self.catchup_interval_secs == 0 || self.presence_refresh_secs == 0 {
            return bad("catchup_interval_secs and presence_refresh_secs must be positive");
        }
        if self.outbox_retention_secs == 0 {
            return bad("outbox_retention_secs must be positive");
        }
        if self.push_coalesce_ms > 3_600_000 || self.push_timeout_secs == 0 {
            return bad("push_coalesce_ms must be at most 3600000 and push_timeout_secs positive");
        }
        if !(self.push_contact.is_empty()
            || self.push_contact.starts_with("mailto:")
            || self.push_contact.starts_with("https://"))
        {
            return bad("push_contact must be a mailto: or https:// URI");
        }
        for peer in &self.peers {
            if !crate::accounts::valid_server_name(&peer.name) {
                return Err(NodeError::Config(format!(
                    "peer name {:?} is not a server name",
                    peer.name
                )));
            }
        }
        Ok(())
    }

    /// Whether federation is on.
    pub fn federation_enabled(&self) -> bool {
        !self.federation_listen.is_empty()
    }

    /// The VAPID contact: `push_contact`, or `mailto:postmaster@<server_name>`.
    pub fn push_contact(&self) -> String {
        if self.push_contact.is_empty() {
            format!("mailto:postmaster@{}", self.server_name)
        } else {
            self.push_contact.clone()
        }
    }

    /// The federation policy these settings describe.
    pub fn policy(&self) -> FederationPolicy {
        FederationPolicy {
            own: self.server_name.clone(),
            enabled: self.federation_enabled(),
            allow: self.allow_servers.clone(),
            deny: self.deny_servers.clone(),
        }
    }
}

/// Which servers this node federates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationPolicy {
    /// This server's name.
    pub own: String,
    /// Federation is on.
    pub enabled: bool,
    /// If not empty, only these.
    pub allow: Vec<String>,
    /// Never these.
    pub deny: Vec<String>,
}

impl FederationPolicy {
    /// Whether this node exchanges events with `server`.
    pub fn federates_with(&self, server: &str) -> bool {
        self.enabled
            && server != self.own
            && !self.deny.iter().any(|d| d == server)
            && (self.allow.is_empty() || self.allow.iter().any(|a| a == server))
    }
}

/// Settings given as command-line flags; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration: Option<Registration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

#[cfg(test)]
// figment's Jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_defaults_file_environment_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "hearth.toml",
                "server_name = \"acme.example\"\nmax_group_members = 50\nheartbeat_timeout_secs = 20\n",
            )?;
            jail.set_env("HEARTH_MAX_GROUP_MEMBERS", "60");
            jail.set_env("HEARTH_UNRELATED", "ignored");
            let flags = Overrides {
                server_name: Some("flag.example".into()),
                ..Overrides::default()
            };
            let c =
                Config::load(Some(Path::new("hearth.toml")), &flags).map_err(|e| e.to_string())?;
            assert_eq!(c.server_name, "flag.example", "flags win");
            assert_eq!(c.max_group_members, 60, "environment beats the file");
            assert_eq!(c.heartbeat_timeout_secs, 20, "the file beats defaults");
            assert_eq!(c.auth_timeout_secs, 10, "defaults fill the rest");
            Ok(())
        });
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_group_memberz = 5\n")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default())
                .expect_err("unknown key refused");
            assert!(err.to_string().contains("max_group_memberz"), "{err}");
            let err = Config::load(Some(Path::new("missing.toml")), &Overrides::default())
                .expect_err("missing file refused");
            assert!(err.to_string().contains("does not exist"), "{err}");
            let flags = Overrides {
                server_name: Some("Not A Name".into()),
                ..Overrides::default()
            };
            assert!(Config::load(None, &flags).is_err());
            Ok(())
        });
    }
}
