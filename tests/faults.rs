//! Upstream faults the mock server will not produce on request (a reset before the response
//! head or in the middle of its body, a body that stalls, HTTP/2 GOAWAY with streams in flight,
//! pooled connections the upstream closes) and clients that disconnect mid-upload or
//! mid-download. After each fault the proxy is ready and serves the next request.
//!
//! Refused connections, DNS, certificates and stalled handshakes or heads: `tests/refusals.rs`.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idmatch_mock::server::json;
use idmatch_mock::{Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// What a broken response announces (`Content-Length`) and what it sends of that before failing.
const ANNOUNCED: usize = 100_000;
const PART: usize = 1_000;

/// After a fault: ready, and the next request is answered by the upstream.
async fn assert_healthy(proxy: &Proxy, client: &HttpClient) {
    let ready = send(client, get(&format!("http://{}/readyz", proxy.admin))).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    let next = send(client, get(&proxy.url("/ok"))).await;
    assert_eq!(next.status, StatusCode::OK, "{:?}", next.body);
    assert!(next.headers.get("proxy-status").is_none());
}

/// Reads a response body to its end or its first error: the bytes received, and whether it
/// ended cleanly.
async fn read_body(mut body: Incoming) -> (usize, bool) {
    let mut received = 0;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(_)) => return (received, false),
            None => return (received, true),
        }
    }
}

/// A task aborted when dropped, so that a test's servers die with it.
struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/1.1 upstream: what it does with a request depends on its path.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// Held-open connections (`/stall`) that the proxy closed.
    closed_by_proxy: AtomicUsize,
    /// Idle keep-alive connections this side closed.
    closed_idle: AtomicUsize,
    /// Lets a half-sent body be reset: the test says when the client has the part.
    proceed: Notify,
}

/// A TLS upstream speaking HTTP/1.1 by hand, so that it can fail at a precise byte:
/// - `…/reset`: reads the whole request, then resets the connection (RST, `SO_LINGER` 0);
/// - `…/reset-mid-body`: a head announcing `ANNOUNCED` bytes, `PART` of them, then RST once
///   told to `proceed` (a reset discards what the kernel has not sent yet);
/// - `…/reset-mid-chunked`: the same with a chunked body;
/// - `…/stall`: the same head and part, then silence until the proxy closes the connection;
/// - anything else: 200 `{"ok":true}`, keep-alive (closed after `keep_alive` idle, if set).
struct Scripted {
    addr: SocketAddr,
    seen: Arc<Seen>,
    _accepting: Background,
}

impl Scripted {
    async fn start(pki: &TestPki, keep_alive: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(pki.server_config(&[b"http/1.1"]));
        let seen = Arc::new(Seen::default());
        let counted = seen.clone();
        let accepting = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    accepted = listener.accept() => {
                        let (tcp, _) = accepted.unwrap();
                        counted.connections.fetch_add(1, Ordering::SeqCst);
                        connections.spawn(serve_scripted(acceptor.clone(), tcp, counted.clone(), keep_alive));
                    }
                }
            }
        });
        Self {
            addr,
            seen,
            _accepting: Background(accepting),
        }
    }

    fn url(&self) -> String {
        format!("https://{}{BASE}", self.addr)
    }

    fn requests(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }
}

async fn serve_scripted(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    seen: Arc<Seen>,
    keep_alive: Option<Duration>,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = Vec::new();
    let mut answered = false;
    loop {
        let target = match keep_alive.filter(|_| answered) {
            Some(idle) => {
                let read = tokio::time::timeout(idle, read_request(&mut tls, &mut buf)).await;
                match read {
                    Ok(target) => target,
                    Err(_) => {
                        let _ = tls.shutdown().await;
                        seen.closed_idle.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            None => read_request(&mut tls, &mut buf).await,
        };
        let Some(target) = target else { return };
        seen.requests.fetch_add(1, Ordering::SeqCst);
        let head = |framing: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n{framing}\r\n\r\n"
            )
        };
        let part = vec![b'x'; PART];
        match target.strip_prefix(BASE).unwrap_or(&target) {
            "/reset" => return reset(tls),
            // Read, then closed cleanly without an answer, as when an idle timeout fires.
            "/close" => {
                let _ = tls.shutdown().await;
                return;
            }
            "/reset-mid-body" => {
                let head = head(&format!("content-length: {ANNOUNCED}"));
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&part).await;
                let _ = tls.flush().await;
                seen.proceed.notified().await;
                return reset(tls);
            }
            "/reset-mid-chunked" => {
                let _ = tls
                    .write_all(head("transfer-encoding: chunked").as_bytes())
                    .await;
                let _ = tls.write_all(format!("{PART:x}\r\n").as_bytes()).await;
                let _ = tls.write_all(&part).await;
                let _ = tls.write_all(b"\r\n").await;
                let _ = tls.flush().await;
                seen.proceed.notified().await;
                return reset(tls);
            }
            "/stall" => {
                let head = head(&format!("content-length: {ANNOUNCED}"));
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&part).await;
                let _ = tls.flush().await;
                let mut sink = [0u8; 1024];
                while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
                seen.closed_by_proxy.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ => {
                let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                if tls.write_all(ok.as_bytes()).await.is_err() {
                    return;
                }
                answered = true;
            }
        }
    }
}

/// Closes with a TCP RST rather than a FIN: `SO_LINGER` 0, then close.
fn reset(tls: TlsStream<TcpStream>) {
    tls.get_ref().0.set_zero_linger().unwrap();
    drop(tls);
}

/// Reads one request (head and `Content-Length` or chunked body) and returns its target; `None`
/// at the end of the connection.
async fn read_request<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    let head_end = loop {
        if let Some(at) = find(buf, b"\r\n\r\n") {
            break at + 4;
        }
        fill(io, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let target = head.split(' ').nth(1)?.to_owned();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|value| value.trim().parse::<usize>().unwrap());
    let end = match length {
        Some(length) => head_end + length,
        None if lower.contains("transfer-encoding: chunked") => loop {
            // The last chunk, right after the head (empty body) or after a chunk's CRLF.
            if let Some(at) = find(&buf[head_end - 2..], b"\r\n0\r\n\r\n") {
                break head_end - 2 + at + 7;
            }
            fill(io, buf).await?;
        },
        None => head_end,
    };
    while buf.len() < end {
        fill(io, buf).await?;
    }
    buf.drain(..end);
    Some(target)
}

async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match io.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn scripted_stack(
    keep_alive: Option<Duration>,
    settings: &[(&str, &str)],
) -> (Scripted, Proxy) {
    let pki = TestPki::localhost();
    let upstream = Scripted::start(&pki, keep_alive).await;
    let mut config = ProxyConfig::new(&upstream.url(), &pki);
    for (key, value) in settings {
        config = config.set(key, value);
    }
    let proxy = Proxy::start(&config).await;
    // The proxy's temporary directory (its CA file) is read at start only.
    drop(config);
    (upstream, proxy)
}

// ---------------------------------------------------------------------------------------------
// Resets, stalls and closes on HTTP/1.1.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_connection_closed_before_the_answer_resends_an_idempotent_request_once_and_no_post() {
    let (upstream, proxy) = scripted_stack(None, &[]).await;
    let url = proxy.url("/close");
    let client = http1();
    for (request, sent) in [(get(&url), 2), (post_json(&url, json!({})), 1)] {
        let before = upstream.requests();
        let answer = send(&client, request).await;
        assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "connection_terminated");
        // A GET may be sent again (RFC 9112 §9.3.1), once; a POST the upstream read never.
        assert_eq!(upstream.requests() - before, sent);
    }
    assert_healthy(&proxy, &client).await;
}

#[tokio::test]
async fn a_reset_before_the_response_head_is_a_json_502_and_never_resent() {
    let (upstream, proxy) = scripted_stack(None, &[]).await;
    let url = proxy.url("/reset");
    for client in [http1(), h2c()] {
        // A kept body (none, and small JSON), which a connect failure would replay, and one too
        // large to keep, which streams. The first goes out on a new upstream connection, the
        // others on the one `assert_healthy` left in the pool.
        let requests = [
            get(&url),
            post_json(&url, json!({"phoneNumber": "+31610000001"})),
            Request::post(&url)
                .body(Full::new(Bytes::from(vec![b'b'; 100 * 1024])))
                .unwrap(),
        ];
        for request in requests {
            let before = upstream.requests();
            let answer = send(&client, request).await;
            assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "connection_terminated");
            // The upstream had read the request: it may have acted on it, so no second attempt.
            assert_eq!(upstream.requests() - before, 1);
            assert_healthy(&proxy, &client).await;
        }
    }
}

#[tokio::test]
async fn a_reset_mid_body_aborts_the_response_instead_of_completing_it() {
    let (upstream, proxy) = scripted_stack(None, &[]).await;
    for path in ["/reset-mid-body", "/reset-mid-chunked"] {
        for client in [http1(), h2c()] {
            let response = client.request(get(&proxy.url(path))).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers().get("proxy-status").is_none());
            let mut body = response.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            upstream.seen.proceed.notify_one();
            let (rest, clean) = read_body(body).await;
            assert!(!clean, "{path}: an aborted body must not end cleanly");
            assert!(
                first.len() + rest <= PART,
                "{path}: {} bytes",
                first.len() + rest
            );
            assert_healthy(&proxy, &client).await;
        }

        // On the wire, HTTP/1.1: the head, part of the body, then the connection closes.
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        while find(&response, b"\r\n\r\n").is_none_or(|at| response.len() == at + 4) {
            fill(&mut stream, &mut response)
                .await
                .expect("the head and some body");
        }
        upstream.seen.proceed.notify_one();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response));
        // A reset by the proxy is as good as a close: either way the client gets no more.
        let _ = read.await.expect("the proxy closes the connection");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let head_end = find(&response, b"\r\n\r\n").unwrap() + 4;
        let body = &response[head_end..];
        if path == "/reset-mid-body" {
            assert!(
                text.contains(&format!("content-length: {ANNOUNCED}")),
                "{text}"
            );
            assert!(body.len() < ANNOUNCED, "{} bytes", body.len());
        } else {
            // Chunked again by the proxy, and without the last chunk.
            assert!(text.contains("transfer-encoding: chunked"), "{text}");
            assert!(!body.ends_with(b"0\r\n\r\n"), "completed: {text}");
        }
    }
}

#[tokio::test]
async fn a_stalled_body_is_aborted_after_the_response_timeout() {
    let (upstream, proxy) =
        scripted_stack(None, &[("IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", "500ms")]).await;
    for (round, client) in [http1(), h2c()].into_iter().enumerate() {
        let response = client.request(get(&proxy.url("/stall"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(10), read_body(response.into_body()));
        let (received, clean) = read.await.expect("a stalled body is not waited on forever");
        let waited = started.elapsed();
        assert!(
            !clean && received == PART,
            "{received} bytes, clean: {clean}"
        );
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // The stalled upstream connection is closed, not left in the pool.
        eventually(Duration::from_secs(5), "upstream connection closed", || {
            std::future::ready(upstream.seen.closed_by_proxy.load(Ordering::SeqCst) == round + 1)
        })
        .await;
        assert_healthy(&proxy, &client).await;
    }
    let in_flight = scrape(proxy.admin, "idmatch_proxy_requests_in_flight").await;
    assert_eq!(in_flight, 0.0);
}

#[tokio::test]
async fn a_slow_reader_is_not_mistaken_for_a_stalled_upstream() {
    let pki = TestPki::localhost();
    // 8 MiB at once: more than the socket buffers hold, so the upstream waits on the client.
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|_: Request<Incoming>| async {
            http::Response::new(idmatch_mock::server::full(vec![b'z'; 8 << 20]))
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", "300ms");
    let proxy = Proxy::start(&config).await;
    for client in [http1(), h2c()] {
        let response = client.request(get(&proxy.url("/big"))).await.unwrap();
        let mut body = response.into_body();
        let mut received = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
        // The client reads nothing for longer than the timeout; the upstream is not silent.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let (rest, clean) = read_body(body).await;
        received += rest;
        assert!(clean, "cut after {received} bytes");
        assert_eq!(received, 8 << 20);
    }
}

#[tokio::test]
async fn pooled_connections_the_upstream_closed_are_not_reused() {
    let (upstream, proxy) = scripted_stack(Some(Duration::from_millis(100)), &[]).await;
    let client = http1();
    for round in 1..=3 {
        let answer = send(&client, get(&proxy.url("/ok"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        // The upstream closes the idle connection; the next request goes out on a new one.
        eventually(Duration::from_secs(5), "idle connection closed", || {
            std::future::ready(upstream.seen.closed_idle.load(Ordering::SeqCst) == round)
        })
        .await;
    }
    assert_eq!(upstream.requests(), 3);
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 3);
    assert_healthy(&proxy, &client).await;
}

#[tokio::test]
async fn connections_closed_right_after_each_answer_fail_no_request() {
    // Keep-alive of zero: the upstream closes every connection as soon as it has answered, so
    // the proxy races the close with the next request; the pool must lose no request.
    let (upstream, proxy) = scripted_stack(Some(Duration::ZERO), &[]).await;
    let client = http1();
    let mut failed = Vec::new();
    for _ in 0..200 {
        let answer = send(&client, get(&proxy.url("/ok"))).await;
        if answer.status != StatusCode::OK {
            failed.push(String::from_utf8_lossy(&answer.body).into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(upstream.requests(), 200);
    assert_healthy(&proxy, &client).await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 GOAWAY while streams are open, frame by frame.
// ---------------------------------------------------------------------------------------------

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// Type, flags, stream id and payload.
type RawFrame = (u8, u8, u32, Vec<u8>);

async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> Option<RawFrame> {
    let mut header = [0u8; 9];
    io.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((header[3], header[4], stream, payload))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// `:status: 200` (HPACK static index 8) and a two-byte body.
fn answer(stream: u32) -> Vec<u8> {
    let mut out = frame(HEADERS, END_HEADERS, stream, &[0x88]);
    out.extend(frame(DATA, END_STREAM, stream, b"{}"));
    out
}

#[derive(Default)]
struct GoAwayScript {
    connections: AtomicUsize,
    /// `(connection, stream)` of every request head received.
    streams: Mutex<Vec<(usize, u32)>>,
    /// The `last_stream_id` sent in GOAWAY, once sent.
    last: Mutex<Option<u32>>,
    /// Lets the first connection answer its streams up to `last`, then close.
    release: Notify,
}

/// An h2 upstream whose first connection answers its first stream, waits for three more,
/// sends GOAWAY naming the second of them as the last it will process, and on `release`
/// answers the streams up to that one and closes. Later connections answer every stream.
async fn goaway_upstream(pki: &TestPki, script: Arc<GoAwayScript>) -> (SocketAddr, Background) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server_config(&[b"h2"]));
    let accepting = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let (tcp, _) = accepted.unwrap();
                    let index = script.connections.fetch_add(1, Ordering::SeqCst);
                    connections.spawn(serve_h2(acceptor.clone(), tcp, index, script.clone()));
                }
            }
        }
    });
    (addr, Background(accepting))
}

async fn serve_h2(acceptor: TlsAcceptor, tcp: TcpStream, index: usize, script: Arc<GoAwayScript>) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut preface = [0u8; 24];
    if reader.read_exact(&mut preface).await.is_err() {
        return;
    }
    let (frames, mut incoming) = mpsc::unbounded_channel();
    let _reading = Background(tokio::spawn(async move {
        while let Some(frame) = read_frame(&mut reader).await {
            if frames.send(frame).is_err() {
                break;
            }
        }
    }));
    let _ = writer.write_all(&frame(SETTINGS, 0, 0, &[])).await;
    let mut held = Vec::new();
    loop {
        let (kind, flags, stream, payload) = tokio::select! {
            received = incoming.recv() => match received {
                Some(frame) => frame,
                None => return,
            },
            () = script.release.notified(), if index == 0 && script.last.lock().unwrap().is_some() => {
                for stream in held.drain(..) {
                    let _ = writer.write_all(&answer(stream)).await;
                }
                let _ = writer.flush().await;
                let _ = writer.shutdown().await;
                return;
            }
        };
        let mut out = Vec::new();
        match kind {
            SETTINGS if flags & ACK == 0 => out = frame(SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => out = frame(PING, ACK, 0, &payload),
            HEADERS => {
                script.streams.lock().unwrap().push((index, stream));
                let mut last = script.last.lock().unwrap();
                if index > 0 || stream == 1 {
                    out = answer(stream);
                } else if last.is_none() {
                    held.push(stream);
                    if held.len() == 3 {
                        // Streams up to the second will be processed; the third was not.
                        let id = held[1];
                        held.truncate(2);
                        *last = Some(id);
                        let mut payload = id.to_be_bytes().to_vec();
                        payload.extend(0u32.to_be_bytes()); // NO_ERROR
                        out = frame(GOAWAY, 0, 0, &payload);
                    }
                }
                // Streams opened after GOAWAY on this connection are ignored (RFC 9113 §6.8).
            }
            _ => {}
        }
        if !out.is_empty() && writer.write_all(&out).await.is_err() {
            return;
        }
        let _ = writer.flush().await;
    }
}

/// RFC 9113 §6.8: streams up to GOAWAY's last stream id complete; a stream above it was not
/// processed, but the proxy's retry rules (a request is sent again only if it was never
/// written) do not cover it, so it is a JSON 502 `connection_terminated`, sent once. Requests
/// after the GOAWAY go out on a new connection, even while the old one finishes its streams.
#[tokio::test]
async fn goaway_completes_earlier_streams_and_fails_later_ones_with_a_json_502() {
    let pki = TestPki::localhost();
    let script = Arc::new(GoAwayScript::default());
    let (addr, _upstream) = goaway_upstream(&pki, script.clone()).await;
    let config = ProxyConfig::new(&format!("https://{addr}{BASE}"), &pki);
    let proxy = Proxy::start(&config).await;
    let client = http1();
    // Stream 1 opens the h2 connection that the next three share.
    let warm = send(&client, get(&proxy.url("/warm"))).await;
    assert_eq!(warm.status, StatusCode::OK);

    let (done, mut answers) = mpsc::unbounded_channel();
    for i in 0..3 {
        let (client, url, done) = (client.clone(), proxy.url(&format!("/{i}")), done.clone());
        tokio::spawn(async move {
            let _ = done.send(send(&client, get(&url)).await);
        });
    }
    // The upstream holds the two streams it will process, so the refused one answers first.
    let refused = answers.recv().await.unwrap();
    assert_proxy_error(&refused, StatusCode::BAD_GATEWAY, "connection_terminated");
    assert_eq!(*script.last.lock().unwrap(), Some(5));

    // While the old connection still has streams open, a new request takes a new one.
    let during = send(&client, get(&proxy.url("/during")));
    let during = tokio::time::timeout(Duration::from_secs(10), during)
        .await
        .expect("not sent on the connection that is going away");
    assert_eq!(during.status, StatusCode::OK);
    script.release.notify_one();
    for _ in 0..2 {
        let answer = answers.recv().await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    assert_healthy(&proxy, &client).await;
    // Nothing was sent twice, and nothing more on the first connection after its GOAWAY.
    let streams = script.streams.lock().unwrap().clone();
    assert_eq!(streams, [(0, 1), (0, 3), (0, 5), (0, 7), (1, 1), (1, 3)]);
}

// ---------------------------------------------------------------------------------------------
// Clients that disconnect mid-upload, mid-download and while waiting, against the real binary.
// ---------------------------------------------------------------------------------------------

/// What the upstream saw of the requests whose clients went away.
#[derive(Default)]
struct Tally {
    started: AtomicUsize,
    /// Ended early: an upload's body failed, or a handler or response body was dropped.
    cut: AtomicUsize,
    /// Uploads read to a clean end: an aborted upload passed on as complete. Must stay 0.
    whole: AtomicUsize,
    /// Told when a request (an upload: with its first chunk) reaches the upstream.
    arrivals: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

impl Tally {
    fn expect(&self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.arrivals.lock().unwrap().insert(id, tx);
        rx
    }

    fn arrived(&self, id: u64) {
        if let Some(tx) = self.arrivals.lock().unwrap().remove(&id) {
            let _ = tx.send(());
        }
    }

    fn count(&self, counter: fn(&Self) -> &AtomicUsize) -> usize {
        counter(self).load(Ordering::SeqCst)
    }
}

/// Counts a cut request when dropped, unless the request ended.
struct Cut {
    tally: Arc<Tally>,
    ended: bool,
}

impl Drop for Cut {
    fn drop(&mut self) {
        if !self.ended {
            self.tally.cut.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `/upload` reads until its body fails; `/download` answers with an [`Endless`] body; `/wait`
/// never answers; `/warm` answers at once.
async fn aborts_upstream(
    pki: &TestPki,
    alpn: &[&[u8]],
    tally: Arc<Tally>,
) -> idmatch_mock::RunningServer {
    Upstream::builder()
        .tls(pki)
        .alpn(alpn)
        .handler(move |request: Request<Incoming>| {
            let tally = tally.clone();
            async move {
                let path = request.uri().path().trim_start_matches(BASE).to_owned();
                if path == "/warm" {
                    return json(StatusCode::OK, json!({}));
                }
                tally.started.fetch_add(1, Ordering::SeqCst);
                let id: u64 = request.headers()["x-abort-id"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let mut cut = Cut {
                    tally: tally.clone(),
                    ended: false,
                };
                match path.as_str() {
                    "/download" => {
                        tally.arrived(id);
                        let body = Endless::new(Bytes::from(vec![b'd'; 16 * 1024]), cut);
                        http::Response::new(body.map_err(|never| match never {}).boxed())
                    }
                    "/wait" => {
                        tally.arrived(id);
                        std::future::pending().await
                    }
                    _ => {
                        let mut body = request.into_body();
                        while let Some(frame) = body.frame().await {
                            if frame.is_err() {
                                return json(StatusCode::OK, json!({}));
                            }
                            tally.arrived(id);
                        }
                        cut.ended = true;
                        tally.whole.fetch_add(1, Ordering::SeqCst);
                        json(StatusCode::OK, json!({}))
                    }
                }
            }
        })
        .start()
        .await
}

/// An upload body fed by the test; it ends only if the test drops the feed.
struct Feed(mpsc::Receiver<Bytes>);

impl Body for Feed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// When the client goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abort {
    /// After the upstream has the head and the first chunk of a chunked upload.
    Upload,
    /// After the response head and the first body bytes.
    Download,
    /// While the upstream holds the request without answering.
    Wait,
}

impl Abort {
    fn path(self) -> &'static str {
        match self {
            Self::Upload => "/upload",
            Self::Download => "/download",
            Self::Wait => "/wait",
        }
    }
}

/// Sends one request over a new HTTP/1.1 connection, waits for the moment `abort` names, and
/// closes the socket.
async fn abort_http1(proxy: SocketAddr, abort: Abort, id: u64, tally: &Tally) {
    let arrived = tally.expect(id);
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let (method, framing) = match abort {
        Abort::Upload => ("POST", "transfer-encoding: chunked\r\n"),
        _ => ("GET", ""),
    };
    let path = abort.path();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\nx-abort-id: {id}\r\n{framing}\r\n")
            .into_bytes();
    if abort == Abort::Upload {
        request.extend(b"4000\r\n");
        request.extend([b'u'; 0x4000]);
        request.extend(b"\r\n");
    }
    stream.write_all(&request).await.unwrap();
    let mut received = Vec::new();
    if abort == Abort::Download {
        while find(&received, b"\r\n\r\n").is_none_or(|at| received.len() == at + 4) {
            fill(&mut stream, &mut received)
                .await
                .expect("a response head and some body");
        }
        let head = String::from_utf8_lossy(&received);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    } else {
        tokio::select! {
            _ = arrived => {}
            _ = stream.read_to_end(&mut received) => {
                panic!("answered early: {}", String::from_utf8_lossy(&received));
            }
        }
    }
}

/// The same over a new h2c connection. With `reset_stream` the client cancels the stream
/// (`RST_STREAM`) before it closes the connection; without, it only closes the connection.
async fn abort_h2c(proxy: SocketAddr, abort: Abort, id: u64, tally: &Tally, reset_stream: bool) {
    let arrived = tally.expect(id);
    // hyper's connection task owns the socket and outlives a dropped connection handle while
    // streams remain; a second handle on the socket lets the test disconnect at once.
    let tcp = TcpStream::connect(proxy).await.unwrap().into_std().unwrap();
    let socket = tcp.try_clone().unwrap();
    let tcp = TcpStream::from_std(tcp).unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let _connection = Background(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let (feed, upload) = mpsc::channel(1);
    let (method, body) = match abort {
        Abort::Upload => ("POST", Either::Left(Feed(upload))),
        _ => ("GET", Either::Right(Empty::new())),
    };
    let request = |method: &str, path: &str, body| {
        Request::builder()
            .method(method)
            .uri(format!("http://{proxy}{path}"))
            .header("x-abort-id", id)
            .body(body)
            .unwrap()
    };
    if abort == Abort::Upload {
        feed.send(Bytes::from(vec![b'u'; 0x4000])).await.unwrap();
    }
    let mut response = Box::pin(sender.send_request(request(method, abort.path(), body)));
    let mut downloading = None;
    if abort == Abort::Download {
        let answer = (&mut response).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let mut body = answer.into_body();
        body.frame().await.unwrap().unwrap();
        downloading = Some(body);
    } else {
        tokio::select! {
            _ = arrived => {}
            answered = &mut response => panic!("answered early: {answered:?}"),
        }
    }
    let stream = (response, downloading);
    // hyper's client resets a stream once nothing refers to it; an upload's body still does.
    if reset_stream && abort != Abort::Upload {
        drop(stream);
        // Frames keep their order: once this answer is back, the proxy has had the reset.
        // (The proxy answers TRACE itself, so no upstream connection is opened for it.)
        let trace = request("TRACE", "/", Either::Right(Empty::new()));
        sender.ready().await.unwrap();
        let answer = sender.send_request(trace).await.unwrap();
        assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
        socket.shutdown(std::net::Shutdown::Both).unwrap();
    } else {
        // Everything of the stream lives until the socket is shut: dropped, the response
        // future or body would reset the stream, and the feed would end the upload cleanly, as
        // a client that finished it.
        socket.shutdown(std::net::Shutdown::Both).unwrap();
        drop(stream);
    }
    drop(feed);
}

/// Client aborts per test; each takes about a millisecond of the two cores in a debug build.
const ABORTS: u64 = 10_000;
const CONCURRENCY: usize = 64;
/// Open descriptors allowed above the baseline afterwards: a scrape's admin connection, and
/// a second pooled upstream connection.
const FD_SLACK: usize = 4;

/// `ABORTS` requests, each abandoned by its client at one of the three moments over HTTP/1.1 or
/// h2c; then every upstream request has ended, none was retried, no upload was passed on as
/// complete, and the proxy's in-flight gauge and open descriptors are back where they started.
async fn client_aborts_leave_nothing_behind(alpn: &[&[u8]]) {
    let pki = TestPki::localhost();
    let tally = Arc::new(Tally::default());
    let upstream = aborts_upstream(&pki, alpn, tally.clone()).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Binary::serve(&config.env);
    let (pid, admin, addr) = (proxy.pid(), proxy.admin, proxy.addr);
    // A pooled upstream connection and a first scrape before the baseline.
    let client = http1();
    let warm = send(&client, get(&proxy.url("/warm"))).await;
    assert_eq!(warm.status, StatusCode::OK);
    assert_eq!(scrape(admin, "idmatch_proxy_requests_in_flight").await, 0.0);
    let baseline = open_fds(pid);

    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..ABORTS {
        let slot = slots.clone().acquire_owned().await.unwrap();
        let abort = [Abort::Upload, Abort::Download, Abort::Wait][id as usize % 3];
        // HTTP/1.1 half the time; h2c, disconnecting, or resetting the stream first.
        let how = id / 3 % 4;
        let tally = tally.clone();
        tasks.spawn(async move {
            let aborting = async {
                match how {
                    0 | 2 => abort_http1(addr, abort, id, &tally).await,
                    1 => abort_h2c(addr, abort, id, &tally, false).await,
                    _ => abort_h2c(addr, abort, id, &tally, true).await,
                }
            };
            let limit = Duration::from_secs(20);
            if tokio::time::timeout(limit, aborting).await.is_err() {
                panic!("{abort:?} #{id} ({how}) stuck");
            }
            drop(slot);
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let aborted = started.elapsed();

    let total = ABORTS as usize;
    eventually(
        Duration::from_secs(20),
        "every upstream request ended",
        || std::future::ready(tally.count(|t| &t.cut) == total),
    )
    .await;
    let ended = started.elapsed() - aborted;
    assert_eq!(tally.count(|t| &t.started), total, "each reached it once");
    assert_eq!(tally.count(|t| &t.whole), 0, "an aborted upload completed");

    eventually(
        Duration::from_secs(20),
        "nothing in flight and open descriptors back to the baseline",
        || async move {
            scrape(admin, "idmatch_proxy_requests_in_flight").await == 0.0
                && open_fds(pid) <= baseline + FD_SLACK
        },
    )
    .await;
    let next = send(&client, get(&proxy.url("/warm"))).await;
    assert_eq!(next.status, StatusCode::OK);
    let logs = proxy.logs();
    assert!(
        !logs.iter().any(|l| l.contains("panicked")),
        "a panic was logged"
    );
    eprintln!(
        "{ABORTS} client aborts in {aborted:?}, all ended upstream {ended:?} later; open fds {baseline} before, {} after",
        open_fds(pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborts_over_an_h2_upstream_leak_nothing() {
    client_aborts_leave_nothing_behind(&[b"h2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborts_over_an_http1_upstream_leak_nothing() {
    client_aborts_leave_nothing_behind(&[b"http/1.1"]).await;
}
