//! Number Verify sessions, kept in memory and bounded.

use std::collections::{HashMap, VecDeque};

/// Sessions kept before the oldest are forgotten, so a long benchmark cannot grow the mock
/// without bound.
const CAPACITY: usize = 10_000;

/// What a poll of a session reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Pending,
    Completed { matched: bool },
}

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_id: HashMap<String, Session>,
    /// Ids in creation order, for eviction.
    order: VecDeque<String>,
}

#[derive(Debug)]
struct Session {
    matched: bool,
    polls: u32,
}

impl Sessions {
    /// Starts a session that will complete with `matched`.
    pub(crate) fn insert(&mut self, id: String, matched: bool) {
        if self.order.len() == CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, Session { matched, polls: 0 });
    }

    /// The state of session `id`: pending on the first poll, completed from the second on, so
    /// a client sees both without any timing.
    pub(crate) fn poll(&mut self, id: &str) -> Option<State> {
        let session = self.by_id.get_mut(id)?;
        session.polls = session.polls.saturating_add(1);
        Some(if session.polls == 1 {
            State::Pending
        } else {
            State::Completed {
                matched: session.matched,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_on_second_poll() {
        let mut sessions = Sessions::default();
        sessions.insert("a".into(), true);
        assert_eq!(sessions.poll("a"), Some(State::Pending));
        assert_eq!(sessions.poll("a"), Some(State::Completed { matched: true }));
        assert_eq!(sessions.poll("a"), Some(State::Completed { matched: true }));
        assert_eq!(sessions.poll("b"), None);
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut sessions = Sessions::default();
        for i in 0..=CAPACITY {
            sessions.insert(i.to_string(), false);
        }
        assert_eq!(sessions.poll("0"), None);
        assert_eq!(sessions.poll("1"), Some(State::Pending));
        assert_eq!(sessions.by_id.len(), CAPACITY);
    }
}
