//! The rate limiter through real components: the real binary, the TLS upstream recording when
//! requests arrive, and a real `redis-server` (see `support::RedisServer`).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use idmatch_mock::server::{full, json};
use idmatch_mock::TestPki;
use serde_json::json;
use support::*;

const INTERVAL: Duration = Duration::from_millis(200);
/// Slots are exact on each proxy's clock (the store's, shared); arrivals at the upstream also
/// carry what delays each request on its way after its timer fired (the scheduler of this
/// 2-core VM, shared with the tests' other processes; a Redis reply's trip back). A request
/// that leaves late comes closer to the next: 0.2 ms on an idle machine, up to 16 ms measured
/// during a release build on both cores. The length of a burst is checked exactly instead.
const JITTER: Duration = Duration::from_millis(30);

fn ok(_: usize) -> Response<idmatch_mock::server::Body> {
    json(StatusCode::OK, json!({"ok": true}))
}

fn paced(config: ProxyConfig, interval: &str, max_wait: &str) -> ProxyConfig {
    config
        .set("IDMATCH_RATE_LIMIT_INTERVAL", interval)
        .set("IDMATCH_RATE_LIMIT_MAX_WAIT", max_wait)
}

/// A POST from `client` (named in `x-client`, which the upstream records).
async fn call(url: String, client: &'static str) -> Answer {
    let mut request = post_json(&url, json!({"phoneNumber": "+31610000001"}));
    request
        .headers_mut()
        .insert("x-client", client.parse().unwrap());
    send(&http1(), request).await
}

async fn burst(urls: &[(String, &'static str)], per_url: usize) -> Vec<Answer> {
    let mut tasks = tokio::task::JoinSet::new();
    for (url, client) in urls {
        for _ in 0..per_url {
            tasks.spawn(call(url.clone(), client));
        }
    }
    tasks.join_all().await
}

/// Two replicas, as the real binary, sharing one Redis with a password.
struct Replicas {
    a: Binary,
    b: Binary,
    _password: tempfile::NamedTempFile,
}

fn replicas(config: &ProxyConfig, redis: &RedisServer, extra: &[(&str, &str)]) -> Replicas {
    let password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password.path(), "redis-pass-never-logged\n").unwrap();
    let mut env: HashMap<String, String> = config.env.clone();
    for (key, value) in [
        ("IDMATCH_RATE_LIMIT_REDIS_URL", redis.url().as_str()),
        (
            "IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE",
            password.path().to_str().unwrap(),
        ),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        env.insert(key.to_owned(), value.to_owned());
    }
    Replicas {
        a: Binary::serve(&env),
        b: Binary::serve(&env),
        _password: password,
    }
}

async fn backend(admin: std::net::SocketAddr, which: &str) -> f64 {
    let sample = format!("idmatch_proxy_rate_limit_backend{{backend=\"{which}\"}}");
    scrape(admin, &sample).await
}

fn assert_spaced(times: &[Instant], at_least: Duration) {
    let gap = min_gap(times);
    eprintln!("closest arrivals: {gap:?} apart (slots {at_least:?})");
    assert!(
        gap + JITTER >= at_least,
        "requests {gap:?} apart, expected at least {at_least:?}: {:?}",
        times.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_space_a_concurrent_burst() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let redis = RedisServer::start_with_password(Some("redis-pass-never-logged"));
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "10s");
    let mut replicas = replicas(&config, &redis, &[]);
    let urls = [
        (replicas.a.url("/sim-swap"), "a"),
        (replicas.b.url("/sim-swap"), "b"),
    ];
    // Connections to the upstream first, so that no TLS handshake delays one request of the
    // burst and crowds it onto the next.
    burst(&urls, 1).await;
    arrivals.reached(2).await;
    let warm = arrivals.count();

    let started = Instant::now();
    let answers = burst(&urls, 6).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let times = arrivals.times()[warm..].to_vec();
    assert_eq!(times.len(), 12);
    assert_spaced(&times, INTERVAL);
    // No request leaves before its slot, so lateness cannot shorten the whole burst: twelve
    // slots take eleven intervals, exactly.
    assert!(
        started.elapsed() >= INTERVAL * 11,
        "{:?}",
        started.elapsed()
    );
    assert!(!arrivals.times_of("a").is_empty() && !arrivals.times_of("b").is_empty());
    assert_eq!(backend(replicas.a.admin, "shared").await, 1.0);

    // The wait shows in the access log; the password nowhere.
    let (_, logs_a) = {
        replicas.a.signal("TERM");
        replicas.a.finish(Duration::from_secs(10))
    };
    let waited = logs_a
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|event| event["paced_ms"].as_f64())
        .fold(0.0, f64::max);
    assert!(waited >= 500.0, "the longest wait was {waited} ms");
    assert!(logs_a.iter().all(|line| !line.contains("redis-pass")));
}

#[tokio::test]
async fn a_slot_beyond_max_wait_is_refused_at_once_with_retry_after() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "1s", "1500ms");
    let proxy = Proxy::start(&config).await;
    let url = proxy.url("/sim-swap");
    // Slots now and in 1s; the third would be 2s away.
    let first = call(url.clone(), "x").await;
    assert_eq!(first.status, StatusCode::OK);
    let second = tokio::spawn(call(url.clone(), "x"));
    // The second holds the 1s slot (it waits for it) before the third asks.
    let admin = proxy.admin;
    eventually(
        Duration::from_secs(5),
        "one request queued",
        || async move { scrape(admin, "idmatch_proxy_rate_limit_queued").await == 1.0 },
    )
    .await;
    let started = Instant::now();
    let refused = call(url.clone(), "x").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(started.elapsed() < Duration::from_millis(200), "at once");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(
        refused.headers["proxy-status"],
        "idmatch-proxy; error=http_request_denied"
    );
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rate_limit.max_wait"));
    assert_eq!(second.await.unwrap().status, StatusCode::OK);
    assert_eq!(arrivals.count(), 2, "the refused request never left");
    let sample = "idmatch_proxy_rate_limit_refusals_total{cause=\"wait_bound\"}";
    assert_eq!(scrape(proxy.admin, sample).await, 1.0);
}

#[tokio::test]
async fn an_upstream_429_pushes_the_slot_back_and_is_replayed_once_within_max_wait() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, |n| {
        let mut response = json(StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow down"}));
        response.headers_mut().insert(
            "retry-after",
            if n == 0 { "1" } else { "30" }.parse().unwrap(),
        );
        if n == 1 {
            return ok(n);
        }
        response
    })
    .await;
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s");
    let proxy = Proxy::start(&config).await;

    // Refused once with Retry-After: 1, replayed a second later, answered.
    let answer = call(proxy.url("/sim-swap"), "x").await;
    assert_eq!(answer.status, StatusCode::OK);
    let times = arrivals.times();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] + JITTER >= Duration::from_secs(1));

    // Refused with Retry-After: 30, beyond max_wait: the upstream's 429 is the answer, as is.
    let answer = call(proxy.url("/sim-swap"), "x").await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers["retry-after"], "30");
    assert!(!answer.headers.contains_key("proxy-status"));
    assert_eq!(answer.json()["error"], "slow down");
    assert_eq!(arrivals.count(), 3, "not replayed");
    // And the next request is refused by the proxy itself, without reaching the upstream.
    let answer = call(proxy.url("/sim-swap"), "x").await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(answer.headers.contains_key("proxy-status"));
    assert_eq!(arrivals.count(), 3);
    let refusals =
        |cause: &str| format!("idmatch_proxy_rate_limit_refusals_total{{cause=\"{cause}\"}}");
    assert_eq!(scrape(proxy.admin, &refusals("upstream")).await, 1.0);
    assert_eq!(scrape(proxy.admin, &refusals("wait_bound")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_holds_back_every_replica_through_redis() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, |n| match n {
        0 => {
            let mut response = json(StatusCode::TOO_MANY_REQUESTS, json!({}));
            response
                .headers_mut()
                .insert("retry-after", "2".parse().unwrap());
            response
        }
        _ => ok(n),
    })
    .await;
    let redis = RedisServer::start_with_password(Some("redis-pass-never-logged"));
    // Streamed bodies (no replay buffer): the 429 reaches the client, only the push-back stays.
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s")
        .set("IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES", "0");
    let replicas = replicas(&config, &redis, &[]);
    let refused = call(replicas.a.url("/sim-swap"), "a").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let answer = call(replicas.b.url("/sim-swap"), "b").await;
    assert_eq!(answer.status, StatusCode::OK);
    let times = arrivals.times();
    assert!(
        times[1] - times[0] + JITTER >= Duration::from_secs(2),
        "the other replica waited {:?}",
        times[1] - times[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_burst_falls_back_to_local_pacing_and_comes_back() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let mut redis = RedisServer::start_with_password(Some("redis-pass-never-logged"));
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "10s");
    let replicas = replicas(
        &config,
        &redis,
        &[
            ("IDMATCH_RATE_LIMIT_REPLICAS", "2"),
            ("IDMATCH_RATE_LIMIT_REDIS_TIMEOUT", "100ms"),
        ],
    );
    // Each client calls one after the other; Redis dies once four requests have arrived. Eight
    // each leave several after the kill even when this test's own thread is starved for a while.
    let closed_loop = |url: String, client: &'static str| async move {
        let mut statuses = Vec::new();
        for _ in 0..8 {
            statuses.push(call(url.clone(), client).await.status);
        }
        statuses
    };
    let loop_a = tokio::spawn(closed_loop(replicas.a.url("/sim-swap"), "a"));
    let loop_b = tokio::spawn(closed_loop(replicas.b.url("/sim-swap"), "b"));
    arrivals.reached(4).await;
    redis.kill();
    let killed = Instant::now();
    let statuses = [loop_a.await.unwrap(), loop_b.await.unwrap()].concat();
    assert_eq!(
        statuses,
        [StatusCode::OK; 16],
        "every request answered, none refused"
    );
    for (client, admin) in [("a", replicas.a.admin), ("b", replicas.b.admin)] {
        // The first after the kill may hold a slot Redis gave before it died; from then on each
        // replica paces alone at interval × replicas.
        let after: Vec<_> = arrivals
            .times_of(client)
            .into_iter()
            .filter(|t| *t > killed)
            .skip(1)
            .collect();
        assert!(
            after.len() >= 2,
            "{client}: {} requests after the kill",
            after.len()
        );
        assert_spaced(&after, INTERVAL * 2);
        assert_eq!(backend(admin, "fallback").await, 1.0, "{client}");
        let errors = scrape(admin, "idmatch_proxy_rate_limit_redis_errors_total").await;
        assert!(errors >= 1.0, "{client}: {errors}");
    }

    // Back within a few seconds of Redis, without a restart, and sharing again.
    redis.restart();
    for admin in [replicas.a.admin, replicas.b.admin] {
        eventually(Duration::from_secs(5), "sharing again", || async move {
            backend(admin, "shared").await == 1.0
        })
        .await;
    }
    let before = arrivals.count();
    let urls = [
        (replicas.a.url("/sim-swap"), "a"),
        (replicas.b.url("/sim-swap"), "b"),
    ];
    let answers = burst(&urls, 4).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_spaced(&arrivals.times()[before..], INTERVAL);
}

#[tokio::test]
async fn zero_interval_leaves_requests_unpaced() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "0s", "5s");
    let proxy = Proxy::start(&config).await;
    let started = Instant::now();
    let answers = burst(&[(proxy.url("/sim-swap"), "x")], 10).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(arrivals.count(), 10);
    // Ten at 1 s apart would take 9 s; unpaced they take a few milliseconds.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let sample = "idmatch_proxy_rate_limit_backend{backend=\"local\"}";
    assert_eq!(scrape(proxy.admin, sample).await, 0.0, "no limiter at all");
}

/// Once a freshly minted token is refused too, a 401 is not replayed: the credentials are
/// wrong, and each replay would spend a slot of the rate limit. A success ends that.
#[tokio::test]
async fn a_refused_fresh_token_stops_401_replays_until_a_request_succeeds() {
    let pki = TestPki::localhost();
    let accept = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepting = accept.clone();
    let (upstream, arrivals) = timed_upstream(&pki, move |_| {
        match accepting.load(std::sync::atomic::Ordering::SeqCst) {
            true => ok(0),
            false => {
                let mut response = Response::new(full("{}"));
                *response.status_mut() = StatusCode::UNAUTHORIZED;
                response
            }
        }
    })
    .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let url = proxy.url("/sim-swap");
    let refused = "idmatch_proxy_credentials_refused";

    assert_eq!(
        call(url.clone(), "x").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(arrivals.count(), 2, "replayed once with a fresh token");
    assert_eq!(scrape(proxy.admin, refused).await, 1.0);
    for expected in [3, 4] {
        assert_eq!(
            call(url.clone(), "x").await.status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(arrivals.count(), expected, "not replayed");
    }
    let skipped = "idmatch_proxy_unauthorized_replays_skipped_total";
    assert_eq!(scrape(proxy.admin, skipped).await, 2.0);

    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(url.clone(), "x").await.status, StatusCode::OK);
    assert_eq!(scrape(proxy.admin, refused).await, 0.0);
    accept.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        call(url.clone(), "x").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(arrivals.count(), 7, "replayed again");
}

/// A 401's replay is a request like any other: it waits for a slot of its own.
#[tokio::test]
async fn a_401_replay_waits_for_its_own_slot() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, |n| match n {
        0 => {
            let mut response = Response::new(full("{}"));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        }
        _ => ok(n),
    })
    .await;
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s");
    let proxy = Proxy::start(&config).await;
    assert_eq!(
        call(proxy.url("/sim-swap"), "x").await.status,
        StatusCode::OK
    );
    assert_spaced(&arrivals.times(), INTERVAL);
}

/// The shared budget is the credential's: a rotated key id reserves under its own key.
#[tokio::test]
async fn a_rotated_key_id_reserves_in_its_own_budget() {
    use idmatch_proxy::pace::redis::key_for;

    let pki = TestPki::localhost();
    let (upstream, _) = timed_upstream(&pki, ok).await;
    let redis = RedisServer::start();
    let key_id_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_id_file.path(), "old-key-id").unwrap();
    let mut config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s")
        .set("IDMATCH_RATE_LIMIT_REDIS_URL", &redis.url())
        .set("IDMATCH_KEY_ID_FILE", key_id_file.path().to_str().unwrap())
        .set("IDMATCH_CREDENTIALS_RELOAD_INTERVAL", "50ms");
    config.env.remove("IDMATCH_KEY_ID");
    let proxy = Proxy::start(&config).await;
    let store = redis::Client::open(redis.url()).unwrap();
    let mut store = store.get_multiplexed_async_connection().await.unwrap();
    let mut exists = async |key_id: &str| -> bool {
        redis::cmd("EXISTS")
            .arg(key_for(key_id))
            .query_async(&mut store)
            .await
            .unwrap()
    };

    assert_eq!(
        call(proxy.url("/sim-swap"), "x").await.status,
        StatusCode::OK
    );
    assert!(exists("old-key-id").await);
    assert!(!exists("new-key-id").await);

    std::fs::write(key_id_file.path(), "new-key-id").unwrap();
    let reloads = "idmatch_proxy_credential_reloads_total{outcome=\"success\"}";
    while scrape(proxy.admin, reloads).await < 1.0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        call(proxy.url("/sim-swap"), "x").await.status,
        StatusCode::OK
    );
    assert!(exists("new-key-id").await);
}

/// Redis unreachable from the start: the proxy starts, is ready, paces alone, and says so once.
#[tokio::test]
async fn an_unreachable_redis_at_start_is_not_fatal_and_logged_once() {
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let closed = refusing_port();
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s")
        .set(
            "IDMATCH_RATE_LIMIT_REDIS_URL",
            &format!("redis://{}", closed.addr),
        )
        .set("RUST_LOG", "info");
    let mut proxy = Binary::serve(&config.env);
    let ready = send(&http1(), get(&format!("http://{}/readyz", proxy.admin))).await;
    assert_eq!(ready.status, StatusCode::OK, "readiness never asks Redis");
    let answers = burst(&[(proxy.url("/sim-swap"), "x")], 3).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_spaced(&arrivals.times(), INTERVAL);
    assert_eq!(backend(proxy.admin, "fallback").await, 1.0);
    proxy.signal("TERM");
    let (_, logs) = proxy.finish(Duration::from_secs(10));
    let warnings = logs
        .iter()
        .filter(|line| line.contains("the Redis store failed"))
        .count();
    assert_eq!(warnings, 1, "{logs:#?}");
}

/// `rediss://` with a private CA: the store's certificate is checked against
/// `rate_limit.redis_ca_file`, and pacing is shared over TLS.
#[tokio::test]
async fn a_tls_store_with_a_private_ca_is_shared() {
    let (cert, key, ca) = redis_certificates();
    let redis = RedisServer::start_tls(&cert, &key, &ca);
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca).unwrap();
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "200ms", "5s")
        .set("IDMATCH_RATE_LIMIT_REDIS_URL", &redis.url())
        .set(
            "IDMATCH_RATE_LIMIT_REDIS_CA_FILE",
            ca_file.path().to_str().unwrap(),
        );
    let proxy = Proxy::start(&config).await;
    let answers = burst(&[(proxy.url("/sim-swap"), "x")], 3).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_spaced(&arrivals.times(), INTERVAL);
    assert_eq!(backend(proxy.admin, "shared").await, 1.0);
    assert_eq!(
        scrape(proxy.admin, "idmatch_proxy_rate_limit_redis_errors_total").await,
        0.0
    );

    // Another CA: the handshake fails, and the replica paces alone rather than unpaced.
    let (_, _, other_ca) = redis_certificates();
    std::fs::write(ca_file.path(), &other_ca).unwrap();
    let proxy = Proxy::start(&config).await;
    assert_eq!(
        call(proxy.url("/sim-swap"), "x").await.status,
        StatusCode::OK
    );
    assert_eq!(backend(proxy.admin, "fallback").await, 1.0);
}

/// A CA, and a certificate and key for localhost signed by it, in PEM.
fn redis_certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (cert.pem(), key.serialize_pem(), ca.pem())
}

/// A client that goes away while its slot's reservation is on its way to Redis (held there by
/// stopping the server, for less than `redis_timeout`): the slot the store then reserves is given
/// back all the same, and the next request gets it.
#[tokio::test]
async fn a_client_gone_during_the_reservation_round_trip_gives_the_store_slot_back() {
    let redis = RedisServer::start();
    let pki = TestPki::localhost();
    let (upstream, arrivals) = timed_upstream(&pki, ok).await;
    let config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "1s", "5s")
        .set("IDMATCH_RATE_LIMIT_REDIS_URL", &redis.url())
        .set("IDMATCH_RATE_LIMIT_REDIS_TIMEOUT", "5s");
    let proxy = Proxy::start(&config).await;
    let url = proxy.url("/sim-swap");
    assert_eq!(call(url.clone(), "x").await.status, StatusCode::OK);
    let started = Instant::now();
    redis.pause();
    let gone = tokio::spawn(call(url.clone(), "gone"));
    let queued = "idmatch_proxy_rate_limit_queued";
    eventually(Duration::from_secs(5), "the request queued", || async {
        scrape(proxy.admin, queued).await == 1.0
    })
    .await;
    gone.abort();
    // The proxy has dropped the request; its reservation is still unanswered.
    eventually(Duration::from_secs(5), "the request dropped", || async {
        scrape(proxy.admin, queued).await == 0.0
    })
    .await;
    redis.resume();
    the_slot_given_back_goes_to_the_next(&proxy, started, &arrivals, "").await;
}

/// A client that goes away while it waits never sends; its slot, the last one, goes to the
/// next request: kept in the process, and in Redis, whose script gives it back.
#[tokio::test]
async fn a_client_gone_while_waiting_never_sends_and_its_slot_is_given_back() {
    let redis = RedisServer::start();
    for store in [None, Some(redis.url())] {
        let pki = TestPki::localhost();
        let (upstream, arrivals) = timed_upstream(&pki, ok).await;
        let mut config = paced(ProxyConfig::new(&upstream.url(BASE), &pki), "1s", "5s");
        if let Some(url) = &store {
            config = config.set("IDMATCH_RATE_LIMIT_REDIS_URL", url);
        }
        let proxy = Proxy::start(&config).await;
        let url = proxy.url("/sim-swap");
        assert_eq!(call(url.clone(), "x").await.status, StatusCode::OK);
        let started = Instant::now();
        let gone = tokio::spawn(call(url.clone(), "gone"));
        let queued = "idmatch_proxy_rate_limit_queued";
        while scrape(proxy.admin, queued).await != 1.0 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        the_slot_given_back_goes_to_the_next(&proxy, started, &arrivals, &format!("{store:?}"))
            .await;
    }
}

/// After the client of the request for the 1 s slot went away (`started`: just before it
/// asked): the slot is given back before the next request reserves (the store's release is a
/// script of its own), the next gets it rather than the 2 s one after it, and the one that went
/// away never reached the upstream.
async fn the_slot_given_back_goes_to_the_next(
    proxy: &Proxy,
    started: Instant,
    arrivals: &Arrivals,
    context: &str,
) {
    let given_back = "idmatch_proxy_rate_limit_abandoned_slots_total{outcome=\"given_back\"}";
    eventually(Duration::from_secs(5), "the slot given back", || async {
        scrape(proxy.admin, given_back).await == 1.0
    })
    .await;
    let next = call(proxy.url("/sim-swap"), "next").await;
    assert_eq!(next.status, StatusCode::OK, "{context}");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{context}: {:?}",
        started.elapsed()
    );
    assert!(arrivals.times_of("gone").is_empty(), "{context}");
    assert_eq!(arrivals.count(), 2, "{context}");
}
