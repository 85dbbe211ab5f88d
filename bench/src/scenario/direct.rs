//! `direct` (pairs at a total rate) and `max` (pairs with a window in flight): 1:1
//! messages, their ack and delivery latency, and loss.

use std::time::Duration;

use anyhow::Result;
use hearth_client_api::{Client, Target};
use serde_json::json;

use crate::cli::{Env, Subject};
use crate::load::{
    self, Account, Merged, Pace, PeerPlan, Shared, Until, connect, register_many, run_tag,
};
use crate::metrics::{HistogramSummary, NodeMetrics};
use crate::plot::Plot;
use crate::report::{Report, per_sec};
use crate::scenario::{counts, load_plot, metric_rows, spread};
use crate::system::{CpuMeter, rss_kib};

/// How long a single-node load waits, after sending stops, for what is still due.
const DRAIN: Duration = Duration::from_secs(10);

/// Options of `direct`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Total messages per second over all pairs.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// Options of `max`.
#[derive(Debug, Clone, clap::Args)]
pub struct MaxArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Messages each sender keeps in flight (sent, not yet acknowledged).
    #[arg(long, default_value_t = 20)]
    pub window: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// Senders and receivers of a pair load, each with its node's session URL.
pub(crate) struct Pairs {
    /// `(ws url, account)` of each sender.
    pub senders: Vec<(String, Account)>,
    /// `(ws url, account)` of each receiver.
    pub receivers: Vec<(String, Account)>,
    /// Where each sender sends.
    pub targets: Vec<Target>,
}

/// Registers `n` senders on `a` and `n` receivers on `b` (the same node or not) and
/// opens their direct channels.
pub(crate) async fn make_pairs(
    env: &Env,
    a: (&Client, &str),
    b: (&Client, &str),
    n: usize,
) -> Result<Pairs> {
    let tag = run_tag();
    let pb = env.bar(2 * n as u64, "register");
    let senders = register_many(a.0, &format!("s{tag}x"), n, 4, &pb).await?;
    let receivers = register_many(b.0, &format!("r{tag}x"), n, 4, &pb).await?;
    pb.finish_and_clear();
    let mut targets = Vec::with_capacity(n);
    for (s, r) in senders.iter().zip(&receivers) {
        let api = a.0.with_token(s.token.clone());
        // Opening the channel first keeps channel creation out of the measurement.
        targets.push(match api.open_direct(&r.user).await {
            Ok(summary) => Target::Channel(summary.id),
            Err(_) => Target::User(r.user.clone()),
        });
    }
    Ok(Pairs {
        senders: senders.into_iter().map(|s| (a.1.to_string(), s)).collect(),
        receivers: receivers
            .into_iter()
            .map(|r| (b.1.to_string(), r))
            .collect(),
        targets,
    })
}

/// How the senders of a pair load send.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PairPace {
    /// This many messages per second in all.
    Rate(f64),
    /// This many in flight per sender.
    Window(usize),
}

/// Runs a pair load for `secs`: receivers connect first, then senders.
pub(crate) async fn pair_load(
    env: &Env,
    pairs: &Pairs,
    pace: PairPace,
    secs: f64,
    body_bytes: usize,
    node_pids: &[u32],
    drain: Duration,
) -> Result<(Merged, f64, Vec<crate::system::CpuUse>)> {
    let n = pairs.senders.len();
    let pb = env.bar(2 * n as u64, "connect");
    let mut peers = Vec::with_capacity(2 * n);
    for (i, (url, r)) in pairs.receivers.iter().enumerate() {
        let conn = connect(url, &r.token, None).await?;
        pb.inc(1);
        peers.push((
            conn,
            PeerPlan {
                index: (n + i) as u32,
                target: None,
                pace: Pace::Silent,
                body_bytes,
                keep_deliveries: false,
            },
        ));
    }
    for (i, ((url, s), target)) in pairs.senders.iter().zip(&pairs.targets).enumerate() {
        let conn = connect(url, &s.token, None).await?;
        pb.inc(1);
        let pace = match pace {
            PairPace::Rate(total) => {
                let per_sec = total / n as f64;
                Pace::Rate {
                    per_sec,
                    // Spread the senders over one period, plus a second to settle.
                    offset: Duration::from_secs(1)
                        + Duration::from_secs_f64(i as f64 / n as f64 / per_sec),
                }
            }
            PairPace::Window(window) => Pace::Window {
                window,
                limit: u64::MAX,
            },
        };
        peers.push((
            conn,
            PeerPlan {
                index: i as u32,
                target: Some(target.clone()),
                pace,
                body_bytes,
                keep_deliveries: false,
            },
        ));
    }
    pb.finish_and_clear();
    // The run's clock (and the senders' schedules) start once everyone is connected.
    let shared = Shared::new();
    let meters: Vec<CpuMeter> = node_pids
        .iter()
        .map(|p| CpuMeter::start(Some(*p)))
        .collect();
    let meters = if meters.is_empty() {
        vec![CpuMeter::start(None)]
    } else {
        meters
    };
    let pb = env.bar((secs * 1000.0) as u64, "load");
    // Rate peers start one second late (see offset); count that second too.
    let settle = if matches!(pace, PairPace::Rate(_)) {
        1.0
    } else {
        0.0
    };
    let (stats, sending) = load::drive(
        peers,
        &shared,
        Until::Elapsed(Duration::from_secs_f64(secs + settle)),
        |acked| acked,
        drain,
        &pb,
    )
    .await;
    pb.finish_and_clear();
    let cpu = meters.iter().map(CpuMeter::stop).collect();
    Ok((Merged::of(&stats), sending.as_secs_f64() - settle, cpu))
}

/// Adds latency rows and the CPU per thousand messages.
pub(crate) fn latency_rows(
    report: &mut Report,
    m: &mut Merged,
    delivery_target_ms: Option<f64>,
) -> serde_json::Value {
    let ack = m.ack.summary();
    let delivery = m.delivery.summary();
    if let Some(a) = &ack {
        report.figure("ack p50 / p99 / p99.9 / max", spread(a));
    }
    if let Some(d) = &delivery {
        match delivery_target_ms {
            Some(t) => report.against(
                "delivery p50 / p99 / p99.9 / max",
                spread(d),
                format!("p99 <= {t} ms"),
                d.p99_ms <= t,
            ),
            None => report.figure("delivery p50 / p99 / p99.9 / max", spread(d)),
        }
    }
    json!({ "ack_latency": ack, "delivery_latency": delivery })
}

/// `direct` and `max` on one node: its pairs, the load, and the node's histograms
/// over it.
async fn one_node_pairs(
    env: &Env,
    n: usize,
    pace: PairPace,
    secs: f64,
    body_bytes: usize,
) -> Result<(
    Subject,
    Merged,
    f64,
    Vec<crate::system::CpuUse>,
    Vec<(&'static str, HistogramSummary)>,
)> {
    let subject = env.subject()?;
    let client = subject.client()?;
    let ws = subject.ws_url();
    let pairs = make_pairs(env, (&client, &ws), (&client, &ws), n).await?;
    let pids: Vec<u32> = subject.pid.into_iter().collect();
    let node_metrics = NodeMetrics::start(&subject.url).await;
    let (m, secs, cpu) = pair_load(env, &pairs, pace, secs, body_bytes, &pids, DRAIN).await?;
    let histograms = node_metrics.stop().await;
    Ok((subject, m, secs, cpu, histograms))
}

/// `direct`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    let (subject, mut m, secs, cpu, histograms) = one_node_pairs(
        env,
        args.pairs,
        PairPace::Rate(args.rate),
        args.secs,
        args.body_bytes,
    )
    .await?;
    let mut report = Report::new(
        "direct",
        json!({ "scenario": args_json(args), "node": subject.settings }),
    );
    report.figure("target rate", per_sec(args.rate));
    let c = counts(&mut report, &m, m.acked, secs);
    // The target is for 10,000 msg/s; shown at every rate for comparison.
    let l = latency_rows(&mut report, &mut m, Some(5.0));
    let n = metric_rows(&mut report, histograms);
    report.cpu = cpu.into_iter().next();
    report.node_rss_kib = subject.pid.and_then(rss_kib);
    report.results = json!({ "counts": c, "latency": l, "node_metrics": n });
    let plot = load_plot(
        format!(
            "direct: {} pairs at {} msg/s for {} s",
            args.pairs, args.rate, args.secs
        ),
        &mut m,
    );
    Ok((report, Some(plot)))
}

fn args_json(a: &Args) -> serde_json::Value {
    json!({ "pairs": a.pairs, "rate": a.rate, "secs": a.secs, "body_bytes": a.body_bytes })
}

/// `max`.
pub async fn run_max(env: &Env, args: &MaxArgs) -> Result<(Report, Option<Plot>)> {
    let (subject, mut m, secs, cpu, histograms) = one_node_pairs(
        env,
        args.pairs,
        PairPace::Window(args.window),
        args.secs,
        args.body_bytes,
    )
    .await?;
    let mut report = Report::new(
        "max",
        json!({
            "scenario": { "pairs": args.pairs, "window": args.window, "secs": args.secs, "body_bytes": args.body_bytes },
            "node": subject.settings,
            "method": "closed loop: each sender keeps `window` messages sent but not yet acknowledged; the rate is what the node sustains"
        }),
    );
    let c = counts(&mut report, &m, m.acked, secs);
    let rate = super::delivery_rate(&m, secs);
    let lost = m.acked_never_delivered + m.acked.saturating_sub(m.delivered);
    report.against(
        "sustained 1:1 rate, nothing lost",
        per_sec(rate),
        ">= 50,000 msg/s",
        rate >= 50_000.0 && lost == 0 && m.closed.is_empty(),
    );
    let l = latency_rows(&mut report, &mut m, None);
    let n = metric_rows(&mut report, histograms);
    let cpu = cpu.into_iter().next();
    if let Some(node_s) = cpu.as_ref().and_then(|c| c.node_cpu_s)
        && m.acked > 0
    {
        report.figure(
            "node CPU per 1,000 messages",
            format!("{:.3} s", node_s / m.acked as f64 * 1000.0),
        );
    }
    report.cpu = cpu;
    report.node_rss_kib = subject.pid.and_then(rss_kib);
    report.results = json!({ "counts": c, "latency": l, "rate": rate, "node_metrics": n });
    let plot = load_plot(
        format!("max: {} pairs, {} in flight each", args.pairs, args.window),
        &mut m,
    );
    Ok((report, Some(plot)))
}
