//! The exchange with the upstream: one upstream request per client request, sent again in
//! three cases, bodies streamed both ways except small request bodies, kept for those cases.
//!
//! The cases:
//! - the upstream client failed before writing any byte of it
//!   ([`SendError::never_written`]): once per exchange, as the upstream cannot have seen it;
//!   an idempotent request (GET, PUT, DELETE...) also when the connection closed before any
//!   byte of the response ([`SendError::closed_before_response`], RFC 9112 §9.3.1): how a
//!   keep-alive connection the upstream closes as the request goes out fails;
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

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use http::header::{AUTHORIZATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::time::Timeout;

use super::body::{BodyLeftUnread, ClientBody};
use super::{PooledBody, Proxy, UpstreamBody};
use crate::error::ProxyError;
use crate::metrics::{ErrorLabels, ReasonLabels};
use crate::pace::{retry_after, Turn};
use crate::upstream::{Failure, SendError};

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

impl Proxy {
    /// Sends a kept request: once more each time it was never written, and once more with a
    /// fresh token after a 401. One loop rather than a layer per rule: every layer would move
    /// the request and the response once more.
    pub(super) async fn exchange_kept(
        &self,
        mut kept: KeptRequest,
        sent: &HeaderValue,
        paced: &mut Duration,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let mut replayed = false;
        let mut resent = false;
        let mut waited_again = false;
        loop {
            let response = match self.send(kept.request()).await {
                Ok(Ok(response)) => response,
                Ok(Err(error))
                    if !resent
                        && (error.never_written()
                            || kept.method.is_idempotent() && error.closed_before_response()) =>
                {
                    let error = ProxyError::from(Failure::of(&error));
                    // The same certificate would be presented again.
                    if matches!(error, ProxyError::Upstream(Failure::TlsCertificate(_))) {
                        return Err(error);
                    }
                    self.count_connect_error(&error);
                    self.metrics.retries.get_or_create(&CONNECT).inc();
                    tracing::debug!(code = error.code(), %error, "request not answered; sending it again");
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
    pub(super) async fn exchange_streamed(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        sent: &HeaderValue,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let limit = self.max_body_bytes.unwrap_or(u64::MAX);
        let (body, mut failed) = ClientBody::reporting(body, limit);
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

    pub(super) fn count_connect_error(&self, error: &ProxyError) {
        if error.is_connect_error() {
            let code = ErrorLabels { code: error.code() };
            self.metrics
                .upstream_connect_errors
                .get_or_create(&code)
                .inc();
        }
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
}

/// A rewritten request whose body was read, so that it can be sent more than once.
pub(super) struct KeptRequest {
    pub(super) method: Method,
    pub(super) uri: Uri,
    /// With `Authorization`, replaced in place for a replay.
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl KeptRequest {
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
