//! The delivery worker: sends queued notifications, at most [`MAX_PARALLEL`] at a
//! time, each with the node's timeout.
//!
//! Outcomes, by answer:
//! - 2xx: sent; the job is done.
//! - 404 or 410: the subscription is gone; the target is removed with the job.
//! - 408, 429, 5xx, a timeout or a connection failure: tried again later, after
//!   1 s, 2 s, 4 s … (at most [`MAX_BACKOFF`], plus up to a quarter of jitter), or
//!   after the answer's `Retry-After` if that is longer (at most
//!   [`MAX_RETRY_AFTER`]); given up after [`MAX_ATTEMPTS`] attempts or once the
//!   notification is older than [`MAX_AGE`].
//! - any other answer: refused; the job is given up and the target kept.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hearth_federation::clock::wall_ms;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use web_push_native::WebPushBuilder;

use super::Shared;
use super::target::{check_endpoint, decode_keys};
use crate::store::push::{PushJobKey, PushJobRecord, PushTargetKind, PushTargetRecord};

/// Requests in flight at once.
pub const MAX_PARALLEL: usize = 32;
/// Attempts before a notification is given up.
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest wait between attempts that the node chooses itself.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Notifications older than this are not sent any more; also their Web Push TTL.
pub const MAX_AGE: Duration = Duration::from_secs(12 * 3600);

/// How long the worker sleeps when nothing is due and nobody wakes it.
const IDLE: Duration = Duration::from_secs(60);

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Sent,
    Gone(u16),
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Refused(String),
    /// The target was removed while the job waited.
    NoTarget,
}

pub(super) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let in_flight: Arc<Mutex<HashSet<PushJobKey>>> = Arc::default();
    let mut running = JoinSet::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        while running.try_join_next().is_some() {}
        let now = wall_ms();
        let busy: HashSet<PushJobKey> = in_flight.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next_due = None;
        match shared.store.push_jobs(busy.len() + MAX_PARALLEL + 1) {
            Ok(jobs) => {
                let mut started = busy.len();
                for (key, job) in jobs {
                    if busy.contains(&key) {
                        continue;
                    }
                    if key.due() > now {
                        next_due = Some(key.due());
                        break;
                    }
                    if started >= MAX_PARALLEL {
                        break;
                    }
                    started += 1;
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone());
                    running.spawn(deliver_one(shared.clone(), key, job, in_flight.clone()));
                }
            }
            Err(e) => {
                error!(error = %e, "could not read the push queue");
                next_due = Some(now + 5_000);
            }
        }
        let sleep = next_due.map_or(IDLE, |due| {
            Duration::from_millis(due.saturating_sub(now)).min(IDLE)
        });
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { break },
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    running.shutdown().await;
}

async fn deliver_one(
    shared: Arc<Shared>,
    key: PushJobKey,
    job: PushJobRecord,
    in_flight: Arc<Mutex<HashSet<PushJobKey>>>,
) {
    let outcome = attempt(&shared, &job).await;
    settle(&shared, &key, job, outcome);
    in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
}

/// Records what an attempt came to: done, retried later, given up, target removed.
fn settle(shared: &Shared, key: &PushJobKey, mut job: PushJobRecord, outcome: Outcome) {
    let store = &shared.store;
    let m = &shared.metrics;
    let target = job.target.as_str();
    let user = job.user.as_str();
    let result = match outcome {
        Outcome::Sent => {
            m.push_sent.inc();
            debug!(%user, %target, "notification sent");
            store.finish_push_job(key)
        }
        Outcome::NoTarget => store.finish_push_job(key),
        Outcome::Gone(status) => {
            m.push_removed.inc();
            info!(%user, %target, status, "the push service says the target is gone; removed it");
            store
                .remove_push_target(user, target)
                .and_then(|_| store.finish_push_job(key))
        }
        Outcome::Refused(reason) => {
            m.push_failed.inc();
            warn!(%user, %target, %reason, "notification refused; not retried");
            store.finish_push_job(key)
        }
        Outcome::Retry { reason, after } => {
            job.attempts += 1;
            let now = wall_ms();
            let age = Duration::from_millis(now.saturating_sub(job.created_at));
            if job.attempts >= MAX_ATTEMPTS || age >= MAX_AGE {
                m.push_failed.inc();
                warn!(%user, %target, %reason, attempts = job.attempts, "notification given up");
                store.finish_push_job(key)
            } else {
                let wait =
                    backoff(job.attempts).max(after.unwrap_or_default().min(MAX_RETRY_AFTER));
                m.push_retried.inc();
                debug!(%user, %target, %reason, ?wait, "notification will be tried again");
                let due = now.saturating_add(wait.as_millis() as u64);
                store.reschedule_push_job(key, due, &job).map(drop)
            }
        }
    };
    if let Err(e) = result {
        error!(error = %e, "could not update the push queue");
    }
}

/// The node's own wait before attempt `attempts + 1`: 1 s doubling, capped, with
/// up to a quarter added at random so many targets of one service do not retry in step.
fn backoff(attempts: u32) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF);
    let jitter = getrandom::u32().unwrap_or(0) % 1000;
    base + base.mul_f64(f64::from(jitter) / 4000.0)
}

/// A `Retry-After` header: seconds, or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The `Topic` header of a conversation (RFC 8030 5.4): at most 32 base64url
/// characters, so a push service keeps only the newest undelivered one per topic.
fn topic(channel: &str) -> HeaderValue {
    let mut t = URL_SAFE_NO_PAD.encode(Sha256::digest(channel.as_bytes()));
    t.truncate(32);
    HeaderValue::from_str(&t).unwrap_or_else(|_| HeaderValue::from_static("hearth"))
}

async fn attempt(shared: &Shared, job: &PushJobRecord) -> Outcome {
    let target = match shared.store.push_target(&job.user, &job.target) {
        Ok(Some(t)) => t,
        Ok(None) => return Outcome::NoTarget,
        Err(e) => {
            return Outcome::Retry {
                reason: format!("store: {e}"),
                after: None,
            };
        }
    };
    let request = match build(shared, &target, job) {
        Ok(r) => r,
        Err(reason) => return Outcome::Refused(reason),
    };
    match shared.http.execute(request).await {
        Ok(res) => judge(res.status(), res.headers()),
        Err(e) => Outcome::Retry {
            reason: if e.is_timeout() {
                "no answer in time".into()
            } else {
                format!("request failed: {e}")
            },
            after: None,
        },
    }
}

fn judge(status: StatusCode, headers: &HeaderMap) -> Outcome {
    match status.as_u16() {
        200..=299 => Outcome::Sent,
        404 | 410 => Outcome::Gone(status.as_u16()),
        408 | 429 | 500..=599 => Outcome::Retry {
            reason: format!("answered {status}"),
            after: retry_after(headers),
        },
        _ => Outcome::Refused(format!("answered {status}")),
    }
}

/// The HTTP request for one target: encrypted and VAPID-signed for Web Push, plain
/// JSON for a webhook. Both carry `TTL`, `Urgency` and `Topic`.
fn build(
    shared: &Shared,
    target: &PushTargetRecord,
    job: &PushJobRecord,
) -> Result<reqwest::Request, String> {
    let url = check_endpoint(&target.endpoint, shared.allow_private)?;
    let mut request = match target.kind {
        PushTargetKind::WebPush => {
            let (Some(p256dh), Some(auth)) = (&target.p256dh, &target.auth) else {
                return Err("the target has no keys".into());
            };
            let (key, secret) = decode_keys(p256dh, auth).map_err(|e| e.message)?;
            let uri: axum::http::Uri = url
                .as_str()
                .parse()
                .map_err(|_| "the endpoint is not a valid URI".to_string())?;
            let http = WebPushBuilder::new(uri, key, secret)
                .with_valid_duration(MAX_AGE)
                .build(job.payload.as_bytes())
                .map_err(|e| format!("could not encrypt: {e}"))?;
            // The token is made here rather than by the crate's `with_vapid`, whose
            // audience leaves out a non-default port.
            let authorization = shared.vapid.authorization(
                &url.origin().ascii_serialization(),
                &shared.contact,
                MAX_AGE,
            )?;
            let mut r = reqwest::Request::try_from(http).map_err(|e| e.to_string())?;
            r.headers_mut().insert(
                AUTHORIZATION,
                HeaderValue::from_str(&authorization).map_err(|e| e.to_string())?,
            );
            r
        }
        PushTargetKind::Webhook => {
            let mut r = reqwest::Request::new(reqwest::Method::POST, url);
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r.headers_mut()
                .insert("TTL", HeaderValue::from(MAX_AGE.as_secs()));
            *r.body_mut() = Some(job.payload.clone().into());
            r
        }
    };
    let headers = request.headers_mut();
    headers.insert("Urgency", HeaderValue::from_static("high"));
    headers.insert("Topic", topic(&job.channel));
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_decide_what_happens_next() {
        let none = HeaderMap::new();
        assert_eq!(judge(StatusCode::CREATED, &none), Outcome::Sent);
        assert_eq!(judge(StatusCode::GONE, &none), Outcome::Gone(410));
        assert_eq!(judge(StatusCode::NOT_FOUND, &none), Outcome::Gone(404));
        assert!(matches!(
            judge(StatusCode::BAD_GATEWAY, &none),
            Outcome::Retry { after: None, .. }
        ));
        let mut later = HeaderMap::new();
        later.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert!(matches!(
            judge(StatusCode::TOO_MANY_REQUESTS, &later),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            judge(StatusCode::FORBIDDEN, &none),
            Outcome::Refused(_)
        ));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let mut h = HeaderMap::new();
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&in_a_minute).expect("header"),
        );
        let d = retry_after(&h).expect("a date");
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let secs = |n| backoff(n).as_secs_f64();
        assert!((1.0..1.25).contains(&secs(1)));
        assert!((2.0..2.5).contains(&secs(2)));
        assert!((8.0..10.0).contains(&secs(4)));
        assert!(secs(30) <= MAX_BACKOFF.as_secs_f64() * 1.25);
    }

    #[test]
    fn topics_are_short_base64url() {
        let t = topic("bn_YMnJ7E7pIzfO1@localhost");
        let t = t.to_str().expect("ascii");
        assert_eq!(t.len(), 32);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
}
