//! The report of a run: the figures as a human table, and everything as JSON.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::system::{CpuUse, Machine};

/// What every report says about durability: the node acknowledges a message only
/// after the store flushed it to disk (group commit); there is no faster mode.
pub const DURABILITY: &str = "durable acks: every ack follows a flush of the store to disk (group commit); the node has no non-durable mode";

/// One figure of the human table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured.
    pub figure: String,
    /// The measured value, formatted.
    pub value: String,
    /// The target, if it sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Whether the target is met.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// The report of one scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `hearth-bench`.
    pub tool: &'static str,
    /// The tool's version.
    pub version: &'static str,
    /// Scenario name.
    pub scenario: String,
    /// When the run ended (UTC, ISO 8601).
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// The scenario's parameters and the nodes' settings.
    pub settings: serde_json::Value,
    /// See [`DURABILITY`].
    pub durability: &'static str,
    /// Threads of the tool's runtime (they share the machine with the node).
    pub tool_threads: usize,
    /// CPU use of the tool and of the node over the measured phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    /// The node's resident memory at the end, in KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_rss_kib: Option<u64>,
    /// The figures, as shown in the table.
    pub figures: Vec<Row>,
    /// Scenario-specific details (counts, latency summaries, series).
    pub results: serde_json::Value,
    /// Where the plot was written, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plot: Option<PathBuf>,
}

impl Report {
    /// A report of `scenario` with no figures yet.
    pub fn new(scenario: &str, settings: serde_json::Value) -> Report {
        Report {
            tool: "hearth-bench",
            version: env!("CARGO_PKG_VERSION"),
            scenario: scenario.to_string(),
            date: utc_now(),
            machine: Machine::detect(),
            settings,
            durability: DURABILITY,
            tool_threads: 0,
            cpu: None,
            node_rss_kib: None,
            figures: Vec::new(),
            results: serde_json::Value::Null,
            plot: None,
        }
    }

    /// Adds a figure without a target.
    pub fn figure(&mut self, figure: impl Into<String>, value: impl Into<String>) {
        self.figures.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: None,
            met: None,
        });
    }

    /// Adds a figure with a target and whether it is met.
    pub fn against(
        &mut self,
        figure: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) {
        self.figures.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: Some(target.into()),
            met: Some(met),
        });
    }

    /// A figure by name (for tests and callers that check results).
    pub fn value(&self, figure: &str) -> Option<&str> {
        self.figures
            .iter()
            .find(|r| r.figure == figure)
            .map(|r| r.value.as_str())
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 3]> = vec![["figure".into(), "value".into(), "target".into()]];
        for r in &self.figures {
            let target = match (&r.target, r.met) {
                (Some(t), Some(true)) => format!("{t} (met)"),
                (Some(t), Some(false)) => format!("{t} (MISSED)"),
                (Some(t), None) => t.clone(),
                (None, _) => String::new(),
            };
            rows.push([r.figure.clone(), r.value.clone(), target]);
        }
        if let Some(cpu) = &self.cpu {
            let fmt = |s: Option<f64>, p: Option<f64>| match (s, p) {
                (Some(s), Some(p)) => format!("{s:.2} s ({p:.0}% of a core)"),
                _ => "n/a".into(),
            };
            let waited = |w: Option<f64>, ran: Option<f64>| match (w, ran) {
                (Some(w), Some(r)) if r > 0.0 => {
                    format!("{w:.2} s ({:.0}% of its CPU time)", 100.0 * w / r)
                }
                (Some(w), _) => format!("{w:.2} s"),
                _ => "n/a".into(),
            };
            for (what, value) in [
                ("node CPU", fmt(cpu.node_cpu_s, cpu.node_cpu_pct)),
                (
                    "bench CPU (this tool)",
                    fmt(cpu.bench_cpu_s, cpu.bench_cpu_pct),
                ),
                (
                    "node waiting for a core",
                    waited(cpu.node_cpu_wait_s, cpu.node_cpu_s),
                ),
                (
                    "bench waiting for a core",
                    waited(cpu.bench_cpu_wait_s, cpu.bench_cpu_s),
                ),
            ] {
                rows.push([what.into(), value, String::new()]);
            }
            rows.push([
                "bench runtime threads".into(),
                self.tool_threads.to_string(),
                String::new(),
            ]);
        }
        if let Some(rss) = self.node_rss_kib {
            rows.push([
                "node RSS at end".into(),
                format!("{:.1} MiB", rss as f64 / 1024.0),
                String::new(),
            ]);
        }
        let widths: Vec<usize> = (0..3)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = format!(
            "{} — {} cores, {} MiB, {}\n",
            self.scenario,
            self.machine.cores,
            self.machine.memory_mib.unwrap_or(0),
            self.date
        );
        for (i, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&rule.join("  "));
                out.push('\n');
            }
        }
        out.push_str(DURABILITY);
        out.push('\n');
        out
    }

    /// Writes the JSON report to `dir/<scenario>-<date>.json` and returns its path.
    pub fn write_json(&self, dir: &Path, stem: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{stem}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(self)?)?;
        Ok(path)
    }
}

/// Formats a count per second.
pub fn per_sec(v: f64) -> String {
    format!("{v:.0} msg/s")
}

/// Formats milliseconds.
pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    utc(secs)
}

fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn table_marks_targets() {
        let mut r = Report::new("direct", serde_json::json!({}));
        r.against("p99", "1 ms", "<= 5 ms", true);
        r.against("rate", "10 msg/s", ">= 50,000 msg/s", false);
        r.figure("sent", "10");
        let t = r.table();
        assert!(t.contains("(met)") && t.contains("(MISSED)") && t.contains("durable"));
        assert_eq!(r.value("sent"), Some("10"));
    }
}
