//! Push notifications: telling users with no device online that messages arrived.
//!
//! A device registers push targets (Web Push subscriptions or webhook URLs). When
//! the flusher publishes a message to a local user who has no connected device
//! (local and federated messages alike), [`Push`] hears of it through
//! [`OfflineSink`] and only hands it to a channel: nothing on the chat path waits
//! for the store's push trees or the network. One task folds such messages into a
//! coalescing window per user and conversation; when the window closes it queues
//! one notification per target in the store. Another task sends the queue, with
//! retries and backoff, and removes targets whose service says they are gone.
//!
//! # Layout
//! - [`vapid`]: the node's VAPID key pair, created on first start in the data folder.
//! - [`target`]: what clients may register, and the guard that keeps requests off
//!   private addresses.
//! - `notice`: coalescing windows → queued jobs.
//! - `deliver`: the queue worker: Web Push and webhook requests, retries, removals.

pub mod target;
pub mod vapid;

mod deliver;
mod notice;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_client_api::ErrorCode;
use hearth_client_api::http::{NewPushTarget, PushKind, PushSettings, PushTarget};
use hearth_client_api::model::{Event, EventContent};
use hearth_federation::clock::wall_ms;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, instrument, warn};

use crate::accounts::DeviceAuth;
use crate::config::Config;
use crate::error::{ApiError, ApiResult, NodeError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::push::{PushSettingsRecord, PushTargetKind};
use crate::sync::{Delivery, OfflineSink};

pub use vapid::VapidKeys;

/// Most push targets one user may have (over all their devices).
pub const MAX_TARGETS_PER_USER: usize = 20;

/// Offline deliveries waiting for the coalescing task; beyond this they are dropped
/// (with a warning) rather than slow the flusher.
const OFFLINE_QUEUE: usize = 16 * 1024;

/// A message that reached a user with no device online.
struct Offline {
    user: String,
    event: Arc<Event>,
}

struct Shared {
    store: Store,
    hub: Hub,
    metrics: Metrics,
    vapid: VapidKeys,
    http: reqwest::Client,
    contact: String,
    window: Duration,
    allow_private: bool,
    tx: mpsc::Sender<Offline>,
    rx: Mutex<Option<mpsc::Receiver<Offline>>>,
    /// Wakes the delivery worker when jobs were queued.
    wake: Notify,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A cheap handle to the node's push notification service.
#[derive(Clone)]
pub struct Push {
    shared: Arc<Shared>,
}

impl Push {
    /// Loads (or creates) the VAPID key and builds the service; no task runs until
    /// [`Push::start`].
    pub fn new(
        config: &Config,
        store: Store,
        hub: Hub,
        metrics: Metrics,
    ) -> Result<Push, NodeError> {
        let vapid = VapidKeys::load_or_create(&config.data_dir)
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let timeout = Duration::from_secs(config.push_timeout_secs);
        let http = reqwest::Client::builder()
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .no_proxy()
            .dns_resolver(target::GuardedResolver {
                allow_private: config.push_allow_private,
            })
            .build()
            .map_err(|e| NodeError::Config(format!("push HTTP client: {e}")))?;
        let (tx, rx) = mpsc::channel(OFFLINE_QUEUE);
        Ok(Push {
            shared: Arc::new(Shared {
                store,
                hub,
                metrics,
                vapid,
                http,
                contact: config.push_contact(),
                window: Duration::from_millis(config.push_coalesce_ms),
                allow_private: config.push_allow_private,
                tx,
                rx: Mutex::new(Some(rx)),
                wake: Notify::new(),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Starts the coalescing and delivery tasks; they end when `shutdown` turns true.
    pub fn start(&self, shutdown: watch::Receiver<bool>) {
        let Some(rx) = self
            .shared
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let coalesce = tokio::spawn(notice::run(self.shared.clone(), rx, shutdown.clone()));
        let deliver = tokio::spawn(deliver::run(self.shared.clone(), shutdown));
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([coalesce, deliver]);
    }

    /// Waits for the tasks to end (after the shutdown signal); requests in flight are
    /// abandoned and their jobs sent again after the next start.
    pub async fn stop(&self) {
        let tasks =
            std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            if task.await.is_err() {
                warn!("a push task ended abnormally");
            }
        }
    }

    /// The VAPID public key, unpadded base64url of the uncompressed point.
    pub fn vapid_public_key(&self) -> &str {
        self.shared.vapid.public_key()
    }

    /// Registers (or replaces) a push target for the calling device.
    #[instrument(skip(self, new), fields(user = %auth.user, device = %auth.device))]
    pub async fn register(&self, auth: &DeviceAuth, new: &NewPushTarget) -> ApiResult<PushTarget> {
        let store = &self.shared.store;
        let rec = target::validate(new, &auth.device, self.shared.allow_private, wall_ms())?;
        let id = target::target_id(&auth.user, &rec.endpoint);
        let existing = store.push_targets(&auth.user)?;
        if existing.len() >= MAX_TARGETS_PER_USER && !existing.iter().any(|(i, _)| *i == id) {
            return Err(ApiError::new(
                ErrorCode::TooManyPushTargets,
                format!(
                    "a user may have at most {MAX_TARGETS_PER_USER} push targets; remove one first"
                ),
            ));
        }
        store.put_push_target(&auth.user, &id, &rec)?;
        store.flush().await?;
        info!(target = %id, kind = ?rec.kind, "push target registered");
        Ok(wire_target(id, rec, &auth.device))
    }

    /// Every push target of the caller's devices.
    pub fn targets(&self, auth: &DeviceAuth) -> ApiResult<Vec<PushTarget>> {
        Ok(self
            .shared
            .store
            .push_targets(&auth.user)?
            .into_iter()
            .map(|(id, rec)| wire_target(id, rec, &auth.device))
            .collect())
    }

    /// Removes one of the caller's push targets.
    #[instrument(skip(self), fields(user = %auth.user))]
    pub async fn remove(&self, auth: &DeviceAuth, id: &str) -> ApiResult<()> {
        if !self.shared.store.remove_push_target(&auth.user, id)? {
            return Err(ApiError::new(
                ErrorCode::UnknownPushTarget,
                format!("you have no push target {id}"),
            ));
        }
        self.shared.store.flush().await?;
        info!(target = %id, "push target removed");
        Ok(())
    }

    /// The caller's notification settings.
    pub fn settings(&self, user: &str) -> ApiResult<PushSettings> {
        let rec = self.shared.store.push_settings(user)?;
        Ok(PushSettings {
            previews: rec.previews,
        })
    }

    /// Changes the caller's notification settings.
    pub async fn set_settings(
        &self,
        user: &str,
        settings: PushSettings,
    ) -> ApiResult<PushSettings> {
        self.shared.store.put_push_settings(
            user,
            &PushSettingsRecord {
                previews: settings.previews,
            },
        )?;
        self.shared.store.flush().await?;
        Ok(settings)
    }

    /// Jobs waiting in the delivery queue (for tests and diagnostics).
    pub fn queued(&self) -> usize {
        self.shared.store.push_job_count()
    }
}

fn wire_target(id: String, rec: crate::store::push::PushTargetRecord, current: &str) -> PushTarget {
    PushTarget {
        id,
        kind: match rec.kind {
            PushTargetKind::WebPush => PushKind::WebPush,
            PushTargetKind::Webhook => PushKind::Webhook,
        },
        endpoint: rec.endpoint,
        current: rec.device == current,
        device: rec.device,
        created_at: rec.created_at,
    }
}

impl OfflineSink for Push {
    fn undelivered(&self, d: &Delivery) {
        if !matches!(d.event.content, EventContent::Message { .. }) || d.event.sender == d.user {
            return;
        }
        let item = Offline {
            user: d.user.clone(),
            event: d.event.clone(),
        };
        if self.shared.tx.try_send(item).is_err() {
            warn!(user = %d.user, "push queue full or stopped; this message gets no notification");
        }
    }
}
