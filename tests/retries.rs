//! Sending a request again: after a 401 (with a fresh token) and after a connection that failed
//! before the request was written; and the request body limit (413).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use idmatch_mock::server::{json, Body};
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Barrier};

/// What the upstream received: the `Authorization` value and the whole body, per request.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, Bytes)>>>);

impl Seen {
    async fn record(&self, request: Request<Incoming>) -> String {
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        self.0.lock().unwrap().push((authorization.clone(), body));
        authorization
    }

    fn all(&self) -> Vec<(String, Bytes)> {
        self.0.lock().unwrap().clone()
    }
}

fn unauthorized() -> http::Response<Body> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        json!({"message": "token rejected"}),
    );
    response
        .headers_mut()
        .insert("x-from", "upstream".parse().unwrap());
    response
}

/// An upstream that refuses the first token it sees (after `holding` requests carrying it have
/// arrived, so that they all get the 401) and accepts any other.
async fn refusing_first_token(
    pki: &TestPki,
    seen: &Seen,
    clock: &Arc<AdvancedClock>,
    holding: usize,
) -> RunningServer {
    let (seen, clock) = (seen.clone(), clock.clone());
    let first = Arc::new(OnceLock::<String>::new());
    let barrier = Arc::new(Barrier::new(holding));
    Upstream::builder()
        .tls(pki)
        .handler(move |request: Request<Incoming>| {
            let (seen, clock) = (seen.clone(), clock.clone());
            let (first, barrier) = (first.clone(), barrier.clone());
            async move {
                let authorization = seen.record(request).await;
                if *first.get_or_init(|| authorization.clone()) == authorization {
                    barrier.wait().await;
                    // Tokens minted within one second are identical (claims are in seconds):
                    // time passes so that a re-minted token differs from the refused one.
                    clock.advance(Duration::from_secs(1));
                    unauthorized()
                } else {
                    json(StatusCode::OK, json!({"ok": true}))
                }
            }
        })
        .start()
        .await
}

async fn always_refusing(pki: &TestPki, seen: &Seen, clock: &Arc<AdvancedClock>) -> RunningServer {
    let (seen, clock) = (seen.clone(), clock.clone());
    Upstream::builder()
        .tls(pki)
        .handler(move |request: Request<Incoming>| {
            let (seen, clock) = (seen.clone(), clock.clone());
            async move {
                seen.record(request).await;
                clock.advance(Duration::from_secs(1));
                unauthorized()
            }
        })
        .start()
        .await
}

const RETRIED_401: &str = r#"idmatch_proxy_upstream_retries_total{reason="unauthorized"}"#;
const RETRIED_CONNECT: &str = r#"idmatch_proxy_upstream_retries_total{reason="connect"}"#;
const NOT_REPLAYED: &str = "idmatch_proxy_unauthorized_not_replayed_total";

#[tokio::test]
async fn a_401_is_replayed_once_with_a_fresh_token() {
    let pki = TestPki::localhost();
    let (seen, clock) = (Seen::default(), Arc::default());
    let upstream = refusing_first_token(&pki, &seen, &clock, 1).await;
    let proxy = Proxy::start_with_clock(&ProxyConfig::new(&upstream.url(BASE), &pki), clock).await;
    let body = json!({"phoneNumber": "+31610000001", "serviceType": "24h"});

    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), body.clone())).await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let seen = seen.all();
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].0, seen[1].0, "the replay carries another token");
    assert_eq!(seen[1].0, proxy.tokens.authorization());
    for (_, received) in &seen {
        assert_eq!(received, body.to_string().as_bytes());
    }
    assert_eq!(proxy.tokens.mint_counts().reauth, 1);
    assert_eq!(scrape(proxy.admin, RETRIED_401).await, 1.0);
}

#[tokio::test]
async fn a_kept_body_that_arrives_in_pieces_is_sent_whole_both_times() {
    let pki = TestPki::localhost();
    let (seen, clock) = (Seen::default(), Arc::default());
    let upstream = refusing_first_token(&pki, &seen, &clock, 1).await;
    let proxy = Proxy::start_with_clock(&ProxyConfig::new(&upstream.url(BASE), &pki), clock).await;
    let body = br#"{"phoneNumber":"+31610000001","serviceType":"24h"}"#;

    // Over h2c each piece is a DATA frame of its own, which the proxy reads as a frame of its
    // own: no timing decides where the body is split.
    let (pieces, received) = mpsc::channel(body.len());
    for piece in body.chunks(20) {
        pieces.try_send(Bytes::from_static(piece)).unwrap();
    }
    drop(pieces);
    let request = Request::post(proxy.url("/sim-swap"))
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(channel_body(received))
        .unwrap();
    let (mut sender, _connection) = h2c_connection(proxy.addr).await;
    let answer = collect(sender.send_request(request).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);

    let seen = seen.all();
    assert_eq!(seen.len(), 2, "refused, then replayed");
    for (_, received) in &seen {
        assert_eq!(received, &body[..]);
    }
}

/// How many connections an HTTP/1.1 upstream accepted for one request whose first token it
/// refused with a 401 whose body came in `chunks` (chunked framing: each chunk a frame of its
/// own on the proxy's side, however the bytes arrive).
async fn connections_for_a_replay_after_a_401_in(chunks: &'static [usize]) -> usize {
    let pki = TestPki::localhost();
    let first = Arc::new(OnceLock::<String>::new());
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(&[b"http/1.1"])
        .handler(move |request: Request<Incoming>| {
            let first = first.clone();
            async move {
                let authorization = request.headers()["authorization"].to_str().unwrap();
                if *first.get_or_init(|| authorization.to_owned()) != authorization {
                    return json(StatusCode::OK, json!({"ok": true}));
                }
                let (tx, rx) = mpsc::channel(chunks.len());
                for &size in chunks {
                    tx.send(Bytes::from(vec![b' '; size])).await.unwrap();
                }
                let mut refused = http::Response::new(channel_body(rx));
                *refused.status_mut() = StatusCode::UNAUTHORIZED;
                refused
            }
        })
        .start()
        .await;
    let proxy = Proxy::start(&ProxyConfig::new(&upstream.url(BASE), &pki)).await;
    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), json!({}))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(upstream.request_count(), 2);
    upstream.connections_accepted()
}

#[tokio::test]
async fn a_refused_401_body_up_to_64_kib_is_read_so_that_the_replay_reuses_its_connection() {
    assert_eq!(
        connections_for_a_replay_after_a_401_in(&[2048, 2048]).await,
        1
    );
    // Past 64 KiB before its end, the body is not worth reading: the connection goes with it.
    let long = &[40 * 1024, 40 * 1024, 1024];
    assert_eq!(connections_for_a_replay_after_a_401_in(long).await, 2);
}

#[tokio::test]
async fn without_the_rate_limiter_an_upstream_429_goes_to_the_client_as_is() {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|_: Request<Incoming>| async {
            json(StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow down"}))
        })
        .start()
        .await;
    // The harness turns the limiter off (`rate_limit.interval = 0s`): no slot to replay in.
    let proxy = Proxy::start(&ProxyConfig::new(&upstream.url(BASE), &pki)).await;
    let client = http1();
    let sent = send(&client, post_json(&proxy.url("/sim-swap"), json!({})));
    let answer = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("answered, not replayed without end");
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.json()["error"], "slow down");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn concurrent_401s_for_one_token_mint_once() {
    const REQUESTS: usize = 8;
    let pki = TestPki::localhost();
    let (seen, clock) = (Seen::default(), Arc::default());
    let upstream = refusing_first_token(&pki, &seen, &clock, REQUESTS).await;
    let proxy = Proxy::start_with_clock(&ProxyConfig::new(&upstream.url(BASE), &pki), clock).await;
    let first = proxy.tokens.authorization();

    let client = http1();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let request = post_json(&proxy.url("/sim-swap"), json!({ "n": i }));
            let client = client.clone();
            tokio::spawn(async move { send(&client, request).await.status })
        })
        .collect();
    let statuses = tokio::time::timeout(Duration::from_secs(30), async {
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(request.await.unwrap());
        }
        statuses
    })
    .await
    .expect("every request is answered");

    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(proxy.tokens.mint_counts().reauth, 1);
    let fresh = proxy.tokens.authorization();
    assert_ne!(fresh, first);
    let seen = seen.all();
    assert_eq!(seen.len(), 2 * REQUESTS);
    let with = |token: &http::HeaderValue| seen.iter().filter(|(a, _)| a == token).count();
    assert_eq!(with(&first), REQUESTS);
    assert_eq!(with(&fresh), REQUESTS);
}

#[tokio::test]
async fn a_second_401_goes_to_the_client_as_is() {
    let pki = TestPki::localhost();
    let (seen, clock) = (Seen::default(), Arc::default());
    let upstream = always_refusing(&pki, &seen, &clock).await;
    let proxy = Proxy::start_with_clock(&ProxyConfig::new(&upstream.url(BASE), &pki), clock).await;

    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), json!({}))).await;

    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.headers.get("proxy-status").is_none());
    assert_eq!(answer.headers["x-from"], "upstream");
    assert_eq!(answer.json(), json!({"message": "token rejected"}));
    assert_eq!(upstream.request_count(), 2);
    // Only the first 401 dropped a token: the second was for one minted just now.
    assert_eq!(proxy.tokens.mint_counts().reauth, 1);
    assert_eq!(scrape(proxy.admin, RETRIED_401).await, 1.0);
}

#[tokio::test]
async fn a_body_too_large_to_keep_is_not_replayed_but_the_token_is_dropped() {
    let pki = TestPki::localhost();
    let (seen, clock) = (Seen::default(), Arc::default());
    let upstream = always_refusing(&pki, &seen, &clock).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES", "16");
    let proxy = Proxy::start_with_clock(&config, clock).await;
    let large = json!({"phoneNumber": "+31610000001", "serviceType": "24h"});
    assert!(large.to_string().len() > 16);

    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), large.clone())).await;

    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.headers.get("proxy-status").is_none());
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(proxy.tokens.mint_counts().reauth, 1);
    assert_eq!(scrape(proxy.admin, NOT_REPLAYED).await, 1.0);
    assert_eq!(scrape(proxy.admin, RETRIED_401).await, 0.0);

    // The next request leaves with the token minted after the 401.
    let fresh = proxy.tokens.authorization();
    send(&http1(), post_json(&proxy.url("/sim-swap"), large)).await;
    let seen = seen.all();
    assert_ne!(seen[1].0, seen[0].0);
    assert_eq!(seen[1].0, fresh);
}

/// A TCP relay in front of the upstream that closes the first connection it accepts before a
/// byte is exchanged (so the proxy's TLS handshake fails) and relays every later one.
struct DropsFirstConnection {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl DropsFirstConnection {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for DropsFirstConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ok_upstream(pki: &TestPki) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(|_: Request<Incoming>| async { json(StatusCode::OK, json!({"ok": true})) })
        .start()
        .await
}

#[tokio::test]
async fn a_connection_lost_before_the_request_was_written_is_retried_once() {
    let pki = TestPki::localhost();
    let upstream = ok_upstream(&pki).await;
    let relay = DropsFirstConnection::start(upstream.addr()).await;
    // The request's own first connection is the one dropped.
    let config = ProxyConfig::new(&format!("https://{}{BASE}", relay.addr), &pki)
        .set("IDMATCH_UPSTREAM_KEEP_WARM", "0s");
    let proxy = Proxy::start(&config).await;

    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), json!({}))).await;

    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(relay.accepted(), 2);
    assert_eq!(upstream.request_count(), 1);
    assert_eq!(scrape(proxy.admin, RETRIED_CONNECT).await, 1.0);
}

#[tokio::test]
async fn a_streamed_request_is_never_retried() {
    let pki = TestPki::localhost();
    let upstream = ok_upstream(&pki).await;
    let relay = DropsFirstConnection::start(upstream.addr()).await;
    let config = ProxyConfig::new(&format!("https://{}{BASE}", relay.addr), &pki)
        .set("IDMATCH_UPSTREAM_KEEP_WARM", "0s");
    let proxy = Proxy::start(&config).await;

    // Chunked: its length is unknown until it ends, so it is streamed, not kept.
    let response = raw(
        proxy.addr,
        b"POST /sim-swap HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          2\r\n{}\r\n0\r\n\r\n",
    )
    .await;

    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        response.contains("proxy-status: idmatch-proxy; error="),
        "{response}"
    );
    assert_eq!(relay.accepted(), 1);
    assert_eq!(upstream.request_count(), 0);
    assert_eq!(scrape(proxy.admin, RETRIED_CONNECT).await, 0.0);
}

#[tokio::test]
async fn a_content_length_over_the_limit_is_refused_before_the_upstream() {
    let pki = TestPki::localhost();
    let upstream = ok_upstream(&pki).await;
    let config =
        ProxyConfig::new(&upstream.url(BASE), &pki).set("IDMATCH_CLIENT_MAX_BODY_BYTES", "1KiB");
    let proxy = Proxy::start(&config).await;
    let client = http1();
    let upload = |size: usize| {
        Request::post(proxy.url("/upload"))
            .body(Full::new(Bytes::from(vec![b'x'; size])))
            .unwrap()
    };

    let refused = send(&client, upload(1025)).await;
    assert_proxy_error(
        &refused,
        StatusCode::PAYLOAD_TOO_LARGE,
        "http_request_denied",
    );
    assert_eq!(upstream.request_count(), 0);

    // Exactly the limit passes.
    assert_eq!(send(&client, upload(1024)).await.status, StatusCode::OK);
}

/// What the upstream made of an upload.
#[derive(Debug, PartialEq, Eq)]
enum Upload {
    /// Data arrived; the total so far.
    Received(usize),
    Complete(usize),
    Aborted(usize),
}

/// Reports every step of each upload it reads, then answers 200.
async fn recording_uploads(
    pki: &TestPki,
    alpn: &[u8],
) -> (RunningServer, mpsc::UnboundedReceiver<Upload>) {
    let (events, received) = mpsc::unbounded_channel();
    let upstream = Upstream::builder()
        .tls(pki)
        .alpn(&[alpn])
        .handler(move |request: Request<Incoming>| {
            let events = events.clone();
            async move {
                let mut body = request.into_body();
                let mut total = 0;
                let end = loop {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                total += data.len();
                                let _ = events.send(Upload::Received(total));
                            }
                        }
                        Some(Err(_)) => break Upload::Aborted(total),
                        None => break Upload::Complete(total),
                    }
                };
                let _ = events.send(end);
                json(StatusCode::OK, json!({}))
            }
        })
        .start()
        .await;
    (upstream, received)
}

fn chunk(size: usize) -> Vec<u8> {
    let mut chunk = format!("{size:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', size));
    chunk.extend_from_slice(b"\r\n");
    chunk
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_aborted_upstream_and_refused() {
    // Over HTTP/2 an aborted request body comes back to the proxy only as a stream reset.
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let pki = TestPki::localhost();
        let (upstream, mut uploads) = recording_uploads(&pki, alpn).await;
        let config = ProxyConfig::new(&upstream.url(BASE), &pki)
            .set("IDMATCH_CLIENT_MAX_BODY_BYTES", "1000");
        let proxy = Proxy::start(&config).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();

        client
            .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        client.write_all(&chunk(600)).await.unwrap();
        // The upstream has the first 600 bytes: the request is under way, not refused early.
        while uploads.recv().await.unwrap() != Upload::Received(600) {}
        client.write_all(&chunk(600)).await.unwrap();

        let (status, head, body) =
            tokio::time::timeout(Duration::from_secs(10), read_response(&mut client))
                .await
                .expect("an answer");
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(": "))
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect::<http::HeaderMap>();
        let answer = Answer {
            status,
            headers,
            body: body.into(),
        };
        assert_proxy_error(
            &answer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "http_request_denied",
        );

        let end = tokio::time::timeout(Duration::from_secs(10), uploads.recv())
            .await
            .expect("the upstream sees the end of the upload");
        assert_eq!(end, Some(Upload::Aborted(600)), "{alpn:?}");
    }
}
