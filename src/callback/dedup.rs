//! The event ids the app has acknowledged, so that CM.com's redelivery of one (it retries after a
//! 5xx, and may after a lost answer) is answered 2xx without calling the app again.
//!
//! Bounded two ways: an id is forgotten `callback.dedup_ttl` after it was acknowledged, and at
//! most `callback.dedup_max_ids` are kept (the oldest go first), each at most
//! [`MAX_ID_BYTES`] long: some 200 bytes an id, 2 MB at the default 10,000.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// Longer ids are not remembered (their events are forwarded every time): CM.com's are UUIDs.
pub const MAX_ID_BYTES: usize = 128;

/// Recently acknowledged event ids. Times are the token clock's (time since the UNIX epoch).
#[derive(Debug)]
pub struct Delivered {
    ttl: Duration,
    max_ids: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When each id was acknowledged.
    ids: HashMap<Box<str>, Duration>,
    /// The same ids, oldest first, for expiry and eviction.
    order: VecDeque<Box<str>>,
}

impl Delivered {
    pub fn new(ttl: Duration, max_ids: usize) -> Self {
        Self {
            ttl,
            max_ids,
            state: Mutex::default(),
        }
    }

    /// Whether the app acknowledged `id` within the TTL.
    pub fn contains(&self, id: &str, now: Duration) -> bool {
        let mut state = crate::lock(&self.state);
        self.expire(&mut state, now);
        state.ids.contains_key(id)
    }

    /// The app acknowledged `id` at `now`.
    pub fn insert(&self, id: &str, now: Duration) {
        if id.len() > MAX_ID_BYTES || self.ttl.is_zero() {
            return;
        }
        let mut state = crate::lock(&self.state);
        self.expire(&mut state, now);
        // Two deliveries of one event in flight at once were both forwarded; one entry is enough.
        if !state.ids.contains_key(id) {
            state.ids.insert(id.into(), now);
            state.order.push_back(id.into());
        }
        while state.order.len() > self.max_ids {
            if let Some(oldest) = state.order.pop_front() {
                state.ids.remove(&oldest);
            }
        }
    }

    fn expire(&self, state: &mut State, now: Duration) {
        while let Some(oldest) = state.order.front() {
            let acknowledged = state.ids.get(oldest).copied().unwrap_or_default();
            if acknowledged + self.ttl > now {
                break;
            }
            state.ids.remove(oldest);
            state.order.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        crate::lock(&self.state).ids.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn an_id_is_remembered_for_the_ttl() {
        let delivered = Delivered::new(secs(60), 10);
        delivered.insert("a", secs(100));
        assert!(!delivered.is_empty());
        assert!(delivered.contains("a", secs(159)));
        assert!(!delivered.contains("b", secs(159)));
        assert!(!delivered.contains("a", secs(160)));
        assert!(delivered.is_empty());
    }

    #[test]
    fn the_oldest_go_first_beyond_the_count() {
        let delivered = Delivered::new(secs(60), 3);
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            delivered.insert(id, secs(i as u64));
        }
        assert_eq!(delivered.len(), 3);
        assert!(!delivered.contains("a", secs(4)));
        assert!(delivered.contains("d", secs(4)));
        delivered.insert("d", secs(5));
        assert_eq!(delivered.len(), 3);
    }

    #[test]
    fn overlong_ids_and_a_zero_ttl_remember_nothing() {
        let delivered = Delivered::new(secs(60), 3);
        delivered.insert(&"x".repeat(MAX_ID_BYTES + 1), secs(0));
        assert!(delivered.is_empty());
        // The longest remembered is exactly the limit.
        let longest = "y".repeat(MAX_ID_BYTES);
        delivered.insert(&longest, secs(0));
        assert!(delivered.contains(&longest, secs(1)));
        let off = Delivered::new(Duration::ZERO, 3);
        off.insert("a", secs(0));
        assert!(!off.contains("a", secs(0)));
    }
}
