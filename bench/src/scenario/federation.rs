//! `federation`: two nodes on loopback (`a.bench`, `b.bench`, which dials the
//! first). Measures the first message between the freshly started nodes,
//! cross-server 1:1 latency at a rate, cross-server throughput with a window in
//! flight, and a group spanning both servers.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hearth_client_api::model::EventContent;
use hearth_client_api::{Client, ServerFrame, Target};
use serde_json::json;

use crate::cli::Env;
use crate::load::{connect, register_many, run_tag};
use crate::node::{NodeProc, NodeSpec};
use crate::plot::Plot;
use crate::report::{Report, ms, per_sec};
use crate::scenario::direct::{PairPace, latency_rows, make_pairs, pair_load};
use crate::scenario::group::{Member, group_load, group_rows};
use crate::scenario::{counts, load_plot};

/// Options of `federation`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Cross-server sender/receiver pairs (senders on a.bench, receivers on b.bench).
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Total cross-server messages per second in the latency phase.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Seconds of the throughput phase (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    pub max_secs: f64,
    /// Messages each sender keeps in flight in the throughput phase.
    #[arg(long, default_value_t = 20)]
    pub window: usize,
    /// Members of the cross-server group, half on each node (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub group_members: usize,
    /// Messages per second to the group.
    #[arg(long, default_value_t = 50.0)]
    pub group_rate: f64,
    /// Seconds of the group phase.
    #[arg(long, default_value_t = 10.0)]
    pub group_secs: f64,
    /// Seconds to wait, after sending stops, for messages still due (past the
    /// node's 30 s catch-up interval by default, so "lost" means lost).
    #[arg(long, default_value_t = 40.0)]
    pub drain_secs: f64,
    /// The nodes' catch-up interval in seconds (`HEARTH_CATCHUP_INTERVAL_SECS`)
    /// [default: the node's own].
    #[arg(long)]
    pub catchup_secs: Option<u64>,
}

fn fed_spec(env: &Env, args: &Args, name: &str, bootstrap: Vec<String>) -> NodeSpec {
    let mut spec = env.spec(name);
    if let Some(secs) = args.catchup_secs {
        spec.env
            .push(("HEARTH_CATCHUP_INTERVAL_SECS".into(), secs.to_string()));
    }
    spec.server_name = Some(name.to_string());
    spec.federation = true;
    spec.bootstrap = bootstrap;
    spec
}

/// Time from sending one message to its delivery on the other server.
async fn first_message(a: &NodeProc, b: &NodeProc) -> Result<Duration> {
    let tag = run_tag();
    let pb = indicatif::ProgressBar::hidden();
    let ca = Client::new(&a.url())?;
    let cb = Client::new(&b.url())?;
    let alice = register_many(&ca, &format!("f{tag}a"), 1, 1, &pb)
        .await?
        .remove(0);
    let bob = register_many(&cb, &format!("f{tag}b"), 1, 1, &pb)
        .await?
        .remove(0);
    let al = connect(&format!("ws://{}/v1/ws", a.addr), &alice.token, None).await?;
    let bo = connect(&format!("ws://{}/v1/ws", b.addr), &bob.token, None).await?;
    let (mut atx, _arx, _) = al.split();
    let (mut btx, mut brx, _) = bo.split();
    let t0 = Instant::now();
    atx.send_message(
        format!("{tag}-first"),
        Target::User(bob.user.clone()),
        "first",
    )
    .await?;
    let wait = Duration::from_secs(60);
    loop {
        if t0.elapsed() > wait {
            bail!("the first message did not arrive within {wait:?}");
        }
        // Both sessions heartbeat while waiting.
        let frame = match tokio::time::timeout(Duration::from_secs(5), brx.next_frame()).await {
            Ok(frame) => frame?,
            Err(_) => {
                atx.heartbeat().await?;
                btx.heartbeat().await?;
                continue;
            }
        };
        match frame {
            Some(ServerFrame::Event { event }) => {
                if matches!(&event.content, EventContent::Message { body } if body == "first") {
                    return Ok(t0.elapsed());
                }
            }
            Some(_) => {}
            None => bail!("the receiving session ended"),
        }
    }
}

/// `federation`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    env.own_nodes_only("federation")?;
    let spec_a = fed_spec(env, args, "a.bench", Vec::new());
    let a = NodeProc::start(&spec_a)?;
    let a_addrs = a.federation_addrs(Duration::from_secs(30));
    if a_addrs.is_empty() {
        bail!("a.bench never logged a federation address");
    }
    let spec_b = fed_spec(env, args, "b.bench", a_addrs.clone());
    let b = NodeProc::start(&spec_b)?;
    let first = first_message(&a, &b).await?;

    let (ca, cb) = (Client::new(&a.url())?, Client::new(&b.url())?);
    let (wa, wb) = (
        format!("ws://{}/v1/ws", a.addr),
        format!("ws://{}/v1/ws", b.addr),
    );
    let pairs = make_pairs(env, (&ca, &wa), (&cb, &wb), args.pairs).await?;
    let pids = [a.pid, b.pid];
    let (mut m, secs, cpu) = pair_load(
        env,
        &pairs,
        PairPace::Rate(args.rate),
        args.secs,
        64,
        &pids,
        Duration::from_secs_f64(args.drain_secs),
    )
    .await?;

    let mut report = Report::new(
        "federation",
        json!({
            "scenario": {
                "pairs": args.pairs, "rate": args.rate, "secs": args.secs,
                "max_secs": args.max_secs, "window": args.window,
                "group_members": args.group_members, "group_rate": args.group_rate,
                "group_secs": args.group_secs, "catchup_secs": args.catchup_secs,
                "drain_secs": args.drain_secs,
            },
            "nodes": [spec_a.settings(), spec_b.settings()],
            "link": "libp2p TCP + noise + yamux on loopback; b.bench dials the address a.bench logs as 'federation reachable at' (with its /p2p/ peer id)",
        }),
    );
    report.against(
        "first message between fresh nodes",
        ms(first.as_secs_f64() * 1000.0),
        "<= 50 ms",
        first <= Duration::from_millis(50),
    );
    report.figure("-- 1:1 across servers at", per_sec(args.rate));
    let c1 = counts(&mut report, &m, m.acked, secs);
    let l1 = latency_rows(&mut report, &mut m, Some(5.0));
    // One figure per node, "a / b".
    let per_node = |cpu: &[crate::system::CpuUse], show: fn(&crate::system::CpuUse) -> String| {
        cpu.iter().map(show).collect::<Vec<_>>().join(" / ")
    };
    let cpu_text = |cpu: &[crate::system::CpuUse]| {
        per_node(cpu, |c| format!("{:.0}%", c.node_cpu_pct.unwrap_or(0.0)))
    };
    let wait_text = |cpu: &[crate::system::CpuUse]| {
        per_node(cpu, |c| match c.node_cpu_wait_s {
            Some(w) => format!("{w:.2} s"),
            None => "n/a".into(),
        })
    };
    report.figure("node CPU a / b (of a core)", cpu_text(&cpu));
    report.figure("node a / b waiting for a core", wait_text(&cpu));
    report.cpu = cpu.first().cloned();
    let mut plot = load_plot(
        format!(
            "federation: {} cross-server pairs at {} msg/s",
            args.pairs, args.rate
        ),
        &mut m,
    );

    let mut max_json = serde_json::Value::Null;
    if args.max_secs > 0.0 {
        let (mut mm, msecs, mcpu) = pair_load(
            env,
            &pairs,
            PairPace::Window(args.window),
            args.max_secs,
            64,
            &pids,
            Duration::from_secs_f64(args.drain_secs),
        )
        .await?;
        report.figure(
            "-- cross-server throughput",
            format!("{} in flight per sender", args.window),
        );
        let c = counts(&mut report, &mm, mm.acked, msecs);
        let rate = super::delivery_rate(&mm, msecs);
        let lost = mm.acked_never_delivered + mm.acked.saturating_sub(mm.delivered);
        report.against(
            "cross-server rate, nothing lost",
            per_sec(rate),
            ">= 20,000 msg/s",
            rate >= 20_000.0 && lost == 0,
        );
        let l = latency_rows(&mut report, &mut mm, None);
        report.figure("node CPU a / b (of a core) at max", cpu_text(&mcpu));
        report.figure("node a / b waiting for a core at max", wait_text(&mcpu));
        max_json = json!({ "counts": c, "latency": l, "rate": rate });
    }

    let mut group_json = serde_json::Value::Null;
    if args.group_members >= 2 {
        let half = args.group_members / 2;
        let tag = run_tag();
        let pb = env.bar(args.group_members as u64, "register");
        let on_a =
            register_many(&ca, &format!("g{tag}a"), args.group_members - half, 4, &pb).await?;
        let on_b = register_many(&cb, &format!("g{tag}b"), half, 4, &pb).await?;
        pb.finish_and_clear();
        let members: Vec<Member> = on_a
            .into_iter()
            .map(|x| (a.url(), x))
            .chain(on_b.into_iter().map(|x| (b.url(), x)))
            .collect();
        let mut g = group_load(
            env,
            &members,
            args.group_rate,
            args.group_secs,
            64,
            &pids,
            Duration::from_secs_f64(args.drain_secs),
        )
        .await?;
        report.figure(
            "-- group across servers",
            format!(
                "{} members ({} on each), {}",
                args.group_members,
                half,
                per_sec(args.group_rate)
            ),
        );
        group_json = group_rows(&mut report, &mut g, args.group_members, 10.0);
        plot.latencies
            .push(("group: last member".into(), g.last_member.cdf(400)));
    }
    report.node_rss_kib = crate::system::rss_kib(a.pid);
    report.results = json!({
        "first_message_ms": first.as_secs_f64() * 1000.0,
        "b_start_to_ready_ms": b.ready_after.as_secs_f64() * 1000.0,
        "direct": { "counts": c1, "latency": l1 },
        "max": max_json,
        "group": group_json,
    });
    Ok((report, Some(plot)))
}
