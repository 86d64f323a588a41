//! The request pipeline: [`Proxy::serve`] takes each client request through its stages, in
//! order, in one function. Each stage is a call with the reason it stands where it does; a stage
//! that refuses answers with a [`ProxyError`], and the stages after it never run.
//!
//! Plain ordered calls rather than a tower stack: the stages share one request record and
//! three early exits, and each layer of services would move the request and the response once
//! more (benches/README.md, "instructions per request").

mod body;
mod exchange;
mod refuse;
mod targets;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONNECTION;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{CauseLabels, Metrics};
use crate::observe::{AccountedBody, Accounting, RequestEnd};
use crate::pace::Pacer;
use crate::token::TokenCache;
use crate::upstream;
use body::{collect, BodyLeftUnread, ClientBody, StallTimeout};
use exchange::KeptRequest;

/// What the proxy answers: the upstream's body, watched for stalls, or its own small answer.
pub type ProxyBody = Either<StallTimeout, Full<Bytes>>;

/// What the proxy sends upstream: a kept body (cheap to clone, for a second attempt) or the
/// client's, streamed.
pub type UpstreamBody = Either<Full<Bytes>, ClientBody>;

/// The upstream's client, sending the proxy's request bodies.
pub type UpstreamClient = upstream::UpstreamClient<UpstreamBody>;

/// An upstream response's body, returning its connection to the pool at its end.
type PooledBody = upstream::PooledBody<UpstreamBody>;

/// Everything a request needs, built once for the process and shared by all connections.
pub struct Proxy {
    /// Tells this proxy's remembered targets from another's (tests run several in a process).
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
    accounting: Accounting,
    /// `client.max_in_flight` permits: a request is admitted with one, for its whole life.
    admitted: Arc<Semaphore>,
    /// `upstream.max_in_flight` permits; a request holds one from just before its token is
    /// taken until its response body ends.
    upstream_slots: Arc<Semaphore>,
    max_in_flight: usize,
    /// The credential's send slots; `None` when `rate_limit.interval` is zero.
    pacer: Option<Arc<Pacer>>,
    /// Set when the drain starts: HTTP/1 responses then close their connections.
    draining: Arc<AtomicBool>,
}

/// A request body after the body stage: read whole, or left to stream.
enum ForwardedBody {
    Kept(Bytes),
    Streamed(Incoming),
}

impl Proxy {
    pub fn new(
        config: &Config,
        client: UpstreamClient,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
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
            accounting: Accounting::new(metrics.clone(), config.log.redact_query),
            tokens,
            metrics,
            admitted: Arc::new(Semaphore::new(config.client.max_in_flight)),
            upstream_slots: Arc::new(Semaphore::new(upstream.max_in_flight)),
            max_in_flight: upstream.max_in_flight,
            pacer,
            draining,
        }
    }

    /// The rate limiter, if on (for its metrics).
    pub fn pacer(&self) -> Option<&Arc<Pacer>> {
        self.pacer.as_ref()
    }

    /// Keeps an upstream connection open ahead of requests, for `upstream.keep_warm`.
    pub fn keep_warm(&self) {
        self.client.keep_warm();
    }

    /// For requests hyper answered itself, before any service ran.
    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Answers one request: the service of every client connection. `local` is the address the
    /// client connected to; `connection` hears when the request has ended. It owns what it
    /// uses, so that hyper can hold it as is, without another future around it.
    pub async fn serve(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        local: SocketAddr,
        connection: Arc<dyn RequestEnd>,
    ) -> Result<Response<AccountedBody<ProxyBody>>, Infallible> {
        // Id and account: the client's `X-Request-Id` or a new one, for the upstream, the
        // response and the log line; from here on, however the request ends (the client may go
        // away while we wait, which drops this future), it is logged and counted once.
        let mut record = self.accounting.begin(&mut request, connection);
        let version = request.version();
        let body_pending = version < Version::HTTP_2 && !request.body().is_end_stream();
        let forwarded = async {
            // Admit: beyond `client.max_in_flight`, answer at once; a queue would only grow
            // while the upstream is slow.
            if !record.admit(&self.admitted) {
                return Err(ProxyError::Overloaded);
            }
            // Refuse what must never be forwarded (method, authority, codings, size), before it
            // costs anything.
            let length = refuse::refuse(&request, local, self.max_body_bytes)?;
            // Target: the upstream's URI for the client's path and query.
            let uri = self.upstream_uri(request.uri())?;
            let (mut parts, body) = request.into_parts();
            // Body: kept if small enough to send again (read now, within the client's header
            // timeout, so that a slow upload uses no slot and no token time); else streamed.
            let body = match length.filter(|&n| n <= self.replay_buffer_bytes) {
                Some(length) => ForwardedBody::Kept(self.read(body, length).await?),
                None => ForwardedBody::Streamed(body),
            };
            // Pace: the credential's send slot, before the connection slot and the token, so
            // that a request waiting for its turn holds neither.
            let mut paced = self.wait_turn().await?;
            // Upstream slot, then the token, fresh for the exchange.
            let slot = self.upstream_slot().await?;
            let authorization = self.rewrite(&mut parts.headers);
            // Exchange: a kept body may be sent again (never written, 401, 429); a streamed one
            // goes once.
            let response = match body {
                ForwardedBody::Kept(body) => {
                    let kept = KeptRequest {
                        method: parts.method,
                        uri,
                        headers: parts.headers,
                        body,
                    };
                    self.exchange_kept(kept, &authorization, &mut paced).await?
                }
                ForwardedBody::Streamed(body) => {
                    parts.uri = uri;
                    // The pooled connection may be HTTP/1.1 or h2, whatever the client spoke:
                    // the client library picks the framing from ALPN, given a 1.1 request.
                    parts.version = Version::HTTP_11;
                    self.exchange_streamed(parts, body, &authorization).await?
                }
            };
            if self.pacer.is_some() {
                record.paced(paced);
            }
            record.hold(slot);
            // Response hygiene: nothing the client must not see, nothing it would misread.
            self.clean(response, version)
        }
        .await;
        let (mut response, code) = match forwarded {
            Ok(response) => (response.map(Either::Left), None),
            Err(error) => self.refusal(error, body_pending),
        };
        // Draining: HTTP/1 clients learn it here, and reconnect to another replica.
        if version < Version::HTTP_2 && self.draining.load(Ordering::Relaxed) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        // Account: the record rides with the body to its end.
        Ok(record.respond(response, code))
    }

    /// Reads a kept body; bounded by the client's header timeout, so that a client that stops
    /// sending cannot hold a slot and a connection forever. Nearly always the body came with
    /// the head: the timer is set only if not.
    async fn read(&self, body: Incoming, length: u64) -> Result<Bytes, ProxyError> {
        let mut collecting = pin!(collect(body, length));
        match poll_fn(|cx| Poll::Ready(collecting.as_mut().poll(cx))).await {
            Poll::Ready(body) => body,
            Poll::Pending => tokio::time::timeout(self.body_timeout, collecting)
                .await
                .map_err(|_| ProxyError::RequestBodyTimeout(self.body_timeout))?,
        }
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

    fn upstream_uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        Ok(targets::upstream_uri(self.id, target, || {
            upstream::join_uri(&self.scheme, &self.authority, &self.base_path, target)
        })?)
    }

    /// The upstream's response as the client may see it.
    fn clean(
        &self,
        mut response: Response<PooledBody>,
        version: Version,
    ) -> Result<Response<StallTimeout>, ProxyError> {
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
        let timeout = self.response_timeout;
        Ok(response.map(|body| StallTimeout::new(body, timeout)))
    }

    /// The proxy's own answer to a request it could not forward, and its error type.
    fn refusal(
        &self,
        error: ProxyError,
        body_pending: bool,
    ) -> (Response<ProxyBody>, Option<&'static str>) {
        self.count_connect_error(&error);
        if error.is_client_error() {
            tracing::debug!(code = error.code(), %error, "request refused");
        } else {
            tracing::warn!(code = error.code(), %error, "upstream request failed");
        }
        let code = error.code();
        let mut response = error.into_response();
        // The client's body may be left unread, and then hyper closes the connection after
        // this answer: say so (RFC 9112 §9.6), or the client would reuse it.
        if body_pending {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        (response.map(Either::Right), Some(code))
    }
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
