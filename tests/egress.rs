//! The egress proxy: requests reach the upstream through a `CONNECT` tunnel that carries only
//! TLS, and the proxy's failures are reported as the proxy's, not the upstream's.

mod support;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, StatusCode, Version};
use idmatch_mock::server::json;
use idmatch_mock::{MockApi, RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How the test proxy answers `CONNECT`.
#[derive(Clone, Copy)]
enum Policy {
    /// Opens every tunnel.
    Open,
    /// Opens tunnels only for this exact `Proxy-Authorization`; 407 otherwise.
    Credentials(&'static str),
    /// Answers with this status, e.g. `403 Forbidden`, and closes.
    Refuse(&'static str),
}

/// One `CONNECT` request as the proxy received it.
#[derive(Clone, Debug)]
struct Connect {
    target: String,
    /// Header lines in order, names lowercased.
    headers: Vec<(String, String)>,
}

impl Connect {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(candidate, _)| candidate == name)
            .map(|(_, value)| value.as_str())
    }
}

#[derive(Default)]
struct Seen {
    accepted: usize,
    connects: Vec<Connect>,
    /// Every byte read from the sidecar: `CONNECT` heads and tunnelled bytes alike.
    bytes: Vec<u8>,
}

/// A `CONNECT` proxy on 127.0.0.1:0 that records everything the sidecar sends it.
struct EgressProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    async fn start(policy: Policy) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                recorder.lock().unwrap().accepted += 1;
                let tap = Tap {
                    stream,
                    seen: recorder.clone(),
                };
                tokio::spawn(serve(tap, policy));
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.seen.lock().unwrap().accepted
    }

    fn connects(&self) -> Vec<Connect> {
        self.seen.lock().unwrap().connects.clone()
    }

    fn bytes(&self) -> Vec<u8> {
        self.seen.lock().unwrap().bytes.clone()
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection: read and record the `CONNECT`, answer by `policy`, then relay both ways.
async fn serve(mut client: Tap, policy: Policy) {
    let Some(connect) = read_connect(&mut client).await else {
        return;
    };
    let refusal = match policy {
        Policy::Open => None,
        Policy::Credentials(expected)
            if connect.header("proxy-authorization") == Some(expected) =>
        {
            None
        }
        Policy::Credentials(_) => Some("407 Proxy Authentication Required"),
        Policy::Refuse(status) => Some(status),
    };
    // Recorded before answering, so a test that has its response sees it.
    client.seen.lock().unwrap().connects.push(connect.clone());
    if let Some(status) = refusal {
        let answer = format!(
            "HTTP/1.1 {status}\r\nProxy-Authenticate: Basic realm=\"egress\"\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(&connect.target).await else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// Reads a request head byte by byte, so that nothing after it is consumed.
async fn read_connect(client: &mut Tap) -> Option<Connect> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(client.read_u8().await.ok()?);
    }
    let head = String::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let target = match lines.next()?.split(' ').collect::<Vec<_>>()[..] {
        ["CONNECT", target, "HTTP/1.1"] => target.to_owned(),
        _ => return None,
    };
    let headers = lines
        .filter_map(|line| line.split_once(": "))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
        .collect();
    Some(Connect { target, headers })
}

/// The proxy's end of the sidecar's connection, keeping a copy of every byte read from it.
struct Tap {
    stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        this.seen.lock().unwrap().bytes.extend_from_slice(read);
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The Mobile Identity API mock over TLS, for `localhost`, `127.0.0.1` and `::1`.
async fn api(pki: &TestPki) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(MockApi::new(KEY_ID, SECRET))
        .start()
        .await
}

/// A sidecar in front of `upstream_url`, trusting `pki`, with `settings` on top.
async fn sidecar(upstream_url: &str, pki: &TestPki, settings: &[(&str, &str)]) -> Proxy {
    let config = settings.iter().fold(
        ProxyConfig::new(upstream_url, pki),
        |config, (key, value)| config.set(key, value),
    );
    Proxy::start(&config).await
}

/// The API mock presenting `pki`'s certificate, an open egress proxy, and a sidecar that
/// tunnels to the one through the other, with `settings` besides.
async fn through_open_proxy(
    pki: &TestPki,
    settings: &[(&str, &str)],
) -> (RunningServer, EgressProxy, Proxy) {
    let upstream = api(pki).await;
    let egress = EgressProxy::start(Policy::Open).await;
    let url = egress.url();
    let settings = [&[("IDMATCH_UPSTREAM_PROXY", url.as_str())], settings].concat();
    let proxy = sidecar(&upstream.url(BASE), pki, &settings).await;
    (upstream, egress, proxy)
}

/// A Mobile Identity API call that the mock answers with 200 only if the token is valid.
fn sim_swap(proxy: &Proxy) -> Request<http_body_util::Full<bytes::Bytes>> {
    post_json(
        &proxy.url("/sim-swap"),
        json!({"phoneNumber": "+31610000001", "serviceType": "24h"}),
    )
}

#[tokio::test]
async fn requests_reach_the_upstream_through_the_tunnel() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    let egress = EgressProxy::start(Policy::Open).await;
    // By name: the proxy resolves it, and our TLS checks the certificate against it.
    let authority = format!("localhost:{}", upstream.addr().port());
    let proxy = sidecar(
        &format!("https://{authority}{BASE}"),
        &pki,
        &[("HTTPS_PROXY", &egress.url())],
    )
    .await;

    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.json(), json!({"state": "success", "24h": false}));

    let connects = egress.connects();
    assert_eq!(connects.len(), 1);
    assert_eq!(connects[0].target, authority);
    assert_eq!(connects[0].header("host"), Some(authority.as_str()));
    assert_eq!(connects[0].header("proxy-authorization"), None);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0]
        .header("authorization")
        .is_some_and(|value| value.starts_with(b"Bearer ")));
}

#[tokio::test]
async fn the_egress_proxy_sees_only_ciphertext() {
    let pki = TestPki::localhost();
    let (upstream, egress, proxy) = through_open_proxy(&pki, &[]).await;
    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);

    let bytes = egress.bytes();
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(bytes.starts_with(b"CONNECT "));
    let tunnelled = &bytes[head_end..];
    let authorization = proxy.tokens.authorization();
    let token = authorization.as_bytes().strip_prefix(b"Bearer ").unwrap();
    // The token crossed the proxy, on its one connection to the upstream...
    assert_eq!(upstream.connections_accepted(), 1);
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some(authorization.as_bytes())
    );
    // ...inside TLS: a handshake record (the ClientHello) first, and nothing legible after.
    assert_eq!(tunnelled[..2], [0x16, 0x03], "{:?}", &tunnelled[..16]);
    for secret in [
        b"Bearer".as_slice(),
        token,
        SECRET.as_bytes(),
        b"+31610000001",
        b"sim-swap",
    ] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{:?} went through the egress proxy in clear",
            String::from_utf8_lossy(secret)
        );
    }
}

#[tokio::test]
async fn userinfo_becomes_proxy_authorization() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    // base64("egress user:p@ss:w0rd"): user and password percent-decoded before encoding.
    let egress =
        EgressProxy::start(Policy::Credentials("Basic ZWdyZXNzIHVzZXI6cEBzczp3MHJk")).await;
    let url = format!("http://egress%20user:p%40ss%3Aw0rd@{}", egress.addr);
    let proxy = sidecar(
        &upstream.url(BASE),
        &pki,
        &[("IDMATCH_UPSTREAM_PROXY", &url)],
    )
    .await;
    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(egress.connects().len(), 1);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn a_proxy_wanting_other_credentials_is_a_502() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    let egress =
        EgressProxy::start(Policy::Credentials("Basic ZWdyZXNzIHVzZXI6cEBzczp3MHJk")).await;
    for (url, says) in [
        (egress.url(), "wants credentials"),
        (format!("http://egress:wrong@{}", egress.addr), "rejected"),
    ] {
        let proxy = sidecar(
            &upstream.url(BASE),
            &pki,
            &[("IDMATCH_UPSTREAM_PROXY", &url)],
        )
        .await;
        let answer = send(&http1(), sim_swap(&proxy)).await;
        let message = assert_proxy_error(
            &answer,
            StatusCode::BAD_GATEWAY,
            "proxy_configuration_error",
        );
        assert!(
            message.contains(&format!("egress proxy {}", egress.addr)),
            "{message}"
        );
        assert!(message.contains(says), "{message}");
        assert!(message.contains("407"), "{message}");
        assert!(
            !message.contains("wrong"),
            "the password is never shown: {message}"
        );
    }
    assert_eq!(upstream.connections_accepted(), 0);
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_is_a_502_naming_its_status() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    for status in ["403 Forbidden", "502 Bad Gateway"] {
        let egress = EgressProxy::start(Policy::Refuse(status)).await;
        let proxy = sidecar(
            &upstream.url(BASE),
            &pki,
            &[("IDMATCH_UPSTREAM_PROXY", &egress.url())],
        )
        .await;
        let answer = send(&http1(), sim_swap(&proxy)).await;
        let message =
            assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "destination_unavailable");
        assert!(
            message.contains(&format!("egress proxy {}", egress.addr)),
            "{message}"
        );
        assert!(message.contains(status), "{message}");
    }
    assert_eq!(upstream.connections_accepted(), 0);
}

#[tokio::test]
async fn proxy_down_is_a_502_naming_the_proxy() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    let down = refusing_port();
    let proxy = sidecar(
        &upstream.url(BASE),
        &pki,
        &[("HTTPS_PROXY", &format!("http://{}", down.addr))],
    )
    .await;
    let answer = send(&http1(), sim_swap(&proxy)).await;
    // Not `connection_refused`, which would blame the upstream.
    let message = assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "destination_unavailable");
    assert!(
        message.starts_with(&format!("cannot connect to the egress proxy {}", down.addr)),
        "{message}"
    );
    assert_eq!(upstream.connections_accepted(), 0);
}

#[tokio::test]
async fn stalled_proxy_is_a_504_within_the_connect_timeout() {
    // Never answers CONNECT.
    let silent = silent_listener().await;
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    let proxy = sidecar(
        &upstream.url(BASE),
        &pki,
        &[
            ("IDMATCH_UPSTREAM_PROXY", &format!("http://{}", silent.addr)),
            ("IDMATCH_UPSTREAM_CONNECT_TIMEOUT", "300ms"),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_proxy_error(&answer, StatusCode::GATEWAY_TIMEOUT, "connection_timeout");
    // Well before the 30 s response timeout: the connect bound covers the CONNECT exchange.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn no_proxy_exempts_the_upstream() {
    let pki = TestPki::localhost();
    let upstream = api(&pki).await;
    let egress = EgressProxy::start(Policy::Open).await;
    let proxy = sidecar(
        &upstream.url(BASE),
        &pki,
        &[
            ("HTTPS_PROXY", &egress.url()),
            ("NO_PROXY", "example.com, 127.0.0.1"),
        ],
    )
    .await;
    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(egress.accepted(), 0, "the proxy was bypassed");
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn one_tunnel_carries_many_requests() {
    let pki = TestPki::localhost();
    let (upstream, egress, proxy) = through_open_proxy(&pki, &[]).await;
    let client = http1();
    for _ in 0..5 {
        let answer = send(&client, sim_swap(&proxy)).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    assert_eq!(egress.accepted(), 1);
    assert_eq!(egress.connects().len(), 1);
    assert_eq!(upstream.connections_accepted(), 1);
    // ALPN went end to end: the upstream, not the proxy, negotiated h2 with us.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 5);
    assert!(requests.iter().all(|r| r.version == Version::HTTP_2));
}

#[tokio::test]
async fn the_upstream_certificate_is_checked_through_the_tunnel() {
    // A certificate valid for another name: the proxy is reached, the upstream is not trusted.
    let other = TestPki::new(&["other.example"]);
    // No connection kept warm, which would try again in the background: the request's
    // connection is the only one.
    let no_warm = [("IDMATCH_UPSTREAM_KEEP_WARM", "0s")];
    let (upstream, egress, proxy) = through_open_proxy(&other, &no_warm).await;
    let answer = send(&http1(), sim_swap(&proxy)).await;
    assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "tls_certificate_error");
    assert_eq!(
        egress.connects().len(),
        1,
        "a certificate error is not retried"
    );
    assert_eq!(upstream.tls_handshakes_completed(), 0);
    assert_eq!(upstream.request_count(), 0, "the token never left");
}

#[tokio::test]
async fn a_plain_http_upstream_is_tunnelled_too() {
    let upstream = Upstream::builder()
        .plain()
        .handler(|_: Request<hyper::body::Incoming>| async { json(StatusCode::OK, json!({})) })
        .start()
        .await;
    let egress = EgressProxy::start(Policy::Open).await;
    let proxy = sidecar(
        &upstream.url(BASE),
        &TestPki::localhost(),
        &[
            ("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", "true"),
            ("IDMATCH_UPSTREAM_PROXY", &egress.url()),
        ],
    )
    .await;
    let answer = send(&http1(), get(&proxy.url("/x"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let connects = egress.connects();
    assert_eq!(connects.len(), 1);
    assert_eq!(connects[0].target, upstream.addr().to_string());
    assert_eq!(upstream.request_count(), 1);
}
