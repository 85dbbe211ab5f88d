//! Signing JSON objects, checking signatures, and naming events, as pure
//! functions over `serde_json` values.
//!
//! # Rules
//!
//! These follow the Matrix specification, appendix "Signing JSON", so its
//! published test vectors are this module's tests.
//!
//! 1. **Signed bytes.** Only JSON objects are signed. The signed bytes are the
//!    [canonical JSON](crate::canonical) of the object without its top-level
//!    `signatures` and `unsigned` members, with nothing before or after.
//! 2. **Signature.** Ed25519 (RFC 8032, deterministic) over those bytes,
//!    written as unpadded standard base64 at
//!    `signatures[server_name][key_id]`. Signatures by other servers or keys
//!    already present are kept, and so is `unsigned`.
//! 3. **Verification** finds `signatures[server_name][key_id]`, recomputes the
//!    signed bytes, and checks them with dalek's `verify_strict` (refuses
//!    small-order keys and `R`, and non-canonical `S`). A signature must be
//!    exactly 86 characters of *unpadded* base64 whose unused trailing bits are
//!    zero. Matrix asks readers to accept padding too; Hearth does not, so that
//!    a signature has one spelling and the event id (rule 4) cannot be
//!    changed by re-spelling it.
//! 4. **Event id** = `$` + unpadded URL-safe base64 of SHA-256 over the
//!    canonical JSON of the event without `unsigned`. Signatures *are*
//!    covered, so the id names the signed event, and any change to a signed
//!    member or to a signature gives another id; `unsigned` is for data any
//!    holder may change. Ed25519 is deterministic, so an honest origin gets
//!    one id per event. A relay could still add a signature of its own and
//!    mint a second id: a receiver must refuse events whose `signatures` holds
//!    anything but the origin's one signature before it trusts their id.
//! 5. **Key id** ([`key_id_for`]): `ed25519:` followed by the first 4 bytes of
//!    the public key in lowercase hex, e.g. `ed25519:3b6a27bc`. It stays within
//!    Matrix's key-id grammar (`[A-Za-z0-9_]`), is the same on every server
//!    for the same key, so a verifier that knows the origin's key (from its
//!    PeerId) also knows the key id, and changes when a key is rotated. A
//!    [`ServerKey`] can be given another id with [`ServerKey::with_key_id`]
//!    (the Matrix vectors use `ed25519:1`).
//!
//! # One key, two protocols
//!
//! The server key also signs libp2p handshakes (`design/dependencies.md`),
//! and that document asks for a domain-separation prefix on event
//! signatures. Hearth signs the bare canonical bytes instead, exactly as
//! Matrix does, because that keeps the published vectors usable as tests
//! and cross-protocol confusion is already impossible: every message libp2p
//! signs with the identity key carries its own prefix, and none of them can
//! start with `{` (0x7B), which every canonical JSON object does:
//!
//! - Noise handshake: `"noise-libp2p-static-key:"` followed by the 32-byte
//!   X25519 static key (starts with `n`);
//! - gossipsub message signing: `"libp2p-pubsub:"` followed by protobuf (`l`);
//! - signed envelopes (identify's signed peer records): the varint length of
//!   the domain string first, 0x12 for `"libp2p-peer-record"`;
//! - libp2p-tls, if ever enabled: `"libp2p-tls-handshake:"` (`l`).
//!
//! So no byte string is both a valid libp2p signing input and a valid input
//! of this module, and a signature cannot be carried from one to the other.
//! That holds as long as (a) [`ServerKey`] signs nothing but canonical JSON
//! objects (it has no method to sign raw bytes, on purpose), and (b) anything
//! else Hearth ever signs with this key uses a prefix that does not start
//! with `{`. Different kinds of Hearth objects signed by this module share one
//! format, so they must tell themselves apart by content (an event's `kind`).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::canonical::canonical_object_except;
use crate::error::SignatureError;

pub use ed25519_dalek::VerifyingKey;

/// The only signing algorithm, the part of a key id before the `:`.
pub const ALGORITHM: &str = "ed25519";

/// Length of an ed25519 signature in unpadded base64: 64 bytes, 86 characters.
const SIGNATURE_BASE64_LEN: usize = 86;

/// A server's ed25519 signing key and the key id it signs under.
///
/// The same 32-byte seed builds the libp2p identity: pass a copy,
/// `Keypair::ed25519_from_bytes(*key.seed_bytes())`, since that function
/// zeroizes its argument. `Debug` shows the key id and the public key, never
/// the secret; dalek wipes the secret on drop.
#[derive(Clone)]
pub struct ServerKey {
    signing: SigningKey,
    key_id: String,
}

impl ServerKey {
    /// A new key from 32 bytes of the operating system's random number generator.
    pub fn generate() -> Result<Self, SignatureError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(SignatureError::Entropy)?;
        Ok(Self::from_seed(&seed))
    }

    /// The key with this 32-byte seed (RFC 8032's secret key), under the key
    /// id that [`key_id_for`] derives from its public key.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let key_id = key_id_for(&signing.verifying_key());
        Self { signing, key_id }
    }

    /// The same key under another key id, which must be `ed25519:` followed
    /// by one or more of `[A-Za-z0-9_]`.
    pub fn with_key_id(mut self, key_id: &str) -> Result<Self, SignatureError> {
        let valid = key_id.strip_prefix("ed25519:").is_some_and(|v| {
            !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        if !valid {
            return Err(SignatureError::BadKeyId(key_id.to_owned()));
        }
        self.key_id = key_id.to_owned();
        Ok(self)
    }

    /// The 32-byte seed, to store the key or to build the libp2p identity from
    /// it. The copy is wiped when dropped.
    pub fn seed_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The key id this key signs under, such as `ed25519:3b6a27bc`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key in unpadded standard base64, the form Matrix publishes keys in.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.verifying_key().as_bytes())
    }
}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerKey")
            .field("key_id", &self.key_id)
            .field("public_key", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

/// The key id Hearth derives from a public key: `ed25519:` and its first 4
/// bytes in lowercase hex.
pub fn key_id_for(key: &VerifyingKey) -> String {
    let mut id = String::with_capacity(ALGORITHM.len() + 9);
    id.push_str(ALGORITHM);
    id.push(':');
    for b in &key.as_bytes()[..4] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// A public key from its 32 bytes (as found in an ed25519 PeerId). Refuses
/// encodings that are not a curve point and small-order ("weak") keys.
pub fn verifying_key_from_bytes(bytes: &[u8; 32]) -> Result<VerifyingKey, SignatureError> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| SignatureError::MalformedKey)?;
    if key.is_weak() {
        return Err(SignatureError::MalformedKey);
    }
    Ok(key)
}

/// Sign a JSON object as `server_name` with `key` (rules 1 and 2): returns a
/// copy with the signature added under `signatures[server_name][key.key_id()]`.
pub fn sign_json(
    value: &Value,
    server_name: &str,
    key: &ServerKey,
) -> Result<Value, SignatureError> {
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let signed_bytes = canonical_object_except(object, &["signatures", "unsigned"])?;
    let signature = key.signing.sign(signed_bytes.as_bytes());

    let mut object = object.clone();
    let mut signatures = match object.remove("signatures") {
        None => Map::new(),
        Some(Value::Object(signatures)) => signatures,
        Some(_) => return Err(SignatureError::MalformedSignatures),
    };
    let Value::Object(by_key) = signatures
        .entry(server_name)
        .or_insert_with(|| Value::Object(Map::new()))
    else {
        return Err(SignatureError::MalformedSignatures);
    };
    by_key.insert(
        key.key_id.clone(),
        Value::String(STANDARD_NO_PAD.encode(signature.to_bytes())),
    );
    object.insert("signatures".to_owned(), Value::Object(signatures));
    Ok(Value::Object(object))
}

/// Check that `server_name` signed this JSON object with the key `key_id`,
/// whose public half is `key` (rule 3).
pub fn verify_json(
    value: &Value,
    server_name: &str,
    key_id: &str,
    key: &VerifyingKey,
) -> Result<(), SignatureError> {
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let missing = || SignatureError::MissingSignature {
        server: server_name.to_owned(),
        key_id: key_id.to_owned(),
    };
    let by_key = match object.get("signatures") {
        None => return Err(missing()),
        Some(Value::Object(signatures)) => match signatures.get(server_name) {
            None => return Err(missing()),
            Some(Value::Object(by_key)) => by_key,
            Some(_) => return Err(SignatureError::MalformedSignatures),
        },
        Some(_) => return Err(SignatureError::MalformedSignatures),
    };
    let encoded = match by_key.get(key_id) {
        None => return Err(missing()),
        Some(Value::String(encoded)) => encoded,
        Some(_) => return Err(SignatureError::MalformedSignatures),
    };
    let signature = decode_signature(encoded)?;
    let signed_bytes = canonical_object_except(object, &["signatures", "unsigned"])?;
    key.verify_strict(signed_bytes.as_bytes(), &signature)
        .map_err(|_| SignatureError::Invalid)
}

/// The id of an event (rule 4): `$` + unpadded URL-safe base64 of the SHA-256
/// of its signed canonical bytes, the canonical JSON without `signatures` and
/// `unsigned` that the signature covers. So an event has its id before it is
/// signed, and a signature cannot give the same event a second id.
pub fn event_id(value: &Value) -> Result<String, SignatureError> {
    let Value::Object(object) = value else {
        return Err(SignatureError::NotAnObject);
    };
    let bytes = canonical_object_except(object, &["signatures", "unsigned"])?;
    let digest = Sha256::digest(bytes.as_bytes());
    Ok(format!("${}", URL_SAFE_NO_PAD.encode(digest)))
}

fn decode_signature(encoded: &str) -> Result<Signature, SignatureError> {
    if encoded.len() != SIGNATURE_BASE64_LEN {
        return Err(SignatureError::MalformedSignature);
    }
    let mut bytes = [0u8; 64];
    // STANDARD_NO_PAD refuses padding and non-zero trailing bits.
    match STANDARD_NO_PAD.decode_slice(encoded, &mut bytes) {
        Ok(64) => Ok(Signature::from_bytes(&bytes)),
        _ => Err(SignatureError::MalformedSignature),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::canonical_json;
    use base64::alphabet;
    use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
    use serde_json::json;

    /// `SIGNING_KEY_SEED` of the Matrix specification, appendix
    /// "Cryptographic Test Vectors" (matrix-org/matrix-spec
    /// `content/appendices.md`; the same seed is in Synapse's
    /// `tests/crypto/test_event_signing.py`).
    const SPEC_SEED: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";

    /// The spec's key, named `ed25519:1`, of server `domain`.
    fn spec_key() -> ServerKey {
        // The published seed's last character carries non-zero trailing bits
        // (`1` = 0b110101), which strict decoding refuses; Python's decoder,
        // which produced the vectors, ignores them.
        let lenient = GeneralPurpose::new(
            &alphabet::STANDARD,
            GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
                .with_decode_allow_trailing_bits(true),
        );
        let seed: [u8; 32] = lenient.decode(SPEC_SEED).unwrap().try_into().unwrap();
        ServerKey::from_seed(&seed)
            .with_key_id("ed25519:1")
            .unwrap()
    }

    fn sha256_base64(text: &str) -> String {
        STANDARD_NO_PAD.encode(Sha256::digest(text.as_bytes()))
    }

    /// Matrix spec, "Cryptographic Test Vectors" / "JSON Signing".
    #[test]
    fn matrix_json_signing_vectors() {
        let key = spec_key();
        let signed = sign_json(&json!({}), "domain", &key).unwrap();
        assert_eq!(
            signed,
            json!({
                "signatures": {
                    "domain": {
                        "ed25519:1": "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
                    }
                }
            })
        );
        verify_json(&signed, "domain", "ed25519:1", &key.verifying_key()).unwrap();

        let input: Value = serde_json::from_str(
            r#"{
                "one": 1,
                "two": "Two"
            }"#,
        )
        .unwrap();
        let signed = sign_json(&input, "domain", &key).unwrap();
        assert_eq!(
            signed,
            json!({
                "one": 1,
                "signatures": {
                    "domain": {
                        "ed25519:1": "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
                    }
                },
                "two": "Two"
            })
        );
        verify_json(&signed, "domain", "ed25519:1", &key.verifying_key()).unwrap();
    }

    /// Matrix spec, "Cryptographic Test Vectors" / "Event Signing". Hearth
    /// does not implement Matrix's content hash or redaction; the test does
    /// both by hand, which checks canonical JSON, SHA-256 and signing against
    /// two more published hashes and signatures.
    #[test]
    fn matrix_event_signing_vectors() {
        let key = spec_key();

        // Minimal event: the content hash covers the event without
        // `unsigned`, `signatures` and `hashes`; redaction keeps every member.
        let mut event = json!({
            "room_id": "!x:domain",
            "sender": "@a:domain",
            "origin": "domain",
            "origin_server_ts": 1000000,
            "signatures": {},
            "hashes": {},
            "type": "X",
            "content": {},
            "prev_events": [],
            "auth_events": [],
            "depth": 3,
            "unsigned": {
                "age_ts": 1000000
            }
        });
        let Value::Object(map) = &event else {
            unreachable!()
        };
        let hashed = canonical_object_except(map, &["unsigned", "signatures", "hashes"]).unwrap();
        assert_eq!(
            sha256_base64(&hashed),
            "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"
        );
        event["hashes"] = json!({"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"});
        let signed = sign_json(&event, "domain", &key).unwrap();
        assert_eq!(
            signed["signatures"],
            json!({"domain": {"ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"}})
        );
        assert_eq!(signed["unsigned"], json!({"age_ts": 1000000}));

        // Event with redactable content: hashed in full, signed redacted
        // (an `m.room.message` keeps no content keys).
        let full = json!({
            "content": {
                "body": "Here is the message content"
            },
            "event_id": "$0:domain",
            "origin": "domain",
            "origin_server_ts": 1000000,
            "type": "m.room.message",
            "room_id": "!r:domain",
            "sender": "@u:domain",
            "signatures": {},
            "unsigned": {
                "age_ts": 1000000
            }
        });
        let Value::Object(map) = &full else {
            unreachable!()
        };
        let hashed = canonical_object_except(map, &["unsigned", "signatures", "hashes"]).unwrap();
        assert_eq!(
            sha256_base64(&hashed),
            "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"
        );
        let redacted = json!({
            "content": {},
            "event_id": "$0:domain",
            "hashes": {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"},
            "origin": "domain",
            "origin_server_ts": 1000000,
            "type": "m.room.message",
            "room_id": "!r:domain",
            "sender": "@u:domain",
            "signatures": {}
        });
        let signed = sign_json(&redacted, "domain", &key).unwrap();
        assert_eq!(
            signed["signatures"]["domain"]["ed25519:1"],
            "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        );
        verify_json(&signed, "domain", "ed25519:1", &key.verifying_key()).unwrap();
    }

    fn sample() -> Value {
        json!({
            "kind": "message",
            "channel": "c1@a.example",
            "origin": "a.example",
            "seq": 7,
            "content": {"body": "hello", "tags": ["x", "y"]},
            "unsigned": {"age": 5}
        })
    }

    fn signed_sample(key: &ServerKey) -> Value {
        sign_json(&sample(), "a.example", key).unwrap()
    }

    fn check(value: &Value, key: &ServerKey) -> Result<(), SignatureError> {
        verify_json(value, "a.example", key.key_id(), &key.verifying_key())
    }

    #[test]
    fn tampering_with_any_part_fails_verification() {
        let key = ServerKey::generate().unwrap();
        let signed = signed_sample(&key);
        check(&signed, &key).unwrap();

        let mut tampered: Vec<(&str, Value)> = Vec::new();
        let mut v = signed.clone();
        v["seq"] = json!(8);
        tampered.push(("changed value", v));
        let mut v = signed.clone();
        v["content"]["tags"][1] = json!("z");
        tampered.push(("changed nested value", v));
        let mut v = signed.clone();
        v["extra"] = json!(null);
        tampered.push(("added key", v));
        let mut v = signed.clone();
        v["content"]["extra"] = json!(1);
        tampered.push(("added nested key", v));
        let mut v = signed.clone();
        v.as_object_mut().unwrap().remove("origin");
        tampered.push(("removed key", v));
        let mut v = signed.clone();
        let sig = v["signatures"]["a.example"][key.key_id()].as_str().unwrap();
        let mut bytes = STANDARD_NO_PAD.decode(sig).unwrap();
        bytes[10] ^= 1;
        v["signatures"]["a.example"][key.key_id()] = json!(STANDARD_NO_PAD.encode(&bytes));
        tampered.push(("changed signature", v));
        for (what, v) in &tampered {
            assert!(
                matches!(check(v, &key), Err(SignatureError::Invalid)),
                "{what}"
            );
        }

        // A different key, under the same key id.
        let other = ServerKey::generate().unwrap();
        assert!(matches!(
            verify_json(&signed, "a.example", key.key_id(), &other.verifying_key()),
            Err(SignatureError::Invalid)
        ));
        // Another server's or another key id's signature is missing.
        assert!(matches!(
            verify_json(&signed, "b.example", key.key_id(), &key.verifying_key()),
            Err(SignatureError::MissingSignature { .. })
        ));
        assert!(matches!(
            verify_json(&signed, "a.example", "ed25519:other", &key.verifying_key()),
            Err(SignatureError::MissingSignature { .. })
        ));
        let mut v = signed.clone();
        v.as_object_mut().unwrap().remove("signatures");
        assert!(matches!(
            check(&v, &key),
            Err(SignatureError::MissingSignature { .. })
        ));
    }

    #[test]
    fn unsigned_and_other_signatures_are_not_covered() {
        let key = ServerKey::generate().unwrap();
        let mut v = signed_sample(&key);
        v["unsigned"] = json!({"age": 99, "relayed_by": "b.example"});
        check(&v, &key).unwrap();
        v.as_object_mut().unwrap().remove("unsigned");
        check(&v, &key).unwrap();

        // A second server countersigns; both verify.
        let b = ServerKey::generate().unwrap();
        let both = sign_json(&v, "b.example", &b).unwrap();
        check(&both, &key).unwrap();
        verify_json(&both, "b.example", b.key_id(), &b.verifying_key()).unwrap();
    }

    #[test]
    fn signature_spelling_is_strict() {
        let key = ServerKey::generate().unwrap();
        let signed = signed_sample(&key);
        let sig = signed["signatures"]["a.example"][key.key_id()]
            .as_str()
            .unwrap()
            .to_owned();
        let respell = |s: String| {
            let mut v = signed.clone();
            v["signatures"]["a.example"][key.key_id()] = json!(s);
            check(&v, &key)
        };
        // Padded.
        assert!(matches!(
            respell(format!("{sig}==")),
            Err(SignatureError::MalformedSignature)
        ));
        // Same bytes, non-zero trailing bits: 86 chars carry 516 bits for 512,
        // so the last character of a canonical spelling has its low 4 bits zero.
        let last = sig.as_bytes()[85];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let pos = alphabet.iter().position(|&c| c == last).unwrap();
        let mut bent = sig.clone();
        bent.pop();
        bent.push(char::from(alphabet[pos | 1]));
        assert_ne!(bent, sig);
        assert!(matches!(
            respell(bent),
            Err(SignatureError::MalformedSignature)
        ));
        // Truncated, not base64, not a string.
        assert!(matches!(
            respell(sig[..85].to_owned()),
            Err(SignatureError::MalformedSignature)
        ));
        assert!(matches!(
            respell(format!("{}!", &sig[..85])),
            Err(SignatureError::MalformedSignature)
        ));
        let mut v = signed.clone();
        v["signatures"]["a.example"][key.key_id()] = json!(1);
        assert!(matches!(
            check(&v, &key),
            Err(SignatureError::MalformedSignatures)
        ));
        let mut v = signed.clone();
        v["signatures"] = json!([]);
        assert!(matches!(
            check(&v, &key),
            Err(SignatureError::MalformedSignatures)
        ));
    }

    #[test]
    fn only_objects_are_signed() {
        let key = ServerKey::generate().unwrap();
        for v in [json!([]), json!("{}"), json!(1), json!(null)] {
            assert!(matches!(
                sign_json(&v, "a.example", &key),
                Err(SignatureError::NotAnObject)
            ));
            assert!(matches!(
                verify_json(&v, "a.example", key.key_id(), &key.verifying_key()),
                Err(SignatureError::NotAnObject)
            ));
            assert!(matches!(event_id(&v), Err(SignatureError::NotAnObject)));
        }
        assert!(matches!(
            sign_json(&json!({"signatures": "x"}), "a.example", &key),
            Err(SignatureError::MalformedSignatures)
        ));
        assert!(matches!(
            sign_json(&json!({"signatures": {"a.example": 1}}), "a.example", &key),
            Err(SignatureError::MalformedSignatures)
        ));
    }

    #[test]
    fn floats_and_huge_integers_cannot_be_signed_or_named() {
        let key = ServerKey::generate().unwrap();
        for v in [
            json!({"x": 1.5}),
            json!({"x": {"y": [9007199254740992u64]}}),
        ] {
            assert!(matches!(
                sign_json(&v, "a.example", &key),
                Err(SignatureError::Canonical(_))
            ));
            assert!(matches!(event_id(&v), Err(SignatureError::Canonical(_))));
        }
    }

    #[test]
    fn event_ids_name_the_signed_event() {
        let key = ServerKey::generate().unwrap();
        let signed = signed_sample(&key);
        let id = event_id(&signed).unwrap();
        assert!(id.starts_with('$'));
        assert_eq!(id.len(), 1 + 43);
        assert!(
            id[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );

        // Same event, other spelling and other `unsigned`: same id.
        let text = serde_json::to_string_pretty(&signed).unwrap();
        let mut respelled: Value = serde_json::from_str(&text).unwrap();
        respelled["unsigned"] = json!({"age": 12345});
        assert_eq!(event_id(&respelled).unwrap(), id);
        respelled.as_object_mut().unwrap().remove("unsigned");
        assert_eq!(event_id(&respelled).unwrap(), id);
        // Deterministic signatures: signing again gives the same id.
        assert_eq!(event_id(&signed_sample(&key)).unwrap(), id);
        // The id names the signed content: with no signature, a forged one, another
        // server's added, or another key's, it is the same event and the same id
        // (and only the genuine signature verifies).
        let mut v = signed.clone();
        v.as_object_mut().unwrap().remove("signatures");
        assert_eq!(event_id(&v).unwrap(), id);
        let mut v = signed.clone();
        v["signatures"]["a.example"][key.key_id()] = json!("x");
        assert_eq!(event_id(&v).unwrap(), id);
        let cosigned = sign_json(&signed, "b.example", &ServerKey::generate().unwrap()).unwrap();
        assert_eq!(event_id(&cosigned).unwrap(), id);
        assert_eq!(
            event_id(&signed_sample(&ServerKey::generate().unwrap())).unwrap(),
            id
        );

        let mut changes: Vec<Value> = Vec::new();
        let mut v = signed.clone();
        v["seq"] = json!(8);
        changes.push(v);
        let mut v = signed.clone();
        v["content"]["body"] = json!("hellp");
        changes.push(v);
        let mut v = signed.clone();
        v["extra"] = json!(null);
        changes.push(v);
        let mut v = signed.clone();
        v.as_object_mut().unwrap().remove("kind");
        changes.push(v);
        let mut ids: Vec<String> = changes.iter().map(|v| event_id(v).unwrap()).collect();
        ids.push(id);
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "every change gives another id");
    }

    #[test]
    fn event_id_is_sha256_of_canonical_json_without_signatures_and_unsigned() {
        let v = json!({"b": 1, "a": "x", "unsigned": {"z": 1}, "signatures": {"s": {"k": "v"}}});
        let expected = format!(
            "${}",
            URL_SAFE_NO_PAD.encode(Sha256::digest(br#"{"a":"x","b":1}"#))
        );
        assert_eq!(event_id(&v).unwrap(), expected);
        assert_eq!(
            canonical_json(&json!({"a": "x", "b": 1})).unwrap(),
            r#"{"a":"x","b":1}"#
        );
    }

    #[test]
    fn server_key_round_trips_and_keeps_its_secret() {
        let key = ServerKey::generate().unwrap();
        let seed = key.seed_bytes();
        let again = ServerKey::from_seed(&seed);
        assert_eq!(again.verifying_key(), key.verifying_key());
        assert_eq!(again.key_id(), key.key_id());
        assert_ne!(
            ServerKey::generate().unwrap().verifying_key(),
            key.verifying_key()
        );

        let debug = format!("{key:?}");
        assert!(debug.contains(key.key_id()));
        assert!(debug.contains(&key.public_key_base64()));
        assert!(!debug.contains(&STANDARD_NO_PAD.encode(*seed)));
        assert!(!debug.contains(&format!("{:?}", *seed)));
        assert!(!debug.contains(&format!("{:?}", &seed[..8])));
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!debug.contains(&hex));
    }

    #[test]
    fn key_ids() {
        let key = spec_key();
        assert_eq!(key.key_id(), "ed25519:1");
        let derived = ServerKey::from_seed(&key.seed_bytes());
        let public = key.verifying_key();
        let expected: String = public.as_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(derived.key_id(), format!("ed25519:{expected}"));
        assert_eq!(key_id_for(&public), derived.key_id());

        for bad in [
            "ed25519:",
            "ed25519",
            "rsa:1",
            "ed25519:a b",
            "ed25519:a:b",
            "ed25519:é",
        ] {
            assert!(
                matches!(
                    ServerKey::from_seed(&[7; 32]).with_key_id(bad),
                    Err(SignatureError::BadKeyId(_))
                ),
                "{bad}"
            );
        }
        ServerKey::from_seed(&[7; 32])
            .with_key_id("ed25519:a_Z9")
            .unwrap();
    }

    #[test]
    fn verifying_keys_from_bytes() {
        let key = ServerKey::generate().unwrap();
        assert_eq!(
            verifying_key_from_bytes(key.verifying_key().as_bytes()).unwrap(),
            key.verifying_key()
        );
        // The identity point (small order).
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            verifying_key_from_bytes(&identity),
            Err(SignatureError::MalformedKey)
        ));
    }

    /// The cross-protocol argument of the module doc, as bytes: what this
    /// module signs starts with `{`, libp2p's signing inputs do not.
    #[test]
    fn signed_bytes_never_look_like_libp2p_signing_inputs() {
        let Value::Object(map) = sample() else {
            unreachable!()
        };
        let bytes = canonical_object_except(&map, &["signatures", "unsigned"]).unwrap();
        assert_eq!(bytes.as_bytes()[0], b'{');
        let libp2p_first_bytes = [
            b"noise-libp2p-static-key:"[0],
            b"libp2p-pubsub:"[0],
            b"libp2p-tls-handshake:"[0],
            u8::try_from("libp2p-peer-record".len()).unwrap(),
        ];
        assert!(!libp2p_first_bytes.contains(&b'{'));
    }
}
