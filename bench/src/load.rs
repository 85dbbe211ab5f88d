//! The load itself: accounts in bulk, sessions, and the peer task that sends and
//! receives on one session and records every ack and delivery.
//!
//! Every message body carries `sender:seq:send_time_us:` (padded to the body size),
//! so a receiver knows who sent it, whether it saw it before, and how long it took.
//! All clocks are one `Instant` of this process.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use hearth_client_api::model::{Event, EventContent};
use hearth_client_api::{Client, ClientError, Connection, ServerFrame, Target};
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::stats::{Samples, Timeline};

/// The password of every account the tool creates.
pub const PASSWORD: &str = "hearth bench password";

/// A short random tag, so accounts and keys of separate runs never collide on a
/// node that outlives a run.
pub fn run_tag() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// One logged-in device.
#[derive(Debug, Clone)]
pub struct Account {
    /// Local part.
    pub name: String,
    /// Full user id.
    pub user: String,
    /// The device's token.
    pub token: String,
}

/// Registers `n` accounts `{prefix}{i}`, `concurrency` at a time, in order.
pub async fn register_many(
    client: &Client,
    prefix: &str,
    n: usize,
    concurrency: usize,
    pb: &ProgressBar,
) -> Result<Vec<Account>> {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let name = format!("{prefix}{i}");
            let pb = pb.clone();
            async move {
                let s = register_one(&client, &name).await?;
                pb.inc(1);
                Ok::<_, anyhow::Error>(Account {
                    name,
                    user: s.user,
                    token: s.token,
                })
            }
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Registers one account, retrying transient failures; if an earlier try did
/// create it (and only the answer was lost), logs in instead.
async fn register_one(client: &Client, name: &str) -> Result<hearth_client_api::http::Session> {
    let mut tries = 0;
    loop {
        tries += 1;
        let e = match client.register(name, PASSWORD, Some("bench")).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if e.code() == Some(hearth_client_api::ErrorCode::UserExists) && tries > 1 {
            return client
                .login(name, PASSWORD, Some("bench"))
                .await
                .with_context(|| format!("logging {name} in after a retried registration"));
        }
        if !e.is_transient() || tries >= 5 {
            return Err(anyhow::Error::new(e).context(format!("registering {name}")));
        }
        eprintln!(
            "registering {name} failed ({:#}); retrying",
            anyhow::Error::new(e)
        );
        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
    }
}

/// Logs `account` in on `n` more devices.
pub async fn login_many(client: &Client, account: &Account, n: usize) -> Result<Vec<Account>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = client
            .login(&account.name, PASSWORD, Some("bench device"))
            .await
            .with_context(|| format!("logging {} in", account.name))?;
        out.push(Account {
            name: account.name.clone(),
            user: s.user,
            token: s.token,
        });
    }
    Ok(out)
}

/// Opens and authenticates a session; with `source`, the TCP connection leaves from
/// that local address (so many connections do not run out of ephemeral ports).
pub async fn connect(ws_url: &str, token: &str, source: Option<IpAddr>) -> Result<Connection> {
    let Some(source) = source else {
        return Ok(hearth_client_api::connect_session(ws_url, token).await?);
    };
    let hostport = ws_url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .context("source addresses need a plain ws:// URL")?;
    let addr = tokio::net::lookup_host(hostport)
        .await?
        .next()
        .context("resolving the node's address")?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind((source, 0).into())?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_write_buffer_size(16 << 20);
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        ws_url,
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Some(config),
    )
    .await?;
    Ok(Connection::authenticate(ws, token).await?)
}

/// Microseconds since `start`.
pub fn since_us(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// What the run asks of every peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Send as planned.
    Run,
    /// Send nothing more; keep reading acks and deliveries.
    Drain,
    /// Stop and report.
    Stop,
}

/// Counters every peer adds to, read by the coordinator and the progress bar.
#[derive(Debug)]
pub struct Shared {
    /// The run's clock.
    pub start: Instant,
    /// `send` frames written.
    pub sent: AtomicU64,
    /// `ack` frames received.
    pub acked: AtomicU64,
    /// `error` frames answering a send.
    pub errors: AtomicU64,
    /// Distinct messages delivered (per receiving device).
    pub delivered: AtomicU64,
    /// Sessions that ended before the run did.
    pub closed: AtomicU64,
    /// Written into every body of this load, so messages of an earlier load on the
    /// same node are told apart.
    pub tag: String,
}

impl Shared {
    /// New counters; the run's clock starts now.
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            tag: run_tag(),
        })
    }

    /// Sends not yet answered by an ack or an error.
    pub fn in_flight(&self) -> u64 {
        self.sent.load(Ordering::Relaxed).saturating_sub(
            self.acked.load(Ordering::Relaxed) + self.errors.load(Ordering::Relaxed),
        )
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How a peer sends.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// It only receives.
    Silent,
    /// Open loop: one message every `1 / per_sec` seconds, starting `offset` after
    /// the run's start; late ticks are caught up so the rate holds.
    Rate {
        /// Messages per second.
        per_sec: f64,
        /// Phase offset, to spread peers over the period.
        offset: Duration,
    },
    /// Closed loop: keep `window` messages in flight, up to `limit` in all.
    Window {
        /// Messages in flight.
        window: usize,
        /// Total to send (`u64::MAX` for as many as the run allows).
        limit: u64,
    },
}

/// One peer: a session that sends to `target` at `pace` and records what it receives.
#[derive(Debug, Clone)]
pub struct PeerPlan {
    /// This peer's number, written into its bodies.
    pub index: u32,
    /// Where its messages go.
    pub target: Option<Target>,
    /// How it sends.
    pub pace: Pace,
    /// Body size in bytes (at least the header).
    pub body_bytes: usize,
    /// Keep every delivery `(sender, seq, latency)`, for per-message analysis.
    pub keep_deliveries: bool,
}

/// What one peer saw.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Messages sent.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// Error frames for sends, by code.
    pub errors: HashMap<String, u64>,
    /// Send to ack.
    pub ack: Samples,
    /// Distinct messages received from others.
    pub delivered: u64,
    /// Messages received again.
    pub duplicates: u64,
    /// Its own messages coming back to it.
    pub echoes: u64,
    /// Messages of an earlier load (another tag) delivered during this one.
    pub stale: u64,
    /// Send to delivery.
    pub delivery: Samples,
    /// `(sender, seq, latency us)` of each delivery, when asked for.
    pub deliveries: Vec<(u32, u64, u32)>,
    /// Sends per bucket.
    pub sent_timeline: Timeline,
    /// Deliveries per bucket.
    pub delivered_timeline: Timeline,
    /// Why the session ended early, if it did.
    pub closed: Option<String>,
    /// This peer's number.
    pub index: u32,
    /// Seqs of this peer's messages that were acknowledged.
    pub acked_seqs: Vec<u64>,
    /// `(sender, seq)` of every message received from others.
    pub seen: HashSet<(u32, u64)>,
    /// Send times of this peer's messages by seq, when deliveries are kept.
    pub send_times: Vec<(u64, u64)>,
}

/// The header of a body: `(load tag, sender, seq, send time us)`.
fn parse_body(body: &str) -> Option<(&str, u32, u64, u64)> {
    let mut parts = body.splitn(5, ':');
    Some((
        parts.next()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

fn make_body(tag: &str, index: u32, seq: u64, t_us: u64, size: usize) -> String {
    let mut body = format!("{tag}:{index}:{seq}:{t_us}:");
    if body.len() < size {
        body.extend(std::iter::repeat_n('x', size - body.len()));
    }
    body
}

struct Peer {
    plan: PeerPlan,
    shared: Arc<Shared>,
    stats: PeerStats,
    /// seq → send time (us) of messages awaiting their ack.
    pending: HashMap<u64, u64>,
    seen: HashSet<(u32, u64)>,
    next_seq: u64,
    key_prefix: String,
    last_pos: u64,
    acked_pos: u64,
}

impl Peer {
    fn on_event(&mut self, event: &Event) {
        if let Some(pos) = event.pos {
            self.last_pos = self.last_pos.max(pos);
        }
        let EventContent::Message { body } = &event.content else {
            return;
        };
        let Some((tag, sender, seq, t_us)) = parse_body(body) else {
            return;
        };
        if tag != self.shared.tag {
            // A message of an earlier load on the same node, arriving now.
            self.stats.stale += 1;
            return;
        }
        if sender == self.plan.index {
            self.stats.echoes += 1;
            return;
        }
        let now = since_us(self.shared.start);
        if !self.seen.insert((sender, seq)) {
            self.stats.duplicates += 1;
            return;
        }
        let lat = now.saturating_sub(t_us);
        self.stats.delivered += 1;
        Shared::add(&self.shared.delivered);
        self.stats.delivery.push_us(lat);
        self.stats.delivered_timeline.add(now);
        if self.plan.keep_deliveries {
            self.stats
                .deliveries
                .push((sender, seq, u32::try_from(lat).unwrap_or(u32::MAX)));
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Event { event } => self.on_event(&event),
            ServerFrame::Sync { events, .. } => {
                for e in &events {
                    self.on_event(e);
                }
            }
            ServerFrame::Ack { key, .. } => {
                let seq = key.rsplit('-').next().and_then(|s| s.parse::<u64>().ok());
                if let Some((seq, t)) = seq.and_then(|s| self.pending.remove(&s).map(|t| (s, t))) {
                    self.stats.acked += 1;
                    self.stats.acked_seqs.push(seq);
                    Shared::add(&self.shared.acked);
                    self.stats
                        .ack
                        .push_us(since_us(self.shared.start).saturating_sub(t));
                }
            }
            ServerFrame::Error { code, key, .. } => {
                let seq = key
                    .as_deref()
                    .and_then(|k| k.rsplit('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if seq.and_then(|s| self.pending.remove(&s)).is_some() {
                    Shared::add(&self.shared.errors);
                }
                *self.stats.errors.entry(code.to_string()).or_default() += 1;
            }
            _ => {}
        }
    }

    fn may_send(&self) -> bool {
        match self.plan.pace {
            Pace::Silent => false,
            Pace::Rate { .. } => true,
            Pace::Window { window, limit } => self.pending.len() < window && self.next_seq < limit,
        }
    }

    async fn send_one(
        &mut self,
        tx: &mut hearth_client_api::SessionSender,
    ) -> Result<(), ClientError> {
        let Some(target) = self.plan.target.clone() else {
            return Ok(());
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let now = since_us(self.shared.start);
        let body = make_body(
            &self.shared.tag,
            self.plan.index,
            seq,
            now,
            self.plan.body_bytes,
        );
        self.pending.insert(seq, now);
        if self.plan.keep_deliveries {
            self.stats.send_times.push((seq, now));
        }
        tx.send_message(format!("{}-{seq}", self.key_prefix), target, body)
            .await?;
        self.stats.sent += 1;
        self.stats.sent_timeline.add(now);
        Shared::add(&self.shared.sent);
        Ok(())
    }
}

/// Runs one peer on `conn` until the phase becomes [`Phase::Stop`] (or its session
/// ends), and returns what it saw.
pub async fn run_peer(
    conn: Connection,
    plan: PeerPlan,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> PeerStats {
    let (mut tx, mut rx, ready) = conn.split();
    let mut heartbeat = tokio::time::interval(ready.heartbeat_interval());
    heartbeat.tick().await;
    let mut cursor = tokio::time::interval(Duration::from_secs(1));
    cursor.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (rate, period) = match plan.pace {
        Pace::Rate { per_sec, offset } => (
            true,
            (
                Duration::from_secs_f64(1.0 / per_sec.max(1e-3)),
                shared.start + offset,
            ),
        ),
        _ => (false, (Duration::from_secs(3600), shared.start)),
    };
    let mut pace = tokio::time::interval_at(period.1.into(), period.0);
    pace.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let index = plan.index;
    let mut peer = Peer {
        plan,
        shared,
        stats: PeerStats::default(),
        pending: HashMap::new(),
        seen: HashSet::new(),
        next_seq: 0,
        key_prefix: format!("{}-{index}", run_tag()),
        last_pos: 0,
        acked_pos: 0,
    };
    let mut state = *phase.borrow();
    loop {
        let sending = state == Phase::Run;
        if sending && !rate {
            while peer.may_send() {
                if let Err(e) = peer.send_one(&mut tx).await {
                    peer.stats.closed = Some(e.to_string());
                    break;
                }
            }
            if peer.stats.closed.is_some() {
                break;
            }
        }
        let result: Result<(), ClientError> = tokio::select! {
            biased;
            r = phase.changed() => {
                state = if r.is_err() { Phase::Stop } else { *phase.borrow() };
                if state == Phase::Stop {
                    break;
                }
                Ok(())
            }
            frame = rx.next_frame() => match frame {
                Ok(Some(f)) => { peer.on_frame(f); Ok(()) }
                Ok(None) => Err(ClientError::Closed { code: 1000, reason: "closed".into() }),
                Err(ClientError::BadFrame(_)) => Ok(()),
                Err(e) => Err(e),
            },
            _ = pace.tick(), if sending && rate => peer.send_one(&mut tx).await,
            _ = heartbeat.tick() => tx.heartbeat().await,
            _ = cursor.tick() => {
                if peer.last_pos > peer.acked_pos {
                    peer.acked_pos = peer.last_pos;
                    tx.ack_cursor(peer.last_pos).await
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = result {
            peer.stats.closed = Some(e.to_string());
            break;
        }
    }
    if peer.stats.closed.is_some() {
        Shared::add(&peer.shared.closed);
    } else {
        // Acknowledge what arrived, as a client does before it goes: a later load
        // on the same devices must not get it again as backlog.
        if peer.last_pos > peer.acked_pos {
            let _ = tx.ack_cursor(peer.last_pos).await;
        }
        let _ = tx.close().await;
    }
    peer.stats.index = peer.plan.index;
    peer.stats.seen = std::mem::take(&mut peer.seen);
    peer.stats
}

/// Every peer's statistics merged.
#[derive(Debug, Default)]
pub struct Merged {
    /// Sum of sends.
    pub sent: u64,
    /// Sum of acks.
    pub acked: u64,
    /// Errors by code.
    pub errors: HashMap<String, u64>,
    /// All ack latencies.
    pub ack: Samples,
    /// Sum of distinct deliveries.
    pub delivered: u64,
    /// Sum of duplicates.
    pub duplicates: u64,
    /// Sum of deliveries of earlier loads' messages.
    pub stale: u64,
    /// All delivery latencies.
    pub delivery: Samples,
    /// Sends per bucket.
    pub sent_timeline: Timeline,
    /// Deliveries per bucket.
    pub delivered_timeline: Timeline,
    /// Sessions that ended early, with why.
    pub closed: Vec<String>,
    /// Acknowledged messages that no peer received: lost after a durable ack.
    pub acked_never_delivered: u64,
    /// Messages received whose ack never came back (overload: the sender gave up
    /// waiting, or the session ended first).
    pub delivered_unacked: u64,
}

impl Merged {
    /// Merges peers' statistics.
    pub fn of(stats: &[PeerStats]) -> Merged {
        let mut m = Merged::default();
        for s in stats {
            m.sent += s.sent;
            m.acked += s.acked;
            for (k, v) in &s.errors {
                *m.errors.entry(k.clone()).or_default() += v;
            }
            m.ack.extend(&s.ack);
            m.delivered += s.delivered;
            m.duplicates += s.duplicates;
            m.stale += s.stale;
            m.delivery.extend(&s.delivery);
            m.sent_timeline.merge(&s.sent_timeline);
            m.delivered_timeline.merge(&s.delivered_timeline);
            if let Some(c) = &s.closed {
                m.closed.push(c.clone());
            }
        }
        let mut delivered: HashSet<(u32, u64)> = HashSet::new();
        for s in stats {
            delivered.extend(s.seen.iter().copied());
        }
        let mut acked: HashSet<(u32, u64)> = HashSet::new();
        for s in stats {
            acked.extend(s.acked_seqs.iter().map(|&q| (s.index, q)));
        }
        m.acked_never_delivered = acked.difference(&delivered).count() as u64;
        m.delivered_unacked = delivered.difference(&acked).count() as u64;
        m
    }
}

/// When the sending phase of a load ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// After this long.
    Elapsed(Duration),
    /// Once this many sends were answered (windowed peers with limits), or when
    /// nothing was answered for the drain bound.
    Answered(u64),
}

/// Runs the phases of a load: peers send until `until`, then drain: wait (bounded) until every send is
/// answered and `expected(acked)` deliveries arrived; then stop. Returns each peer's
/// statistics and the time the sending phase took.
pub async fn drive(
    peers: Vec<(Connection, PeerPlan)>,
    shared: &Arc<Shared>,
    until: Until,
    expected: impl Fn(u64) -> u64,
    drain: Duration,
    pb: &ProgressBar,
) -> (Vec<PeerStats>, Duration) {
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let tasks: Vec<_> = peers
        .into_iter()
        .map(|(conn, plan)| tokio::spawn(run_peer(conn, plan, shared.clone(), phase_rx.clone())))
        .collect();
    let began = Instant::now();
    let show = |pb: &ProgressBar| {
        pb.set_message(format!(
            "sent {} acked {} delivered {}",
            shared.sent.load(Ordering::Relaxed),
            shared.acked.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed)
        ));
    };
    match until {
        Until::Elapsed(d) => {
            while began.elapsed() < d {
                tokio::time::sleep(Duration::from_millis(200).min(d)).await;
                pb.set_position(began.elapsed().as_millis().min(d.as_millis()) as u64);
                show(pb);
            }
        }
        Until::Answered(total) => {
            let mut last = (0, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let answered =
                    shared.acked.load(Ordering::Relaxed) + shared.errors.load(Ordering::Relaxed);
                pb.set_position(answered);
                show(pb);
                if answered != last.0 {
                    last = (answered, Instant::now());
                }
                let all_closed = shared.closed.load(Ordering::Relaxed) as usize >= tasks.len();
                if answered >= total || last.1.elapsed() > drain || all_closed {
                    break;
                }
            }
        }
    }
    let sending = began.elapsed();
    let _ = phase_tx.send(Phase::Drain);
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline {
        let acked = shared.acked.load(Ordering::Relaxed);
        if shared.in_flight() == 0 && shared.delivered.load(Ordering::Relaxed) >= expected(acked) {
            break;
        }
        show(pb);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = phase_tx.send(Phase::Stop);
    let mut stats = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            stats.push(s);
        }
    }
    (stats, sending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_header() {
        let b = make_body("ab12", 7, 42, 123_456, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(parse_body(&b), Some(("ab12", 7, 42, 123_456)));
        assert_eq!(parse_body("t:7:1:2:"), Some(("t", 7, 1, 2)));
        assert_eq!(parse_body("hello"), None);
    }
}
