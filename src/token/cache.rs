//! The one token every request shares, and the task that keeps it fresh.
//!
//! The request path clones a prebuilt `HeaderValue` from its thread's copy of the token: no
//! lock, no signing, no formatting, and no cache line shared with the other worker threads
//! (each thread's copy has its own reference count). The shared token sits behind an
//! [`ArcSwap`]; a thread refreshes its copy when the generation number the cache publishes moves.
//! A background task re-mints `refresh_before` ahead of `exp`. Should that task run late (a
//! starved runtime, a suspended host, a wall-clock step), the request path notices that the
//! token is about to expire and mints one itself, behind a lock so that a burst of requests
//! signs once rather than once per request.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;

use super::jwt::{Claims, Signer};
use crate::config::TokenSettings;
use crate::lock;

/// Wall-clock time, injectable so that tests can move it.
///
/// Wall time rather than monotonic: `exp` and `nbf` are judged on CM.com's wall clock.
pub trait Clock: std::any::Any + Send + Sync {
    /// Time since the UNIX epoch.
    fn now(&self) -> Duration;
}

/// The system's real-time clock.
///
/// On Linux, the coarse one: it lags by at most a scheduler tick (1–10 ms), which whole-second
/// claims and a `margin` of seconds never notice, and it costs a memory read (3.6 ns here)
/// where the precise one costs 23 ns on every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[cfg(target_os = "linux")]
    fn now(&self) -> Duration {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        Duration::new(
            u64::try_from(now.tv_sec).unwrap_or_default(),
            u32::try_from(now.tv_nsec).unwrap_or_default(),
        )
    }

    #[cfg(not(target_os = "linux"))]
    fn now(&self) -> Duration {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// The cache's clock. The system's is called directly, not through `dyn Clock`: an indirect
/// call on every request is a tenth of the request path's cost.
enum Time {
    System,
    Injected(Arc<dyn Clock>),
}

impl Time {
    fn of(clock: Arc<dyn Clock>) -> Self {
        let any: &dyn std::any::Any = clock.as_ref();
        if any.is::<SystemClock>() {
            Time::System
        } else {
            Time::Injected(clock)
        }
    }

    #[inline(always)]
    fn now(&self) -> Duration {
        match self {
            Time::System => SystemClock.now(),
            Time::Injected(clock) => clock.now(),
        }
    }
}

/// A minted token and the window in which the request path may use it.
struct Minted {
    authorization: HeaderValue,
    claims: Claims,
    window: Window,
    /// Unique among all caches of the process, so that a thread's copy names its token.
    generation: u64,
}

#[derive(Clone, Copy)]
struct Window {
    /// `nbf`: before it (the clock stepped back) the upstream would refuse the token.
    usable_from: Duration,
    /// `exp - margin`.
    usable_until: Duration,
}

impl Window {
    #[inline]
    fn contains(&self, now: Duration) -> bool {
        self.usable_from <= now && now < self.usable_until
    }
}

/// 0 is no token's: a thread's copy starts with it.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A worker thread's copy of the current token.
struct Local {
    generation: u64,
    window: Window,
    authorization: HeaderValue,
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local {
            generation: 0,
            window: Window {
                usable_from: Duration::ZERO,
                usable_until: Duration::ZERO,
            },
            authorization: HeaderValue::from_static(""),
        })
    };
}

/// Counts of signings, by who did them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MintCounts {
    /// By the background refresher (and the first one, at start).
    pub background: u64,
    /// By the request path, because the refresher was late.
    pub inline: u64,
    /// Because the credentials changed.
    pub rotation: u64,
    /// Because the upstream answered 401 to the cached token.
    pub reauth: u64,
}

pub struct TokenCache {
    settings: TokenSettings,
    clock: Time,
    current: ArcSwap<Minted>,
    /// `current`'s generation, published after it: a thread whose copy has another refreshes it.
    generation: AtomicU64,
    /// The signer, behind the lock that serialises minting, so that concurrent stale readers
    /// sign once and a rotation never races a refresh.
    signer: Mutex<Signer>,
    background_mints: AtomicU64,
    inline_mints: AtomicU64,
    rotation_mints: AtomicU64,
    reauth_mints: AtomicU64,
    /// Set once the upstream refused a freshly minted token: the credentials themselves are
    /// wrong, and replaying a 401 would spend the rate limit twice for nothing. Cleared by
    /// new credentials or an accepted request.
    refused: AtomicBool,
}

impl TokenCache {
    /// Mints the first token at once: a cache is never empty.
    pub fn new(signer: Signer, settings: TokenSettings, clock: Arc<dyn Clock>) -> Self {
        let first = mint(&signer, &settings, claims_at(&settings, clock.now()));
        Self {
            settings,
            clock: Time::of(clock),
            generation: AtomicU64::new(first.generation),
            current: ArcSwap::from_pointee(first),
            signer: Mutex::new(signer),
            background_mints: AtomicU64::new(1),
            inline_mints: AtomicU64::new(0),
            rotation_mints: AtomicU64::new(0),
            reauth_mints: AtomicU64::new(0),
            refused: AtomicBool::new(false),
        }
    }

    /// The `Authorization` value for a request about to be sent: `Bearer <token>`, with at
    /// least `margin` of validity left.
    #[inline]
    pub fn authorization(&self) -> HeaderValue {
        let now = self.clock.now();
        let generation = self.generation.load(Ordering::Acquire);
        LOCAL.with(|local| {
            let local = local.borrow();
            if local.generation == generation && local.window.contains(now) {
                return local.authorization.clone();
            }
            drop(local);
            self.authorization_slow(now)
        })
    }

    /// The thread's copy is another token's or too old: take the shared one, minting it first
    /// if the refresher is late, and copy it for this thread.
    #[cold]
    fn authorization_slow(&self, now: Duration) -> HeaderValue {
        let current = self.current.load();
        let current = if current.window.contains(now) {
            current
        } else {
            drop(current);
            self.mint_inline();
            self.current.load()
        };
        // A copy of its own, so that the threads' reference counts live on separate lines.
        let mut authorization = HeaderValue::from_bytes(current.authorization.as_bytes())
            .expect("copied from a valid header value");
        authorization.set_sensitive(true);
        LOCAL.set(Local {
            generation: current.generation,
            window: current.window,
            authorization: authorization.clone(),
        });
        authorization
    }

    fn mint_inline(&self) {
        let signer = lock(&self.signer);
        // Whoever held the lock before us may have minted a fresh one already.
        let now = self.clock.now();
        if self.current.load().window.contains(now) {
            return;
        }
        self.inline_mints.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("token refresh was late; minted one on the request path");
        self.store(mint(
            &signer,
            &self.settings,
            claims_at(&self.settings, now),
        ));
    }

    /// The upstream refused `rejected` (a 401): unless a newer token is cached already, mint
    /// one now. Returns the value to retry with.
    pub fn reject(&self, rejected: &HeaderValue) -> HeaderValue {
        let signer = lock(&self.signer);
        let current = self.current.load();
        if current.authorization != rejected {
            return current.authorization.clone();
        }
        self.reauth_mints.fetch_add(1, Ordering::Relaxed);
        // Minted in the same second, the new token would be the refused one, byte for byte:
        // shift it a second into the past, which keeps `nbf` behind the clock.
        let mut claims = claims_at(&self.settings, self.clock.now());
        if claims == current.claims {
            claims = Claims {
                iat: claims.iat - 1,
                nbf: claims.nbf - 1,
                exp: claims.exp - 1,
            };
        }
        self.store(mint(&signer, &self.settings, claims))
    }

    /// The upstream refused a token minted for the replay of a 401: until the credentials
    /// change or a request is accepted, 401s are passed on without a replay.
    pub fn refuse_credentials(&self) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the upstream refused a freshly minted token too: check the credentials; \
                 401s are no longer replayed until they change or a request is accepted"
            );
        }
    }

    /// Whether 401s are not to be replayed (see [`TokenCache::refuse_credentials`]).
    #[inline]
    pub fn credentials_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// The upstream accepted a request: the credentials work. A load on the request path;
    /// a store only the first time after a refusal.
    #[inline]
    pub fn accepted(&self) {
        if self.credentials_refused() {
            self.refused.store(false, Ordering::Relaxed);
            tracing::info!("the upstream accepted a request again; 401s are replayed again");
        }
    }

    /// New credentials: every token from now on is signed with them, starting with one minted
    /// at once.
    pub fn replace_signer(&self, new: Signer) {
        let mut signer = lock(&self.signer);
        *signer = new;
        self.refused.store(false, Ordering::Relaxed);
        self.rotation_mints.fetch_add(1, Ordering::Relaxed);
        self.store(mint(
            &signer,
            &self.settings,
            claims_at(&self.settings, self.clock.now()),
        ));
    }

    fn store(&self, minted: Minted) -> HeaderValue {
        let authorization = minted.authorization.clone();
        let generation = minted.generation;
        self.current.store(Arc::new(minted));
        self.generation.store(generation, Ordering::Release);
        authorization
    }

    /// How long until the background refresh is due (zero if it is).
    pub fn refresh_due_in(&self) -> Duration {
        let current = self.current.load();
        let due_at =
            Duration::from_secs(current.claims.exp).saturating_sub(self.settings.refresh_before);
        let now = self.clock.now();
        if now < current.window.usable_from {
            return Duration::ZERO;
        }
        due_at.saturating_sub(now)
    }

    /// Re-mints if the refresh is due; returns whether it did.
    pub fn refresh_if_due(&self) -> bool {
        let signer = lock(&self.signer);
        if !self.refresh_due_in().is_zero() {
            return false;
        }
        self.store(mint(
            &signer,
            &self.settings,
            claims_at(&self.settings, self.clock.now()),
        ));
        self.background_mints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("token refreshed");
        true
    }

    /// Keeps the token fresh, forever: spawn it next to the server.
    pub async fn run_refresher(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.refresh_due_in()).await;
            self.refresh_if_due();
        }
    }

    /// The claims of the cached token.
    pub fn claims(&self) -> Claims {
        self.current.load().claims
    }

    /// Whether the cached token can be sent now: valid, with at least `margin` left.
    pub fn is_fresh(&self) -> bool {
        self.current.load().window.contains(self.clock.now())
    }

    /// Seconds until the cached token's `exp`; negative once expired.
    pub fn seconds_until_expiry(&self) -> i64 {
        let exp = self.current.load().claims.exp as i64;
        exp - self.clock.now().as_secs() as i64
    }

    pub fn mint_counts(&self) -> MintCounts {
        MintCounts {
            background: self.background_mints.load(Ordering::Relaxed),
            inline: self.inline_mints.load(Ordering::Relaxed),
            rotation: self.rotation_mints.load(Ordering::Relaxed),
            reauth: self.reauth_mints.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("claims", &self.claims())
            .finish_non_exhaustive()
    }
}

/// The claims of a token minted at `now`: iat = nbf = now - backdate (tolerating an upstream
/// clock behind ours), exp = iat + lifetime. Whole seconds, as JWT requires: the fraction of
/// `now` is dropped, never rounded up, so `nbf` is never in the future.
pub fn claims_at(settings: &TokenSettings, now: Duration) -> Claims {
    let iat = now.as_secs().saturating_sub(settings.backdate.as_secs());
    Claims {
        iat,
        nbf: iat,
        exp: iat + settings.lifetime.as_secs(),
    }
}

fn mint(signer: &Signer, settings: &TokenSettings, claims: Claims) -> Minted {
    let mut authorization = HeaderValue::try_from(format!("Bearer {}", signer.sign(claims)))
        .expect("base64url and dots are valid header bytes");
    authorization.set_sensitive(true);
    Minted {
        authorization,
        claims,
        window: Window {
            usable_from: Duration::from_secs(claims.nbf),
            usable_until: Duration::from_secs(claims.exp).saturating_sub(settings.margin),
        },
        generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Barrier;

    const T0: u64 = 1_800_000_000;

    /// A clock tests move by hand, in milliseconds.
    #[derive(Default)]
    struct ManualClock(AtomicU64);

    impl ManualClock {
        fn at(secs: u64) -> Arc<Self> {
            Arc::new(Self(AtomicU64::new(secs * 1000)))
        }
        fn set(&self, t: Duration) {
            self.0.store(t.as_millis() as u64, Ordering::SeqCst);
        }
        fn advance(&self, by: Duration) {
            self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }

    fn settings() -> TokenSettings {
        TokenSettings {
            lifetime: Duration::from_secs(60),
            refresh_before: Duration::from_secs(15),
            margin: Duration::from_secs(5),
            backdate: Duration::from_secs(5),
        }
    }

    fn cache(clock: Arc<ManualClock>) -> TokenCache {
        TokenCache::new(Signer::new("kid", b"secret"), settings(), clock)
    }

    /// The claims inside an `Authorization` value, decoded independently of the signer.
    fn claims_of(value: &HeaderValue) -> Claims {
        use base64::Engine;
        let token = value.to_str().unwrap().strip_prefix("Bearer ").unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let n = |k: &str| v[k].as_u64().unwrap();
        Claims {
            iat: n("iat"),
            nbf: n("nbf"),
            exp: n("exp"),
        }
    }

    fn remaining(value: &HeaderValue, now: Duration) -> Duration {
        Duration::from_secs(claims_of(value).exp).saturating_sub(now)
    }

    #[test]
    fn the_refresh_is_due_before_exp_or_at_once_when_the_clock_went_back() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let claims = cache.claims();
        let due_at = Duration::from_secs(claims.exp) - settings().refresh_before;
        assert_eq!(cache.refresh_due_in(), due_at - Duration::from_secs(T0));
        // At `nbf` itself the token is usable: the refresh waits for its time.
        let nbf = Duration::from_secs(claims.nbf);
        clock.set(nbf);
        assert_eq!(cache.refresh_due_in(), due_at - nbf);
        clock.set(nbf - Duration::from_millis(1));
        assert_eq!(cache.refresh_due_in(), Duration::ZERO);
        clock.set(due_at);
        assert_eq!(cache.refresh_due_in(), Duration::ZERO);
    }

    #[test]
    fn a_token_reminted_in_the_refused_ones_second_is_a_second_older() {
        let cache = cache(ManualClock::at(T0));
        let refused = cache.authorization();
        let replay = cache.reject(&refused);
        let (before, after) = (claims_of(&refused), claims_of(&replay));
        assert_eq!(
            (after.iat, after.nbf, after.exp),
            (before.iat - 1, before.nbf - 1, before.exp - 1)
        );
    }

    #[test]
    fn debug_output_shows_the_claims_and_never_the_token() {
        let cache = cache(ManualClock::at(T0));
        let shown = format!("{cache:?}");
        assert_eq!(
            shown,
            format!("TokenCache {{ claims: {:?}, .. }}", cache.claims())
        );
        let authorization = cache.authorization();
        let token = authorization.to_str().unwrap().strip_prefix("Bearer ");
        assert!(!shown.contains(token.unwrap()));
    }

    #[test]
    fn refused_credentials_are_warned_of_once_until_they_recover() {
        let cache = cache(ManualClock::at(T0));
        let captured = crate::telemetry::Captured::default();
        tracing::subscriber::with_default(captured.subscriber(), || {
            cache.refuse_credentials();
            cache.refuse_credentials();
            cache.accepted();
            cache.refuse_credentials();
        });
        assert_eq!(captured.text().matches("check the credentials").count(), 2);
    }

    /// The coarse clock is the wall clock, a tick behind at most.
    #[test]
    fn refused_credentials_last_until_new_ones_or_an_accepted_request() {
        let cache = cache(ManualClock::at(T0));
        assert!(!cache.credentials_refused());
        cache.refuse_credentials();
        cache.refuse_credentials();
        assert!(cache.credentials_refused());
        cache.accepted();
        assert!(!cache.credentials_refused(), "a request succeeded");
        cache.refuse_credentials();
        cache.replace_signer(Signer::new("kid", b"rotated"));
        assert!(!cache.credentials_refused(), "new credentials");
    }

    #[test]
    fn system_clock_reads_the_wall_clock() {
        let precise = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
        };
        let before = precise();
        let coarse = SystemClock.now();
        let after = precise();
        assert!(coarse <= after, "{coarse:?} is ahead of {after:?}");
        assert!(
            before.saturating_sub(coarse) < Duration::from_millis(100),
            "{coarse:?} lags {before:?}"
        );
    }

    #[test]
    fn first_token_is_backdated_and_marked_sensitive() {
        let clock = ManualClock::at(T0);
        clock.advance(Duration::from_millis(999));
        let value = cache(clock).authorization();
        assert!(value.is_sensitive());
        assert_eq!(
            claims_of(&value),
            Claims {
                iat: T0 - 5,
                nbf: T0 - 5,
                exp: T0 + 55
            }
        );
    }

    #[test]
    fn requests_share_the_cached_token_until_refresh() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let first = cache.authorization();
        clock.advance(Duration::from_secs(39));
        assert_eq!(cache.authorization(), first);
        assert_eq!(
            cache.mint_counts(),
            MintCounts {
                background: 1,
                ..Default::default()
            }
        );
    }

    /// Each thread keeps a copy of the token: a refresh reaches every thread's next request,
    /// and two caches on one thread never hand out each other's token.
    #[test]
    fn thread_copies_follow_the_cache_they_came_from() {
        let clock = ManualClock::at(T0);
        let ours = cache(clock.clone());
        let theirs = TokenCache::new(Signer::new("other", b"other"), settings(), clock.clone());
        let first = ours.authorization();
        assert_ne!(theirs.authorization(), first);
        assert_eq!(ours.authorization(), first);

        let other_thread = std::thread::scope(|s| s.spawn(|| ours.authorization()).join());
        assert_eq!(other_thread.unwrap(), first);

        clock.advance(Duration::from_secs(40));
        assert!(ours.refresh_if_due());
        let refreshed = ours.authorization();
        assert_ne!(refreshed, first);
        assert_eq!(claims_of(&refreshed).iat, T0 + 40 - 5);
        let other_thread = std::thread::scope(|s| s.spawn(|| ours.authorization()).join());
        assert_eq!(other_thread.unwrap(), refreshed);
    }

    #[test]
    fn refresh_is_scheduled_refresh_before_ahead_of_exp() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        // exp = T0 + 55, so the refresh is due at T0 + 40.
        assert_eq!(cache.refresh_due_in(), Duration::from_secs(40));
        clock.advance(Duration::from_millis(39_999));
        assert_eq!(cache.refresh_due_in(), Duration::from_millis(1));
        assert!(!cache.refresh_if_due());

        clock.advance(Duration::from_millis(1));
        assert!(cache.refresh_if_due());
        assert_eq!(cache.claims().exp, T0 + 40 + 55);
        assert_eq!(cache.refresh_due_in(), Duration::from_secs(40));
        assert_eq!(
            cache.mint_counts(),
            MintCounts {
                background: 2,
                ..Default::default()
            }
        );
    }

    /// The invariant: whatever the refresher does, no token leaves with less than `margin`.
    #[test]
    fn request_path_never_returns_a_token_inside_the_margin() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let margin = settings().margin;
        // The refresher never runs; walk time through three lifetimes in 250 ms steps.
        for _ in 0..(3 * 60 * 4) {
            clock.advance(Duration::from_millis(250));
            let now = clock.now();
            let value = cache.authorization();
            assert!(
                remaining(&value, now) >= margin,
                "at {now:?}: {:?}",
                claims_of(&value)
            );
            assert!(Duration::from_secs(claims_of(&value).nbf) <= now);
        }
        // Each inline mint lasts exp - margin - now = 55 - 5 = 50 s of the 180 s walked.
        assert_eq!(cache.mint_counts().inline, 3);
    }

    /// `margin` alone ends a token's use; `backdate` moves only its start (distinct values here,
    /// unlike `settings()`, so that the two cannot stand in for each other).
    #[test]
    fn the_margin_not_the_backdate_ends_a_tokens_use() {
        let clock = ManualClock::at(T0);
        let settings = TokenSettings {
            margin: Duration::from_secs(10),
            backdate: Duration::from_secs(2),
            ..settings()
        };
        let cache = TokenCache::new(Signer::new("kid", b"secret"), settings, clock.clone());
        let first = cache.authorization();
        // exp = T0 - 2 + 60: usable until exp - margin = T0 + 48.
        clock.set(Duration::from_secs(T0 + 48) - Duration::from_millis(1));
        assert_eq!(cache.authorization(), first);
        assert!(cache.is_fresh());
        clock.set(Duration::from_secs(T0 + 48));
        assert!(!cache.is_fresh());
        assert_ne!(cache.authorization(), first);
        assert_eq!(cache.mint_counts().inline, 1);
    }

    #[test]
    fn a_suspended_process_mints_a_fresh_token_on_its_first_request() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        clock.advance(Duration::from_secs(3600));
        let value = cache.authorization();
        assert_eq!(claims_of(&value).iat, T0 + 3600 - 5);
        assert_eq!(cache.mint_counts().inline, 1);
        // The refresher, when it finally runs, has nothing to do.
        assert!(!cache.refresh_if_due());
    }

    #[test]
    fn a_clock_stepped_back_gets_a_token_that_is_already_valid() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        clock.set(Duration::from_secs(T0 - 600));
        assert_eq!(cache.refresh_due_in(), Duration::ZERO);
        let value = cache.authorization();
        assert_eq!(claims_of(&value).nbf, T0 - 605);
    }

    #[test]
    fn concurrent_stale_requests_sign_once() {
        let clock = ManualClock::at(T0);
        let cache = Arc::new(cache(clock.clone()));
        clock.advance(Duration::from_secs(51));
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let values: Vec<HeaderValue> = (0..threads)
            .map(|_| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.authorization()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(cache.mint_counts().inline, 1);
        assert!(values.iter().all(|v| *v == values[0]));
        assert_eq!(claims_of(&values[0]).iat, T0 + 51 - 5);
    }

    /// The refresher itself, on tokio's paused clock: the wall clock follows tokio's.
    #[tokio::test(start_paused = true)]
    async fn background_refresher_keeps_the_request_path_from_signing() {
        struct TokioClock(tokio::time::Instant);
        impl Clock for TokioClock {
            fn now(&self) -> Duration {
                Duration::from_secs(T0) + self.0.elapsed()
            }
        }
        let clock = Arc::new(TokioClock(tokio::time::Instant::now()));
        let cache = Arc::new(TokenCache::new(
            Signer::new("kid", b"s"),
            settings(),
            clock.clone(),
        ));
        tokio::spawn(cache.clone().run_refresher());

        for _ in 0..3610 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let value = cache.authorization();
            assert!(
                remaining(&value, clock.now()) > settings().refresh_before - Duration::from_secs(1)
            );
        }
        // One mint at start, then one every 40 s (exp - refresh_before - iat - backdate).
        assert_eq!(
            cache.mint_counts(),
            MintCounts {
                background: 1 + 3610 / 40,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_rejected_token_is_replaced_once() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let rejected = cache.authorization();
        clock.advance(Duration::from_secs(1));
        let retry = cache.reject(&rejected);
        assert_ne!(retry, rejected);
        assert_eq!(cache.authorization(), retry);
        // Concurrent requests that were refused the same old token share the new one.
        assert_eq!(cache.reject(&rejected), retry);
        assert_eq!(cache.mint_counts().reauth, 1);
    }

    #[test]
    fn a_token_rejected_within_its_first_second_is_still_replaced_by_another() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let rejected = cache.authorization();
        let retry = cache.reject(&rejected);
        assert_ne!(retry, rejected);
        let (old, new) = (claims_of(&rejected), claims_of(&retry));
        assert_eq!(new.iat, old.iat - 1);
        assert!(Duration::from_secs(new.nbf) <= clock.now());
    }

    #[test]
    fn a_new_signer_is_used_at_once() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        let old = cache.authorization();
        cache.replace_signer(Signer::new("kid-2", b"secret-2"));
        let new = cache.authorization();
        assert_ne!(new, old);
        let expected = Signer::new("kid-2", b"secret-2").sign(claims_of(&new));
        assert_eq!(new.to_str().unwrap(), format!("Bearer {expected}"));
        assert_eq!(cache.mint_counts().rotation, 1);
    }

    #[test]
    fn freshness_and_expiry_follow_the_clock() {
        let clock = ManualClock::at(T0);
        let cache = cache(clock.clone());
        assert!(cache.is_fresh());
        assert_eq!(cache.seconds_until_expiry(), 55);
        clock.advance(Duration::from_secs(50));
        assert!(!cache.is_fresh(), "inside the margin");
        assert_eq!(cache.seconds_until_expiry(), 5);
    }
}
