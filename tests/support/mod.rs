//! The integration harness: a TLS upstream built from `idmatch-mock`, the proxy in-process on
//! 127.0.0.1:0, and HTTP/1.1 and h2c clients.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idmatch_mock::{MockApi, RunningServer, Server as Upstream, TestPki};
use idmatch_proxy::config::{Config, Loaded};
use idmatch_proxy::token::{Clock, SystemClock, TokenCache};
use idmatch_proxy::{Listeners, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const KEY_ID: &str = "3b438437-04a4-40bb-8389-54bb02766fba";
pub const SECRET: &str = "AC4Etykn7jusGR5FwLDAtILtQbiQbTMKedP31szXg4WlSbjGEXyNMZ";
pub const BASE: &str = "/mobile-identity/v1";

/// Settings for a proxy in front of `upstream_url`, trusting `pki`'s CA (written to `dir`).
pub struct ProxyConfig {
    pub dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
}

impl ProxyConfig {
    pub fn new(upstream_url: &str, pki: &TestPki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        pki.write_ca(&ca).unwrap();
        let env = [
            ("IDMATCH_LISTEN", "127.0.0.1:0"),
            ("IDMATCH_ADMIN_LISTEN", "127.0.0.1:0"),
            ("IDMATCH_DRAIN_DELAY", "0s"),
            ("IDMATCH_UPSTREAM_URL", upstream_url),
            ("IDMATCH_UPSTREAM_CA_FILE", ca.to_str().unwrap()),
            ("IDMATCH_KEY_ID", KEY_ID),
            ("IDMATCH_SECRET", SECRET),
            // Unpaced, so that tests of everything else run at full speed; the limiter's own
            // tests turn it on.
            ("IDMATCH_RATE_LIMIT_INTERVAL", "0s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self { dir, env }
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn load(&self) -> Loaded {
        Config::from_parts(None, &self.env).expect("valid test configuration")
    }
}

/// The proxy, serving in-process until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The callback listener, when the configuration has one.
    pub callback: Option<SocketAddr>,
    pub tokens: Arc<TokenCache>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(config: &ProxyConfig) -> Self {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// The proxy with `clock` for its tokens.
    pub async fn start_with_clock(config: &ProxyConfig, clock: Arc<dyn Clock>) -> Self {
        let loaded = config.load();
        let server = Server::with_clock(&loaded.config, clock).expect("server builds");
        let tokens = server.tokens().clone();
        let callback = match &loaded.config.callback {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            callback,
        };
        let addr = listeners.proxy.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let callback = listeners.callback.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listeners, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin,
            callback,
            tokens,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        (&mut self.task).await.unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TLS upstream running the Mobile Identity API mock, and a proxy in front of it.
pub struct Stack {
    pub pki: TestPki,
    pub upstream: RunningServer,
    pub proxy: Proxy,
    pub config: ProxyConfig,
}

impl Stack {
    pub async fn api() -> Self {
        let pki = TestPki::localhost();
        let upstream = Upstream::builder()
            .tls(&pki)
            .handler(MockApi::new(KEY_ID, SECRET))
            .start()
            .await;
        Self::over(pki, upstream).await
    }

    /// The proxy in front of an already running upstream.
    pub async fn over(pki: TestPki, upstream: RunningServer) -> Self {
        let config = ProxyConfig::new(&upstream.url(BASE), &pki);
        let proxy = Proxy::start(&config).await;
        Self {
            pki,
            upstream,
            proxy,
            config,
        }
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 keep-alive client.
pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// An HTTP/2 prior-knowledge connection to `addr`, driven until it closes (the handle resolves
/// then): for what the pooled client cannot send, such as a URI naming another authority, or a
/// body other than `Full`.
pub async fn h2c_connection<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<()>,
)
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, closed)
}

/// A response with its whole body.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn collect(response: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    collect(client.request(request).await.expect("the proxy answers")).await
}

pub fn post_json(url: &str, body: serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

/// Asserts an error the proxy made itself: `status`, `Proxy-Status` naming `code`, and a JSON
/// body with that code and a message, which it returns.
pub fn assert_proxy_error(answer: &Answer, status: http::StatusCode, code: &str) -> String {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    assert_eq!(
        answer.headers["proxy-status"],
        format!("idmatch-proxy; error={code}").as_str()
    );
    assert_eq!(answer.headers["content-type"], "application/json");
    let body = answer.json();
    assert_eq!(body["error"]["code"], code);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "no message: {body}");
    message.to_owned()
}

/// The system clock plus an offset the test moves forward: time passing for the proxy's tokens
/// and grace periods without sleeping.
#[derive(Default)]
pub struct AdvancedClock(std::sync::atomic::AtomicU64);

impl AdvancedClock {
    pub fn advance(&self, by: Duration) {
        (self.0).fetch_add(by.as_secs(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for AdvancedClock {
    fn now(&self) -> Duration {
        SystemClock.now() + Duration::from_secs(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Waits until `done` resolves to true, asking every 5 ms, for at most `limit`; panics naming
/// `what` otherwise. A plain condition is `|| std::future::ready(condition)`.
pub async fn eventually<F>(limit: Duration, what: &str, mut done: impl FnMut() -> F)
where
    F: std::future::Future<Output = bool>,
{
    eventually_some(limit, what, || {
        let done = done();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Waits until `attempt` resolves to `Some`, asking every 5 ms, for at most `limit`, and returns
/// what it found; panics naming `what` otherwise.
pub async fn eventually_some<T, F>(limit: Duration, what: &str, mut attempt: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = attempt().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The claims of the tokens we sign, as an independent implementation (`jsonwebtoken`) reads
/// them.
#[derive(Debug, serde::Deserialize)]
pub struct Claims {
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
}

/// The claims of `token` if it is an HS256 JWT signed with `secret`, its `kid` ours, and valid
/// now to the second: `iat`, `nbf` and `exp` present, `nbf` passed, `exp` not.
pub fn verify(token: &str, secret: &str) -> Result<Claims, String> {
    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
    let header = decode_header(token).map_err(|e| e.to_string())?;
    if header.kid.as_deref() != Some(KEY_ID) {
        return Err(format!("kid {:?}", header.kid));
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["iat", "nbf", "exp"]);
    decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map(|data| data.claims)
    .map_err(|e| e.to_string())
}

/// The claims of the one `Authorization: Bearer` value among `values`, which must be ours.
pub fn bearer_claims<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Claims {
    let values: Vec<&[u8]> = values.into_iter().collect();
    assert_eq!(values.len(), 1, "exactly one Authorization header");
    let token = std::str::from_utf8(values[0])
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("not a bearer token: {:?}", values[0]));
    verify(token, SECRET).unwrap_or_else(|e| panic!("not our valid token ({e}): {token}"))
}

/// Writes raw bytes on a fresh connection and reads until the server closes it (send
/// `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: status, head, body.
pub async fn read_response(stream: &mut TcpStream) -> (http::StatusCode, String, Vec<u8>) {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a response head: {buffer:?}");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    let status = head[9..12].parse::<u16>().unwrap();
    (http::StatusCode::from_u16(status).unwrap(), head, body)
}

/// The real `idmatch-proxy` binary, serving with the given environment (and nothing else from
/// ours), JSON logs collected from stderr.
pub struct Binary {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The callback listener, when configured.
    pub callback: Option<SocketAddr>,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
    /// Collects stderr after the "ready" line; ends when the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    pub fn command() -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_idmatch-proxy"));
        command.env_clear();
        command
    }

    /// Starts it and waits for its "ready" log line, which names the bound address.
    pub fn serve(env: &HashMap<String, String>) -> Self {
        Self::serve_via(Self::command(), env)
    }

    /// Like [`Binary::serve`], with the binary pinned to `cpus` by `taskset`.
    pub fn serve_pinned(env: &HashMap<String, String>, cpus: &str) -> Self {
        let mut taskset = std::process::Command::new("taskset");
        taskset
            .args(["-c", cpus, env!("CARGO_BIN_EXE_idmatch-proxy")])
            .env_clear();
        Self::serve_via(taskset, env)
    }

    fn serve_via(mut command: std::process::Command, env: &HashMap<String, String>) -> Self {
        use std::io::BufRead;
        let mut child = command
            .envs(env)
            .env("IDMATCH_LOG_FORMAT", "json")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr, admin, callback) = loop {
            let line = lines
                .next()
                .expect("the proxy exited before it was ready")
                .unwrap();
            logs.lock().unwrap().push(line.clone());
            let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if event["message"] == "idmatch-proxy ready" {
                let addr = |field: &str| event[field].as_str().unwrap().parse().unwrap();
                let callback = event["callback"].as_str().map(|a| a.parse().unwrap());
                break (addr("listen"), addr("admin"), callback);
            }
        };
        let collected = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                collected.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr,
            admin,
            callback,
            logs,
            reader: Some(reader),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, for at most `limit`.
    pub fn wait(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The log lines collected so far; see [`Binary::finish`] for all of them.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for the process to exit, for at most `limit`, then for its last log lines: unlike
    /// [`Binary::logs`] right after [`Binary::wait`], nothing written before exit is missed.
    pub fn finish(
        &mut self,
        limit: std::time::Duration,
    ) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.wait(limit);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader does not panic");
        }
        (status, self.logs())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of the proxy's `/metrics` (served on `admin`), 0 if absent.
pub async fn scrape(admin: SocketAddr, sample: &str) -> f64 {
    let text = send(&http1(), get(&format!("http://{admin}/metrics")))
        .await
        .body;
    let text = String::from_utf8(text.to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

/// How many file descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A process's resident memory now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A port where connections are refused, held for as long as the value lives: bound but not
/// listening, so that no other test's listener can take it meanwhile.
pub struct Refusing {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

pub fn refusing_port() -> Refusing {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Refusing {
        addr: socket.local_addr().unwrap(),
        _socket: socket,
    }
}

/// A body that sends `first`, then nothing, ever: only its reader leaving ends it, which drops
/// `guard` (a test's way to see that happen).
pub struct Endless<G = ()> {
    first: Option<Bytes>,
    _guard: G,
}

impl<G> Endless<G> {
    pub fn new(first: Bytes, guard: G) -> Self {
        Self {
            first: Some(first),
            _guard: guard,
        }
    }
}

impl<G: Unpin> hyper::body::Body for Endless<G> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// A listener that accepts connections and never says a word, holding them open for as long
/// as the value lives: a peer stalled after the TCP handshake.
pub struct Silent {
    pub addr: SocketAddr,
    held: tokio::task::JoinHandle<()>,
}

pub async fn silent_listener() -> Silent {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    Silent { addr, held }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.held.abort();
    }
}

/// A response body whose chunks arrive through `chunks`, and which ends when its sender is
/// dropped: the upstream holds it open as long as the test likes.
pub fn channel_body(chunks: tokio::sync::mpsc::Receiver<Bytes>) -> idmatch_mock::server::Body {
    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

    impl hyper::body::Body for Channel {
        type Data = Bytes;
        type Error = idmatch_mock::server::BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
        }
    }

    Channel(chunks).boxed()
}

/// A real `redis-server` on a free loopback port, in a temporary directory, persisting
/// nothing; killed when dropped. Without the program the test fails, never skips.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    password: Option<String>,
    /// Serving TLS only, with the certificate and key files written in `dir`.
    tls: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// One that requires `AUTH password`.
    pub fn start_with_password(password: Option<&str>) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), password, false)
    }

    /// One that speaks TLS only, presenting `cert` (PEM, for localhost) signed by `ca`.
    pub fn start_tls(cert: &str, key: &str, ca: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in [("cert.pem", cert), ("key.pem", key), ("ca.pem", ca)] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Self::start_in(dir, None, true)
    }

    fn start_in(dir: tempfile::TempDir, password: Option<&str>, tls: bool) -> Self {
        let mut server = Self {
            child: None,
            port: 0,
            password: password.map(str::to_owned),
            tls,
            dir,
        };
        // redis-server has no `--port 0`: take a free port and let it go. Another process may
        // take it meanwhile, so a collision tries another.
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if server.spawn(port).is_ok() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    pub fn url(&self) -> String {
        match self.tls {
            true => format!("rediss://localhost:{}", self.port),
            false => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills it at once (SIGKILL): clients see their connections reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGSTOP) without closing anything: requests to it wait, unanswered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets it go on after [`RedisServer::pause`]: the waiting requests are answered.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let sent = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success(), "kill {signal} redis-server");
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(port)
            .unwrap_or_else(|e| panic!("redis-server did not restart on port {port}: {e}"));
    }

    /// Where `redis-server` is installed, if it is.
    pub fn program() -> Option<&'static str> {
        ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
    }

    /// Runs the server and waits for its "Ready to accept connections" line.
    fn spawn(&mut self, port: u16) -> Result<(), String> {
        use std::io::BufRead;
        let program = Self::program().expect(
            "redis-server is not installed; the rate-limit tests need a real one: \
                 apt-get install -y redis-server (.ci/run installs it)",
        );
        let mut command = std::process::Command::new(program);
        let port_arg = port.to_string();
        match self.tls {
            true => {
                let file = |name: &str| self.dir.path().join(name).display().to_string();
                command.args(["--port", "0", "--tls-port", &port_arg]);
                command.args(["--tls-cert-file", &file("cert.pem")]);
                command.args(["--tls-key-file", &file("key.pem")]);
                command.args(["--tls-ca-cert-file", &file("ca.pem")]);
                command.args(["--tls-auth-clients", "no"]);
            }
            false => {
                command.args(["--port", &port_arg]);
            }
        }
        command.args(["--bind", "127.0.0.1"]);
        command.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        command.arg("--dir").arg(self.dir.path());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Ready to accept connections") => break,
                Some(Ok(line)) => seen.push(line),
                _ => {
                    let _ = child.wait();
                    return Err(seen.join("\n"));
                }
            }
        }
        // Keeps reading, so that its log never fills the pipe and blocks it.
        std::thread::spawn(move || lines.for_each(drop));
        self.child = Some(child);
        self.port = port;
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TLS upstream answering `answer(n)` to its n-th request (from 0), recording when each
/// request arrived and its `x-client` header.
pub async fn timed_upstream(
    pki: &TestPki,
    answer: impl Fn(usize) -> Response<idmatch_mock::server::Body> + Send + Sync + 'static,
) -> (RunningServer, Arrivals) {
    let arrivals = Arrivals::default();
    let recorded = arrivals.clone();
    let server = Upstream::builder()
        .tls(pki)
        .handler(move |request: Request<hyper::body::Incoming>| {
            let client = request
                .headers()
                .get("x-client")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let n = {
                let mut all = recorded.0.lock().unwrap();
                all.push((std::time::Instant::now(), client));
                all.len() - 1
            };
            recorded.1.notify_waiters();
            std::future::ready(answer(n))
        })
        .start()
        .await;
    (server, arrivals)
}

/// When each request reached the upstream, and from which client.
#[derive(Clone, Default)]
pub struct Arrivals(
    Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
    Arc<tokio::sync::Notify>,
);

impl Arrivals {
    pub fn times(&self) -> Vec<std::time::Instant> {
        let mut times: Vec<_> = self.0.lock().unwrap().iter().map(|(t, _)| *t).collect();
        times.sort();
        times
    }

    pub fn times_of(&self, client: &str) -> Vec<std::time::Instant> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(_, c)| c == client)
            .map(|(t, _)| *t)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn reached(&self, n: usize) {
        loop {
            let notified = self.1.notified();
            if self.count() >= n {
                return;
            }
            notified.await;
        }
    }
}

/// The smallest gap between consecutive instants.
pub fn min_gap(times: &[std::time::Instant]) -> std::time::Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .min()
        .unwrap_or(std::time::Duration::MAX)
}
