//! The forwarder: one client request in, one upstream request out, bodies streamed both ways.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::Upstream;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{ErrorLabels, Metrics};
use crate::token::TokenCache;
use crate::upstream::UpstreamClient;

/// Upstream bodies pass through untouched; the proxy's own answers are small and whole.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Everything a request needs, built once for the process and shared by all connections.
pub struct Proxy {
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host: HeaderValue,
    response_timeout: Duration,
    tokens: Arc<TokenCache>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(
        upstream: &Upstream,
        client: UpstreamClient,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            scheme: upstream.scheme.clone(),
            authority: upstream.authority.clone(),
            base_path: upstream.base_path.clone(),
            host: HeaderValue::from_str(upstream.authority.as_str())
                .expect("an authority is a valid header value"),
            response_timeout: upstream.response_timeout,
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
                if error.is_connect_error() {
                    let code = ErrorLabels { code: error.code() };
                    self.metrics
                        .upstream_connect_errors
                        .get_or_create(&code)
                        .inc();
                }
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
        mut request: Request<Incoming>,
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

        *request.uri_mut() = self.upstream_uri(request.uri())?;
        // The pooled connection may be HTTP/1.1 or h2, whatever the client spoke: the client
        // library picks the framing from ALPN, given a 1.1 request.
        *request.version_mut() = Version::HTTP_11;
        headers::rewrite_request(
            request.headers_mut(),
            self.host.clone(),
            self.tokens.authorization(),
        );

        let response = tokio::time::timeout(self.response_timeout, self.client.request(request))
            .await
            .map_err(|_| ProxyError::ResponseTimeout(self.response_timeout))?
            .map_err(ProxyError::from_upstream)?;

        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
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
