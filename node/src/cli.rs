//! The `hearth` command line: `serve`, `user add|list|disable`, and `chat`.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, Overrides, Registration};
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
    Serve(ServeArgs),
    /// Manage accounts in the node's store (stop the node first: the store has one owner).
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        node: NodeArgs,
    },
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

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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

async fn user(command: UserCommand, node_args: NodeArgs) -> Result<()> {
    let config = load(&node_args, Overrides::default())?;
    let node = Node::open(config).await?;
    let accounts = node.services().accounts.clone();
    let result = match command {
        UserCommand::Add { name } => {
            let mut password = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            accounts
                .create_account(&name, password, true)
                .await
                .map(|()| println!("created {}", accounts.user_id(&name)))
        }
        UserCommand::List => accounts.list_accounts().map(|list| {
            for (name, rec) in list {
                let state = if rec.disabled { "disabled" } else { "active" };
                println!("{}\t{state}", accounts.user_id(&name));
            }
        }),
        UserCommand::Disable { name } => accounts
            .disable(&name)
            .await
            .map(|()| println!("disabled {}", accounts.user_id(&name))),
    };
    node.close().await?;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
