//! The hybrid logical clock that stamps events so channel order follows time.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by the wall clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A clock that never goes backwards and moves past every timestamp it has seen.
///
/// Channel order is `(ts, origin, seq)`, so equal timestamps are fine: the
/// clock only has to be non-decreasing and to absorb timestamps from peers that
/// run slightly ahead, so a reply is never ordered before what it answers.
#[derive(Debug, Default)]
pub struct Hlc {
    last: Mutex<u64>,
}

impl Hlc {
    /// A clock starting at the wall clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The timestamp for a new local event.
    pub fn now(&self) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(wall_ms());
        *last
    }

    /// Take note of a timestamp seen on another server's event.
    pub fn observe(&self, ts: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_absorbs_remote_time() {
        let clock = Hlc::new();
        let a = clock.now();
        clock.observe(a + 5_000);
        let b = clock.now();
        assert!(b >= a + 5_000);
        assert!(clock.now() >= b);
    }
}
