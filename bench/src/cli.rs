//! The command line: global options, one subcommand per scenario, and [`run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::node::{NodeProc, NodeSpec, default_binary};
use crate::plot::{Plot, write_svg};
use crate::report::Report;
use crate::scenario;

/// Load generator and benchmarks for Hearth nodes.
///
/// Starts its own node(s) as child processes on loopback (`--hearth PATH`, by
/// default the `hearth` binary next to this one), or targets a running node with
/// `--url`. Prints a table, and writes a JSON report and an SVG plot to `--out`.
#[derive(Debug, Parser)]
#[command(name = "hearth-bench", version, about)]
pub struct Cli {
    /// The `hearth` binary to start [default: `hearth` next to this executable].
    #[arg(long, global = true)]
    pub hearth: Option<PathBuf>,
    /// Measure a running node instead of starting one (idle, direct, max, group,
    /// devices and catchup only). Its rate limits must allow the load.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// With `--url`: the node's process id, to read its CPU time and memory.
    #[arg(long, global = true)]
    pub node_pid: Option<u32>,
    /// Folder for the JSON report and the SVG plot.
    #[arg(long, global = true, default_value = "bench-results")]
    pub out: PathBuf,
    /// Folder under which the started nodes keep their stores [default: the
    /// system's temporary folder]. They are deleted afterwards.
    #[arg(long, global = true)]
    pub tmp_dir: Option<PathBuf>,
    /// No progress bar and no table (the report is still written).
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Threads of the tool's own runtime; 1 runs the whole load on one thread
    /// [default: one per core].
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// What to measure.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N authenticated sessions held open: node memory per connection.
    Idle(scenario::idle::Args),
    /// P sender/receiver pairs at a total rate: ack and delivery latency, loss.
    Direct(scenario::direct::Args),
    /// The highest sustained 1:1 rate: pairs keep a window of messages in flight.
    Max(scenario::direct::MaxArgs),
    /// A group with every member online: latency to the last member.
    Group(scenario::group::Args),
    /// Several devices per user: each device receives each message once.
    Devices(scenario::devices::Args),
    /// A device reconnects after K messages were sent to it: time until it has all.
    Catchup(scenario::catchup::Args),
    /// Two nodes federating on loopback: first message, cross-server 1:1 latency,
    /// cross-server throughput, and a group spanning both.
    Federation(scenario::federation::Args),
    /// Time from process start to ready with M messages stored.
    Restart(scenario::restart::Args),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Idle(_) => "idle",
            Scenario::Direct(_) => "direct",
            Scenario::Max(_) => "max",
            Scenario::Group(_) => "group",
            Scenario::Devices(_) => "devices",
            Scenario::Catchup(_) => "catchup",
            Scenario::Federation(_) => "federation",
            Scenario::Restart(_) => "restart",
        }
    }
}

/// What every scenario gets: where the binary is, where to write, how to show progress.
pub struct Env {
    /// The `hearth` binary.
    pub bin: PathBuf,
    /// A running node to target instead.
    pub url: Option<String>,
    /// Its pid, if given.
    pub node_pid: Option<u32>,
    /// Show progress.
    pub quiet: bool,
    tmp: tempfile::TempDir,
}

/// The node a single-node scenario measures.
pub struct Subject {
    /// Its base URL.
    pub url: String,
    /// Its process, to read CPU and memory.
    pub pid: Option<u32>,
    /// The process, when the tool started it (dropped = killed).
    pub node: Option<NodeProc>,
    /// How it was started, for the report.
    pub settings: serde_json::Value,
}

impl Subject {
    /// The session URL.
    pub fn ws_url(&self) -> String {
        format!("{}/v1/ws", self.url.trim_end_matches('/')).replacen("http", "ws", 1)
    }

    /// An HTTP client of the node.
    pub fn client(&self) -> Result<hearth_client_api::Client> {
        Ok(hearth_client_api::Client::new(&self.url)?)
    }
}

impl Env {
    /// A fresh data folder for a node.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A node spec with lifted limits on a fresh data folder.
    pub fn spec(&self, name: &str) -> NodeSpec {
        NodeSpec::new(&self.bin, &self.data_dir(name))
    }

    /// The node to measure: the one at `--url`, or a fresh child process.
    pub fn subject(&self) -> Result<Subject> {
        self.subject_with(|_| {})
    }

    /// Like [`Env::subject`], with the spec of a started node changed by `tweak`.
    pub fn subject_with(&self, tweak: impl FnOnce(&mut NodeSpec)) -> Result<Subject> {
        if let Some(url) = &self.url {
            return Ok(Subject {
                url: url.clone(),
                pid: self.node_pid,
                node: None,
                settings: serde_json::json!({ "url": url, "note": "a running node: its settings are its own" }),
            });
        }
        let mut spec = self.spec("node");
        tweak(&mut spec);
        let node = NodeProc::start(&spec)?;
        Ok(Subject {
            url: node.url(),
            pid: Some(node.pid),
            settings: spec.settings(),
            node: Some(node),
        })
    }

    /// Refuses `--url` for scenarios that must start their own nodes.
    pub fn own_nodes_only(&self, scenario: &str) -> Result<()> {
        if self.url.is_some() {
            bail!("the {scenario} scenario starts its own nodes; drop --url");
        }
        Ok(())
    }

    /// A progress bar of `len` steps.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(
            Some(len),
            if self.quiet {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(250));
        pb
    }
}

/// Parses `args` (the program name first) and runs the scenario; see [`run`].
pub async fn run_args<I, T>(args: I) -> Result<Report>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    run(Cli::try_parse_from(args)?).await
}

/// Runs the scenario, prints the table (unless quiet), writes the JSON report and
/// the plot into `--out`, and returns the report.
pub async fn run(cli: Cli) -> Result<Report> {
    let tmp = match &cli.tmp_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::Builder::new()
                .prefix("hearth-bench-")
                .tempdir_in(dir)?
        }
        None => tempfile::Builder::new().prefix("hearth-bench-").tempdir()?,
    };
    let env = Env {
        bin: cli.hearth.clone().unwrap_or_else(default_binary),
        url: cli.url.clone(),
        node_pid: cli.node_pid,
        quiet: cli.quiet,
        tmp,
    };
    let name = cli.scenario.name();
    let (mut report, plot): (Report, Option<Plot>) = match &cli.scenario {
        Scenario::Idle(a) => scenario::idle::run(&env, a).await?,
        Scenario::Direct(a) => scenario::direct::run(&env, a).await?,
        Scenario::Max(a) => scenario::direct::run_max(&env, a).await?,
        Scenario::Group(a) => scenario::group::run(&env, a).await?,
        Scenario::Devices(a) => scenario::devices::run(&env, a).await?,
        Scenario::Catchup(a) => scenario::catchup::run(&env, a).await?,
        Scenario::Federation(a) => scenario::federation::run(&env, a).await?,
        Scenario::Restart(a) => scenario::restart::run(&env, a).await?,
    };
    report.tool_threads = tokio::runtime::Handle::current().metrics().num_workers();
    let stem = format!("{name}-{}", report.date.replace(':', ""));
    if let Some(plot) = plot {
        std::fs::create_dir_all(&cli.out)?;
        let path = cli.out.join(format!("{stem}.svg"));
        write_svg(&path, &plot)?;
        report.plot = Some(path);
    }
    let json = report.write_json(&cli.out, &stem)?;
    if !cli.quiet {
        println!("{}", report.table());
        if let Some(p) = &report.plot {
            println!("plot: {}", p.display());
        }
        println!("report: {}", json.display());
    }
    Ok(report)
}
