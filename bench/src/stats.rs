//! Latency samples and throughput timelines.

use serde::Serialize;

/// Width of one timeline bucket.
pub const BUCKET_MS: u64 = 100;

/// Latency samples in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    us: Vec<u32>,
    sorted: bool,
}

/// Percentiles of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Samples {
    /// Adds one sample.
    pub fn push_us(&mut self, us: u64) {
        self.us.push(u32::try_from(us).unwrap_or(u32::MAX));
        self.sorted = false;
    }

    /// Adds all of `other`'s samples.
    pub fn extend(&mut self, other: &Samples) {
        self.us.extend_from_slice(&other.us);
        self.sorted = false;
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.us.len()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.us.sort_unstable();
            self.sorted = true;
        }
    }

    /// The `q` quantile (0..=1) in milliseconds, nearest rank.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        self.sort();
        if self.us.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.us.len() as f64).ceil() as usize).clamp(1, self.us.len());
        f64::from(self.us[rank - 1]) / 1000.0
    }

    /// Percentiles, or `None` without samples.
    pub fn summary(&mut self) -> Option<Summary> {
        if self.us.is_empty() {
            return None;
        }
        let mean_ms =
            self.us.iter().map(|&u| f64::from(u)).sum::<f64>() / self.us.len() as f64 / 1000.0;
        Some(Summary {
            count: self.us.len(),
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.quantile_ms(1.0),
            mean_ms,
        })
    }

    /// Points of the cumulative distribution, `(latency ms, fraction)`, at most
    /// about `points` of them.
    pub fn cdf(&mut self, points: usize) -> Vec<(f64, f64)> {
        self.sort();
        let n = self.us.len();
        if n == 0 {
            return Vec::new();
        }
        let step = (n / points.max(1)).max(1);
        let mut out: Vec<(f64, f64)> = (0..n)
            .step_by(step)
            .map(|i| (f64::from(self.us[i]) / 1000.0, (i + 1) as f64 / n as f64))
            .collect();
        out.push((f64::from(self.us[n - 1]) / 1000.0, 1.0));
        out
    }
}

/// Counts per [`BUCKET_MS`] bucket since the start of a run.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    counts: Vec<u32>,
}

impl Timeline {
    /// Counts one event at `t_us` microseconds since the start.
    pub fn add(&mut self, t_us: u64) {
        let i = (t_us / 1000 / BUCKET_MS) as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }

    /// Adds all of `other`'s counts.
    pub fn merge(&mut self, other: &Timeline) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// Seconds from the start to the end of the last bucket with an event (0 if none).
    pub fn end_secs(&self) -> f64 {
        let used = self
            .counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |i| i + 1);
        (used as u64 * BUCKET_MS) as f64 / 1000.0
    }

    /// Seconds from the start to the beginning of the first bucket with an event.
    pub fn start_secs(&self) -> f64 {
        let first = self.counts.iter().position(|&c| c > 0).unwrap_or(0);
        (first as u64 * BUCKET_MS) as f64 / 1000.0
    }

    /// `(seconds since start, events per second)` for each bucket.
    pub fn rate_series(&self) -> Vec<(f64, f64)> {
        let per_sec = 1000.0 / BUCKET_MS as f64;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                (
                    (i as u64 * BUCKET_MS) as f64 / 1000.0,
                    f64::from(c) * per_sec,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_knows_its_first_and_last_busy_buckets_not_its_empty_edges() {
        let mut t = Timeline::default();
        assert_eq!(t.end_secs(), 0.0);
        t.add(1_250_000);
        t.add(3_450_000);
        assert!((t.start_secs() - 1.2).abs() < 1e-9, "{}", t.start_secs());
        assert!((t.end_secs() - 3.5).abs() < 1e-9, "{}", t.end_secs());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for us in 1..=1000 {
            s.push_us(us * 1000);
        }
        let sum = s.summary().expect("samples");
        assert_eq!(sum.count, 1000);
        assert_eq!(sum.p50_ms, 500.0);
        assert_eq!(sum.p99_ms, 990.0);
        assert_eq!(sum.p999_ms, 999.0);
        assert_eq!(sum.max_ms, 1000.0);
        assert!(Samples::default().summary().is_none());
    }

    #[test]
    fn timeline_rates() {
        let mut t = Timeline::default();
        t.add(50_000);
        t.add(60_000);
        t.add(250_000);
        let mut u = Timeline::default();
        u.add(10);
        t.merge(&u);
        let r = t.rate_series();
        assert_eq!(r[0], (0.0, 30.0));
        assert_eq!(r[2], (0.2, 10.0));
    }
}
