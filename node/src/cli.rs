//! The `hearth` command line: `serve`, `user add|list|disable`, and `chat`.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, Overrides, Registration};
use crate::http::admin::{AdminUser, AdminUsers, NewUser};
use crate::{Node, NodeError};

/// Hearth: a federated chat homeserver.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (no config file needed: defaults serve http://127.0.0.1:8080
    /// with the store in ./hearth-data).
    #[command(after_long_help = SETTINGS_HELP)]
    Serve(ServeArgs),
    /// Manage accounts in the node's store (stop the node first: the store has one owner).
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Start a network of N nodes on loopback, with demo users, for trying and testing
    /// federation; Ctrl-C stops them all.
    Devnet(DevnetArgs),
    /// A terminal chat client for a running node.
    Chat(hearth_client_api::chat::ChatArgs),
}

/// Where the node's settings and store are.
#[derive(Debug, Args)]
struct NodeArgs {
    /// TOML settings file (optional; every setting has a default).
    #[arg(long, short, global = true, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,
    /// Folder of the store [default: ./hearth-data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// This server's name; users are name@server [default: localhost].
    #[arg(long, global = true)]
    server_name: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Address of the client API [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Who may create accounts: open or closed [default: open].
    #[arg(long, value_parser = parse_registration)]
    registration: Option<Registration>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Log filter, e.g. info or hearth_node=debug [default: info].
    #[arg(long)]
    log: Option<String>,
}

#[derive(Debug, Args)]
struct DevnetArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Client API port of the first node; the others follow (0: any free ports).
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// Keep the nodes' stores here (default: a temporary folder removed on exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// Every setting, for `hearth serve --help` (docs/operations.md and docs/federation.md
/// explain each).
const SETTINGS_HELP: &str = "\
Settings (TOML file key / environment variable, default):
  server_name                 HEARTH_SERVER_NAME                 localhost
  data_dir                    HEARTH_DATA_DIR                    ./hearth-data
  listen                      HEARTH_LISTEN                      127.0.0.1:8080
  registration                HEARTH_REGISTRATION                open (or closed)
  max_group_members           HEARTH_MAX_GROUP_MEMBERS           100
  presence_push_max_members   HEARTH_PRESENCE_PUSH_MAX_MEMBERS   25
  heartbeat_timeout_secs      HEARTH_HEARTBEAT_TIMEOUT_SECS      30
  auth_timeout_secs           HEARTH_AUTH_TIMEOUT_SECS           10
  max_frame_bytes             HEARTH_MAX_FRAME_BYTES             65536
  max_body_bytes              HEARTH_MAX_BODY_BYTES              16384
  rate_limit_per_sec          HEARTH_RATE_LIMIT_PER_SEC          100
  rate_limit_burst            HEARTH_RATE_LIMIT_BURST            200
  session_queue               HEARTH_SESSION_QUEUE               1024
  sync_batch                  HEARTH_SYNC_BATCH                  500
  idempotency_retention_secs  HEARTH_IDEMPOTENCY_RETENTION_SECS  86400 (a day)
  log_format                  HEARTH_LOG_FORMAT                  text (or json)
  log                         HEARTH_LOG                         info
  federation_listen           HEARTH_FEDERATION_LISTEN           [] (federation off)
  bootstrap                   HEARTH_BOOTSTRAP                   []
  peers                       HEARTH_PEERS                       [] (name, addr, key)
  strict_keys                 HEARTH_STRICT_KEYS                 false
  allow_servers               HEARTH_ALLOW_SERVERS               []
  deny_servers                HEARTH_DENY_SERVERS                []
  mdns                        HEARTH_MDNS                        false
  catchup_interval_secs       HEARTH_CATCHUP_INTERVAL_SECS       30
  presence_refresh_secs       HEARTH_PRESENCE_REFRESH_SECS       20
  outbox_retention_secs       HEARTH_OUTBOX_RETENTION_SECS       259200 (three days)
  push_coalesce_ms            HEARTH_PUSH_COALESCE_MS            2000
  push_timeout_secs           HEARTH_PUSH_TIMEOUT_SECS           10
  push_contact                HEARTH_PUSH_CONTACT                mailto:postmaster@<server_name>
  push_allow_private          HEARTH_PUSH_ALLOW_PRIVATE          false
Layers: defaults, then --config FILE, then HEARTH_* variables, then flags.
Lists in variables are written as [a, b].";

/// Password of the devnet's demo users.
const DEVNET_PASSWORD: &str = "devnet-password";
/// Demo users created on every devnet node.
const DEVNET_USERS: [&str; 3] = ["alice", "bob", "carol"];

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account; the password is read from the first line of standard input.
    Add {
        /// User name (local part).
        name: String,
    },
    /// List accounts.
    List,
    /// Disable an account and log out all its devices.
    Disable {
        /// User name (local part).
        name: String,
    },
}

fn parse_registration(s: &str) -> Result<Registration, String> {
    match s {
        "open" => Ok(Registration::Open),
        "closed" => Ok(Registration::Closed),
        _ => Err("expected open or closed".into()),
    }
}

fn load(node: &NodeArgs, mut overrides: Overrides) -> Result<Config, NodeError> {
    overrides.data_dir = node.data_dir.clone();
    overrides.server_name = node.server_name.clone();
    Config::load(node.config.as_deref(), &overrides)
}

/// The configured filter, with the store engine's own chatter (a line per keyspace
/// at every start, one per background flush) held to warnings unless it is named.
fn log_filter_spec(configured: &str) -> String {
    if configured.contains("fjall") || configured.contains("lsm_tree") {
        configured.to_string()
    } else {
        format!("{configured},fjall=warn,lsm_tree=warn")
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log_filter_spec(&config.log)))
        .unwrap_or_else(|_| EnvFilter::new(log_filter_spec("info")));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal; files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs the command line (the binary's whole `main`).
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::User { command, node } => user(command, node).await,
        Command::Devnet(args) => devnet(args).await,
        Command::Chat(args) => hearth_client_api::chat::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        registration: args.registration,
        log_format: args.log_json.then_some(LogFormat::Json),
        log: args.log.clone(),
        ..Overrides::default()
    };
    let config = load(&args.node, overrides)?;
    init_logging(&config);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let node = Node::open(config.clone()).await?;
    node.serve_admin();
    info!(
        server_name = %config.server_name,
        data_dir = %config.data_dir.display(),
        registration = ?config.registration,
        "hearth node ready on http://{addr} (WebSocket ws://{addr}/v1/ws)"
    );
    node.serve(listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn devnet(args: DevnetArgs) -> Result<()> {
    if !(1..=50).contains(&args.nodes) {
        anyhow::bail!("--nodes must be 1 to 50");
    }
    let temp;
    let root = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let mut base = Config {
        log: args.log.clone(),
        ..Config::default()
    };
    init_logging(&base);
    base.federation_listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    base.catchup_interval_secs = 5;
    base.presence_refresh_secs = 10;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut running = Vec::new();
    let mut bootstrap: Vec<String> = Vec::new();
    println!(
        "Hearth devnet: {} nodes on loopback (data in {})",
        args.nodes,
        root.display()
    );
    println!();
    for i in 1..=args.nodes {
        let name = format!("node{i}.devnet");
        let port = if args.base_port == 0 {
            0
        } else {
            args.base_port.saturating_add(i as u16 - 1)
        };
        let config = Config {
            server_name: name.clone(),
            data_dir: root.join(&name),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            bootstrap: bootstrap.clone(),
            ..base.clone()
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let node = Node::open(config).await?;
        let svc = node.services().clone();
        for user in DEVNET_USERS {
            match svc
                .accounts
                .create_account(user, DEVNET_PASSWORD, true)
                .await
            {
                Ok(()) => {}
                Err(e) if e.code == hearth_client_api::ErrorCode::UserExists => {}
                Err(e) => anyhow::bail!("creating demo user {user}: {e}"),
            }
        }
        let fed = svc.federation.clone().context("federation did not start")?;
        let mut fed_addrs = Vec::new();
        for _ in 0..200 {
            fed_addrs = fed.addresses().await;
            if !fed_addrs.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        bootstrap.extend(fed_addrs.iter().map(ToString::to_string));
        let mut stop = stop_rx.clone();
        running.push(tokio::spawn(node.serve(listener, async move {
            let _ = stop.changed().await;
        })));
        println!(
            "  {name:<16} http://{addr}   federation {}",
            fed_addrs
                .first()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        println!(
            "  {:<16} users: {} (password {DEVNET_PASSWORD})",
            "",
            DEVNET_USERS.map(|u| format!("{u}@{name}")).join(", ")
        );
    }
    println!();
    println!("Chat from a terminal, for example:");
    println!(
        "  hearth chat --server http://<address above> --user alice --password {DEVNET_PASSWORD}"
    );
    println!("  then: /open bob@node2.devnet");
    println!("or open an address above in a browser. Ctrl-C stops every node.");
    shutdown_signal().await;
    println!("stopping {} nodes...", running.len());
    let _ = stop_tx.send(true);
    for node in running {
        match node.await {
            Ok(Err(e)) => eprintln!("a node stopped with an error: {e}"),
            Err(e) => eprintln!("a node task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    println!("stopped");
    Ok(())
}

async fn user(command: UserCommand, node_args: NodeArgs) -> Result<()> {
    let config = load(&node_args, Overrides::default())?;
    let password = match &command {
        UserCommand::Add { .. } => {
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            password.trim_end_matches(['\r', '\n']).to_string()
        }
        _ => String::new(),
    };
    // A node running on the folder owns the store: ask it over its admin socket.
    let socket = crate::http::admin::socket_path(&config.data_dir);
    if let Some(done) = user_on_running_node(&socket, &command, &password).await? {
        println!("{done}");
        return Ok(());
    }
    let node = Node::open(config).await?;
    let accounts = node.services().accounts.clone();
    let result = match command {
        UserCommand::Add { name } => accounts
            .create_account(&name, &password, true)
            .await
            .map(|()| format!("created {}", accounts.user_id(&name))),
        UserCommand::List => accounts.list_accounts().map(|list| {
            let users = list.into_iter().map(|(name, rec)| AdminUser {
                user: accounts.user_id(&name),
                disabled: rec.disabled,
            });
            account_lines(users)
        }),
        UserCommand::Disable { name } => accounts
            .disable(&name)
            .await
            .map(|()| format!("disabled {}", accounts.user_id(&name))),
    };
    node.close().await?;
    let done = result.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{done}");
    Ok(())
}

/// One line per account: its id and whether it is active.
fn account_lines(users: impl IntoIterator<Item = AdminUser>) -> String {
    users
        .into_iter()
        .map(|u| {
            let state = if u.disabled { "disabled" } else { "active" };
            format!("{}\t{state}", u.user)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a user command on the node serving `socket`, if one does: `None` when no
/// node listens there (no socket, or a crashed node's), so the caller opens the store.
async fn user_on_running_node(
    socket: &std::path::Path,
    command: &UserCommand,
    password: &str,
) -> Result<Option<String>> {
    let (method, uri, body) = match command {
        UserCommand::Add { name } => (
            hyper::Method::POST,
            "/admin/users".to_string(),
            serde_json::to_vec(&NewUser {
                name: name.clone(),
                password: password.to_string(),
            })?,
        ),
        UserCommand::List => (hyper::Method::GET, "/admin/users".to_string(), Vec::new()),
        UserCommand::Disable { name } => (
            hyper::Method::POST,
            format!("/admin/users/{name}/disable"),
            Vec::new(),
        ),
    };
    let Some((status, answer)) = ask_admin_socket(socket, method, &uri, body).await? else {
        return Ok(None);
    };
    if !(200..300).contains(&status) {
        let problem: hearth_client_api::http::Problem = serde_json::from_slice(&answer)
            .with_context(|| {
                format!("the node answered {status} with something not a problem document")
            })?;
        anyhow::bail!("{}", problem.detail);
    }
    let done = match command {
        UserCommand::Add { .. } => {
            let user: AdminUser = serde_json::from_slice(&answer)?;
            format!("created {}", user.user)
        }
        UserCommand::List => {
            let list: AdminUsers = serde_json::from_slice(&answer)?;
            account_lines(list.users)
        }
        UserCommand::Disable { .. } => {
            let user: AdminUser = serde_json::from_slice(&answer)?;
            format!("disabled {}", user.user)
        }
    };
    Ok(Some(done))
}

/// How long an admin command waits for a running node's answer.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One HTTP/1.1 exchange over the admin socket: the status and body, or `None` when
/// nothing listens there.
async fn ask_admin_socket(
    socket: &std::path::Path,
    method: hyper::Method,
    uri: &str,
    body: Vec<u8>,
) -> Result<Option<(u16, Vec<u8>)>> {
    use http_body_util::BodyExt;
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let answer = response.into_body().collect().await?.to_bytes().to_vec();
        anyhow::Ok((status, answer))
    };
    let answered = tokio::time::timeout(ADMIN_TIMEOUT, exchange)
        .await
        .context("the node did not answer on its admin socket in time")?
        .with_context(|| format!("talking to the node on {}", socket.display()))?;
    Ok(Some(answered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_engines_info_lines_are_held_back_unless_asked_for() {
        assert_eq!(log_filter_spec("info"), "info,fjall=warn,lsm_tree=warn");
        assert_eq!(log_filter_spec("debug,fjall=debug"), "debug,fjall=debug");
        assert!(EnvFilter::try_new(log_filter_spec("warn,hearth_node=info")).is_ok());
    }

    #[test]
    fn serve_help_lists_every_setting_with_its_variable() {
        for name in crate::config::SETTINGS {
            assert!(
                SETTINGS_HELP.contains(&format!("  {name} ")),
                "{name} missing from help"
            );
            let var = format!("HEARTH_{}", name.to_uppercase());
            assert!(SETTINGS_HELP.contains(&var), "{var} missing from help");
        }
        let lines = SETTINGS_HELP
            .lines()
            .filter(|l| l.starts_with("  "))
            .count();
        assert_eq!(
            lines,
            crate::config::SETTINGS.len(),
            "no setting listed that does not exist"
        );
    }
}
