//! `devices`: users with several devices each; every device must receive every
//! message sent to its user exactly once.

use std::time::Duration;

use anyhow::Result;
use hearth_client_api::Target;
use serde_json::json;

use crate::cli::Env;
use crate::load::{
    self, Merged, Pace, PeerPlan, Shared, Until, connect, login_many, register_many, run_tag,
};
use crate::metrics::NodeMetrics;
use crate::plot::Plot;
use crate::report::Report;
use crate::scenario::direct::latency_rows;
use crate::scenario::{counts, load_plot, metric_rows};
use crate::system::{CpuMeter, rss_kib};

/// Options of `devices`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Receiving users (each has one sender writing to them).
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Devices per receiving user, all online.
    #[arg(long, default_value_t = 3)]
    pub devices: usize,
    /// Total messages per second over all senders.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
}

/// `devices`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    let subject = env.subject()?;
    let client = subject.client()?;
    let ws = subject.ws_url();
    let tag = run_tag();
    let n = args.users;
    let pb = env.bar(
        (2 * n + n * args.devices.saturating_sub(1)) as u64,
        "register",
    );
    let senders = register_many(&client, &format!("s{tag}x"), n, 4, &pb).await?;
    let receivers = register_many(&client, &format!("d{tag}x"), n, 4, &pb).await?;
    let mut devices = Vec::with_capacity(n * args.devices);
    for r in &receivers {
        devices.push((r.clone(), r.user.clone()));
        for d in login_many(&client, r, args.devices.saturating_sub(1)).await? {
            pb.inc(1);
            devices.push((d, r.user.clone()));
        }
    }
    pb.finish_and_clear();
    let pb = env.bar((devices.len() + n) as u64, "connect");
    let mut peers = Vec::new();
    for (i, (d, _)) in devices.iter().enumerate() {
        let conn = connect(&ws, &d.token, None).await?;
        pb.inc(1);
        peers.push((
            conn,
            PeerPlan {
                index: (n + i) as u32,
                target: None,
                pace: Pace::Silent,
                body_bytes: 64,
                keep_deliveries: false,
            },
        ));
    }
    let per_sec = args.rate / n as f64;
    for (i, (s, r)) in senders.iter().zip(&receivers).enumerate() {
        let target = match client
            .with_token(s.token.clone())
            .open_direct(&r.user)
            .await
        {
            Ok(c) => Target::Channel(c.id),
            Err(_) => Target::User(r.user.clone()),
        };
        let conn = connect(&ws, &s.token, None).await?;
        pb.inc(1);
        peers.push((
            conn,
            PeerPlan {
                index: i as u32,
                target: Some(target),
                pace: Pace::Rate {
                    per_sec,
                    offset: Duration::from_secs(1)
                        + Duration::from_secs_f64(i as f64 / n as f64 / per_sec),
                },
                body_bytes: 64,
                keep_deliveries: false,
            },
        ));
    }
    pb.finish_and_clear();
    let node_metrics = NodeMetrics::start(&subject.url).await;
    let shared = Shared::new();
    let meter = CpuMeter::start(subject.pid);
    let pb = env.bar((args.secs * 1000.0) as u64, "load");
    let per_user = args.devices as u64;
    let (stats, sending) = load::drive(
        peers,
        &shared,
        Until::Elapsed(Duration::from_secs_f64(args.secs + 1.0)),
        |acked| acked * per_user,
        Duration::from_secs(10),
        &pb,
    )
    .await;
    pb.finish_and_clear();
    let cpu = meter.stop();
    // Per device: it must have exactly what its user's sender had acknowledged.
    let acked_by_sender: Vec<u64> = stats[devices.len()..].iter().map(|s| s.acked).collect();
    let mut devices_exact = 0;
    for (i, s) in stats[..devices.len()].iter().enumerate() {
        let user = i / args.devices;
        if s.delivered == acked_by_sender.get(user).copied().unwrap_or(0) && s.duplicates == 0 {
            devices_exact += 1;
        }
    }
    let mut m = Merged::of(&stats);
    let mut report = Report::new(
        "devices",
        json!({
            "scenario": { "users": n, "devices_per_user": args.devices, "rate": args.rate, "secs": args.secs },
            "node": subject.settings,
        }),
    );
    let secs = sending.as_secs_f64() - 1.0;
    let c = counts(&mut report, &m, m.acked * per_user, secs);
    report.against(
        "devices that received each message exactly once",
        format!("{devices_exact} of {}", devices.len()),
        "all",
        devices_exact == devices.len(),
    );
    let l = latency_rows(&mut report, &mut m, None);
    let n = metric_rows(&mut report, node_metrics.stop().await);
    report.cpu = Some(cpu);
    report.node_rss_kib = subject.pid.and_then(rss_kib);
    report.results =
        json!({ "counts": c, "latency": l, "devices_exact": devices_exact, "node_metrics": n });
    let plot = load_plot(
        format!(
            "devices: {n} users x {} devices, {} msg/s",
            args.devices, args.rate
        ),
        &mut m,
    );
    Ok((report, Some(plot)))
}
