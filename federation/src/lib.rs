//! Hearth federation: how Hearth servers trust and talk to each other.
//!
//! # Layout
//! - [`clock`]: the hybrid logical clock that stamps events.
//! - [`canonical`]: Matrix canonical JSON, the bytes that are signed and hashed.
//! - [`signing`]: the server key, signing and verifying JSON objects, event ids
//!   (pure functions, checked against the Matrix specification's test vectors).
//! - [`error`]: the errors of every module here.
//! - [`identity`]: the node key file; one key is both the PeerId and the signing key.
//! - [`event`]: [`SignedEvent`], the unit that crosses servers.
//! - [`protocol`]: server-to-server requests, the signed server descriptor, presence
//!   announcements.
//! - [`network`]: the libp2p swarm behind a cloneable [`Network`] handle and an
//!   [`EventLoop`] task.
//! - [`push_link`]: pushes over one long-lived stream per peer, beside the swarm's
//!   request-response (which carries everything else).
pub mod canonical;
pub mod clock;
pub mod error;
pub mod event;
pub mod identity;
pub mod network;
pub mod protocol;
pub mod push_link;
pub mod signing;

pub use event::SignedEvent;
pub use identity::NodeIdentity;
pub use network::{EventLoop, Network, NetworkConfig, NetworkEvent};

pub use canonical::canonical_json;
pub use clock::Hlc;
pub use error::{CanonicalError, EventError, IdentityError, SignatureError};
pub use signing::{
    ServerKey, VerifyingKey, event_id, key_id_for, sign_json, verify_json, verifying_key_from_bytes,
};
