//! Coalescing: messages for an offline user in one conversation within one window
//! become one notification.
//!
//! The first message opens a window (stored, so a restart keeps it); later ones
//! within `push_coalesce_ms` of it only raise its count and replace its sender
//! (and text, with previews). When the window closes, one job per target of the
//! user goes into the delivery queue, in the same transaction that closes the
//! window. If a device of the user came online meanwhile, the window closes with
//! no notification: the user is reading.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hearth_client_api::http::PushNotification;
use hearth_client_api::model::EventContent;
use hearth_federation::clock::wall_ms;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error};

use super::{Offline, Shared};
use crate::store::StoreError;
use crate::store::push::{PendingNoticeRecord, PushJobRecord};

/// Longest message text a preview keeps, in bytes.
pub const MAX_PREVIEW_BYTES: usize = 1000;

/// Largest notification payload; Web Push allows 4096 bytes once encrypted
/// (about 3990 of plaintext).
const MAX_PAYLOAD_BYTES: usize = 3000;

/// Open windows by closing time: `(deadline ms, user, channel)`.
type Windows = BTreeSet<(u64, String, String)>;

pub(super) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Offline>,
    mut shutdown: watch::Receiver<bool>,
) {
    let window = shared.window.as_millis() as u64;
    let mut windows = Windows::new();
    match shared.store.pending_notices() {
        Ok(open) => {
            for (user, channel, rec) in open {
                windows.insert((rec.opened_at.saturating_add(window), user, channel));
            }
        }
        Err(e) => error!(error = %e, "could not read open notification windows"),
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        close_due(&shared, &mut windows);
        let sleep = match windows.first() {
            Some((deadline, _, _)) => Duration::from_millis(deadline.saturating_sub(wall_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { return },
            item = rx.recv() => match item {
                Some(item) => {
                    if let Err(e) = take(&shared, &mut windows, window, item) {
                        error!(error = %e, "could not record a notification");
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Counts one message into its conversation's window, opening it if needed.
fn take(
    shared: &Shared,
    windows: &mut Windows,
    window: u64,
    item: Offline,
) -> Result<(), StoreError> {
    let EventContent::Message { body } = &item.event.content else {
        return Ok(());
    };
    let store = &shared.store;
    if !store.has_push_targets(&item.user)? {
        return Ok(());
    }
    let body = store
        .push_settings(&item.user)?
        .previews
        .then(|| cut(body, MAX_PREVIEW_BYTES).to_string());
    let channel = &item.event.channel;
    let rec = match store.pending_notice(&item.user, channel)? {
        Some(mut open) => {
            open.count += 1;
            open.sender = item.event.sender.clone();
            open.ts = item.event.ts;
            open.body = body;
            open
        }
        None => {
            let now = wall_ms();
            windows.insert((
                now.saturating_add(window),
                item.user.clone(),
                channel.clone(),
            ));
            PendingNoticeRecord {
                opened_at: now,
                count: 1,
                sender: item.event.sender.clone(),
                ts: item.event.ts,
                body,
            }
        }
    };
    store.put_pending_notice(&item.user, channel, &rec)
}

/// Closes every window whose time is up: queues its notification for every target.
fn close_due(shared: &Shared, windows: &mut Windows) {
    let now = wall_ms();
    while let Some(first) = windows.first() {
        if first.0 > now {
            return;
        }
        let Some((_, user, channel)) = windows.pop_first() else {
            return;
        };
        match close(shared, &user, &channel, now) {
            Ok(0) => {}
            Ok(_) => shared.wake.notify_one(),
            Err(e) => error!(error = %e, %user, "could not queue a notification"),
        }
    }
}

/// Closes one window; returns how many jobs it queued.
fn close(shared: &Shared, user: &str, channel: &str, now: u64) -> Result<usize, StoreError> {
    let store = &shared.store;
    let Some(open) = store.pending_notice(user, channel)? else {
        return Ok(0);
    };
    if shared.hub.online(user) {
        debug!(%user, "the user came online; no notification");
        store.close_pending_notice(user, channel, now, &[])?;
        return Ok(0);
    }
    let previews = store.push_settings(user)?.previews;
    let payload = encode(PushNotification {
        v: 1,
        user: user.to_string(),
        channel: channel.to_string(),
        sender: open.sender,
        count: open.count,
        ts: open.ts,
        body: open.body.filter(|_| previews),
    });
    let jobs: Vec<PushJobRecord> = store
        .push_targets(user)?
        .into_iter()
        .map(|(target, _)| PushJobRecord {
            user: user.to_string(),
            target,
            channel: channel.to_string(),
            payload: payload.clone(),
            attempts: 0,
            created_at: now,
        })
        .collect();
    store.close_pending_notice(user, channel, now, &jobs)?;
    debug!(%user, count = open.count, targets = jobs.len(), "notification queued");
    Ok(jobs.len())
}

/// The JSON of a notification, shortening the preview until it fits a push message.
fn encode(mut n: PushNotification) -> String {
    loop {
        let json = serde_json::to_string(&n).unwrap_or_default();
        match &n.body {
            Some(body) if json.len() > MAX_PAYLOAD_BYTES => {
                n.body = Some(cut(body, body.len() / 2).to_string());
            }
            _ => return json,
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_cut_at_character_boundaries_and_fit_a_push_message() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("hi", 10), "hi");
        let n = PushNotification {
            v: 1,
            user: "a@h".into(),
            channel: "c@h".into(),
            sender: "b@h".into(),
            count: 1,
            ts: 1,
            body: Some("\u{1}".repeat(MAX_PREVIEW_BYTES)),
        };
        let json = encode(n);
        assert!(json.len() <= MAX_PAYLOAD_BYTES, "{} bytes", json.len());
        let back: PushNotification = serde_json::from_str(&json).expect("valid JSON");
        assert!(back.body.is_some_and(|b| !b.is_empty()));
    }
}
