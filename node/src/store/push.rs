//! The push notification trees: targets, per-user settings, open coalescing windows,
//! and the delivery queue.
//!
//! - `usertarget_push`: `user\0target id` → [`PushTargetRecord`].
//! - `userid_pushsettings`: `user` → [`PushSettingsRecord`].
//! - `userchannel_pushpending`: `user\0channel` → [`PendingNoticeRecord`], one per open window.
//! - `dueid_pushjob`: `due ms (8 bytes BE) ++ job id (8 bytes BE)` → [`PushJobRecord`]; a
//!   scan from the start yields the jobs in the order they are due.
//!
//! None of these writes waits for the disk on its own: push is best effort. Each
//! write reaches the operating system at once (so it survives the node crashing),
//! and the next group commit's fdatasync makes it durable.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::{Engine, Tree};
use super::{Store, StoreResult, decode, encode, key2, prefix, suffix_str};

/// How a target is reached; mirrors the wire `PushKind` without depending on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushTargetKind {
    /// Web Push: encrypted and VAPID-signed.
    WebPush,
    /// Plain JSON POST.
    Webhook,
}

/// A registered push target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushTargetRecord {
    /// The device that registered it.
    pub device: String,
    /// Web Push or webhook.
    pub kind: PushTargetKind,
    /// Where notifications go.
    pub endpoint: String,
    /// Web Push: the subscription's public key, 65 bytes, unpadded base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p256dh: Option<String>,
    /// Web Push: the subscription's 16-byte secret, unpadded base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at: u64,
}

/// A user's notification settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushSettingsRecord {
    /// Notifications carry the newest message's text.
    pub previews: bool,
}

/// An open coalescing window: messages of one conversation not yet notified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingNoticeRecord {
    /// Wall-clock ms when the first message of the window arrived.
    pub opened_at: u64,
    /// Messages counted so far.
    pub count: u64,
    /// Sender of the newest one.
    pub sender: String,
    /// Timestamp of the newest one.
    pub ts: u64,
    /// Its text, kept only while the user has previews on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// One notification for one target, waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJobRecord {
    /// The recipient.
    pub user: String,
    /// The target's id.
    pub target: String,
    /// The conversation, for the `Topic` header.
    pub channel: String,
    /// The notification, encoded once (JSON).
    pub payload: String,
    /// Attempts that failed so far.
    pub attempts: u32,
    /// Wall-clock ms when the job was queued.
    pub created_at: u64,
}

/// A job's place in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PushJobKey(Vec<u8>);

impl PushJobKey {
    fn new(due: u64, id: u64) -> Self {
        let mut k = Vec::with_capacity(16);
        k.extend_from_slice(&due.to_be_bytes());
        k.extend_from_slice(&id.to_be_bytes());
        PushJobKey(k)
    }

    /// When the job is due (wall-clock ms).
    pub fn due(&self) -> u64 {
        self.0
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }

    fn id(&self) -> u64 {
        self.0
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }
}

/// The push trees, opened with the store.
#[derive(Clone)]
pub(super) struct PushTrees {
    usertarget_push: Tree,
    userid_pushsettings: Tree,
    userchannel_pushpending: Tree,
    dueid_pushjob: Tree,
    /// The last job id handed out; a job key is `(due, id)`, so ids only need to
    /// differ between jobs, also across restarts.
    last_job_id: Arc<AtomicU64>,
}

impl PushTrees {
    pub(super) fn open(engine: &Engine) -> StoreResult<PushTrees> {
        let dueid_pushjob = engine.tree("dueid_pushjob")?;
        let mut last = 0;
        for r in dueid_pushjob.iter() {
            let (k, _) = r?;
            last = last.max(PushJobKey(k.to_vec()).id());
        }
        Ok(PushTrees {
            usertarget_push: engine.tree("usertarget_push")?,
            userid_pushsettings: engine.tree("userid_pushsettings")?,
            userchannel_pushpending: engine.tree("userchannel_pushpending")?,
            dueid_pushjob,
            last_job_id: Arc::new(AtomicU64::new(last)),
        })
    }

    fn next_job_id(&self) -> u64 {
        self.last_job_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

fn split_user_key(tree: &'static str, key: &[u8]) -> StoreResult<(String, String)> {
    let nul = key
        .iter()
        .position(|&b| b == 0)
        .ok_or(super::StoreError::Corrupt {
            tree,
            detail: "bad key".into(),
        })?;
    Ok((
        suffix_str(tree, key.get(..nul).unwrap_or(&[]), 0)?,
        suffix_str(tree, key, nul + 1)?,
    ))
}

impl Store {
    // ---- targets ----

    /// Writes a push target.
    pub fn put_push_target(&self, user: &str, id: &str, rec: &PushTargetRecord) -> StoreResult<()> {
        self.push
            .usertarget_push
            .insert(key2(user, id.as_bytes()), encode(rec))?;
        Ok(())
    }

    /// One push target of a user.
    pub fn push_target(&self, user: &str, id: &str) -> StoreResult<Option<PushTargetRecord>> {
        self.push
            .usertarget_push
            .get(key2(user, id.as_bytes()))?
            .map(|v| decode("usertarget_push", &v))
            .transpose()
    }

    /// Every push target of a user, by id.
    pub fn push_targets(&self, user: &str) -> StoreResult<Vec<(String, PushTargetRecord)>> {
        let p = prefix(user);
        self.push
            .usertarget_push
            .scan_prefix(&p)
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    suffix_str("usertarget_push", &k, p.len())?,
                    decode("usertarget_push", &v)?,
                ))
            })
            .collect()
    }

    /// Whether the user has any push target.
    pub fn has_push_targets(&self, user: &str) -> StoreResult<bool> {
        Ok(self
            .push
            .usertarget_push
            .scan_prefix(prefix(user))
            .next()
            .transpose()?
            .is_some())
    }

    /// Removes a push target; false if there was none.
    pub fn remove_push_target(&self, user: &str, id: &str) -> StoreResult<bool> {
        let key = key2(user, id.as_bytes());
        if !self.push.usertarget_push.contains_key(&key)? {
            return Ok(false);
        }
        self.push.usertarget_push.remove(&key)?;
        Ok(true)
    }

    /// Removes every push target a device registered; returns how many.
    pub fn remove_device_push_targets(&self, user: &str, device: &str) -> StoreResult<usize> {
        let mut w = self.engine.atomic();
        let mut removed = 0;
        for (id, rec) in self.push_targets(user)? {
            if rec.device == device {
                w.remove(&self.push.usertarget_push, key2(user, id.as_bytes()));
                removed += 1;
            }
        }
        w.commit()?;
        Ok(removed)
    }

    // ---- settings ----

    /// A user's notification settings (defaults if never set).
    pub fn push_settings(&self, user: &str) -> StoreResult<PushSettingsRecord> {
        Ok(self
            .push
            .userid_pushsettings
            .get(user)?
            .map(|v| decode("userid_pushsettings", &v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Writes a user's notification settings.
    pub fn put_push_settings(&self, user: &str, rec: &PushSettingsRecord) -> StoreResult<()> {
        self.push.userid_pushsettings.insert(user, encode(rec))?;
        Ok(())
    }

    // ---- coalescing windows ----

    /// The open window of a user's conversation.
    pub fn pending_notice(
        &self,
        user: &str,
        channel: &str,
    ) -> StoreResult<Option<PendingNoticeRecord>> {
        self.push
            .userchannel_pushpending
            .get(key2(user, channel.as_bytes()))?
            .map(|v| decode("userchannel_pushpending", &v))
            .transpose()
    }

    /// Opens or updates a window.
    pub fn put_pending_notice(
        &self,
        user: &str,
        channel: &str,
        rec: &PendingNoticeRecord,
    ) -> StoreResult<()> {
        self.push
            .userchannel_pushpending
            .insert(key2(user, channel.as_bytes()), encode(rec))?;
        Ok(())
    }

    /// Every open window: `(user, channel, record)`.
    pub fn pending_notices(&self) -> StoreResult<Vec<(String, String, PendingNoticeRecord)>> {
        self.push
            .userchannel_pushpending
            .iter()
            .map(|r| {
                let (k, v) = r?;
                let (user, channel) = split_user_key("userchannel_pushpending", &k)?;
                Ok((user, channel, decode("userchannel_pushpending", &v)?))
            })
            .collect()
    }

    /// Closes a window and queues its jobs (due now), in one transaction.
    pub fn close_pending_notice(
        &self,
        user: &str,
        channel: &str,
        due: u64,
        jobs: &[PushJobRecord],
    ) -> StoreResult<()> {
        let mut keyed = Vec::with_capacity(jobs.len());
        for job in jobs {
            keyed.push((PushJobKey::new(due, self.push.next_job_id()), encode(job)));
        }
        let mut w = self.engine.atomic();
        w.remove(
            &self.push.userchannel_pushpending,
            key2(user, channel.as_bytes()),
        );
        for (key, value) in &keyed {
            w.insert(&self.push.dueid_pushjob, &key.0, value);
        }
        w.commit()
    }

    // ---- the delivery queue ----

    /// The first `limit` jobs in the order they are due.
    pub fn push_jobs(&self, limit: usize) -> StoreResult<Vec<(PushJobKey, PushJobRecord)>> {
        self.push
            .dueid_pushjob
            .iter()
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok((PushJobKey(k.to_vec()), decode("dueid_pushjob", &v)?))
            })
            .collect()
    }

    /// Number of queued jobs (a scan: for metrics and tests, not hot paths).
    pub fn push_job_count(&self) -> usize {
        self.push.dueid_pushjob.iter().count()
    }

    /// Removes a job that is done (sent, or given up).
    pub fn finish_push_job(&self, key: &PushJobKey) -> StoreResult<()> {
        self.push.dueid_pushjob.remove(key.0.as_slice())?;
        Ok(())
    }

    /// Moves a job to a later due time with its updated record; returns its new key.
    pub fn reschedule_push_job(
        &self,
        key: &PushJobKey,
        due: u64,
        job: &PushJobRecord,
    ) -> StoreResult<PushJobKey> {
        let next = PushJobKey::new(due, key.id());
        let mut w = self.engine.atomic();
        w.remove(&self.push.dueid_pushjob, &key.0);
        w.insert(&self.push.dueid_pushjob, &next.0, encode(job));
        w.commit()?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(user: &str, target: &str) -> PushJobRecord {
        PushJobRecord {
            user: user.into(),
            target: target.into(),
            channel: "c@here".into(),
            payload: "{}".into(),
            attempts: 0,
            created_at: 1,
        }
    }

    #[test]
    fn jobs_come_out_in_due_order_and_move_when_rescheduled() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("open");
        let pending = PendingNoticeRecord {
            opened_at: 5,
            count: 2,
            sender: "bob@here".into(),
            ts: 7,
            body: None,
        };
        store
            .put_pending_notice("alice@here", "c@here", &pending)
            .expect("pending");
        assert_eq!(
            store.pending_notices().expect("list"),
            vec![("alice@here".into(), "c@here".into(), pending)]
        );
        store
            .close_pending_notice("alice@here", "c@here", 200, &[job("alice@here", "t1")])
            .expect("close");
        store
            .close_pending_notice("bob@here", "c@here", 100, &[job("bob@here", "t2")])
            .expect("close");
        assert!(store.pending_notices().expect("list").is_empty());
        let jobs = store.push_jobs(10).expect("jobs");
        let targets: Vec<_> = jobs.iter().map(|(_, j)| j.target.as_str()).collect();
        assert_eq!(targets, ["t2", "t1"]);
        let (key, mut first) = jobs[0].clone();
        first.attempts = 1;
        let moved = store
            .reschedule_push_job(&key, 300, &first)
            .expect("reschedule");
        assert_eq!(moved.due(), 300);
        let jobs = store.push_jobs(10).expect("jobs");
        let order: Vec<_> = jobs
            .iter()
            .map(|(_, j)| (j.target.as_str(), j.attempts))
            .collect();
        assert_eq!(order, [("t1", 0), ("t2", 1)]);
        store.finish_push_job(&moved).expect("finish");
        assert_eq!(store.push_job_count(), 1);
    }

    #[tokio::test]
    async fn jobs_queued_after_a_restart_do_not_replace_older_ones_due_at_the_same_time() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .close_pending_notice("alice@here", "c@here", 100, &[job("alice@here", "t1")])
                .expect("close");
            store.checkpoint().await.expect("checkpoint");
        }
        let store = Store::open(dir.path()).expect("reopen");
        store
            .close_pending_notice("alice@here", "c@here", 100, &[job("alice@here", "t2")])
            .expect("close");
        let targets: Vec<_> = store
            .push_jobs(10)
            .expect("jobs")
            .into_iter()
            .map(|(_, j)| j.target)
            .collect();
        assert_eq!(targets, ["t1", "t2"]);
    }

    #[test]
    fn logging_a_device_out_removes_only_its_targets() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path()).expect("open");
        let target = |device: &str| PushTargetRecord {
            device: device.into(),
            kind: PushTargetKind::Webhook,
            endpoint: "https://example.org/hook".into(),
            p256dh: None,
            auth: None,
            created_at: 1,
        };
        store
            .put_push_target("a@h", "x", &target("d1"))
            .expect("put");
        store
            .put_push_target("a@h", "y", &target("d2"))
            .expect("put");
        store
            .put_push_target("ab@h", "z", &target("d1"))
            .expect("put");
        assert_eq!(
            store.remove_device_push_targets("a@h", "d1").expect("rm"),
            1
        );
        let left: Vec<_> = store
            .push_targets("a@h")
            .expect("list")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(left, ["y"]);
        assert!(store.has_push_targets("ab@h").expect("has"));
    }
}
