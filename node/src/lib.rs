//! The Hearth homeserver: one organisation's node, serving its users over HTTP and WebSocket.
//!
//! # Layout
//! - [`config`]: typed settings (defaults, file, environment, flags).
//! - [`store`]: the only module that touches the key-value engine (fjall); typed records in keyspaces named by key layout.
//! - [`accounts`]: registration, password login, devices and their tokens and cursors.
//! - [`channels`]: direct chats and groups, membership events, sending, history.
//! - [`sync`]: stream positions, group-committed writes, backlog for reconnecting devices.
//! - [`hub`]: which devices are connected, and their bounded outbound queues.
//! - [`idempotency`]: how long send keys are remembered; the sweep that forgets them.
//! - [`presence`]: online/offline, last activity, and who hears about changes.
//! - [`push`]: push notifications (Web Push, webhooks) for users with no device online.
//! - [`session`]: one device's WebSocket session, generic over its transport.
//! - [`http`]: the routes, authentication, and the mapping of errors to problem
//!   documents; its `admin` part serves account commands on a Unix socket.
//! - [`federation`]: the glue to other servers: directory and pinned keys, outboxes,
//!   verification of what comes in, catch-up, presence across servers.
//! - [`metrics`]: the node's Prometheus registry.
//! - `bounded`: size-capped maps for what writes remember between rounds.
//! - [`cli`]: the `hearth` command line (serve, user admin, chat).
//!
//! [`Node::open`] builds every service once over one store; [`Node::serve`] runs
//! the client API on a listener until a shutdown future completes.

pub mod accounts;
mod bounded;
pub mod channels;
pub mod cli;
pub mod config;
pub mod error;
pub mod federation;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod metrics;
pub mod presence;
pub mod push;
pub mod session;
pub mod store;
pub mod sync;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hearth_federation::Hlc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::config::Config;
pub use crate::error::{ApiError, NodeError};

use crate::accounts::Accounts;
use crate::channels::{ChannelLimits, Channels};
use crate::federation::Federation;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::push::Push;
use crate::store::{Store, StoreError};
use crate::sync::{Flusher, Inboxes};

/// How long shutdown waits for sessions to close before it stops waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long shutdown then waits for session tasks that were told to close to end.
const SESSIONS_GONE_WAIT: Duration = Duration::from_secs(5);

/// Every service of a node, built once and shared by handlers and sessions.
pub struct Services {
    /// The settings the node runs with.
    pub config: Config,
    /// The store.
    pub store: Store,
    /// Accounts and devices.
    pub accounts: Accounts,
    /// Channels and messages.
    pub channels: Channels,
    /// Inboxes and sync.
    pub inboxes: Inboxes,
    /// Live sessions.
    pub hub: Hub,
    /// Presence.
    pub presence: Presence,
    /// Push notifications.
    pub push: Push,
    /// Metrics.
    pub metrics: Metrics,
    /// Federation, when it is on.
    pub federation: Option<Federation>,
    shutdown: watch::Receiver<bool>,
    accepting: AtomicBool,
}

impl Services {
    /// Whether the node accepts work (false once shutdown began).
    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}

/// A node with its store open, ready to serve.
pub struct Node {
    svc: Arc<Services>,
    flusher: Flusher,
    stop: watch::Sender<bool>,
    /// Periodic work that holds the store (expiry sweeps): awaited at stop, so the
    /// store is closed when the node says it stopped.
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// Waits (bounded) for the node's periodic tasks, told to stop, to let go of the store.
async fn background_ended(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        if tokio::time::timeout(SESSIONS_GONE_WAIT, task)
            .await
            .is_err()
        {
            warn!("a background task did not end in time; stopping anyway");
        }
    }
}

/// Creates the data folder readable by this user alone (it holds every message and
/// the server's keys), and warns when an existing one is open to others.
fn open_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        return Ok(());
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        warn!(
            data_dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data folder is open to other users of this machine; `chmod 700` it to keep the history and keys private"
        );
    }
    Ok(())
}

impl Node {
    /// Opens the store in the configured data folder and builds the services.
    pub async fn open(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        open_data_dir(&config.data_dir)?;
        let opening = std::time::Instant::now();
        let store = Store::open(&config.data_dir).map_err(|e| match e {
            StoreError::Locked => NodeError::DataDirLocked(config.data_dir.clone()),
            other => NodeError::Store(other),
        })?;
        info!(ms = opening.elapsed().as_millis() as u64, "store opened");
        let metrics = Metrics::new();
        let hub = Hub::new(config.session_queue, metrics.clone());
        let (inboxes, flusher) = Inboxes::start(store.clone(), hub.clone(), metrics.clone())?;
        let accounts = Accounts::new(
            store.clone(),
            hub.clone(),
            config.registration,
            config.policy(),
        );
        let identity = hearth_federation::NodeIdentity::load_or_create(&config.data_dir)
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let channels = Channels::new(
            store.clone(),
            inboxes.clone(),
            accounts.clone(),
            Arc::new(Hlc::new()),
            ChannelLimits {
                max_group_members: config.max_group_members,
                max_body_bytes: config.max_body_bytes,
            },
            metrics.clone(),
        );
        inboxes.set_before_flush(channels.send_rounds());
        let presence = Presence::new(
            store.clone(),
            hub.clone(),
            config.server_name.clone(),
            config.presence_push_max_members,
            Duration::from_secs(config.presence_refresh_secs),
        );
        let push = Push::new(&config, store.clone(), hub.clone(), metrics.clone())?;
        inboxes.set_offline_sink(Arc::new(push.clone()));
        let (stop, shutdown) = watch::channel(false);
        hub.start(shutdown.clone());
        let federation = if config.federation_enabled() {
            Some(
                Federation::start(
                    &config,
                    identity,
                    store.clone(),
                    channels.clone(),
                    presence.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let mut background = vec![idempotency::start_expiry(
            store.clone(),
            Duration::from_secs(config.idempotency_retention_secs),
            shutdown.clone(),
        )];
        if federation.is_some() {
            background.push(presence.start_expiry(shutdown.clone()));
        }
        let svc = Arc::new(Services {
            config,
            store,
            accounts,
            channels,
            inboxes,
            hub,
            presence,
            push,
            metrics,
            federation,
            shutdown,
            accepting: AtomicBool::new(true),
        });
        Ok(Node {
            svc,
            flusher,
            stop,
            background,
        })
    }

    /// Serves the admin API (account commands) on the Unix socket in the data folder
    /// until the node stops; `hearth serve` opens it before it says it is ready.
    pub fn serve_admin(&self) {
        http::admin::serve(self.svc.clone(), self.svc.shutdown.clone());
    }

    /// The node's services (for admin commands and tests).
    pub fn services(&self) -> &Arc<Services> {
        &self.svc
    }

    /// Serves the client API on `listener` until `shutdown` completes, then stops
    /// accepting, closes sessions with the going-away code, waits (bounded) for them,
    /// and flushes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let Node {
            svc,
            flusher,
            stop,
            background,
        } = self;
        let app = http::router(svc.clone());
        svc.push.start(svc.shutdown.clone());
        let begun = Arc::new(tokio::sync::Notify::new());
        let signal = {
            let svc = svc.clone();
            let begun = begun.clone();
            async move {
                shutdown.await;
                info!("shutting down: closing sessions");
                svc.accepting.store(false, Ordering::Release);
                let _ = stop.send(true);
                begun.notify_one();
            }
        };
        // Small frames, each wanted at once: no Nagle on client sockets (with delayed
        // acks it costs tens of milliseconds per exchange).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let server = axum::serve(listener, app).with_graceful_shutdown(signal);
        let served = tokio::select! {
            r = server => r.map_err(NodeError::Io),
            _ = async { begun.notified().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                warn!("some connections did not close in time; stopping anyway");
                Ok(())
            }
        };
        // WebSocket sessions run in tasks of their own, which the server's connection
        // tracking lets go at the upgrade. Each holds the services: wait (bounded) until
        // they are gone, so what they still write reaches the flusher, and the store is
        // free to open again once this returns.
        let deadline = tokio::time::Instant::now() + SESSIONS_GONE_WAIT;
        while Arc::strong_count(&svc) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&svc) > 1 {
            warn!("some sessions were still ending; stopping anyway");
        }
        if let Some(f) = &svc.federation {
            f.stop().await;
        }
        svc.push.stop().await;
        background_ended(background).await;
        svc.inboxes.stop();
        if !flusher.finished().await {
            warn!("the store flusher ended abnormally");
        }
        // Writing the journal out to tables now is what makes the next start quick.
        if let Err(e) = svc.store.checkpoint().await {
            warn!(error = %e, "store checkpoint at stop failed; the next start replays the journal");
        }
        info!("stopped");
        served
    }

    /// Stops the flusher without serving (for admin commands), flushing the store.
    pub async fn close(self) -> Result<(), NodeError> {
        let _ = self.stop.send(true);
        if let Some(f) = &self.svc.federation {
            f.stop().await;
        }
        background_ended(self.background).await;
        self.svc.inboxes.stop();
        let _ = self.flusher.finished().await;
        self.svc.store.checkpoint().await?;
        Ok(())
    }
}
