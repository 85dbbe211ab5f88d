//! Channels: direct and group conversations, membership and its events, sending, history.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hearth_client_api::ErrorCode;
use hearth_client_api::http::{HistoryPage, MemberList};
use hearth_client_api::model::{
    ChannelKind, ChannelSummary, Event, EventContent, Member, MembershipAction, Role,
};
use hearth_federation::Hlc;
use hearth_federation::clock::wall_ms;
use sha2::{Digest, Sha256};
use tracing::instrument;

use crate::accounts::{Accounts, DeviceAuth};
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::store::{AckRecord, ChannelPos, ChannelRecord, MemberRecord, Store, WriteSet};
use crate::sync::{Delivery, Inboxes, Positions, Staged};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The direct channel with this user (created by the first message).
    User(String),
    /// This channel.
    Channel(String),
}

/// What a stored message's sender is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Event id.
    pub event_id: String,
    /// Channel it went to.
    pub channel: String,
    /// Its timestamp.
    pub ts: u64,
}

/// Limits that apply to channels.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    /// Most members of a group.
    pub max_group_members: usize,
    /// Largest message body in bytes.
    pub max_body_bytes: usize,
}

/// Channel rules over the store and the inboxes.
#[derive(Clone)]
pub struct Channels {
    store: Store,
    inboxes: Inboxes,
    accounts: Accounts,
    clock: Arc<Hlc>,
    limits: ChannelLimits,
    metrics: Metrics,
}

const MAX_KEY_CHARS: usize = 64;
const MAX_HISTORY_PAGE: usize = 200;
const DEFAULT_HISTORY_PAGE: usize = 50;

fn not_member() -> ApiError {
    ApiError::new(ErrorCode::NotMember, "you are not a member of this channel")
}

/// The id of an event: a hash of its content, so equal events have equal ids and
/// nobody can alter an event without changing its id.
fn event_id(event: &Event) -> String {
    let bytes = serde_json::to_vec(event).unwrap_or_default();
    format!("${}", URL_SAFE_NO_PAD.encode(Sha256::digest(bytes)))
}

fn channel_pos(event: &Event) -> ChannelPos {
    ChannelPos {
        ts: event.ts,
        origin: event.origin.clone(),
        seq: event.seq,
    }
}

/// One staged event and its fan-out to `recipients`.
fn stage_event(
    writes: &mut WriteSet,
    deliveries: &mut Vec<Delivery>,
    positions: &mut Positions,
    mut event: Event,
    recipients: &[String],
) -> Arc<Event> {
    event.id = event_id(&event);
    let cpos = channel_pos(&event);
    let event = Arc::new(event);
    writes.events.push((cpos.clone(), (*event).clone()));
    for user in recipients {
        let pos = positions.next_pos();
        writes
            .inbox
            .push((user.clone(), pos, event.channel.clone(), cpos.clone()));
        deliveries.push(Delivery {
            user: user.clone(),
            pos,
            event: event.clone(),
        });
    }
    event
}

impl Channels {
    /// Channel rules for this node.
    pub fn new(
        store: Store,
        inboxes: Inboxes,
        accounts: Accounts,
        clock: Arc<Hlc>,
        limits: ChannelLimits,
        metrics: Metrics,
    ) -> Self {
        Channels {
            store,
            inboxes,
            accounts,
            clock,
            limits,
            metrics,
        }
    }

    fn new_channel_id(&self) -> ApiResult<String> {
        let mut raw = [0u8; 12];
        getrandom::fill(&mut raw).map_err(|e| {
            tracing::error!(error = %e, "system random source failed");
            ApiError::new(ErrorCode::Internal, "the server failed; try again")
        })?;
        Ok(format!(
            "{}@{}",
            URL_SAFE_NO_PAD.encode(raw),
            self.accounts.server_name()
        ))
    }

    fn new_event(
        &self,
        channel: &str,
        sender: &str,
        rec: &mut ChannelRecord,
        content: EventContent,
    ) -> Event {
        let seq = rec.next_seq;
        rec.next_seq += 1;
        Event {
            id: String::new(),
            channel: channel.to_string(),
            sender: sender.to_string(),
            origin: self.accounts.server_name().to_string(),
            seq,
            ts: self.clock.now(),
            pos: None,
            content,
        }
    }

    fn member_ids(&self, channel: &str) -> ApiResult<Vec<String>> {
        Ok(self
            .store
            .members(channel)?
            .into_iter()
            .map(|(u, _)| u)
            .collect())
    }

    /// A channel the caller belongs to.
    fn channel_of_member(&self, user: &str, channel: &str) -> ApiResult<ChannelRecord> {
        let Some(rec) = self.store.channel(channel)? else {
            return Err(ApiError::new(
                ErrorCode::UnknownChannel,
                format!("there is no channel {channel}"),
            ));
        };
        if self.store.member(channel, user)?.is_none() {
            return Err(not_member());
        }
        Ok(rec)
    }

    fn group_of_admin(&self, user: &str, channel: &str) -> ApiResult<ChannelRecord> {
        let rec = self.channel_of_member(user, channel)?;
        if rec.kind == ChannelKind::Direct {
            return Err(ApiError::new(
                ErrorCode::DirectChannel,
                "a direct chat always has exactly its two members",
            ));
        }
        match self.store.member(channel, user)? {
            Some(MemberRecord {
                role: Role::Admin, ..
            }) => Ok(rec),
            _ => Err(ApiError::new(
                ErrorCode::NotChannelAdmin,
                "only an admin of this group can do that",
            )),
        }
    }

    /// Finds the direct channel of two users, or stages its creation.
    fn direct_channel(
        &self,
        writes: &mut WriteSet,
        a: &str,
        b: &str,
    ) -> ApiResult<(String, ChannelRecord)> {
        if let Some(id) = self.store.direct_channel(a, b)? {
            if let Some(rec) = self.store.channel(&id)? {
                return Ok((id, rec));
            }
        }
        let id = self.new_channel_id()?;
        let now = wall_ms();
        let rec = ChannelRecord {
            kind: ChannelKind::Direct,
            name: String::new(),
            created_by: a.to_string(),
            created_at: now,
            version: 1,
            member_count: 2,
            next_seq: 0,
        };
        for user in [a, b] {
            writes.members.push((
                id.clone(),
                user.to_string(),
                Some(MemberRecord {
                    role: Role::Member,
                    joined_at: now,
                }),
            ));
        }
        writes
            .direct_pairs
            .push((a.to_string(), b.to_string(), id.clone()));
        writes.channels.push((id.clone(), rec.clone()));
        Ok((id, rec))
    }

    /// Stores a message durably, fans it out to every member's inbox, and returns the
    /// ack. A repeat of an earlier key returns that earlier ack and stores nothing.
    #[instrument(skip(self, body), fields(user = %auth.user, key = %key))]
    pub async fn send(
        &self,
        auth: &DeviceAuth,
        key: &str,
        target: Target,
        body: &str,
    ) -> ApiResult<Ack> {
        if key.is_empty() || key.chars().count() > MAX_KEY_CHARS || key.contains('\0') {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("key must be 1 to {MAX_KEY_CHARS} characters"),
            ));
        }
        if body.trim().is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "the message is empty",
            ));
        }
        if body.len() > self.limits.max_body_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "the message is {} bytes; at most {} are allowed",
                    body.len(),
                    self.limits.max_body_bytes
                ),
            ));
        }
        let target = match target {
            Target::User(who) => {
                let other = self.accounts.resolve_local_user(&who)?;
                if other == auth.user {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRecipient,
                        "you cannot start a direct chat with yourself",
                    ));
                }
                Target::User(other)
            }
            t => t,
        };
        let sender = auth.user.clone();
        let ack = self
            .inboxes
            .write(|positions| {
                if let Some(prev) = self.store.ack(&sender, key)? {
                    return Ok(Staged::nothing(Ack {
                        event_id: prev.event_id,
                        channel: prev.channel,
                        ts: prev.ts,
                    }));
                }
                let mut writes = WriteSet::default();
                let (channel, mut rec, members) = match &target {
                    Target::User(other) => {
                        let (id, rec) = self.direct_channel(&mut writes, &sender, other)?;
                        (id, rec, vec![sender.clone(), other.clone()])
                    }
                    Target::Channel(id) => {
                        let rec = self.channel_of_member(&sender, id)?;
                        (id.clone(), rec, self.member_ids(id)?)
                    }
                };
                let event = self.new_event(
                    &channel,
                    &sender,
                    &mut rec,
                    EventContent::Message {
                        body: body.to_string(),
                    },
                );
                let mut deliveries = Vec::with_capacity(members.len());
                let event = stage_event(&mut writes, &mut deliveries, positions, event, &members);
                writes.channels.retain(|(id, _)| id != &channel);
                writes.channels.push((channel.clone(), rec));
                let ack = AckRecord {
                    event_id: event.id.clone(),
                    channel: channel.clone(),
                    ts: event.ts,
                };
                writes.acks.push((sender.clone(), key.to_string(), ack));
                Ok(Staged {
                    writes,
                    deliveries,
                    reply: Ack {
                        event_id: event.id.clone(),
                        channel,
                        ts: event.ts,
                    },
                })
            })
            .await?;
        self.metrics.messages.inc();
        Ok(ack)
    }

    /// Finds or creates the direct channel with another user.
    pub async fn open_direct(&self, auth: &DeviceAuth, who: &str) -> ApiResult<ChannelSummary> {
        let other = self.accounts.resolve_local_user(who)?;
        if other == auth.user {
            return Err(ApiError::new(
                ErrorCode::InvalidRecipient,
                "you cannot start a direct chat with yourself",
            ));
        }
        let id = self
            .inboxes
            .write(|_| {
                let mut writes = WriteSet::default();
                let (id, _) = self.direct_channel(&mut writes, &auth.user, &other)?;
                Ok(Staged {
                    writes,
                    deliveries: Vec::new(),
                    reply: id,
                })
            })
            .await?;
        self.summary(&auth.user, &id)
    }

    /// Creates a group with its creator as admin and the given members.
    #[instrument(skip(self, members), fields(user = %auth.user))]
    pub async fn create_group(
        &self,
        auth: &DeviceAuth,
        name: &str,
        members: &[String],
    ) -> ApiResult<ChannelSummary> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "a group name is 1 to 64 characters",
            ));
        }
        let mut others = BTreeSet::new();
        for who in members {
            let user = self.accounts.resolve_local_user(who)?;
            if user != auth.user {
                others.insert(user);
            }
        }
        if others.len() + 1 > self.limits.max_group_members {
            return Err(group_full(self.limits.max_group_members));
        }
        let creator = auth.user.clone();
        let id = self.new_channel_id()?;
        self.inboxes
            .write(|positions| {
                let now = wall_ms();
                let mut rec = ChannelRecord {
                    kind: ChannelKind::Group,
                    name: name.to_string(),
                    created_by: creator.clone(),
                    created_at: now,
                    version: 1,
                    member_count: 1 + others.len(),
                    next_seq: 0,
                };
                let mut writes = WriteSet::default();
                let mut deliveries = Vec::new();
                let everyone: Vec<String> = std::iter::once(creator.clone())
                    .chain(others.iter().cloned())
                    .collect();
                writes.members.push((
                    id.clone(),
                    creator.clone(),
                    Some(MemberRecord {
                        role: Role::Admin,
                        joined_at: now,
                    }),
                ));
                let created = self.new_event(
                    &id,
                    &creator,
                    &mut rec,
                    EventContent::Membership {
                        action: MembershipAction::Create,
                        user: creator.clone(),
                        version: 1,
                        name: Some(name.to_string()),
                    },
                );
                stage_event(&mut writes, &mut deliveries, positions, created, &everyone);
                for user in &others {
                    rec.version += 1;
                    writes.members.push((
                        id.clone(),
                        user.clone(),
                        Some(MemberRecord {
                            role: Role::Member,
                            joined_at: now,
                        }),
                    ));
                    let version = rec.version;
                    let added = self.new_event(
                        &id,
                        &creator,
                        &mut rec,
                        EventContent::Membership {
                            action: MembershipAction::Add,
                            user: user.clone(),
                            version,
                            name: None,
                        },
                    );
                    stage_event(&mut writes, &mut deliveries, positions, added, &everyone);
                }
                writes.channels.push((id.clone(), rec));
                Ok(Staged {
                    writes,
                    deliveries,
                    reply: (),
                })
            })
            .await?;
        self.summary(&auth.user, &id)
    }

    /// Adds a user to a group (admins only).
    #[instrument(skip(self), fields(user = %auth.user))]
    pub async fn add_member(
        &self,
        auth: &DeviceAuth,
        channel: &str,
        who: &str,
    ) -> ApiResult<MemberList> {
        let user = self.accounts.resolve_local_user(who)?;
        self.change_membership(auth, channel, &user, MembershipAction::Add)
            .await?;
        self.members(&auth.user, channel)
    }

    /// Removes a member from a group (admins only; removing oneself is leaving).
    #[instrument(skip(self), fields(user = %auth.user))]
    pub async fn remove_member(
        &self,
        auth: &DeviceAuth,
        channel: &str,
        who: &str,
    ) -> ApiResult<MemberList> {
        let user = self.accounts.resolve_local_user(who)?;
        let action = if user == auth.user {
            MembershipAction::Leave
        } else {
            MembershipAction::Remove
        };
        self.change_membership(auth, channel, &user, action).await?;
        if action == MembershipAction::Leave {
            return Ok(MemberList {
                version: 0,
                members: Vec::new(),
            });
        }
        self.members(&auth.user, channel)
    }

    /// Leaves a group.
    pub async fn leave(&self, auth: &DeviceAuth, channel: &str) -> ApiResult<()> {
        let me = auth.user.clone();
        self.change_membership(auth, channel, &me, MembershipAction::Leave)
            .await
    }

    async fn change_membership(
        &self,
        auth: &DeviceAuth,
        channel: &str,
        user: &str,
        action: MembershipAction,
    ) -> ApiResult<()> {
        self.inboxes
            .write(|positions| {
                let mut rec = match action {
                    MembershipAction::Leave => {
                        let rec = self.channel_of_member(&auth.user, channel)?;
                        if rec.kind == ChannelKind::Direct {
                            return Err(ApiError::new(
                                ErrorCode::DirectChannel,
                                "you cannot leave a direct chat",
                            ));
                        }
                        rec
                    }
                    _ => self.group_of_admin(&auth.user, channel)?,
                };
                let mut members = self.member_ids(channel)?;
                let is_member = members.iter().any(|m| m == user);
                let mut writes = WriteSet::default();
                match action {
                    MembershipAction::Add => {
                        if is_member {
                            return Err(ApiError::new(
                                ErrorCode::AlreadyMember,
                                format!("{user} is already a member"),
                            ));
                        }
                        if members.len() >= self.limits.max_group_members {
                            return Err(group_full(self.limits.max_group_members));
                        }
                        members.push(user.to_string());
                        writes.members.push((
                            channel.to_string(),
                            user.to_string(),
                            Some(MemberRecord {
                                role: Role::Member,
                                joined_at: wall_ms(),
                            }),
                        ));
                        rec.member_count = members.len();
                    }
                    MembershipAction::Remove | MembershipAction::Leave => {
                        if !is_member {
                            return Err(ApiError::new(
                                ErrorCode::NotMember,
                                format!("{user} is not a member of this channel"),
                            ));
                        }
                        writes
                            .members
                            .push((channel.to_string(), user.to_string(), None));
                        // The one who leaves or is removed still gets the event that says so.
                        rec.member_count = members.len() - 1;
                    }
                    MembershipAction::Create => {
                        return Err(ApiError::new(ErrorCode::BadRequest, "not a change"));
                    }
                }
                rec.version += 1;
                let version = rec.version;
                let event = self.new_event(
                    channel,
                    &auth.user,
                    &mut rec,
                    EventContent::Membership {
                        action,
                        user: user.to_string(),
                        version,
                        name: None,
                    },
                );
                let mut deliveries = Vec::new();
                stage_event(&mut writes, &mut deliveries, positions, event, &members);
                writes.channels.push((channel.to_string(), rec));
                Ok(Staged {
                    writes,
                    deliveries,
                    reply: (),
                })
            })
            .await
    }

    /// A channel as its member `user` sees it.
    pub fn summary(&self, user: &str, channel: &str) -> ApiResult<ChannelSummary> {
        let rec = self.channel_of_member(user, channel)?;
        self.summarise(user, channel, rec)
    }

    fn summarise(
        &self,
        user: &str,
        channel: &str,
        rec: ChannelRecord,
    ) -> ApiResult<ChannelSummary> {
        let name = match rec.kind {
            ChannelKind::Group => rec.name,
            ChannelKind::Direct => self
                .member_ids(channel)?
                .into_iter()
                .find(|m| m != user)
                .unwrap_or_default(),
        };
        Ok(ChannelSummary {
            id: channel.to_string(),
            kind: rec.kind,
            name,
            member_count: rec.member_count,
            version: rec.version,
            last_event: self.store.last_event(channel)?,
        })
    }

    /// The user's channels, most recently active first.
    pub fn list(&self, user: &str) -> ApiResult<Vec<ChannelSummary>> {
        let mut out = Vec::new();
        for id in self.store.user_channels(user)? {
            if let Some(rec) = self.store.channel(&id)? {
                let created = rec.created_at;
                let summary = self.summarise(user, &id, rec)?;
                let active = summary.last_event.as_ref().map_or(created, |e| e.ts);
                out.push((active, summary));
            }
        }
        out.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }

    /// The members of a channel the caller belongs to.
    pub fn members(&self, user: &str, channel: &str) -> ApiResult<MemberList> {
        let rec = self.channel_of_member(user, channel)?;
        Ok(MemberList {
            version: rec.version,
            members: self
                .store
                .members(channel)?
                .into_iter()
                .map(|(user, m)| Member {
                    user,
                    role: m.role,
                    joined_at: m.joined_at,
                })
                .collect(),
        })
    }

    /// A channel's record, if it exists.
    pub fn channel_record(&self, channel: &str) -> ApiResult<Option<ChannelRecord>> {
        Ok(self.store.channel(channel)?)
    }

    /// One page of history, newest first.
    pub fn history(
        &self,
        user: &str,
        channel: &str,
        before: Option<&str>,
        limit: Option<usize>,
    ) -> ApiResult<HistoryPage> {
        self.channel_of_member(user, channel)?;
        let before = match before {
            Some(c) => Some(ChannelPos::from_cursor(c).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidField,
                    "before is not a cursor this server gave out",
                )
            })?),
            None => None,
        };
        let limit = limit.unwrap_or(DEFAULT_HISTORY_PAGE);
        if limit == 0 || limit > MAX_HISTORY_PAGE {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("limit must be 1 to {MAX_HISTORY_PAGE}"),
            ));
        }
        let page = self.store.history(channel, before.as_ref(), limit)?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|(pos, _)| pos.to_cursor()))
            .flatten();
        Ok(HistoryPage {
            events: page.into_iter().map(|(_, e)| e).collect(),
            next,
        })
    }
}

fn group_full(max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::GroupFull,
        format!("a group can have at most {max} members"),
    )
}
