//! `idle`: N authenticated sessions held open (with heartbeats); the figure is the
//! node's resident memory per connection.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;

use crate::cli::Env;
use crate::load::{Account, connect, register_many, run_tag};
use crate::node::NodeProc;
use crate::plot::Plot;
use crate::report::Report;
use crate::system::{CpuMeter, open_fds, rss_kib};

/// Options of `idle`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Sessions to hold open (one account each).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1, .2, ...),
    /// so ephemeral ports do not run short.
    #[arg(long, default_value_t = 4)]
    pub source_ips: u8,
    /// Registrations in flight at once (each hashes a password on the node).
    #[arg(long, default_value_t = 8)]
    pub register_concurrency: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds to hold every session open before measuring.
    #[arg(long, default_value_t = 5.0)]
    pub hold_secs: f64,
    /// Reuse accounts between runs: read them from this file if it exists (a line of
    /// `name user token` each), otherwise register them and write it. Reading needs
    /// `--url` (the node whose store holds them); it lets two builds be compared on
    /// one store without hashing every password again.
    #[arg(long)]
    pub accounts: Option<std::path::PathBuf>,
}

fn load_accounts(path: &std::path::Path, n: usize) -> Result<Vec<Account>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let accounts: Vec<Account> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some(Account {
                name: parts.next()?.to_string(),
                user: parts.next()?.to_string(),
                token: parts.next()?.to_string(),
            })
        })
        .take(n)
        .collect();
    if accounts.len() < n {
        bail!(
            "{} holds {} accounts, not {n}",
            path.display(),
            accounts.len()
        );
    }
    Ok(accounts)
}

fn save_accounts(path: &std::path::Path, accounts: &[Account]) -> Result<()> {
    let text: String = accounts
        .iter()
        .map(|a| format!("{} {} {}\n", a.name, a.user, a.token))
        .collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Holds a session: heartbeats, reads (and drops) whatever comes, until told to stop.
async fn hold(
    conn: hearth_client_api::Connection,
    mut stop: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
) {
    let (mut tx, mut rx, ready) = conn.split();
    let mut beat = tokio::time::interval(ready.heartbeat_interval());
    beat.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            f = rx.next_frame() => match f {
                Ok(Some(_)) | Err(hearth_client_api::ClientError::BadFrame(_)) => {}
                Ok(None) | Err(_) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            _ = beat.tick() => {
                if tx.heartbeat().await.is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
    let _ = tx.close().await;
}

/// `idle`.
pub async fn run(env: &Env, args: &Args) -> Result<(Report, Option<Plot>)> {
    let subject = env.subject()?;
    let client = subject.client()?;
    let n = args.connections;
    let pb = env.bar(n as u64, "register");
    let reg_began = Instant::now();
    let reuse = args.accounts.as_deref().filter(|p| p.exists());
    let accounts = if let Some(path) = reuse {
        if subject.node.is_some() {
            bail!("--accounts with an existing file needs --url: a fresh node does not know them");
        }
        load_accounts(path, n)?
    } else {
        let accounts = register_many(
            &client,
            &format!("i{}x", run_tag()),
            n,
            args.register_concurrency,
            &pb,
        )
        .await?;
        if let Some(path) = &args.accounts {
            save_accounts(path, &accounts)?;
        }
        accounts
    };
    let reg = reg_began.elapsed();
    pb.finish_and_clear();
    // Password hashing leaves the node's allocator holding memory that connections
    // would then reuse unseen; a node started afresh on the same store does not.
    let mut subject = subject;
    let mut restarted = false;
    if let Some(node) = subject.node.take() {
        let spec = node.spec.clone();
        node.stop()?;
        let node = NodeProc::start(&spec)?;
        subject.url = node.url();
        subject.pid = Some(node.pid);
        subject.node = Some(node);
        restarted = true;
    }
    let ws = subject.ws_url();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = subject.pid;
    let rss_before = pid.and_then(rss_kib);
    let bench_before = rss_kib(std::process::id());
    let meter = CpuMeter::start(pid);
    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let sources: Vec<IpAddr> = (1..=args.source_ips.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let pb = env.bar(n as u64, "connect");
    let conn_began = Instant::now();
    let mut curve = vec![(0.0, rss_before.unwrap_or(0) as f64 / 1024.0)];
    let step = (n / 40).max(1);
    let local = ws.starts_with("ws://127.");
    let mut opened = futures_util::stream::iter(accounts.iter().enumerate())
        .map(|(i, a)| {
            let source = local.then(|| sources[i % sources.len()]);
            let ws = ws.clone();
            async move {
                connect(&ws, &a.token, source)
                    .await
                    .with_context(|| format!("session {i}"))
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1));
    let mut tasks = Vec::with_capacity(n);
    while let Some(conn) = opened.next().await {
        tasks.push(tokio::spawn(hold(conn?, stop_rx.clone(), dropped.clone())));
        pb.inc(1);
        if tasks.len() % step == 0
            && let Some(kib) = pid.and_then(rss_kib)
        {
            curve.push((tasks.len() as f64, kib as f64 / 1024.0));
        }
    }
    let connect_time = conn_began.elapsed();
    pb.finish_and_clear();
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    let rss_after = pid.and_then(rss_kib);
    let fds = pid.and_then(open_fds);
    let bench_after = rss_kib(std::process::id());
    let cpu = meter.stop();
    if let Some(kib) = rss_after {
        curve.push((n as f64, kib as f64 / 1024.0));
    }
    let still_open = n as u64 - dropped.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / n as f64),
        _ => None,
    };
    let mut report = Report::new(
        "idle",
        json!({
            "scenario": {
                "connections": n, "source_ips": args.source_ips,
                "register_concurrency": args.register_concurrency,
                "connect_concurrency": args.connect_concurrency, "hold_secs": args.hold_secs,
            },
            "node": subject.settings,
            "method": "accounts are registered first; then the node is restarted on its store (so memory freed by password hashing is not reused unseen), its RSS read, the sessions opened and held, and its RSS read again",
            "node_restarted_after_registration": restarted,
        }),
    );
    report.figure("connections", n.to_string());
    report.against(
        "sessions still open after holding",
        still_open.to_string(),
        "all",
        still_open == n as u64,
    );
    report.figure(
        "registrations",
        match reuse {
            Some(path) => format!("none: accounts read from {}", path.display()),
            None => format!(
                "{:.1} s ({:.0}/s)",
                reg.as_secs_f64(),
                n as f64 / reg.as_secs_f64()
            ),
        },
    );
    report.figure(
        "connect + authenticate",
        format!(
            "{:.1} s ({:.0}/s)",
            connect_time.as_secs_f64(),
            n as f64 / connect_time.as_secs_f64()
        ),
    );
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        report.figure(
            "node RSS before / after",
            format!("{:.1} / {:.1} MiB", b as f64 / 1024.0, a as f64 / 1024.0),
        );
    }
    if let Some(k) = per_conn {
        report.against(
            "node memory per idle connection",
            format!("{k:.2} KiB"),
            "<= 4 KiB at 19,000",
            k <= 4.0,
        );
    }
    if let (Some(b), Some(a)) = (bench_before, bench_after) {
        report.figure(
            "bench (client) memory per connection",
            format!("{:.2} KiB", a.saturating_sub(b) as f64 / n as f64),
        );
    }
    if let Some(f) = fds {
        report.figure("node open files", f.to_string());
    }
    report.cpu = Some(cpu);
    report.node_rss_kib = rss_after;
    report.results = json!({
        "connections": n,
        "still_open": still_open,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_connection": per_conn,
        "register_secs": reg.as_secs_f64(),
        "connect_secs": connect_time.as_secs_f64(),
        "node_open_files": fds,
        "rss_curve_mib": curve,
    });
    let plot = Plot {
        title: format!("idle: node memory while opening {n} sessions"),
        latencies: Vec::new(),
        series: vec![("node RSS (MiB)".into(), curve)],
        series_title: "node resident memory".into(),
        series_x: "open sessions".into(),
        series_y: "MiB".into(),
    };
    Ok((report, Some(plot)))
}
