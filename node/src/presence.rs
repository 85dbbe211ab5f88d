//! Presence: who is online, when they were last active, and telling those who share a conversation.

use std::collections::BTreeSet;
use std::sync::Arc;

use hearth_client_api::ServerFrame;
use hearth_client_api::model::{ChannelKind, PresenceInfo, PresenceStatus};
use hearth_federation::clock::wall_ms;
use tracing::warn;

use crate::error::ApiResult;
use crate::hub::{Hub, Outbound};
use crate::store::Store;

/// Presence rules over the hub and the store.
#[derive(Clone)]
pub struct Presence {
    store: Store,
    hub: Hub,
    /// Groups larger than this get no pushed presence; their members look it up.
    push_max_members: usize,
}

impl Presence {
    /// Presence for this node.
    pub fn new(store: Store, hub: Hub, push_max_members: usize) -> Self {
        Presence {
            store,
            hub,
            push_max_members,
        }
    }

    /// A user's presence now.
    pub fn status(&self, user: &str) -> ApiResult<PresenceInfo> {
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

    /// Records activity (connect, heartbeat, disconnect).
    pub fn touch(&self, user: &str) {
        if let Err(e) = self.store.set_last_active(user, wall_ms()) {
            warn!(error = %e, %user, "could not record last activity");
        }
    }

    /// Users who receive `user`'s presence changes: members of the direct chats and
    /// of the small groups they share.
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
                if member != user {
                    out.insert(member);
                }
            }
        }
        Ok(out)
    }

    /// Tells the audience of `user` their current status. Called after a user's first
    /// device connects or last device leaves; the status sent is read at sending time,
    /// so racing connects and disconnects end with the true state.
    pub fn announce(&self, user: &str) {
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
}
