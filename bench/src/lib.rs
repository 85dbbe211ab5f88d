//! `hearth-bench`: the load generator and benchmark tool of Hearth.
//!
//! It measures a node from the outside, the way clients see it: it starts `hearth
//! serve` as child processes on loopback (or targets a running node with `--url`),
//! drives them over real WebSockets with the client library, and reads the node's
//! CPU time and memory from `/proc`. Every run ends with a human table, a JSON report
//! and an SVG plot.
//!
//! # Layout
//! - [`cli`]: the command line ([`Cli`], one subcommand per scenario) and [`run`].
//! - [`node`]: a `hearth` child process: start, wait for its ready line, stop.
//! - `system`: the machine (cores, memory) and per-process CPU time and RSS from `/proc`.
//! - `load`: accounts in bulk, sessions (optionally from chosen source addresses),
//!   and the peer task that sends at a pace or with a window and records every ack
//!   and delivery.
//! - `stats`: latency samples, percentiles, throughput timelines.
//! - `metrics`: the node's own flush and delivery histograms, from `/metrics`.
//! - [`report`]: the report (table, JSON) every scenario produces.
//! - `plot`: the SVG plots.
//! - `scenario`: one module per scenario (idle, direct, max, group, devices,
//!   catchup, federation, restart).

pub mod cli;
mod load;
mod metrics;
pub mod node;
mod plot;
pub mod report;
mod scenario;
mod stats;
mod system;

pub use cli::{Cli, run};
pub use report::Report;
