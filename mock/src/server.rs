//! A generic HTTP/1.1 + HTTP/2 upstream for tests, over TLS or plain TCP.
//!
//! The server records every request before its [`Handler`] sees it and counts connections and
//! TLS handshakes, so a test can assert what the proxy sent and how it connected without
//! instrumenting the handler. Client misbehaviour (failed handshakes, resets, garbage) is logged
//! at debug level and never stops the server.
//!
//! ```no_run
//! # async fn example() {
//! use http::{Request, StatusCode};
//! use hyper::body::Incoming;
//! use idmatch_mock::{server::json, Server, TestPki};
//!
//! let pki = TestPki::localhost();
//! let upstream = Server::builder()
//!     .tls(&pki)
//!     // Closures name the request type: `handler` takes any `Handler`, which leaves nothing to
//!     // infer it from.
//!     .handler(|_request: Request<Incoming>| async {
//!         json(StatusCode::OK, serde_json::json!({"ok": true}))
//!     })
//!     .start()
//!     .await;
//! let base = upstream.url("/mobile-identity/v1"); // https://127.0.0.1:PORT/mobile-identity/v1
//! # }
//! ```

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    header::CONTENT_TYPE, uri::Scheme, HeaderValue, Method, Request, Response, StatusCode, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::pki::TestPki;

/// Errors a response body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body every handler returns: any body, boxed, so buffered and streaming
/// responses share one type.
pub type Body = BoxBody<Bytes, BoxError>;

/// The future a [`Handler`] returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A buffered body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response with `Content-Type: application/json`.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    json_text(status, value.to_string())
}

/// A response with `Content-Type: application/json` and `text`, which must be JSON: for bodies
/// whose key order matters, which a [`serde_json::Value`] would sort.
pub fn json_text(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Answers requests. Each request carries the listener's [`Scheme`] as an extension.
/// Implemented for every `Fn(Request<Incoming>) -> impl Future` that is
/// `Send + Sync + 'static`, so closures and `async fn`s work directly; the request body is the
/// connection's own stream, so a handler can consume uploads of any size incrementally.
pub trait Handler: Send + Sync + 'static {
    /// Produces the response to `request`.
    fn call(&self, request: Request<Incoming>) -> ResponseFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    fn call(&self, request: Request<Incoming>) -> ResponseFuture {
        Box::pin(self(request))
    }
}

/// A request as the server received it, captured before the handler ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: Method,
    pub version: Version,
    /// Path and query exactly as received (percent-encoding and `+` untouched).
    pub target: String,
    /// The URI's authority: HTTP/2's `:authority`; none for an HTTP/1.1 origin-form target,
    /// whose authority is its `Host` header.
    pub authority: Option<String>,
    /// Every header line in [`http::HeaderMap`] iteration order (grouped by name, in order of
    /// first appearance), repeated names kept. Names are lowercase.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).into_iter().next()
    }

    /// Every value of header `name` (case-insensitive), in received order.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
            .collect()
    }

    fn of(request: &Request<Incoming>) -> Self {
        let uri = request.uri();
        Self {
            method: request.method().clone(),
            version: request.version(),
            // `OPTIONS *` and absolute-form targets without a path have no path-and-query.
            target: uri.path_and_query().map_or_else(
                || uri.path().to_owned(),
                |target| target.as_str().to_owned(),
            ),
            authority: uri
                .authority()
                .map(|authority| authority.as_str().to_owned()),
            headers: request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect(),
        }
    }
}

/// Entry point: see [`Server::builder`].
#[derive(Debug)]
pub enum Server {}

impl Server {
    /// A plain-HTTP server on `127.0.0.1:0` answering `200` with an empty body, until configured
    /// otherwise.
    pub fn builder() -> Builder {
        Builder {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: None,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            handler: Arc::new(|_request| async { Response::new(full(Bytes::new())) }),
        }
    }
}

/// Configures a [`RunningServer`].
pub struct Builder {
    addr: SocketAddr,
    tls: Option<ServerConfig>,
    alpn: Vec<Vec<u8>>,
    handler: Arc<dyn Handler>,
}

impl Builder {
    /// Serves TLS with `pki`'s server certificate.
    pub fn tls(mut self, pki: &TestPki) -> Self {
        self.tls = Some(Arc::unwrap_or_clone(pki.server_config(&[])));
        self
    }

    /// Serves plain HTTP (the default).
    pub fn plain(mut self) -> Self {
        self.tls = None;
        self
    }

    /// The ALPN protocols offered over TLS, in order of preference; default `h2`, `http/1.1`.
    /// When a protocol is negotiated the connection speaks only that one, so `&[b"http/1.1"]`
    /// forces HTTP/1.1. Clients that negotiate nothing get either, detected from the preface.
    /// Ignored for plain HTTP.
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|protocol| protocol.to_vec()).collect();
        self
    }

    /// The address to listen on; default `127.0.0.1:0` (an ephemeral port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// The request handler.
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Arc::new(handler);
        self
    }

    /// Binds and starts serving.
    ///
    /// # Panics
    ///
    /// If binding fails. Use [`try_start`](Self::try_start) where that is not a test bug.
    pub async fn start(self) -> RunningServer {
        let addr = self.addr;
        match self.try_start().await {
            Ok(server) => server,
            Err(error) => panic!("binding the mock upstream to {addr}: {error}"),
        }
    }

    /// Binds and starts serving, returning the bind error if any.
    pub async fn try_start(self) -> io::Result<RunningServer> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let tls = self.tls.map(|mut config| {
            config.alpn_protocols = self.alpn;
            TlsAcceptor::from(Arc::new(config))
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let stats = Arc::new(Stats::default());
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(
            listener,
            tls,
            self.handler,
            stats.clone(),
            shutdown_rx,
        ));
        Ok(RunningServer {
            addr,
            scheme,
            stats,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A server accepting connections until dropped or [shut down](Self::shutdown); either way it
/// stops accepting and aborts open connections, mid-request or not.
pub struct RunningServer {
    addr: SocketAddr,
    scheme: &'static str,
    stats: Arc<Stats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `scheme://IP:PORT` followed by `base_path`, e.g. `https://127.0.0.1:41234/mobile-identity/v1`.
    ///
    /// The host is always the bound IP address, never `localhost` (which may resolve to `::1`
    /// first), so a TLS server's certificate must name that IP: [`TestPki::localhost`] does.
    pub fn url(&self, base_path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, base_path)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.stats.requests().clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.stats.requests().len()
    }

    /// How many TCP connections were accepted, including those whose TLS handshake failed.
    pub fn connections_accepted(&self) -> usize {
        self.stats.connections_accepted.load(Ordering::SeqCst)
    }

    /// How many TLS handshakes completed; always 0 for plain HTTP.
    pub fn tls_handshakes_completed(&self) -> usize {
        self.stats.tls_handshakes_completed.load(Ordering::SeqCst)
    }

    /// Stops accepting, aborts open connections and waits until they are closed.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The accept loop only ends on this signal or an abort, so it is still listening.
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                debug!(%error, "mock upstream accept loop failed");
            }
        }
    }
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the recorded requests: they hold the credentials the proxy sent.
        f.debug_struct("RunningServer")
            .field("url", &self.url(""))
            .field("request_count", &self.request_count())
            .field("connections_accepted", &self.connections_accepted())
            .finish_non_exhaustive()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Aborting the accept loop drops its `JoinSet`, which aborts every connection task.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Stats {
    requests: Mutex<Vec<Recorded>>,
    connections_accepted: AtomicUsize,
    tls_handshakes_completed: AtomicUsize,
}

impl Stats {
    fn requests(&self) -> std::sync::MutexGuard<'_, Vec<Recorded>> {
        // Recording cannot panic halfway through a push, so a poisoned list is still whole.
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<dyn Handler>,
    stats: Arc<Stats>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let protocols = Arc::new(Protocols::new());
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "accept failed");
                    // Errors such as EMFILE persist until a connection closes; don't spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        stats.connections_accepted.fetch_add(1, Ordering::SeqCst);
        connections.spawn(serve_connection(
            stream,
            peer,
            tls.clone(),
            protocols.clone(),
            handler.clone(),
            stats.clone(),
        ));
    }
    connections.shutdown().await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    protocols: Arc<Protocols>,
    handler: Arc<dyn Handler>,
    stats: Arc<Stats>,
) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, %peer, "setting TCP_NODELAY failed");
    }
    let service = {
        let stats = stats.clone();
        let scheme = if tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        service_fn(move |mut request: Request<Incoming>| {
            stats.requests().push(Recorded::of(&request));
            // An HTTP/1.1 request line carries no scheme; handlers that build URLs back to this
            // server need it.
            request.extensions_mut().insert(scheme.clone());
            let response = handler.call(request);
            async move { Ok::<_, Infallible>(response.await) }
        })
    };
    let served = match tls {
        None => {
            protocols
                .negotiated(None)
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
        Some(acceptor) => {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(%error, %peer, "TLS handshake failed");
                    return;
                }
            };
            stats
                .tls_handshakes_completed
                .fetch_add(1, Ordering::SeqCst);
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            protocols
                .negotiated(alpn.as_deref())
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(error) = served {
        debug!(%error, %peer, "connection closed with an error");
    }
}

/// Connection builders, one per ALPN outcome, built once per server.
struct Protocols {
    detect: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new() -> Self {
        let mut detect = auto::Builder::new(TokioExecutor::new());
        // Tests stream gigabytes through one HTTP/2 stream; fixed flow-control windows would cap
        // throughput at window / RTT.
        detect.http2().adaptive_window(true);
        Self {
            http1: detect.clone().http1_only(),
            http2: detect.clone().http2_only(),
            detect,
        }
    }

    /// A negotiated protocol is binding (RFC 7301 §3.2); without one, detect it from the
    /// connection preface.
    fn negotiated(&self, alpn: Option<&[u8]>) -> &auto::Builder<TokioExecutor> {
        match alpn {
            Some(b"h2") => &self.http2,
            Some(b"http/1.1") => &self.http1,
            _ => &self.detect,
        }
    }
}
