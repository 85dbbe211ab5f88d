//! The session hub: which devices are connected now, and handing events to their queues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

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

/// Tells a session to close, and with which code.
#[derive(Debug, Default)]
pub struct Kick {
    code: OnceLock<u16>,
    notify: Notify,
}

impl Kick {
    /// Asks the session to close with `code` (the first request wins).
    pub fn kick(&self, code: u16) {
        let _ = self.code.set(code);
        self.notify.notify_one();
    }

    /// Waits until the session is asked to close; returns the close code.
    pub async fn kicked(&self) -> u16 {
        loop {
            if let Some(code) = self.code.get() {
                return *code;
            }
            self.notify.notified().await;
        }
    }
}

struct Conn {
    id: u64,
    device: String,
    tx: mpsc::Sender<Outbound>,
    kick: Arc<Kick>,
}

struct Shared {
    users: RwLock<HashMap<String, Vec<Conn>>>,
    next_id: AtomicU64,
    queue_len: usize,
    metrics: Metrics,
}

/// A cheap handle to the node's registry of live sessions.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A session's place in the hub; leaving drops it from the registry.
pub struct Attachment {
    /// Events and presence for this session, in stream order.
    pub rx: mpsc::Receiver<Outbound>,
    /// Set when the session must close.
    pub kick: Arc<Kick>,
    /// Whether this made the user go from no device to one.
    pub first: bool,
    id: u64,
    user: String,
    hub: Hub,
}

impl Attachment {
    /// Leaves the hub; returns true if this was the user's last connected device.
    pub fn detach(self) -> bool {
        self.hub.remove(&self.user, self.id)
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
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<Conn>>> {
        self.shared.users.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<Conn>>> {
        self.shared.users.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connected device.
    pub fn attach(&self, user: &str, device: &str) -> Attachment {
        let (tx, rx) = mpsc::channel(self.shared.queue_len);
        let kick = Arc::new(Kick::default());
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut users = self.write();
        let conns = users.entry(user.to_string()).or_default();
        let first = conns.is_empty();
        conns.push(Conn {
            id,
            device: device.to_string(),
            tx,
            kick: kick.clone(),
        });
        self.shared.metrics.connections.inc();
        Attachment {
            rx,
            kick,
            first,
            id,
            user: user.to_string(),
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
                c.kick.kick(code);
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
            if c.tx.try_send(item.clone()).is_err() {
                self.shared.metrics.slow_disconnects.inc();
                c.kick.kick(hearth_client_api::close::TOO_SLOW);
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
