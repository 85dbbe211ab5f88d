//! Channels: direct and group conversations, membership and its events, sending, history, and taking in events from other servers.
//!
//! Every change goes through [`Inboxes::write`] with a [`Batch`]: channel states
//! loaded once and changed in memory, events signed and staged, inbox entries for
//! local members, outbox entries for the other servers that take part. The
//! same membership rules judge local changes and changes made by other servers,
//! so every server ends with the same membership.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::future::BoxFuture;
use hearth_client_api::ErrorCode;
use hearth_client_api::http::{HistoryPage, MemberList};
use hearth_client_api::model::{self, ChannelKind, ChannelSummary, Event, Member, Role};
use hearth_federation::Hlc;
use hearth_federation::event::{EventContent, MembershipAction, home_server, user_server};
use hearth_federation::{EventError, SignedEvent};
use tracing::instrument;

use crate::accounts::{Accounts, DeviceAuth};
use crate::bounded::BoundedMap;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::store::{
    AckRecord, ChannelPos, ChannelRecord, MemberRecord, Store, StoredEvent, WriteSet,
};
use crate::sync::{
    BeforeFlush, Delivery, FlusherWake, Inboxes, Positions, Staged, not_durable, shutting_down,
};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The direct channel with this user (created by the first message).
    User(String),
    /// This channel.
    Channel(String),
}

/// What a stored message's sender is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Event id.
    pub event_id: String,
    /// Channel it went to.
    pub channel: String,
    /// Its timestamp.
    pub ts: u64,
}

/// Limits that apply to channels.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    /// Most members of a group.
    pub max_group_members: usize,
    /// Largest message body in bytes.
    pub max_body_bytes: usize,
}

/// What the channels need from federation: asking a channel's home server to
/// change membership, and waking the outbox once events are durable.
pub trait Remote: Send + Sync {
    /// Asks `home` to apply a membership change on behalf of local user `actor`.
    fn change_membership(
        &self,
        home: String,
        channel: String,
        actor: String,
        action: MembershipAction,
        user: String,
    ) -> BoxFuture<'static, ApiResult<()>>;

    /// New events wait in the outboxes of these servers.
    fn outbox_ready(&self, servers: Vec<String>);
}

/// Why an event from another server was not taken in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Invalid for good; it will never be taken in.
    Invalid(String),
    /// Cannot be judged yet (membership not known); ask again later.
    NotYet(String),
}

impl Refusal {
    /// The reason as it travels back to the sender: `retry:` marks transient ones.
    pub fn wire(&self) -> String {
        match self {
            Refusal::Invalid(r) => r.clone(),
            Refusal::NotYet(r) => format!("retry: {r}"),
        }
    }
}

/// Channel rules over the store and the inboxes.
#[derive(Clone)]
pub struct Channels {
    store: Store,
    inboxes: Inboxes,
    accounts: Accounts,
    clock: Arc<Hlc>,
    limits: ChannelLimits,
    metrics: Metrics,
    remote: Arc<OnceLock<Arc<dyn Remote>>>,
    sends: Arc<Mutex<SendQueue>>,
    known: Arc<Mutex<KnownChannels>>,
}

/// Channel states and direct pairs as the last applied writes left them, so a
/// round of sends does not read and decode each channel's record and members from
/// the store again.
///
/// Only writes touch it, under the inboxes' write lock: a write takes out the
/// states it uses and puts them back (changed) once it is applied, so what is
/// here always matches the store. A write that fails leaves its channels out, to
/// be loaded afresh by the next.
struct KnownChannels {
    states: BoundedMap<String, ChannelState>,
    /// The direct channel of a pair, by [`pair_of`].
    direct: BoundedMap<(String, String), String>,
}

/// Channels (and, apart, direct pairs) kept in [`KnownChannels`] at most; past
/// that an arbitrary one makes room. A state is its record and members: a few
/// hundred bytes for a direct channel, some kilobytes for a full group.
const MAX_KNOWN_CHANNELS: usize = 1024;

impl Default for KnownChannels {
    fn default() -> Self {
        KnownChannels {
            states: BoundedMap::new(MAX_KNOWN_CHANNELS),
            direct: BoundedMap::new(MAX_KNOWN_CHANNELS),
        }
    }
}

/// Two users as an unordered pair.
fn pair_of(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Messages waiting to be stored together in one write.
///
/// A send is the node's hottest write, and one store transaction per message costs
/// several times what one transaction for a whole group of them does. So sends queue
/// here, and one drainer at a time stages everything queued, in rounds of one
/// [`Batch`] each; what arrives meanwhile waits for the next round. The drainer is
/// the inboxes' flusher when it is waiting (no thread hand-off: [`SendRounds`]),
/// else a blocking thread, so that staging goes on while a flush does.
#[derive(Default)]
struct SendQueue {
    waiting: Vec<QueuedSend>,
    draining: bool,
}

struct QueuedSend {
    sender: String,
    key: String,
    target: Target,
    body: String,
    /// Answered once the message is durable (or refused).
    reply: tokio::sync::oneshot::Sender<ApiResult<Ack>>,
}

/// The flusher's hook that stages queued sends (see [`SendQueue`]).
struct SendRounds {
    /// With [`Inboxes::detached`] inboxes: the hook must not keep the flusher alive.
    channels: Channels,
    /// For a blocking thread to go on draining, and for waking outboxes from the
    /// flusher's thread (a new outbox is a task).
    runtime: tokio::runtime::Handle,
}

impl BeforeFlush for SendRounds {
    fn stage(&self) {
        // What is queued now; whatever comes meanwhile is a blocking thread's, so the
        // flusher gets on with the flush.
        let _drainer = Drainer(&self.channels.sends);
        let waiting = {
            let mut queue = self.channels.send_queue();
            std::mem::take(&mut queue.waiting)
        };
        let mut waiting = waiting.into_iter().peekable();
        while waiting.peek().is_some() {
            let round: Vec<QueuedSend> = waiting.by_ref().take(MAX_SENDS_PER_ROUND).collect();
            self.channels.stage_sends(round, &self.runtime);
        }
        let more = {
            let mut queue = self.channels.send_queue();
            queue.draining = !queue.waiting.is_empty();
            queue.draining
        };
        if more {
            let channels = self.channels.clone();
            let runtime = self.runtime.clone();
            self.runtime
                .spawn_blocking(move || channels.drain_sends(&runtime));
        }
    }
}

/// Held by the one drainer of the send queue. Should staging ever panic, the
/// queue must not stay marked as drained by a thread that is gone: every later
/// send would wait forever.
struct Drainer<'a>(&'a Mutex<SendQueue>);

impl Drop for Drainer<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
            queue.draining = false;
            // Their senders get an error rather than an answer.
            queue.waiting.clear();
        }
    }
}

const MAX_KEY_CHARS: usize = 64;
/// Sends staged in one round at most: bounds how long a round holds the write lock
/// (other writes wait for it) and how late its first sender hears back.
const MAX_SENDS_PER_ROUND: usize = 512;
const MAX_HISTORY_PAGE: usize = 200;
const DEFAULT_HISTORY_PAGE: usize = 50;

fn not_member() -> ApiError {
    ApiError::new(ErrorCode::NotMember, "you are not a member of this channel")
}

fn group_full(max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::GroupFull,
        format!("a group can have at most {max} members"),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "channel operation failed");
    ApiError::new(ErrorCode::Internal, "the server failed; try again")
}

/// The client's view of a stored event.
pub fn client_event(stored: &StoredEvent, pos: Option<u64>) -> Event {
    let e = &stored.event;
    let content = match &e.content {
        EventContent::Message { body } => model::EventContent::Message { body: body.clone() },
        EventContent::Membership {
            action,
            user,
            version,
            name,
            ..
        } => model::EventContent::Membership {
            action: match action {
                MembershipAction::Create => model::MembershipAction::Create,
                MembershipAction::Add => model::MembershipAction::Add,
                MembershipAction::Remove => model::MembershipAction::Remove,
                MembershipAction::Leave => model::MembershipAction::Leave,
            },
            user: user.clone(),
            version: *version,
            name: name.clone(),
        },
    };
    Event {
        id: stored.id.clone(),
        channel: e.channel.clone(),
        sender: e.sender.clone(),
        origin: e.origin.clone(),
        seq: e.seq,
        ts: e.ts,
        pos,
        content,
    }
}

fn is_membership(e: &StoredEvent) -> bool {
    matches!(e.event.content, EventContent::Membership { .. })
}

/// One channel's state as a write sees it: loaded once, changed in memory.
struct ChannelState {
    rec: Option<ChannelRecord>,
    members: BTreeMap<String, MemberRecord>,
    member_changes: Vec<(String, Option<MemberRecord>)>,
    changed: bool,
    /// The membership version stored before this write.
    stored_version: u64,
    /// The other servers that took part before this write (with a member then).
    stored_servers: BTreeSet<String>,
}

impl ChannelState {
    /// The state of `channel` as stored.
    fn load(store: &Store, channel: &str, here: &str) -> ApiResult<Self> {
        let rec = store.channel(channel)?;
        let mut state = ChannelState {
            stored_version: rec.as_ref().map_or(0, |r| r.version),
            rec,
            members: store.members(channel)?.into_iter().collect(),
            member_changes: Vec::new(),
            changed: false,
            stored_servers: BTreeSet::new(),
        };
        state.stored_servers = state.servers_other_than(here);
        Ok(state)
    }

    /// The state once this write's changes are stored, for the next write.
    fn settled(mut self, here: &str) -> Self {
        self.stored_version = self.rec.as_ref().map_or(0, |r| r.version);
        self.stored_servers = self.servers_other_than(here);
        self.member_changes.clear();
        self.changed = false;
        self
    }

    /// The servers of the members, other than `here`.
    fn servers_other_than(&self, here: &str) -> BTreeSet<String> {
        self.members
            .keys()
            .filter_map(|u| user_server(u))
            .filter(|s| *s != here)
            .map(str::to_string)
            .collect()
    }
}

impl ChannelState {
    fn is_direct(&self) -> bool {
        self.rec
            .as_ref()
            .is_some_and(|r| r.kind == ChannelKind::Direct)
    }

    fn set_member(&mut self, user: &str, rec: Option<MemberRecord>) {
        match &rec {
            Some(r) => {
                self.members.insert(user.to_string(), r.clone());
            }
            None => {
                self.members.remove(user);
            }
        }
        self.member_changes.push((user.to_string(), rec));
        self.changed = true;
    }

    /// Applies a membership event, made here or by the channel's home server. The
    /// rules are the same everywhere: versions follow each other without gaps.
    fn apply_membership(&mut self, channel: &str, e: &SignedEvent) -> Result<(), Refusal> {
        let EventContent::Membership {
            action,
            user,
            version,
            name,
            direct,
        } = &e.content
        else {
            return Ok(());
        };
        let current = self.rec.as_ref().map_or(0, |r| r.version);
        if *version <= current {
            return Err(Refusal::Invalid(format!(
                "membership version {version} of {channel} is already taken"
            )));
        }
        if *version > current + 1 {
            return Err(Refusal::NotYet(format!(
                "membership version {version} of {channel} follows {}, which this server lacks",
                current + 1
            )));
        }
        match action {
            MembershipAction::Create => {
                if self.rec.is_some() || *version != 1 || *user != e.sender {
                    return Err(Refusal::Invalid(
                        "a create must be version 1, by its creator".into(),
                    ));
                }
                self.rec = Some(ChannelRecord {
                    kind: if *direct {
                        ChannelKind::Direct
                    } else {
                        ChannelKind::Group
                    },
                    name: name.clone().unwrap_or_default(),
                    created_by: e.sender.clone(),
                    created_at: e.ts,
                    version: 0,
                    member_count: 0,
                    next_seq: 0,
                });
                let role = if *direct { Role::Member } else { Role::Admin };
                self.set_member(
                    user,
                    Some(MemberRecord {
                        role,
                        joined_at: e.ts,
                    }),
                );
            }
            MembershipAction::Add => {
                if self.members.contains_key(user) {
                    return Err(Refusal::Invalid(format!("{user} is already a member")));
                }
                if self.is_direct() && self.members.len() >= 2 {
                    return Err(Refusal::Invalid("a direct channel has two members".into()));
                }
                self.set_member(
                    user,
                    Some(MemberRecord {
                        role: Role::Member,
                        joined_at: e.ts,
                    }),
                );
            }
            MembershipAction::Remove | MembershipAction::Leave => {
                if !self.members.contains_key(user) {
                    return Err(Refusal::Invalid(format!("{user} is not a member")));
                }
                self.set_member(user, None);
            }
        }
        let count = self.members.len();
        if let Some(rec) = self.rec.as_mut() {
            rec.version = *version;
            rec.member_count = count;
        }
        self.changed = true;
        Ok(())
    }
}

/// Everything one write changes, built up while the write lock is held.
struct Batch<'a> {
    channels: &'a Channels,
    states: HashMap<String, ChannelState>,
    writes: WriteSet,
    deliveries: Vec<Delivery>,
    /// Events made here in this write, in order, for the outboxes.
    sent: Vec<Sent>,
}

/// An event made here and the other servers that hear of it for sure.
struct Sent {
    id: String,
    channel: String,
    membership: bool,
    /// Servers with a member in the event's audience.
    servers: BTreeSet<String>,
}

impl<'a> Batch<'a> {
    fn new(channels: &'a Channels) -> Self {
        Batch {
            channels,
            states: HashMap::new(),
            writes: WriteSet::default(),
            deliveries: Vec::new(),
            sent: Vec::new(),
        }
    }

    fn server_name(&self) -> &str {
        self.channels.accounts.server_name()
    }

    fn state(&mut self, channel: &str) -> ApiResult<&mut ChannelState> {
        if !self.states.contains_key(channel) {
            let known = self.channels.known().states.remove(channel);
            let state = match known {
                Some(state) => state,
                None => ChannelState::load(&self.channels.store, channel, self.server_name())?,
            };
            self.states.insert(channel.to_string(), state);
        }
        self.states
            .get_mut(channel)
            .ok_or_else(|| internal("channel state vanished"))
    }

    /// A channel the user belongs to.
    fn member_channel(&mut self, user: &str, channel: &str) -> ApiResult<&mut ChannelState> {
        let state = self.state(channel)?;
        if state.rec.is_none() {
            return Err(ApiError::new(
                ErrorCode::UnknownChannel,
                format!("there is no channel {channel}"),
            ));
        }
        if !state.members.contains_key(user) {
            return Err(not_member());
        }
        Ok(state)
    }

    /// Signs a new event of this server in `channel` and stages it with its fan-out.
    fn new_event(
        &mut self,
        positions: &mut Positions,
        channel: &str,
        sender: &str,
        content: EventContent,
    ) -> ApiResult<StoredEvent> {
        let origin = self.server_name().to_string();
        let channels = self.channels;
        let state = self.state(channel)?;
        let (seq, mver) = match state.rec.as_mut() {
            Some(rec) => {
                let seq = rec.next_seq;
                rec.next_seq += 1;
                (seq, rec.version)
            }
            None => (0, 0),
        };
        state.changed = true;
        let version_after = match &content {
            EventContent::Membership { version, .. } => *version,
            _ => mver,
        };
        let unsigned = SignedEvent {
            v: hearth_federation::event::EVENT_VERSION,
            channel: channel.to_string(),
            origin,
            sender: sender.to_string(),
            seq,
            ts: channels.clock.now(),
            // A membership event is made under the version it creates; a message under
            // the current one.
            mver: version_after,
            content,
            signatures: BTreeMap::new(),
        };
        // Signed only if it leaves this server (see `SignedEvent::seal`).
        let (event, id) = unsigned.seal().map_err(internal)?;
        let stored = StoredEvent { id, event };
        self.take_in(positions, &stored, true)
            .map_err(|r| ApiError::new(ErrorCode::BadRequest, r.wire()))?;
        // The create of a channel made its record; give it the sequence counter.
        if let Some(rec) = self.state(channel)?.rec.as_mut() {
            rec.next_seq = rec.next_seq.max(seq + 1);
        }
        Ok(stored)
    }

    /// Applies an event to its channel's state and stages it: stored once, an inbox
    /// entry per local member, and (for events made here) an outbox entry per other
    /// server that takes part.
    fn take_in(
        &mut self,
        positions: &mut Positions,
        stored: &StoredEvent,
        ours: bool,
    ) -> Result<(), Refusal> {
        let e = &stored.event;
        let server = self.server_name().to_string();
        let max_body = self.channels.limits.max_body_bytes;
        let state = self
            .state(&e.channel)
            .map_err(|err| Refusal::NotYet(err.message))?;
        // Only a membership change moves the members; a message needs no copy of them.
        let mut before: Option<BTreeSet<String>> = None;
        let hidden = match &e.content {
            EventContent::Membership { direct, .. } => {
                before = Some(state.members.keys().cloned().collect());
                state.apply_membership(&e.channel, e)?;
                *direct || state.is_direct()
            }
            EventContent::Message { body } => {
                if !ours && body.len() > max_body {
                    return Err(Refusal::Invalid(format!(
                        "the message is {} bytes; this server takes at most {max_body}",
                        body.len()
                    )));
                }
                if !ours {
                    let Some(rec) = state.rec.as_ref() else {
                        return Err(Refusal::NotYet(format!(
                            "channel {} is not known here yet",
                            e.channel
                        )));
                    };
                    if e.mver > rec.version {
                        return Err(Refusal::NotYet(format!(
                            "membership version {} of {} is not known here yet",
                            e.mver, e.channel
                        )));
                    }
                }
                false
            }
        };
        // A message from elsewhere is for the members at its membership version who
        // still are: one that arrives late (catch-up, a relay) reaches neither members
        // added since nor those who left, as with a local message.
        let members_then = if let (EventContent::Message { .. }, false) = (&e.content, ours) {
            let members_then = self
                .members_at(&e.channel, e.mver)
                .map_err(|err| Refusal::NotYet(err.message))?;
            if !members_then.contains(&e.sender) {
                return Err(Refusal::Invalid(format!(
                    "{} was not a member of {} at membership version {}",
                    e.sender, e.channel, e.mver
                )));
            }
            Some(members_then)
        } else {
            None
        };
        let state = self
            .state(&e.channel)
            .map_err(|err| Refusal::NotYet(err.message))?;
        if let Some(rec) = state.rec.as_mut()
            && e.origin == server
        {
            rec.next_seq = rec.next_seq.max(e.seq + 1);
        }
        // Who hears of it: for a membership change, the members after it and whoever
        // it removed.
        let audience: BTreeSet<String> = match (members_then, before) {
            (Some(then), _) => then
                .into_iter()
                .filter(|u| state.members.contains_key(u))
                .collect(),
            (None, Some(before)) => state.members.keys().cloned().chain(before).collect(),
            (None, None) => state.members.keys().cloned().collect(),
        };
        if !hidden {
            let event = Arc::new(client_event(stored, None));
            for user in audience
                .iter()
                .filter(|u| user_server(u) == Some(server.as_str()))
            {
                let pos = positions.next_pos();
                self.writes.inbox.push((
                    user.clone(),
                    pos,
                    e.channel.clone(),
                    stored.channel_pos(),
                ));
                self.deliveries.push(Delivery {
                    user: user.clone(),
                    pos,
                    event: event.clone(),
                });
            }
        }
        if ours {
            let servers: BTreeSet<String> = audience
                .iter()
                .filter_map(|u| user_server(u))
                .filter(|s| *s != server)
                .map(str::to_string)
                .collect();
            self.sent.push(Sent {
                id: stored.id.clone(),
                channel: e.channel.clone(),
                membership: is_membership(stored),
                servers,
            });
        }
        if let (
            EventContent::Membership {
                action: MembershipAction::Add,
                user,
                ..
            },
            true,
        ) = (
            &e.content,
            self.state(&e.channel)
                .map(|s| s.is_direct())
                .unwrap_or(false),
        ) {
            // The direct channel of a pair: the lowest id wins if two were made at once,
            // so every server maps the pair to the same channel.
            let creator = e.sender.clone();
            let existing = self
                .channels
                .store
                .direct_channel(&creator, user)
                .ok()
                .flatten();
            if existing.as_ref().is_none_or(|x| *x > e.channel) {
                self.writes
                    .direct_pairs
                    .push((creator, user.clone(), e.channel.clone()));
            }
        }
        self.writes.events.push(stored.clone());
        Ok(())
    }

    /// The members of a channel at a membership version, replaying its log.
    fn members_at(&mut self, channel: &str, version: u64) -> ApiResult<BTreeSet<String>> {
        let state = self.state(channel)?;
        if state.rec.as_ref().map(|r| r.version) == Some(version) {
            return Ok(state.members.keys().cloned().collect());
        }
        let mut replay = ChannelState {
            rec: None,
            members: BTreeMap::new(),
            member_changes: Vec::new(),
            changed: false,
            stored_version: 0,
            stored_servers: BTreeSet::new(),
        };
        let mut log = self
            .channels
            .store
            .membership_log(channel, 0, version as usize)?;
        // Include membership events staged earlier in this batch.
        log.extend(
            self.writes
                .events
                .iter()
                .filter(|s| s.event.channel == channel && is_membership(s))
                .cloned(),
        );
        for stored in log {
            if let EventContent::Membership { version: v, .. } = stored.event.content
                && v <= version
                && replay.rec.as_ref().map_or(0, |r| r.version) + 1 == v
            {
                let _ = replay.apply_membership(channel, &stored.event);
            }
        }
        Ok(replay.members.keys().cloned().collect())
    }

    /// Turns the batch into a write for [`Inboxes::write`].
    fn finish<T>(mut self, reply: T) -> ApiResult<(Staged<T>, Vec<String>)> {
        let remote_servers = self.queue_outboxes()?;
        let here = self.server_name().to_string();
        let mut settled = Vec::with_capacity(self.states.len());
        for (id, mut state) in self.states {
            if state.changed {
                for (user, rec) in state.member_changes.drain(..) {
                    self.writes.members.push((id.clone(), user, rec));
                }
                if let Some(rec) = &state.rec {
                    self.writes.channels.push((id.clone(), rec.clone()));
                }
            }
            // A channel not known here is not remembered: anyone can name one.
            if state.rec.is_some() {
                settled.push((id, state.settled(&here)));
            }
        }
        let pairs = self.writes.direct_pairs.clone();
        let known = self.channels.known.clone();
        let on_applied = move || {
            let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
            for (id, state) in settled {
                known.states.insert(id, state);
            }
            for (a, b, channel) in pairs {
                known.direct.insert(pair_of(&a, &b), channel);
            }
        };
        Ok((
            Staged {
                writes: self.writes,
                deliveries: self.deliveries,
                reply,
                on_applied: Some(Box::new(on_applied)),
            },
            remote_servers.into_iter().collect(),
        ))
    }

    /// Puts the events made here into the outboxes of the servers that need them.
    ///
    /// A message goes to the servers in its audience. A membership event goes to the
    /// servers of every member the channel has once this write is done, because a
    /// server judges later events against the whole membership log: the `create` of
    /// a channel comes before its remote members, yet they need it. A server that
    /// takes part from this write on is first sent the log stored before it.
    fn queue_outboxes(&mut self) -> ApiResult<BTreeSet<String>> {
        let here = self.server_name().to_string();
        let mut all = BTreeSet::new();
        let mut final_servers: HashMap<&str, BTreeSet<String>> = HashMap::new();
        for sent in &self.sent {
            if final_servers.contains_key(sent.channel.as_str()) {
                continue;
            }
            let Some(state) = self.states.get(&sent.channel) else {
                continue;
            };
            let servers = state.servers_other_than(&here);
            let newcomers: Vec<&String> = servers.difference(&state.stored_servers).collect();
            if !newcomers.is_empty() && state.stored_version > 0 {
                let log = self.channels.store.membership_log(
                    &sent.channel,
                    0,
                    state.stored_version as usize,
                )?;
                for s in &newcomers {
                    for earlier in &log {
                        self.writes.outbox.push(((*s).clone(), earlier.id.clone()));
                    }
                }
            }
            final_servers.insert(sent.channel.as_str(), servers);
        }
        for sent in &self.sent {
            let mut servers = sent.servers.clone();
            if sent.membership
                && let Some(members) = final_servers.get(sent.channel.as_str())
            {
                servers.extend(members.iter().cloned());
            }
            for s in servers {
                self.writes.outbox.push((s.clone(), sent.id.clone()));
                all.insert(s);
            }
        }
        Ok(all)
    }
}

impl Channels {
    /// Channel rules for this node; events are signed with `key`.
    pub fn new(
        store: Store,
        inboxes: Inboxes,
        accounts: Accounts,
        clock: Arc<Hlc>,
        limits: ChannelLimits,
        metrics: Metrics,
    ) -> Self {
        Channels {
            store,
            inboxes,
            accounts,
            clock,
            limits,
            metrics,
            remote: Arc::new(OnceLock::new()),
            sends: Arc::default(),
            known: Arc::default(),
        }
    }

    fn send_queue(&self) -> std::sync::MutexGuard<'_, SendQueue> {
        self.sends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the writes remember; only to be used under the inboxes' write lock.
    fn known(&self) -> std::sync::MutexGuard<'_, KnownChannels> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The direct channel of two users as stored; under the write lock.
    fn stored_direct_channel(&self, a: &str, b: &str) -> ApiResult<Option<String>> {
        if let Some(id) = self.known().direct.get(&pair_of(a, b)) {
            return Ok(Some(id.clone()));
        }
        let stored = self.store.direct_channel(a, b)?;
        if let Some(id) = &stored {
            self.known().direct.insert(pair_of(a, b), id.clone());
        }
        Ok(stored)
    }

    /// Connects the channels to federation (once, at start-up).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }

    /// Which servers this node federates with.
    pub fn policy(&self) -> &crate::config::FederationPolicy {
        self.accounts.policy()
    }

    /// The node's clock.
    pub fn clock(&self) -> &Hlc {
        &self.clock
    }

    fn server_name(&self) -> &str {
        self.accounts.server_name()
    }

    fn new_channel_id(&self) -> ApiResult<String> {
        let mut raw = [0u8; 12];
        getrandom::fill(&mut raw).map_err(internal)?;
        Ok(format!(
            "{}@{}",
            URL_SAFE_NO_PAD.encode(raw),
            self.server_name()
        ))
    }

    /// Runs a batch under the write lock, waits until it is durable, then wakes the
    /// outboxes of the servers it concerns.
    async fn write<T: Send>(
        &self,
        build: impl FnOnce(&mut Batch<'_>, &mut Positions) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let mut servers = Vec::new();
        let reply = self
            .inboxes
            .write(|positions| {
                let mut batch = Batch::new(self);
                let reply = build(&mut batch, positions)?;
                let (staged, remote) = batch.finish(reply)?;
                servers = remote;
                Ok(staged)
            })
            .await?;
        if !servers.is_empty()
            && let Some(remote) = self.remote.get()
        {
            remote.outbox_ready(servers);
        }
        Ok(reply)
    }

    /// Stages the direct channel of two users, creating it (with its two hidden
    /// membership events) if they have none.
    fn direct_channel(
        &self,
        batch: &mut Batch<'_>,
        positions: &mut Positions,
        a: &str,
        b: &str,
    ) -> ApiResult<String> {
        if let Some(id) = self.stored_direct_channel(a, b)?
            && batch.state(&id)?.rec.is_some()
        {
            return Ok(id);
        }
        if let Some(id) = batch
            .writes
            .direct_pairs
            .iter()
            .find(|(x, y, _)| (x == a && y == b) || (x == b && y == a))
            .map(|(_, _, id)| id.clone())
        {
            return Ok(id);
        }
        let id = self.new_channel_id()?;
        batch.new_event(
            positions,
            &id,
            a,
            EventContent::Membership {
                action: MembershipAction::Create,
                user: a.to_string(),
                version: 1,
                name: None,
                direct: true,
            },
        )?;
        batch.new_event(
            positions,
            &id,
            a,
            EventContent::Membership {
                action: MembershipAction::Add,
                user: b.to_string(),
                version: 2,
                name: None,
                direct: false,
            },
        )?;
        Ok(id)
    }

    /// Stores a message durably, fans it out to every local member's inbox and to
    /// every other server that takes part, and returns the ack. A repeat of an
    /// earlier key returns that earlier ack and stores nothing.
    #[instrument(skip(self, body), fields(user = %auth.user, key = %key))]
    pub async fn send(
        &self,
        auth: &DeviceAuth,
        key: &str,
        target: Target,
        body: &str,
    ) -> ApiResult<Ack> {
        if key.is_empty() || key.chars().count() > MAX_KEY_CHARS || key.contains('\0') {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("key must be 1 to {MAX_KEY_CHARS} characters"),
            ));
        }
        if body.trim().is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "the message is empty",
            ));
        }
        if body.len() > self.limits.max_body_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "the message is {} bytes; at most {} are allowed",
                    body.len(),
                    self.limits.max_body_bytes
                ),
            ));
        }
        let target = match target {
            Target::User(who) => {
                let other = self.accounts.resolve_user(&who)?;
                if other == auth.user {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRecipient,
                        "you cannot start a direct chat with yourself",
                    ));
                }
                Target::User(other)
            }
            t => t,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let lead = {
            let mut queue = self.send_queue();
            queue.waiting.push(QueuedSend {
                sender: auth.user.clone(),
                key: key.to_string(),
                target,
                body: body.to_string(),
                reply,
            });
            !std::mem::replace(&mut queue.draining, true)
        };
        if lead {
            match self.inboxes.wake_flusher() {
                FlusherWake::Woken => {}
                FlusherWake::Busy => {
                    let channels = self.clone();
                    let runtime = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || channels.drain_sends(&runtime));
                }
                FlusherWake::Gone => {
                    // The node is stopping: answer whatever is queued.
                    let waiting = {
                        let mut queue = self.send_queue();
                        queue.draining = false;
                        std::mem::take(&mut queue.waiting)
                    };
                    for send in waiting {
                        let _ = send.reply.send(Err(shutting_down()));
                    }
                }
            }
        }
        let ack = answer
            .await
            .map_err(|_| internal("a queued send was dropped"))??;
        self.metrics.messages.inc();
        Ok(ack)
    }

    /// The flusher's hook that stages queued sends; set once at start-up, on the
    /// runtime the node serves on.
    pub fn send_rounds(&self) -> Arc<dyn BeforeFlush> {
        Arc::new(SendRounds {
            channels: Channels {
                inboxes: self.inboxes.detached(),
                ..self.clone()
            },
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Stages queued sends, round after round, until none are left. Runs on a
    /// blocking thread: staging is synchronous work under the write lock.
    fn drain_sends(&self, runtime: &tokio::runtime::Handle) {
        let _drainer = Drainer(&self.sends);
        loop {
            let sends = {
                let mut queue = self.send_queue();
                if queue.waiting.is_empty() {
                    queue.draining = false;
                    return;
                }
                let round = queue.waiting.len().min(MAX_SENDS_PER_ROUND);
                queue.waiting.drain(..round).collect::<Vec<_>>()
            };
            self.stage_sends(sends, runtime);
        }
    }

    /// Stages a round of sends in one write; each sender is answered once it is
    /// durable, on the flusher's thread (or at once with the write's error).
    fn stage_sends(&self, sends: Vec<QueuedSend>, runtime: &tokio::runtime::Handle) {
        let mut servers = Vec::new();
        let applied = self.inboxes.apply(|positions| {
            let mut batch = Batch::new(self);
            let answers: Vec<ApiResult<Ack>> = sends
                .iter()
                .map(|s| self.stage_send(&mut batch, positions, s))
                .collect();
            let (staged, remote) = batch.finish(answers)?;
            servers = remote;
            Ok(staged)
        });
        match applied {
            Ok((ticket, answers)) => {
                let replies: Vec<_> = sends.into_iter().map(|send| send.reply).collect();
                let remote = self.remote.get().cloned();
                let runtime = runtime.clone();
                self.inboxes.after_durable(
                    ticket,
                    Box::new(move |durable| {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(if durable { answer } else { Err(not_durable()) });
                        }
                        // Outboxes wake once the events are durable: a crash must not
                        // take back an event another server already holds.
                        if durable
                            && !servers.is_empty()
                            && let Some(remote) = remote
                        {
                            let _runtime = runtime.enter();
                            remote.outbox_ready(servers);
                        }
                    }),
                );
            }
            Err(e) => {
                for send in sends {
                    let _ = send.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Stages one message in a round: its event, fan-out and idempotency record. A
    /// repeat of an earlier key (stored, or earlier in this round) answers that
    /// earlier ack and stages nothing. A refusal stages nothing either: every check
    /// comes before the first change.
    fn stage_send(
        &self,
        batch: &mut Batch<'_>,
        positions: &mut Positions,
        send: &QueuedSend,
    ) -> ApiResult<Ack> {
        let QueuedSend {
            sender,
            key,
            target,
            body,
            ..
        } = send;
        let earlier = batch
            .writes
            .acks
            .iter()
            .find(|(u, k, _)| u == sender && k == key)
            .map(|(_, _, ack)| ack.clone());
        let earlier = match earlier {
            Some(ack) => Some(ack),
            None => self.store.ack(sender, key)?,
        };
        if let Some(prev) = earlier {
            return Ok(Ack {
                event_id: prev.event_id,
                channel: prev.channel,
                ts: prev.ts,
            });
        }
        let channel = match target {
            Target::User(other) => self.direct_channel(batch, positions, sender, other)?,
            Target::Channel(id) => {
                batch.member_channel(sender, id)?;
                id.clone()
            }
        };
        let stored = batch.new_event(
            positions,
            &channel,
            sender,
            EventContent::Message { body: body.clone() },
        )?;
        let ack = AckRecord {
            event_id: stored.id.clone(),
            channel: channel.clone(),
            ts: stored.event.ts,
        };
        batch.writes.acks.push((sender.clone(), key.clone(), ack));
        Ok(Ack {
            event_id: stored.id,
            channel,
            ts: stored.event.ts,
        })
    }

    /// Finds or creates the direct channel with another user.
    pub async fn open_direct(&self, auth: &DeviceAuth, who: &str) -> ApiResult<ChannelSummary> {
        let other = self.accounts.resolve_user(who)?;
        if other == auth.user {
            return Err(ApiError::new(
                ErrorCode::InvalidRecipient,
                "you cannot start a direct chat with yourself",
            ));
        }
        let id = self
            .write(|batch, positions| self.direct_channel(batch, positions, &auth.user, &other))
            .await?;
        self.summary(&auth.user, &id)
    }

    /// Creates a group with its creator as admin and the given members.
    #[instrument(skip(self, members), fields(user = %auth.user))]
    pub async fn create_group(
        &self,
        auth: &DeviceAuth,
        name: &str,
        members: &[String],
    ) -> ApiResult<ChannelSummary> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "a group name is 1 to 64 characters",
            ));
        }
        let mut others = BTreeSet::new();
        for who in members {
            let user = self.accounts.resolve_user(who)?;
            if user != auth.user {
                others.insert(user);
            }
        }
        if others.len() + 1 > self.limits.max_group_members {
            return Err(group_full(self.limits.max_group_members));
        }
        let creator = auth.user.clone();
        let id = self.new_channel_id()?;
        self.write(|batch, positions| {
            batch.new_event(
                positions,
                &id,
                &creator,
                EventContent::Membership {
                    action: MembershipAction::Create,
                    user: creator.clone(),
                    version: 1,
                    name: Some(name.to_string()),
                    direct: false,
                },
            )?;
            for (i, user) in others.iter().enumerate() {
                batch.new_event(
                    positions,
                    &id,
                    &creator,
                    EventContent::Membership {
                        action: MembershipAction::Add,
                        user: user.clone(),
                        version: i as u64 + 2,
                        name: None,
                        direct: false,
                    },
                )?;
            }
            Ok(())
        })
        .await?;
        self.summary(&auth.user, &id)
    }

    /// Adds a user to a group (admins only).
    #[instrument(skip(self), fields(user = %auth.user))]
    pub async fn add_member(
        &self,
        auth: &DeviceAuth,
        channel: &str,
        who: &str,
    ) -> ApiResult<MemberList> {
        let user = self.accounts.resolve_user(who)?;
        self.change(&auth.user, channel, &user, MembershipAction::Add)
            .await?;
        self.members(&auth.user, channel)
    }

    /// Removes a member from a group (admins only; removing oneself is leaving).
    #[instrument(skip(self), fields(user = %auth.user))]
    pub async fn remove_member(
        &self,
        auth: &DeviceAuth,
        channel: &str,
        who: &str,
    ) -> ApiResult<MemberList> {
        let user = self.accounts.resolve_user(who)?;
        let action = if user == auth.user {
            MembershipAction::Leave
        } else {
            MembershipAction::Remove
        };
        self.change(&auth.user, channel, &user, action).await?;
        self.member_list(channel)
    }

    /// Leaves a group.
    pub async fn leave(&self, auth: &DeviceAuth, channel: &str) -> ApiResult<()> {
        self.change(&auth.user, channel, &auth.user, MembershipAction::Leave)
            .await
    }

    /// A membership change by a local user: made here if this is the channel's home
    /// server, otherwise asked of the home server.
    async fn change(
        &self,
        actor: &str,
        channel: &str,
        user: &str,
        action: MembershipAction,
    ) -> ApiResult<()> {
        let home = home_server(channel).unwrap_or_default();
        if home == self.server_name() {
            return self.change_as_home(actor, channel, user, action).await;
        }
        // Refuse early what the local view already shows to be wrong.
        self.channel_of_member(actor, channel)?;
        let Some(remote) = self.remote.get() else {
            return Err(ApiError::new(
                ErrorCode::UnknownChannel,
                "this channel's home server is elsewhere and federation is off",
            ));
        };
        remote
            .change_membership(
                home.to_string(),
                channel.to_string(),
                actor.to_string(),
                action,
                user.to_string(),
            )
            .await
    }

    /// A membership change judged and made by this server as the channel's home.
    /// `actor` may be a user of another server (asking through federation).
    pub async fn change_as_home(
        &self,
        actor: &str,
        channel: &str,
        user: &str,
        action: MembershipAction,
    ) -> ApiResult<()> {
        self.write(|batch, positions| {
            let max = self.limits.max_group_members;
            let state = batch.member_channel(actor, channel)?;
            let Some(rec) = state.rec.clone() else {
                return Err(ApiError::new(ErrorCode::UnknownChannel, "no such channel"));
            };
            if rec.kind == ChannelKind::Direct {
                return Err(ApiError::new(
                    ErrorCode::DirectChannel,
                    "a direct chat always has exactly its two members",
                ));
            }
            let is_member = state.members.contains_key(user);
            match action {
                MembershipAction::Leave => {
                    if actor != user {
                        return Err(ApiError::new(
                            ErrorCode::BadRequest,
                            "only you can leave for yourself",
                        ));
                    }
                }
                _ => {
                    if !matches!(state.members.get(actor), Some(m) if m.role == Role::Admin) {
                        return Err(ApiError::new(
                            ErrorCode::NotChannelAdmin,
                            "only an admin of this group can do that",
                        ));
                    }
                }
            }
            match action {
                MembershipAction::Add if is_member => {
                    return Err(ApiError::new(
                        ErrorCode::AlreadyMember,
                        format!("{user} is already a member"),
                    ));
                }
                MembershipAction::Add if state.members.len() >= max => return Err(group_full(max)),
                MembershipAction::Remove | MembershipAction::Leave if !is_member => {
                    return Err(ApiError::new(
                        ErrorCode::NotMember,
                        format!("{user} is not a member of this channel"),
                    ));
                }
                MembershipAction::Create => {
                    return Err(ApiError::new(ErrorCode::BadRequest, "not a change"));
                }
                _ => {}
            }
            batch.new_event(
                positions,
                channel,
                actor,
                EventContent::Membership {
                    action,
                    user: user.to_string(),
                    version: rec.version + 1,
                    name: None,
                    direct: false,
                },
            )?;
            Ok(())
        })
        .await
    }

    /// Takes in events from another server, in order, each judged on its own: the
    /// result says for each whether it was taken in (or already held) or why not.
    /// Signatures are checked by the caller before this.
    pub async fn take_in(&self, events: Vec<StoredEvent>) -> ApiResult<Vec<Result<(), Refusal>>> {
        let results = self
            .write(|batch, positions| {
                let mut results = Vec::with_capacity(events.len());
                let mut seen = BTreeSet::new();
                for stored in &events {
                    if seen.contains(&stored.id) || self.store.has_event(&stored.id)? {
                        results.push(Ok(()));
                        continue;
                    }
                    let result = batch.take_in(positions, stored, false);
                    if result.is_ok() {
                        seen.insert(stored.id.clone());
                        self.clock.observe(stored.event.ts);
                    }
                    results.push(result);
                }
                Ok(results)
            })
            .await?;
        Ok(results)
    }

    /// A channel the user belongs to.
    fn channel_of_member(&self, user: &str, channel: &str) -> ApiResult<ChannelRecord> {
        let Some(rec) = self.store.channel(channel)? else {
            return Err(ApiError::new(
                ErrorCode::UnknownChannel,
                format!("there is no channel {channel}"),
            ));
        };
        if self.store.member(channel, user)?.is_none() {
            return Err(not_member());
        }
        Ok(rec)
    }

    /// A channel as its member `user` sees it.
    pub fn summary(&self, user: &str, channel: &str) -> ApiResult<ChannelSummary> {
        let rec = self.channel_of_member(user, channel)?;
        self.summarise(user, channel, rec)
    }

    fn summarise(
        &self,
        user: &str,
        channel: &str,
        rec: ChannelRecord,
    ) -> ApiResult<ChannelSummary> {
        let direct = rec.kind == ChannelKind::Direct;
        let name = match rec.kind {
            ChannelKind::Group => rec.name,
            ChannelKind::Direct => self
                .store
                .members(channel)?
                .into_iter()
                .map(|(u, _)| u)
                .find(|m| m != user)
                .unwrap_or_default(),
        };
        let last = self
            .store
            .last_event(channel, 8, |e| !(direct && is_membership(e)))?;
        Ok(ChannelSummary {
            id: channel.to_string(),
            kind: rec.kind,
            name,
            member_count: rec.member_count,
            version: rec.version,
            last_event: last.map(|e| client_event(&e, None)),
        })
    }

    /// The user's channels, most recently active first.
    pub fn list(&self, user: &str) -> ApiResult<Vec<ChannelSummary>> {
        let mut out = Vec::new();
        for id in self.store.user_channels(user)? {
            if let Some(rec) = self.store.channel(&id)? {
                let created = rec.created_at;
                let summary = self.summarise(user, &id, rec)?;
                let active = summary.last_event.as_ref().map_or(created, |e| e.ts);
                out.push((active, summary));
            }
        }
        out.sort_by_key(|(active, _)| std::cmp::Reverse(*active));
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    /// The members of a channel the caller belongs to.
    pub fn members(&self, user: &str, channel: &str) -> ApiResult<MemberList> {
        self.channel_of_member(user, channel)?;
        self.member_list(channel)
    }

    fn member_list(&self, channel: &str) -> ApiResult<MemberList> {
        let Some(rec) = self.store.channel(channel)? else {
            return Err(ApiError::new(
                ErrorCode::UnknownChannel,
                format!("there is no channel {channel}"),
            ));
        };
        Ok(MemberList {
            version: rec.version,
            members: self
                .store
                .members(channel)?
                .into_iter()
                .map(|(user, m)| Member {
                    user,
                    role: m.role,
                    joined_at: m.joined_at,
                })
                .collect(),
        })
    }

    /// One page of history, newest first.
    pub fn history(
        &self,
        user: &str,
        channel: &str,
        before: Option<&str>,
        limit: Option<usize>,
    ) -> ApiResult<HistoryPage> {
        let rec = self.channel_of_member(user, channel)?;
        let direct = rec.kind == ChannelKind::Direct;
        let before = match before {
            Some(c) => Some(ChannelPos::from_cursor(c).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidField,
                    "before is not a cursor this server gave out",
                )
            })?),
            None => None,
        };
        let limit = limit.unwrap_or(DEFAULT_HISTORY_PAGE);
        if limit == 0 || limit > MAX_HISTORY_PAGE {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("limit must be 1 to {MAX_HISTORY_PAGE}"),
            ));
        }
        // One more than asked tells whether an older page exists; a direct channel's
        // two hidden membership events are dropped before the page is cut.
        let mut page = self.store.history(channel, before.as_ref(), limit + 3)?;
        page.retain(|(_, e)| !(direct && is_membership(e)));
        let more = page.len() > limit;
        page.truncate(limit);
        let next = more
            .then(|| page.last().map(|(pos, _)| pos.to_cursor()))
            .flatten();
        Ok(HistoryPage {
            events: page.iter().map(|(_, e)| client_event(e, None)).collect(),
            next,
        })
    }
}

/// Maps a refusal of a structurally bad event.
pub fn refusal_of(e: &EventError) -> Refusal {
    Refusal::Invalid(e.to_string())
}
