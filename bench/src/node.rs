//! A Hearth node as a child process: `hearth serve` on a free loopback port with a
//! temporary (or given) data folder, found ready by its log line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a graceful stop may take before the node is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The log filter given to nodes: warnings, plus the info lines the tool reads (the
/// ready line, and the federation address with its `/p2p/` peer id).
pub const NODE_LOG: &str = "warn,hearth_node::cli=info,hearth_node::federation=info";

/// Settings that lift the per-connection rate limit, which a load generator would
/// otherwise measure instead of the node.
pub fn lifted_limits() -> Vec<(String, String)> {
    vec![
        ("HEARTH_RATE_LIMIT_PER_SEC".into(), "1000000".into()),
        ("HEARTH_RATE_LIMIT_BURST".into(), "1000000".into()),
    ]
}

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The `hearth` binary.
    pub bin: PathBuf,
    /// Its data folder.
    pub data_dir: PathBuf,
    /// `--server-name`, if not the default `localhost`.
    pub server_name: Option<String>,
    /// Listen for federation on a free loopback port.
    pub federation: bool,
    /// Federation addresses to dial at start.
    pub bootstrap: Vec<String>,
    /// Extra `HEARTH_*` variables.
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    /// A node with lifted rate limits on `data_dir`.
    pub fn new(bin: &Path, data_dir: &Path) -> NodeSpec {
        NodeSpec {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            server_name: None,
            federation: false,
            bootstrap: Vec::new(),
            env: lifted_limits(),
        }
    }

    /// Every setting given to the node, for the report.
    pub fn settings(&self) -> serde_json::Value {
        let mut env = serde_json::Map::new();
        for (k, v) in self.env_vars() {
            env.insert(k, v.into());
        }
        serde_json::json!({
            "binary": self.bin.display().to_string(),
            "args": self.args(),
            "env": env,
        })
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--log".into(),
            std::env::var("HEARTH_BENCH_NODE_LOG").unwrap_or_else(|_| NODE_LOG.into()),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        if let Some(name) = &self.server_name {
            args.push("--server-name".into());
            args.push(name.clone());
        }
        args
    }

    fn env_vars(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if self.federation {
            env.push((
                "HEARTH_FEDERATION_LISTEN".into(),
                r#"["/ip4/127.0.0.1/tcp/0"]"#.into(),
            ));
            let list: Vec<String> = self.bootstrap.iter().map(|a| format!("{a:?}")).collect();
            env.push(("HEARTH_BOOTSTRAP".into(), format!("[{}]", list.join(","))));
        }
        env
    }
}

/// A running `hearth serve`.
pub struct NodeProc {
    /// Where its client API listens.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    /// From spawning the process to its ready line.
    pub ready_after: Duration,
    /// What it was started with.
    pub spec: NodeSpec,
    fed_addrs: Arc<Mutex<Vec<String>>>,
    child: Child,
}

impl NodeProc {
    /// Starts the node and waits for its `ready on http://ADDR` line.
    pub fn start(spec: &NodeSpec) -> Result<NodeProc> {
        if !spec.bin.exists() {
            bail!(
                "no hearth binary at {} (build it with `cargo build --release --bin hearth`, or pass --hearth PATH)",
                spec.bin.display()
            );
        }
        std::fs::create_dir_all(&spec.data_dir)?;
        let started = Instant::now();
        let mut cmd = Command::new(&spec.bin);
        cmd.args(spec.args())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in spec.env_vars() {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let stderr = child.stderr.take().context("the node's stderr")?;
        let fed_addrs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let fed_addrs = fed_addrs.clone();
            // A custom log filter (for diagnosis) also shows every line.
            let verbose = std::env::var_os("HEARTH_BENCH_NODE_LOG").is_some();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("ready on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr.to_string());
                        }
                    } else if let Some(rest) = line.split("federation reachable at ").nth(1) {
                        let addr = strip_ansi(rest);
                        if let (Some(addr), Ok(mut list)) =
                            (addr.split_whitespace().next(), fed_addrs.lock())
                        {
                            list.push(addr.to_string());
                        }
                    } else if verbose || line.contains("WARN") || line.contains("ERROR") {
                        // Shown, so a failing run explains itself.
                        eprintln!("node: {line}");
                    }
                }
            });
        }
        let addr = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("the node did not report ready (exit status {status:?})");
            }
        };
        let ready_after = started.elapsed();
        Ok(NodeProc {
            addr: addr.parse().context("the node's address")?,
            pid: child.id(),
            ready_after,
            spec: spec.clone(),
            fed_addrs,
            child,
        })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The federation addresses the node logged (`.../p2p/<peer id>`, dialable),
    /// waiting up to `wait` for the first one.
    pub fn federation_addrs(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        loop {
            let list = self.fed_addrs.lock().map(|l| l.clone()).unwrap_or_default();
            if !list.is_empty() || Instant::now() > deadline {
                return list;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the node with SIGTERM (graceful: sessions closed, store flushed) and
    /// waits for it to exit; kills it if that takes too long.
    pub fn stop(mut self) -> Result<Duration> {
        let began = Instant::now();
        // SAFETY: kill() with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        while began.elapsed() < STOP_TIMEOUT {
            if self.child.try_wait()?.is_some() {
                return Ok(began.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("the node did not stop within {STOP_TIMEOUT:?}; killed")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `s` without ANSI colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The default `hearth` binary: next to this tool's own executable (both are built
/// into the same `target/<profile>/` folder).
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("hearth")))
        .unwrap_or_else(|| PathBuf::from("hearth"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        let line = "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m /ip4/127.0.0.1/tcp/4100/p2p/12D3\u{1b}[0m";
        assert_eq!(
            strip_ansi(line),
            "2026  INFO /ip4/127.0.0.1/tcp/4100/p2p/12D3"
        );
    }
}
