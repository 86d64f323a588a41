//! One upstream connection kept open for sparse traffic (`upstream.keep_warm`).
//!
//! A credential sends at most one request a second and often one every few minutes, while
//! upstream front ends close connections idle for a while (nginx after 75 s, cloud load
//! balancers after about 60 s). Such a request would wait for the TCP and TLS handshakes, two
//! round trips or more. So for `upstream.keep_warm` after start and after each request, the
//! keeper makes a connection in the background whenever the pool has none open. It sleeps until
//! a connection closes: one handshake per upstream keep-alive period, none once the window has
//! passed, and a growing pause when connecting fails or connections die as soon as made.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::SendError;

/// A connection that closes sooner than this after it was made counts as a failure: an upstream
/// that closes every connection at once must not turn the keeper into a loop.
const SHORTEST_LIFE: Duration = Duration::from_secs(1);
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// At most about one attempt a minute while the upstream cannot be reached.
const LONGEST_PAUSE: Duration = Duration::from_secs(64);

/// When the last request came, and the news that a connection closed.
pub(super) struct Warmth {
    window: Duration,
    epoch: Instant,
    /// Milliseconds from `epoch` to the last request (zero: none yet, the window counts from
    /// start).
    last_request: AtomicU64,
    closed: Arc<Notify>,
}

impl Warmth {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            epoch: Instant::now(),
            last_request: AtomicU64::new(0),
            closed: Arc::new(Notify::new()),
        }
    }

    /// A request is about to be sent: the window starts again.
    pub fn requested(&self) {
        let since_epoch = Instant::now().saturating_duration_since(self.epoch);
        let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
        self.last_request.store(millis, Ordering::Relaxed);
    }

    /// Whether a connection should be kept open at `now`.
    pub fn wanted(&self, now: Instant) -> bool {
        let last = self.epoch + Duration::from_millis(self.last_request.load(Ordering::Relaxed));
        !self.window.is_zero() && now.saturating_duration_since(last) <= self.window
    }

    /// Told by every connection of the pool when it closes.
    pub fn closed(&self) -> &Arc<Notify> {
        &self.closed
    }
}

/// What the keeper needs of the pool.
pub(super) trait Warmable: Send + Sync + 'static {
    fn warmth(&self) -> &Warmth;
    /// Whether an open connection waits in the pool.
    fn has_open(&self) -> bool;
    /// Makes a connection and leaves it in the pool.
    fn connect_idle(self: Arc<Self>) -> impl Future<Output = Result<(), SendError>> + Send;
}

/// Keeps a connection open while the window lasts, until the pool is gone.
pub(super) async fn keep<P: Warmable>(pool: Weak<P>, closed: Arc<Notify>) {
    let mut pause = FIRST_PAUSE;
    let mut made_at: Option<Instant> = None;
    loop {
        let wait = {
            let Some(pool) = pool.upgrade() else { return };
            if !pool.warmth().wanted(Instant::now()) || pool.has_open() {
                None
            } else if made_at.is_some_and(|at| at.elapsed() < SHORTEST_LIFE) {
                made_at = None;
                Some(longer(&mut pause))
            } else {
                if made_at.is_some() {
                    // The last one lived: the upstream is well again.
                    pause = FIRST_PAUSE;
                }
                match pool.connect_idle().await {
                    Ok(()) => {
                        made_at = Some(Instant::now());
                        None
                    }
                    Err(error) => {
                        made_at = None;
                        let error = crate::chain(&error);
                        tracing::warn!(%error, "cannot connect to the upstream ahead of requests");
                        Some(longer(&mut pause))
                    }
                }
            }
        };
        match wait {
            Some(pause) => tokio::time::sleep(pause).await,
            None => closed.notified().await,
        }
    }
}

/// The pause to take now; the next one is twice as long, up to `LONGEST_PAUSE`.
fn longer(pause: &mut Duration) -> Duration {
    let now = *pause;
    *pause = (now * 2).min(LONGEST_PAUSE);
    now
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;

    /// What becomes of the keeper's next connection.
    #[derive(Clone, Copy)]
    enum Fate {
        Refused,
        ClosedAtOnce,
        Kept,
    }

    /// A pool whose connections open and close on command, and that records when the keeper
    /// tried to connect.
    struct FakePool {
        warmth: Warmth,
        open: AtomicBool,
        fate: Mutex<Fate>,
        attempts: Mutex<Vec<Instant>>,
    }

    impl FakePool {
        fn new(window: Duration, fate: Fate) -> Arc<Self> {
            Arc::new(Self {
                warmth: Warmth::new(window),
                open: AtomicBool::new(false),
                fate: Mutex::new(fate),
                attempts: Mutex::default(),
            })
        }

        fn keep(&self, fate: Fate) {
            *self.fate.lock().unwrap() = fate;
        }

        /// The upstream closes the open connection.
        fn close(&self) {
            self.open.store(false, Ordering::SeqCst);
            self.warmth.closed().notify_one();
        }

        /// Seconds from `start` to each attempt to connect.
        fn attempts(&self, start: Instant) -> Vec<u64> {
            let attempts = self.attempts.lock().unwrap();
            attempts.iter().map(|at| (*at - start).as_secs()).collect()
        }
    }

    impl Warmable for FakePool {
        fn warmth(&self) -> &Warmth {
            &self.warmth
        }

        fn has_open(&self) -> bool {
            self.open.load(Ordering::SeqCst)
        }

        async fn connect_idle(self: Arc<Self>) -> Result<(), SendError> {
            self.attempts.lock().unwrap().push(Instant::now());
            let fate = *self.fate.lock().unwrap();
            match fate {
                Fate::Refused => return Err(SendError::Connect("refused".into())),
                Fate::ClosedAtOnce => self.warmth.closed().notify_one(),
                Fate::Kept => self.open.store(true, Ordering::SeqCst),
            }
            Ok(())
        }
    }

    fn start(pool: &Arc<FakePool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(keep(Arc::downgrade(pool), pool.warmth.closed().clone()))
    }

    /// A pool and its keeper, started now; and now.
    fn started(window: Duration, fate: Fate) -> (Arc<FakePool>, Instant) {
        let pool = FakePool::new(window, fate);
        let t0 = Instant::now();
        start(&pool);
        (pool, t0)
    }

    /// Lets the keeper run until it waits again, `by` later.
    async fn after(by: Duration) {
        tokio::time::sleep(by).await;
        tokio::task::yield_now().await;
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test(start_paused = true)]
    async fn connects_at_start_and_again_whenever_the_upstream_closes_the_connection() {
        let (pool, t0) = started(secs(600), Fate::Kept);
        after(secs(1)).await;
        assert!(pool.has_open());
        for _ in 0..3 {
            // Each connection lives the upstream's keep-alive period.
            after(secs(60)).await;
            pool.close();
            after(Duration::ZERO).await;
            assert!(pool.has_open());
        }
        assert_eq!(pool.attempts(t0), [0, 61, 121, 181]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_lived_a_second_is_made_again_at_once() {
        let (pool, t0) = started(secs(600), Fate::Kept);
        after(secs(1)).await;
        pool.close();
        after(Duration::ZERO).await;
        assert_eq!(pool.attempts(t0), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_once_no_request_came_for_the_window_and_resumes_with_the_next() {
        let (pool, t0) = started(secs(600), Fate::Kept);
        after(secs(599)).await;
        pool.close();
        after(Duration::ZERO).await;
        assert!(pool.has_open(), "599 s after start: still in the window");
        after(secs(2)).await;
        pool.close();
        after(secs(60)).await;
        assert!(!pool.has_open(), "connected after the window");

        // A request connects on its own (it found none open) and opens the window again.
        pool.warmth.requested();
        pool.open.store(true, Ordering::SeqCst);
        after(secs(30)).await;
        pool.close();
        after(Duration::ZERO).await;
        assert!(pool.has_open());
        assert_eq!(pool.attempts(t0), [0, 599, 691]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_while_another_connection_is_open_costs_nothing() {
        let (pool, t0) = started(secs(600), Fate::Kept);
        after(secs(10)).await;
        // Another connection of the pool closed; the warm one is still open.
        pool.warmth.closed().notify_one();
        after(secs(10)).await;
        assert_eq!(pool.attempts(t0), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connects_pause_twice_as_long_each_time_up_to_64_s() {
        let (pool, t0) = started(secs(3600), Fate::Refused);
        after(secs(300)).await;
        assert_eq!(pool.attempts(t0), [0, 1, 3, 7, 15, 31, 63, 127, 191, 255]);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_closed_as_soon_as_made_pause_too_until_one_lives() {
        let (pool, t0) = started(secs(3600), Fate::ClosedAtOnce);
        after(secs(100)).await;
        assert_eq!(pool.attempts(t0), [0, 1, 3, 7, 15, 31, 63]);
        // The next, at 127 s, is kept; when it closes 73 s later, the pauses start over.
        pool.keep(Fate::Kept);
        after(secs(100)).await;
        pool.keep(Fate::ClosedAtOnce);
        pool.close();
        after(secs(10)).await;
        assert_eq!(
            pool.attempts(t0),
            [0, 1, 3, 7, 15, 31, 63, 127, 200, 201, 203, 207]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ends_with_the_pool() {
        let pool = FakePool::new(secs(600), Fate::Kept);
        let keeper = start(&pool);
        after(secs(1)).await;
        let closed = pool.warmth.closed().clone();
        drop(pool);
        closed.notify_one();
        tokio::time::timeout(secs(1), keeper)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn the_window_includes_its_end_and_zero_wants_nothing() {
        let warmth = Warmth::new(secs(1));
        assert!(warmth.wanted(warmth.epoch + secs(1)));
        assert!(!warmth.wanted(warmth.epoch + Duration::from_millis(1001)));
        let warmth = Warmth::new(Duration::ZERO);
        assert!(!warmth.wanted(warmth.epoch));
    }
}
