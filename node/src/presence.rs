//! Presence: who is online, when they were last active, and telling those who share a conversation, here and on other servers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use hearth_client_api::ServerFrame;
use hearth_client_api::model::{ChannelKind, PresenceInfo, PresenceStatus};
use hearth_federation::clock::wall_ms;
use hearth_federation::event::user_server;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::error::ApiResult;
use crate::hub::{Hub, Outbound};
use crate::store::Store;

/// How often per time-to-live remote presence is checked for expiry: an expired
/// `online` is told as `offline` at most a quarter of the time-to-live late.
const EXPIRY_CHECKS_PER_TTL: u32 = 4;

/// A remote user's presence as their server last announced it.
#[derive(Debug, Clone)]
struct RemoteStatus {
    online: bool,
    last_active_at: Option<u64>,
    ts: u64,
    seen: Instant,
}

/// Presence rules over the hub and the store.
#[derive(Clone)]
pub struct Presence {
    store: Store,
    hub: Hub,
    server_name: String,
    /// Groups larger than this get no pushed presence; their members look it up.
    push_max_members: usize,
    /// Announcements of local changes go here, to be sent to other servers.
    relay: Arc<OnceLock<mpsc::UnboundedSender<String>>>,
    remote: Arc<RwLock<HashMap<String, RemoteStatus>>>,
    /// A remote "online" not refreshed for this long counts as offline (its server
    /// may be gone).
    remote_ttl: Duration,
}

impl Presence {
    /// Presence for this node.
    pub fn new(
        store: Store,
        hub: Hub,
        server_name: String,
        push_max_members: usize,
        refresh: Duration,
    ) -> Self {
        Presence {
            store,
            hub,
            server_name,
            push_max_members,
            relay: Arc::new(OnceLock::new()),
            remote: Arc::new(RwLock::new(HashMap::new())),
            remote_ttl: refresh * 3,
        }
    }

    /// Sends local changes to federation from now on.
    pub fn set_relay(&self, relay: mpsc::UnboundedSender<String>) {
        let _ = self.relay.set(relay);
    }

    fn is_local(&self, user: &str) -> bool {
        user_server(user) == Some(self.server_name.as_str())
    }

    /// A user's presence now.
    pub fn status(&self, user: &str) -> ApiResult<PresenceInfo> {
        if !self.is_local(user) {
            let remote = self.remote.read().unwrap_or_else(|e| e.into_inner());
            let entry = remote.get(user);
            let online = entry.is_some_and(|r| r.online && r.seen.elapsed() < self.remote_ttl);
            return Ok(PresenceInfo {
                user: user.to_string(),
                status: if online {
                    PresenceStatus::Online
                } else {
                    PresenceStatus::Offline
                },
                last_active_at: entry.and_then(|r| r.last_active_at),
            });
        }
        let online = self.hub.online(user);
        Ok(PresenceInfo {
            user: user.to_string(),
            status: if online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            },
            last_active_at: self.store.last_active(user)?,
        })
    }

    /// Local users with a connected device.
    pub fn online_local_users(&self) -> Vec<String> {
        self.hub.online_users()
    }

    /// Records activity (connect, heartbeat, disconnect).
    pub fn touch(&self, user: &str) {
        if let Err(e) = self.store.set_last_active(user, wall_ms()) {
            warn!(error = %e, %user, "could not record last activity");
        }
    }

    /// Local users who receive `user`'s presence changes: members of the direct
    /// chats and of the small groups they share.
    pub fn audience(&self, user: &str) -> ApiResult<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for channel in self.store.user_channels(user)? {
            let Some(rec) = self.store.channel(&channel)? else {
                continue;
            };
            if rec.kind == ChannelKind::Group && rec.member_count > self.push_max_members {
                continue;
            }
            for (member, _) in self.store.members(&channel)? {
                if member != user && self.is_local(&member) {
                    out.insert(member);
                }
            }
        }
        Ok(out)
    }

    /// Tells the audience of `user` their current status, here and (for local
    /// users) on other servers. Called after a user's first device connects or last
    /// device leaves; the status sent is read at sending time, so racing connects and
    /// disconnects end with the true state.
    pub fn announce(&self, user: &str) {
        self.tell_audience(user);
        if self.is_local(user)
            && let Some(relay) = self.relay.get()
        {
            let _ = relay.send(user.to_string());
        }
    }

    fn tell_audience(&self, user: &str) {
        let (info, audience) = match (self.status(user), self.audience(user)) {
            (Ok(i), Ok(a)) => (i, a),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, %user, "presence not announced");
                return;
            }
        };
        let Ok(frame) = serde_json::to_string(&ServerFrame::Presence(info)) else {
            return;
        };
        let item = Outbound::Presence(Arc::from(frame));
        for member in audience {
            self.hub.send_to_user(&member, &item);
        }
    }

    /// Tells the audience of every remote user whose `online` has gone unrefreshed
    /// for the time-to-live that they are offline now: their server may be gone, and
    /// without this their chat partners would show them online until they looked.
    /// Returns the users it marked offline.
    pub fn expire_remote(&self) -> Vec<String> {
        let expired: Vec<String> = {
            let mut remote = self.remote.write().unwrap_or_else(|e| e.into_inner());
            remote
                .iter_mut()
                .filter(|(_, r)| r.online && r.seen.elapsed() >= self.remote_ttl)
                .map(|(user, r)| {
                    // As if the server had said so; a later "online" is a change again.
                    r.online = false;
                    user.clone()
                })
                .collect()
        };
        for user in &expired {
            self.tell_audience(user);
        }
        expired
    }

    /// Marks remote users offline whose server stopped refreshing them (see
    /// [`Presence::expire_remote`]), checking a few times per time-to-live, until
    /// `shutdown` turns true.
    pub fn start_expiry(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let presence = self.clone();
        let every = (self.remote_ttl / EXPIRY_CHECKS_PER_TTL).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        for user in presence.expire_remote() {
                            debug!(%user, "remote presence expired; told as offline");
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
        })
    }

    /// Takes in a remote user's presence, as their server announced it (already
    /// verified). Local users who share a conversation hear of changes.
    pub fn remote_update(&self, user: &str, online: bool, last_active_at: Option<u64>, ts: u64) {
        let changed = {
            let mut remote = self.remote.write().unwrap_or_else(|e| e.into_inner());
            match remote.get_mut(user) {
                Some(r) if r.ts > ts => false,
                Some(r) => {
                    let was_online = r.online && r.seen.elapsed() < self.remote_ttl;
                    *r = RemoteStatus {
                        online,
                        last_active_at,
                        ts,
                        seen: Instant::now(),
                    };
                    was_online != online
                }
                None => {
                    remote.insert(
                        user.to_string(),
                        RemoteStatus {
                            online,
                            last_active_at,
                            ts,
                            seen: Instant::now(),
                        },
                    );
                    true
                }
            }
        };
        if changed {
            self.tell_audience(user);
        }
    }
}
