//! The event model: what crosses servers, signed by its origin, identified by the hash of its signed bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EventError;
use crate::signing::{ServerKey, VerifyingKey, event_id, sign_json, verify_json};

/// The event format version this build writes and reads.
pub const EVENT_VERSION: u64 = 1;

/// How far ahead of the local clock an event's timestamp may be, so no server can
/// pin its messages to the end of a channel.
pub const MAX_CLOCK_AHEAD_MS: u64 = 30_000;

/// A membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipAction {
    /// The channel was created; `user` is its creator.
    Create,
    /// `user` was added.
    Add,
    /// `user` was removed by an admin.
    Remove,
    /// `user` left.
    Leave,
}

/// What an event records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "content", rename_all = "snake_case")]
pub enum EventContent {
    /// A chat message.
    Message {
        /// The text.
        body: String,
    },
    /// A change of membership, made by the channel's home server.
    Membership {
        /// What happened.
        action: MembershipAction,
        /// The member concerned.
        user: String,
        /// The membership version this change creates.
        version: u64,
        /// The group's name, on `create`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// On `create`: a direct (one-to-one) channel rather than a group.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        direct: bool,
    },
}

/// An event with its origin's signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedEvent {
    /// Event format version.
    pub v: u64,
    /// Channel id, `random@home-server`.
    pub channel: String,
    /// The server that made and signed the event.
    pub origin: String,
    /// The user who caused it, `name@origin`.
    pub sender: String,
    /// Per-origin, per-channel sequence number, from 0.
    pub seq: u64,
    /// Hybrid-clock milliseconds since the Unix epoch.
    pub ts: u64,
    /// The membership version the event was made under.
    pub mver: u64,
    /// What it records.
    #[serde(flatten)]
    pub content: EventContent,
    /// `{origin: {key_id: signature}}`.
    #[serde(default)]
    pub signatures: BTreeMap<String, BTreeMap<String, String>>,
}

/// The home server of a channel: the part after `@` of its id.
pub fn home_server(channel: &str) -> Option<&str> {
    channel.rsplit_once('@').map(|(_, server)| server)
}

/// The server of a user id.
pub fn user_server(user: &str) -> Option<&str> {
    user.rsplit_once('@').map(|(_, server)| server)
}

impl SignedEvent {
    /// Seals an event made here without signing it: returns it with its id.
    ///
    /// The id covers exactly what a signature covers, so an event made here can be
    /// stored and shown at once and signed with [`sign`] only when it leaves the
    /// server; ed25519 signatures are deterministic, so every copy carries the same
    /// one. Events that never leave (chats among local users) are never signed.
    ///
    /// [`sign`]: SignedEvent::sign
    pub fn seal(mut self) -> Result<(SignedEvent, String), EventError> {
        self.v = EVENT_VERSION;
        self.signatures.clear();
        let value =
            serde_json::to_value(&self).map_err(|e| EventError::Malformed(e.to_string()))?;
        let id = event_id(&value).map_err(|e| EventError::Malformed(e.to_string()))?;
        Ok((self, id))
    }

    /// Whether the event carries a signature yet (events made here are signed on
    /// their way to other servers).
    pub fn is_signed(&self) -> bool {
        !self.signatures.is_empty()
    }

    /// Signs an event made here; returns it with its id.
    pub fn sign(mut self, key: &ServerKey) -> Result<(SignedEvent, String), EventError> {
        self.v = EVENT_VERSION;
        self.signatures.clear();
        let value =
            serde_json::to_value(&self).map_err(|e| EventError::Malformed(e.to_string()))?;
        let signed = sign_json(&value, &self.origin, key)
            .map_err(|e| EventError::BadSignature(e.to_string()))?;
        let id = event_id(&signed).map_err(|e| EventError::Malformed(e.to_string()))?;
        let event =
            serde_json::from_value(signed).map_err(|e| EventError::Malformed(e.to_string()))?;
        Ok((event, id))
    }

    /// Parses an event from another server and checks everything that needs no
    /// state: shape, version, sender's domain, membership authority, the clock
    /// window. Returns the event and its id; the signature is checked by [`verify`].
    ///
    /// [`verify`]: SignedEvent::verify
    pub fn parse(json: &str, now_ms: u64) -> Result<(SignedEvent, String), EventError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| EventError::Malformed(e.to_string()))?;
        let version = value.get("v").and_then(Value::as_u64).unwrap_or(0);
        if version != EVENT_VERSION {
            return Err(EventError::UnknownVersion(version));
        }
        let event: SignedEvent = serde_json::from_value(value.clone())
            .map_err(|e| EventError::Malformed(e.to_string()))?;
        // The signature is checked over the typed event and the id taken over the raw
        // one, so they must be the same bytes: no unknown fields, no odd spellings.
        if serde_json::to_value(&event).ok().as_ref() != Some(&value) {
            return Err(EventError::Malformed("unknown or malformed fields".into()));
        }
        // A message is its origin's user's; a membership event is the home server's
        // decision, and its sender may be a user of any server who asked for it.
        let is_membership = matches!(event.content, EventContent::Membership { .. });
        if !is_membership && user_server(&event.sender) != Some(event.origin.as_str()) {
            return Err(EventError::ForeignSender {
                sender: event.sender,
                origin: event.origin,
            });
        }
        if home_server(&event.channel).is_none() {
            return Err(EventError::Malformed(
                "channel id lacks its home server".into(),
            ));
        }
        if matches!(event.content, EventContent::Membership { .. })
            && home_server(&event.channel) != Some(event.origin.as_str())
        {
            return Err(EventError::NotHomeServer {
                channel: event.channel,
                origin: event.origin,
            });
        }
        if event.ts > now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
            return Err(EventError::FromTheFuture {
                ts: event.ts,
                window_ms: MAX_CLOCK_AHEAD_MS,
            });
        }
        // Only the origin signs: another signature would give the same event a second id.
        if event.signatures.len() != 1 || !event.signatures.contains_key(&event.origin) {
            return Err(EventError::BadSignature(
                "exactly the origin's signature is required".into(),
            ));
        }
        let id = event_id(&value).map_err(|e| EventError::Malformed(e.to_string()))?;
        Ok((event, id))
    }

    /// Checks the origin's signature with the origin's key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), EventError> {
        let key_id = crate::signing::key_id_for(key);
        let value = serde_json::to_value(self).map_err(|e| EventError::Malformed(e.to_string()))?;
        verify_json(&value, &self.origin, &key_id, key)
            .map_err(|e| EventError::BadSignature(e.to_string()))
    }

    /// The event as JSON text, as it travels.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::key_id_for;

    fn key() -> ServerKey {
        let k = ServerKey::from_seed(&[7; 32]);
        let id = key_id_for(&k.verifying_key());
        k.with_key_id(&id).expect("key id")
    }

    fn message() -> SignedEvent {
        SignedEvent {
            v: EVENT_VERSION,
            channel: "abc@acme.example".into(),
            origin: "acme.example".into(),
            sender: "alice@acme.example".into(),
            seq: 0,
            ts: 1_000,
            mver: 1,
            content: EventContent::Message { body: "hi".into() },
            signatures: BTreeMap::new(),
        }
    }

    #[test]
    fn a_signed_event_parses_and_verifies_and_keeps_its_id() {
        let key = key();
        let (event, id) = message().sign(&key).expect("sign");
        let (parsed, parsed_id) = SignedEvent::parse(&event.to_json(), 1_000).expect("parse");
        assert_eq!(parsed_id, id);
        parsed.verify(&key.verifying_key()).expect("verifies");
    }

    #[test]
    fn tampering_with_any_field_is_detected() {
        let key = key();
        let (event, _) = message().sign(&key).expect("sign");
        let json = event.to_json();
        let tampered = [
            json.replace("\"hi\"", "\"bye\""),
            json.replace("\"seq\":0", "\"seq\":1"),
            json.replace("\"ts\":1000", "\"ts\":999"),
            json.replace("\"mver\":1", "\"mver\":2"),
            json.replace("abc@acme.example", "xyz@acme.example"),
        ];
        for t in tampered {
            assert_ne!(t, json);
            let (parsed, _) = SignedEvent::parse(&t, 1_000).expect("still well-formed");
            assert!(
                parsed.verify(&key.verifying_key()).is_err(),
                "undetected: {t}"
            );
        }
        let other = ServerKey::from_seed(&[8; 32]);
        assert!(event.verify(&other.verifying_key()).is_err(), "wrong key");
    }

    #[test]
    fn structural_forgeries_are_refused_before_any_signature_check() {
        let now = 1_000;
        let mut foreign = message();
        foreign.sender = "mallory@evil.example".into();
        let (signed, _) = foreign.sign(&key()).expect("sign");
        assert!(matches!(
            SignedEvent::parse(&signed.to_json(), now),
            Err(EventError::ForeignSender { .. })
        ));

        let mut membership = message();
        membership.channel = "abc@globex.example".into();
        membership.content = EventContent::Membership {
            action: MembershipAction::Add,
            user: "alice@acme.example".into(),
            version: 2,
            name: None,
            direct: false,
        };
        let (signed, _) = membership.sign(&key()).expect("sign");
        assert!(matches!(
            SignedEvent::parse(&signed.to_json(), now),
            Err(EventError::NotHomeServer { .. })
        ));

        let mut future = message();
        future.ts = now + MAX_CLOCK_AHEAD_MS + 1;
        let (signed, _) = future.sign(&key()).expect("sign");
        assert!(matches!(
            SignedEvent::parse(&signed.to_json(), now),
            Err(EventError::FromTheFuture { .. })
        ));

        assert!(SignedEvent::parse("{not json", now).is_err());
        assert!(matches!(
            SignedEvent::parse(r#"{"v":9}"#, now),
            Err(EventError::UnknownVersion(9))
        ));
        let (signed, _) = message().sign(&key()).expect("sign");
        let unsigned = signed.to_json().replace("\"signatures\"", "\"sigs\"");
        assert!(
            SignedEvent::parse(&unsigned, now).is_err(),
            "unsigned events are refused"
        );
        let extra = signed.to_json().replacen('{', r#"{"extra":1,"#, 1);
        assert!(
            matches!(
                SignedEvent::parse(&extra, now),
                Err(EventError::Malformed(_))
            ),
            "an added field would give the same signed event a second id"
        );
    }
}

#[cfg(test)]
mod example {
    use super::*;

    /// Prints the example used in docs/federation.md (`cargo test -p hearth-federation print_doc_example -- --nocapture`).
    #[test]
    fn print_doc_example() {
        let key = ServerKey::from_seed(&[42; 32]);
        let (event, id) = SignedEvent {
            v: EVENT_VERSION,
            channel: "Jx3k9QpL2mZ1vYt0@acme.example".into(),
            origin: "acme.example".into(),
            sender: "alice@acme.example".into(),
            seq: 7,
            ts: 1_795_906_574_679,
            mver: 3,
            content: EventContent::Message {
                body: "Lunch at noon?".into(),
            },
            signatures: BTreeMap::new(),
        }
        .sign(&key)
        .expect("signs");
        println!(
            "{}\n{id}\n{}",
            serde_json::to_string_pretty(&event).unwrap_or_default(),
            key.public_key_base64()
        );
    }
}
