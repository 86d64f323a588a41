//! Soak: many mixed requests through the real binary (successes over HTTP/1.1 and h2c, the
//! upstream's 4xx and 5xx, the proxy's own refusals, responses the upstream breaks off, clients
//! that leave mid-upload and mid-download), then its memory and descriptors are back at their
//! post-warm-up baseline, nothing panicked, and every request that was not abandoned was
//! answered as expected.
//!
//! `IDMATCH_SOAK_REQUESTS` sets the count (default 100,000; 32 at a time).

mod support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use idmatch_mock::server::{json, Body as MockBody, BoxError};
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEFAULT_REQUESTS: usize = 100_000;
const WARM_UP: usize = 5_000;
const CONCURRENCY: usize = 32;
const DOWNLOAD: usize = 64 * 1024;

/// Above the post-warm-up baseline once the clients are gone. Memory: allocator slack, not a
/// leak (100,000 requests leaking 100 bytes each would exceed it). Descriptors: a scrape's
/// admin connection and a second pooled upstream connection.
const RSS_MARGIN_KIB: u64 = 8 * 1024;
const FD_MARGIN: usize = 4;

/// A response body that sends one chunk and then fails: the upstream breaking off mid-body.
struct Broken(bool);

impl Body for Broken {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Ready(Some(Err("the upstream gave up".into())))
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b'b'; 1024])))))
        }
    }
}

async fn upstream(pki: &TestPki) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(|request: Request<Incoming>| async move {
            let path = request.uri().path().trim_start_matches(BASE).to_owned();
            // Uploads are read to their end or their failure, like any server would.
            let _ = request.into_body().collect().await;
            match path.as_str() {
                "/not-found" => json(StatusCode::NOT_FOUND, json!({"message": "no such"})),
                "/unavailable" => json(StatusCode::SERVICE_UNAVAILABLE, json!({})),
                "/download" => {
                    http::Response::new(idmatch_mock::server::full(vec![b'd'; DOWNLOAD]))
                }
                "/broken" => http::Response::new(Broken(false).boxed()),
                "/endless" => {
                    let body: MockBody = Endless::new(Bytes::from_static(&[b'e'; 1024]), ())
                        .map_err(|never| match never {})
                        .boxed();
                    http::Response::new(body)
                }
                _ => json(StatusCode::OK, json!({"ok": true})),
            }
        })
        .start()
        .await
}

/// One request of the mix, chosen by its number; what it got, as an error if unexpected.
async fn one(
    n: usize,
    proxy: SocketAddr,
    http1: &HttpClient,
    h2c: &HttpClient,
) -> Result<Kind, String> {
    let url = |path: &str| format!("http://{proxy}{path}");
    let json_body = || json!({"phoneNumber": "+31610000001", "serviceType": "24h"});
    let (kind, client, request) = match n % 20 {
        0..=5 => (Kind::Ok, http1, get(&url("/number-verify/1"))),
        6 | 7 => (Kind::Ok, http1, post_json(&url("/sim-swap"), json_body())),
        8..=11 => (
            Kind::Ok,
            h2c,
            post_json(&url("/identity-match"), json_body()),
        ),
        12 => (Kind::UpstreamError, http1, get(&url("/not-found"))),
        13 => (Kind::UpstreamError, h2c, get(&url("/unavailable"))),
        14 => (Kind::Refused, http1, trace(&url("/x"))),
        15 => (Kind::Refused, h2c, trace(&url("/x"))),
        16 => (Kind::Ok, h2c, get(&url("/download"))),
        17 => (
            Kind::Broken,
            if n % 40 == 17 { http1 } else { h2c },
            get(&url("/broken")),
        ),
        18 => return abort_download(proxy).await.map(|()| Kind::Aborted),
        _ => return abort_upload(proxy).await.map(|()| Kind::Aborted),
    };
    let response = match client.request(request).await {
        Ok(response) => response,
        // Aborted before even the head was out: as good as after it.
        Err(_) if kind == Kind::Broken => return Ok(kind),
        Err(error) => return Err(format!("#{n} ({kind:?}): {error}")),
    };
    let status = response.status();
    let proxy_status = response.headers().get("proxy-status").cloned();
    let body = response.into_body().collect().await.map(|b| b.to_bytes());
    let fine = match (kind, &body) {
        (Kind::Ok, Ok(body)) => {
            status == StatusCode::OK && (n % 20 != 16 || body.len() == DOWNLOAD)
        }
        (Kind::UpstreamError, Ok(_)) => status.as_u16() >= 400 && proxy_status.is_none(),
        (Kind::Refused, Ok(_)) => {
            status == StatusCode::METHOD_NOT_ALLOWED
                && proxy_status
                    .as_ref()
                    .is_some_and(|v| v == "idmatch-proxy; error=http_request_denied")
        }
        (Kind::Broken, Err(_)) => status == StatusCode::OK,
        // Over h2 the upstream's reset can overtake its head.
        (Kind::Broken, Ok(_)) => {
            status == StatusCode::BAD_GATEWAY
                && proxy_status
                    .as_ref()
                    .is_some_and(|v| v == "idmatch-proxy; error=connection_terminated")
        }
        _ => false,
    };
    match fine {
        true => Ok(kind),
        false => Err(format!(
            "#{n} ({kind:?}): {status} {proxy_status:?} {body:?}"
        )),
    }
}

fn trace(url: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::TRACE)
        .uri(url)
        .body(Full::default())
        .unwrap()
}

/// A response head and some of an endless body, then the client closes its connection.
async fn abort_download(proxy: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed: {}", String::from_utf8_lossy(&received)));
        }
        received.extend_from_slice(&buf[..n]);
        let head = received.windows(4).position(|w| w == b"\r\n\r\n");
        if head.is_some_and(|at| received.len() > at + 4) {
            return match received.starts_with(b"HTTP/1.1 200") {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&received).into_owned()),
            };
        }
    }
}

/// A chunked upload's head and first chunk, then the client closes its connection.
async fn abort_upload(proxy: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let mut request =
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n400\r\n".to_vec();
    request.extend([b'u'; 0x400]);
    request.extend(b"\r\n");
    stream.write_all(&request).await.map_err(|e| e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ok,
    UpstreamError,
    Refused,
    /// The upstream broke the body off: the client sees the head, then an error; or, when the
    /// upstream's reset overtook its head, a JSON 502, or only the error.
    Broken,
    /// The client left.
    Aborted,
}

/// Outcomes of a run.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    aborted: AtomicUsize,
    unexpected: Mutex<Vec<String>>,
}

/// Runs requests `range` of the mix, `CONCURRENCY` at a time, on fresh clients that are
/// dropped (closing their connections) at the end.
async fn run(proxy: SocketAddr, range: std::ops::Range<usize>, tally: Arc<Tally>) {
    let (http1, h2c) = (http1(), h2c());
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for n in range {
        let slot = slots.clone().acquire_owned().await.unwrap();
        let (http1, h2c, tally) = (http1.clone(), h2c.clone(), tally.clone());
        tasks.spawn(async move {
            let limit = Duration::from_secs(30);
            let outcome = tokio::time::timeout(limit, one(n, proxy, &http1, &h2c))
                .await
                .unwrap_or_else(|_| Err(format!("#{n}: no answer within {limit:?}")));
            match outcome {
                Ok(Kind::Aborted) => tally.aborted.fetch_add(1, Ordering::Relaxed),
                Ok(_) => tally.answered.fetch_add(1, Ordering::Relaxed),
                Err(unexpected) => {
                    tally.unexpected.lock().unwrap().push(unexpected);
                    0
                }
            };
            drop(slot);
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Waits, at most 20 s, until the proxy has nothing in flight and its descriptors and memory
/// are within the margins of `baseline`; returns what it last measured.
async fn settle(proxy: &Binary, baseline: Option<(usize, u64)>) -> (usize, u64) {
    let pid = proxy.pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut previous = None;
    loop {
        let in_flight = scrape(proxy.admin, "idmatch_proxy_requests_in_flight").await;
        let now = (open_fds(pid), rss_kib(pid));
        let settled = match baseline {
            Some((fds, rss)) => now.0 <= fds + FD_MARGIN && now.1 <= rss + RSS_MARGIN_KIB,
            // The baseline itself: descriptors stopped changing.
            None => previous == Some(now.0),
        };
        if in_flight == 0.0 && settled {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "in flight {in_flight}; open fds and RSS {now:?} (baseline {baseline:?})"
        );
        previous = Some(now.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_requests_leave_memory_and_descriptors_at_their_baseline() {
    let requests = std::env::var("IDMATCH_SOAK_REQUESTS")
        .map_or(DEFAULT_REQUESTS, |n| n.parse().expect("a request count"));
    let pki = TestPki::localhost();
    let upstream = upstream(&pki).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Binary::serve(&config.env);
    let tally = Arc::new(Tally::default());

    // One request first, so that the one pooled h2 upstream connection exists before the
    // concurrent ones would race to open several.
    run(proxy.addr, 0..1, tally.clone()).await;
    run(proxy.addr, 1..WARM_UP, tally.clone()).await;
    let baseline = settle(&proxy, None).await;

    let started = Instant::now();
    run(proxy.addr, WARM_UP..WARM_UP + requests, tally.clone()).await;
    let took = started.elapsed();
    let after = settle(&proxy, Some(baseline)).await;

    let unexpected = tally.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} unexpected, the first: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    let (answered, aborted) = (
        tally.answered.load(Ordering::SeqCst),
        tally.aborted.load(Ordering::SeqCst),
    );
    assert_eq!(answered + aborted, WARM_UP + requests);
    let logs = proxy.logs();
    assert!(
        !logs.iter().any(|l| l.contains("panicked")),
        "a panic was logged"
    );
    let peak = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let peak = peak
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or_default();
    eprintln!(
        "{requests} requests ({answered} answered, {aborted} abandoned, warm-up included) in {took:?}; \
         fds and RSS KiB {baseline:?} after warm-up, {after:?} after; peak {peak}"
    );
}
