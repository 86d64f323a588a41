//! Running it: admin endpoints, metrics, request ids, access logs, limits, timeouts, drain.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use http::{Request, StatusCode};
use idmatch_mock::server::json;
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that answers 200 `{}` after `delay`.
async fn upstream_with_delay(pki: &TestPki, delay: Duration) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(move |_: Request<hyper::body::Incoming>| async move {
            tokio::time::sleep(delay).await;
            json(StatusCode::OK, json!({}))
        })
        .start()
        .await
}

async fn stack_with(
    delay: Duration,
    settings: &[(&str, &str)],
) -> (RunningServer, Proxy, ProxyConfig) {
    let pki = TestPki::localhost();
    let upstream = upstream_with_delay(&pki, delay).await;
    let mut config = ProxyConfig::new(&upstream.url(BASE), &pki);
    for (key, value) in settings {
        config = config.set(key, value);
    }
    let proxy = Proxy::start(&config).await;
    (upstream, proxy, config)
}

fn admin_url(proxy: &Proxy, path: &str) -> String {
    format!("http://{}{path}", proxy.admin)
}

/// Whether `/readyz` at `url` answers other than 200.
async fn not_ready(client: &HttpClient, url: &str) -> bool {
    send(client, get(url)).await.status != StatusCode::OK
}

#[tokio::test]
async fn livez_and_readyz_answer_without_calling_the_upstream() {
    let (upstream, proxy, _config) = stack_with(Duration::ZERO, &[]).await;
    let client = http1();
    let live = send(&client, get(&admin_url(&proxy, "/livez"))).await;
    assert_eq!(live.status, StatusCode::OK);
    let ready = send(&client, get(&admin_url(&proxy, "/readyz"))).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(
        send(&client, get(&admin_url(&proxy, "/nope"))).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(upstream.request_count(), 0);
    // The proxy port does not serve the admin endpoints: those paths go upstream like any other.
    send(&client, get(&proxy.url("/readyz"))).await;
    assert_eq!(upstream.requests()[0].target, format!("{BASE}/readyz"));
}

#[tokio::test]
async fn metrics_count_requests_errors_and_tokens_without_paths_or_secrets() {
    let (_upstream, proxy, _config) = stack_with(Duration::ZERO, &[]).await;
    let client = http1();
    for _ in 0..3 {
        let answer = send(
            &client,
            post_json(
                &proxy.url("/sim-swap?phoneNumber=%2B31610000001"),
                json!({}),
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let refused = send(
        &client,
        Request::trace(proxy.url("/x"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);

    let metrics = send(&client, get(&admin_url(&proxy, "/metrics"))).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for expected in [
        r#"idmatch_proxy_requests_total{method="POST",status_class="2xx"} 3"#,
        r#"idmatch_proxy_requests_total{method="other",status_class="4xx"} 1"#,
        r#"idmatch_proxy_proxy_errors_total{code="http_request_denied"} 1"#,
        r#"idmatch_proxy_request_duration_seconds_count 4"#,
        r#"idmatch_proxy_upstream_response_seconds_count 3"#,
        r#"idmatch_proxy_requests_in_flight 0"#,
        r#"idmatch_proxy_token_mints_total{trigger="background"} 1"#,
        r#"idmatch_proxy_token_mints_total{trigger="inline"} 0"#,
        r#"idmatch_proxy_build_info{version=""#,
        "# TYPE idmatch_proxy_token_expiry_seconds gauge",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let expiry: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("idmatch_proxy_token_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((45..=55).contains(&expiry), "{expiry}");
    for secret in ["sim-swap", "31610000001", SECRET, "Bearer", "eyJ"] {
        assert!(!text.contains(secret), "{secret:?} in metrics");
    }
}

#[tokio::test]
async fn connect_errors_are_counted_by_kind() {
    let pki = TestPki::localhost();
    let closed = refusing_port();
    let upstream = format!("https://{}{BASE}", closed.addr);
    let proxy = Proxy::start(&ProxyConfig::new(&upstream, &pki)).await;
    let client = http1();
    assert_eq!(
        send(&client, get(&proxy.url("/x"))).await.status,
        StatusCode::BAD_GATEWAY
    );
    let text = String::from_utf8(
        send(&client, get(&admin_url(&proxy, "/metrics")))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    // A bodiless request is replayable, so the refused connect is tried once more.
    let expected = [
        r#"idmatch_proxy_upstream_connect_errors_total{code="connection_refused"} 2"#,
        r#"idmatch_proxy_upstream_retries_total{reason="connect"} 1"#,
    ];
    for line in expected {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains(r#"idmatch_proxy_proxy_errors_total{code="connection_refused"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_travels_both_ways() {
    let (upstream, proxy, _config) = stack_with(Duration::ZERO, &[]).await;
    let client = http1();
    let mine = Request::get(proxy.url("/a"))
        .header("x-request-id", "client-chosen-1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(Default::default())
        .unwrap();
    let answer = send(&client, mine).await;
    assert_eq!(answer.headers["x-request-id"], "client-chosen-1");
    let generated = send(&client, get(&proxy.url("/b"))).await;
    let id = generated.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32);
    let other = send(&client, get(&proxy.url("/c"))).await;
    assert_ne!(other.headers["x-request-id"], id.as_str(), "ids are unique");

    let seen = upstream.requests();
    assert_eq!(seen[0].header("x-request-id").unwrap(), b"client-chosen-1");
    assert_eq!(
        seen[0].header("traceparent").unwrap(),
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen[0].header("tracestate").unwrap(), b"congo=t61rcWkgMzE");
    assert_eq!(seen[1].header("x-request-id").unwrap(), id.as_bytes());
}

#[tokio::test]
async fn beyond_max_in_flight_requests_get_an_immediate_503() {
    let (upstream, proxy, _config) = stack_with(
        Duration::from_millis(500),
        &[("IDMATCH_CLIENT_MAX_IN_FLIGHT", "2")],
    )
    .await;
    let client = http1();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), proxy.url("/slow"));
            tokio::spawn(async move { send(&client, get(&url)).await.status })
        })
        .collect();
    // Both slow requests are at the upstream before the third is sent.
    while upstream.request_count() < 2 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let third = send(&client, get(&proxy.url("/third"))).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "not queued: {:?}",
        started.elapsed()
    );
    assert_proxy_error(
        &third,
        StatusCode::SERVICE_UNAVAILABLE,
        "connection_limit_reached",
    );
    for task in slow {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    // The slots are free again.
    assert_eq!(
        send(&client, get(&proxy.url("/after"))).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.request_count(), 3);
}

/// Sends `requests` GETs at once over HTTP/1.1 and checks that every one
/// was answered 200.
async fn all_answered_ok(proxy: &Proxy, requests: usize) {
    let client = http1();
    let sent: Vec<_> = (0..requests)
        .map(|i| {
            let (client, url) = (client.clone(), proxy.url(&format!("/r{i}")));
            tokio::spawn(async move { send(&client, get(&url)).await.status })
        })
        .collect();
    for request in sent {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
}

#[tokio::test]
async fn upstream_max_in_flight_queues_the_rest_and_keeps_the_limit_full() {
    let pki = TestPki::localhost();
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (at_upstream, peak) = (now.clone(), most.clone());
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(move |_: Request<hyper::body::Incoming>| {
            let (now, most) = (at_upstream.clone(), peak.clone());
            async move {
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                json(StatusCode::OK, json!({}))
            }
        })
        .start()
        .await;
    let config =
        ProxyConfig::new(&upstream.url(BASE), &pki).set("IDMATCH_UPSTREAM_MAX_IN_FLIGHT", "2");
    let proxy = Proxy::start(&config).await;
    all_answered_ok(&proxy, 10).await;
    assert_eq!(upstream.request_count(), 10);
    // Never more than the limit, and the limit used: ten 50 ms requests, two at a time.
    assert_eq!(most.load(Ordering::SeqCst), 2);
    // One HTTP/2 connection carries them all.
    assert_eq!(upstream.connections_accepted(), 1);
}

/// What an upstream that speaks h2 offers, and one that speaks http/1.1 only.
const ALPNS: [&[&[u8]]; 2] = [&[b"h2", b"http/1.1"], &[b"http/1.1"]];

/// An upstream offering `alpn` that answers 200 `{}`.
async fn ok_upstream(pki: &TestPki, alpn: &[&[u8]]) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .alpn(alpn)
        .handler(|_: Request<hyper::body::Incoming>| async { json(StatusCode::OK, json!({})) })
        .start()
        .await
}

#[tokio::test]
async fn the_first_request_finds_a_connection_made_at_start() {
    for alpn in ALPNS {
        let pki = TestPki::localhost();
        let upstream = ok_upstream(&pki, alpn).await;
        let proxy = Proxy::start(&ProxyConfig::new(&upstream.url(BASE), &pki)).await;
        // Made in the background, with no request yet.
        eventually(Duration::from_secs(5), "a connection made at start", || {
            std::future::ready(upstream.connections_accepted() == 1)
        })
        .await;
        let client = http1();
        for path in ["/first", "/second"] {
            assert_eq!(
                send(&client, get(&proxy.url(path))).await.status,
                StatusCode::OK
            );
        }
        assert_eq!(upstream.connections_accepted(), 1, "{alpn:?}");
        assert_eq!(upstream.request_count(), 2);
    }
}

/// A burst of requests that all reach the upstream before any is answered, through a proxy
/// that has no connection yet; returns how many connections the upstream accepted.
async fn cold_burst(alpn: &[&[u8]]) -> usize {
    const BURST: usize = 16;
    let pki = TestPki::localhost();
    let all_arrived = Arc::new(tokio::sync::Barrier::new(BURST));
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(alpn)
        .handler(move |_: Request<hyper::body::Incoming>| {
            let all_arrived = all_arrived.clone();
            async move {
                all_arrived.wait().await;
                json(StatusCode::OK, json!({}))
            }
        })
        .start()
        .await;
    let proxy = Proxy::start(&ProxyConfig::new(&upstream.url(BASE), &pki)).await;
    all_answered_ok(&proxy, BURST).await;
    assert_eq!(upstream.request_count(), BURST);
    upstream.connections_accepted()
}

#[tokio::test]
async fn a_cold_burst_to_an_h2_upstream_waits_for_one_handshake_and_shares_its_connection() {
    assert_eq!(cold_burst(&[b"h2", b"http/1.1"]).await, 1);
}

#[tokio::test]
async fn a_cold_burst_to_an_http1_upstream_opens_a_connection_per_request() {
    assert_eq!(cold_burst(&[b"http/1.1"]).await, 16);
}

#[tokio::test]
async fn upstream_http2_false_offers_http1_alone() {
    for (setting, expected) in [
        ("true", http::Version::HTTP_2),
        ("false", http::Version::HTTP_11),
    ] {
        let pki = TestPki::localhost();
        let upstream = ok_upstream(&pki, ALPNS[0]).await;
        let config =
            ProxyConfig::new(&upstream.url(BASE), &pki).set("IDMATCH_UPSTREAM_HTTP2", setting);
        let proxy = Proxy::start(&config).await;
        assert_eq!(
            send(&http1(), get(&proxy.url("/x"))).await.status,
            StatusCode::OK
        );
        assert_eq!(
            upstream.requests()[0].version,
            expected,
            "http2 = {setting}"
        );
    }
}

/// A TCP relay to `target` that passes bytes both ways until frozen; frozen, it keeps every
/// connection open and passes nothing, as a peer that died without closing would. It can also
/// close every connection, as an upstream closing idle connections does.
struct FreezingRelay {
    addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    cuts: tokio::sync::watch::Sender<u32>,
    accepted: Arc<AtomicUsize>,
    /// Connections the proxy closed.
    closed: Arc<AtomicUsize>,
}

impl FreezingRelay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = tokio::sync::watch::channel(false);
        let (cuts, _) = tokio::sync::watch::channel(0);
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let relay = Self {
            addr,
            frozen: frozen.clone(),
            cuts: cuts.clone(),
            accepted: accepted.clone(),
            closed: closed.clone(),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let upstream = TcpStream::connect(target).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                let closed = closed.clone();
                let to_upstream = Self::pass(
                    client_read,
                    upstream_write,
                    frozen.subscribe(),
                    cuts.subscribe(),
                );
                tokio::spawn(async move {
                    to_upstream.await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
                tokio::spawn(Self::pass(
                    upstream_read,
                    client_write,
                    frozen.subscribe(),
                    cuts.subscribe(),
                ));
            }
        });
        relay
    }

    /// Copies `from` to `to` until `from` ends or the relay cuts its connections; what arrives
    /// while frozen is dropped.
    async fn pass(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: tokio::sync::watch::Receiver<bool>,
        mut cuts: tokio::sync::watch::Receiver<u32>,
    ) {
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(n @ 1..) => n,
                    _ => return,
                },
                _ = cuts.changed() => return,
            };
            if !*frozen.borrow() && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Closes every connection open now.
    fn cut(&self) {
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

#[tokio::test]
async fn an_unanswered_http2_ping_closes_the_connection_before_a_request_needs_it() {
    let pki = TestPki::localhost();
    let upstream = ok_upstream(&pki, ALPNS[0]).await;
    let relay = FreezingRelay::start(upstream.addr()).await;
    let config = ProxyConfig::new(&format!("https://{}{BASE}", relay.addr), &pki)
        .set("IDMATCH_UPSTREAM_PING_INTERVAL", "100ms")
        .set("IDMATCH_UPSTREAM_PING_TIMEOUT", "200ms");
    let proxy = Proxy::start(&config).await;
    let client = http1();
    assert_eq!(
        send(&client, get(&proxy.url("/a"))).await.status,
        StatusCode::OK
    );

    // The upstream falls silent: its PING answers never come, and the proxy lets the
    // connection go on its own, with no request waiting on it.
    relay.freeze(true);
    eventually(
        Duration::from_secs(5),
        "the silent connection closed",
        || std::future::ready(relay.closed.load(Ordering::SeqCst) == 1),
    )
    .await;
    relay.freeze(false);
    assert_eq!(
        send(&client, get(&proxy.url("/b"))).await.status,
        StatusCode::OK
    );
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(upstream.request_count(), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_made_again_before_a_request_needs_it() {
    for alpn in ALPNS {
        let pki = TestPki::localhost();
        let upstream = ok_upstream(&pki, alpn).await;
        let relay = FreezingRelay::start(upstream.addr()).await;
        let config = ProxyConfig::new(&format!("https://{}{BASE}", relay.addr), &pki);
        let proxy = Proxy::start(&config).await;
        let client = http1();
        let connections = |n: usize| {
            let accepted = relay.accepted.clone();
            async move {
                eventually(Duration::from_secs(5), "a connection made ahead", || {
                    std::future::ready(accepted.load(Ordering::SeqCst) == n)
                })
                .await
            }
        };
        connections(1).await;
        assert_eq!(
            send(&client, get(&proxy.url("/a"))).await.status,
            StatusCode::OK
        );

        // The upstream closes the idle connection; the proxy makes another with no request
        // waiting, and the next request is sent on it.
        relay.cut();
        connections(2).await;
        eventually(
            Duration::from_secs(5),
            "the connection made ahead is up",
            || std::future::ready(upstream.tls_handshakes_completed() == 2),
        )
        .await;
        assert_eq!(
            send(&client, get(&proxy.url("/b"))).await.status,
            StatusCode::OK
        );
        assert_eq!(relay.accepted.load(Ordering::SeqCst), 2, "{alpn:?}");
        assert_eq!(upstream.request_count(), 2);
    }
}

/// A response body of `bytes` bytes, one every 100 ms: never silent for long enough to time out,
/// and held open all that time.
fn trickle(bytes: usize) -> idmatch_mock::server::Body {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..bytes {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(Bytes::from_static(b" ")).await.is_err() {
                return;
            }
        }
    });
    channel_body(rx)
}

#[tokio::test]
async fn a_request_waits_for_an_upstream_slot_at_most_the_response_timeout() {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|request: Request<hyper::body::Incoming>| async move {
            let body = match request.uri().path() {
                "/mobile-identity/v1/long" => trickle(15),
                _ => idmatch_mock::server::full("{}"),
            };
            http::Response::new(body)
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_UPSTREAM_MAX_IN_FLIGHT", "1")
        .set("IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", "400ms");
    let proxy = Proxy::start(&config).await;
    let client = http1();
    // The head has come; the slot stays taken until the body ends, 1.5 s later.
    let long = client.request(get(&proxy.url("/long"))).await.unwrap();
    assert_eq!(long.status(), StatusCode::OK);
    let long = tokio::spawn(collect(long));

    // A client that gives up while waiting is no longer counted.
    let impatient = tokio::time::timeout(
        Duration::from_millis(100),
        client.request(get(&proxy.url("/impatient"))),
    );
    assert!(impatient.await.is_err());
    let waiting = "idmatch_proxy_upstream_requests_waiting";
    let admin = proxy.admin;
    eventually(
        Duration::from_secs(5),
        "nothing waiting for a slot",
        || async move { scrape(admin, waiting).await == 0.0 },
    )
    .await;

    let started = Instant::now();
    let queued = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/queued"));
        async move { send(&client, get(&url)).await }
    });
    eventually(
        Duration::from_secs(5),
        "one request waiting for a slot",
        || async move { scrape(admin, waiting).await == 1.0 },
    )
    .await;
    let queued = queued.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(scrape(proxy.admin, waiting).await, 0.0);
    let message = assert_proxy_error(
        &queued,
        StatusCode::SERVICE_UNAVAILABLE,
        "connection_limit_reached",
    );
    assert!(message.contains("upstream.max_in_flight"), "{message}");
    assert_eq!(upstream.request_count(), 1, "the queued request never left");

    // The end of the long body frees the slot.
    assert_eq!(long.await.unwrap().body.len(), 15);
    assert_eq!(
        send(&client, get(&proxy.url("/after"))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let (upstream, proxy, _config) = stack_with(
        Duration::ZERO,
        &[("IDMATCH_CLIENT_MAX_HEADER_BYTES", "16KiB")],
    )
    .await;
    let big = "a".repeat(20 * 1024);
    let request =
        format!("GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let response = raw(proxy.addr, request.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "{}",
        &response[..response.len().min(100)]
    );
    // Just under the limit passes.
    let fits = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(12 * 1024)
    );
    assert!(raw(proxy.addr, fits.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(upstream.request_count(), 1);
}

/// Reads from `stream` until the peer closes it; returns how long that took.
async fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_while_others_are_served() {
    let (_upstream, proxy, _config) = stack_with(
        Duration::ZERO,
        &[
            ("IDMATCH_CLIENT_HEADER_TIMEOUT", "300ms"),
            ("IDMATCH_CLIENT_IDLE_TIMEOUT", "10s"),
        ],
    )
    .await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let closer = tokio::spawn(async move { time_until_closed(&mut slow).await });
    // Meanwhile a well-behaved client is served.
    assert_eq!(
        send(&http1(), get(&proxy.url("/ok"))).await.status,
        StatusCode::OK
    );
    let closed_after = closer.await.unwrap();
    assert!(
        closed_after >= Duration::from_millis(250) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_outlive_the_header_timeout_until_the_idle_timeout() {
    let (_upstream, proxy, _config) = stack_with(
        Duration::ZERO,
        &[
            ("IDMATCH_CLIENT_HEADER_TIMEOUT", "200ms"),
            ("IDMATCH_CLIENT_IDLE_TIMEOUT", "1s"),
        ],
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..2 {
        stream.write_all(request).await.unwrap();
        let (status, head, _) = read_response(&mut stream).await;
        assert_eq!(status, StatusCode::OK, "{head}");
        // Idle longer than the header timeout: still open.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let closed_after = time_until_closed(&mut stream).await;
    // Idle since the second response: 400 ms already, closed at about 1 s.
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(300),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn draining_turns_readiness_off_keeps_serving_and_closes_http1_connections() {
    let (_upstream, proxy, _config) =
        stack_with(Duration::ZERO, &[("IDMATCH_DRAIN_DELAY", "2s")]).await;
    let client = http1();
    assert_eq!(
        send(&client, get(&admin_url(&proxy, "/readyz")))
            .await
            .status,
        StatusCode::OK
    );
    let admin = proxy.admin;
    let url = proxy.url("/during-drain");
    let stopped = tokio::spawn(proxy.stop());
    // Readiness flips at once...
    let readyz = format!("http://{admin}/readyz");
    eventually(Duration::from_secs(1), "readiness 503", || {
        not_ready(&client, &readyz)
    })
    .await;
    let ready = send(&client, get(&readyz)).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["reason"], "draining");
    // ...while requests are still served, each telling HTTP/1 clients to reconnect.
    let answer = send(&client, get(&url)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["connection"], "close");
    stopped.await.unwrap();
}

/// An h2c connection to the proxy, with one request answered over it, and a task that ends when
/// the proxy closes the connection. Dropping the sender would close it from our side.
async fn h2c_connection_used_once(
    proxy: &Proxy,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let (mut sender, closed) = support::h2c_connection(proxy.addr).await;
    let response = sender.send_request(get(&proxy.url("/h2c"))).await.unwrap();
    assert_eq!(collect(response).await.status, StatusCode::OK);
    (sender, closed)
}

#[tokio::test]
async fn an_h2c_connection_is_closed_at_the_idle_timeout_after_its_last_stream() {
    // The stream ends in a task of its own, not in the connection's: the idle clock must start
    // all the same.
    let (_upstream, proxy, _config) =
        stack_with(Duration::ZERO, &[("IDMATCH_CLIENT_IDLE_TIMEOUT", "500ms")]).await;
    let idle_since = Instant::now();
    let (_sender, closed) = h2c_connection_used_once(&proxy).await;
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("closed at the idle timeout")
        .unwrap();
    let closed_after = idle_since.elapsed();
    assert!(
        closed_after >= Duration::from_millis(400),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn draining_closes_h2c_connections_at_once_and_idle_http1_ones_at_the_stop() {
    let (_upstream, proxy, _config) =
        stack_with(Duration::ZERO, &[("IDMATCH_DRAIN_DELAY", "1500ms")]).await;
    let (_sender, h2c) = h2c_connection_used_once(&proxy).await;
    let mut http1 = TcpStream::connect(proxy.addr).await.unwrap();
    http1
        .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, _) = read_response(&mut http1).await;
    assert_eq!(status, StatusCode::OK, "{head}");
    let http1 = tokio::spawn(async move { time_until_closed(&mut http1).await });

    let draining = Instant::now();
    let stopped = tokio::spawn(proxy.stop());
    // GOAWAY, and the idle connection ends, well before the drain delay is over...
    tokio::time::timeout(Duration::from_millis(1000), h2c)
        .await
        .expect("h2c closed when draining began")
        .unwrap();
    // ...while an idle HTTP/1 connection, which would learn of the drain from its next
    // response, stays open until the listener closes.
    let http1_closed = tokio::time::timeout(Duration::from_secs(5), http1)
        .await
        .expect("HTTP/1 closed at the stop")
        .unwrap();
    assert!(
        draining.elapsed() >= Duration::from_millis(1400)
            && http1_closed >= Duration::from_millis(1400),
        "HTTP/1 closed after {http1_closed:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("stopped without waiting for the shutdown timeout")
        .unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_requests_within_the_timeout() {
    let (upstream, proxy, _config) = stack_with(
        Duration::from_millis(300),
        &[("IDMATCH_SHUTDOWN_TIMEOUT", "5s")],
    )
    .await;
    let client = http1();
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { send(&client, get(&url)).await.status });
    eventually(
        Duration::from_secs(5),
        "the request at the upstream",
        || std::future::ready(upstream.request_count() == 1),
    )
    .await;
    let started = Instant::now();
    proxy.stop().await;
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "stopped before the request ended"
    );
    assert_eq!(in_flight.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn shutdown_gives_up_on_requests_at_the_timeout() {
    let (upstream, proxy, _config) = stack_with(
        Duration::from_secs(30),
        &[("IDMATCH_SHUTDOWN_TIMEOUT", "300ms")],
    )
    .await;
    let url = proxy.url("/stuck");
    let client = http1();
    let stuck = tokio::spawn(async move { client.request(get(&url)).await.map(|r| r.status()) });
    eventually(
        Duration::from_secs(5),
        "the request at the upstream",
        || std::future::ready(upstream.request_count() == 1),
    )
    .await;
    let started = Instant::now();
    proxy.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(stuck.await.unwrap().is_err(), "the stuck request was cut");
}

#[tokio::test]
async fn a_client_gone_before_the_response_is_accounted_for() {
    let (upstream, proxy, _config) = stack_with(Duration::from_secs(5), &[]).await;
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    gone.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    while upstream.request_count() == 0 {
        tokio::task::yield_now().await;
    }
    let client = http1();
    let in_flight = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("idmatch_proxy_requests_in_flight "))
            .map(str::to_owned)
    };
    let metrics = send(&client, get(&admin_url(&proxy, "/metrics"))).await;
    assert_eq!(
        in_flight(&String::from_utf8_lossy(&metrics.body)).as_deref(),
        Some("1")
    );
    drop(gone);
    // The upstream request is abandoned with the client's, and the gauge comes back down.
    let admin = proxy.admin;
    eventually(
        Duration::from_secs(3),
        "nothing in flight after the client left",
        || async move { scrape(admin, "idmatch_proxy_requests_in_flight").await == 0.0 },
    )
    .await;
}

#[tokio::test]
async fn a_small_body_that_stops_arriving_gets_408_within_the_header_timeout() {
    let (upstream, proxy, _config) = stack_with(
        Duration::ZERO,
        &[("IDMATCH_CLIENT_HEADER_TIMEOUT", "300ms")],
    )
    .await;
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(b"POST /sim-swap HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"phone")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        answer.contains(r#""code":"http_request_error""#),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn a_fresh_proxy_exports_every_error_retry_and_reload_counter_at_zero() {
    let (_upstream, proxy, _config) = stack_with(Duration::ZERO, &[]).await;
    let text = send(&http1(), get(&admin_url(&proxy, "/metrics")))
        .await
        .body;
    let text = String::from_utf8(text.to_vec()).unwrap();
    let mut expected = Vec::new();
    for code in [
        "http_request_denied",
        "http_request_error",
        "dns_error",
        "connection_refused",
        "connection_timeout",
        "tls_certificate_error",
        "tls_protocol_error",
        "destination_unavailable",
        "proxy_configuration_error",
        "http_response_timeout",
        "connection_terminated",
        "http_protocol_error",
        "connection_limit_reached",
    ] {
        expected.push(format!(
            r#"idmatch_proxy_proxy_errors_total{{code="{code}"}} 0"#
        ));
    }
    for code in [
        "dns_error",
        "connection_refused",
        "connection_timeout",
        "tls_certificate_error",
        "tls_protocol_error",
        "destination_unavailable",
        "proxy_configuration_error",
    ] {
        expected.push(format!(
            r#"idmatch_proxy_upstream_connect_errors_total{{code="{code}"}} 0"#
        ));
    }
    for reason in ["connect", "unauthorized"] {
        expected.push(format!(
            r#"idmatch_proxy_upstream_retries_total{{reason="{reason}"}} 0"#
        ));
    }
    for outcome in ["success", "failure"] {
        expected.push(format!(
            r#"idmatch_proxy_credential_reloads_total{{outcome="{outcome}"}} 0"#
        ));
    }
    let lines: Vec<&str> = text.lines().collect();
    for line in &expected {
        assert!(
            lines.contains(&line.as_str()),
            "missing {line:?} in:\n{text}"
        );
    }
}

/// Heads hyper cannot parse never reach our service, and hyper answers them itself; they are
/// still counted, as requests of method `other`, and by error type.
#[tokio::test]
async fn requests_hyper_refuses_are_counted() {
    let (upstream, proxy, _config) = stack_with(
        Duration::ZERO,
        &[("IDMATCH_CLIENT_MAX_HEADER_BYTES", "128KiB")],
    )
    .await;
    let big_field = format!("X-Big: {}\r\n", "a".repeat(130 * 1024));
    let long_target = format!("/{}", "a".repeat(70 * 1024));
    let cases = [
        ("GET /a b HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 400),
        (
            "GET /a HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n".to_owned(),
            400,
        ),
        (
            format!("GET /a HTTP/1.1\r\nHost: x\r\n{big_field}\r\n"),
            431,
        ),
        (
            format!("GET {long_target} HTTP/1.1\r\nHost: x\r\n\r\n"),
            414,
        ),
    ];
    for (request, status) in &cases {
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {answer:?}"
        );
    }
    assert_eq!(upstream.request_count(), 0);
    // The connection task accounts for it as the connection ends, just after the answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let sample = r#"idmatch_proxy_requests_total{method="other",status_class="4xx"}"#;
    while scrape(proxy.admin, sample).await < 4.0 && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    for (sample, value) in [
        (sample, 4.0),
        (
            r#"idmatch_proxy_proxy_errors_total{code="http_request_error"}"#,
            2.0,
        ),
        (
            r#"idmatch_proxy_proxy_errors_total{code="http_request_denied"}"#,
            2.0,
        ),
    ] {
        assert_eq!(scrape(proxy.admin, sample).await, value, "{sample}");
    }
}

/// `/quitquitquit` takes POST only; from loopback it starts the drain (the 403 for other peers
/// is tested in `admin.rs`: here every peer is on loopback).
#[tokio::test]
async fn quitquitquit_takes_post_only_and_starts_the_drain() {
    let (_upstream, proxy, _config) =
        stack_with(Duration::ZERO, &[("IDMATCH_DRAIN_DELAY", "30s")]).await;
    let client = http1();
    let url = admin_url(&proxy, "/quitquitquit");
    let refused = send(&client, get(&url)).await;
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(refused.headers["allow"], "POST");
    let ready = send(&client, get(&admin_url(&proxy, "/readyz"))).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a refused quit changes nothing"
    );

    let quit = Request::post(&url).body(Default::default()).unwrap();
    assert_eq!(send(&client, quit).await.status, StatusCode::ACCEPTED);
    let readyz = admin_url(&proxy, "/readyz");
    eventually(Duration::from_secs(5), "readiness 503", || {
        not_ready(&client, &readyz)
    })
    .await;
    let readiness = send(&client, get(&readyz)).await;
    assert_eq!(readiness.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(readiness.json()["reason"], "draining");
    // Still serving through the drain delay, with `Connection: close`.
    let answer = send(&client, get(&proxy.url("/during-drain"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["connection"], "close");
}
