//! Number Verify transactions and verifications, kept in memory and bounded, found by id (the
//! API) or by the token in their `sessionUrl` (the device).

use std::collections::{HashMap, VecDeque};

/// Sessions kept before the oldest are forgotten, so a long benchmark cannot grow the mock
/// without bound.
const CAPACITY: usize = 10_000;

#[derive(Debug)]
pub(crate) struct Sessions<T> {
    by_id: HashMap<String, (String, T)>,
    id_by_token: HashMap<String, String>,
    /// Ids in creation order, for eviction.
    order: VecDeque<String>,
}

impl<T> Default for Sessions<T> {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
            id_by_token: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> Sessions<T> {
    pub(crate) fn insert(&mut self, id: String, token: String, session: T) {
        if self.order.len() == CAPACITY {
            if let Some((token, _)) = self
                .order
                .pop_front()
                .and_then(|oldest| self.by_id.remove(&oldest))
            {
                self.id_by_token.remove(&token);
            }
        }
        self.order.push_back(id.clone());
        self.id_by_token.insert(token.clone(), id.clone());
        self.by_id.insert(id, (token, session));
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.by_id.get_mut(id).map(|(_, session)| session)
    }

    /// The session whose `sessionUrl` ends in `token`, with its id.
    pub(crate) fn by_token(&mut self, token: &str) -> Option<(&str, &mut T)> {
        let id = self.id_by_token.get(token)?;
        let (_, session) = self.by_id.get_mut(id)?;
        Some((id, session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_id_and_token() {
        let mut sessions = Sessions::default();
        sessions.insert("id".into(), "token".into(), 1);
        assert_eq!(sessions.get_mut("id"), Some(&mut 1));
        assert_eq!(sessions.by_token("token"), Some(("id", &mut 1)));
        assert_eq!(sessions.get_mut("token"), None);
        assert_eq!(sessions.by_token("id"), None);
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut sessions = Sessions::default();
        for i in 0..=CAPACITY {
            sessions.insert(i.to_string(), format!("t{i}"), ());
        }
        assert_eq!(sessions.get_mut("0"), None);
        assert_eq!(sessions.by_token("t0"), None);
        assert!(sessions.get_mut("1").is_some());
        assert_eq!(sessions.by_id.len(), CAPACITY);
        assert_eq!(sessions.id_by_token.len(), CAPACITY);
    }
}
