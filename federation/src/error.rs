//! Errors of the canonical encoding and of signing.
//!
//! Two enums, one per audience: [`CanonicalError`] says why a JSON value has
//! no canonical form (the sender's mistake), [`SignatureError`] why an object
//! could not be signed or did not verify. Neither carries key material.

use thiserror::Error;

/// Why a JSON value has no Matrix canonical form.
///
/// `at` is a dotted path to the offending value (`content.sizes.2`); it is
/// empty for the top level.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CanonicalError {
    /// A number written as a float (with a fraction or an exponent, or `-0`),
    /// even a whole one: canonical JSON has integers only.
    #[error("floats are not allowed in canonical JSON (at `{at}`)")]
    Float {
        /// Where the number is.
        at: String,
    },
    /// An integer outside `[-(2^53)+1, (2^53)-1]`.
    #[error("integer out of the range [-(2^53)+1, (2^53)-1] (at `{at}`)")]
    IntegerOutOfRange {
        /// Where the number is.
        at: String,
    },
}

/// Why a JSON object could not be signed, or why its signature does not verify.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Only JSON objects are signed, hashed and verified.
    #[error("only JSON objects can be signed")]
    NotAnObject,
    /// The object has no canonical form.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
    /// `signatures` is not an object of objects of strings.
    #[error("the `signatures` member is malformed")]
    MalformedSignatures,
    /// The object carries no signature by this server with this key id.
    #[error("no signature from `{server}` with key `{key_id}`")]
    MissingSignature {
        /// The server whose signature was looked for.
        server: String,
        /// The key id looked for, such as `ed25519:1`.
        key_id: String,
    },
    /// The signature is not 64 bytes of unpadded standard base64.
    #[error("the signature is not 64 bytes of unpadded base64")]
    MalformedSignature,
    /// The signature does not match the object and the key.
    #[error("the signature does not verify")]
    Invalid,
    /// The public key is not a valid ed25519 point.
    #[error("the public key is not a valid ed25519 key")]
    MalformedKey,
    /// A key id that is not `ed25519:` followed by `[A-Za-z0-9_]+`.
    #[error("key id `{0}` is not `ed25519:` followed by letters, digits or `_`")]
    BadKeyId(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Entropy(#[source] getrandom::Error),
}

/// Why the node's identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("node key file: {0}")]
    Io(#[from] std::io::Error),
    /// The key is malformed or the random source failed.
    #[error("node key: {0}")]
    Key(String),
}

/// Why an event or descriptor from another server was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// Not JSON, or not of the event's shape.
    #[error("malformed: {0}")]
    Malformed(String),
    /// An event version this server does not understand.
    #[error("unknown event version {0}")]
    UnknownVersion(u64),
    /// The sender's domain is not the origin server.
    #[error("sender {sender} does not belong to origin {origin}")]
    ForeignSender {
        /// The claimed sender.
        sender: String,
        /// The signing origin.
        origin: String,
    },
    /// A membership event not made by the channel's home server.
    #[error("membership of {channel} changed by {origin}, not its home server")]
    NotHomeServer {
        /// The channel.
        channel: String,
        /// The origin that tried.
        origin: String,
    },
    /// The signature is missing, malformed or does not verify.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// Timestamped too far in the future.
    #[error("timestamp {ts} is more than {window_ms} ms ahead of this server's clock")]
    FromTheFuture {
        /// The event's timestamp.
        ts: u64,
        /// The allowed window.
        window_ms: u64,
    },
}
