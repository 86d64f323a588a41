//! The forwarder: one client request in, one upstream request out (sent again in two cases),
//! bodies streamed both ways except small request bodies, kept for those cases.
//!
//! The two cases:
//! - hyper-util's client failed before writing any byte of it (see `never_written`): once per
//!   exchange, as the upstream cannot have seen it;
//! - the upstream answered 401: the token is re-minted and the request replayed, once.
//!
//! So the upstream receives a request at most twice, the second time because it asked to. Both
//! need the body again, so a body whose length is known and at most
//! `upstream.replay_buffer_bytes` is read into memory first ("kept"); any other body streams,
//! with backpressure, and is never sent twice. A response timeout is never retried: the upstream
//! may be processing the request, and CM.com's calls are POSTs.

use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::AUTHORIZATION;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{ErrorLabels, Metrics, ReasonLabels};
use crate::token::TokenCache;
use crate::upstream::UpstreamClient;

/// Upstream bodies pass through untouched; the proxy's own answers are small and whole.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What the proxy sends upstream: a kept body (cheap to clone, for a second attempt) or the
/// client's, streamed.
pub type UpstreamBody = Either<Full<Bytes>, Streamed>;

/// `retries{reason}` label values.
const CONNECT: ReasonLabels = ReasonLabels { reason: "connect" };
const UNAUTHORIZED: ReasonLabels = ReasonLabels {
    reason: "unauthorized",
};

/// A discarded 401 body is read to its end if it is this small and this prompt (CM.com's is a
/// line of JSON that comes with the head), so that its HTTP/1.1 connection can carry the
/// replay. Beyond that it is dropped, which closes the connection (HTTP/2: resets one stream).
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything a request needs, built once for the process and shared by all connections.
pub struct Proxy {
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host: HeaderValue,
    response_timeout: Duration,
    replay_buffer_bytes: u64,
    max_body_bytes: Option<u64>,
    tokens: Arc<TokenCache>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        client: UpstreamClient,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstream = &config.upstream;
        Self {
            client,
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            base_path: upstream.base_path.clone(),
            host: HeaderValue::from_str(upstream.authority.as_str())
                .expect("an authority is a valid header value"),
            response_timeout: upstream.response_timeout,
            replay_buffer_bytes: upstream.replay_buffer_bytes as u64,
            max_body_bytes: config.client.max_body_bytes,
            tokens,
            metrics,
        }
    }

    /// Answers one request; `local` is the address the client connected to.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        local: SocketAddr,
    ) -> Response<ProxyBody> {
        match self.forward(request, local).await {
            Ok(response) => response.map(Either::Left),
            Err(error) => {
                self.count_connect_error(&error);
                if error.is_client_error() {
                    tracing::debug!(code = error.code(), %error, "request refused");
                } else {
                    tracing::warn!(code = error.code(), %error, "upstream request failed");
                }
                error.into_response().map(Either::Right)
            }
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        local: SocketAddr,
    ) -> Result<Response<Incoming>, ProxyError> {
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
        let (mut parts, body) = request.into_parts();
        let response = match length.filter(|&n| n <= self.replay_buffer_bytes) {
            Some(length) => {
                // Read before taking the token, so that a slow upload does not use up its
                // validity.
                let body = collect(body, length).await?;
                let authorization = self.rewrite(&mut parts.headers);
                let kept = Kept {
                    method: parts.method,
                    uri,
                    headers: parts.headers,
                    body,
                };
                self.forward_kept(kept, &authorization).await?
            }
            None => {
                let authorization = self.rewrite(&mut parts.headers);
                parts.uri = uri;
                // The pooled connection may be HTTP/1.1 or h2, whatever the client spoke: the
                // client library picks the framing from ALPN, given a 1.1 request.
                parts.version = Version::HTTP_11;
                self.forward_streamed(parts, body, &authorization).await?
            }
        };

        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
    }

    /// The upstream's request headers (see [`headers::rewrite_request`]); returns the
    /// `Authorization` they carry.
    fn rewrite(&self, headers: &mut HeaderMap) -> HeaderValue {
        let authorization = self.tokens.authorization();
        headers::rewrite_request(headers, self.host.clone(), authorization.clone());
        authorization
    }

    /// Sends a kept request; after a 401, once more with a fresh token.
    async fn forward_kept(
        &self,
        mut kept: Kept,
        sent: &HeaderValue,
    ) -> Result<Response<Incoming>, ProxyError> {
        let response = self.send_kept(&kept).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        drain(response.into_body()).await;
        kept.headers.insert(AUTHORIZATION, self.tokens.reject(sent));
        self.metrics.retries.get_or_create(&UNAUTHORIZED).inc();
        tracing::debug!("upstream answered 401; replaying with a fresh token");
        let response = self.send_kept(&kept).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            tracing::warn!("upstream refused a freshly minted token too: check the credentials");
        }
        Ok(response)
    }

    /// Sends a kept request; if it was never written, once more.
    async fn send_kept(&self, kept: &Kept) -> Result<Response<Incoming>, ProxyError> {
        match self.send(kept.request()).await? {
            Err(error) if never_written(&error) => {
                let error = ProxyError::from_upstream(error);
                // The same certificate would be presented again.
                if matches!(error, ProxyError::TlsCertificate(_)) {
                    return Err(error);
                }
                self.count_connect_error(&error);
                self.metrics.retries.get_or_create(&CONNECT).inc();
                tracing::debug!(code = error.code(), %error, "request not sent; sending it again");
                self.send(kept.request())
                    .await?
                    .map_err(ProxyError::from_upstream)
            }
            sent => sent.map_err(ProxyError::from_upstream),
        }
    }

    /// Sends a streamed request, once. A 401 still drops the token, for the requests after it.
    async fn forward_streamed(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        sent: &HeaderValue,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (body, exceeded) = match self.max_body_bytes {
            Some(limit) => {
                let (body, exceeded) = Streamed::reporting(body, limit);
                (body, Some((limit, exceeded)))
            }
            None => (Streamed::new(body, u64::MAX), None),
        };
        let response = match self
            .send(Request::from_parts(parts, Either::Right(body)))
            .await?
        {
            Ok(response) => response,
            // Over HTTP/2 the body's error reaches the upstream as a reset and comes back as
            // one, without its cause: the limiter tells us itself, before failing the body.
            Err(error) => {
                let over =
                    exceeded.and_then(|(limit, mut told)| told.try_recv().is_ok().then_some(limit));
                return Err(match over {
                    Some(limit) => ProxyError::BodyTooLarge { limit },
                    None => ProxyError::from_upstream(error),
                });
            }
        };
        if response.status() == StatusCode::UNAUTHORIZED {
            self.tokens.reject(sent);
            self.metrics.unauthorized_not_replayed.inc();
            tracing::debug!("upstream answered 401 to a request too large to replay");
        }
        Ok(response)
    }

    /// One exchange, waiting at most `upstream.response_timeout` for the response head. The
    /// outer error is that timeout, which ends the request; the client's own error is left to
    /// the caller to judge.
    async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Result<Response<Incoming>, legacy::Error>, ProxyError> {
        tokio::time::timeout(self.response_timeout, self.client.request(request))
            .await
            .map_err(|_| ProxyError::ResponseTimeout(self.response_timeout))
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

    /// The upstream base path followed by the client's path and query, byte for byte: no
    /// decoding, no normalisation, so `%2F`, `+`, repeated and empty parameters reach CM.com as
    /// the client wrote them.
    fn upstream_uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = target.path_and_query().map_or("/", PathAndQuery::as_str);
        if !path_and_query.starts_with('/') {
            return Err(ProxyError::InvalidTarget);
        }
        let mut joined = String::with_capacity(self.base_path.len() + path_and_query.len());
        joined.push_str(&self.base_path);
        joined.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
            .map_err(|_| ProxyError::InvalidTarget)
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
/// more than that whatever the client sends. Trailers are dropped: only HTTP/2 can carry them
/// on a body of known length, and CM.com's API is JSON.
async fn collect(body: Incoming, length: u64) -> Result<Bytes, ProxyError> {
    match Streamed::new(body, length).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(RequestBodyError::Read(error)) => Err(ProxyError::RequestBody(error.to_string())),
        // Unreachable with hyper's own checks, which come first; kept as the memory bound.
        Err(RequestBodyError::TooLong) => Err(ProxyError::RequestBody(
            "longer than its Content-Length".to_owned(),
        )),
    }
}

/// Reads what is left of a response we discard, within [`DRAIN_LIMIT`] and [`DRAIN_TIMEOUT`].
async fn drain(mut body: Incoming) {
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

/// Whether hyper-util's client failed before writing any byte of the request, so that sending
/// it again cannot make the upstream act twice:
/// - `is_connect()`: connecting failed (DNS, TCP, egress tunnel, TLS, or the pool checkout);
///   the request never had a connection.
/// - a canceled `hyper::Error` as the immediate cause: hyper cancels a client request only
///   while handing it back unsent (the connection closed or was not ready before its
///   dispatcher took the request). hyper-util resends those itself on a reused pooled
///   connection (`retry_canceled_requests`) but returns them when the connection was new.
///
/// Everything else (an error while writing or while waiting for the response) may have
/// reached the upstream.
fn never_written(error: &legacy::Error) -> bool {
    error.is_connect()
        || error
            .source()
            .and_then(|cause| cause.downcast_ref::<hyper::Error>())
            .is_some_and(hyper::Error::is_canceled)
}

/// The client's body on its way upstream, failing once more than its limit has passed: the
/// upstream then sees the request aborted, never complete.
pub struct Streamed {
    body: Incoming,
    /// Bytes still allowed; `u64::MAX` for no limit.
    remaining: u64,
    /// Told when the limit is exceeded, which an HTTP/2 upstream would only report as a reset.
    exceeded: Option<oneshot::Sender<()>>,
}

impl Streamed {
    /// The client's body, cut off past `limit` (`u64::MAX`: no limit).
    fn new(body: Incoming, limit: u64) -> Self {
        Self {
            body,
            remaining: limit,
            exceeded: None,
        }
    }

    /// The same, and the receiver hears when the limit cuts it off.
    fn reporting(body: Incoming, limit: u64) -> (Self, oneshot::Receiver<()>) {
        let (exceeded, receiver) = oneshot::channel();
        let body = Self {
            body,
            remaining: limit,
            exceeded: Some(exceeded),
        };
        (body, receiver)
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
            Some(Err(error)) => return Poll::Ready(Some(Err(RequestBodyError::Read(error)))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            match self.remaining.checked_sub(data.len() as u64) {
                Some(remaining) => self.remaining = remaining,
                None => {
                    if let Some(exceeded) = self.exceeded.take() {
                        let _ = exceeded.send(());
                    }
                    return Poll::Ready(Some(Err(RequestBodyError::TooLong)));
                }
            }
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
}
