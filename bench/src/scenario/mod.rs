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
    let lost = expected.saturating_sub(m.delivered);
    let unanswered = m
        .sent
        .saturating_sub(m.acked + m.errors.values().sum::<u64>());
    report.figure("sent", m.sent.to_string());
    report.figure("acknowledged", m.acked.to_string());
    report.figure(
        "delivered",
        format!("{} of {expected} expected", m.delivered),
    );
    report.against("lost", lost.to_string(), "0", lost == 0);
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
    report.figure("delivery rate", per_sec(m.delivered as f64 / secs));
    json!({
        "sent": m.sent,
        "acked": m.acked,
        "errors": m.errors,
        "delivered": m.delivered,
        "expected_deliveries": expected,
        "lost": lost,
        "duplicates": m.duplicates,
        "unanswered": unanswered,
        "sessions_ended_early": m.closed,
        "sending_secs": secs,
        "send_rate": m.sent as f64 / secs,
        "delivery_rate": m.delivered as f64 / secs,
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
