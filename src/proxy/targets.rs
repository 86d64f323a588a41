//! The upstream URIs of the targets clients ask for, remembered per thread.

use std::cell::RefCell;

use http::uri::PathAndQuery;
use http::Uri;

use crate::upstream::InvalidTarget;

thread_local! {
    /// Per runtime thread, so that workers never contend for it.
    static RECENT_TARGETS: RefCell<RecentTargets> = RefCell::default();
}

/// The upstream URI for the client's `target`, made by `join` unless this thread remembers it.
pub(super) fn upstream_uri(
    proxy: u64,
    target: &Uri,
    join: impl FnOnce() -> Result<Uri, InvalidTarget>,
) -> Result<Uri, InvalidTarget> {
    let key = target.path_and_query().map_or("/", PathAndQuery::as_str);
    RECENT_TARGETS.with_borrow_mut(|recent| recent.get_or_join(proxy, key, join))
}

/// How many client targets each thread remembers the upstream URI of.
const RECENT_TARGETS_PER_THREAD: usize = 8;

/// Upstream URIs of recent client targets. An app calls a handful of endpoints, so nearly every
/// request finds its target here and is spared joining, parsing and allocating the upstream's
/// (about 1k instructions per request: benches/README.md); a copy is reference counts. Keyed by
/// proxy too: tests run several in one process. The oldest entry makes way for a new one.
#[derive(Default)]
struct RecentTargets {
    entries: Vec<(u64, Box<str>, Uri)>,
    oldest: usize,
}

impl RecentTargets {
    fn get_or_join(
        &mut self,
        proxy: u64,
        target: &str,
        join: impl FnOnce() -> Result<Uri, InvalidTarget>,
    ) -> Result<Uri, InvalidTarget> {
        let found = self
            .entries
            .iter()
            .find(|(id, key, _)| *id == proxy && **key == *target);
        if let Some((_, _, uri)) = found {
            return Ok(uri.clone());
        }
        let uri = join()?;
        let entry = (proxy, Box::from(target), uri.clone());
        if self.entries.len() < RECENT_TARGETS_PER_THREAD {
            self.entries.push(entry);
        } else {
            self.entries[self.oldest] = entry;
            self.oldest = (self.oldest + 1) % RECENT_TARGETS_PER_THREAD;
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_targets_join_each_target_once_per_proxy_and_forget_the_oldest() {
        let joins = std::cell::Cell::new(0);
        let mut recent = RecentTargets::default();
        let mut get = |proxy: u64, target: &str| {
            let uri = recent
                .get_or_join(proxy, target, || {
                    joins.set(joins.get() + 1);
                    Ok(format!("https://up.example/p{proxy}{target}")
                        .parse()
                        .unwrap())
                })
                .unwrap();
            (uri.to_string(), joins.get())
        };
        assert_eq!(get(1, "/a?x=1"), ("https://up.example/p1/a?x=1".into(), 1));
        assert_eq!(get(1, "/a?x=1"), ("https://up.example/p1/a?x=1".into(), 1));
        assert_eq!(get(2, "/a?x=1"), ("https://up.example/p2/a?x=1".into(), 2));
        assert_eq!(get(1, "/a?x=2"), ("https://up.example/p1/a?x=2".into(), 3));
        // Six more fill the table (eight) and push out the oldest, the first one.
        for i in 0..6 {
            get(1, &format!("/fill/{i}"));
        }
        assert_eq!(joins.get(), 9);
        assert_eq!(get(2, "/a?x=1").1, 9, "still there");
        assert_eq!(get(1, "/a?x=1").1, 10, "forgotten, joined again");
        assert_eq!(recent.entries.len(), RECENT_TARGETS_PER_THREAD);
        // A target that cannot be joined is not remembered.
        let mut failures = 0;
        for _ in 0..2 {
            let failed = recent.get_or_join(1, "*", || {
                failures += 1;
                Err(InvalidTarget)
            });
            assert!(failed.is_err());
        }
        assert_eq!(failures, 2);
    }
}
