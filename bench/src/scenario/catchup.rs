//! `catchup`: K messages are sent to a device while it is away; then it connects
//! and the figure is the time until it holds all K.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hearth_client_api::model::EventContent;
use hearth_client_api::{ServerFrame, Target};
use serde_json::json;

use crate::cli::Env;
use crate::load::{self, Pace, PeerPlan, Shared, Until, connect, register_many, run_tag};
use crate::plot::Plot;
use crate::report::{Report, ms, per_sec};
use crate::system::{CpuMeter, rss_kib};

/// Options of `catchup`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Messages sent while the device is away.
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Times the device reconnects from the same cursor (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// One reconnect: `(time to ready, time to all, sync frames)`.
async fn catch_up(ws: &str, token: &str, k: u64) -> Result<(Duration, Duration, usize)> {
    let t0 = Instant::now();
    let conn = connect(ws, token, None).await?;
    let ready = t0.elapsed();
    let (_tx, mut rx, _) = conn.split();
    let mut seen = HashSet::new();
    let mut frames = 0;
    let deadline = Duration::from_secs(300);
    while (seen.len() as u64) < k {
        let frame = tokio::time::timeout(deadline.saturating_sub(t0.elapsed()), rx.next_frame())
            .await
            .map_err(|_| anyhow::anyhow!("catch-up not done within {deadline:?}"))??;
        let events = match frame {
            Some(ServerFrame::Sync { events, .. }) => {
                frames += 1;
                events
            }
            Some(ServerFrame::Event { event }) => vec![event],
            Some(_) => continue,
            None => bail!("the session ended during catch-up"),
        };
        for e in events {
            if let EventContent::Message { body } = &e.content {
                seen.insert(body.split(':').take(3).collect::<Vec<_>>().join(":"));
            }
        }
    }
    Ok((ready, t0.elapsed(), frames))
}

/// `catchup`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    let subject = env.subject()?;
    let client = subject.client()?;
    let ws = subject.ws_url();
    let pb = env.bar(2, "register");
    let users = register_many(&client, &format!("c{}x", run_tag()), 2, 2, &pb).await?;
    pb.finish_and_clear();
    let (sender, away) = (&users[0], &users[1]);
    let channel = client
        .with_token(sender.token.clone())
        .open_direct(&away.user)
        .await?;
    let fill_began = Instant::now();
    let shared = Shared::new();
    let pb = env.bar(args.messages, "send");
    let (stats, _) = load::drive(
        vec![(
            connect(&ws, &sender.token, None).await?,
            PeerPlan {
                index: 0,
                target: Some(Target::Channel(channel.id.clone())),
                pace: Pace::Window {
                    window: 64,
                    limit: args.messages,
                },
                body_bytes: args.body_bytes,
                keep_deliveries: false,
            },
        )],
        &shared,
        Until::Answered(args.messages),
        |_| 0,
        Duration::from_secs(30),
        &pb,
    )
    .await;
    pb.finish_and_clear();
    let fill = fill_began.elapsed();
    let acked: u64 = stats.iter().map(|s| s.acked).sum();
    if acked < args.messages {
        bail!(
            "only {acked} of {} messages were acknowledged",
            args.messages
        );
    }
    let meter = CpuMeter::start(subject.pid);
    let pb = env.bar(args.rounds as u64, "catch up");
    let mut rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        rounds.push(catch_up(&ws, &away.token, args.messages).await?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let cpu = meter.stop();
    let mut totals: Vec<Duration> = rounds.iter().map(|r| r.1).collect();
    totals.sort();
    let median = totals[totals.len() / 2];
    let (ready, _, frames) = rounds[0];
    let mut report = Report::new(
        "catchup",
        json!({
            "scenario": { "messages": args.messages, "rounds": args.rounds, "body_bytes": args.body_bytes },
            "node": subject.settings,
        }),
    );
    report.figure("messages waiting", args.messages.to_string());
    report.figure(
        "filling them (one sender, 64 in flight)",
        format!(
            "{:.1} s, {}",
            fill.as_secs_f64(),
            per_sec(args.messages as f64 / fill.as_secs_f64())
        ),
    );
    report.figure("connect to ready", ms(ready.as_secs_f64() * 1000.0));
    // Target: 10,000 in at most 1 s, i.e. at least 10,000 messages per second.
    let rate = args.messages as f64 / median.as_secs_f64();
    report.against(
        "connect to all messages (median)",
        format!("{} ({})", ms(median.as_secs_f64() * 1000.0), per_sec(rate)),
        "10,000 in <= 1 s",
        rate >= 10_000.0,
    );
    report.figure("sync frames", frames.to_string());
    report.cpu = Some(cpu);
    report.node_rss_kib = subject.pid.and_then(rss_kib);
    report.results = json!({
        "fill_secs": fill.as_secs_f64(),
        "ready_ms": ready.as_secs_f64() * 1000.0,
        "rounds_ms": rounds.iter().map(|r| r.1.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "median_ms": median.as_secs_f64() * 1000.0,
        "sync_frames": frames,
        "rate": rate,
    });
    Ok((report, None))
}
