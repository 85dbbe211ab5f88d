//! Inboxes and sync: stream positions, group-committed writes, and what a device has missed.
//!
//! Every write that lands events in inboxes goes through [`Inboxes::write`]:
//! under one lock it validates against the store, assigns stream positions, and
//! applies its write set atomically. A flusher task then makes whole groups of
//! such writes durable with one flush, raises the committed position, and only
//! then hands the events to the hub, in stream order. So:
//! - an acknowledged event is on disk (acks wait for their flush);
//! - no device ever sees an event that a crash could take back;
//! - a session that attaches to the hub and then reads its backlog up to the
//!   committed position misses nothing: what was published before it attached is
//!   at or below that position, and what is published later reaches its queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use hearth_client_api::ErrorCode;
use hearth_client_api::model::Event;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::error::{ApiError, ApiResult};
use crate::hub::{Hub, Outbound};
use crate::metrics::Metrics;
use crate::store::{Store, WriteSet};

/// An event bound for one user's inbox at a stream position.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The receiving local user.
    pub user: String,
    /// Position in that user's stream.
    pub pos: u64,
    /// The event, shared by all its recipients.
    pub event: Arc<Event>,
}

/// Told about each delivery that reached no connected device of its user (push
/// notifications). Called on the flusher's path: it must only hand the delivery
/// on, never wait.
pub trait OfflineSink: Send + Sync {
    /// `delivery` was committed but its user has no device online.
    fn undelivered(&self, delivery: &Delivery);
}

/// What a write closure produced: the changes, who receives what, and the reply.
pub struct Staged<T> {
    /// Changes to apply atomically.
    pub writes: WriteSet,
    /// Inbox deliveries, in the order their positions were assigned.
    pub deliveries: Vec<Delivery>,
    /// What the caller gets once the write is durable.
    pub reply: T,
}

impl<T> Staged<T> {
    /// A reply that needs no change (an idempotent repeat, say).
    pub fn nothing(reply: T) -> Self {
        Staged {
            writes: WriteSet::default(),
            deliveries: Vec::new(),
            reply,
        }
    }
}

/// A write that was applied and waits for its group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WriteTicket(u64);

/// Hands out stream positions inside a write.
pub struct Positions {
    next: u64,
}

impl Positions {
    /// The next stream position.
    pub fn next_pos(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

#[derive(Default)]
struct Pending {
    ticket: u64,
    writes: Vec<AppliedWrite>,
    last_pos: u64,
}

/// The deliveries of one applied write, waiting for their group commit.
struct AppliedWrite {
    /// When the write was applied: its events count as accepted from then, so the
    /// delivery histogram includes the wait for a flush that was already running.
    applied_at: Instant,
    deliveries: Vec<Delivery>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Durable {
    ticket: u64,
    failed: bool,
}

struct Shared {
    store: Store,
    hub: Hub,
    metrics: Metrics,
    /// Held while a write validates and applies; its value is the highest assigned position.
    writer: Mutex<u64>,
    pending: Mutex<Pending>,
    wake: Notify,
    committed_pos: AtomicU64,
    durable: watch::Sender<Durable>,
    stopping: std::sync::atomic::AtomicBool,
    offline: OnceLock<Arc<dyn OfflineSink>>,
}

/// A cheap handle to the node's inboxes.
#[derive(Clone)]
pub struct Inboxes {
    shared: Arc<Shared>,
}

impl Inboxes {
    /// Opens the inboxes over `store` and starts the flusher task.
    pub fn start(store: Store, hub: Hub, metrics: Metrics) -> ApiResult<(Inboxes, JoinHandle<()>)> {
        let pos = store.stream_pos()?;
        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            store,
            hub,
            metrics,
            writer: Mutex::new(pos),
            pending: Mutex::new(Pending {
                last_pos: pos,
                ..Pending::default()
            }),
            wake: Notify::new(),
            committed_pos: AtomicU64::new(pos),
            durable,
            stopping: Default::default(),
            offline: OnceLock::new(),
        });
        let flusher = tokio::spawn(run_flusher(shared.clone()));
        Ok((Inboxes { shared }, flusher))
    }

    /// Runs `stage` under the write lock, applies its changes atomically, and waits
    /// until they are durable. `stage` reads the store to validate and must not block
    /// on anything else.
    pub async fn write<T>(
        &self,
        stage: impl FnOnce(&mut Positions) -> ApiResult<Staged<T>>,
    ) -> ApiResult<T> {
        let (ticket, reply) = self.apply(stage)?;
        self.durable(ticket).await?;
        Ok(reply)
    }

    /// The first half of [`Inboxes::write`]: runs `stage` under the write lock and
    /// applies its changes, without waiting. Nothing of it is acknowledged or
    /// delivered before [`Inboxes::durable`] says its ticket is on disk.
    pub fn apply<T>(
        &self,
        stage: impl FnOnce(&mut Positions) -> ApiResult<Staged<T>>,
    ) -> ApiResult<(WriteTicket, T)> {
        let ticket = {
            let mut writer = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
            if self.shared.stopping.load(Ordering::Acquire) {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "the server is shutting down; try again shortly",
                ));
            }
            let mut positions = Positions { next: *writer };
            let mut staged = stage(&mut positions)?;
            if positions.next != *writer {
                staged.writes.stream_pos = Some(positions.next);
            }
            let started = Instant::now();
            self.shared.store.apply(&staged.writes)?;
            let applied_at = Instant::now();
            self.shared
                .metrics
                .write_seconds
                .observe((applied_at - started).as_secs_f64());
            *writer = positions.next;
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pending.ticket += 1;
            pending.last_pos = positions.next;
            if !staged.deliveries.is_empty() {
                pending.writes.push(AppliedWrite {
                    applied_at,
                    deliveries: std::mem::take(&mut staged.deliveries),
                });
            }
            let ticket = pending.ticket;
            drop(pending);
            drop(writer);
            self.shared.wake.notify_one();
            (WriteTicket(ticket), staged.reply)
        };
        Ok(ticket)
    }

    /// Waits until the write behind `ticket` is durable (and its deliveries published).
    pub async fn durable(&self, ticket: WriteTicket) -> ApiResult<()> {
        let WriteTicket(ticket) = ticket;
        let mut rx = self.shared.durable.subscribe();
        let state = rx
            .wait_for(|d| d.failed || d.ticket >= ticket)
            .await
            .map(|d| *d)
            .unwrap_or(Durable {
                ticket: 0,
                failed: true,
            });
        if state.failed {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "the server could not store this durably; try again",
            ));
        }
        Ok(())
    }

    /// Sets who hears about deliveries to users with no device online (once).
    pub fn set_offline_sink(&self, sink: Arc<dyn OfflineSink>) {
        let _ = self.shared.offline.set(sink);
    }

    /// Highest stream position that is durable and published.
    pub fn committed_pos(&self) -> u64 {
        self.shared.committed_pos.load(Ordering::Acquire)
    }

    /// Up to `limit` committed events of `user`'s inbox after `after`, oldest first.
    pub fn backlog(&self, user: &str, after: u64, limit: usize) -> ApiResult<Vec<Event>> {
        Ok(self
            .shared
            .store
            .inbox(user, after, self.committed_pos(), limit)?
            .into_iter()
            .map(|(pos, stored)| crate::channels::client_event(&stored, Some(pos)))
            .collect())
    }

    /// Asks the flusher to make the last writes durable and stop; new writes are refused.
    pub fn stop(&self) {
        let _lock = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

async fn run_flusher(shared: Arc<Shared>) {
    loop {
        let batch = {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            let durable = shared.durable.borrow().ticket;
            if pending.ticket > durable {
                Some((
                    pending.ticket,
                    pending.last_pos,
                    std::mem::take(&mut pending.writes),
                ))
            } else {
                None
            }
        };
        let Some((ticket, last_pos, writes)) = batch else {
            if shared.stopping.load(Ordering::Acquire) {
                if let Err(e) = shared.store.flush().await {
                    error!(error = %e, "final store flush failed");
                }
                return;
            }
            shared.wake.notified().await;
            continue;
        };
        let started = Instant::now();
        let flushed = shared.store.flush().await;
        shared
            .metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = flushed {
            // Nothing of this batch is acknowledged or delivered; the writers get an
            // error and their clients resend with the same idempotency keys.
            error!(error = %e, "store flush failed; refusing acknowledgements");
            shared.durable.send_modify(|d| d.failed = true);
            return;
        }
        shared.committed_pos.store(last_pos, Ordering::Release);
        for write in writes {
            publish(&shared, write.deliveries, write.applied_at);
        }
        shared.durable.send_modify(|d| d.ticket = ticket);
    }
}

fn publish(shared: &Shared, deliveries: Vec<Delivery>, accepted_at: Instant) {
    for d in deliveries {
        let frame = match event_frame(&d.event, d.pos) {
            Some(f) => f,
            None => {
                warn!(event = %d.event.id, "event did not encode; recipients get it on resync");
                continue;
            }
        };
        let online = shared.hub.send_to_user(
            &d.user,
            &Outbound::Event {
                pos: d.pos,
                frame,
                accepted_at,
            },
        );
        if !online && let Some(sink) = shared.offline.get() {
            sink.undelivered(&d);
        }
    }
}

/// Encodes a live `event` frame for one reader's stream position. The event is
/// encoded once; only the position differs between recipients.
pub fn event_frame(event: &Event, pos: u64) -> Option<Arc<str>> {
    let body = serde_json::to_string(event).ok()?;
    let rest = body.strip_prefix('{')?;
    Some(Arc::from(format!(
        r#"{{"type":"event","event":{{"pos":{pos},{rest}}}"#
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_client_api::ServerFrame;
    use hearth_client_api::model::EventContent;

    #[test]
    fn live_frames_carry_the_readers_position() {
        let event = Event {
            id: "$abc".into(),
            channel: "c@localhost".into(),
            sender: "alice@localhost".into(),
            origin: "localhost".into(),
            seq: 3,
            ts: 99,
            pos: None,
            content: EventContent::Message { body: "hi".into() },
        };
        let frame = event_frame(&event, 42).expect("encodes");
        let parsed: ServerFrame = serde_json::from_str(&frame).expect("valid frame");
        let ServerFrame::Event { event: got } = parsed else {
            panic!("not an event frame: {frame}");
        };
        assert_eq!(got.pos, Some(42));
        assert_eq!(Event { pos: None, ..got }, event);
    }
}
