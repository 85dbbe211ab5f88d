//! `group`: one group with every member online; every member sends in turn; the
//! figure is the latency until the last member has a message.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_client_api::{Client, Target};
use serde_json::json;

use crate::cli::Env;
use crate::load::{
    self, Account, Merged, Pace, PeerPlan, Shared, Until, connect, register_many, run_tag,
};
use crate::metrics::NodeMetrics;
use crate::plot::Plot;
use crate::report::{Report, ms, per_sec};
use crate::scenario::{counts, load_plot, metric_rows, spread};
use crate::stats::Samples;
use crate::system::{CpuMeter, CpuUse, rss_kib};

/// Options of `group`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Members, the creator included (the node's default limit is 100).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Messages per second to the group, from all members together.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

/// A member: its node's base URL and its account.
pub(crate) type Member = (String, Account);

fn ws_of(url: &str) -> String {
    format!("{}/v1/ws", url.trim_end_matches('/')).replacen("http", "ws", 1)
}

/// What a group load measured.
pub(crate) struct GroupResult {
    pub merged: Merged,
    pub last_member: Samples,
    pub complete: usize,
    pub messages: usize,
    pub secs: f64,
    pub cpu: Vec<CpuUse>,
}

/// Creates a group of `members` (the first creates it), waits until every member
/// sees it, then has every member send at `rate / members` for `secs`.
pub(crate) async fn group_load(
    env: &Env,
    members: &[Member],
    rate: f64,
    secs: f64,
    body_bytes: usize,
    pids: &[u32],
    drain: Duration,
) -> Result<GroupResult> {
    let n = members.len();
    if n < 2 {
        bail!("a group load needs at least two members");
    }
    let creator = Client::new(&members[0].0)?.with_token(members[0].1.token.clone());
    let others: Vec<String> = members[1..].iter().map(|(_, a)| a.user.clone()).collect();
    let group = creator
        .create_group("bench group", &others)
        .await
        .context("creating the group")?;
    // Members on other servers learn of the group through federation.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (url, a) in members {
        let api = Client::new(url)?.with_token(a.token.clone());
        while api.channel(&group.id).await.is_err() {
            if Instant::now() > deadline {
                bail!("{} never saw the group", a.user);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let pb = env.bar(n as u64, "connect");
    let per_sec = rate / n as f64;
    let mut peers = Vec::with_capacity(n);
    for (i, (url, a)) in members.iter().enumerate() {
        let conn = connect(&ws_of(url), &a.token, None).await?;
        pb.inc(1);
        peers.push((
            conn,
            PeerPlan {
                index: i as u32,
                target: Some(Target::Channel(group.id.clone())),
                pace: Pace::Rate {
                    per_sec,
                    offset: Duration::from_secs(1)
                        + Duration::from_secs_f64(i as f64 / n as f64 / per_sec),
                },
                body_bytes,
                keep_deliveries: true,
            },
        ));
    }
    pb.finish_and_clear();
    let shared = Shared::new();
    let meters: Vec<CpuMeter> = pids.iter().map(|p| CpuMeter::start(Some(*p))).collect();
    let meters = if meters.is_empty() {
        vec![CpuMeter::start(None)]
    } else {
        meters
    };
    let pb = env.bar((secs * 1000.0) as u64, "load");
    let fanout = (n - 1) as u64;
    let (stats, sending) = load::drive(
        peers,
        &shared,
        Until::Elapsed(Duration::from_secs_f64(secs + 1.0)),
        |acked| acked * fanout,
        drain,
        &pb,
    )
    .await;
    pb.finish_and_clear();
    let cpu = meters.iter().map(CpuMeter::stop).collect();
    // Per message: how many members got it, and when the last one did.
    let mut per_message: HashMap<(u32, u64), (u64, u32)> = HashMap::new();
    for s in &stats {
        for &(sender, seq, lat) in &s.deliveries {
            let e = per_message.entry((sender, seq)).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat);
        }
    }
    let mut last_member = Samples::default();
    let mut complete = 0;
    for &(count, lat) in per_message.values() {
        if count == fanout {
            complete += 1;
            last_member.push_us(u64::from(lat));
        }
    }
    let merged = Merged::of(&stats);
    Ok(GroupResult {
        messages: merged.acked as usize,
        merged,
        last_member,
        complete,
        secs: sending.as_secs_f64() - 1.0,
        cpu,
    })
}

/// Adds a group load's figures to the report.
pub(crate) fn group_rows(
    report: &mut Report,
    r: &mut GroupResult,
    members: usize,
    target_ms: f64,
) -> serde_json::Value {
    let expected = r.merged.acked * (members as u64 - 1);
    let c = counts(report, &r.merged, expected, r.secs);
    report.figure(
        "messages delivered to every member",
        format!("{} of {}", r.complete, r.messages),
    );
    let last = r.last_member.summary();
    if let Some(s) = &last {
        report.against(
            "last member p50 / p99 / p99.9 / max",
            spread(s),
            format!("p99 <= {target_ms} ms"),
            s.p99_ms <= target_ms,
        );
    }
    let each = r.merged.delivery.summary();
    if let Some(s) = &each {
        report.figure("each delivery p50 / p99 / p99.9 / max", spread(s));
    }
    if let Some(s) = r.merged.ack.summary() {
        report.figure(
            "ack p50 / p99",
            format!("{} / {}", ms(s.p50_ms), ms(s.p99_ms)),
        );
    }
    json!({ "counts": c, "last_member_latency": last, "delivery_latency": each, "complete_messages": r.complete })
}

/// `group`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    let subject = env.subject()?;
    let client = subject.client()?;
    let pb = env.bar(args.members as u64, "register");
    let accounts =
        register_many(&client, &format!("g{}x", run_tag()), args.members, 4, &pb).await?;
    pb.finish_and_clear();
    let members: Vec<Member> = accounts
        .into_iter()
        .map(|a| (subject.url.clone(), a))
        .collect();
    let pids: Vec<u32> = subject.pid.into_iter().collect();
    let node_metrics = NodeMetrics::start(&subject.url).await;
    let mut r = group_load(
        env,
        &members,
        args.rate,
        args.secs,
        args.body_bytes,
        &pids,
        Duration::from_secs(10),
    )
    .await?;
    let mut report = Report::new(
        "group",
        json!({
            "scenario": { "members": args.members, "rate": args.rate, "secs": args.secs, "body_bytes": args.body_bytes },
            "node": subject.settings,
        }),
    );
    report.figure("target rate", per_sec(args.rate));
    let mut results = group_rows(&mut report, &mut r, args.members, 10.0);
    results["node_metrics"] = metric_rows(&mut report, node_metrics.stop().await);
    report.cpu = r.cpu.into_iter().next();
    report.node_rss_kib = subject.pid.and_then(rss_kib);
    report.results = results;
    let mut plot = load_plot(
        format!(
            "group of {}: {} msg/s for {} s",
            args.members, args.rate, args.secs
        ),
        &mut r.merged,
    );
    plot.latencies
        .push(("last member".into(), r.last_member.cdf(400)));
    Ok((report, Some(plot)))
}
