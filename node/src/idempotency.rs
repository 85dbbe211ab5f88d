//! How long a send's idempotency key is remembered, and the sweep that forgets older ones.
//!
//! Every keyed send leaves an idempotency record (decision 7). Kept forever they would
//! grow by one per message; a client resends a key within seconds or minutes of its
//! first try, so records older than `idempotency_retention_secs` are removed by a
//! background sweep that walks the records in small steps, each on a blocking thread.

use std::time::{Duration, Instant};

use hearth_federation::clock::wall_ms;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::store::Store;

/// Records looked at per step of a sweep; a step holds no lock the chat path needs,
/// but it does read and decode, so it is kept short.
const SWEEP_STEP: usize = 5_000;

/// Pause between steps, so a sweep over millions of records leaves the store and the
/// cores to the chat path.
const STEP_PAUSE: Duration = Duration::from_millis(5);

/// Longest wait between sweeps: with a retention of a day, a record lives at most
/// a day and an hour.
const MAX_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Shortest wait between sweeps (short retentions, as in tests).
const MIN_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Starts sweeping records older than `retention` every quarter of it (between one
/// second and an hour), the first sweep one such period after start, until
/// `shutdown` turns true.
pub fn start_expiry(
    store: Store,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let every = (retention / 4).clamp(MIN_SWEEP_EVERY, MAX_SWEEP_EVERY);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            let before_ms = wall_ms().saturating_sub(retention.as_millis() as u64);
            if let Err(e) = sweep(&store, before_ms, &shutdown).await {
                warn!(error = %e, "idempotency records could not be swept; will try again");
            }
        }
    })
}

/// One pass over every record, removing those of sends stored before `before_ms`.
async fn sweep(
    store: &Store,
    before_ms: u64,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), String> {
    let started = Instant::now();
    let (mut scanned, mut removed) = (0usize, 0usize);
    let mut after: Option<Vec<u8>> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let step_store = store.clone();
        let step_after = after.take();
        let step = tokio::task::spawn_blocking(move || {
            step_store.expire_acks(before_ms, step_after.as_deref(), SWEEP_STEP)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        scanned += step.scanned;
        removed += step.removed;
        match step.resume {
            Some(key) => after = Some(key),
            None => break,
        }
        tokio::time::sleep(STEP_PAUSE).await;
    }
    let took_ms = started.elapsed().as_millis();
    if removed > 0 {
        info!(
            removed,
            scanned, took_ms, "forgot idempotency records past their retention"
        );
    } else {
        debug!(scanned, took_ms, "no idempotency record past its retention");
    }
    Ok(())
}
