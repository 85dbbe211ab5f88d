//! Prometheus metrics of one node, in a registry of its own (no process-wide recorder).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The node's metrics; clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    /// Open authenticated WebSocket sessions.
    pub connections: Gauge,
    /// Frames received from clients.
    pub frames_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Messages stored.
    pub messages: Counter,
    /// Sessions closed because they did not read fast enough.
    pub slow_disconnects: Counter,
    /// Seconds from accepting an event (applying its write to the store, before the
    /// flush that makes it durable) to writing it to a recipient's socket.
    pub delivery_seconds: Histogram,
    /// Seconds per store flush (one flush acknowledges a whole group of writes).
    pub flush_seconds: Histogram,
    /// Seconds to apply one write set to the store, not counting its flush. Long
    /// ones mean the disk held up writing itself (the engine's journal waits for
    /// it), which delays everything queued behind the write.
    pub write_seconds: Histogram,
    /// Events taken in from other servers.
    pub federation_in: Counter,
    /// Events delivered to other servers.
    pub federation_out: Counter,
    /// Pushes other servers answered; events out per push tells how well the
    /// outboxes batch under load.
    pub federation_pushes: Counter,
    /// Outbox entries dropped past the outbox retention (the destination catches up).
    pub federation_outbox_expired: Counter,
    /// Events, descriptors and announcements from other servers that were refused.
    pub federation_refused: Counter,
    /// Servers connected now.
    pub federation_peers: Gauge,
    /// Push notifications accepted by a push service or webhook.
    pub push_sent: Counter,
    /// Push notifications given up (refused, or out of attempts).
    pub push_failed: Counter,
    /// Push deliveries that failed for now and were scheduled again.
    pub push_retried: Counter,
    /// Push targets removed because their service answered 404 or 410.
    pub push_removed: Counter,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics in a new registry.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hearth");
        let connections = Gauge::default();
        let frames_in = Counter::default();
        let frames_out = Counter::default();
        let messages = Counter::default();
        let slow_disconnects = Counter::default();
        // 50 µs to about 3 s.
        let delivery_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let flush_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let write_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let federation_in = Counter::default();
        let federation_out = Counter::default();
        let federation_pushes = Counter::default();
        let federation_outbox_expired = Counter::default();
        let federation_refused = Counter::default();
        let federation_peers = Gauge::default();
        let push_sent = Counter::default();
        let push_failed = Counter::default();
        let push_retried = Counter::default();
        let push_removed = Counter::default();
        registry.register(
            "push_sent",
            "Push notifications accepted by a push service or webhook",
            push_sent.clone(),
        );
        registry.register(
            "push_failed",
            "Push notifications given up (refused, or out of attempts)",
            push_failed.clone(),
        );
        registry.register(
            "push_retried",
            "Push deliveries that failed for now and were scheduled again",
            push_retried.clone(),
        );
        registry.register(
            "push_removed",
            "Push targets removed because their service answered 404 or 410",
            push_removed.clone(),
        );
        registry.register(
            "federation_events_in",
            "Events taken in from other servers",
            federation_in.clone(),
        );
        registry.register(
            "federation_events_out",
            "Events delivered to other servers",
            federation_out.clone(),
        );
        registry.register(
            "federation_pushes",
            "Pushes other servers answered",
            federation_pushes.clone(),
        );
        registry.register(
            "federation_outbox_expired",
            "Outbox entries dropped after the outbox retention; their servers get them by catch-up",
            federation_outbox_expired.clone(),
        );
        registry.register(
            "federation_refused",
            "Events, descriptors and announcements from other servers that were refused",
            federation_refused.clone(),
        );
        registry.register(
            "federation_peers",
            "Servers connected now",
            federation_peers.clone(),
        );
        registry.register(
            "connections",
            "Open WebSocket sessions",
            connections.clone(),
        );
        registry.register(
            "frames_in",
            "Frames received from clients",
            frames_in.clone(),
        );
        registry.register(
            "frames_out",
            "Frames written to clients",
            frames_out.clone(),
        );
        registry.register("messages", "Messages stored", messages.clone());
        registry.register(
            "slow_disconnects",
            "Sessions closed because their queue overflowed",
            slow_disconnects.clone(),
        );
        registry.register(
            "delivery_seconds",
            "Time from accepting an event (its write applied, not yet flushed) to writing it to a recipient",
            delivery_seconds.clone(),
        );
        registry.register(
            "store_flush_seconds",
            "Duration of store flushes",
            flush_seconds.clone(),
        );
        registry.register(
            "store_write_seconds",
            "Time to apply one write set to the store, before its flush",
            write_seconds.clone(),
        );
        Metrics {
            connections,
            frames_in,
            frames_out,
            messages,
            slow_disconnects,
            delivery_seconds,
            flush_seconds,
            write_seconds,
            federation_in,
            federation_out,
            federation_pushes,
            federation_outbox_expired,
            federation_refused,
            federation_peers,
            push_sent,
            push_failed,
            push_retried,
            push_removed,
            registry: Arc::new(registry),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics encoding failed");
        }
        out
    }
}
