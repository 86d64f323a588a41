//! The rate limiter: CM.com's one request per second per credential set, kept for the apps.
//!
//! Each request reserves the next free send slot for the credential and waits for it (a timer)
//! before it takes an upstream connection or a token. Slots are `rate_limit.interval` apart and
//! handed out in arrival order, so requests leave in that order. A slot further than
//! `rate_limit.max_wait` away is not reserved: the request gets a 429 at once.
//!
//! Where the slots are kept:
//! - alone, in this process (`local`);
//! - with `rate_limit.redis_url`, in the store every replica shares (`redis`); while the
//!   store fails, in this process at `interval × rate_limit.replicas`, so that the replicas
//!   together still keep the limit; a probe returns to the store once it answers again.
//!
//! A request whose client goes away while it waits never sends, and gives its slot back if it
//! was the last one reserved (the store does the same check in its script), even when it went
//! away before the store's answer came; a slot in the middle of the queue stays unused, one
//! interval lost.

mod local;
pub mod redis;
pub mod retry_after;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::RateLimit;
use crate::error::ProxyError;
use crate::lock;
use crate::metrics::{BackendLabels, Metrics, OutcomeLabels};
use local::{Schedule, Slot};

/// How often a replica that fell back to local pacing asks the store whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest an upstream's `Retry-After` holds the credential back: beyond it, the answer is
/// more likely a mistake than a plan, and every request would be refused until then.
const MAX_PUSH_BACK: Duration = Duration::from_secs(300);

/// The credential's send slots, and the requests waiting for theirs.
pub struct Pacer {
    interval: Duration,
    max_wait: Duration,
    max_queued: usize,
    /// Times in [`Schedule`] are durations since this instant.
    epoch: Instant,
    /// This process's schedule: the only one, or the stand-in while the store fails.
    local: Mutex<Schedule>,
    shared: Option<Arc<Shared>>,
    queued: AtomicUsize,
    /// When the next slot is free, as last seen (microseconds since `epoch`), for the gauge.
    next_free: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The store, and whether it is in use.
struct Shared {
    store: redis::Store,
    timeout: Duration,
    /// Set while the store fails and the local schedule stands in.
    fallen_back: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Which schedule a request was given its slot in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Local,
    Shared,
    Fallback,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Local, Backend::Shared, Backend::Fallback];

    fn label(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Shared => "shared",
            Backend::Fallback => "fallback",
        }
    }
}

impl Pacer {
    /// `None` when `rate_limit.interval` is zero: then nothing is paced and the request path
    /// does not even look.
    pub fn new(settings: &RateLimit, key_id: &str, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        if settings.interval.is_zero() {
            return None;
        }
        let shared = settings.redis.as_ref().and_then(|redis| {
            match redis::Store::new(redis, key_id, settings.interval, settings.redis_timeout) {
                Ok(store) => Some(Arc::new(Shared {
                    store,
                    timeout: settings.redis_timeout,
                    fallen_back: AtomicBool::new(false),
                    metrics: metrics.clone(),
                })),
                // The settings were checked at load; a client that still cannot be made keeps
                // the replica on local pacing rather than unpaced.
                Err(error) => {
                    tracing::error!(%error, url = %redis.url, "cannot use the Redis store; pacing locally");
                    None
                }
            }
        });
        // Alone, this process keeps the whole budget; as the stand-in for the store, its share.
        let local_interval = match settings.redis {
            Some(_) => settings.interval.saturating_mul(settings.replicas),
            None => settings.interval,
        };
        let pacer = Self {
            interval: settings.interval,
            max_wait: settings.max_wait,
            max_queued: settings.max_queued,
            epoch: Instant::now(),
            local: Mutex::new(Schedule::new(local_interval)),
            shared,
            queued: AtomicUsize::new(0),
            next_free: AtomicU64::new(0),
            metrics,
        };
        pacer.show_backend(match (&settings.redis, &pacer.shared) {
            (None, _) => Backend::Local,
            (Some(_), Some(_)) => Backend::Shared,
            (Some(_), None) => Backend::Fallback,
        });
        Some(Arc::new(pacer))
    }

    /// Reserves the request's send slot, or refuses it (429) at once. The slot is held by the
    /// returned [`Turn`] until it is sent, or given back where it can when dropped before.
    pub async fn reserve(&self) -> Result<Turn<'_>, ProxyError> {
        let mut turn = self.enqueue()?;
        let (slot, reservation, due) = self.reserve_slot(turn.started).await?;
        turn.slot = Some((slot, reservation));
        turn.due_when_reserved = due;
        Ok(turn)
    }

    /// [`Pacer::reserve`], then [`Turn::wait`].
    pub async fn wait_turn(&self) -> Result<Duration, ProxyError> {
        let turn = self.reserve().await?;
        // The credential was idle: nothing can have moved a slot reserved a moment ago, so
        // no second look (the common case stays one lock and two clock reads).
        if turn.due_when_reserved {
            return Ok(turn.sent());
        }
        Ok(turn.wait().await)
    }

    /// The upstream said 429 or 503: nothing is sent with the credential for `by` (its
    /// `Retry-After`), or one interval if it did not say, here and, through the store, by every
    /// replica. Requests already waiting here move back by as much, in order.
    pub async fn push_back(&self, by: Option<Duration>) {
        let by = by.unwrap_or(self.interval).min(MAX_PUSH_BACK);
        let now = self.now();
        let free_in = {
            let mut local = lock(&self.local);
            local.push_back(now, by);
            local.free_in(now)
        };
        self.saw_next_free(now + free_in);
        if let Some(shared) = self.shared_in_use() {
            match tokio::time::timeout(shared.timeout, shared.store.push_back(by)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => shared.fall_back(&error.to_string()),
                Err(_) => shared.fall_back("no answer within rate_limit.redis_timeout"),
            }
        }
    }

    /// The key id was rotated: with the store, slots are reserved in the new credential's
    /// budget from now on (replicas that have not seen the rotation yet keep the old one until
    /// they do, within `credentials.reload_interval`).
    pub fn key_id_changed(&self, key_id: &str) {
        if let Some(shared) = &self.shared {
            shared.store.set_key_id(key_id);
        }
    }

    /// Seconds until the next slot is free, as last seen.
    pub fn seconds_until_free(&self) -> f64 {
        let next = Duration::from_micros(self.next_free.load(Ordering::Relaxed));
        next.saturating_sub(self.now()).as_secs_f64()
    }

    fn enqueue(&self) -> Result<Turn<'_>, ProxyError> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(ProxyError::QueueFull {
                limit: self.max_queued,
                retry_after: whole_seconds(self.interval),
            });
        }
        self.metrics.rate_limit_queued.inc();
        Ok(Turn {
            pacer: self,
            started: Instant::now(),
            slot: None,
            due_when_reserved: false,
        })
    }

    /// A slot from the store while it answers, else from the local schedule; whether it was
    /// due at once. `started` is when the request asked.
    async fn reserve_slot(
        &self,
        started: Instant,
    ) -> Result<(Slot, Option<u64>, bool), ProxyError> {
        if let Some(shared) = self.shared_in_use() {
            match shared.clone().reserve(self.max_wait).await {
                Some(Ok(redis::Answer::Reserved { wait, next })) => {
                    // The store's clock decided the wait; ours only counts it down.
                    let now = self.now();
                    self.saw_next_free(now + wait + self.interval);
                    let slot = lock(&self.local).adopt(now + wait);
                    return Ok((slot, Some(next), wait.is_zero()));
                }
                Some(Ok(redis::Answer::TooFar { wait })) => return Err(self.too_far(wait)),
                Some(Err(error)) => shared.fall_back(&error.to_string()),
                None => shared.fall_back("no answer within rate_limit.redis_timeout"),
            }
        }
        // After a failed round trip to the store, `started` is long past.
        let now = match self.shared {
            Some(_) => self.now(),
            None => started - self.epoch,
        };
        let (reserved, free_in) = {
            let mut local = lock(&self.local);
            (local.reserve(now, self.max_wait), local.free_in(now))
        };
        self.saw_next_free(now + free_in);
        match reserved {
            Ok(slot) => Ok((slot, None, slot.at <= now)),
            Err(wait) => Err(self.too_far(wait)),
        }
    }

    fn too_far(&self, wait: Duration) -> ProxyError {
        ProxyError::SlotTooFar {
            wait,
            max_wait: self.max_wait,
            // The earliest time a new request would be queued rather than refused.
            retry_after: whole_seconds(wait.saturating_sub(self.max_wait)),
        }
    }

    fn shared_in_use(&self) -> Option<&Arc<Shared>> {
        self.shared
            .as_ref()
            .filter(|shared| !shared.fallen_back.load(Ordering::Acquire))
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn saw_next_free(&self, at: Duration) {
        let micros = u64::try_from(at.as_micros()).unwrap_or(u64::MAX);
        self.next_free.store(micros, Ordering::Relaxed);
    }

    fn show_backend(&self, backend: Backend) {
        show_backend(&self.metrics, backend);
    }
}

fn show_backend(metrics: &Metrics, backend: Backend) {
    for each in Backend::ALL {
        let labels = BackendLabels {
            backend: each.label(),
        };
        metrics
            .rate_limit_backend
            .get_or_create(&labels)
            .set(i64::from(each == backend));
    }
}

impl Shared {
    /// Reserves a slot in the store; `None` if it did not answer within
    /// `rate_limit.redis_timeout`. The round trip is a task of its own: a request dropped during
    /// it (its client went away) would otherwise leave a slot reserved in the store that no
    /// replica uses and nothing counts; the task gives it back instead.
    async fn reserve(
        self: Arc<Self>,
        max_wait: Duration,
    ) -> Option<Result<redis::Answer, ::redis::RedisError>> {
        let (answer_tx, answer_rx) = oneshot::channel();
        tokio::spawn(async move {
            let reserve = self.store.reserve(max_wait);
            let answer = tokio::time::timeout(self.timeout, reserve).await.ok();
            if let Err(Some(Ok(redis::Answer::Reserved { next, .. }))) = answer_tx.send(answer) {
                self.give_back(next).await;
            }
        });
        // The task always sends, unless the runtime is shutting down: then no answer.
        answer_rx.await.ok().flatten()
    }

    /// Gives the reservation `next` back if it is still the last one, and counts the outcome.
    async fn give_back(&self, next: u64) {
        let given_back = tokio::time::timeout(self.timeout, self.store.release(next)).await;
        count_abandoned(&self.metrics, matches!(given_back, Ok(Ok(true))));
    }

    /// The store failed: pace locally until a probe finds it again. Logged once per outage.
    fn fall_back(self: &Arc<Self>, error: &str) {
        self.metrics.rate_limit_redis_errors.inc();
        if self.fallen_back.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            %error,
            "the Redis store failed; pacing locally at rate_limit.interval × rate_limit.replicas until it answers again"
        );
        show_backend(&self.metrics, Backend::Fallback);
        tokio::spawn(self.clone().probe());
    }

    async fn probe(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            match tokio::time::timeout(self.timeout, self.store.ping()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) | Err(_) => {
                    self.metrics.rate_limit_redis_errors.inc();
                }
            }
        }
        self.fallen_back.store(false, Ordering::Release);
        show_backend(&self.metrics, Backend::Shared);
        tracing::info!("the Redis store answers again; pacing is shared again");
    }
}

/// A request in the queue: counted while it lives; dropped with its slot still held (the
/// client went away), it gives the slot back where it can.
pub struct Turn<'a> {
    pacer: &'a Pacer,
    started: Instant,
    /// The slot, and the store's reservation if it came from there; `None` once sent.
    slot: Option<(Slot, Option<u64>)>,
    /// The slot was due when it was reserved.
    due_when_reserved: bool,
}

impl Turn<'_> {
    /// Waits until the slot is due (no timer at all if it is already); returns how long the
    /// request was queued, reservation included.
    pub async fn wait(self) -> Duration {
        let pacer = self.pacer;
        if let Some((slot, _)) = self.slot {
            // A push-back while waiting moves the slot: look again when the timer fires.
            loop {
                let due = pacer.epoch + lock(&pacer.local).due(slot);
                if due <= Instant::now() {
                    break;
                }
                tokio::time::sleep_until(due).await;
            }
        }
        self.sent()
    }

    /// The request goes now: nothing to give back from here on.
    fn sent(mut self) -> Duration {
        self.slot = None;
        let waited = self.started.elapsed();
        self.pacer
            .metrics
            .rate_limit_wait
            .observe(waited.as_secs_f64());
        waited
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let pacer = self.pacer;
        pacer.queued.fetch_sub(1, Ordering::AcqRel);
        pacer.metrics.rate_limit_queued.dec();
        let Some((slot, reservation)) = self.slot.take() else {
            return;
        };
        match (reservation, &pacer.shared) {
            (Some(next), Some(shared)) => {
                let shared = shared.clone();
                tokio::spawn(async move { shared.give_back(next).await });
            }
            _ => count_abandoned(&pacer.metrics, lock(&pacer.local).release(slot)),
        }
    }
}

/// Counts the slot of a request whose client went away: given back, or wasted.
fn count_abandoned(metrics: &Metrics, given_back: bool) {
    let outcome = if given_back { "given_back" } else { "wasted" };
    metrics
        .rate_limit_abandoned
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// Whole seconds, rounded up, at least one: what `Retry-After` can say.
fn whole_seconds(d: Duration) -> u64 {
    let seconds = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(interval_ms: u64, max_wait_ms: u64) -> RateLimit {
        RateLimit {
            interval: Duration::from_millis(interval_ms),
            max_wait: Duration::from_millis(max_wait_ms),
            max_queued: 100,
            replicas: 1,
            redis: None,
            redis_timeout: Duration::from_millis(200),
        }
    }

    fn pacer(settings: &RateLimit) -> (Arc<Pacer>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let pacer = Pacer::new(settings, "kid", metrics.clone()).expect("interval is not zero");
        (pacer, metrics)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sample(metrics: &Metrics, name: &str) -> f64 {
        let tokens = crate::token::TokenCache::new(
            crate::token::Signer::new("kid", b"secret"),
            crate::config::TokenSettings::default(),
            Arc::new(crate::token::SystemClock),
        );
        metrics
            .render(&tokens)
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |value| value.parse().unwrap())
    }

    #[test]
    fn zero_interval_is_no_pacer_at_all() {
        let metrics = Arc::new(Metrics::new());
        assert!(Pacer::new(&settings(0, 5000), "kid", metrics).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_leave_in_arrival_order_an_interval_apart() {
        let (pacer, _) = pacer(&settings(1000, 10_000));
        let start = Instant::now();
        let mut turns = Vec::new();
        for _ in 0..4 {
            turns.push(pacer.reserve().await.unwrap());
        }
        let sent = std::sync::Mutex::new(Vec::new());
        // Polled in reverse order of arrival: the timers, not the polling, decide.
        let waits = turns.into_iter().enumerate().rev().map(|(i, turn)| {
            let sent = &sent;
            async move {
                turn.wait().await;
                sent.lock().unwrap().push((i, start.elapsed()));
            }
        });
        join_all(waits.collect()).await;
        assert_eq!(
            *sent.lock().unwrap(),
            [(0, ms(0)), (1, ms(1000)), (2, ms(2000)), (3, ms(3000))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_beyond_max_wait_and_beyond_the_queue_bound() {
        let (pacer, _) = pacer(&settings(1000, 2500));
        let held = [
            pacer.reserve().await.unwrap(),
            pacer.reserve().await.unwrap(),
            pacer.reserve().await.unwrap(),
        ];
        // The fourth slot is 3s away: nothing is reserved, retry when it would be queued.
        match pacer.reserve().await {
            Err(ProxyError::SlotTooFar {
                wait, retry_after, ..
            }) => assert_eq!((wait, retry_after), (ms(3000), 1)),
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(held);

        let (pacer, _) = pacer_with_queue(2);
        let _held = [
            pacer.reserve().await.unwrap(),
            pacer.reserve().await.unwrap(),
        ];
        assert!(matches!(
            pacer.reserve().await.map(|_| ()),
            Err(ProxyError::QueueFull { limit: 2, .. })
        ));
    }

    fn pacer_with_queue(max_queued: usize) -> (Arc<Pacer>, Arc<Metrics>) {
        pacer(&RateLimit {
            max_queued,
            ..settings(1000, 60_000)
        })
    }

    /// What a client that goes away while waiting costs: nothing if its slot was the last
    /// reserved, one interval of unused slot if later ones were waiting already.
    #[tokio::test(start_paused = true)]
    async fn a_request_dropped_while_waiting_gives_back_the_last_slot_only() {
        let (pacer, metrics) = pacer(&settings(1000, 10_000));
        let start = Instant::now();
        let first = pacer.reserve().await.unwrap();
        let middle = pacer.reserve().await.unwrap();
        let last = pacer.reserve().await.unwrap();
        drop(last);
        let again = pacer.reserve().await.unwrap();
        drop(middle);
        assert_eq!(sample(&metrics, "idmatch_proxy_rate_limit_queued"), 2.0);
        first.wait().await;
        again.wait().await;
        // `again` took the 2s slot given back; the middle one's (1s) went unused.
        assert_eq!(start.elapsed(), ms(2000));
        let abandoned = "idmatch_proxy_rate_limit_abandoned_slots_total";
        assert_eq!(
            sample(&metrics, &format!("{abandoned}{{outcome=\"given_back\"}}")),
            1.0
        );
        assert_eq!(
            sample(&metrics, &format!("{abandoned}{{outcome=\"wasted\"}}")),
            1.0
        );
        assert_eq!(sample(&metrics, "idmatch_proxy_rate_limit_queued"), 0.0);
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        for (millis, seconds) in [(0, 1), (1, 1), (1000, 1), (1001, 2), (2500, 3), (3000, 3)] {
            assert_eq!(whole_seconds(ms(millis)), seconds, "{millis} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_back_delays_the_waiting_and_the_next() {
        let (pacer, _) = pacer(&settings(1000, 10_000));
        let start = Instant::now();
        pacer.wait_turn().await.unwrap();
        let waiting = pacer.reserve().await.unwrap();
        pacer.push_back(Some(ms(3000))).await;
        waiting.wait().await;
        assert_eq!(start.elapsed(), ms(4000), "its 1s slot moved by 3s");
        // Without Retry-After: one interval.
        pacer.push_back(None).await;
        pacer.wait_turn().await.unwrap();
        assert_eq!(start.elapsed(), ms(6000));
        // The gauge: the next slot is one interval on, then nearer, then free.
        assert_eq!(pacer.seconds_until_free(), 1.0);
        tokio::time::advance(ms(250)).await;
        assert_eq!(pacer.seconds_until_free(), 0.75);
        tokio::time::advance(ms(1000)).await;
        assert_eq!(pacer.seconds_until_free(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_falls_back_to_local_pacing_at_interval_times_replicas() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", closed.local_addr().unwrap());
        drop(closed);
        let settings = RateLimit {
            replicas: 3,
            redis: Some(crate::config::Redis {
                connection: ::redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .unwrap(),
                url,
                password_file: None,
                ca: None,
            }),
            ..settings(100, 10_000)
        };
        let (pacer, metrics) = pacer(&settings);
        let backend = "idmatch_proxy_rate_limit_backend";
        assert_eq!(
            sample(&metrics, &format!("{backend}{{backend=\"shared\"}}")),
            1.0
        );
        let first = pacer.wait_turn().await.unwrap();
        let start = Instant::now();
        pacer.wait_turn().await.unwrap();
        pacer.wait_turn().await.unwrap();
        assert!(first <= settings.redis_timeout, "bounded: {first:?}");
        assert_eq!(start.elapsed(), ms(600), "300ms apart: 100ms × 3 replicas");
        assert_eq!(
            sample(&metrics, &format!("{backend}{{backend=\"fallback\"}}")),
            1.0
        );
        assert_eq!(
            sample(&metrics, &format!("{backend}{{backend=\"shared\"}}")),
            0.0
        );
        assert!(sample(&metrics, "idmatch_proxy_rate_limit_redis_errors_total") >= 1.0);
    }

    /// Polls every future until all are done (the crate has no `futures` dependency).
    async fn join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
        let mut futures: Vec<_> = futures.into_iter().map(Box::pin).map(Some).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for slot in &mut futures {
                if let Some(future) = slot {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(()) => *slot = None,
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await
    }
}
