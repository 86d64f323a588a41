//! The slot arithmetic of one replica: GCRA's "theoretical arrival time" without a burst
//! allowance. Pure: every method is told the time, so that tests need no clock.
//!
//! Times are durations since an epoch the caller picks (the pacer's monotonic start).

use std::time::Duration;

/// The send slots of one credential in this replica.
#[derive(Debug)]
pub struct Schedule {
    interval: Duration,
    /// The next free slot: the last one reserved plus `interval`.
    next: Duration,
    /// The sum of all push-backs: a slot reserved earlier moves back by what was added since.
    pushed: Duration,
}

/// A reserved slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub at: Duration,
    /// [`Schedule::pushed`] when it was reserved.
    pub pushed: Duration,
}

impl Schedule {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: Duration::ZERO,
            pushed: Duration::ZERO,
        }
    }

    /// Reserves the next free slot, unless it is more than `max_wait` after `now`: then
    /// nothing is reserved and the wait it would have had is returned.
    pub fn reserve(&mut self, now: Duration, max_wait: Duration) -> Result<Slot, Duration> {
        let at = self.next.max(now);
        let wait = at - now;
        if wait > max_wait {
            return Err(wait);
        }
        self.next = at + self.interval;
        Ok(Slot {
            at,
            pushed: self.pushed,
        })
    }

    /// Gives `slot` back if no later one was reserved and nothing was pushed back since:
    /// the next request takes it. A slot in the middle of the queue cannot be given back
    /// without moving the later ones, which are already waiting for theirs: it is left unused.
    pub fn release(&mut self, slot: Slot) -> bool {
        let last = slot.pushed == self.pushed && slot.at + self.interval == self.next;
        if last {
            self.next = slot.at;
        }
        last
    }

    /// The upstream asked for nothing before `now + by`: later reservations start there, and
    /// slots already reserved (`next` is ahead of `now`) move back by `by`, keeping their order.
    pub fn push_back(&mut self, now: Duration, by: Duration) {
        if self.next > now {
            self.next += by;
            self.pushed += by;
        }
        self.next = self.next.max(now + by);
    }

    /// A slot reserved elsewhere (in the shared store) for `at`, moved by push-backs made here
    /// from now on.
    pub fn adopt(&self, at: Duration) -> Slot {
        Slot {
            at,
            pushed: self.pushed,
        }
    }

    /// When a slot reserved as `slot` is due now, after any push-back since.
    pub fn due(&self, slot: Slot) -> Duration {
        slot.at + (self.pushed - slot.pushed)
    }

    /// How long from `now` until the next free slot.
    pub fn free_in(&self, now: Duration) -> Duration {
        self.next.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slots_are_an_interval_apart_and_start_now_when_free() {
        let mut schedule = Schedule::new(ms(1000));
        let at = |r: Result<Slot, Duration>| r.unwrap().at;
        assert_eq!(at(schedule.reserve(ms(5000), ms(5000))), ms(5000));
        assert_eq!(at(schedule.reserve(ms(5000), ms(5000))), ms(6000));
        assert_eq!(at(schedule.reserve(ms(5200), ms(5000))), ms(7000));
        assert_eq!(schedule.free_in(ms(5200)), ms(2800));
        // Idle long enough, the next request goes at once: no burst is saved up.
        assert_eq!(at(schedule.reserve(ms(20_000), ms(0))), ms(20_000));
        assert_eq!(at(schedule.reserve(ms(20_000), ms(1000))), ms(21_000));
    }

    #[test]
    fn a_slot_beyond_max_wait_reserves_nothing() {
        let mut schedule = Schedule::new(ms(1000));
        for _ in 0..6 {
            schedule.reserve(ms(0), ms(5000)).unwrap();
        }
        // Slots 0..=5s are taken; the next would wait 6s.
        assert_eq!(schedule.reserve(ms(0), ms(5000)), Err(ms(6000)));
        assert_eq!(
            schedule.reserve(ms(0), ms(5000)),
            Err(ms(6000)),
            "unchanged"
        );
        assert_eq!(schedule.reserve(ms(1000), ms(5000)).unwrap().at, ms(6000));
    }

    #[test]
    fn only_the_last_slot_is_given_back() {
        let mut schedule = Schedule::new(ms(1000));
        let first = schedule.reserve(ms(0), ms(5000)).unwrap();
        let middle = schedule.reserve(ms(0), ms(5000)).unwrap();
        let last = schedule.reserve(ms(0), ms(5000)).unwrap();
        assert!(!schedule.release(middle), "later slots are waiting");
        assert!(schedule.release(last));
        assert_eq!(schedule.reserve(ms(0), ms(5000)).unwrap().at, ms(2000));
        assert!(!schedule.release(first));
    }

    #[test]
    fn a_push_back_moves_the_next_slot_and_those_already_reserved() {
        let mut schedule = Schedule::new(ms(1000));
        // Nothing waiting: the next slot is `by` from now.
        schedule.push_back(ms(0), ms(3000));
        let a = schedule.reserve(ms(0), ms(5000)).unwrap();
        assert_eq!((a.at, schedule.due(a)), (ms(3000), ms(3000)));
        let b = schedule.reserve(ms(0), ms(5000)).unwrap();
        assert_eq!(schedule.due(b), ms(4000));
        // Two waiting (3s, 4s): both move by 2s, in order; the next free slot follows them.
        schedule.push_back(ms(500), ms(2000));
        assert_eq!((schedule.due(a), schedule.due(b)), (ms(5000), ms(6000)));
        assert_eq!(schedule.free_in(ms(500)), ms(6500));
        assert!(!schedule.release(b), "a moved slot is not given back");
        // A push-back shorter than the queue still moves it by that much.
        let c = schedule.reserve(ms(500), ms(10_000)).unwrap();
        schedule.push_back(ms(600), ms(100));
        assert_eq!(schedule.due(c), ms(7100));
    }

    #[test]
    fn a_push_back_once_the_last_slot_is_past_moves_no_slot() {
        let mut schedule = Schedule::new(ms(1000));
        let a = schedule.reserve(ms(0), ms(5000)).unwrap();
        // At 1 s the next free slot is now: no reserved slot lies ahead to move.
        schedule.push_back(ms(1000), ms(3000));
        assert_eq!(schedule.due(a), ms(0));
        assert_eq!(schedule.reserve(ms(1000), ms(5000)).unwrap().at, ms(4000));
    }
}
