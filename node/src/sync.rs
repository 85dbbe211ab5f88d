//! Inboxes and sync: stream positions, group-committed writes, and what a device has missed.
//!
//! Every write that lands events in inboxes goes through [`Inboxes::write`]:
//! under one lock it validates against the store, assigns stream positions, and
//! applies its write set atomically. A flusher thread then makes whole groups of
//! such writes durable with one flush, raises the committed position, and only
//! then hands the events to the hub, in stream order. So:
//! - an acknowledged event is on disk (acks wait for their flush);
//! - no device ever sees an event that a crash could take back;
//! - a session that attaches to the hub and then reads its backlog up to the
//!   committed position misses nothing: what was published before it attached is
//!   at or below that position, and what is published later reaches its queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use hearth_client_api::ErrorCode;
use hearth_client_api::model::Event;
use tokio::sync::{oneshot, watch};
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
    /// Run once the changes are applied, still under the write lock (to keep what
    /// the writer remembers between writes in step with the store); not run if the
    /// write fails.
    pub on_applied: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> Staged<T> {
    /// A reply that needs no change (an idempotent repeat, say).
    pub fn nothing(reply: T) -> Self {
        Staged {
            writes: WriteSet::default(),
            deliveries: Vec::new(),
            reply,
            on_applied: None,
        }
    }
}

/// What to do once a write is durable (see [`Inboxes::after_durable`]); told whether
/// it is (`false`: the store could not make it so).
pub type AfterFlush = Box<dyn FnOnce(bool) + Send>;

/// Work the flusher does itself before a group commit, when asked to with
/// [`Inboxes::wake_flusher`]: the node stages queued sends there. On the flusher's
/// own thread that costs no hand-off to another thread and back.
pub trait BeforeFlush: Send + Sync {
    /// Applies what is queued, through [`Inboxes::apply`].
    fn stage(&self);
}

/// What [`Inboxes::wake_flusher`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlusherWake {
    /// The flusher was waiting; it runs its hook now.
    Woken,
    /// The flusher is at work (or has no hook): staging there would wait for it.
    Busy,
    /// The flusher has ended (the node stopped): nothing will be staged.
    Gone,
}

/// The error for a write refused because the node is stopping.
pub fn shutting_down() -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        "the server is shutting down; try again shortly",
    )
}

/// The error for a write that could not be made durable.
pub fn not_durable() -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        "the server could not store this durably; try again",
    )
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
    /// Waiting for the flush that covers their ticket (see [`Inboxes::after_durable`]).
    afters: Vec<(u64, AfterFlush)>,
    /// [`Inboxes::wake_flusher`] was called since the flusher last staged.
    stage_wanted: bool,
    /// The flusher is waiting for work (not staging, not flushing).
    flusher_idle: bool,
    /// The flusher has ended: nothing staged or flushed any more.
    flusher_gone: bool,
}

impl Pending {
    /// Takes the callbacks of writes up to `ticket`, to run once it is settled.
    fn settled_afters(&mut self, ticket: u64) -> Vec<AfterFlush> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.afters)
            .into_iter()
            .partition(|(t, _)| *t <= ticket);
        self.afters = later;
        due.into_iter().map(|(_, after)| after).collect()
    }
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
    /// Wakes the flusher; paired with `pending`, under which every flag it waits on
    /// is set, so no wake-up is lost between its check and its wait.
    wake: Condvar,
    committed_pos: AtomicU64,
    durable: watch::Sender<Durable>,
    stopping: AtomicBool,
    /// Every handle is gone (a node dropped without being stopped): the flusher
    /// ends without a final flush, as the runtime's tasks do.
    abandoned: AtomicBool,
    offline: OnceLock<Arc<dyn OfflineSink>>,
    /// Dropped by the flusher when it ends: the hook usually holds these inboxes.
    before_flush: Mutex<Option<Arc<dyn BeforeFlush>>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets `flag` and wakes the flusher to look at it.
    fn raise(&self, flag: &AtomicBool) {
        let _pending = self.pending();
        flag.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A cheap handle to the node's inboxes.
#[derive(Clone)]
pub struct Inboxes {
    shared: Arc<Shared>,
    /// `None` in a [`Inboxes::detached`] handle.
    _holders: Option<Arc<Holders>>,
}

/// Shared by every [`Inboxes`] clone (the flusher holds [`Shared`] but not this):
/// dropped with the last of them, it tells the flusher to end.
struct Holders(Arc<Shared>);

impl Drop for Holders {
    fn drop(&mut self) {
        self.0.raise(&self.0.abandoned);
    }
}

/// The flusher thread, to wait for at stop.
pub struct Flusher {
    done: oneshot::Receiver<()>,
}

impl Flusher {
    /// Waits until the flusher has made the last writes durable and ended; `false`
    /// if it ended abnormally (it panicked).
    pub async fn finished(self) -> bool {
        self.done.await.is_ok()
    }
}

impl Inboxes {
    /// Opens the inboxes over `store` and starts the flusher.
    ///
    /// The flusher is a thread of its own, not a task: a flush blocks on the disk,
    /// and a task would hand each one to a blocking thread and back, two more
    /// thread wake-ups for every group commit.
    pub fn start(store: Store, hub: Hub, metrics: Metrics) -> ApiResult<(Inboxes, Flusher)> {
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
            wake: Condvar::new(),
            committed_pos: AtomicU64::new(pos),
            durable,
            stopping: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            offline: OnceLock::new(),
            before_flush: Mutex::new(None),
        });
        let (finished, done) = oneshot::channel();
        let flushing = shared.clone();
        std::thread::Builder::new()
            .name("hearth-flusher".into())
            .spawn(move || {
                run_flusher(&flushing);
                let _ = finished.send(());
            })
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("could not start the store flusher: {e}"),
                )
            })?;
        Ok((
            Inboxes {
                _holders: Some(Arc::new(Holders(shared.clone()))),
                shared,
            },
            Flusher { done },
        ))
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
                return Err(shutting_down());
            }
            let mut positions = Positions { next: *writer };
            let mut staged = stage(&mut positions)?;
            if positions.next != *writer {
                staged.writes.stream_pos = Some(positions.next);
            }
            let started = Instant::now();
            self.shared.store.apply(&staged.writes)?;
            let applied_at = Instant::now();
            if let Some(applied) = staged.on_applied.take() {
                applied();
            }
            self.shared
                .metrics
                .write_seconds
                .observe((applied_at - started).as_secs_f64());
            *writer = positions.next;
            let mut pending = self.shared.pending();
            pending.ticket += 1;
            pending.last_pos = positions.next;
            if !staged.deliveries.is_empty() {
                pending.writes.push(AppliedWrite {
                    applied_at,
                    deliveries: std::mem::take(&mut staged.deliveries),
                });
            }
            let ticket = pending.ticket;
            self.shared.wake.notify_one();
            drop(pending);
            drop(writer);
            (WriteTicket(ticket), staged.reply)
        };
        Ok(ticket)
    }

    /// A handle that works like this one but does not keep the flusher running: for
    /// the flusher's own [`BeforeFlush`] hook, which would otherwise keep itself alive.
    pub fn detached(&self) -> Inboxes {
        Inboxes {
            shared: self.shared.clone(),
            _holders: None,
        }
    }

    /// Sets the work the flusher does before each group commit it is woken for
    /// with [`Inboxes::wake_flusher`] (once, at start-up).
    pub fn set_before_flush(&self, hook: Arc<dyn BeforeFlush>) {
        *self
            .shared
            .before_flush
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Asks the flusher to run its [`BeforeFlush`] hook and then flush, if it is
    /// waiting for work: when it is at work, the caller had better stage elsewhere,
    /// so that staging goes on while it flushes.
    pub fn wake_flusher(&self) -> FlusherWake {
        let mut pending = self.shared.pending();
        if pending.flusher_gone {
            return FlusherWake::Gone;
        }
        let hooked = self
            .shared
            .before_flush
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !pending.flusher_idle || !hooked {
            return FlusherWake::Busy;
        }
        pending.stage_wanted = true;
        pending.flusher_idle = false;
        self.shared.wake.notify_one();
        FlusherWake::Woken
    }

    /// Runs `after` once the write behind `ticket` is durable, on the flusher's
    /// thread (at once, here, if it already is): what [`Inboxes::durable`] is to a
    /// task, without a task to wake. `after` must not block.
    pub fn after_durable(&self, ticket: WriteTicket, after: AfterFlush) {
        let WriteTicket(ticket) = ticket;
        let mut pending = self.shared.pending();
        let state = *self.shared.durable.borrow();
        if state.failed || state.ticket >= ticket {
            drop(pending);
            after(!state.failed);
            return;
        }
        pending.afters.push((ticket, after));
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
            return Err(not_durable());
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
        self.shared.raise(&self.shared.stopping);
    }
}

/// Group commits, one after another, until the inboxes stop or are dropped.
fn run_flusher(shared: &Shared) {
    // Should a flush ever panic, writers waiting for it get an error, not a hang.
    struct FailOnPanic<'a>(&'a Shared);
    impl Drop for FailOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let afters = {
                    let mut pending = self.0.pending();
                    pending.flusher_gone = true;
                    std::mem::take(&mut pending.afters)
                };
                self.0.durable.send_modify(|d| d.failed = true);
                for (_, after) in afters {
                    after(false);
                }
            }
        }
    }
    let _fail_on_panic = FailOnPanic(shared);
    loop {
        let stage = {
            let mut pending = shared.pending();
            while !(pending.stage_wanted
                || pending.ticket > shared.durable.borrow().ticket
                || shared.stopping.load(Ordering::Acquire)
                || shared.abandoned.load(Ordering::Acquire))
            {
                pending.flusher_idle = true;
                pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            pending.flusher_idle = false;
            std::mem::take(&mut pending.stage_wanted)
        };
        if stage {
            stage_before_flush(shared);
        }
        let batch = {
            let mut pending = shared.pending();
            (pending.ticket > shared.durable.borrow().ticket).then(|| {
                (
                    pending.ticket,
                    pending.last_pos,
                    std::mem::take(&mut pending.writes),
                )
            })
        };
        let Some((ticket, last_pos, writes)) = batch else {
            if stage {
                continue;
            }
            // Woken to stop, or with no handle left.
            if shared.stopping.load(Ordering::Acquire)
                && let Err(e) = shared.store.sync_to_disk()
            {
                error!(error = %e, "final store flush failed");
            }
            shared.pending().flusher_gone = true;
            // The hook usually holds these inboxes; let both go.
            shared
                .before_flush
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            return;
        };
        let started = Instant::now();
        let flushed = shared.store.sync_to_disk();
        shared
            .metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        let durable = match flushed {
            Ok(()) => {
                shared.committed_pos.store(last_pos, Ordering::Release);
                for write in writes {
                    publish(shared, write.deliveries, write.applied_at);
                }
                !shared.durable.borrow().failed
            }
            Err(e) => {
                // Nothing of this batch is acknowledged or delivered; the writers get
                // an error and their clients resend with the same idempotency keys.
                // The failure sticks: the store's journal is in doubt.
                error!(error = %e, "store flush failed; refusing acknowledgements");
                false
            }
        };
        let afters = {
            let mut pending = shared.pending();
            shared.durable.send_modify(|d| {
                d.ticket = ticket;
                d.failed |= !durable;
            });
            pending.settled_afters(ticket)
        };
        for after in afters {
            after(durable);
        }
    }
}

/// Runs the flusher's hook; a panic in it costs that round, not the flusher.
fn stage_before_flush(shared: &Shared) {
    let hook = shared
        .before_flush
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(hook) = hook
        && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook.stage())).is_err()
    {
        error!("staging queued sends panicked; their senders get an error");
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

    fn inboxes(dir: &std::path::Path) -> (Inboxes, Flusher) {
        let store = Store::open(dir).expect("store");
        let metrics = Metrics::new();
        let hub = Hub::new(16, metrics.clone());
        Inboxes::start(store, hub, metrics).expect("inboxes")
    }

    #[tokio::test]
    async fn a_write_is_durable_once_flushed_and_stop_ends_the_flusher() {
        let dir = tempfile::tempdir().expect("dir");
        let (inboxes, flusher) = inboxes(dir.path());
        let reply = inboxes
            .write(|positions| {
                let mut staged = Staged::nothing("done");
                staged.writes.stream_pos = Some(positions.next_pos());
                Ok(staged)
            })
            .await
            .expect("write");
        assert_eq!(reply, "done");
        inboxes.stop();
        let finished = tokio::time::timeout(std::time::Duration::from_secs(10), flusher.finished());
        assert!(finished.await.expect("the flusher ends after stop"));
        let refused = inboxes.apply(|_| Ok(Staged::nothing(())));
        assert!(refused.is_err(), "writes after stop are refused");
    }

    /// A hook that applies one write per wake and says when it is durable.
    struct OneWrite {
        inboxes: Inboxes,
        heard: std::sync::mpsc::Sender<(&'static str, bool)>,
    }

    impl BeforeFlush for OneWrite {
        fn stage(&self) {
            let (ticket, ()) = self
                .inboxes
                .apply(|positions| {
                    let mut staged = Staged::nothing(());
                    staged.writes.stream_pos = Some(positions.next_pos());
                    Ok(staged)
                })
                .expect("apply");
            let heard = self.heard.clone();
            self.inboxes.after_durable(
                ticket,
                Box::new(move |durable| {
                    let _ = heard.send(("staged by the flusher", durable));
                }),
            );
        }
    }

    /// Gives `inboxes` a [`OneWrite`] hook that reports on `heard`.
    fn hook_one_write(inboxes: &Inboxes, heard: std::sync::mpsc::Sender<(&'static str, bool)>) {
        inboxes.set_before_flush(Arc::new(OneWrite {
            inboxes: inboxes.detached(),
            heard,
        }));
    }

    #[tokio::test]
    async fn the_flusher_stages_when_woken_and_answers_once_durable() {
        let dir = tempfile::tempdir().expect("dir");
        let (inboxes, flusher) = inboxes(dir.path());
        let (heard, hear) = std::sync::mpsc::channel();
        hook_one_write(&inboxes, heard.clone());
        // Busy until the flusher thread is waiting for work.
        let wait = std::time::Duration::from_secs(10);
        let started = std::time::Instant::now();
        while inboxes.wake_flusher() != FlusherWake::Woken {
            assert!(
                started.elapsed() < wait,
                "the flusher never waited for work"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(hear.recv_timeout(wait), Ok(("staged by the flusher", true)));
        assert_eq!(inboxes.committed_pos(), 1, "the staged write is committed");

        // A write already durable is answered at once, on the caller's thread.
        let (ticket, ()) = inboxes.apply(|_| Ok(Staged::nothing(()))).expect("apply");
        inboxes.durable(ticket).await.expect("durable");
        inboxes.after_durable(
            ticket,
            Box::new(move |durable| {
                let _ = heard.send(("already durable", durable));
            }),
        );
        assert_eq!(hear.try_recv(), Ok(("already durable", true)));

        inboxes.stop();
        let finished = tokio::time::timeout(wait, flusher.finished());
        assert!(finished.await.expect("the flusher ends after stop"));
        assert_eq!(inboxes.wake_flusher(), FlusherWake::Gone);
    }

    #[tokio::test]
    async fn inboxes_dropped_without_a_stop_let_the_flusher_thread_go() {
        let dir = tempfile::tempdir().expect("dir");
        let (inboxes, flusher) = inboxes(dir.path());
        // A hook that holds the inboxes (detached) does not keep the flusher alive.
        let (heard, _hear) = std::sync::mpsc::channel();
        hook_one_write(&inboxes, heard);
        let other = inboxes.clone();
        drop(inboxes);
        drop(other);
        let finished = tokio::time::timeout(std::time::Duration::from_secs(10), flusher.finished());
        assert!(
            finished
                .await
                .expect("the flusher ends with its last handle")
        );
    }

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
