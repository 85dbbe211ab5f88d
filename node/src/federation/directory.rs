//! The directory of other servers: name, peer id, pinned key, addresses; trust on first use or strict pins.

use std::collections::HashMap;
use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use hearth_federation::VerifyingKey;
use hearth_federation::protocol::ServerDescriptor;
use hearth_federation::signing::verifying_key_from_bytes;
use libp2p::{Multiaddr, PeerId};
use tracing::{info, warn};

use crate::config::{FederationPolicy, PeerConfig};
use crate::store::{PeerRecord, Store};

/// One known server.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    /// Its peer id.
    pub peer: PeerId,
    /// Its pinned key.
    pub key: VerifyingKey,
    /// Where it listens.
    pub addrs: Vec<Multiaddr>,
}

/// Why a server's descriptor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The descriptor does not verify.
    #[error("invalid descriptor: {0}")]
    Invalid(String),
    /// Federation with this server is not allowed here.
    #[error("federation with {0} is not allowed")]
    NotAllowed(String),
    /// The server shows a key other than the one pinned for its name.
    #[error("{0} presented a key other than the one pinned for it")]
    KeyChanged(String),
    /// Strict mode and no key is configured for the name.
    #[error("{0} has no pinned key and this server only trusts pinned keys")]
    Unpinned(String),
}

/// The directory.
pub struct Directory {
    store: Store,
    policy: FederationPolicy,
    strict: bool,
    configured: HashMap<String, [u8; 32]>,
    by_name: RwLock<HashMap<String, ServerEntry>>,
    by_peer: RwLock<HashMap<PeerId, String>>,
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    STANDARD_NO_PAD
        .decode(b64.trim_end_matches('='))
        .ok()?
        .try_into()
        .ok()
}

impl Directory {
    /// The directory, with pins from the configuration and the store.
    pub fn new(store: Store, policy: FederationPolicy, strict: bool, peers: &[PeerConfig]) -> Self {
        let configured = peers
            .iter()
            .filter_map(|p| Some((p.name.clone(), decode_key(p.key.as_deref()?)?)))
            .collect();
        let dir = Directory {
            store,
            policy,
            strict,
            configured,
            by_name: RwLock::new(HashMap::new()),
            by_peer: RwLock::new(HashMap::new()),
        };
        match dir.store.peers() {
            Ok(peers) => {
                for (name, rec) in peers {
                    if let Some(entry) = entry_of(&rec) {
                        dir.insert(&name, entry);
                    }
                }
            }
            Err(e) => warn!(error = %e, "pinned servers could not be read"),
        }
        dir
    }

    fn insert(&self, name: &str, entry: ServerEntry) {
        self.by_peer
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.peer, name.to_string());
        self.by_name
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), entry);
    }

    /// Checks a descriptor against the policy and the pins, pins a first-seen key,
    /// and records the server. Returns its name and entry.
    pub fn learn(
        &self,
        descriptor: &str,
        now_ms: u64,
    ) -> Result<(String, ServerEntry), TrustError> {
        let (d, key, peer) = ServerDescriptor::verify(descriptor, now_ms)
            .map_err(|e| TrustError::Invalid(e.to_string()))?;
        if !self.policy.federates_with(&d.name) {
            return Err(TrustError::NotAllowed(d.name));
        }
        let raw = key.to_bytes();
        if let Some(pinned) = self.configured.get(&d.name) {
            if *pinned != raw {
                warn!(server = %d.name, "refused: the key differs from the configured pin");
                return Err(TrustError::KeyChanged(d.name));
            }
        } else if self.strict {
            return Err(TrustError::Unpinned(d.name));
        }
        let stored = self.store.peer(&d.name).ok().flatten();
        if let Some(prev) = &stored
            && decode_key(&prev.key) != Some(raw)
        {
            warn!(server = %d.name, "refused: the key differs from the one pinned on first contact");
            return Err(TrustError::KeyChanged(d.name));
        }
        let addrs: Vec<Multiaddr> = d.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let rec = PeerRecord {
            peer_id: peer.to_string(),
            key: STANDARD_NO_PAD.encode(raw),
            addrs: d.addrs.clone(),
        };
        if stored.as_ref() != Some(&rec) {
            if stored.is_none() {
                info!(server = %d.name, %peer, "pinned the key of a new server");
            }
            if let Err(e) = self.store.put_peer(&d.name, &rec) {
                warn!(error = %e, "could not store a server pin");
            }
        }
        let entry = ServerEntry { peer, key, addrs };
        self.insert(&d.name, entry.clone());
        Ok((d.name, entry))
    }

    /// The pinned key of a server.
    pub fn key_of(&self, name: &str) -> Option<VerifyingKey> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.key)
    }

    /// A server's entry.
    pub fn entry(&self, name: &str) -> Option<ServerEntry> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The server name behind a peer id.
    pub fn name_of(&self, peer: &PeerId) -> Option<String> {
        self.by_peer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned()
    }

    /// Every known server.
    pub fn all(&self) -> Vec<(String, ServerEntry)> {
        self.by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }
}

fn entry_of(rec: &PeerRecord) -> Option<ServerEntry> {
    let key = verifying_key_from_bytes(&decode_key(&rec.key)?).ok()?;
    Some(ServerEntry {
        peer: rec.peer_id.parse().ok()?,
        key,
        addrs: rec.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
    })
}
