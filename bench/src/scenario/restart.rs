//! `restart`: M messages are stored through the API, the node is stopped
//! gracefully, and the figure is the time from starting the process again until it
//! reports ready (and until a session works).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;

use crate::cli::Env;
use crate::load::{self, Pace, PeerPlan, Shared, Until, connect, register_many, run_tag};
use crate::node::NodeProc;
use crate::plot::Plot;
use crate::report::{Report, ms, per_sec};
use crate::scenario::direct::make_pairs;

/// Options of `restart`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Messages stored before the restart.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Sender/receiver pairs that store them.
    #[arg(long, default_value_t = 20)]
    pub pairs: usize,
    /// Restarts measured (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `restart`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    env.own_nodes_only("restart")?;
    let spec = env.spec("node");
    let node = NodeProc::start(&spec)?;
    let first_ready = node.ready_after;
    let client = hearth_client_api::Client::new(&node.url())?;
    let ws = format!("ws://{}/v1/ws", node.addr);
    let pairs = make_pairs(env, (&client, &ws), (&client, &ws), args.pairs.max(1)).await?;
    let n = pairs.senders.len() as u64;
    let per = args.messages.div_ceil(n);
    let mut peers = Vec::new();
    for (i, ((url, s), target)) in pairs.senders.iter().zip(&pairs.targets).enumerate() {
        peers.push((
            connect(url, &s.token, None).await?,
            PeerPlan {
                index: i as u32,
                target: Some(target.clone()),
                pace: Pace::Window {
                    window: 32,
                    limit: per,
                },
                body_bytes: 64,
                keep_deliveries: false,
            },
        ));
    }
    let total = per * n;
    let shared = Shared::new();
    let pb = env.bar(total, "store");
    let fill_began = Instant::now();
    let (stats, _) = load::drive(
        peers,
        &shared,
        Until::Answered(total),
        |_| 0,
        Duration::from_secs(30),
        &pb,
    )
    .await;
    pb.finish_and_clear();
    let fill = fill_began.elapsed();
    let stored: u64 = stats.iter().map(|s| s.acked).sum();
    if stored < total {
        bail!("only {stored} of {total} messages were acknowledged");
    }
    let mut node = node;
    let mut stops = Vec::new();
    let mut readies = Vec::new();
    let mut sessions = Vec::new();
    let probe = register_many(
        &client,
        &format!("p{}x", run_tag()),
        1,
        1,
        &indicatif::ProgressBar::hidden(),
    )
    .await?;
    let pb = env.bar(args.rounds as u64, "restart");
    for _ in 0..args.rounds.max(1) {
        stops.push(node.stop()?);
        let began = Instant::now();
        node = NodeProc::start(&spec)?;
        readies.push(node.ready_after);
        // Ready means serving: a session authenticates and gets its backlog.
        let ws = format!("ws://{}/v1/ws", node.addr);
        let conn = connect(&ws, &probe[0].token, None).await?;
        sessions.push(began.elapsed());
        let _ = conn.close().await;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let bytes = dir_size(&spec.data_dir);
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let ready = median(&mut readies.clone());
    let session = median(&mut sessions.clone());
    let stop = median(&mut stops.clone());
    let mut report = Report::new(
        "restart",
        json!({
            "scenario": { "messages": total, "pairs": n, "rounds": args.rounds },
            "node": spec.settings(),
        }),
    );
    report.figure("messages stored", total.to_string());
    report.figure(
        "storing them (durable acks)",
        format!(
            "{:.1} s, {}",
            fill.as_secs_f64(),
            per_sec(total as f64 / fill.as_secs_f64())
        ),
    );
    report.figure(
        "data folder size",
        format!("{:.1} MiB", bytes as f64 / 1048576.0),
    );
    report.figure(
        "first start to ready (empty store)",
        ms(first_ready.as_secs_f64() * 1000.0),
    );
    report.figure("graceful stop (median)", ms(stop.as_secs_f64() * 1000.0));
    // The target is for 10 million stored messages; a smaller store only shows the trend.
    if total >= 10_000_000 {
        report.against(
            "process start to ready (median)",
            ms(ready.as_secs_f64() * 1000.0),
            "<= 2 s with 10 million messages",
            ready <= Duration::from_secs(2),
        );
    } else {
        report.figure(
            format!("process start to ready (median), {total} messages"),
            ms(ready.as_secs_f64() * 1000.0),
        );
    }
    report.figure(
        "process start to first session ready (median)",
        ms(session.as_secs_f64() * 1000.0),
    );
    report.node_rss_kib = crate::system::rss_kib(node.pid);
    report.results = json!({
        "messages": total,
        "fill_secs": fill.as_secs_f64(),
        "data_bytes": bytes,
        "ready_ms": readies.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "session_ms": sessions.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "stop_ms": stops.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
    });
    Ok((report, None))
}
