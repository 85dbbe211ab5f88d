//! One module per scenario; each returns its report and, where it has one, its plot.

pub mod catchup;
pub mod devices;
pub mod direct;
pub mod federation;
pub mod group;
pub mod idle;
pub mod restart;

use serde_json::json;

use crate::load::Merged;
use crate::metrics::HistogramSummary;
use crate::plot::Plot;
use crate::report::{Report, ms, per_sec};
use crate::stats::Summary;

/// Adds the counts of a load to the report and returns them as JSON.
pub(crate) fn counts(
    report: &mut Report,
    m: &Merged,
    expected: u64,
    secs: f64,
) -> serde_json::Value {
    let missing = expected.saturating_sub(m.delivered);
    let lost = m.acked_never_delivered;
    let unanswered = m
        .sent
        .saturating_sub(m.acked + m.errors.values().sum::<u64>());
    report.figure("sent", m.sent.to_string());
    report.figure("acknowledged", m.acked.to_string());
    report.figure(
        "delivered",
        format!("{} of {expected} expected for the acks", m.delivered),
    );
    report.against(
        "lost (acknowledged, never delivered)",
        lost.to_string(),
        "0",
        lost == 0,
    );
    if missing > 0 {
        report.figure("deliveries missing", missing.to_string());
    }
    if m.stale > 0 {
        report.figure(
            "deliveries of an earlier phase's messages",
            m.stale.to_string(),
        );
    }
    if m.delivered_unacked > 0 {
        report.figure(
            "delivered but never acknowledged",
            m.delivered_unacked.to_string(),
        );
    }
    report.against(
        "duplicated",
        m.duplicates.to_string(),
        "0",
        m.duplicates == 0,
    );
    if unanswered > 0 || !m.errors.is_empty() {
        report.figure(
            "unanswered sends / errors",
            format!("{unanswered} / {:?}", m.errors),
        );
    }
    if !m.closed.is_empty() {
        report.figure(
            "sessions ended early",
            format!("{} (first: {})", m.closed.len(), m.closed[0]),
        );
    }
    report.figure("send rate achieved", per_sec(m.sent as f64 / secs));
    report.figure("delivery rate", per_sec(delivery_rate(m, secs)));
    json!({
        "sent": m.sent,
        "acked": m.acked,
        "errors": m.errors,
        "delivered": m.delivered,
        "expected_deliveries": expected,
        "lost": lost,
        "missing_deliveries": missing,
        "delivered_unacked": m.delivered_unacked,
        "stale_deliveries": m.stale,
        "missing_deliveries": missing,
        "delivered_unacked": m.delivered_unacked,
        "stale_deliveries": m.stale,
        "duplicates": m.duplicates,
        "unanswered": unanswered,
        "sessions_ended_early": m.closed,
        "sending_secs": secs,
        "send_rate": m.sent as f64 / secs,
        "delivery_rate": delivery_rate(m, secs),
    })
}

/// `p50 / p99 / p99.9 / max` of a summary.
pub(crate) fn spread(s: &Summary) -> String {
    format!(
        "{} / {} / {} / {}",
        ms(s.p50_ms),
        ms(s.p99_ms),
        ms(s.p999_ms),
        ms(s.max_ms)
    )
}

/// Deliveries per second over the time they took: from the first send to the last
/// delivery, or the load's `secs` if that is longer. A backlog that drains after the
/// senders stopped counts at the rate it really arrived.
pub(crate) fn delivery_rate(m: &Merged, secs: f64) -> f64 {
    let took = m.delivered_timeline.end_secs() - m.sent_timeline.start_secs();
    m.delivered as f64 / secs.max(took)
}

/// The plot of a load: ack and delivery latency, send and delivery rates.
pub(crate) fn load_plot(title: String, m: &mut Merged) -> Plot {
    let mut latencies = Vec::new();
    if m.ack.len() > 0 {
        latencies.push(("ack (durable)".to_string(), m.ack.cdf(400)));
    }
    if m.delivery.len() > 0 {
        latencies.push(("delivery".to_string(), m.delivery.cdf(400)));
    }
    Plot {
        title,
        latencies,
        series: vec![
            ("sent".into(), m.sent_timeline.rate_series()),
            ("delivered".into(), m.delivered_timeline.rate_series()),
        ],
        series_title: "throughput over time".into(),
        series_x: "seconds".into(),
        series_y: "messages per second".into(),
    }
}

/// Adds the node's own histograms over the load (bucket bounds, so "<=").
pub(crate) fn metric_rows(
    report: &mut Report,
    histograms: Vec<(&'static str, HistogramSummary)>,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (what, h) in histograms {
        report.figure(
            format!("node metrics: {what} p50 / p99 / max"),
            format!(
                "<= {} / <= {} / <= {} ({} observed, mean {})",
                ms(h.p50_le_ms),
                ms(h.p99_le_ms),
                ms(h.max_le_ms),
                h.count,
                ms(h.mean_ms)
            ),
        );
        out.insert(what.to_string(), json!(h));
    }
    serde_json::Value::Object(out)
}
