//! The libp2p network: a cloneable [`Network`] handle, a stream of [`NetworkEvent`]s, and the [`EventLoop`] that owns the swarm.
//!
//! Application code never touches the swarm: it sends commands through the
//! handle (with oneshot replies) and reads events. The loop ends when every
//! handle is dropped or [`Network::shutdown`] is called.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId};
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, mdns, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::identity::NodeIdentity;
use crate::protocol::{
    FEDERATION_PROTOCOL, FedRequest, FedResponse, KAD_PROTOCOL, MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES, PRESENCE_TOPIC,
};
use crate::push_link::{PUSH_PROTOCOL, PushLinks};

/// Why a network operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// The event loop has stopped.
    #[error("the network has stopped")]
    Stopped,
    /// The peer could not be reached, timed out, or broke the protocol.
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// What happened.
        reason: String,
    },
    /// A listen or dial address was refused.
    #[error("address {addr}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// A record was not found in the DHT.
    #[error("not found in the DHT")]
    NotFound,
    /// Building the swarm failed.
    #[error("network setup: {0}")]
    Setup(String),
}

/// Settings of the network.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Addresses to listen on (e.g. `/ip4/127.0.0.1/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (with `/p2p/<peer id>` where known).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network.
    pub mdns: bool,
    /// How long an idle server link stays open.
    pub idle_timeout: Duration,
    /// How long a request may take.
    pub request_timeout: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: vec![],
            bootstrap: vec![],
            mdns: false,
            idle_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Something the network tells the application.
#[derive(Debug)]
pub enum NetworkEvent {
    /// A peer asks something; answer with [`Network::respond`].
    Request {
        /// Who asks.
        peer: PeerId,
        /// The request.
        request: FedRequest,
        /// Where the answer goes.
        channel: ResponseChannel<FedResponse>,
    },
    /// A presence announcement arrived; judge it with [`Network::validate_gossip`].
    Gossip {
        /// The peer that passed it on.
        source: PeerId,
        /// Its id, for validation.
        id: MessageId,
        /// The announcement bytes.
        data: Vec<u8>,
    },
    /// A connection to a peer opened (the first one).
    Connected(PeerId),
    /// The last connection to a peer closed.
    Disconnected(PeerId),
    /// The node listens on a new address.
    Listening(Multiaddr),
}

enum Command {
    Request {
        peer: PeerId,
        request: FedRequest,
        reply: oneshot::Sender<Result<FedResponse, NetworkError>>,
    },
    Respond {
        channel: ResponseChannel<FedResponse>,
        response: FedResponse,
    },
    Dial {
        addr: Multiaddr,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Publish {
        data: Vec<u8>,
    },
    ValidateGossip {
        id: MessageId,
        source: PeerId,
        accept: bool,
    },
    PutRecord {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetworkError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Connected {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Ban {
        peer: PeerId,
    },
    Unban {
        peer: PeerId,
    },
    Shutdown,
}

/// A cheap handle to the network.
#[derive(Clone)]
pub struct Network {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    links: Arc<PushLinks>,
    control: libp2p_stream::Control,
    banned: Banned,
}

/// Peers refused until unbanned; shared by the handles, the loop and incoming links.
type Banned = Arc<Mutex<HashSet<PeerId>>>;

fn is_banned(banned: &Banned, peer: &PeerId) -> bool {
    banned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(peer)
}

/// Push links one peer may have open to this server at once: a sender keeps one, and
/// opens a new one while an old one may still be closing.
pub const LINKS_PER_PEER: usize = 4;

/// Push links other servers open to this one; see [`Network::incoming_links`].
pub struct IncomingLinks {
    streams: libp2p_stream::IncomingStreams,
    banned: Banned,
    /// One token per peer; each open link holds a clone, so the clones count its links.
    open: HashMap<PeerId, Arc<()>>,
}

/// A push link from another server, to answer with [`crate::push_link::serve_link`].
pub struct IncomingLink {
    /// The server that opened it.
    pub peer: PeerId,
    pub(crate) stream: libp2p::Stream,
    pub(crate) _open: Arc<()>,
}

impl IncomingLinks {
    /// The next link, from a peer that is not banned and has fewer than
    /// [`LINKS_PER_PEER`] open; `None` once the network stopped.
    pub async fn next(&mut self) -> Option<IncomingLink> {
        loop {
            let (peer, stream) = self.streams.next().await?;
            if is_banned(&self.banned, &peer) {
                continue;
            }
            self.open.retain(|_, token| Arc::strong_count(token) > 1);
            let token = self.open.entry(peer).or_default().clone();
            if Arc::strong_count(&token) > LINKS_PER_PEER + 1 {
                warn!(%peer, "peer has {LINKS_PER_PEER} push links open already; another is refused");
                continue;
            }
            return Some(IncomingLink {
                peer,
                stream,
                _open: token,
            });
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    federation: request_response::cbor::Behaviour<FedRequest, FedResponse>,
    gossip: gossipsub::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    links: libp2p_stream::Behaviour,
}

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    pending_requests:
        HashMap<OutboundRequestId, oneshot::Sender<Result<FedResponse, NetworkError>>>,
    pending_records: HashMap<kad::QueryId, oneshot::Sender<Result<Vec<u8>, NetworkError>>>,
    banned: Banned,
    topic: IdentTopic,
}

/// Builds the network for `identity`: the handle, the event stream, and the loop to spawn.
pub fn new(
    identity: &NodeIdentity,
    config: NetworkConfig,
) -> Result<(Network, mpsc::Receiver<NetworkEvent>, EventLoop), NetworkError> {
    let setup = |e: &dyn std::fmt::Display| NetworkError::Setup(e.to_string());
    let peer_id = identity.peer_id;
    let request_timeout = config.request_timeout;
    let mdns_on = config.mdns;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity.keypair.clone())
        .with_tokio()
        .with_tcp(
            // Server links carry small latency-sensitive frames: no Nagle.
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_dns()
        .map_err(|e| setup(&e))?
        .with_behaviour(|key| {
            let codec = request_response::cbor::codec::Codec::default()
                .set_request_size_maximum(MAX_REQUEST_BYTES)
                .set_response_size_maximum(MAX_RESPONSE_BYTES);
            let federation = request_response::Behaviour::with_codec(
                codec,
                [(
                    StreamProtocol::new(FEDERATION_PROTOCOL),
                    ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(request_timeout)
                    .with_max_concurrent_streams(256),
            );
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(16 * 1024)
                .build()
                .map_err(|e| e.to_string())?;
            let gossip =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config.set_query_timeout(Duration::from_secs(10));
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            // Servers answer DHT queries from the start; they have public addresses.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(identify::Config::new(
                "/hearth/id/1".into(),
                key.public(),
            ));
            let mdns = if mdns_on {
                Some(
                    mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                federation,
                gossip,
                kad,
                identify,
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: Toggle::from(mdns),
                links: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_timeout)
                // Every push is a new substream: let its request ride along with the
                // protocol proposal instead of waiting a round trip for the answer.
                // Peers are Hearth servers, which all speak the protocols proposed.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();

    let topic = IdentTopic::new(PRESENCE_TOPIC);
    swarm
        .behaviour_mut()
        .gossip
        .subscribe(&topic)
        .map_err(|e| setup(&e))?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    for addr in &config.bootstrap {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    let (tx, commands) = mpsc::channel(1024);
    let (events_tx, events) = mpsc::channel(4096);
    let control = swarm.behaviour().links.new_control();
    let banned = Banned::default();
    Ok((
        Network {
            tx,
            local: peer_id,
            links: PushLinks::new(control.clone(), request_timeout),
            control,
            banned: banned.clone(),
        },
        events,
        EventLoop {
            swarm,
            commands,
            events: events_tx,
            pending_requests: HashMap::new(),
            pending_records: HashMap::new(),
            banned,
            topic,
        },
    ))
}

impl Network {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn command(&self, c: Command) -> Result<(), NetworkError> {
        self.tx.send(c).await.map_err(|_| NetworkError::Stopped)
    }

    /// Sends a request and waits for the answer.
    pub async fn request(
        &self,
        peer: PeerId,
        request: FedRequest,
    ) -> Result<FedResponse, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetworkError::Stopped)?
    }

    /// Sends a request on the push link to `peer` (opened on first use) and waits
    /// for the answer. Cheaper than [`Network::request`] for a steady flow: see
    /// [`crate::push_link`].
    pub async fn push(
        &self,
        peer: PeerId,
        request: FedRequest,
    ) -> Result<FedResponse, NetworkError> {
        if is_banned(&self.banned, &peer) {
            return Err(NetworkError::Request {
                peer,
                reason: "peer is banned".into(),
            });
        }
        self.links.request(peer, request).await
    }

    /// The push links other servers open to this one; answer each with
    /// [`crate::push_link::serve_link`]. Taken once: a second call is an error.
    pub fn incoming_links(&self) -> Result<IncomingLinks, NetworkError> {
        let streams = self
            .control
            .clone()
            .accept(StreamProtocol::new(PUSH_PROTOCOL))
            .map_err(|_| NetworkError::Setup("incoming push links are taken already".into()))?;
        Ok(IncomingLinks {
            streams,
            banned: self.banned.clone(),
            open: HashMap::new(),
        })
    }

    /// A handle for opening raw streams, so tests can send what a broken peer would.
    #[cfg(test)]
    pub(crate) fn control_for_tests(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Answers a request.
    pub async fn respond(&self, channel: ResponseChannel<FedResponse>, response: FedResponse) {
        let _ = self.command(Command::Respond { channel, response }).await;
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.command(Command::Dial { addr }).await
    }

    /// Remembers an address of a peer (for requests and the DHT).
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetworkError> {
        self.command(Command::AddAddress { peer, addr }).await
    }

    /// Publishes a presence announcement.
    pub async fn publish_presence(&self, data: Vec<u8>) -> Result<(), NetworkError> {
        self.command(Command::Publish { data }).await
    }

    /// Reports whether a gossip message was valid; only valid ones are passed on.
    pub async fn validate_gossip(&self, id: MessageId, source: PeerId, accept: bool) {
        let _ = self
            .command(Command::ValidateGossip { id, source, accept })
            .await;
    }

    /// Stores a record in the DHT.
    pub async fn put_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NetworkError> {
        self.command(Command::PutRecord { key, value }).await
    }

    /// Looks a record up in the DHT.
    pub async fn get_record(&self, key: Vec<u8>) -> Result<Vec<u8>, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::GetRecord { key, reply }).await?;
        rx.await.map_err(|_| NetworkError::Stopped)?
    }

    /// The addresses the node listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        if self.command(Command::ListenAddrs { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Peers connected now.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self.command(Command::Connected { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Disconnects a misbehaving peer and refuses it until [`Network`] is rebuilt or the ban is lifted.
    pub async fn ban(&self, peer: PeerId) {
        let _ = self.command(Command::Ban { peer }).await;
    }

    /// Lifts a ban.
    pub async fn unban(&self, peer: PeerId) {
        let _ = self.command(Command::Unban { peer }).await;
    }

    /// Stops the event loop.
    pub async fn shutdown(&self) {
        let _ = self.command(Command::Shutdown).await;
    }
}

impl EventLoop {
    /// Runs until shut down or every handle is gone.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.on_command(c),
                },
            }
        }
        for (_, reply) in self.pending_requests.drain() {
            let _ = reply.send(Err(NetworkError::Stopped));
        }
        debug!("network event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        let b = self.swarm.behaviour_mut();
        match command {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                if is_banned(&self.banned, &peer) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: "peer is banned".into(),
                    }));
                    return;
                }
                let id = b.federation.send_request(&peer, request);
                self.pending_requests.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if b.federation.send_response(channel, response).is_err() {
                    debug!("a response could not be sent: the requester went away");
                }
            }
            Command::Dial { addr } => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    debug!(%addr, error = %e, "dial failed");
                }
            }
            Command::AddAddress { peer, addr } => {
                b.kad.add_address(&peer, addr.clone());
                #[allow(deprecated)]
                b.federation.add_address(&peer, addr);
            }
            Command::Publish { data } => {
                let topic = self.topic.clone();
                match b.gossip.publish(topic, data) {
                    Ok(_) => {}
                    // No peer subscribed yet: presence is refreshed later anyway.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                    Err(e) => debug!(error = %e, "presence not published"),
                }
            }
            Command::ValidateGossip { id, source, accept } => {
                let acceptance = if accept {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                b.gossip
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::PutRecord { key, value } => {
                let record = kad::Record::new(key, value);
                if let Err(e) = b.kad.put_record(record, kad::Quorum::One) {
                    debug!(error = %e, "DHT record not stored");
                }
            }
            Command::GetRecord { key, reply } => {
                let id = b.kad.get_record(kad::RecordKey::new(&key));
                self.pending_records.insert(id, reply);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Connected { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Ban { peer } => {
                self.banned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Unban { peer } => {
                self.banned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&peer);
            }
            Command::Shutdown => {}
        }
    }

    // `&mut self`: a shared borrow held across the await would need the swarm to be Sync.
    async fn emit(&mut self, event: NetworkEvent) {
        if self.events.send(event).await.is_err() {
            debug!("no one reads network events");
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "federation listening");
                self.emit(NetworkEvent::Listening(address)).await;
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if is_banned(&self.banned, &peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 {
                    self.emit(NetworkEvent::Connected(peer_id)).await;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.emit(NetworkEvent::Disconnected(peer_id)).await;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Federation(event)) => {
                self.on_federation(event).await
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                self.emit(NetworkEvent::Gossip {
                    source: propagation_source,
                    id: message_id,
                    data: message.data,
                })
                .await;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    let _ = self.swarm.dial(addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetRecord(result),
                ..
            })) => {
                // The first record found answers; a query that ends without one
                // answers "not found" (a waiting caller must always hear back).
                let answer = match result {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => Ok(found.record.value),
                    Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) | Err(_) => {
                        Err(NetworkError::NotFound)
                    }
                };
                if let Some(reply) = self.pending_records.remove(&id) {
                    let _ = reply.send(answer);
                }
            }
            _ => {}
        }
    }

    async fn on_federation(&mut self, event: request_response::Event<FedRequest, FedResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if is_banned(&self.banned, &peer) {
                        return;
                    }
                    self.emit(NetworkEvent::Request {
                        peer,
                        request,
                        channel,
                    })
                    .await;
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound federation request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
