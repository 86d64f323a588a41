//! The upstream's connections: HTTP/1.1 connections reused one exchange at a time, or one HTTP/2
//! connection shared by all, whichever the upstream picks by ALPN.
//!
//! Built on `hyper::client::conn` rather than hyper-util's general-purpose client because there
//! is one destination: no pool key to hash per request, an HTTP/1.1 connection goes back to the
//! pool when its response body ends (not through a task spawned per request), and the upstream's
//! `Host` replaces the client's in place. 16 % fewer instructions per proxied request than with
//! hyper-util's client (benches/README.md).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::Service as _;

use super::warm::{self, Warmable, Warmth};
use super::{BoxError, Connector};
use crate::config::Upstream;
use crate::lock;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Connecting failed (DNS, TCP, the egress tunnel, TLS, the HTTP/2 handshake): no byte of
    /// the request was sent.
    #[error("connecting to the upstream")]
    Connect(#[source] BoxError),
    /// The exchange failed on a connection; `hyper::Error::is_canceled` if the request was
    /// handed back unsent.
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl SendError {
    /// Whether no byte of the request can have reached the upstream, so that sending it again
    /// cannot make the upstream act twice. hyper cancels a request only while handing it back
    /// unsent; a request handed back by a reused connection has already gone on to another.
    pub fn never_written(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Exchange(error) => error.is_canceled(),
        }
    }

    /// Whether the connection closed before a byte of the response came: the upstream may or
    /// may not have read the request. How a keep-alive connection the upstream closes just as
    /// a request goes out fails; an idempotent request may then be sent again (RFC 9112 §9.3.1).
    pub fn closed_before_response(&self) -> bool {
        matches!(self, Self::Exchange(error) if error.is_incomplete_message())
    }
}

/// What the pool can send: a request body hyper's HTTP/1.1 and HTTP/2 clients both take.
pub trait RequestBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static> RequestBody for B {}

/// The client for the one upstream, sending requests with bodies of type `B`. Cheap to share:
/// the proxy holds one for the process.
pub struct UpstreamClient<B> {
    pool: Arc<Pool<B>>,
}

struct Pool<B> {
    connector: Connector,
    /// `scheme://authority/`: what the connector dials, and HTTP/2's `:scheme` and `:authority`.
    origin: Uri,
    /// HTTP/1.1's `Host`: the authority without a default port.
    host: HeaderValue,
    connections: Mutex<Connections<B>>,
    /// `upstream.idle_timeout`.
    idle_timeout: Duration,
    /// `upstream.ping_interval` and `_timeout`; `None` for no PINGs.
    keep_alive: Option<(Duration, Duration)>,
    /// Held while a connection is made, unless the upstream is known to speak HTTP/1.1: one
    /// HTTP/2 connection serves every request, so a cold burst waits for one handshake rather
    /// than each request making a connection of its own, all but one then dropped.
    connecting: tokio::sync::Mutex<()>,
    /// The upstream chose HTTP/1.1 by ALPN: each exchange needs a connection of its own, so
    /// connections are made side by side.
    speaks_http1: AtomicBool,
    /// Whether the task that closes idle connections runs: started with the first connection,
    /// inside the runtime.
    reaping: std::sync::Once,
    /// `upstream.keep_warm`.
    warmth: Warmth,
}

/// The connections not in use: idle HTTP/1.1 ones, or the HTTP/2 one that all share.
struct Connections<B> {
    idle: Idle<http1::SendRequest<B>>,
    shared: Option<http2::SendRequest<B>>,
}

impl<B> Default for Connections<B> {
    fn default() -> Self {
        Self {
            idle: Idle::default(),
            shared: None,
        }
    }
}

enum Connection<B> {
    Http1(http1::SendRequest<B>),
    Http2(http2::SendRequest<B>),
}

impl<B: RequestBody> UpstreamClient<B> {
    pub fn new(connector: Connector, upstream: &Upstream) -> Self {
        let (scheme, authority) = (upstream.scheme.clone(), upstream.authority.clone());
        let default_port = if scheme == Scheme::HTTP { 80 } else { 443 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str(),
            _ => authority.host(),
        };
        let host = HeaderValue::from_str(host).expect("an authority is a valid header value");
        let origin = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query("/")
            .build()
            .expect("scheme and authority make a URI");
        Self {
            pool: Arc::new(Pool {
                connector,
                origin,
                host,
                connections: Mutex::default(),
                idle_timeout: upstream.idle_timeout,
                keep_alive: (!upstream.ping_interval.is_zero())
                    .then_some((upstream.ping_interval, upstream.ping_timeout)),
                connecting: tokio::sync::Mutex::new(()),
                speaks_http1: AtomicBool::new(false),
                reaping: std::sync::Once::new(),
                warmth: Warmth::new(upstream.keep_warm),
            }),
        }
    }

    /// Keeps a connection open from now on, for `upstream.keep_warm` after each request, so
    /// that a request in sparse traffic finds one rather than waiting for handshakes (see
    /// `warm`). Readiness does not wait for the first; if it fails, a request connects as usual.
    pub fn keep_warm(&self) {
        if self.pool.warmth.wanted(Instant::now()) {
            let closed = self.pool.warmth.closed().clone();
            tokio::spawn(warm::keep(Arc::downgrade(&self.pool), closed));
        }
    }

    /// One exchange: on a pooled connection if one is free, else on a new one. A request that
    /// a pooled connection hands back unsent (it was closing) goes on to the next, or to a new
    /// connection; one that a new connection hands back is the caller's to retry.
    ///
    /// The exchange is written out here rather than in a function of its own: each layer of
    /// async functions moves the request and the response once more.
    pub async fn request(
        &self,
        mut request: Request<B>,
    ) -> Result<Response<PooledBody<B>>, SendError> {
        self.pool.warmth.requested();
        loop {
            let (connection, pooled) = match self.pool.checkout() {
                Some(connection) => (connection, true),
                // Boxed: the TLS and HTTP/2 handshakes make this future several KiB, which every
                // request's future would otherwise carry (and move) while it is rarely needed.
                None => Box::pin(self.pool.checkout_or_connect()).await?,
            };
            let failed = match connection {
                Connection::Http1(mut sender) => match sender.ready().await {
                    Err(error) => Failed::unsent(error, request),
                    Ok(()) => {
                        self.pool.to_origin_form(&mut request);
                        match sender.try_send_request(request).await {
                            Ok(response) => {
                                let pool = Arc::downgrade(&self.pool);
                                return Ok(
                                    response.map(|body| PooledBody::returning(body, pool, sender))
                                );
                            }
                            Err(error) => Failed::from(error),
                        }
                    }
                },
                Connection::Http2(mut sender) => match sender.ready().await {
                    Err(error) => Failed::unsent(error, request),
                    Ok(()) => {
                        self.pool.to_absolute_form(&mut request);
                        match sender.try_send_request(request).await {
                            Ok(response) => return Ok(response.map(PooledBody::shared)),
                            Err(error) => Failed::from(error),
                        }
                    }
                },
            };
            match failed {
                Failed {
                    unsent: Some(unsent),
                    ..
                } if pooled => request = unsent,
                failed => return Err(SendError::Exchange(failed.error)),
            }
        }
    }
}

impl<B: RequestBody> Pool<B> {
    fn checkout(&self) -> Option<Connection<B>> {
        let mut connections = lock(&self.connections);
        match connections.shared.as_ref().filter(|s| !s.is_closed()) {
            Some(shared) => Some(Connection::Http2(shared.clone())),
            None => {
                let now = Instant::now();
                let keep_newest = self.warmth.wanted(now);
                (connections.idle)
                    .take(now, self.idle_timeout, keep_newest)
                    .map(Connection::Http1)
            }
        }
    }

    /// HTTP/1.1's request target and `Host`: origin-form, and the upstream's `Host` in place of
    /// the client's, which is first in nearly every request, so that the order of the other
    /// fields is kept.
    fn to_origin_form(&self, request: &mut Request<B>) {
        let target = request.uri().path_and_query().cloned();
        *request.uri_mut() = Uri::from(target.unwrap_or_else(|| PathAndQuery::from_static("/")));
        request.headers_mut().insert(HOST, self.host.clone());
    }

    /// HTTP/2 carries the authority in `:authority`; a `Host` beside it is refused by some
    /// servers (nginx: 400, "duplicate host header").
    fn to_absolute_form(&self, request: &mut Request<B>) {
        request.headers_mut().remove(HOST);
        if request.uri().scheme().is_none() {
            // Handed back by an HTTP/1.1 connection, in origin-form.
            let mut parts = std::mem::take(request.uri_mut()).into_parts();
            parts.scheme = self.origin.scheme().cloned();
            parts.authority = self.origin.authority().cloned();
            *request.uri_mut() = Uri::from_parts(parts).expect("an absolute URI");
        }
    }

    /// A new connection, unless another request's handshake is under way: then, once it is
    /// over, the connection it made if it can be shared. If that handshake failed, each waiter
    /// makes its own, side by side as before, so that a failing upstream costs a waiter at most
    /// two connect timeouts. The flag says whether the connection is shared.
    async fn checkout_or_connect(self: &Arc<Self>) -> Result<(Connection<B>, bool), SendError> {
        if self.speaks_http1.load(Ordering::Relaxed) {
            return Ok((self.connect().await?, false));
        }
        let connecting = match self.connecting.try_lock() {
            Ok(connecting) => Some(connecting),
            Err(_) => {
                drop(self.connecting.lock().await);
                if let Some(connection) = self.checkout() {
                    return Ok((connection, true));
                }
                None
            }
        };
        let connection = self.connect().await?;
        drop(connecting);
        Ok((connection, false))
    }

    /// A new connection: TCP (through the egress tunnel if any), TLS, then HTTP/2 if the
    /// upstream chose it by ALPN, else HTTP/1.1.
    async fn connect(self: &Arc<Self>) -> Result<Connection<B>, SendError> {
        self.reaping.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        });
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let mut http2 = http2::Builder::new(TokioExecutor::new());
            http2.timer(TokioTimer::new());
            if let Some((interval, timeout)) = self.keep_alive {
                // Idle too: traffic is sparse, and a dead connection is best found between
                // requests, not by one.
                http2
                    .keep_alive_interval(interval)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true);
            }
            let (sender, connection) = http2
                .handshake(io)
                .await
                .map_err(|error| SendError::Connect(error.into()))?;
            tokio::spawn(run(connection, self.warmth.closed().clone()));
            lock(&self.connections).shared = Some(sender.clone());
            Ok(Connection::Http2(sender))
        } else {
            self.speaks_http1.store(true, Ordering::Relaxed);
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(|error| SendError::Connect(error.into()))?;
            tokio::spawn(run(connection, self.warmth.closed().clone()));
            Ok(Connection::Http1(sender))
        }
    }

    fn give_back(&self, sender: http1::SendRequest<B>) {
        if !sender.is_closed() {
            lock(&self.connections).idle.put(sender, Instant::now());
        }
    }
}

impl<B: RequestBody> Warmable for Pool<B> {
    fn warmth(&self) -> &Warmth {
        &self.warmth
    }

    fn has_open(&self) -> bool {
        let connections = lock(&self.connections);
        let shared = connections.shared.as_ref();
        shared.is_some_and(|shared| !shared.is_closed()) || connections.idle.has_open()
    }

    async fn connect_idle(self: Arc<Self>) -> Result<(), SendError> {
        match self.checkout_or_connect().await? {
            (Connection::Http1(sender), _) => self.give_back(sender),
            // Shared from its handshake on.
            (Connection::Http2(_), _) => {}
        }
        Ok(())
    }
}

impl<B> Drop for Pool<B> {
    fn drop(&mut self) {
        // The keeper ends when it finds the pool gone.
        self.warmth.closed().notify_one();
    }
}

/// Drives a connection until it closes, then tells `closed`; its errors reach the exchange that
/// suffered them.
async fn run<F: std::future::Future<Output = hyper::Result<()>>>(
    connection: F,
    closed: Arc<Notify>,
) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, "upstream connection closed");
    }
    closed.notify_one();
}

/// Closes connections idle past `upstream.idle_timeout`, until the pool is gone.
async fn reap<B: RequestBody>(pool: Weak<Pool<B>>, idle_timeout: Duration) {
    let mut ticks = tokio::time::interval(idle_timeout / 2);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let keep_newest = pool.warmth.wanted(now);
        lock(&pool.connections)
            .idle
            .expire(now, idle_timeout, keep_newest);
    }
}

/// A failed exchange, with the request if it was handed back unsent.
struct Failed<B> {
    error: hyper::Error,
    unsent: Option<Request<B>>,
}

impl<B> Failed<B> {
    fn unsent(error: hyper::Error, request: Request<B>) -> Self {
        Self {
            error,
            unsent: Some(request),
        }
    }
}

impl<B> From<TrySendError<Request<B>>> for Failed<B> {
    fn from(mut error: TrySendError<Request<B>>) -> Self {
        let unsent = error.take_message();
        Self {
            error: error.into_error(),
            unsent,
        }
    }
}

/// Idle HTTP/1.1 connections, most recently used last: reusing the newest keeps the fewest
/// connections warm and lets the oldest expire.
struct Idle<T> {
    entries: Vec<(T, Instant)>,
}

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

/// What the pool needs to know of a connection.
trait Reusable {
    fn is_closed(&self) -> bool;
}

impl<B> Reusable for http1::SendRequest<B> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }
}

impl<T: Reusable> Idle<T> {
    fn put(&mut self, connection: T, now: Instant) {
        self.entries.push((connection, now));
    }

    /// The newest open connection that is not idle past `timeout`, or, with `keep_newest`, the
    /// newest open one however long idle (the one kept warm); the expired go.
    fn take(&mut self, now: Instant, timeout: Duration, keep_newest: bool) -> Option<T> {
        while let Some((connection, since)) = self.entries.pop() {
            if connection.is_closed() {
                continue;
            }
            if keep_newest || now.saturating_duration_since(since) <= timeout {
                return Some(connection);
            }
            // The rest are older still.
            self.entries.clear();
        }
        None
    }

    /// Drops the closed connections, and those idle past `timeout` but, with `keep_newest`,
    /// the newest open one.
    fn expire(&mut self, now: Instant, timeout: Duration, keep_newest: bool) {
        self.entries
            .retain(|(connection, _)| !connection.is_closed());
        let newest = self.entries.len().checked_sub(1).filter(|_| keep_newest);
        let mut index = 0;
        self.entries.retain(|(_, since)| {
            let kept = Some(index) == newest || now.saturating_duration_since(*since) <= timeout;
            index += 1;
            kept
        });
    }

    fn has_open(&self) -> bool {
        self.entries
            .iter()
            .any(|(connection, _)| !connection.is_closed())
    }
}

/// An upstream response body. Over HTTP/1.1 it returns its connection to the pool when it ends;
/// dropped before its end, it takes the connection with it (hyper closes it).
pub struct PooledBody<B> {
    body: Incoming,
    returning: Option<(Weak<Pool<B>>, http1::SendRequest<B>)>,
}

impl<B: RequestBody> PooledBody<B> {
    fn returning(body: Incoming, pool: Weak<Pool<B>>, sender: http1::SendRequest<B>) -> Self {
        let mut body = Self {
            body,
            returning: Some((pool, sender)),
        };
        // A body that is empty (a 204, `Content-Length: 0`) has already ended.
        body.give_back_if_ended();
        body
    }

    fn shared(body: Incoming) -> Self {
        Self {
            body,
            returning: None,
        }
    }

    fn give_back_if_ended(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if let Some((pool, sender)) = self.returning.take() {
            if let Some(pool) = pool.upgrade() {
                pool.give_back(sender);
            }
        }
    }
}

impl<B: RequestBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            Some(Ok(_)) => self.give_back_if_ended(),
            None => self.give_back(),
            Some(Err(_)) => self.returning = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `upstream.idle_timeout`'s default.
    const TIMEOUT: Duration = Duration::from_secs(30);

    /// A connection that is open or closed, and says which one it is.
    #[derive(Debug, PartialEq)]
    struct Fake {
        id: u8,
        closed: bool,
    }

    impl Reusable for Fake {
        fn is_closed(&self) -> bool {
            self.closed
        }
    }

    fn open(id: u8) -> Fake {
        Fake { id, closed: false }
    }

    fn closed(id: u8) -> Fake {
        Fake { id, closed: true }
    }

    /// An idle list with each connection put the given number of seconds after `start`.
    fn idle_list<const N: usize>(start: Instant, puts: [(Fake, u64); N]) -> Idle<Fake> {
        let mut idle = Idle::default();
        for (connection, seconds) in puts {
            idle.put(connection, start + Duration::from_secs(seconds));
        }
        idle
    }

    #[test]
    fn the_newest_open_connection_is_reused_first() {
        let start = Instant::now();
        let mut idle = idle_list(start, [(open(1), 0), (open(2), 1), (closed(3), 2)]);
        let now = start + Duration::from_secs(3);
        assert_eq!(
            idle.take(now, TIMEOUT, false),
            Some(open(2)),
            "the closed one is skipped"
        );
        assert_eq!(idle.take(now, TIMEOUT, false), Some(open(1)));
        assert_eq!(idle.take(now, TIMEOUT, false), None);
    }

    #[test]
    fn connections_idle_past_the_timeout_are_never_reused() {
        for timeout in [TIMEOUT, Duration::from_secs(2)] {
            let start = Instant::now();
            let mut idle = idle_list(start, [(open(1), 0), (open(2), 10)]);
            // Exactly the timeout is still fine; a moment past it is not.
            let at_the_timeout = start + timeout + Duration::from_secs(10);
            assert_eq!(idle.take(at_the_timeout, timeout, false), Some(open(2)));
            idle.put(open(2), start + Duration::from_secs(10));
            let later = start + timeout + Duration::from_millis(10_001);
            assert_eq!(idle.take(later, timeout, false), None, "{timeout:?}");
            assert!(idle.entries.is_empty(), "the older one went too");
        }
    }

    #[test]
    fn expiry_closes_the_expired_and_the_closed_and_keeps_the_rest_in_order() {
        let start = Instant::now();
        let mut idle = idle_list(
            start,
            [(open(1), 0), (closed(2), 20), (open(3), 25), (open(4), 26)],
        );
        idle.expire(start + TIMEOUT + Duration::from_secs(1), TIMEOUT, false);
        let left: Vec<u8> = idle.entries.iter().map(|(c, _)| c.id).collect();
        assert_eq!(left, [3, 4]);
        // A shorter timeout: only the newest is young enough.
        idle.expire(
            start + Duration::from_secs(28),
            Duration::from_secs(2),
            false,
        );
        let left: Vec<u8> = idle.entries.iter().map(|(c, _)| c.id).collect();
        assert_eq!(left, [4]);
    }

    #[test]
    fn the_connection_kept_warm_is_the_newest_open_one_however_long_idle() {
        let start = Instant::now();
        let puts = || [(open(1), 0), (open(2), 10), (closed(3), 20)];
        let long_after = start + TIMEOUT * 10;

        let mut idle = idle_list(start, puts());
        idle.expire(long_after, TIMEOUT, true);
        let left: Vec<u8> = idle.entries.iter().map(|(c, _)| c.id).collect();
        assert_eq!(left, [2]);
        assert!(idle.has_open());
        assert_eq!(idle.take(long_after, TIMEOUT, true), Some(open(2)));
        assert!(!idle.has_open());

        let mut idle = idle_list(start, puts());
        assert_eq!(idle.take(long_after, TIMEOUT, true), Some(open(2)));
        assert_eq!(
            idle.take(long_after, TIMEOUT, false),
            None,
            "only the newest is kept warm"
        );
        assert!(idle.entries.is_empty());
        assert!(!idle_list(start, [(closed(1), 0)]).has_open());
    }
}
