//! The node's own view: histograms scraped from `GET /metrics` before and after a
//! load, so a report can say how long the node's store flushes took meanwhile.

use serde::Serialize;

/// A histogram's cumulative buckets: `(upper bound in seconds, count)`, plus sum
/// and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// What a histogram says about the interval between two scrapes.
#[derive(Debug, Clone, Serialize)]
pub struct HistogramSummary {
    /// Observations.
    pub count: u64,
    /// Mean in milliseconds.
    pub mean_ms: f64,
    /// Upper bound of the bucket holding the median, in milliseconds.
    pub p50_le_ms: f64,
    /// Upper bound of the bucket holding the 99th percentile, in milliseconds.
    pub p99_le_ms: f64,
    /// Upper bound of the highest non-empty bucket (infinite past the last bound).
    pub max_le_ms: f64,
}

/// Fetches the node's metrics text.
pub async fn scrape(base_url: &str) -> Option<String> {
    let url = format!("{}/metrics", base_url.trim_end_matches('/'));
    let response = reqwest::get(url).await.ok()?;
    response.text().await.ok()
}

/// Parses histogram `name` (without the `_bucket` suffix) from metrics text.
pub fn histogram(text: &str, name: &str) -> Option<Histogram> {
    let mut h = Histogram::default();
    let bucket = format!("{name}_bucket{{le=\"");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&bucket) {
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            h.buckets.push((le, count.trim().parse().ok()?));
        } else if let Some(v) = line.strip_prefix(&format!("{name}_sum ")) {
            h.sum = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix(&format!("{name}_count ")) {
            h.count = v.trim().parse().ok()?;
        }
    }
    (!h.buckets.is_empty()).then_some(h)
}

impl Histogram {
    /// What was observed between `earlier` and `self`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c.saturating_sub(before(le))))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    fn quantile_le(&self, q: f64) -> f64 {
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map_or(f64::INFINITY, |(le, _)| *le)
    }

    /// The interval's summary, or `None` if nothing was observed.
    pub fn summary(&self) -> Option<HistogramSummary> {
        if self.count == 0 {
            return None;
        }
        let total = self.count;
        let max_le = self
            .buckets
            .iter()
            .find(|(_, c)| *c >= total)
            .map_or(f64::INFINITY, |(le, _)| *le);
        Some(HistogramSummary {
            count: self.count,
            mean_ms: self.sum / self.count as f64 * 1000.0,
            p50_le_ms: self.quantile_le(0.5) * 1000.0,
            p99_le_ms: self.quantile_le(0.99) * 1000.0,
            max_le_ms: max_le * 1000.0,
        })
    }
}

/// Scrapes before a load, then summarises the node's flush and delivery
/// histograms over it.
pub struct NodeMetrics {
    url: String,
    before: Option<String>,
}

impl NodeMetrics {
    /// Takes the first scrape.
    pub async fn start(url: &str) -> NodeMetrics {
        NodeMetrics {
            url: url.to_string(),
            before: scrape(url).await,
        }
    }

    /// Takes the second scrape and summarises the interval:
    /// `[("store write", ..), ("store flush", ..), ("accept to socket write", ..)]`.
    pub async fn stop(&self) -> Vec<(&'static str, HistogramSummary)> {
        let (Some(before), Some(after)) = (&self.before, scrape(&self.url).await) else {
            return Vec::new();
        };
        [
            ("store write", "hearth_store_write_seconds"),
            ("store flush", "hearth_store_flush_seconds"),
            ("accept to socket write", "hearth_delivery_seconds"),
        ]
        .into_iter()
        .filter_map(|(what, name)| {
            let a = histogram(&after, name)?;
            let b = histogram(before, name).unwrap_or_default();
            Some((what, a.since(&b).summary()?))
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE hearth_store_flush_seconds histogram
hearth_store_flush_seconds_sum 0.5
hearth_store_flush_seconds_count 10
hearth_store_flush_seconds_bucket{le=\"0.001\"} 5
hearth_store_flush_seconds_bucket{le=\"0.01\"} 9
hearth_store_flush_seconds_bucket{le=\"0.1\"} 10
hearth_store_flush_seconds_bucket{le=\"+Inf\"} 10
";

    #[test]
    fn parses_and_summarises() {
        let h = histogram(TEXT, "hearth_store_flush_seconds").expect("histogram");
        let s = h.since(&Histogram::default()).summary().expect("summary");
        assert_eq!(s.count, 10);
        assert_eq!(s.p50_le_ms, 1.0);
        assert_eq!(s.p99_le_ms, 100.0);
        assert_eq!(s.max_le_ms, 100.0);
        assert!((s.mean_ms - 50.0).abs() < 1e-9);
        assert!(h.since(&h).summary().is_none());
        assert!(histogram(TEXT, "nope").is_none());
    }
}
