//! The session hub: which devices are connected now, and handing events to their queues.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use hearth_client_api::close;
use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;

use crate::metrics::Metrics;

/// Something to write to one connection, already encoded once for all its readers.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A live event frame for stream position `pos`.
    Event {
        /// The receiving user's stream position of the event.
        pos: u64,
        /// The encoded `event` frame.
        frame: Arc<str>,
        /// When the node accepted the event, for the delivery-latency histogram.
        accepted_at: Instant,
    },
    /// A presence frame.
    Presence(Arc<str>),
}

/// One session's mailbox: its bounded queue of outbound items, and the request to
/// close. Replaces a tokio mpsc channel plus a kick flag: an idle session holds one
/// small allocation (about 100 bytes) instead of a channel's first block of 32 slots
/// and its cache-padded halves (about 2 KiB), and the queue's buffer exists only
/// while items wait.
#[derive(Debug, Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Outbound>>,
    kicked: OnceLock<u16>,
    /// Woken on both a new item and a kick; the session checks both each time.
    notify: Notify,
    /// When the session times out unless a frame arrives: milliseconds since the
    /// hub's epoch. The hub's sweeper wakes a session past it, so a session holds
    /// no timer of its own.
    deadline_ms: AtomicU64,
}

/// What woke a session waiting on its mailbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Asked to close with this code.
    Kicked(u16),
    /// Items are waiting.
    Items,
}

impl Mailbox {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the session to close with `code` (the first request wins).
    pub fn kick(&self, code: u16) {
        let _ = self.kicked.set(code);
        self.notify.notify_one();
    }

    /// The close code, once the session was asked to close.
    pub fn kicked(&self) -> Option<u16> {
        self.kicked.get().copied()
    }

    /// Queues an item unless `cap` items already wait; false when full.
    fn push(&self, item: &Outbound, cap: usize) -> bool {
        {
            let mut q = self.queue();
            if q.len() >= cap {
                return false;
            }
            q.push_back(item.clone());
        }
        self.notify.notify_one();
        true
    }

    /// The oldest waiting item. When this empties the queue its buffer is freed, so
    /// a burst does not leave an idle session holding its peak.
    pub fn pop(&self) -> Option<Outbound> {
        let mut q = self.queue();
        let item = q.pop_front();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
        item
    }

    /// Waits for a kick, or (when `items` is true) for a waiting item. Cancel-safe:
    /// nothing is taken from the queue here.
    pub async fn wait(&self, items: bool) -> Wake {
        loop {
            if let Some(code) = self.kicked() {
                return Wake::Kicked(code);
            }
            if items && !self.queue().is_empty() {
                return Wake::Items;
            }
            // A notification sent while nobody waits is kept as a permit, so an item
            // or kick arriving between the checks above and this wait is not missed.
            self.notify.notified().await;
        }
    }
}

struct Conn {
    id: u64,
    device: String,
    mailbox: Arc<Mailbox>,
}

/// How often the hub looks for sessions past their heartbeat deadline: a silent
/// session is woken (and closes) at most this much after its deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

struct Shared {
    users: RwLock<HashMap<String, Vec<Conn>>>,
    next_id: AtomicU64,
    queue_len: usize,
    metrics: Metrics,
    /// Deadlines are kept as milliseconds since this instant.
    epoch: tokio::time::Instant,
    /// Set when the node shuts down: every session, also one attaching later, is
    /// asked to close with this code.
    closing: OnceLock<u16>,
}

/// A cheap handle to the node's registry of live sessions.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A session's place in the hub; leaving drops it from the registry.
pub struct Attachment {
    /// Events and presence for this session, in stream order, and its close request.
    pub mailbox: Arc<Mailbox>,
    /// Whether this made the user go from no device to one.
    pub first: bool,
    id: u64,
    hub: Hub,
}

impl Attachment {
    /// Heard from the client: the session times out `timeout` from now unless it
    /// hears again.
    pub fn heard(&self, timeout: Duration) {
        let at = self
            .hub
            .ms_since_epoch(tokio::time::Instant::now() + timeout);
        self.mailbox.deadline_ms.store(at, Ordering::Relaxed);
    }

    /// Whether the heartbeat deadline has passed.
    pub fn timed_out(&self) -> bool {
        let now = self.hub.ms_since_epoch(tokio::time::Instant::now());
        self.mailbox.deadline_ms.load(Ordering::Relaxed) <= now
    }

    /// Leaves the hub; returns true if this was `user`'s last connected device.
    /// (The session already holds the user id; keeping a copy here would cost an
    /// allocation per connection.)
    pub fn detach(self, user: &str) -> bool {
        self.hub.remove(user, self.id)
    }
}

impl Hub {
    /// An empty hub whose sessions queue at most `queue_len` items each.
    pub fn new(queue_len: usize, metrics: Metrics) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                users: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                queue_len,
                metrics,
                epoch: tokio::time::Instant::now(),
                closing: OnceLock::new(),
            }),
        }
    }

    fn ms_since_epoch(&self, at: tokio::time::Instant) -> u64 {
        let ms = at.saturating_duration_since(self.shared.epoch).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// Starts the hub's two tasks (once, when the node opens): the sweeper that
    /// wakes sessions past their heartbeat deadline, and the watch that closes every
    /// session when `shutdown` turns true. One task each for the node instead of a
    /// timer and a shutdown waiter in every session. Both hold the hub weakly and end
    /// with it.
    pub fn start(&self, shutdown: watch::Receiver<bool>) {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(sweep(weak.clone()));
        tokio::spawn(close_on_shutdown(weak, shutdown));
    }

    /// Asks every session, and any that attaches later, to close with `code`.
    fn close_all(&self, code: u16) {
        let _ = self.shared.closing.set(code);
        for conns in self.read().values() {
            for c in conns {
                c.mailbox.kick(code);
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<Conn>>> {
        self.shared.users.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<Conn>>> {
        self.shared.users.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connected device whose session times out `timeout` from now
    /// unless it hears from the client.
    pub fn attach(&self, user: &str, device: &str, timeout: Duration) -> Attachment {
        let mailbox = Arc::new(Mailbox::default());
        let deadline = self.ms_since_epoch(tokio::time::Instant::now() + timeout);
        mailbox.deadline_ms.store(deadline, Ordering::Relaxed);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut users = self.write();
        // Most users have one device online: room for exactly one, not Vec's
        // default first allocation of four.
        let conns = users
            .entry(user.to_string())
            .or_insert_with(|| Vec::with_capacity(1));
        let first = conns.is_empty();
        conns.push(Conn {
            id,
            device: device.to_string(),
            mailbox: mailbox.clone(),
        });
        // Under the write lock: close_all either sees this session or set the
        // code before it was added.
        if let Some(code) = self.shared.closing.get() {
            mailbox.kick(*code);
        }
        drop(users);
        self.shared.metrics.connections.inc();
        Attachment {
            mailbox,
            first,
            id,
            hub: self.clone(),
        }
    }

    fn remove(&self, user: &str, id: u64) -> bool {
        let mut users = self.write();
        let Some(conns) = users.get_mut(user) else {
            return false;
        };
        let before = conns.len();
        conns.retain(|c| c.id != id);
        if conns.len() < before {
            self.shared.metrics.connections.dec();
        }
        if conns.is_empty() {
            users.remove(user);
            true
        } else {
            false
        }
    }

    /// Whether any device of the user is connected.
    pub fn online(&self, user: &str) -> bool {
        self.read().get(user).is_some_and(|c| !c.is_empty())
    }

    /// Whether this device is connected.
    pub fn device_online(&self, user: &str, device: &str) -> bool {
        self.read()
            .get(user)
            .is_some_and(|c| c.iter().any(|c| c.device == device))
    }

    /// Closes every session of one device with `code`.
    pub fn kick_device(&self, user: &str, device: &str, code: u16) {
        if let Some(conns) = self.read().get(user) {
            for c in conns.iter().filter(|c| c.device == device) {
                c.mailbox.kick(code);
            }
        }
    }

    /// Queues an item for every connected device of `user`; returns whether any was
    /// connected. A device whose queue is full is too slow: it is disconnected and
    /// catches up from its cursor when it returns, and nobody else waits for it.
    pub fn send_to_user(&self, user: &str, item: &Outbound) -> bool {
        let users = self.read();
        let Some(conns) = users.get(user) else {
            return false;
        };
        for c in conns {
            if !c.mailbox.push(item, self.shared.queue_len) {
                self.shared.metrics.slow_disconnects.inc();
                c.mailbox.kick(close::TOO_SLOW);
            }
        }
        !conns.is_empty()
    }

    /// Users with at least one connected device.
    pub fn online_users(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Number of connected sessions.
    pub fn connection_count(&self) -> usize {
        self.read().values().map(Vec::len).sum()
    }
}

/// Every SWEEP_EVERY, wakes the sessions whose heartbeat deadline has passed. It
/// does not close them itself: a session reads what has already arrived before it
/// checks its deadline, so a heartbeat that came in time but was not yet read
/// still counts.
async fn sweep(hub: Weak<Shared>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = hub.upgrade() else { return };
        let hub = Hub { shared };
        let now = hub.ms_since_epoch(tokio::time::Instant::now());
        for conns in hub.read().values() {
            for c in conns {
                if c.mailbox.deadline_ms.load(Ordering::Relaxed) <= now {
                    c.mailbox.notify.notify_one();
                }
            }
        }
    }
}

/// Closes every session once `shutdown` turns true; ends if the node is dropped
/// without shutting down.
async fn close_on_shutdown(hub: Weak<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            if let Some(shared) = hub.upgrade() {
                Hub { shared }.close_all(close::GOING_AWAY);
            }
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
