//! The server-to-server protocol: requests, responses, the server descriptor, and presence announcements.

use std::collections::BTreeMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::EventError;
use crate::signing::{ServerKey, VerifyingKey, sign_json, verify_json, verifying_key_from_bytes};

/// The request-response protocol name.
pub const FEDERATION_PROTOCOL: &str = "/hearth/federation/1";
/// The Kademlia protocol name.
pub const KAD_PROTOCOL: &str = "/hearth/kad/1";
/// The gossipsub topic that carries presence.
pub const PRESENCE_TOPIC: &str = "hearth/presence/1";
/// Largest request a server accepts (bytes).
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Largest response a server accepts (bytes).
pub const MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;
/// Most events in one push or one answer.
pub const MAX_EVENTS_PER_MESSAGE: usize = 500;

/// A request from one server to another. Events travel as JSON text, each parsed
/// and judged on its own, so one bad event does not spoil its neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FedRequest {
    /// Introduces the sender: its signed descriptor.
    Hello {
        /// Signed descriptor JSON.
        descriptor: String,
    },
    /// Events for channels the receiver participates in.
    Push {
        /// Signed events, JSON.
        events: Vec<String>,
    },
    /// "Here is what I hold of this channel; send me what I lack." `heads` maps each
    /// origin to the next sequence number the asker expects from it.
    Heads {
        /// The channel.
        channel: String,
        /// Next expected sequence per origin.
        heads: BTreeMap<String, u64>,
    },
    /// The channel's membership events after `after_version`.
    MembershipLog {
        /// The channel.
        channel: String,
        /// Versions above this are wanted.
        after_version: u64,
    },
    /// "Which channels do my server's users share with yours?" (catch-up of channels
    /// the asker has not heard of yet).
    SharedChannels,
    /// Asks a channel's home server to change membership on behalf of one of the
    /// asking server's users.
    ChangeMembership {
        /// The channel.
        channel: String,
        /// The user asking (on the asking server).
        actor: String,
        /// `add`, `remove` or `leave`.
        action: String,
        /// The member concerned.
        user: String,
    },
    /// Asks the receiver to pass `request` on to the server `to` and return its answer.
    Forward {
        /// Destination server name.
        to: String,
        /// The request to pass on (not itself a `Forward`).
        request: Box<FedRequest>,
    },
}

/// An answer to a [`FedRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FedResponse {
    /// The receiver's own descriptor.
    Hello {
        /// Signed descriptor JSON.
        descriptor: String,
    },
    /// How a push went: ids the receiver refused, with reasons.
    Pushed {
        /// Events accepted (new or already held).
        accepted: u32,
        /// `(position in the push, reason)` of refused events.
        refused: Vec<(u32, String)>,
    },
    /// Events answering `Heads` or `MembershipLog`.
    Events {
        /// Signed events, JSON.
        events: Vec<String>,
        /// More follow: ask again.
        more: bool,
    },
    /// Channel ids answering `SharedChannels`.
    Channels {
        /// The channels.
        channels: Vec<String>,
    },
    /// Done, nothing to report.
    Done,
    /// The request was refused.
    Refused {
        /// Stable reason code.
        code: String,
        /// Explanation.
        message: String,
    },
}

/// A server's signed statement of its name, key and addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerDescriptor {
    /// Server name.
    pub name: String,
    /// libp2p peer id (which embeds the key).
    pub peer_id: String,
    /// ed25519 public key, unpadded standard base64.
    pub key: String,
    /// Multiaddresses it listens on.
    pub addrs: Vec<String>,
    /// Milliseconds since the epoch after which the descriptor is stale.
    pub expires_at: u64,
    /// `{name: {key_id: signature}}`.
    #[serde(default)]
    pub signatures: BTreeMap<String, BTreeMap<String, String>>,
}

impl ServerDescriptor {
    /// Signs a descriptor for this server.
    pub fn signed(
        name: &str,
        peer_id: &PeerId,
        key: &ServerKey,
        addrs: Vec<String>,
        expires_at: u64,
    ) -> Result<String, EventError> {
        let d = ServerDescriptor {
            name: name.to_string(),
            peer_id: peer_id.to_string(),
            key: key.public_key_base64(),
            addrs,
            expires_at,
            signatures: BTreeMap::new(),
        };
        let value = serde_json::to_value(&d).map_err(|e| EventError::Malformed(e.to_string()))?;
        let signed =
            sign_json(&value, name, key).map_err(|e| EventError::BadSignature(e.to_string()))?;
        Ok(signed.to_string())
    }

    /// Parses and checks a descriptor: its key is the key its peer id embeds, and it
    /// is signed by that key. Returns the descriptor, its key and its peer id.
    pub fn verify(
        json: &str,
        now_ms: u64,
    ) -> Result<(ServerDescriptor, VerifyingKey, PeerId), EventError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| EventError::Malformed(e.to_string()))?;
        let d: ServerDescriptor = serde_json::from_value(value.clone())
            .map_err(|e| EventError::Malformed(e.to_string()))?;
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&d.key)
            .map_err(|e| EventError::Malformed(format!("key: {e}")))?;
        let raw: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| EventError::Malformed("key is not 32 bytes".into()))?;
        let key =
            verifying_key_from_bytes(&raw).map_err(|e| EventError::BadSignature(e.to_string()))?;
        let peer_id: PeerId = d
            .peer_id
            .parse()
            .map_err(|_| EventError::Malformed("peer id".into()))?;
        if peer_id_key(&peer_id) != Some(raw) {
            return Err(EventError::BadSignature(
                "the descriptor's key is not its peer id's key".into(),
            ));
        }
        let key_id = crate::signing::key_id_for(&key);
        verify_json(&value, &d.name, &key_id, &key)
            .map_err(|e| EventError::BadSignature(e.to_string()))?;
        if d.expires_at < now_ms {
            return Err(EventError::Malformed("the descriptor has expired".into()));
        }
        Ok((d, key, peer_id))
    }
}

/// The ed25519 public key a peer id embeds, if it embeds one.
pub fn peer_id_key(peer: &PeerId) -> Option<[u8; 32]> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        // Not an identity multihash: the key is not inline.
        return None;
    }
    let public = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    Some(public.try_into_ed25519().ok()?.to_bytes())
}

/// A user's presence as their server announces it, signed by that server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceAnnouncement {
    /// The announcing server.
    pub server: String,
    /// The user, `name@server`.
    pub user: String,
    /// `true` while at least one device is connected.
    pub online: bool,
    /// Last activity (ms since the epoch), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_at: Option<u64>,
    /// When it was announced (ms), so older announcements lose to newer ones.
    pub ts: u64,
    /// `{server: {key_id: signature}}`.
    #[serde(default)]
    pub signatures: BTreeMap<String, BTreeMap<String, String>>,
}

impl PresenceAnnouncement {
    /// Signs an announcement.
    pub fn sign(mut self, key: &ServerKey) -> Result<Vec<u8>, EventError> {
        self.signatures.clear();
        let value =
            serde_json::to_value(&self).map_err(|e| EventError::Malformed(e.to_string()))?;
        let signed = sign_json(&value, &self.server, key)
            .map_err(|e| EventError::BadSignature(e.to_string()))?;
        Ok(signed.to_string().into_bytes())
    }

    /// Parses an announcement; the caller verifies it with the server's key.
    pub fn parse(bytes: &[u8]) -> Result<(PresenceAnnouncement, Value), EventError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| EventError::Malformed(e.to_string()))?;
        let a: PresenceAnnouncement = serde_json::from_value(value.clone())
            .map_err(|e| EventError::Malformed(e.to_string()))?;
        if crate::event::user_server(&a.user) != Some(a.server.as_str()) {
            return Err(EventError::ForeignSender {
                sender: a.user,
                origin: a.server,
            });
        }
        Ok((a, value))
    }

    /// Checks the server's signature over the announcement as received.
    pub fn verify(value: &Value, server: &str, key: &VerifyingKey) -> Result<(), EventError> {
        let key_id = crate::signing::key_id_for(key);
        verify_json(value, server, &key_id, key)
            .map_err(|e| EventError::BadSignature(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeIdentity;

    #[test]
    fn a_descriptor_binds_name_key_and_peer_id() {
        let id = NodeIdentity::from_key(ServerKey::from_seed(&[3; 32])).expect("identity");
        let json = ServerDescriptor::signed(
            "acme.example",
            &id.peer_id,
            &id.key,
            vec!["/ip4/127.0.0.1/tcp/1".into()],
            10,
        )
        .expect("sign");
        let (d, key, peer) = ServerDescriptor::verify(&json, 5).expect("valid");
        assert_eq!(d.name, "acme.example");
        assert_eq!(peer, id.peer_id);
        assert_eq!(key, id.key.verifying_key());
        assert!(ServerDescriptor::verify(&json, 11).is_err(), "expired");
        let renamed = json.replace("acme.example", "globex.example");
        assert!(ServerDescriptor::verify(&renamed, 5).is_err(), "renamed");
        let other = NodeIdentity::from_key(ServerKey::from_seed(&[4; 32])).expect("identity");
        let stolen = json.replace(&id.peer_id.to_string(), &other.peer_id.to_string());
        assert!(
            ServerDescriptor::verify(&stolen, 5).is_err(),
            "someone else's peer id"
        );
    }
}
