//! Hearth federation: how Hearth servers trust and talk to each other.
//!
//! # Layout
//! - [`clock`]: the hybrid logical clock that stamps events.
//! - [`canonical`]: Matrix canonical JSON, the bytes that are signed and hashed.
//! - [`signing`]: the server key, signing and verifying JSON objects, event ids
//!   (pure functions, checked against the Matrix specification's test vectors).
//! - [`error`]: the errors of `canonical` and `signing`.
pub mod canonical;
pub mod clock;
pub mod error;
pub mod signing;

pub use canonical::canonical_json;
pub use clock::Hlc;
pub use error::{CanonicalError, SignatureError};
pub use signing::{
    ServerKey, VerifyingKey, event_id, key_id_for, sign_json, verify_json, verifying_key_from_bytes,
};
