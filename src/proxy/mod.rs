//! The forwarder: one client request in, one upstream request out (sent again in two cases),
//! bodies streamed both ways except small request bodies, kept for those cases.
//!
//! The cases:
//! - the upstream client failed before writing any byte of it
//!   ([`SendError::never_written`]): once per exchange, as the upstream cannot have seen it;
//! - the upstream answered 401: the token is re-minted and the request replayed, once (not at
//!   all once a freshly minted token was refused: the credentials are wrong);
//! - the upstream answered 429 (rate limiter on): replayed once at the credential's next free
//!   send slot, if that is within `rate_limit.max_wait`.
//!
//! So the upstream receives a request at most three times, the later ones because it asked to,
//! each in a send slot of its own. All need the body again, so a body whose length is known
//! and at most `upstream.replay_buffer_bytes` is read into memory first ("kept"); any other
//! body streams, with backpressure, and is never sent twice. A response timeout is never retried: the upstream
//! may be processing the request, and CM.com's calls are POSTs.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONNECTION, RETRY_AFTER, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Timeout;

use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{CauseLabels, ErrorLabels, Metrics, ReasonLabels};
use crate::pace::{retry_after, Pacer, Turn};
use crate::token::TokenCache;
use crate::upstream::{self, Failure, SendError};

/// The upstream's client, sending the proxy's request bodies.
pub type UpstreamClient = upstream::UpstreamClient<UpstreamBody>;
/// An upstream response's body, returning its connection to the pool at its end.
type PooledBody = upstream::PooledBody<UpstreamBody>;

/// Upstream bodies pass through untouched (but watched for silence, see [`Watched`]); the
/// proxy's own answers are small and whole.
pub type ProxyBody = Either<Watched, Full<Bytes>>;

/// What the proxy sends upstream: a kept body (cheap to clone, for a second attempt) or the
/// client's, streamed.
pub type UpstreamBody = Either<Full<Bytes>, Streamed>;

/// `retries{reason}` label values.
const CONNECT: ReasonLabels = ReasonLabels { reason: "connect" };
const UNAUTHORIZED: ReasonLabels = ReasonLabels {
    reason: "unauthorized",
};
const RATE_LIMITED: ReasonLabels = ReasonLabels {
    reason: "rate_limited",
};

/// A discarded 401 body is read to its end if it is this small and this prompt (CM.com's is a
/// line of JSON that comes with the head), so that its HTTP/1.1 connection can carry the
/// replay. Beyond that it is dropped, which closes the connection (HTTP/2: resets one stream).
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything a request needs, built once for the process and shared by all connections.
pub struct Proxy {
    /// Tells this proxy's entries in [`RecentTargets`] from another's.
    id: u64,
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    response_timeout: Duration,
    replay_buffer_bytes: u64,
    max_body_bytes: Option<u64>,
    /// Bound on reading a kept body: `client.header_timeout`.
    body_timeout: Duration,
    tokens: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    /// `upstream.max_in_flight` permits; a request holds one from just before its token is
    /// taken until its response body ends.
    upstream_slots: Arc<Semaphore>,
    max_in_flight: usize,
    /// The credential's send slots; `None` when `rate_limit.interval` is zero.
    pacer: Option<Arc<Pacer>>,
}

/// How long a request waited for its send slot, replay included: in the response's
/// extensions, for the access log.
#[derive(Clone, Copy, Debug)]
pub struct Paced(pub Duration);

impl Proxy {
    pub fn new(
        config: &Config,
        client: UpstreamClient,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstream = &config.upstream;
        let pacer = Pacer::new(
            &config.rate_limit,
            &config.credentials.key_id,
            metrics.clone(),
        );
        static IDS: AtomicU64 = AtomicU64::new(0);
        Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            client,
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            base_path: upstream.base_path.clone(),
            response_timeout: upstream.response_timeout,
            replay_buffer_bytes: upstream.replay_buffer_bytes as u64,
            max_body_bytes: config.client.max_body_bytes,
            body_timeout: config.client.header_timeout,
            tokens,
            metrics,
            upstream_slots: Arc::new(Semaphore::new(upstream.max_in_flight)),
            max_in_flight: upstream.max_in_flight,
            pacer,
        }
    }

    /// The rate limiter, if on (for its metrics).
    pub fn pacer(&self) -> Option<&Arc<Pacer>> {
        self.pacer.as_ref()
    }

    /// Answers one request; `local` is the address the client connected to.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        local: SocketAddr,
    ) -> Response<ProxyBody> {
        let body_pending = request.version() < Version::HTTP_2 && !request.body().is_end_stream();
        match self.forward(request, local).await {
            Ok((response, slot)) => {
                response.map(|body| Either::Left(Watched::new(body, self.response_timeout, slot)))
            }
            Err(error) => {
                self.count_connect_error(&error);
                if error.is_client_error() {
                    tracing::debug!(code = error.code(), %error, "request refused");
                } else {
                    tracing::warn!(code = error.code(), %error, "upstream request failed");
                }
                let mut response = error.into_response();
                // The client's body may be left unread, and then hyper closes the connection
                // after this answer: say so (RFC 9112 §9.6), or the client would reuse it.
                if body_pending {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response.map(Either::Right)
            }
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        local: SocketAddr,
    ) -> Result<(Response<PooledBody>, OwnedSemaphorePermit), ProxyError> {
        // CONNECT would make us a tunnel anywhere; TRACE would echo our token to the client
        // (RFC 9110 §9.3.8 warns of exactly that).
        if matches!(*request.method(), Method::CONNECT | Method::TRACE) {
            return Err(ProxyError::MethodRefused(request.method().clone()));
        }
        // HTTP/1 absolute-form is how forward-proxy clients speak; only our own authority is
        // accepted. In HTTP/2, `:authority` always appears and plays the part of `Host`, which
        // we ignore: the destination is fixed.
        if request.version() < Version::HTTP_2 {
            if let Some(authority) = request.uri().authority() {
                if !names_local(authority, local) {
                    return Err(ProxyError::ForeignAuthority(authority.to_string()));
                }
            }
        }
        // hyper frames a body by its last transfer coding, which it checks is `chunked`, and
        // hands us what that decodes to; the field itself is hop-by-hop and removed. Any other
        // coding (`gzip, chunked`, `chunked` twice, a second line naming `x`) would reach the
        // upstream still applied and no longer declared. RFC 9112 §6.1: 501.
        if let Some(codings) = other_codings(request.headers()) {
            return Err(ProxyError::TransferCoding(codings));
        }
        // hyper has parsed and checked `Content-Length` (HTTP/1.1: it is the exact size; h2:
        // a DATA overrun is a stream error), so an announced size is known here without
        // reading; a GET without a body is 0.
        let length = request.body().size_hint().exact();
        if let (Some(limit), Some(length)) = (self.max_body_bytes, length) {
            if length > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
        }

        let uri = self.upstream_uri(request.uri())?;
        let version = request.version();
        let (mut parts, body) = request.into_parts();
        let (slot, mut paced);
        let mut response = match length.filter(|&n| n <= self.replay_buffer_bytes) {
            Some(length) => {
                // Read before taking the token, so that a slow upload does not use up its
                // validity; and within the client's header timeout, so that a client that stops
                // sending cannot hold a slot and a connection forever.
                // Nearly always the body came with the head: the timer is set only if not.
                let mut collecting = pin!(collect(body, length));
                let body =
                    match poll_fn(|cx| Poll::Ready(collecting.as_mut().poll(cx))).await {
                        Poll::Ready(body) => body?,
                        Poll::Pending => tokio::time::timeout(self.body_timeout, collecting)
                            .await
                            .map_err(|_| ProxyError::RequestBodyTimeout(self.body_timeout))??,
                    };
                // The send slot before the connection slot and the token: a request waiting
                // for its turn holds neither.
                paced = self.wait_turn().await?;
                slot = self.upstream_slot().await?;
                let authorization = self.rewrite(&mut parts.headers);
                let kept = Kept {
                    method: parts.method,
                    uri,
                    headers: parts.headers,
                    body,
                };
                self.forward_kept(kept, &authorization, &mut paced).await?
            }
            None => {
                paced = self.wait_turn().await?;
                slot = self.upstream_slot().await?;
                let authorization = self.rewrite(&mut parts.headers);
                parts.uri = uri;
                // The pooled connection may be HTTP/1.1 or h2, whatever the client spoke: the
                // client library picks the framing from ALPN, given a 1.1 request.
                parts.version = Version::HTTP_11;
                self.forward_streamed(parts, body, &authorization).await?
            }
        };

        // We never ask for an upgrade (`Upgrade` is hop-by-hop, removed), so a 101 is one the
        // upstream may not send (RFC 9110 §15.2.2); passed on, it would tell the client that
        // protocols were switched on a connection that hyper then closes.
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProxyError::UpstreamProtocol(
                "it switched protocols, which was never asked",
            ));
        }
        headers::remove_hop_by_hop(response.headers_mut());
        // The upstream answered before the client's body ended (an early 401 or 413): hyper
        // closes the connection rather than read the rest, so the answer says so (RFC 9112
        // §9.6), or the client would reuse a connection about to close.
        let left_unread = response.extensions_mut().remove::<BodyLeftUnread>();
        if left_unread.is_some() && version < Version::HTTP_2 {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        *response.version_mut() = Version::HTTP_11;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            self.count_refusal("upstream");
        }
        if self.pacer.is_some() {
            response.extensions_mut().insert(Paced(paced));
        }
        Ok((response, slot))
    }

    /// Waits for the credential's next send slot, unless the limiter is off; refused (429)
    /// when it is too far or too many wait already.
    async fn wait_turn(&self) -> Result<Duration, ProxyError> {
        let Some(pacer) = &self.pacer else {
            return Ok(Duration::ZERO);
        };
        pacer.wait_turn().await.inspect_err(|error| match error {
            ProxyError::SlotTooFar { .. } => self.count_refusal("wait_bound"),
            ProxyError::QueueFull { .. } => self.count_refusal("queue_full"),
            _ => {}
        })
    }

    fn count_refusal(&self, cause: &'static str) {
        self.metrics
            .rate_limit_refusals
            .get_or_create(&CauseLabels { cause })
            .inc();
    }

    /// The upstream's word wins: a 429 or 503 holds the credential back for its
    /// `Retry-After` (seconds or a date; anything else is ignored), or one interval.
    async fn heed(&self, response: &Response<PooledBody>) {
        let status = response.status();
        if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
            return;
        }
        if let Some(pacer) = &self.pacer {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| retry_after::parse(value, SystemTime::now()));
            tracing::debug!(
                status = status.as_u16(),
                retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                "the upstream asked us to slow down; holding the credential back"
            );
            pacer.push_back(retry_after).await;
        }
    }

    /// Waits, at most `upstream.response_timeout`, until fewer than `upstream.max_in_flight`
    /// requests are in flight to the upstream.
    async fn upstream_slot(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(slot) = self.upstream_slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let wait = self.upstream_slots.clone().acquire_owned();
        let _waiting = Waiting::new(&self.metrics.upstream_waiting);
        match tokio::time::timeout(self.response_timeout, wait).await {
            Ok(Ok(slot)) => Ok(slot),
            // The semaphore is never closed: only the timeout gets here.
            Ok(Err(_)) | Err(_) => Err(ProxyError::UpstreamBusy {
                limit: self.max_in_flight,
                waited: self.response_timeout,
            }),
        }
    }

    /// The upstream's request headers (see [`headers::rewrite_request`]); returns the
    /// `Authorization` they carry.
    fn rewrite(&self, headers: &mut HeaderMap) -> HeaderValue {
        let authorization = self.tokens.authorization();
        headers::rewrite_request(headers, authorization.clone());
        authorization
    }

    /// Sends a kept request: once more each time it was never written, and once more with a
    /// fresh token after a 401. One loop rather than a layer per rule: every layer would move
    /// the request and the response once more.
    async fn forward_kept(
        &self,
        mut kept: Kept,
        sent: &HeaderValue,
        paced: &mut Duration,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let mut replayed = false;
        let mut resent = false;
        let mut waited_again = false;
        loop {
            let response = match self.send(kept.request()).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) if error.never_written() && !resent => {
                    let error = ProxyError::from(Failure::of(&error));
                    // The same certificate would be presented again.
                    if matches!(error, ProxyError::Upstream(Failure::TlsCertificate(_))) {
                        return Err(error);
                    }
                    self.count_connect_error(&error);
                    self.metrics.retries.get_or_create(&CONNECT).inc();
                    tracing::debug!(code = error.code(), %error, "request not sent; sending it again");
                    resent = true;
                    continue;
                }
                Ok(Err(error)) => return Err(ProxyError::from(Failure::of(&error))),
                Err(_) => return Err(ProxyError::ResponseTimeout(self.response_timeout)),
            };
            self.heed(&response).await;
            match response.status() {
                StatusCode::UNAUTHORIZED => {}
                // Once, at the request's new slot, if that is within `rate_limit.max_wait`;
                // otherwise the upstream's 429 is the answer.
                StatusCode::TOO_MANY_REQUESTS if !waited_again && self.pacer.is_some() => {
                    let Ok(turn) = self.turn_again().await else {
                        return Ok(response);
                    };
                    drain(response.into_body()).await;
                    if let Some(turn) = turn {
                        *paced += turn.wait().await;
                    }
                    self.metrics.retries.get_or_create(&RATE_LIMITED).inc();
                    tracing::debug!("upstream answered 429; replayed at the next free slot");
                    (waited_again, resent) = (true, false);
                    continue;
                }
                status => {
                    if status.is_success() {
                        self.tokens.accepted();
                    }
                    return Ok(response);
                }
            }
            if replayed {
                self.tokens.refuse_credentials();
                return Ok(response);
            }
            // A wrong credential would cost every request two upstream calls.
            if self.tokens.credentials_refused() {
                self.metrics.unauthorized_replays_skipped.inc();
                return Ok(response);
            }
            // The replay counts against the rate limit like any request: it takes a slot.
            let Ok(turn) = self.turn_again().await else {
                return Ok(response);
            };
            drain(response.into_body()).await;
            if let Some(turn) = turn {
                *paced += turn.wait().await;
            }
            kept.headers.insert(AUTHORIZATION, self.tokens.reject(sent));
            self.metrics.retries.get_or_create(&UNAUTHORIZED).inc();
            tracing::debug!("upstream answered 401; replaying with a fresh token");
            (replayed, resent) = (true, false);
        }
    }

    /// Sends a streamed request, once. A 401 still drops the token, for the requests after it.
    async fn forward_streamed(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        sent: &HeaderValue,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let limit = self.max_body_bytes.unwrap_or(u64::MAX);
        let (body, mut failed) = Streamed::reporting(body, limit);
        let ended = body.ended.clone();
        let mut response = match self
            .send(Request::from_parts(parts, Either::Right(body)))
            .await
            .map_err(|_| ProxyError::ResponseTimeout(self.response_timeout))?
        {
            Ok(response) => response,
            // When the client's body failed (over the limit, or unreadable: bad chunked
            // framing), the fault is the client's, not the upstream's. Over HTTP/2 the body's
            // error reaches the upstream as a reset and comes back as one, without its cause:
            // the body tells us itself, before failing.
            Err(error) => {
                return Err(failed
                    .try_recv()
                    .unwrap_or_else(|_| ProxyError::from(Failure::of(&error))));
            }
        };
        if !ended.load(Ordering::Acquire) {
            response.extensions_mut().insert(BodyLeftUnread);
        }
        self.heed(&response).await;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            // A new token for the requests after it, unless the credentials were refused.
            if !self.tokens.credentials_refused() {
                self.tokens.reject(sent);
            }
            self.metrics.unauthorized_not_replayed.inc();
            tracing::debug!("upstream answered 401 to a request too large to replay");
        } else if status.is_success() {
            self.tokens.accepted();
        }
        Ok(response)
    }

    /// A send slot for a replay (after a 401, or a 429 that has pushed the schedule back
    /// already), if one is free within `rate_limit.max_wait`; none is needed with the limiter
    /// off. Refused, the upstream's answer goes to the client as it is.
    async fn turn_again(&self) -> Result<Option<Turn<'_>>, ProxyError> {
        match &self.pacer {
            Some(pacer) => pacer.reserve().await.map(Some),
            None => Ok(None),
        }
    }

    /// One exchange, waiting at most `upstream.response_timeout` for the response head. The
    /// timeout ends the request; the client's own error is left to the caller to judge. Not an
    /// `async fn`: one layer less to move the request and the response through.
    fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Timeout<impl Future<Output = Result<Response<PooledBody>, SendError>> + '_> {
        tokio::time::timeout(self.response_timeout, self.client.request(request))
    }

    fn count_connect_error(&self, error: &ProxyError) {
        if error.is_connect_error() {
            let code = ErrorLabels { code: error.code() };
            self.metrics
                .upstream_connect_errors
                .get_or_create(&code)
                .inc();
        }
    }

    fn upstream_uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let key = target.path_and_query().map_or("/", PathAndQuery::as_str);
        RECENT_TARGETS.with_borrow_mut(|recent| {
            recent.get_or_join(self.id, key, || {
                Ok(upstream::join_uri(
                    &self.scheme,
                    &self.authority,
                    &self.base_path,
                    target,
                )?)
            })
        })
    }
}

thread_local! {
    /// Per runtime thread, so that workers never contend for it.
    static RECENT_TARGETS: RefCell<RecentTargets> = RefCell::default();
}

/// How many client targets each thread remembers the upstream URI of.
const RECENT_TARGETS_PER_THREAD: usize = 8;

/// Upstream URIs of recent client targets. An app calls a handful of endpoints, so nearly every
/// request finds its target here and is spared joining, parsing and allocating the upstream's
/// (about 1k instructions per request: benches/README.md); a copy is reference counts. Keyed by
/// proxy too: tests run several in one process. The oldest entry makes way for a new one.
#[derive(Default)]
struct RecentTargets {
    entries: Vec<(u64, Box<str>, Uri)>,
    oldest: usize,
}

impl RecentTargets {
    fn get_or_join(
        &mut self,
        proxy: u64,
        target: &str,
        join: impl FnOnce() -> Result<Uri, ProxyError>,
    ) -> Result<Uri, ProxyError> {
        let found = self
            .entries
            .iter()
            .find(|(id, key, _)| *id == proxy && **key == *target);
        if let Some((_, _, uri)) = found {
            return Ok(uri.clone());
        }
        let uri = join()?;
        let entry = (proxy, Box::from(target), uri.clone());
        if self.entries.len() < RECENT_TARGETS_PER_THREAD {
            self.entries.push(entry);
        } else {
            self.entries[self.oldest] = entry;
            self.oldest = (self.oldest + 1) % RECENT_TARGETS_PER_THREAD;
        }
        Ok(uri)
    }
}

/// A rewritten request whose body was read, so that it can be sent more than once.
struct Kept {
    method: Method,
    uri: Uri,
    /// With `Authorization`, replaced in place for a replay.
    headers: HeaderMap,
    body: Bytes,
}

impl Kept {
    /// Another copy to send: the body is shared, not copied. HTTP/1.1, whatever the client
    /// spoke: the client library picks the framing from ALPN.
    fn request(&self) -> Request<UpstreamBody> {
        let mut request = Request::new(Either::Left(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Reads a body of announced `length` (at most `upstream.replay_buffer_bytes`), holding no
/// more than that whatever the client sends. Usually it is one frame, kept as it is; pieces are
/// joined. Trailers are dropped: only HTTP/2 can carry them on a body of known length, and
/// CM.com's API is JSON.
async fn collect(body: Incoming, length: u64) -> Result<Bytes, ProxyError> {
    let mut body = Streamed::new(body, length);
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    // A body of known length ends with its last byte: no poll more to hear so.
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|error| match error {
            RequestBodyError::Read(error) => ProxyError::RequestBody(error.to_string()),
            // Unreachable with hyper's own checks, which come first; kept as the memory bound.
            RequestBodyError::TooLong => {
                ProxyError::RequestBody("longer than its Content-Length".to_owned())
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                // `length` is bounded by `upstream.replay_buffer_bytes`.
                let mut all = BytesMut::with_capacity(length as usize);
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// Reads what is left of a response we discard, within [`DRAIN_LIMIT`] and [`DRAIN_TIMEOUT`].
async fn drain(mut body: PooledBody) {
    let mut left = DRAIN_LIMIT;
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            let read = frame.data_ref().map_or(0, Buf::remaining);
            match left.checked_sub(read) {
                Some(rest) => left = rest,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
}

/// The client's body on its way upstream, failing once more than its limit has passed: the
/// upstream then sees the request aborted, never complete.
pub struct Streamed {
    body: Incoming,
    /// Bytes allowed in all, and still allowed; `u64::MAX` for no limit.
    limit: u64,
    remaining: u64,
    /// Told why the body failed, which an HTTP/2 upstream would only report as a reset.
    failed: Option<oneshot::Sender<ProxyError>>,
    /// Set once the body has been read to its end.
    ended: Arc<AtomicBool>,
}

/// Counts a request as waiting for an upstream slot until dropped, however the wait ends (the
/// client may go away).
struct Waiting(Gauge);

impl Waiting {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Marks an upstream response that came before the client's body ended.
#[derive(Clone, Copy)]
struct BodyLeftUnread;

impl Streamed {
    /// The client's body, cut off past `limit` (`u64::MAX`: no limit).
    fn new(body: Incoming, limit: u64) -> Self {
        Self {
            body,
            limit,
            remaining: limit,
            failed: None,
            ended: Arc::default(),
        }
    }

    /// The same, and the receiver hears why it failed, if it does.
    fn reporting(body: Incoming, limit: u64) -> (Self, oneshot::Receiver<ProxyError>) {
        let (failed, receiver) = oneshot::channel();
        let body = Self {
            failed: Some(failed),
            ..Self::new(body, limit)
        };
        (body, receiver)
    }

    fn report(&mut self, error: ProxyError) {
        if let Some(failed) = self.failed.take() {
            let _ = failed.send(error);
        }
    }
}

/// Why the client's body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("reading the request body")]
    Read(#[source] hyper::Error),
    #[error("the request body is longer than allowed")]
    TooLong,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                self.report(ProxyError::RequestBody(error.to_string()));
                return Poll::Ready(Some(Err(RequestBodyError::Read(error))));
            }
            None => {
                self.ended.store(true, Ordering::Release);
                return Poll::Ready(None);
            }
        };
        if let Some(data) = frame.data_ref() {
            match self.remaining.checked_sub(data.len() as u64) {
                Some(remaining) => self.remaining = remaining,
                None => {
                    let limit = self.limit;
                    self.report(ProxyError::BodyTooLarge { limit });
                    return Poll::Ready(Some(Err(RequestBodyError::TooLong)));
                }
            }
        }
        // A body of known length ends with its last byte: the reader may not poll again.
        if self.body.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The upstream's response body, aborted once the upstream has sent nothing of it for
/// `upstream.response_timeout` while we wait (nginx's `proxy_read_timeout`): without a bound, a
/// body that stalls after its head holds the client, its in-flight slot and the upstream
/// connection forever, and the client's idle timeout does not run while a request is in flight.
/// Only time spent waiting on the upstream counts, never time the client takes to read.
pub struct Watched {
    body: PooledBody,
    /// Released when the body ends or fails, for the next request to the upstream.
    slot: Option<OwnedSemaphorePermit>,
    timeout: Duration,
    /// Made at the first wait, then reused: a body that arrives with its head never needs it.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the last poll found nothing, so that `silence` is running.
    waiting: bool,
}

/// The upstream went silent in the middle of a response body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing of the response body for {0:?}")]
pub struct BodyTimeout(Duration);

impl Watched {
    fn new(body: PooledBody, timeout: Duration, slot: OwnedSemaphorePermit) -> Self {
        Self {
            body,
            slot: Some(slot),
            timeout,
            silence: None,
            waiting: false,
        }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.waiting = false;
            if !matches!(frame, Some(Ok(_))) {
                this.slot = None;
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.timeout;
        let silence = match &mut this.silence {
            Some(silence) if this.waiting => silence,
            Some(silence) => {
                silence.as_mut().reset(deadline);
                silence
            }
            None => this
                .silence
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.waiting = true;
        ready!(std::future::Future::poll(silence.as_mut(), cx));
        tracing::warn!(timeout = ?this.timeout, "the upstream's response body stalled; aborting it");
        Poll::Ready(Some(Err(BodyTimeout(this.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request's `Transfer-Encoding` lines, joined, when they say anything but `chunked` alone
/// (empty list elements do not count, RFC 9110 §5.6.1).
fn other_codings(headers: &HeaderMap) -> Option<String> {
    let lines = headers.get_all(TRANSFER_ENCODING);
    let mut codings = lines
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => None,
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some(
            lines
                .iter()
                .map(|line| String::from_utf8_lossy(line.as_bytes()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

/// Whether an absolute-form authority names the socket the client connected to.
fn names_local(authority: &Authority, local: SocketAddr) -> bool {
    // `user@host` is never how a client addresses us, whoever `host` is.
    if authority.as_str().contains('@') || authority.port_u16().unwrap_or(80) != local.port() {
        return false;
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == local.ip(),
        Err(_) => host.eq_ignore_ascii_case("localhost") && local.ip().is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_chunked_alone_is_a_supported_transfer_encoding() {
        let codings = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(TRANSFER_ENCODING, HeaderValue::from_str(line).unwrap());
            }
            other_codings(&headers)
        };
        assert_eq!(codings(&[]), None);
        assert_eq!(codings(&["chunked"]), None);
        assert_eq!(codings(&["CHUNKED"]), None);
        assert_eq!(codings(&[", chunked ,"]), None);
        assert_eq!(
            codings(&["gzip, chunked"]).as_deref(),
            Some("gzip, chunked")
        );
        assert_eq!(
            codings(&["chunked, chunked"]).as_deref(),
            Some("chunked, chunked")
        );
        assert_eq!(codings(&["x", "chunked"]).as_deref(), Some("x, chunked"));
    }

    #[test]
    fn absolute_form_must_name_the_local_socket() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let yes = ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"];
        let no = [
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "api.cm.com:8080",
            "169.254.169.254",
            "127.0.0.1",
        ];
        for a in yes {
            assert!(names_local(&a.parse().unwrap(), local), "{a}");
        }
        for a in no {
            assert!(!names_local(&a.parse().unwrap(), local), "{a}");
        }
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(names_local(&"[::1]".parse().unwrap(), v6));
        assert!(names_local(&"localhost".parse().unwrap(), v6));
        assert!(!names_local(&"user@localhost:8080".parse().unwrap(), local));
    }

    #[test]
    fn recent_targets_join_each_target_once_per_proxy_and_forget_the_oldest() {
        let joins = std::cell::Cell::new(0);
        let mut recent = RecentTargets::default();
        let mut get = |proxy: u64, target: &str| {
            let uri = recent
                .get_or_join(proxy, target, || {
                    joins.set(joins.get() + 1);
                    Ok(format!("https://up.example/p{proxy}{target}")
                        .parse()
                        .unwrap())
                })
                .unwrap();
            (uri.to_string(), joins.get())
        };
        assert_eq!(get(1, "/a?x=1"), ("https://up.example/p1/a?x=1".into(), 1));
        assert_eq!(get(1, "/a?x=1"), ("https://up.example/p1/a?x=1".into(), 1));
        assert_eq!(get(2, "/a?x=1"), ("https://up.example/p2/a?x=1".into(), 2));
        assert_eq!(get(1, "/a?x=2"), ("https://up.example/p1/a?x=2".into(), 3));
        // Six more fill the table (eight) and push out the oldest, the first one.
        for i in 0..6 {
            get(1, &format!("/fill/{i}"));
        }
        assert_eq!(joins.get(), 9);
        assert_eq!(get(2, "/a?x=1").1, 9, "still there");
        assert_eq!(get(1, "/a?x=1").1, 10, "forgotten, joined again");
        assert_eq!(recent.entries.len(), RECENT_TARGETS_PER_THREAD);
        // A target that cannot be joined is not remembered.
        let mut failures = 0;
        for _ in 0..2 {
            let failed = recent.get_or_join(1, "*", || {
                failures += 1;
                Err(ProxyError::InvalidTarget)
            });
            assert!(failed.is_err());
        }
        assert_eq!(failures, 2);
    }
}
