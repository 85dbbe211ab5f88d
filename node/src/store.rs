//! The store: every byte the node keeps, in keyspaces named after their key layout.
//!
//! Only this module touches the disk, through `engine` (fjall). It holds no chat
//! rules: services decide, the store reads and writes typed records. Composite keys
//! join their parts with a 0x00 byte, which no user id, device id or channel id
//! contains, so a prefix scan over `a\0` finds exactly the entries of `a`. Numbers
//! in keys are big-endian so byte order is numeric order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use hearth_client_api::model::{ChannelKind, Role};
use hearth_federation::SignedEvent;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bounded::BoundedMap;
use engine::{Engine, Tree};

mod engine;
pub mod push;

/// A store failure: the disk, or a record that does not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The engine (fjall) reported an error (I/O, corruption).
    #[error("store engine: {0}")]
    Engine(#[from] fjall::Error),
    /// Another process holds the store's lock file.
    #[error("store is locked by another process")]
    Locked,
    /// The thread that waits for the disk ended without an answer (it panicked, or
    /// the runtime is shutting down); whether the write reached the disk is unknown.
    #[error("store {what} did not finish: {detail}")]
    Interrupted {
        /// Which operation.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A stored record does not decode; the store was written by something else.
    #[error("stored record in {tree} does not decode: {detail}")]
    Corrupt {
        /// Which tree.
        tree: &'static str,
        /// What went wrong.
        detail: String,
    },
}

type StoreResult<T> = Result<T, StoreError>;

/// An account, keyed by the user's local part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRecord {
    /// PHC string of the argon2id hash.
    pub password_hash: String,
    /// Disabled accounts cannot log in; their tokens are refused.
    pub disabled: bool,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    /// Optional display name.
    pub display_name: Option<String>,
}

/// A logged-in device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Name given at login.
    pub name: String,
    /// Hex SHA-256 of the device's access token (the token itself is never stored).
    pub token_hash: String,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    /// Highest stream position the device has acknowledged.
    pub cursor: u64,
}

/// Which user and device a token belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceKey {
    /// Full user id.
    pub user: String,
    /// Device id.
    pub device: String,
}

/// A channel's settings and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// Direct or group.
    pub kind: ChannelKind,
    /// Group name (empty for direct channels).
    pub name: String,
    /// Creator's user id.
    pub created_by: String,
    /// Milliseconds since the epoch.
    pub created_at: u64,
    /// Membership version, bumped by every membership change.
    pub version: u64,
    /// Current number of members.
    pub member_count: usize,
    /// Next sequence number for events this server originates in the channel.
    pub next_seq: u64,
}

/// A member's place in a channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Admin or member.
    pub role: Role,
    /// Milliseconds since the epoch.
    pub joined_at: u64,
}

/// What a `send` with a given idempotency key produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckRecord {
    /// The stored event's id.
    pub event_id: String,
    /// Its channel.
    pub channel: String,
    /// Its timestamp.
    pub ts: u64,
}

/// What one step of [`Store::expire_acks`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckSweep {
    /// Records looked at.
    pub scanned: usize,
    /// Records removed.
    pub removed: usize,
    /// Where the next step starts (after this key); `None` once the end was reached.
    pub resume: Option<Vec<u8>>,
}

/// An event's place in its channel's order: `(ts, origin, seq)`, the same on every server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelPos {
    /// Hybrid-clock timestamp.
    pub ts: u64,
    /// Originating server.
    pub origin: String,
    /// Per-origin, per-channel sequence number.
    pub seq: u64,
}

impl ChannelPos {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(17 + self.origin.len());
        b.extend_from_slice(&self.ts.to_be_bytes());
        b.extend_from_slice(self.origin.as_bytes());
        b.push(0);
        b.extend_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<ChannelPos> {
        let ts = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let rest = b.get(8..)?;
        let nul = rest.iter().position(|&c| c == 0)?;
        let origin = std::str::from_utf8(rest.get(..nul)?).ok()?.to_string();
        let seq = u64::from_be_bytes(rest.get(nul + 1..)?.try_into().ok()?);
        Some(ChannelPos { ts, origin, seq })
    }

    /// The history cursor form, `ts-seq-origin`.
    pub fn to_cursor(&self) -> String {
        format!("{}-{}-{}", self.ts, self.seq, self.origin)
    }

    /// Parses a history cursor.
    pub fn from_cursor(s: &str) -> Option<ChannelPos> {
        let mut parts = s.splitn(3, '-');
        let ts = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let origin = parts.next()?.to_string();
        if origin.is_empty() || origin.contains('\0') {
            return None;
        }
        Some(ChannelPos { ts, origin, seq })
    }
}

/// An event as stored: the signed event exactly as its origin made it, and its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Event id (hash of the signed canonical bytes).
    pub id: String,
    /// The signed event.
    pub event: SignedEvent,
}

impl StoredEvent {
    /// The event's place in its channel's order.
    pub fn channel_pos(&self) -> ChannelPos {
        ChannelPos {
            ts: self.event.ts,
            origin: self.event.origin.clone(),
            seq: self.event.seq,
        }
    }
}

/// What this node knows of another server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// libp2p peer id.
    pub peer_id: String,
    /// Pinned ed25519 key, unpadded base64.
    pub key: String,
    /// Last known addresses.
    pub addrs: Vec<String>,
}

/// Changes that must land together: one atomic batch across keyspaces.
#[derive(Debug, Default)]
pub struct WriteSet {
    /// Channel records to write.
    pub channels: Vec<(String, ChannelRecord)>,
    /// Memberships to set (`Some`) or remove (`None`); keeps the user→channel index too.
    pub members: Vec<(String, String, Option<MemberRecord>)>,
    /// A new direct channel for a pair of users: `(user_a, user_b, channel)`.
    pub direct_pairs: Vec<(String, String, String)>,
    /// Events to store in their channels; the store also indexes them by origin
    /// sequence (advancing the contiguous head) and, for membership events, by version.
    pub events: Vec<StoredEvent>,
    /// Events to send to other servers: `(server, event id)`.
    pub outbox: Vec<(String, String)>,
    /// Inbox entries: `(user, stream position, channel, channel position)`.
    pub inbox: Vec<(String, u64, String, ChannelPos)>,
    /// Idempotency records: `(user, key, ack)`.
    pub acks: Vec<(String, String, AckRecord)>,
    /// The node's highest stream position after this write.
    pub stream_pos: Option<u64>,
}

const META_STREAM_POS: &[u8] = b"stream_pos";
const META_OUTBOX_SEQ: &[u8] = b"outbox_seq";
const META_SCHEMA: &[u8] = b"schema_version";
const SCHEMA_VERSION: u64 = 1;

/// A cheap handle to the node's store.
#[derive(Clone)]
pub struct Store {
    engine: Engine,
    /// Serialises read-modify-write of account and device records.
    records: Arc<Mutex<()>>,
    /// Where each channel and origin stood after the last write set that moved it,
    /// so the next one need not read that back. [`Store::apply`] alone writes the
    /// sequence index and the heads, one write set at a time, and updates this
    /// only once its write set has landed.
    origin_heads: Arc<Mutex<BoundedMap<Vec<u8>, OriginHead>>>,
    userid_account: Tree,
    tokenhash_device: Tree,
    userdevice_record: Tree,
    userid_lastactive: Tree,
    channelid_channel: Tree,
    channeluser_member: Tree,
    userchannel_index: Tree,
    userpair_direct: Tree,
    channelpos_event: Tree,
    eventid_location: Tree,
    userpos_inbox: Tree,
    userkey_ack: Tree,
    channelver_membership: Tree,
    channeloriginseq_event: Tree,
    channelorigin_head: Tree,
    destseq_outbox: Tree,
    servername_peer: Tree,
    meta: Tree,
    push: push::PushTrees,
}

fn key2(a: &str, b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b);
    k
}

fn prefix(a: &str) -> Vec<u8> {
    key2(a, &[])
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain records cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

fn suffix_str(tree: &'static str, key: &[u8], prefix_len: usize) -> StoreResult<String> {
    key.get(prefix_len..)
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(str::to_string)
        .ok_or(StoreError::Corrupt {
            tree,
            detail: "bad key".into(),
        })
}

fn u64_of(tree: &'static str, bytes: &[u8]) -> StoreResult<u64> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            tree,
            detail: "bad number".into(),
        })
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> StoreResult<Store> {
        let path = dir.join("store");
        // Stores written before decision 36 are sled's; fjall would not recognise
        // them and would start over beside them, which looks like lost history.
        if path.join("conf").is_file() && path.join("db").is_file() {
            return Err(StoreError::Corrupt {
                tree: "store",
                detail: format!(
                    "{} holds a store from an earlier Hearth pre-release (sled); this build \
                     cannot read it. Move it aside to start with an empty store",
                    path.display()
                ),
            });
        }
        let engine = Engine::open(&path)?;
        let t = |name: &'static str| engine.tree(name);
        let store = Store {
            userid_account: t("userid_account")?,
            tokenhash_device: t("tokenhash_device")?,
            userdevice_record: t("userdevice_record")?,
            userid_lastactive: t("userid_lastactive")?,
            channelid_channel: t("channelid_channel")?,
            channeluser_member: t("channeluser_member")?,
            userchannel_index: t("userchannel_index")?,
            userpair_direct: t("userpair_direct")?,
            channelpos_event: t("channelpos_event")?,
            eventid_location: t("eventid_location")?,
            userpos_inbox: t("userpos_inbox")?,
            userkey_ack: t("userkey_ack")?,
            channelver_membership: t("channelver_membership")?,
            channeloriginseq_event: t("channeloriginseq_event")?,
            channelorigin_head: t("channelorigin_head")?,
            destseq_outbox: t("destseq_outbox")?,
            servername_peer: t("servername_peer")?,
            meta: t("meta")?,
            push: push::PushTrees::open(&engine)?,
            records: Arc::default(),
            origin_heads: Arc::new(Mutex::new(BoundedMap::new(MAX_ORIGIN_HEADS))),
            engine,
        };
        match store.meta.get(META_SCHEMA)? {
            None => {
                store
                    .meta
                    .insert(META_SCHEMA, SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) if u64_of("meta", &v)? == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(StoreError::Corrupt {
                    tree: "meta",
                    detail: format!(
                        "schema version {} is not the {SCHEMA_VERSION} this build reads",
                        u64_of("meta", &v)?
                    ),
                });
            }
        }
        Ok(store)
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> StoreResult<()> {
        self.wait_for_disk("flush", Engine::persist).await
    }

    /// Blocks until everything written so far is on disk: [`Store::flush`] for a
    /// thread that may block (the inboxes' flusher).
    pub fn sync_to_disk(&self) -> StoreResult<()> {
        self.engine.persist()
    }

    /// Makes everything durable and writes it out of the journal, so the next
    /// start replays nothing. Called on a graceful stop.
    pub async fn checkpoint(&self) -> StoreResult<()> {
        self.wait_for_disk("checkpoint", Engine::checkpoint).await
    }

    /// Runs an engine call that blocks on the disk off the async runtime.
    async fn wait_for_disk(
        &self,
        what: &'static str,
        call: fn(&Engine) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || call(&engine))
            .await
            .map_err(|e| StoreError::Interrupted {
                what,
                detail: e.to_string(),
            })?
    }

    // ---- accounts and devices ----

    /// The account of a local user.
    pub fn account(&self, localpart: &str) -> StoreResult<Option<AccountRecord>> {
        self.userid_account
            .get(localpart)?
            .map(|v| decode("userid_account", &v))
            .transpose()
    }

    /// Creates an account; false if the name is taken.
    pub fn create_account(&self, localpart: &str, rec: &AccountRecord) -> StoreResult<bool> {
        let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if self.userid_account.contains_key(localpart)? {
            return Ok(false);
        }
        self.userid_account.insert(localpart, encode(rec))?;
        Ok(true)
    }

    /// Overwrites an account.
    pub fn put_account(&self, localpart: &str, rec: &AccountRecord) -> StoreResult<()> {
        let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        self.userid_account.insert(localpart, encode(rec))?;
        Ok(())
    }

    /// Every account, by local part.
    pub fn accounts(&self) -> StoreResult<Vec<(String, AccountRecord)>> {
        self.userid_account
            .iter()
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("userid_account", &k, 0)?,
                    decode("userid_account", &v)?,
                ))
            })
            .collect()
    }

    /// Who holds the token with this hash.
    pub fn device_by_token(&self, token_hash: &str) -> StoreResult<Option<DeviceKey>> {
        self.tokenhash_device
            .get(token_hash)?
            .map(|v| decode("tokenhash_device", &v))
            .transpose()
    }

    /// Records a new device and its token.
    pub fn add_device(&self, user: &str, device: &str, rec: &DeviceRecord) -> StoreResult<()> {
        let owner = DeviceKey {
            user: user.into(),
            device: device.into(),
        };
        let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = self.engine.atomic();
        w.insert(
            &self.userdevice_record,
            key2(user, device.as_bytes()),
            encode(rec),
        );
        w.insert(
            &self.tokenhash_device,
            rec.token_hash.as_bytes(),
            encode(&owner),
        );
        w.commit()
    }

    /// Removes a device and its token; returns the removed record.
    pub fn remove_device(&self, user: &str, device: &str) -> StoreResult<Option<DeviceRecord>> {
        let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rec) = self.device(user, device)? else {
            return Ok(None);
        };
        let mut w = self.engine.atomic();
        w.remove(&self.userdevice_record, key2(user, device.as_bytes()));
        w.remove(&self.tokenhash_device, rec.token_hash.as_bytes());
        w.commit()?;
        Ok(Some(rec))
    }

    /// One device of a user.
    pub fn device(&self, user: &str, device: &str) -> StoreResult<Option<DeviceRecord>> {
        self.userdevice_record
            .get(key2(user, device.as_bytes()))?
            .map(|v| decode("userdevice_record", &v))
            .transpose()
    }

    /// All devices of a user.
    pub fn devices(&self, user: &str) -> StoreResult<Vec<(String, DeviceRecord)>> {
        let p = prefix(user);
        self.userdevice_record
            .scan_prefix(&p)
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("userdevice_record", &k, p.len())?,
                    decode("userdevice_record", &v)?,
                ))
            })
            .collect()
    }

    /// Moves a device's cursor forward (never back); false if the device is gone.
    pub fn advance_cursor(&self, user: &str, device: &str, pos: u64) -> StoreResult<bool> {
        let _records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let key = key2(user, device.as_bytes());
        let Some(old) = self.userdevice_record.get(&key)? else {
            return Ok(false);
        };
        if let Ok(mut rec) = serde_json::from_slice::<DeviceRecord>(&old)
            && rec.cursor < pos
        {
            rec.cursor = pos;
            self.userdevice_record.insert(&key, encode(&rec))?;
        }
        Ok(true)
    }

    /// When the user was last active.
    pub fn last_active(&self, user: &str) -> StoreResult<Option<u64>> {
        self.userid_lastactive
            .get(user)?
            .map(|v| u64_of("userid_lastactive", &v))
            .transpose()
    }

    /// Records the user's last activity.
    pub fn set_last_active(&self, user: &str, ts: u64) -> StoreResult<()> {
        self.userid_lastactive.insert(user, ts.to_be_bytes())?;
        Ok(())
    }

    // ---- channels ----

    /// A channel's record.
    pub fn channel(&self, id: &str) -> StoreResult<Option<ChannelRecord>> {
        self.channelid_channel
            .get(id)?
            .map(|v| decode("channelid_channel", &v))
            .transpose()
    }

    /// A user's membership in a channel.
    pub fn member(&self, channel: &str, user: &str) -> StoreResult<Option<MemberRecord>> {
        self.channeluser_member
            .get(key2(channel, user.as_bytes()))?
            .map(|v| decode("channeluser_member", &v))
            .transpose()
    }

    /// All members of a channel.
    pub fn members(&self, channel: &str) -> StoreResult<Vec<(String, MemberRecord)>> {
        let p = prefix(channel);
        self.channeluser_member
            .scan_prefix(&p)
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("channeluser_member", &k, p.len())?,
                    decode("channeluser_member", &v)?,
                ))
            })
            .collect()
    }

    /// Ids of the channels a user belongs to.
    pub fn user_channels(&self, user: &str) -> StoreResult<Vec<String>> {
        let p = prefix(user);
        self.userchannel_index
            .scan_prefix(&p)
            .map(|r| suffix_str("userchannel_index", &r?.0, p.len()))
            .collect()
    }

    /// The direct channel of two users, if they have one.
    pub fn direct_channel(&self, a: &str, b: &str) -> StoreResult<Option<String>> {
        self.userpair_direct
            .get(pair_key(a, b))?
            .map(|v| suffix_str("userpair_direct", &v, 0))
            .transpose()
    }

    /// The newest events of a channel, newest first, that `keep` accepts (at most
    /// `scan` are looked at).
    pub fn last_event(
        &self,
        channel: &str,
        scan: usize,
        keep: impl Fn(&StoredEvent) -> bool,
    ) -> StoreResult<Option<StoredEvent>> {
        let p = prefix(channel);
        for r in self.channelpos_event.scan_prefix(&p).rev().take(scan) {
            let e: StoredEvent = decode("channelpos_event", &r?.1)?;
            if keep(&e) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Up to `limit` events of a channel older than `before` (or the newest), newest first.
    pub fn history(
        &self,
        channel: &str,
        before: Option<&ChannelPos>,
        limit: usize,
    ) -> StoreResult<Vec<(ChannelPos, StoredEvent)>> {
        let start = prefix(channel);
        let end = match before {
            Some(pos) => key2(channel, &pos.to_bytes()),
            None => key2(channel, &[0xff; 9]),
        };
        self.channelpos_event
            .range(start.clone()..end)
            .rev()
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                let pos = k
                    .get(start.len()..)
                    .and_then(ChannelPos::from_bytes)
                    .ok_or(StoreError::Corrupt {
                        tree: "channelpos_event",
                        detail: "bad key".into(),
                    })?;
                Ok((pos, decode("channelpos_event", &v)?))
            })
            .collect()
    }

    /// Whether an event with this id is stored.
    pub fn has_event(&self, event_id: &str) -> StoreResult<bool> {
        self.eventid_location.contains_key(event_id)
    }

    /// A user's inbox entries with positions in `(after, upto]`, oldest first, at most
    /// `limit`, each resolved to its event.
    pub fn inbox(
        &self,
        user: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> StoreResult<Vec<(u64, StoredEvent)>> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let start = key2(user, &(after + 1).to_be_bytes());
        let end = key2(user, &upto.to_be_bytes());
        let mut out = Vec::new();
        for r in self.userpos_inbox.range(start..=end).take(limit) {
            let (k, location) = r?;
            let pos = u64_of(
                "userpos_inbox",
                k.get(k.len().saturating_sub(8)..).unwrap_or(&[]),
            )?;
            // An inbox entry is a reference; the event itself lives once, in its channel.
            let Some(bytes) = self.channelpos_event.get(&location)? else {
                return Err(StoreError::Corrupt {
                    tree: "userpos_inbox",
                    detail: format!("entry {pos} points to a missing event"),
                });
            };
            out.push((pos, decode("channelpos_event", &bytes)?));
        }
        Ok(out)
    }

    /// What an earlier `send` with this key produced.
    pub fn ack(&self, user: &str, key: &str) -> StoreResult<Option<AckRecord>> {
        self.userkey_ack
            .get(key2(user, key.as_bytes()))?
            .map(|v| decode("userkey_ack", &v))
            .transpose()
    }

    /// Removes the idempotency records of sends stored before `before_ms`
    /// (milliseconds since the epoch), looking at up to `limit` records in key order
    /// after `after`. Records are only ever written for a key that has none, so
    /// removing one needs no lock against the writer: a send that found it was
    /// answered with it, a later one stores a new message.
    pub fn expire_acks(
        &self,
        before_ms: u64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<AckSweep> {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Unbounded,
        };
        let mut sweep = AckSweep::default();
        let mut w = self.engine.atomic();
        for entry in self
            .userkey_ack
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
        {
            let (key, value) = entry?;
            sweep.scanned += 1;
            // A record that does not decode stays: it is evidence, not garbage.
            if let Ok(ack) = decode::<AckRecord>("userkey_ack", &value)
                && ack.ts < before_ms
            {
                w.remove(&self.userkey_ack, &key);
                sweep.removed += 1;
            }
            sweep.resume = Some(key.to_vec());
        }
        if sweep.scanned < limit {
            sweep.resume = None;
        }
        if sweep.removed > 0 {
            w.commit()?;
        }
        Ok(sweep)
    }

    /// An event by id.
    pub fn event(&self, id: &str) -> StoreResult<Option<StoredEvent>> {
        let Some(location) = self.eventid_location.get(id)? else {
            return Ok(None);
        };
        self.channelpos_event
            .get(location)?
            .map(|v| decode("channelpos_event", &v))
            .transpose()
    }

    /// Events of `origin` in `channel` with sequence numbers from `from`, in order.
    pub fn events_from(
        &self,
        channel: &str,
        origin: &str,
        from: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let co = co_str(channel, origin);
        let start = key2(&co, &from.to_be_bytes());
        let end = prefix(&co);
        let mut out = Vec::new();
        for r in self.channeloriginseq_event.range(start..).take(limit) {
            let (k, location) = r?;
            if !k.starts_with(&end) {
                break;
            }
            if let Some(v) = self.channelpos_event.get(location)? {
                out.push(decode("channelpos_event", &v)?);
            }
        }
        Ok(out)
    }

    /// For each origin seen in `channel`, the next sequence number expected from it.
    pub fn heads(&self, channel: &str) -> StoreResult<BTreeMap<String, u64>> {
        let p = prefix(channel);
        self.channelorigin_head
            .scan_prefix(&p)
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("channelorigin_head", &k, p.len())?,
                    u64_of("channelorigin_head", &v)?,
                ))
            })
            .collect()
    }

    /// Membership events of `channel` with versions above `after`, in version order.
    pub fn membership_log(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let start = key2(channel, &(after.saturating_add(1)).to_be_bytes());
        let p = prefix(channel);
        let mut out = Vec::new();
        for r in self.channelver_membership.range(start..).take(limit) {
            let (k, location) = r?;
            if !k.starts_with(&p) {
                break;
            }
            if let Some(v) = self.channelpos_event.get(location)? {
                out.push(decode("channelpos_event", &v)?);
            }
        }
        Ok(out)
    }

    /// Every channel this node holds.
    pub fn channel_ids(&self) -> StoreResult<Vec<String>> {
        self.channelid_channel
            .iter()
            .map(|r| suffix_str("channelid_channel", &r?.0, 0))
            .collect()
    }

    /// Servers with events waiting in their outbox.
    pub fn outbox_destinations(&self) -> StoreResult<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for r in self.destseq_outbox.iter() {
            let (k, _) = r?;
            let end = k.iter().position(|&b| b == 0).unwrap_or(k.len());
            let dest = suffix_str("destseq_outbox", k.get(..end).unwrap_or(&[]), 0)?;
            if out.last() != Some(&dest) {
                out.push(dest);
            }
        }
        Ok(out)
    }

    /// Up to `limit` outbox entries for `dest`, oldest first, after the entry `after`
    /// (from the oldest if `None`): `(entry key, event id)`.
    pub fn outbox(
        &self,
        dest: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, String)>> {
        let p = prefix(dest);
        let start = match after {
            // The smallest key after `after`.
            Some(after) => [after, &[0]].concat(),
            None => p.clone(),
        };
        self.destseq_outbox
            .range(start..)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(&p)))
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((k.to_vec(), suffix_str("destseq_outbox", &v, 0)?))
            })
            .collect()
    }

    /// Removes delivered outbox entries.
    pub fn outbox_done(&self, keys: &[Vec<u8>]) -> StoreResult<()> {
        let mut w = self.engine.atomic();
        for k in keys {
            w.remove(&self.destseq_outbox, k);
        }
        w.commit()
    }

    /// What this node pinned for a server name.
    pub fn peer(&self, name: &str) -> StoreResult<Option<PeerRecord>> {
        self.servername_peer
            .get(name)?
            .map(|v| decode("servername_peer", &v))
            .transpose()
    }

    /// Pins or updates what this node knows of a server.
    pub fn put_peer(&self, name: &str, rec: &PeerRecord) -> StoreResult<()> {
        self.servername_peer.insert(name, encode(rec))?;
        Ok(())
    }

    /// Every server this node has pinned.
    pub fn peers(&self) -> StoreResult<Vec<(String, PeerRecord)>> {
        self.servername_peer
            .iter()
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("servername_peer", &k, 0)?,
                    decode("servername_peer", &v)?,
                ))
            })
            .collect()
    }

    /// The node's highest assigned stream position.
    pub fn stream_pos(&self) -> StoreResult<u64> {
        self.meta
            .get(META_STREAM_POS)?
            .map(|v| u64_of("meta", &v))
            .transpose()
            .map(|p| p.unwrap_or(0))
    }

    /// Applies a write set atomically: after a crash either all of it is there or none.
    pub fn apply(&self, ws: &WriteSet) -> StoreResult<()> {
        let events: Vec<(Vec<u8>, Vec<u8>, &StoredEvent)> = ws
            .events
            .iter()
            .map(|ev| {
                (
                    key2(&ev.event.channel, &ev.channel_pos().to_bytes()),
                    encode(ev),
                    ev,
                )
            })
            .collect();
        // Only a write set with outbox entries needs the counter (most hold none).
        let mut outbox_seq = if ws.outbox.is_empty() {
            0
        } else {
            match self.meta.get(META_OUTBOX_SEQ)? {
                Some(v) => u64_of("meta", &v)?,
                None => 0,
            }
        };
        let outbox: Vec<(Vec<u8>, &str)> = ws
            .outbox
            .iter()
            .map(|(dest, id)| {
                outbox_seq += 1;
                (key2(dest, &outbox_seq.to_be_bytes()), id.as_str())
            })
            .collect();
        let inbox: Vec<(Vec<u8>, Vec<u8>)> = ws
            .inbox
            .iter()
            .map(|(user, spos, channel, cpos)| {
                (
                    key2(user, &spos.to_be_bytes()),
                    key2(channel, &cpos.to_bytes()),
                )
            })
            .collect();
        // Callers apply one write set at a time (the inbox writer's lock), so what
        // is read here cannot change before the batch lands.
        let mut w = self.engine.atomic();
        for (id, rec) in &ws.channels {
            w.insert(&self.channelid_channel, id, encode(rec));
        }
        for (channel, user, rec) in &ws.members {
            let mk = key2(channel, user.as_bytes());
            let ik = key2(user, channel.as_bytes());
            match rec {
                Some(rec) => {
                    w.insert(&self.channeluser_member, mk, encode(rec));
                    w.insert(&self.userchannel_index, ik, []);
                }
                None => {
                    w.remove(&self.channeluser_member, mk);
                    w.remove(&self.userchannel_index, ik);
                }
            }
        }
        for (a, b, channel) in &ws.direct_pairs {
            w.insert(&self.userpair_direct, pair_key(a, b), channel);
        }
        // Heads move once per channel and origin of the write set, after all its
        // events are in: a round of sends has many per channel. Each is one past
        // the highest sequence this write set adds there.
        let mut moved: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut new_seqs: BTreeSet<Vec<u8>> = BTreeSet::new();
        for (key, value, stored) in &events {
            let ev = &stored.event;
            w.insert(&self.channelpos_event, key, value);
            w.insert(&self.eventid_location, &stored.id, key);
            if let hearth_federation::event::EventContent::Membership { version, .. } = &ev.content
            {
                w.insert(
                    &self.channelver_membership,
                    key2(&ev.channel, &version.to_be_bytes()),
                    key,
                );
            }
            let seq_key = key2(&co_str(&ev.channel, &ev.origin), &ev.seq.to_be_bytes());
            w.insert(&self.channeloriginseq_event, &seq_key, key);
            new_seqs.insert(seq_key);
            let end = moved
                .entry((ev.channel.as_str(), ev.origin.as_str()))
                .or_default();
            *end = (*end).max(ev.seq.saturating_add(1));
        }
        let mut heads = Vec::with_capacity(moved.len());
        for ((channel, origin), added_end) in &moved {
            // The head is the next sequence this server expects from the origin in
            // the channel: it moves over every event held without a gap.
            let co = key2(channel, origin.as_bytes());
            let seq_prefix = co_str(channel, origin);
            let known = self.origin_heads().get(&co).copied();
            let mut head = match known {
                Some(head) => head,
                None => self.stored_origin_head(&co, &seq_prefix)?,
            };
            loop {
                let k = key2(&seq_prefix, &head.next.to_be_bytes());
                let held = new_seqs.contains(&k)
                    || (head.next < head.end && self.channeloriginseq_event.contains_key(&k)?);
                if !held {
                    break;
                }
                head.next += 1;
            }
            head.end = head.end.max(*added_end).max(head.next);
            w.insert(&self.channelorigin_head, &co, head.next.to_be_bytes());
            heads.push((co, head));
        }
        for (key, id) in &outbox {
            w.insert(&self.destseq_outbox, key, id);
        }
        if !outbox.is_empty() {
            w.insert(&self.meta, META_OUTBOX_SEQ, outbox_seq.to_be_bytes());
        }
        for (key, location) in &inbox {
            w.insert(&self.userpos_inbox, key, location);
        }
        for (user, key, ack) in &ws.acks {
            w.insert(&self.userkey_ack, key2(user, key.as_bytes()), encode(ack));
        }
        if let Some(pos) = ws.stream_pos {
            w.insert(&self.meta, META_STREAM_POS, pos.to_be_bytes());
        }
        w.commit()?;
        let mut known = self.origin_heads();
        for (co, head) in heads {
            known.insert(co, head);
        }
        Ok(())
    }

    fn origin_heads(&self) -> std::sync::MutexGuard<'_, BoundedMap<Vec<u8>, OriginHead>> {
        self.origin_heads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A channel's head for one origin as stored, and how far its events go.
    fn stored_origin_head(&self, co: &[u8], seq_prefix: &str) -> StoreResult<OriginHead> {
        let next = match self.channelorigin_head.get(co)? {
            Some(v) => u64_of("channelorigin_head", &v)?,
            None => 0,
        };
        let p = prefix(seq_prefix);
        let end = match self.channeloriginseq_event.scan_prefix(&p).next_back() {
            Some(entry) => {
                u64_of("channeloriginseq_event", &entry?.0[p.len()..])?.saturating_add(1)
            }
            None => 0,
        };
        Ok(OriginHead { next, end })
    }
}

/// How far a channel's events from one origin are held.
#[derive(Debug, Clone, Copy)]
struct OriginHead {
    /// Every sequence below it is held (the stored head).
    next: u64,
    /// One past the highest sequence held: nothing at or past it is stored, so the
    /// head need not look for events that arrived ahead of a gap.
    end: u64,
}

/// Origin heads remembered at most; past that an arbitrary one makes room.
const MAX_ORIGIN_HEADS: usize = 4096;

/// `channel\0origin` as one string key part, for the per-origin sequence index.
fn co_str(channel: &str, origin: &str) -> String {
    format!("{channel}\0{origin}")
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    key2(lo, hi.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_positions_sort_by_time_then_origin_then_sequence() {
        let p = |ts, origin: &str, seq| ChannelPos {
            ts,
            origin: origin.into(),
            seq,
        };
        let mut keys = vec![
            p(2, "a", 0),
            p(1, "b", 5),
            p(1, "a", 9),
            p(1, "ab", 1),
            p(1, "a", 10),
        ];
        let mut bytes: Vec<_> = keys.iter().map(ChannelPos::to_bytes).collect();
        keys.sort();
        bytes.sort();
        let decoded: Vec<_> = bytes
            .iter()
            .map(|b| ChannelPos::from_bytes(b).expect("decodes"))
            .collect();
        assert_eq!(decoded, keys);
    }

    #[test]
    fn history_cursor_round_trips_and_refuses_garbage() {
        let pos = ChannelPos {
            ts: 17,
            origin: "acme-corp.example".into(),
            seq: 3,
        };
        assert_eq!(ChannelPos::from_cursor(&pos.to_cursor()), Some(pos));
        assert_eq!(ChannelPos::from_cursor("nonsense"), None);
        assert_eq!(ChannelPos::from_cursor("1-2-"), None);
    }
}

#[cfg(test)]
mod reopen_tests {
    use super::*;

    #[tokio::test]
    async fn stream_position_survives_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = Store::open(dir.path()).expect("open");
            for pos in [2, 4, 6, 8] {
                let w = WriteSet {
                    stream_pos: Some(pos),
                    ..WriteSet::default()
                };
                store.apply(&w).expect("apply");
            }
            store.flush().await.expect("flush");
            assert_eq!(store.stream_pos().expect("pos"), 8);
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.stream_pos().expect("pos"), 8);
    }

    fn remote_message(seq: u64) -> StoredEvent {
        StoredEvent {
            id: format!("$remote-{seq}"),
            event: SignedEvent {
                v: hearth_federation::event::EVENT_VERSION,
                channel: "c@b.example".into(),
                origin: "b.example".into(),
                sender: "bob@b.example".into(),
                seq,
                ts: 1_000 + seq,
                mver: 2,
                content: hearth_federation::event::EventContent::Message {
                    body: format!("message {seq}"),
                },
                signatures: BTreeMap::new(),
            },
        }
    }

    fn take_in(store: &Store, seqs: &[u64]) -> u64 {
        let w = WriteSet {
            events: seqs.iter().map(|&s| remote_message(s)).collect(),
            ..WriteSet::default()
        };
        store.apply(&w).expect("apply");
        store.heads("c@b.example").expect("heads")["b.example"]
    }

    #[tokio::test]
    async fn an_origins_head_waits_at_a_gap_and_then_moves_over_what_came_ahead() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(take_in(&store, &[0]), 1);
            assert_eq!(take_in(&store, &[2, 3]), 1, "2 and 3 wait for 1");
            assert_eq!(take_in(&store, &[1]), 4, "1 fills the gap");
            assert_eq!(take_in(&store, &[5]), 4, "5 waits for 4");
            store.checkpoint().await.expect("checkpoint");
        }
        // Opened again, the store knows nothing of the earlier writes but what it
        // reads back: 5 is held ahead of the gap at 4.
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.heads("c@b.example").expect("heads")["b.example"], 4);
        assert_eq!(take_in(&store, &[4]), 6);
        assert_eq!(take_in(&store, &[7]), 6);
        assert_eq!(take_in(&store, &[6]), 8);
    }

    #[test]
    fn a_store_from_the_sled_builds_is_refused_with_a_reason_not_started_over() {
        let dir = tempfile::tempdir().expect("dir");
        let old = dir.path().join("store");
        std::fs::create_dir_all(&old).expect("mkdir");
        std::fs::write(old.join("conf"), b"segment_size: 524288").expect("conf");
        std::fs::write(old.join("db"), b"old sled bytes").expect("db");
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains("earlier Hearth pre-release"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(old.join("db")).expect("still there"),
            b"old sled bytes"
        );
    }
}

#[cfg(test)]
mod ack_expiry_tests {
    use super::*;

    fn keyed_sends(store: &Store, sends: &[(&str, &str, u64)]) {
        let w = WriteSet {
            acks: sends
                .iter()
                .map(|(user, key, ts)| {
                    let ack = AckRecord {
                        event_id: format!("${user}-{key}"),
                        channel: "c@a.example".into(),
                        ts: *ts,
                    };
                    (user.to_string(), key.to_string(), ack)
                })
                .collect(),
            ..WriteSet::default()
        };
        store.apply(&w).expect("apply");
    }

    #[test]
    fn old_idempotency_records_are_forgotten_in_steps_and_younger_ones_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("open");
        keyed_sends(
            &store,
            &[
                ("alice", "k1", 100),
                ("alice", "k2", 300),
                ("bob", "k1", 150),
                ("bob", "k2", 199),
                ("carol", "k1", 200),
            ],
        );
        // A record written by something else does not decode and is left alone.
        store
            .userkey_ack
            .insert(key2("dave", b"k1"), b"not json")
            .expect("insert");

        let mut after = None;
        let mut steps = Vec::new();
        loop {
            let sweep = store.expire_acks(200, after.as_deref(), 2).expect("sweep");
            steps.push((sweep.scanned, sweep.removed));
            match sweep.resume {
                Some(key) => after = Some(key),
                None => break,
            }
        }
        assert_eq!(steps, vec![(2, 1), (2, 2), (2, 0), (0, 0)]);
        for (user, key, kept) in [
            ("alice", "k1", false),
            ("alice", "k2", true),
            ("bob", "k1", false),
            ("bob", "k2", false),
            ("carol", "k1", true),
        ] {
            assert_eq!(
                store.ack(user, key).expect("read").is_some(),
                kept,
                "{user} {key}"
            );
        }
        assert!(
            store
                .userkey_ack
                .contains_key(key2("dave", b"k1"))
                .expect("read")
        );
    }
}
