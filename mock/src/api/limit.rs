//! CM.com's "one request per second per set of credentials, across all Mobile Identity
//! services" (fact sheet §5), enforced on arrival times so that a client's pacing can be tested
//! exactly.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// One window: the mock accepts a single key id.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval: Duration,
    last_accepted: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_accepted: Mutex::new(None),
        }
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Accepts a request that arrived at least the interval after the last accepted one, and
    /// remembers its arrival; otherwise returns how much sooner than that it came. A refused
    /// request does not move the window.
    pub(crate) fn admit(&self, arrival: Instant) -> Result<(), Duration> {
        // Nothing between lock and unlock can panic, so a poisoned window is still whole.
        let mut last = self
            .last_accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = *last {
            let since = arrival.saturating_duration_since(last);
            if since < self.interval {
                return Err(self.interval - since);
            }
        }
        *last = Some(arrival);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_until_exactly_one_interval_after_the_last_accepted() {
        let limit = RateLimit::new(Duration::from_millis(100));
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(limit.admit(at(0)), Ok(()));
        assert_eq!(limit.admit(at(40)), Err(Duration::from_millis(60)));
        assert_eq!(limit.admit(at(99)), Err(Duration::from_millis(1)));
        assert_eq!(limit.admit(at(100)), Ok(()));
        assert_eq!(limit.admit(at(199)), Err(Duration::from_millis(1)));
        // A request that arrived before the last accepted one, but was handled after it.
        assert_eq!(limit.admit(at(90)), Err(Duration::from_millis(100)));
        assert_eq!(limit.admit(at(200)), Ok(()));
    }
}
