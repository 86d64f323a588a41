//! Micro benchmarks of the per-token and per-request work, with criterion.
//!
//! `cargo bench --bench micro` (see benches/README.md for the targets and the latest results).
//!
//! - `token/sign`: [`Signer::sign`], the HS256 signature alone.
//! - `token/mint`: what a refresh costs: sign, then build the `Bearer` header value the way
//!   the cache does (format, validate, mark sensitive).
//! - `request/authorization`: [`TokenCache::authorization`] exactly as the proxy calls it on
//!   every request: a coarse wall-clock read, the cache's generation number, the thread's own
//!   copy of the `HeaderValue` cloned (a reference-count increment) and dropped;
//!   `request/authorization/obtain` leaves the drop out of the timing.
//! - `response/remove_hop_by_hop/nginx`: [`headers::remove_hop_by_hop`] on a response head as
//!   nginx sends it, ending with `Connection: keep-alive`.
//! - `floor/*`: the parts of `request/authorization` on their own (the precise and the coarse
//!   wall-clock read, an `ArcSwap` load, a shared `HeaderValue` clone and drop), to tell what
//!   the machine allows.
//! - `request/rewrite/*`: [`headers::rewrite_request`] on a typical request head, then the
//!   upstream's `Host` put in place of the client's, as the pool does for HTTP/1.1. Python's
//!   `requests` and Java's `HttpClient` add `Connection: keep-alive` before other fields, so
//!   the map is rebuilt to keep the order of the rest; curl's head needs no rebuild.
//! - `pace/empty_queue/{0s,1s}`: what the rate limiter costs a request that finds no other
//!   waiting, with the limiter off (`0s`: the proxy's `Option` check) and on (`1s`: queue
//!   count, reservation, the due check that needs no timer, the wait histogram). Both run the
//!   same harness (a paused tokio clock moved on by a second, so that every request finds the
//!   credential idle): the difference between the two is the limiter's cost.
//! - `pace/redis/*`: reservations against one local `redis-server` (the script, one round trip
//!   each), one at a time and 32 in flight; criterion's time per reservation is the inverse of
//!   reservations per second. Skipped, saying so, without `redis-server`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use idmatch_proxy::config::TokenSettings;
use idmatch_proxy::headers;
use idmatch_proxy::token::{claims_at, Clock, Signer, SystemClock, TokenCache};

// For its redis-server.
#[path = "../tests/support/mod.rs"]
mod support;

/// CM.com's documentation example: a UUID key id and a 54-character secret.
const KEY_ID: &str = "3b438437-04a4-40bb-8389-54bb02766fba";
const SECRET: &[u8] = b"AC4Etykn7jusGR5FwLDAtILtQbiQbTMKedP31szXg4WlSbjGEXyNMZ";

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
}

fn token(c: &mut Criterion) {
    let signer = Signer::new(KEY_ID, SECRET);
    let claims = claims_at(&TokenSettings::default(), now());
    let mut group = c.benchmark_group("token");
    group.bench_function("sign", |b| b.iter(|| signer.sign(black_box(claims))));
    group.bench_function("mint", |b| {
        b.iter(|| {
            let token = signer.sign(black_box(claims));
            let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                .expect("base64url and dots are valid header bytes");
            value.set_sensitive(true);
            value
        })
    });
    group.finish();
}

/// Request heads as clients send them to `POST /sim-swap`, in the order they send them.
fn head(client: &str) -> HeaderMap {
    let fields: &[(&str, &str)] = match client {
        "curl" => &[
            ("host", "127.0.0.1:8080"),
            ("user-agent", "curl/7.88.1"),
            ("accept", "*/*"),
            ("content-type", "application/json"),
            ("content-length", "51"),
        ],
        _ => &[
            ("host", "127.0.0.1:8080"),
            ("user-agent", "python-requests/2.31.0"),
            ("accept-encoding", "gzip, deflate"),
            ("accept", "*/*"),
            ("connection", "keep-alive"),
            ("content-type", "application/json"),
            ("content-length", "51"),
        ],
    };
    let mut map = HeaderMap::with_capacity(fields.len() + 2);
    for (name, value) in fields {
        map.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    // What the observer adds before the proxy sees the request.
    map.insert(
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_static("6f1c2d3e4f5a6b7c0000000000000001"),
    );
    map
}

fn request(c: &mut Criterion) {
    let cache = TokenCache::new(
        Signer::new(KEY_ID, SECRET),
        TokenSettings::default(),
        Arc::new(SystemClock),
    );
    let mut group = c.benchmark_group("request");
    group.bench_function("authorization", |b| b.iter(|| cache.authorization()));
    // The same, with the values dropped outside the timing: what obtaining the value costs,
    // apart from its release (a reference-count decrement when hyper drops the sent head).
    group.bench_function("authorization/obtain", |b| {
        b.iter_with_large_drop(|| cache.authorization())
    });
    let upstream_host = HeaderValue::from_static("api.cm.com");
    for client in ["curl", "python-requests"] {
        let authorization = cache.authorization();
        group.bench_function(format!("rewrite/{client}"), |b| {
            b.iter_batched_ref(
                || head(client),
                |headers| {
                    headers::rewrite_request(headers, authorization.clone());
                    headers.insert(http::header::HOST, upstream_host.clone());
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    let mut group = c.benchmark_group("response");
    group.bench_function("remove_hop_by_hop/nginx", |b| {
        b.iter_batched_ref(
            || {
                let mut map = HeaderMap::with_capacity(8);
                for (name, value) in [
                    ("server", "nginx/1.22.1"),
                    ("date", "Tue, 25 Nov 2026 21:00:00 GMT"),
                    ("content-type", "application/json"),
                    ("content-length", "70"),
                    ("connection", "keep-alive"),
                ] {
                    map.append(
                        HeaderName::from_static(name),
                        HeaderValue::from_static(value),
                    );
                }
                map
            },
            headers::remove_hop_by_hop,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The parts of `authorization()`, alone: its cost cannot go below their sum.
fn floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    group.bench_function("system_time_now", |b| b.iter(SystemTime::now));
    group.bench_function("system_clock", |b| b.iter(|| SystemClock.now()));
    let swap = arc_swap::ArcSwap::from_pointee(now());
    group.bench_function("arc_swap_load", |b| b.iter(|| **swap.load()));
    let mut value = HeaderValue::try_from(format!("Bearer {}", "x".repeat(200))).unwrap();
    value.set_sensitive(true);
    let shared = value.clone();
    group.bench_function("header_value_clone", |b| b.iter(|| shared.clone()));
    group.finish();
}

fn pace(c: &mut Criterion) {
    use idmatch_proxy::metrics::Metrics;
    use idmatch_proxy::pace::Pacer;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pace/empty_queue");
    for interval in ["0s", "1s"] {
        let settings = rate_limit(interval);
        let pacer =
            runtime.block_on(async { Pacer::new(&settings, KEY_ID, Arc::new(Metrics::new())) });
        group.bench_function(interval, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    tokio::time::advance(Duration::from_secs(1)).await;
                    // As the proxy's request path asks.
                    match &pacer {
                        Some(pacer) => pacer.wait_turn().await.unwrap(),
                        None => Duration::ZERO,
                    }
                })
            })
        });
    }
    group.finish();

    let Some(_) = support::RedisServer::program() else {
        println!(
            "pace/redis: skipped: redis-server is not installed (apt-get install redis-server)"
        );
        return;
    };
    let redis = support::RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut settings = rate_limit("1s");
    settings.redis = Some(idmatch_proxy::config::Redis {
        connection: redis::IntoConnectionInfo::into_connection_info(redis.url().as_str()).unwrap(),
        url: redis.url(),
        password_file: None,
        ca: None,
    });
    // Slots a microsecond apart, and room for all of them: every reservation succeeds.
    let store = runtime.block_on(async {
        idmatch_proxy::pace::redis::Store::new(
            settings.redis.as_ref().unwrap(),
            KEY_ID,
            Duration::from_micros(1),
            Duration::from_secs(1),
        )
        .unwrap()
    });
    let store = Arc::new(store);
    let max_wait = Duration::from_secs(24 * 3600);
    let mut group = c.benchmark_group("pace/redis");
    for in_flight in [1_u64, 32] {
        group.bench_function(format!("reserve/{in_flight}_in_flight"), |b| {
            b.iter_custom(|iters| {
                let store = store.clone();
                runtime.block_on(async move {
                    let started = std::time::Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for task in 0..in_flight {
                        let store = store.clone();
                        // `iters` reservations in all, spread over the tasks.
                        let share = iters / in_flight + u64::from(task < iters % in_flight);
                        tasks.spawn(async move {
                            for _ in 0..share {
                                store.reserve(max_wait).await.unwrap();
                            }
                        });
                    }
                    tasks.join_all().await;
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// The default `rate_limit` settings with `interval`.
fn rate_limit(interval: &str) -> idmatch_proxy::config::RateLimit {
    let env = [
        ("IDMATCH_KEY_ID", KEY_ID),
        ("IDMATCH_SECRET", "bench-secret"),
        ("IDMATCH_RATE_LIMIT_INTERVAL", interval),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    idmatch_proxy::config::Config::from_parts(None, &env)
        .unwrap()
        .config
        .rate_limit
}

criterion_group!(benches, token, request, floor, pace);
criterion_main!(benches);
