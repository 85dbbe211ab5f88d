//! The glue between the node and the federation network: who other servers are, what goes out, what comes in, and catching up.
//!
//! - [`directory`]: names, peer ids and pinned keys of other servers.
//! - Outbox workers: one per destination server, reading the persistent outbox
//!   and pushing events over the destination's push link until it has them
//!   (backoff with jitter; an ordinary request when the link fails, and through a
//!   third server when the destination cannot be reached directly).
//! - Push links from other servers, each answered by a task of its own.
//! - Inbound requests: `Hello` (descriptors), `Push` (events, verified before
//!   anything else), `Heads`/`MembershipLog`/`SharedChannels` (catch-up, answered
//!   from what this server holds, whoever made it), `ChangeMembership` (this server
//!   as a channel's home), `Forward` (relaying for others).
//! - Catch-up rounds with each server on connect and periodically.
//! - Presence: announcements of local users over gossipsub; remote ones checked
//!   and handed to the presence service.

pub mod directory;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use hearth_client_api::ErrorCode;
use hearth_federation::clock::wall_ms;
use hearth_federation::event::{MembershipAction, home_server, user_server};
use hearth_federation::network::{self, IncomingLinks, Network, NetworkConfig, NetworkEvent};
use hearth_federation::protocol::{
    FedRequest, FedResponse, MAX_EVENTS_PER_MESSAGE, PresenceAnnouncement, ServerDescriptor,
};
use hearth_federation::push_link;
use hearth_federation::{NodeIdentity, SignedEvent};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use self::directory::{Directory, ServerEntry};
use crate::channels::{Channels, Refusal, Remote};
use crate::config::Config;
use crate::error::{ApiError, ApiResult, NodeError};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::store::{Store, StoredEvent};

/// Invalid events from one peer within [`MISBEHAVIOUR_WINDOW`] before it is cut off.
const MISBEHAVIOUR_LIMIT: u32 = 50;
const MISBEHAVIOUR_WINDOW: Duration = Duration::from_secs(60);
/// How long a misbehaving peer stays cut off.
const BAN_TIME: Duration = Duration::from_secs(600);
/// What an outbox worker does next.
enum NextPush {
    /// Push these events; `keys` are their outbox entries, `upto` the newest.
    Ready {
        upto: Vec<u8>,
        keys: Vec<Vec<u8>>,
        events: Vec<String>,
    },
    /// The outbox holds nothing more to send now.
    Nothing,
    /// The worker cannot go on (the runtime is shutting down).
    Stopped,
}

/// Outbox entries read for a push.
struct OutboxRead {
    /// Each entry's key and its event, signed for sending, oldest first.
    ready: Vec<(Vec<u8>, String)>,
    /// Entries whose event is no longer stored.
    gone: Vec<Vec<u8>>,
    /// Entries older than the outbox retention: the destination gets their events
    /// by catch-up when it is back.
    expired: Vec<Vec<u8>>,
}

/// A push that came back: its outbox entries, in the order of its events, and the answer.
struct PushOutcome {
    keys: Vec<Vec<u8>>,
    response: Result<FedResponse, ApiError>,
}

/// Pushes to one server in flight at once (see `Federation::deliver`).
const PUSHES_IN_FLIGHT: usize = 4;
/// Pushes of at most this many events are read and signed on the outbox worker's
/// own task (about 30 µs per event); larger ones on a blocking thread. At low
/// rates most pushes carry one or two events, and handing each to another thread
/// and back cost more than the work (docs/benchmarks.md).
const INLINE_PUSH_EVENTS: usize = 4;
/// Outbox retry delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Descriptors are valid this long.
const DESCRIPTOR_LIFETIME_MS: u64 = 24 * 3600 * 1000;
/// Largest event accepted from another server (JSON bytes); bodies are further held
/// to this node's `max_body_bytes`.
const MAX_EVENT_BYTES: usize = 32 * 1024;
/// How long a DHT look-up of an unknown server may take.
const DHT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// DHT key prefix of server descriptors.
const DESCRIPTOR_KEY: &str = "/hearth/server/";

struct Shared {
    name: String,
    identity: NodeIdentity,
    network: Network,
    store: Store,
    channels: Channels,
    presence: Presence,
    metrics: Metrics,
    directory: Directory,
    outboxes: Mutex<HashMap<String, Arc<Notify>>>,
    misbehaviour: Mutex<HashMap<PeerId, (u32, Instant)>>,
    tasks: Mutex<JoinSet<()>>,
    stop: watch::Receiver<bool>,
    catchup_every: Duration,
    presence_every: Duration,
    outbox_retention: Duration,
}

/// A cheap handle to the node's federation.
#[derive(Clone)]
pub struct Federation {
    shared: Arc<Shared>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "federation request failed");
    ApiError::new(
        ErrorCode::Internal,
        "the other server could not be reached; try again",
    )
}

fn refused(code: &str, message: impl Into<String>) -> FedResponse {
    FedResponse::Refused {
        code: code.to_string(),
        message: message.into(),
    }
}

impl Federation {
    /// Starts the network and the federation tasks. They end when `stop` turns true.
    pub async fn start(
        config: &Config,
        identity: NodeIdentity,
        store: Store,
        channels: Channels,
        presence: Presence,
        metrics: Metrics,
        stop: watch::Receiver<bool>,
    ) -> Result<Federation, NodeError> {
        let parse = |what: &str, a: &String| -> Result<Multiaddr, NodeError> {
            a.parse()
                .map_err(|_| NodeError::Config(format!("{what} {a:?} is not a multiaddress")))
        };
        let listen = config
            .federation_listen
            .iter()
            .map(|a| parse("federation_listen", a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut bootstrap = config
            .bootstrap
            .iter()
            .map(|a| parse("bootstrap", a))
            .collect::<Result<Vec<_>, _>>()?;
        for peer in &config.peers {
            if let Some(addr) = &peer.addr {
                bootstrap.push(parse("peer address", addr)?);
            }
        }
        let (network, events, event_loop) = network::new(
            &identity,
            NetworkConfig {
                listen,
                bootstrap,
                mdns: config.mdns,
                ..NetworkConfig::default()
            },
        )
        .map_err(|e| NodeError::Config(e.to_string()))?;
        let links = network
            .incoming_links()
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let directory = Directory::new(
            store.clone(),
            config.policy(),
            config.strict_keys,
            &config.peers,
        );
        for (_, entry) in directory.all() {
            for addr in &entry.addrs {
                let _ = network.add_address(entry.peer, addr.clone()).await;
            }
        }
        let fed = Federation {
            shared: Arc::new(Shared {
                name: config.server_name.clone(),
                identity,
                network,
                store,
                channels: channels.clone(),
                presence: presence.clone(),
                metrics,
                directory,
                outboxes: Mutex::new(HashMap::new()),
                misbehaviour: Mutex::new(HashMap::new()),
                tasks: Mutex::new(JoinSet::new()),
                stop,
                catchup_every: Duration::from_secs(config.catchup_interval_secs),
                presence_every: Duration::from_secs(config.presence_refresh_secs),
                outbox_retention: Duration::from_secs(config.outbox_retention_secs),
            }),
        };
        // A weak link: the channels must not keep federation (and through it the
        // store) alive after the node stops.
        channels.set_remote(Arc::new(Link(Arc::downgrade(&fed.shared))));
        let (announce_tx, announce_rx) = mpsc::unbounded_channel();
        presence.set_relay(announce_tx);
        fed.spawn(event_loop.run());
        fed.spawn(fed.clone().dispatch(events));
        fed.spawn(fed.clone().serve_links(links));
        fed.spawn(fed.clone().announce_presence(announce_rx));
        fed.spawn(fed.clone().periodic());
        match fed.shared.store.outbox_destinations() {
            Ok(dests) => fed.outbox_ready(dests),
            Err(e) => warn!(error = %e, "pending outboxes could not be read"),
        }
        Ok(fed)
    }

    /// Runs a task that ends when federation stops (every task holding the shared
    /// state goes through here, so stopping releases the store).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.identity.peer_id
    }

    /// Addresses other servers can dial, each ending in `/p2p/<peer id>`.
    pub async fn addresses(&self) -> Vec<Multiaddr> {
        let peer = self.peer_id();
        self.shared
            .network
            .listen_addrs()
            .await
            .into_iter()
            .map(|a| a.with(Protocol::P2p(peer)))
            .collect()
    }

    /// This node's public key (unpadded base64), as other servers pin it.
    pub fn public_key(&self) -> String {
        self.shared.identity.key.public_key_base64()
    }

    /// Servers this node has verified and pinned.
    pub fn known_servers(&self) -> Vec<String> {
        self.shared
            .directory
            .all()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// Pushes events exactly as given to a server and returns its answer. For tools
    /// and tests that check how servers treat what they are sent; the node itself
    /// pushes through its outboxes.
    pub async fn push_raw(&self, server: &str, events: Vec<String>) -> ApiResult<FedResponse> {
        self.push(server, events).await
    }

    /// Signs an event as this server, exactly as given (no rules applied), and
    /// returns its JSON. For tools and tests that build what a misbehaving server
    /// could send.
    pub fn sign_raw(&self, event: SignedEvent) -> Option<String> {
        event
            .sign(&self.shared.identity.key)
            .ok()
            .map(|(e, _)| e.to_json())
    }

    /// Stops the network and waits for the federation tasks.
    pub async fn stop(&self) {
        self.shared.network.shutdown().await;
        let mut tasks =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn descriptor(&self) -> String {
        let addrs = self
            .shared
            .network
            .listen_addrs()
            .await
            .iter()
            .map(ToString::to_string)
            .collect();
        ServerDescriptor::signed(
            &self.shared.name,
            &self.shared.identity.peer_id,
            &self.shared.identity.key,
            addrs,
            wall_ms() + DESCRIPTOR_LIFETIME_MS,
        )
        .unwrap_or_default()
    }

    // ---- events from the network ----

    /// Answers the push links other servers open, each from a task of its own.
    async fn serve_links(self, mut incoming: IncomingLinks) {
        let mut stop = self.shared.stop.clone();
        loop {
            let link = tokio::select! {
                next = incoming.next() => match next {
                    Some(link) => link,
                    None => return,
                },
                _ = stop.changed() => return,
            };
            let peer = link.peer;
            debug!(%peer, "push link from peer");
            let me = self.clone();
            self.spawn(push_link::serve_link(link, move |request| {
                let me = me.clone();
                Box::pin(async move { me.answer(peer, request).await })
            }));
        }
    }

    async fn dispatch(self, mut events: mpsc::Receiver<NetworkEvent>) {
        let mut stop = self.shared.stop.clone();
        loop {
            let event = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => return },
                _ = stop.changed() => return,
            };
            match event {
                NetworkEvent::Request {
                    peer,
                    request,
                    channel,
                } => {
                    let me = self.clone();
                    self.spawn(async move {
                        let response = me.answer(peer, request).await;
                        me.shared.network.respond(channel, response).await;
                    });
                }
                NetworkEvent::Gossip { source, id, data } => {
                    let accept = self.on_presence(&data);
                    self.shared
                        .network
                        .validate_gossip(id, source, accept)
                        .await;
                }
                NetworkEvent::Connected(peer) => {
                    self.shared.metrics.federation_peers.inc();
                    let me = self.clone();
                    self.spawn(async move { me.introduce(peer).await });
                }
                NetworkEvent::Disconnected(_) => {
                    self.shared.metrics.federation_peers.dec();
                }
                NetworkEvent::Listening(addr) => {
                    info!(
                        "federation reachable at {}",
                        addr.with(Protocol::P2p(self.shared.identity.peer_id))
                    );
                    let me = self.clone();
                    self.spawn(async move { me.publish_descriptor().await });
                }
            }
        }
    }

    /// Exchanges descriptors with a newly connected peer, then catches up with it
    /// and wakes its outbox.
    async fn introduce(&self, peer: PeerId) {
        let hello = FedRequest::Hello {
            descriptor: self.descriptor().await,
        };
        match self.shared.network.request(peer, hello).await {
            Ok(FedResponse::Hello { descriptor }) => {
                match self.shared.directory.learn(&descriptor, wall_ms()) {
                    Ok((name, entry)) if entry.peer == peer => {
                        info!(server = %name, %peer, "server connected");
                        self.after_hello(name).await;
                    }
                    Ok(_) => self.misbehaved(peer, "descriptor of another peer").await,
                    Err(e) => {
                        warn!(%peer, error = %e, "server refused");
                        self.shared.metrics.federation_refused.inc();
                    }
                }
            }
            Ok(other) => debug!(%peer, ?other, "unexpected answer to hello"),
            Err(e) => debug!(%peer, error = %e, "hello failed"),
        }
    }

    async fn after_hello(&self, name: String) {
        self.outbox_ready(vec![name.clone()]);
        self.catch_up_with(&name).await;
        self.refresh_presence().await;
    }

    async fn publish_descriptor(&self) {
        let d = self.descriptor().await;
        let key = format!("{DESCRIPTOR_KEY}{}", self.shared.name).into_bytes();
        let _ = self.shared.network.put_record(key, d.into_bytes()).await;
    }

    /// Finds a server by name: the directory, else the DHT.
    async fn locate(&self, name: &str) -> Option<ServerEntry> {
        if let Some(e) = self.shared.directory.entry(name) {
            return Some(e);
        }
        let key = format!("{DESCRIPTOR_KEY}{name}").into_bytes();
        // Bounded: an outbox worker waiting here cannot hear that the server has just
        // introduced itself.
        let record = tokio::time::timeout(DHT_LOOKUP_TIMEOUT, self.shared.network.get_record(key))
            .await
            .ok()?
            .ok()?;
        let json = String::from_utf8(record).ok()?;
        match self.shared.directory.learn(&json, wall_ms()) {
            Ok((found, entry)) if found == name => {
                for addr in &entry.addrs {
                    let _ = self
                        .shared
                        .network
                        .add_address(entry.peer, addr.clone())
                        .await;
                }
                Some(entry)
            }
            Ok(_) => None,
            Err(e) => {
                warn!(server = %name, error = %e, "descriptor from the DHT refused");
                self.shared.metrics.federation_refused.inc();
                None
            }
        }
    }

    async fn misbehaved(&self, peer: PeerId, what: &str) {
        self.shared.metrics.federation_refused.inc();
        let cut_off = {
            let mut m = self
                .shared
                .misbehaviour
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let entry = m.entry(peer).or_insert((0, Instant::now()));
            if entry.1.elapsed() > MISBEHAVIOUR_WINDOW {
                *entry = (0, Instant::now());
            }
            entry.0 += 1;
            entry.0 == MISBEHAVIOUR_LIMIT
        };
        if cut_off {
            warn!(%peer, what, "peer keeps sending invalid data: cut off for {} s", BAN_TIME.as_secs());
            self.shared.network.ban(peer).await;
            let network = self.shared.network.clone();
            self.spawn(async move {
                tokio::time::sleep(BAN_TIME).await;
                network.unban(peer).await;
            });
        } else {
            debug!(%peer, what, "invalid data from peer");
        }
    }

    // ---- answering requests ----

    async fn answer(&self, peer: PeerId, request: FedRequest) -> FedResponse {
        if let FedRequest::Hello { descriptor } = &request {
            return match self.shared.directory.learn(descriptor, wall_ms()) {
                Ok((name, entry)) if entry.peer == peer => {
                    let me = self.clone();
                    self.spawn(async move { me.after_hello(name).await });
                    FedResponse::Hello {
                        descriptor: self.descriptor().await,
                    }
                }
                Ok(_) => {
                    self.misbehaved(peer, "descriptor of another peer").await;
                    refused("bad_descriptor", "the descriptor names another peer")
                }
                Err(e) => {
                    warn!(%peer, error = %e, "server refused");
                    self.shared.metrics.federation_refused.inc();
                    refused("untrusted", e.to_string())
                }
            };
        }
        let Some(from) = self.shared.directory.name_of(&peer) else {
            return refused("hello_first", "introduce yourself with hello first");
        };
        match request {
            FedRequest::Hello { .. } => FedResponse::Done,
            FedRequest::Push { events } => self.on_push(peer, events).await,
            FedRequest::Heads { channel, heads } => self.on_heads(&from, &channel, heads),
            FedRequest::MembershipLog {
                channel,
                after_version,
            } => self.on_membership_log(&from, &channel, after_version),
            FedRequest::SharedChannels => self.on_shared_channels(&from),
            FedRequest::ChangeMembership {
                channel,
                actor,
                action,
                user,
            } => {
                self.on_change_membership(&from, channel, actor, &action, user)
                    .await
            }
            FedRequest::Forward { to, request } => {
                if matches!(
                    *request,
                    FedRequest::Forward { .. } | FedRequest::Hello { .. }
                ) {
                    return refused("bad_request", "only one hop, and not hello");
                }
                match self.locate(&to).await {
                    Some(entry) => match self.shared.network.request(entry.peer, *request).await {
                        Ok(r) => r,
                        Err(e) => refused("unreachable", e.to_string()),
                    },
                    None => refused("unknown_server", format!("{to} is not known here")),
                }
            }
        }
    }

    /// Verifies pushed events one by one and takes in the valid ones.
    async fn on_push(&self, peer: PeerId, events: Vec<String>) -> FedResponse {
        if events.len() > MAX_EVENTS_PER_MESSAGE {
            self.misbehaved(peer, "oversized push").await;
            return refused(
                "too_large",
                format!("at most {MAX_EVENTS_PER_MESSAGE} events per push"),
            );
        }
        let (results, _) = self.verify_and_take_in(Some(peer), events).await;
        let mut refused_list = Vec::new();
        let mut accepted = 0u32;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => accepted += 1,
                Err(reason) => refused_list.push((i as u32, reason.wire())),
            }
        }
        FedResponse::Pushed {
            accepted,
            refused: refused_list,
        }
    }

    /// Parses and verifies events (any origin: a peer may hand on what others made),
    /// then takes the valid ones in. Returns one result per event, and the channels
    /// whose membership this server lacks.
    async fn verify_and_take_in(
        &self,
        from: Option<PeerId>,
        events: Vec<String>,
    ) -> (Vec<Result<(), Refusal>>, BTreeSet<String>) {
        let now = wall_ms();
        let mut results: Vec<Option<Result<(), Refusal>>> = vec![None; events.len()];
        let mut valid = Vec::new();
        let mut index = Vec::new();
        for (i, json) in events.iter().enumerate() {
            let checked = (if json.len() > MAX_EVENT_BYTES {
                Err(Refusal::Invalid(format!(
                    "an event is at most {MAX_EVENT_BYTES} bytes"
                )))
            } else {
                Ok(())
            })
            .and_then(|()| {
                SignedEvent::parse(json, now).map_err(|e| Refusal::Invalid(e.to_string()))
            })
            .and_then(|(event, id)| {
                if !self.shared.channels_policy_allows(&event.origin) {
                    return Err(Refusal::Invalid(format!(
                        "federation with {} is not allowed",
                        event.origin
                    )));
                }
                let own = (event.origin == self.shared.name)
                    .then(|| self.shared.identity.key.verifying_key());
                let Some(key) = own.or_else(|| self.shared.directory.key_of(&event.origin)) else {
                    return Err(Refusal::NotYet(format!(
                        "no key known for {}",
                        event.origin
                    )));
                };
                event
                    .verify(&key)
                    .map_err(|e| Refusal::Invalid(e.to_string()))?;
                Ok(StoredEvent { id, event })
            });
            match checked {
                Ok(stored) => {
                    valid.push(stored);
                    index.push(i);
                }
                Err(r) => {
                    if let (Refusal::Invalid(reason), Some(peer)) = (&r, from) {
                        warn!(%peer, %reason, "refused an event");
                        self.misbehaved(peer, "invalid event").await;
                    }
                    results[i] = Some(Err(r));
                }
            }
        }
        let mut missing_membership = BTreeSet::new();
        if !valid.is_empty() {
            let channels: Vec<String> = valid.iter().map(|s| s.event.channel.clone()).collect();
            match self.shared.channels.take_in(valid).await {
                Ok(taken) => {
                    for ((i, r), channel) in index.into_iter().zip(taken).zip(channels) {
                        match &r {
                            Ok(()) => {
                                self.shared.metrics.federation_in.inc();
                            }
                            Err(Refusal::NotYet(_)) => {
                                missing_membership.insert(channel);
                            }
                            Err(Refusal::Invalid(reason)) => {
                                self.shared.metrics.federation_refused.inc();
                                warn!(%reason, "refused an event");
                            }
                        }
                        results[i] = Some(r);
                    }
                }
                Err(e) => {
                    for i in index {
                        results[i] = Some(Err(Refusal::NotYet(e.message.clone())));
                    }
                }
            }
        }
        (
            results
                .into_iter()
                .map(|r| r.unwrap_or(Err(Refusal::NotYet("not judged".into()))))
                .collect(),
            missing_membership,
        )
    }

    /// Whether `server` has (or had) a member in `channel`, by its membership log.
    fn participates(&self, server: &str, channel: &str) -> bool {
        match self.shared.store.members(channel) {
            Ok(members) if members.iter().any(|(u, _)| user_server(u) == Some(server)) => {
                return true;
            }
            Err(_) => return false,
            _ => {}
        }
        self.shared
            .store
            .membership_log(channel, 0, 10_000)
            .map(|log| {
                log.iter().any(|e| match &e.event.content {
                    hearth_federation::event::EventContent::Membership { user, .. } => {
                        user_server(user) == Some(server)
                    }
                    _ => false,
                })
            })
            .unwrap_or(false)
    }

    fn on_heads(
        &self,
        from: &str,
        channel: &str,
        heads: std::collections::BTreeMap<String, u64>,
    ) -> FedResponse {
        if !self.participates(from, channel) {
            return refused(
                "not_participating",
                "your server has no member in this channel",
            );
        }
        let ours = match self.shared.store.heads(channel) {
            Ok(h) => h,
            Err(e) => return refused("internal", e.to_string()),
        };
        let mut events = Vec::new();
        let mut more = false;
        for origin in ours.keys() {
            let from_seq = heads.get(origin).copied().unwrap_or(0);
            let room = MAX_EVENTS_PER_MESSAGE - events.len();
            if room == 0 {
                more = true;
                break;
            }
            match self
                .shared
                .store
                .events_from(channel, origin, from_seq, room + 1)
            {
                Ok(found) => {
                    if found.len() > room {
                        more = true;
                    }
                    events.extend(found.into_iter().take(room).map(|s| self.outgoing(s.event)));
                }
                Err(e) => return refused("internal", e.to_string()),
            }
        }
        FedResponse::Events { events, more }
    }

    fn on_membership_log(&self, from: &str, channel: &str, after: u64) -> FedResponse {
        if !self.participates(from, channel) {
            return refused(
                "not_participating",
                "your server has no member in this channel",
            );
        }
        match self
            .shared
            .store
            .membership_log(channel, after, MAX_EVENTS_PER_MESSAGE + 1)
        {
            Ok(log) => FedResponse::Events {
                more: log.len() > MAX_EVENTS_PER_MESSAGE,
                events: log
                    .into_iter()
                    .take(MAX_EVENTS_PER_MESSAGE)
                    .map(|s| self.outgoing(s.event))
                    .collect(),
            },
            Err(e) => refused("internal", e.to_string()),
        }
    }

    fn on_shared_channels(&self, from: &str) -> FedResponse {
        match self.shared.store.channel_ids() {
            Ok(ids) => FedResponse::Channels {
                channels: ids
                    .into_iter()
                    .filter(|c| self.participates(from, c))
                    .collect(),
            },
            Err(e) => refused("internal", e.to_string()),
        }
    }

    async fn on_change_membership(
        &self,
        from: &str,
        channel: String,
        actor: String,
        action: &str,
        user: String,
    ) -> FedResponse {
        if user_server(&actor) != Some(from) {
            return refused("forbidden", "a server acts only for its own users");
        }
        if home_server(&channel) != Some(self.shared.name.as_str()) {
            return refused("not_home", "this server is not the channel's home");
        }
        let action = match action {
            "add" => MembershipAction::Add,
            "remove" => MembershipAction::Remove,
            "leave" => MembershipAction::Leave,
            _ => return refused("bad_request", "action is add, remove or leave"),
        };
        match self
            .shared
            .channels
            .change_as_home(&actor, &channel, &user, action)
            .await
        {
            Ok(()) => FedResponse::Done,
            Err(e) => refused(e.code.as_str(), e.message),
        }
    }

    // ---- catching up ----

    /// Asks one server for everything it holds that this one lacks, in the channels
    /// both take part in (and those this server has not heard of yet).
    async fn catch_up_with(&self, name: &str) {
        let Some(entry) = self.shared.directory.entry(name) else {
            return;
        };
        let mut channels: BTreeSet<String> = match self.shared.store.channel_ids() {
            Ok(ids) => ids
                .into_iter()
                .filter(|c| self.participates(name, c))
                .collect(),
            Err(_) => return,
        };
        if let Ok(FedResponse::Channels { channels: theirs }) = self
            .shared
            .network
            .request(entry.peer, FedRequest::SharedChannels)
            .await
        {
            channels.extend(theirs.into_iter().take(10_000));
        }
        for channel in channels {
            self.catch_up_channel(entry.peer, &channel).await;
        }
    }

    async fn catch_up_channel(&self, peer: PeerId, channel: &str) {
        // Membership first: messages are judged by it.
        loop {
            let version = self
                .shared
                .store
                .channel(channel)
                .ok()
                .flatten()
                .map_or(0, |r| r.version);
            let request = FedRequest::MembershipLog {
                channel: channel.to_string(),
                after_version: version,
            };
            match self.shared.network.request(peer, request).await {
                Ok(FedResponse::Events { events, more }) if !events.is_empty() => {
                    let (results, _) = self.verify_and_take_in(Some(peer), events).await;
                    if !more || results.iter().all(|r| r.is_err()) {
                        break;
                    }
                }
                _ => break,
            }
        }
        for _ in 0..10_000 {
            let heads = match self.shared.store.heads(channel) {
                Ok(h) => h,
                Err(_) => return,
            };
            let request = FedRequest::Heads {
                channel: channel.to_string(),
                heads,
            };
            match self.shared.network.request(peer, request).await {
                Ok(FedResponse::Events { events, more }) => {
                    if events.is_empty() {
                        return;
                    }
                    let (results, _) = self.verify_and_take_in(Some(peer), events).await;
                    let progressed = results.iter().any(|r| r.is_ok());
                    if !more || !progressed {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    async fn periodic(self) {
        let mut stop = self.shared.stop.clone();
        let mut catchup = tokio::time::interval(self.shared.catchup_every);
        let mut presence = tokio::time::interval(self.shared.presence_every);
        catchup.tick().await;
        presence.tick().await;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = catchup.tick() => {
                    self.publish_descriptor().await;
                    let connected: BTreeSet<PeerId> = self.shared.network.connected_peers().await.into_iter().collect();
                    for (name, entry) in self.shared.directory.all() {
                        if connected.contains(&entry.peer) {
                            self.catch_up_with(&name).await;
                        }
                    }
                }
                _ = presence.tick() => self.refresh_presence().await,
            }
        }
    }

    // ---- presence ----

    async fn announce_presence(self, mut users: mpsc::UnboundedReceiver<String>) {
        while let Some(user) = users.recv().await {
            self.publish_presence(&user).await;
        }
    }

    async fn publish_presence(&self, user: &str) {
        let Ok(status) = self.shared.presence.status(user) else {
            return;
        };
        let announcement = PresenceAnnouncement {
            server: self.shared.name.clone(),
            user: user.to_string(),
            online: status.status == hearth_client_api::model::PresenceStatus::Online,
            last_active_at: status.last_active_at,
            ts: wall_ms(),
            signatures: Default::default(),
        };
        if let Ok(data) = announcement.sign(&self.shared.identity.key) {
            let _ = self.shared.network.publish_presence(data).await;
        }
    }

    /// Re-announces every local user who is online, so servers that missed a change
    /// (or joined later) converge, and remote entries that stop being refreshed expire.
    async fn refresh_presence(&self) {
        for user in self.shared.presence.online_local_users() {
            self.publish_presence(&user).await;
        }
    }

    fn on_presence(&self, data: &[u8]) -> bool {
        let checked = PresenceAnnouncement::parse(data).and_then(|(a, value)| {
            let key = self.shared.directory.key_of(&a.server).ok_or_else(|| {
                hearth_federation::EventError::BadSignature("unknown server".into())
            })?;
            PresenceAnnouncement::verify(&value, &a.server, &key)?;
            Ok(a)
        });
        match checked {
            Ok(a)
                if a.server != self.shared.name
                    && self.shared.channels_policy_allows(&a.server) =>
            {
                self.shared
                    .presence
                    .remote_update(&a.user, a.online, a.last_active_at, a.ts);
                true
            }
            Ok(_) => false,
            Err(e) => {
                debug!(error = %e, "presence announcement refused");
                self.shared.metrics.federation_refused.inc();
                false
            }
        }
    }

    // ---- the outbox ----

    /// Delivers `dest`'s outbox, oldest first, with up to [`PUSHES_IN_FLIGHT`] pushes
    /// in flight: each round trip includes the receiver's verification, write and
    /// flush, so one at a time left both servers idle most of the time. When a push
    /// fails or has events refused for now, the pushes still in flight land, and
    /// delivery starts again from the oldest entry left, after a backoff.
    async fn deliver(self, dest: String, wake: Arc<Notify>) {
        let mut backoff = BACKOFF_MIN;
        let mut stop = self.shared.stop.clone();
        let mut in_flight: FuturesOrdered<BoxFuture<'static, PushOutcome>> = FuturesOrdered::new();
        // The newest outbox entry in flight; the next push starts after it.
        let mut sent_upto: Option<Vec<u8>> = None;
        loop {
            while in_flight.len() < PUSHES_IN_FLIGHT {
                let (upto, keys, events) = match self.next_push(&dest, sent_upto.as_deref()).await {
                    NextPush::Ready { upto, keys, events } => (upto, keys, events),
                    NextPush::Nothing => break,
                    NextPush::Stopped => {
                        // Only at shutdown (or a bug): let the next wake start a fresh worker.
                        warn!(server = %dest, "outbox worker stopped");
                        self.shared
                            .outboxes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&dest);
                        return;
                    }
                };
                sent_upto = Some(upto);
                let this = self.clone();
                let to = dest.clone();
                in_flight.push_back(Box::pin(async move {
                    let response = this.push(&to, events).await;
                    PushOutcome { keys, response }
                }));
            }
            if in_flight.is_empty() {
                tokio::select! {
                    _ = wake.notified() => continue,
                    _ = stop.changed() => return,
                }
            }
            let outcome = tokio::select! {
                Some(outcome) = in_flight.next() => outcome,
                _ = wake.notified(), if in_flight.len() < PUSHES_IN_FLIGHT => continue,
                _ = stop.changed() => return,
            };
            if self.settle(&dest, outcome) {
                backoff = BACKOFF_MIN;
                continue;
            }
            while let Some(outcome) = in_flight.next().await {
                self.settle(&dest, outcome);
            }
            sent_upto = None;
            // Exponential backoff with jitter, so restarted servers are not hit by
            // every peer at the same instant.
            let jitter = Duration::from_millis(u64::from(wall_ms() as u32 % 100));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = wake.notified() => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// The next push for `dest`: up to a full push of outbox entries after `after`,
    /// read and signed (on a blocking thread unless the push is small). Entries whose
    /// event is gone or older than the retention are dropped on the way.
    async fn next_push(&self, dest: &str, mut after: Option<&[u8]>) -> NextPush {
        let mut dropped_upto: Option<Vec<u8>>;
        loop {
            let entries = match self
                .shared
                .store
                .outbox(dest, after, MAX_EVENTS_PER_MESSAGE)
            {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "outbox unreadable");
                    Vec::new()
                }
            };
            let Some(last_read) = entries.last().map(|(key, _)| key.clone()) else {
                return NextPush::Nothing;
            };
            let read = entries.len();
            let OutboxRead {
                ready,
                gone,
                expired,
            } = if entries.len() <= INLINE_PUSH_EVENTS {
                self.read_outgoing(entries)
            } else {
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.read_outgoing(entries)).await {
                    Ok(read) => read,
                    Err(_) => return NextPush::Stopped,
                }
            };
            if !gone.is_empty() {
                let _ = self.shared.store.outbox_done(&gone);
            }
            if !expired.is_empty() {
                warn!(
                    server = %dest,
                    events = expired.len(),
                    retention_secs = self.shared.outbox_retention.as_secs(),
                    "dropped outbox entries older than the retention; that server gets them by catch-up when it is back"
                );
                self.shared
                    .metrics
                    .federation_outbox_expired
                    .inc_by(expired.len() as u64);
                let _ = self.shared.store.outbox_done(&expired);
            }
            if let Some(upto) = ready.last().map(|(key, _)| key.clone()) {
                let (keys, events) = ready.into_iter().unzip();
                return NextPush::Ready { upto, keys, events };
            }
            if gone.len() + expired.len() < read {
                // An event could not be read: it stays for a later push.
                return NextPush::Nothing;
            }
            // Everything read was dropped: read on from there.
            dropped_upto = Some(last_read);
            after = dropped_upto.as_deref();
        }
    }

    /// The outbox entries' events, signed for sending. Stops at an event that cannot
    /// be read: it stays for a later push.
    fn read_outgoing(&self, entries: Vec<(Vec<u8>, String)>) -> OutboxRead {
        let mut out = OutboxRead {
            ready: Vec::new(),
            gone: Vec::new(),
            expired: Vec::new(),
        };
        let cutoff = wall_ms().saturating_sub(self.shared.outbox_retention.as_millis() as u64);
        for (key, id) in entries {
            match self.shared.store.event(&id) {
                Ok(Some(stored)) if stored.event.ts < cutoff => out.expired.push(key),
                Ok(Some(stored)) => out.ready.push((key, self.outgoing(stored.event))),
                Ok(None) => out.gone.push(key),
                Err(e) => {
                    warn!(error = %e, "outbox event unreadable");
                    break;
                }
            }
        }
        out
    }

    /// Removes what a push delivered (or what was refused for good) from the outbox;
    /// true if nothing of it needs sending again.
    fn settle(&self, dest: &str, outcome: PushOutcome) -> bool {
        let PushOutcome { keys, response } = outcome;
        match response {
            Ok(FedResponse::Pushed { accepted, refused }) => {
                self.shared.metrics.federation_pushes.inc();
                let retry: BTreeSet<u32> = refused
                    .iter()
                    .filter(|(_, r)| r.starts_with("retry:"))
                    .map(|(i, _)| *i)
                    .collect();
                for (i, reason) in refused.iter().filter(|(i, _)| !retry.contains(i)) {
                    warn!(server = %dest, index = i, %reason, "the other server refused an event for good");
                }
                self.shared
                    .metrics
                    .federation_out
                    .inc_by(u64::from(accepted));
                let done: Vec<Vec<u8>> = keys
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| !retry.contains(&(*i as u32)))
                    .map(|(_, k)| k)
                    .collect();
                let _ = self.shared.store.outbox_done(&done);
                retry.is_empty()
            }
            Ok(other) => {
                debug!(server = %dest, ?other, "push not taken");
                false
            }
            Err(e) => {
                debug!(server = %dest, error = %e, "push failed; will retry");
                false
            }
        }
    }

    /// An event as it travels to another server. Events made here are stored
    /// unsigned and signed on their way out (see `SignedEvent::seal`).
    fn outgoing(&self, event: SignedEvent) -> String {
        if event.is_signed() || event.origin != self.shared.name {
            return event.to_json();
        }
        match event.clone().sign(&self.shared.identity.key) {
            Ok((signed, _)) => signed.to_json(),
            Err(e) => {
                // Cannot happen for an event this node sealed; the receiver refuses
                // the unsigned copy and says so.
                error!(error = %e, "an event made here did not sign");
                event.to_json()
            }
        }
    }

    /// Pushes events to a server: directly if it can be reached, otherwise through
    /// any connected server that can reach it.
    async fn push(&self, dest: &str, events: Vec<String>) -> Result<FedResponse, ApiError> {
        let request = FedRequest::Push { events };
        if let Some(entry) = self.locate(dest).await {
            let network = &self.shared.network;
            match network.push(entry.peer, request.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) => debug!(server = %dest, error = %e, "push link failed; trying a request"),
            }
            // A link can fail where a request does not (a peer that does not speak
            // the push link yet); a request costs more but still gets through.
            match network.request(entry.peer, request.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) => debug!(server = %dest, error = %e, "direct push failed; trying a relay"),
            }
        }
        self.relay(dest, request).await
    }

    async fn relay(&self, dest: &str, request: FedRequest) -> Result<FedResponse, ApiError> {
        let connected: BTreeSet<PeerId> = self
            .shared
            .network
            .connected_peers()
            .await
            .into_iter()
            .collect();
        for (name, entry) in self.shared.directory.all() {
            if name == dest || !connected.contains(&entry.peer) {
                continue;
            }
            let forward = FedRequest::Forward {
                to: dest.to_string(),
                request: Box::new(request.clone()),
            };
            match self.shared.network.request(entry.peer, forward).await {
                Ok(FedResponse::Refused { .. }) | Err(_) => continue,
                Ok(r) => return Ok(r),
            }
        }
        Err(internal(format!("{dest} is unreachable")))
    }

    async fn request_home(&self, home: &str, request: FedRequest) -> ApiResult<FedResponse> {
        if let Some(entry) = self.locate(home).await
            && let Ok(r) = self
                .shared
                .network
                .request(entry.peer, request.clone())
                .await
        {
            return Ok(r);
        }
        self.relay(home, request).await
    }
}

impl Shared {
    fn channels_policy_allows(&self, server: &str) -> bool {
        server == self.name || self.channels_policy().federates_with(server)
    }

    fn channels_policy(&self) -> &crate::config::FederationPolicy {
        self.channels.policy()
    }
}

/// The channels' link to federation; weak, so it does not keep federation alive.
struct Link(Weak<Shared>);

impl Link {
    fn federation(&self) -> ApiResult<Federation> {
        self.0
            .upgrade()
            .map(|shared| Federation { shared })
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Internal,
                    "the server is shutting down; try again shortly",
                )
            })
    }
}

impl Remote for Link {
    fn change_membership(
        &self,
        home: String,
        channel: String,
        actor: String,
        action: MembershipAction,
        user: String,
    ) -> BoxFuture<'static, ApiResult<()>> {
        let link = self.federation();
        Box::pin(async move { link?.ask_home(home, channel, actor, action, user).await })
    }

    fn outbox_ready(&self, servers: Vec<String>) {
        if let Ok(f) = self.federation() {
            f.outbox_ready(servers);
        }
    }
}

impl Federation {
    /// Asks a channel's home server to change membership for a local user.
    async fn ask_home(
        &self,
        home: String,
        channel: String,
        actor: String,
        action: MembershipAction,
        user: String,
    ) -> ApiResult<()> {
        let action = match action {
            MembershipAction::Add => "add",
            MembershipAction::Remove => "remove",
            MembershipAction::Leave => "leave",
            MembershipAction::Create => {
                return Err(ApiError::new(ErrorCode::BadRequest, "not a change"));
            }
        };
        let request = FedRequest::ChangeMembership {
            channel,
            actor,
            action: action.to_string(),
            user,
        };
        match self.request_home(&home, request).await? {
            FedResponse::Done => Ok(()),
            FedResponse::Refused { code, message } => {
                let code = serde_json::from_value(serde_json::Value::String(code))
                    .unwrap_or(ErrorCode::Internal);
                Err(ApiError::new(code, message))
            }
            other => Err(internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Wakes (or starts) the delivery workers of these servers.
    fn outbox_ready(&self, servers: Vec<String>) {
        let mut outboxes = self
            .shared
            .outboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for dest in servers {
            if let Some(wake) = outboxes.get(&dest) {
                wake.notify_one();
                continue;
            }
            let wake = Arc::new(Notify::new());
            outboxes.insert(dest.clone(), wake.clone());
            self.spawn(self.clone().deliver(dest, wake));
        }
    }
}
