//! The callback listener through real sockets: CM.com's signed callbacks verified, deduplicated
//! and handed to a tiny app; every refusal answered before the app and never sent upstream.
//!
//! Signatures here are made with `ring`, not with the proxy's HMAC (RustCrypto's), so that the
//! two implementations check each other.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use idmatch_mock::{MockApi, RunningServer, Server as Upstream, TestPki};
use idmatch_proxy::token::{Clock, SystemClock};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// `Authorization` as CM.com computes it (fact sheet §4.3), with ring's HMAC.
fn authorization(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("HMAC {}", STANDARD.encode(ring::hmac::sign(&key, body)))
}

/// A Number Verify event as CM.com documents it (fact sheet §4.1), with event id `id`.
fn event(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","type":"numberVerify.state","numberVerify":{{"id":"0662f56b-13e0-4b64-b7ed-7ca75516fb85","state":"completed","match":true}},"created":"2024-01-01T00:00:00+00:00"}}"#
    )
    .into_bytes()
}

fn callback(url: &str, authorization: Option<&str>, body: Vec<u8>) -> Request<Full<Bytes>> {
    let mut request = Request::post(url).header("content-type", "application/json");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.body(Full::new(Bytes::from(body))).unwrap()
}

fn signed(url: &str, secret: &str, body: Vec<u8>) -> Request<Full<Bytes>> {
    callback(url, Some(&authorization(secret, &body)), body)
}

/// What the app received.
#[derive(Clone, Debug)]
struct Delivery {
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// The tiny app behind the listener: records each callback whole and answers `status`; while
/// `status` is 0 it holds the callback unanswered.
#[derive(Clone)]
struct App {
    received: Arc<Mutex<Vec<Delivery>>>,
    status: Arc<watch::Sender<u16>>,
}

impl App {
    fn new(status: u16) -> Self {
        Self {
            received: Arc::default(),
            status: Arc::new(watch::Sender::new(status)),
        }
    }

    async fn start(status: u16) -> (Self, SocketAddr) {
        let app = Self::new(status);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        app.serve(listener);
        (app, addr)
    }

    fn answer(&self, status: u16) {
        self.status.send_replace(status);
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    fn serve(&self, listener: TcpListener) {
        let app = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(app.record(request).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
    }

    async fn record(&self, request: Request<Incoming>) -> http::Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        self.received.lock().unwrap().push(Delivery {
            target: parts.uri.to_string(),
            headers: parts.headers,
            body,
        });
        let mut status = self.status.subscribe();
        let status = *status.wait_for(|status| *status != 0).await.unwrap();
        let mut response = http::Response::new(Full::new(Bytes::from_static(b"app's own body")));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    }
}

/// A proxy with a callback listener forwarding to `forward_url`, in front of a TLS upstream that
/// must never see a callback.
struct Setup {
    pki: TestPki,
    upstream: RunningServer,
    proxy: Proxy,
    /// `http://<callback listener>`.
    base: String,
    _config: ProxyConfig,
}

impl Setup {
    async fn start(forward_url: &str, settings: &[(&str, &str)]) -> Self {
        let api = MockApi::new(KEY_ID, SECRET);
        Self::build(
            api,
            BASE,
            forward_url,
            settings,
            Arc::new(SystemClock),
            |c| c,
        )
        .await
    }

    /// The proxy in front of `api` at `upstream_base`, with `clock`; `adjust` has the last
    /// word on its settings.
    async fn build(
        api: MockApi,
        upstream_base: &str,
        forward_url: &str,
        settings: &[(&str, &str)],
        clock: Arc<dyn Clock>,
        adjust: impl FnOnce(ProxyConfig) -> ProxyConfig,
    ) -> Self {
        let pki = TestPki::localhost();
        let upstream = Upstream::builder().tls(&pki).handler(api).start().await;
        let mut config = ProxyConfig::new(&upstream.url(upstream_base), &pki)
            .set("IDMATCH_CALLBACK_LISTEN", "127.0.0.1:0")
            .set("IDMATCH_CALLBACK_FORWARD_URL", forward_url);
        for (key, value) in settings {
            config = config.set(key, value);
        }
        let config = adjust(config);
        let proxy = Proxy::start_with_clock(&config, clock).await;
        let base = format!("http://{}", proxy.callback.expect("a callback listener"));
        Self {
            pki,
            upstream,
            proxy,
            base,
            _config: config,
        }
    }

    /// A device loading `session_url` (the mock's, over TLS): the session completes.
    async fn load_session(&self, session_url: &str) -> String {
        let path = session_url.parse::<http::Uri>().unwrap().path().to_owned();
        let tls = tokio_rustls::TlsConnector::from(self.pki.client_config(&[b"http/1.1"]));
        let tcp = TcpStream::connect(self.upstream.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = tls.connect(name, tcp).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await;
        answer
    }

    fn url(&self, target: &str) -> String {
        format!("{}{target}", self.base)
    }

    fn callback_addr(&self) -> SocketAddr {
        self.proxy.callback.unwrap()
    }

    async fn metric(&self, sample: &str) -> f64 {
        scrape(self.proxy.admin, &format!("idmatch_proxy_{sample}")).await
    }
}

#[tokio::test]
async fn every_refusal_is_a_json_error_and_reaches_neither_the_app_nor_the_upstream() {
    let (app, app_addr) = App::start(200).await;
    let setup = Setup::start(
        &format!("http://{app_addr}"),
        &[("IDMATCH_CALLBACK_MAX_BODY_BYTES", "1KiB")],
    )
    .await;
    let url = setup.url("/cm/events");
    let body = event("58128784-9e8d-4424-a89d-08bfe273381c");
    let signature = authorization(SECRET, &body);
    let url_safe = signature.replace('+', "-").replace('/', "_");
    let large = [b" ".repeat(2048), body.clone()].concat();
    let cases = [
        (
            Request::get(&url).body(Full::default()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        (
            callback(&url, None, body.clone()),
            StatusCode::UNAUTHORIZED,
            "missing_signature",
        ),
        (
            callback(&url, Some("Bearer abc"), body.clone()),
            StatusCode::UNAUTHORIZED,
            "malformed_signature",
        ),
        (
            callback(&url, Some("HMAC not base64 at all!"), body.clone()),
            StatusCode::UNAUTHORIZED,
            "malformed_signature",
        ),
        (
            callback(&url, Some("HMAC AAAA"), body.clone()),
            StatusCode::UNAUTHORIZED,
            "malformed_signature",
        ),
        (
            signed(&url, "another secret", body.clone()),
            StatusCode::UNAUTHORIZED,
            "bad_signature",
        ),
        (
            callback(&url, Some(&signature), event("another event")),
            StatusCode::UNAUTHORIZED,
            "bad_signature",
        ),
        (
            signed(&url, SECRET, large),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ];
    // Exported at 0 before the first callback.
    for (_, _, reason) in &cases {
        let sample = format!("callbacks_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(setup.metric(&sample).await, 0.0, "{sample}");
    }
    let client = http1();
    for (request, status, reason) in cases {
        let answer = send(&client, request).await;
        assert_eq!(answer.status, status, "{reason}");
        let code = answer.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_proxy_error(&answer, status, &code);
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(answer.headers["www-authenticate"], "HMAC");
        }
    }
    // URL-safe base64 only when it differs from the standard one.
    if url_safe != signature {
        let answer = send(&client, callback(&url, Some(&url_safe), body.clone())).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    assert!(app.deliveries().is_empty());
    assert_eq!(setup.upstream.request_count(), 0);
    assert_eq!(
        setup
            .metric("callbacks_refused_total{reason=\"bad_signature\"}")
            .await,
        2.0
    );
    assert_eq!(
        setup
            .metric("callbacks_forwarded_total{result=\"2xx\"}")
            .await,
        0.0
    );
    assert!(setup.metric("callbacks_received_total").await >= 8.0);
}

#[tokio::test]
async fn a_verified_callback_reaches_the_app_byte_exact_without_its_signature() {
    let (app, app_addr) = App::start(202).await;
    let setup = Setup::start(&format!("http://{app_addr}/hooks/cm/"), &[]).await;
    // Not JSON, no event id: forwarded all the same, the signature is what counts.
    let body = b"{\"id\": 1,\n \"odd\": \"\xc3\xa9\\u00e9 \" }\r\n".to_vec();
    let signature = authorization(SECRET, &body);
    let head = format!(
        "POST /events%2Fnv?b=1+2&b=&c=%41 HTTP/1.1\r\nHost: callbacks.example.com\r\n\
         Authorization: {signature}\r\nContent-Type: application/json\r\nX-Custom: kept\r\n\
         Idmatch-Callback-Verified: forged\r\nProxy-Authorization: Basic eDp5\r\nX-Hop: gone\r\n\
         Connection: close, x-hop\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let answer = raw(setup.callback_addr(), &[head.as_bytes(), &body].concat()).await;
    assert!(answer.starts_with("HTTP/1.1 202 Accepted\r\n"), "{answer}");
    assert!(!answer.contains("proxy-status"), "{answer}");
    assert!(!answer.contains("app's own body"), "{answer}");

    let deliveries = app.deliveries();
    assert_eq!(deliveries.len(), 1);
    let delivery = &deliveries[0];
    assert_eq!(delivery.target, "/hooks/cm/events%2Fnv?b=1+2&b=&c=%41");
    assert_eq!(delivery.body, body);
    let headers = &delivery.headers;
    assert_eq!(
        headers
            .get_all("idmatch-callback-verified")
            .iter()
            .collect::<Vec<_>>(),
        ["true"]
    );
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["host"], app_addr.to_string().as_str());
    for gone in [
        "authorization",
        "proxy-authorization",
        "x-hop",
        "connection",
    ] {
        assert!(!headers.contains_key(gone), "{gone} reached the app");
    }
    assert_eq!(setup.upstream.request_count(), 0);
    assert_eq!(
        setup
            .metric("callbacks_verified_total{secret=\"current\"}")
            .await,
        1.0
    );
    assert_eq!(
        setup
            .metric("callbacks_forwarded_total{result=\"2xx\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_app_that_is_down_or_slow_gets_a_5xx_then_the_retry_is_delivered() {
    // Bound but not listening: refused, until the app starts on it.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let app_addr = socket.local_addr().unwrap();
    let setup = Setup::start(
        &format!("http://{app_addr}"),
        &[("IDMATCH_CALLBACK_FORWARD_TIMEOUT", "300ms")],
    )
    .await;
    let client = http1();
    let url = setup.url("/cm");
    let body = event("down-then-up");

    let answer = send(&client, signed(&url, SECRET, body.clone())).await;
    assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "destination_unavailable");

    // Listening now, but holding the callback past the forward timeout.
    let app = App::new(0);
    app.serve(socket.listen(16).unwrap());
    let answer = send(&client, signed(&url, SECRET, body.clone())).await;
    assert_proxy_error(
        &answer,
        StatusCode::GATEWAY_TIMEOUT,
        "http_response_timeout",
    );

    // A failure is not an acknowledgement: CM.com's next retry is delivered.
    app.answer(200);
    let answer = send(&client, signed(&url, SECRET, body.clone())).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(app.deliveries().len(), 2);
    assert_eq!(app.deliveries()[1].body, body);
    for (result, count) in [("unreachable", 1.0), ("timeout", 1.0), ("2xx", 1.0)] {
        let sample = format!("callbacks_forwarded_total{{result=\"{result}\"}}");
        assert_eq!(setup.metric(&sample).await, count, "{sample}");
    }
}

#[tokio::test]
async fn an_event_is_delivered_once_after_the_app_acknowledges_it() {
    let (app, app_addr) = App::start(503).await;
    let setup = Setup::start(&format!("http://{app_addr}"), &[]).await;
    let client = http1();
    let url = setup.url("/cm");
    let once = event("delivered-once");

    // The app's own 503 goes back to CM.com, which retries.
    let answer = send(&client, signed(&url, SECRET, once.clone())).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!answer.headers.contains_key("proxy-status"));
    app.answer(200);
    for _ in 0..3 {
        let answer = send(&client, signed(&url, SECRET, once.clone())).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(app.deliveries().len(), 2, "a 503, then one 200");
    // Another event is another delivery.
    let answer = send(&client, signed(&url, SECRET, event("another"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(app.deliveries().len(), 3);
    assert_eq!(setup.metric("callbacks_duplicates_total").await, 2.0);
    assert_eq!(
        setup
            .metric("callbacks_forwarded_total{result=\"5xx\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn callbacks_beyond_the_concurrency_limit_get_an_immediate_503() {
    let (app, app_addr) = App::start(0).await;
    let setup = Setup::start(
        &format!("http://{app_addr}"),
        &[("IDMATCH_CALLBACK_MAX_IN_FLIGHT", "1")],
    )
    .await;
    let url = setup.url("/cm");
    let request = signed(&url, SECRET, event("held"));
    let held = tokio::spawn(async move { send(&http1(), request).await });
    eventually(
        Duration::from_secs(10),
        "app.deliveries().len() == 1",
        || std::future::ready(app.deliveries().len() == 1),
    )
    .await;
    let answer = send(&http1(), signed(&url, SECRET, event("second"))).await;
    assert_proxy_error(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "connection_limit_reached",
    );
    app.answer(204);
    assert_eq!(held.await.unwrap().status, StatusCode::NO_CONTENT);
    assert_eq!(app.deliveries().len(), 1);
    assert_eq!(
        setup
            .metric("callbacks_refused_total{reason=\"overloaded\"}")
            .await,
        1.0
    );
}

/// After the secret file changes, the previous secret passes for the grace period (on the
/// injected clock), then no more.
#[tokio::test]
async fn the_previous_secret_passes_only_during_its_grace_period() {
    const NEXT: &str = "the-rotated-secret";
    let (app, app_addr) = App::start(200).await;
    let clock = Arc::new(AdvancedClock::default());
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let setup = Setup::build(
        MockApi::new(KEY_ID, SECRET),
        BASE,
        &format!("http://{app_addr}"),
        &[
            ("IDMATCH_CALLBACK_PREVIOUS_SECRET_GRACE", "5m"),
            ("IDMATCH_CREDENTIALS_RELOAD_INTERVAL", "10ms"),
            ("IDMATCH_SECRET_FILE", secret_file.to_str().unwrap()),
        ],
        clock.clone(),
        |mut config| {
            config.env.remove("IDMATCH_SECRET");
            config
        },
    )
    .await;
    let client = http1();
    let url = setup.url("/cm");
    let events = AtomicU64::new(0);
    let deliver = |secret: &'static str| {
        let body = event(&format!("event-{}", events.fetch_add(1, Ordering::SeqCst)));
        let request = signed(&url, secret, body);
        let client = client.clone();
        async move { send(&client, request).await.status }
    };
    assert_eq!(deliver(NEXT).await, StatusCode::UNAUTHORIZED);

    let staged = dir.path().join("secret.new");
    std::fs::write(&staged, NEXT).unwrap();
    std::fs::rename(&staged, &secret_file).unwrap();
    eventually(
        Duration::from_secs(10),
        "the rotated secret accepted",
        || {
            let delivered = deliver(NEXT);
            async move { delivered.await == StatusCode::OK }
        },
    )
    .await;
    assert_eq!(deliver(SECRET).await, StatusCode::OK);
    assert_eq!(
        setup
            .metric("callbacks_verified_total{secret=\"previous\"}")
            .await,
        1.0
    );
    clock.advance(Duration::from_secs(299));
    assert_eq!(deliver(SECRET).await, StatusCode::OK);
    clock.advance(Duration::from_secs(1));
    assert_eq!(deliver(SECRET).await, StatusCode::UNAUTHORIZED);
    assert_eq!(deliver(NEXT).await, StatusCode::OK);
    assert_eq!(
        setup
            .metric("callbacks_verified_total{secret=\"previous\"}")
            .await,
        2.0
    );
    assert!(app
        .deliveries()
        .iter()
        .all(|d| d.headers["idmatch-callback-verified"] == "true"));
}

/// A 1 MiB body is refused having read at most a little over the 64 KiB limit: the answer comes
/// while most of the body was never sent.
#[tokio::test]
async fn a_one_mib_body_is_refused_before_it_is_read() {
    let (app, app_addr) = App::start(200).await;
    let setup = Setup::start(&format!("http://{app_addr}"), &[]).await;
    let signature = authorization(SECRET, b"whatever");

    // Announced: refused on the head alone.
    let mut stream = TcpStream::connect(setup.callback_addr()).await.unwrap();
    let head = format!(
        "POST /cm HTTP/1.1\r\nHost: x\r\nAuthorization: {signature}\r\nContent-Length: 1048576\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("65536"));

    // Chunked: refused once the limit is crossed, with 128 KiB of the 1 MiB sent.
    let mut stream = TcpStream::connect(setup.callback_addr()).await.unwrap();
    let head = format!(
        "POST /cm HTTP/1.1\r\nHost: x\r\nAuthorization: {signature}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = [b"4000\r\n".as_slice(), &[b'x'; 0x4000], b"\r\n"].concat();
    for _ in 0..8 {
        stream.write_all(&chunk).await.unwrap();
    }
    let (status, _, _) = read_response(&mut stream).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    assert!(app.deliveries().is_empty());
    assert_eq!(
        setup
            .metric("callbacks_refused_total{reason=\"body_too_large\"}")
            .await,
        2.0
    );
}

/// The whole loop: the mock (as CM.com) signs a Number Verify event when the session completes,
/// the listener verifies it and the app receives it; an app answering 503 gets it again on the
/// mock's retry, with the same event id.
#[tokio::test]
async fn the_mocks_number_verify_callbacks_reach_the_app_verified() {
    let (app, app_addr) = App::start(503).await;
    let api = MockApi::builder(KEY_ID, SECRET)
        .allow_http_callbacks(true)
        .callback_retry_delays(vec![Duration::from_millis(10)])
        .build();
    let setup = Setup::build(
        api,
        BASE,
        &format!("http://{app_addr}/app"),
        &[],
        Arc::new(SystemClock),
        |c| c,
    )
    .await;
    let body = serde_json::json!({
        "phoneNumber": "+31610000001",
        "callbackUrl": setup.url("/cm/number-verify?customer=42"),
    });
    let started = send(
        &http1(),
        post_json(&setup.proxy.url("/number-verify"), body),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK);
    let started = started.json();
    assert!(app.deliveries().is_empty(), "no event while pending");
    let loaded = setup
        .load_session(started["sessionUrl"].as_str().unwrap())
        .await;
    assert!(loaded.starts_with("HTTP/1.1 200"), "{loaded}");

    eventually(
        Duration::from_secs(10),
        "app.deliveries().len() == 1",
        || std::future::ready(app.deliveries().len() == 1),
    )
    .await;
    app.answer(200);
    eventually(
        Duration::from_secs(10),
        "app.deliveries().len() == 2",
        || std::future::ready(app.deliveries().len() == 2),
    )
    .await;
    let deliveries = app.deliveries();
    assert_eq!(
        deliveries[0].body, deliveries[1].body,
        "a retry is the same event"
    );
    let delivery = &deliveries[1];
    assert_eq!(delivery.target, "/app/cm/number-verify?customer=42");
    assert_eq!(delivery.headers["idmatch-callback-verified"], "true");
    assert!(!delivery.headers.contains_key("authorization"));
    let text = String::from_utf8(delivery.body.to_vec()).unwrap();
    let id = started["id"].as_str().unwrap();
    // CM.com's key order (fact sheet §4.1).
    let expected_start = "{\"id\":\"";
    let expected_middle = format!(
        "\",\"type\":\"numberVerify.state\",\"numberVerify\":{{\"id\":\"{id}\",\"state\":\"completed\",\"match\":true}},\"created\":\""
    );
    assert!(text.starts_with(expected_start), "{text}");
    assert!(text.contains(&expected_middle), "{text}");
    assert!(text.ends_with("+00:00\"}"), "{text}");
    let event: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(event["id"].as_str().unwrap().len(), 36);
    assert_ne!(
        event["id"], started["id"],
        "the event's id is not the transaction's"
    );
    assert_eq!(
        setup
            .metric("callbacks_forwarded_total{result=\"5xx\"}")
            .await,
        1.0
    );
    assert_eq!(
        setup
            .metric("callbacks_forwarded_total{result=\"2xx\"}")
            .await,
        1.0
    );
}

/// The Verification service's events: the state when silent authentication succeeds, then the
/// state and the type when a code is submitted.
#[tokio::test]
async fn the_mocks_verification_callbacks_reach_the_app_verified() {
    let (app, app_addr) = App::start(200).await;
    let api = MockApi::builder(KEY_ID, SECRET)
        .allow_http_callbacks(true)
        .build();
    let setup = Setup::build(
        api,
        idmatch_mock::api::VERIFICATION_BASE_PATHS[0],
        &format!("http://{app_addr}"),
        &[],
        Arc::new(SystemClock),
        |c| c,
    )
    .await;
    let body = serde_json::json!({
        "phoneNumber": "+31610000001",
        "callbackUrl": setup.url("/cm/verify"),
    });
    let started = send(&http1(), post_json(&setup.proxy.url("/verify"), body))
        .await
        .json();
    let id = started["id"].as_str().unwrap();
    setup
        .load_session(started["sessionUrl"].as_str().unwrap())
        .await;
    eventually(
        Duration::from_secs(10),
        "app.deliveries().len() == 1",
        || std::future::ready(app.deliveries().len() == 1),
    )
    .await;
    let code = serde_json::json!({ "verificationCode": "111111" });
    let request = Request::put(setup.proxy.url(&format!("/verify/{id}")))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(code.to_string())))
        .unwrap();
    assert_eq!(send(&http1(), request).await.status, StatusCode::OK);
    eventually(
        Duration::from_secs(10),
        "app.deliveries().len() == 3",
        || std::future::ready(app.deliveries().len() == 3),
    )
    .await;

    let events: Vec<serde_json::Value> = app
        .deliveries()
        .iter()
        .map(|delivery| serde_json::from_slice(&delivery.body).unwrap())
        .collect();
    let verification =
        |state: &str, kind: &str| serde_json::json!({ "id": id, "state": state, "type": kind });
    assert_eq!(events[0]["type"], "verification.state");
    assert_eq!(events[0]["verification"], verification("success", "silent"));
    let mut later: Vec<&str> = events[1..]
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    later.sort_unstable();
    assert_eq!(later, ["verification.state", "verification.type"]);
    for event in &events[1..] {
        assert_eq!(event["verification"], verification("failed", "smart"));
    }
}

/// The real binary binds the listener from its settings and logs each callback without its
/// signature, body or query, even at `trace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_callbacks_and_never_logs_signatures_or_bodies() {
    let (app, app_addr) = App::start(204).await;
    let pki = TestPki::localhost();
    let config = ProxyConfig::new("https://127.0.0.1:9/mobile-identity/v1", &pki)
        .set("IDMATCH_CALLBACK_LISTEN", "127.0.0.1:0")
        .set(
            "IDMATCH_CALLBACK_FORWARD_URL",
            &format!("http://{app_addr}"),
        )
        .set("RUST_LOG", "trace");
    let mut binary = tokio::task::block_in_place(|| Binary::serve(&config.env));
    let url = format!("http://{}/cm?phone=31610000001", binary.callback.unwrap());
    let body = event("logged-nowhere");
    let signature = authorization(SECRET, &body);
    let answer = send(&http1(), callback(&url, Some(&signature), body.clone())).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let answer = send(&http1(), callback(&url, Some("HMAC AAAA"), body)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.deliveries().len(), 1);

    binary.signal("TERM");
    let (status, logs) = binary.finish(Duration::from_secs(30));
    assert!(status.success());
    let callbacks = logs
        .iter()
        .filter(|line| line.contains("\"message\":\"callback\""))
        .count();
    assert_eq!(callbacks, 2, "{logs:#?}");
    let token = signature.trim_start_matches("HMAC ");
    for line in &logs {
        for secret in [
            token,
            "logged-nowhere",
            "numberVerify",
            "31610000001",
            "AAAA",
            SECRET,
        ] {
            assert!(!line.contains(secret), "{secret:?} logged: {line}");
        }
    }
}

/// A body that stops arriving gets 408; a head that never completes, a closed connection.
#[tokio::test]
async fn slow_heads_and_bodies_are_cut_off() {
    let (app, app_addr) = App::start(200).await;
    let setup = Setup::start(
        &format!("http://{app_addr}"),
        &[
            ("IDMATCH_CALLBACK_BODY_TIMEOUT", "200ms"),
            ("IDMATCH_CALLBACK_HEADER_TIMEOUT", "200ms"),
        ],
    )
    .await;
    let mut stream = TcpStream::connect(setup.callback_addr()).await.unwrap();
    let head = "POST /cm HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"id\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _, _) = read_response(&mut stream).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);

    let mut stream = TcpStream::connect(setup.callback_addr()).await.unwrap();
    stream
        .write_all(b"POST /cm HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the slow head's connection stayed open");
    assert!(app.deliveries().is_empty());
    assert_eq!(
        setup
            .metric("callbacks_refused_total{reason=\"body_incomplete\"}")
            .await,
        1.0
    );
}
