//! What can go wrong with a request, and the one place that turns it into a response.
//!
//! Responses the proxy makes itself carry `Proxy-Status` (RFC 9209) naming this proxy and the
//! error type, and a JSON body `{"error":{"code","message"}}` whose `code` is the same RFC 9209
//! error type. A client tells them from CM.com's own answers by that header.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::upstream::{Failure, InvalidTarget};

/// The `Proxy-Status` field of RFC 9209.
pub static PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");

/// How this proxy names itself in `Proxy-Status`.
const PROXY_NAME: &str = "idmatch-proxy";

/// Marks a response the proxy made itself, in its extensions, for metrics and the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyErrorCode(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0} is not supported: this proxy forwards requests to one fixed upstream")]
    MethodRefused(http::Method),
    #[error("the request target names another authority ({0}): this is not a forward proxy; send origin-form paths such as /sim-swap")]
    ForeignAuthority(String),
    #[error("the request target must be an absolute path such as /sim-swap")]
    InvalidTarget,
    /// Over `client.max_body_bytes`: announced by `Content-Length`, or reached while streaming.
    #[error("the request body is larger than {limit} bytes, the most this proxy forwards")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read: {0}")]
    RequestBody(String),
    #[error("the request body did not arrive within {0:?}")]
    RequestBodyTimeout(std::time::Duration),
    /// A `Transfer-Encoding` other than `chunked` alone: hyper decodes only the last coding,
    /// so any other would reach the upstream still applied and no longer declared.
    #[error("Transfer-Encoding {0:?} is not supported: send the body with Content-Length or chunked alone")]
    TransferCoding(String),
    /// Connecting to the upstream, or the exchange on a connection, failed.
    #[error(transparent)]
    Upstream(#[from] Failure),
    #[error("the upstream sent no response headers within {0:?}")]
    ResponseTimeout(std::time::Duration),
    /// An answer that cannot be passed on to the client (RFC 9209 §2.3.13).
    #[error("the upstream broke the HTTP exchange: {0}")]
    UpstreamProtocol(&'static str),
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    /// The credential's next send slot is further away than `rate_limit.max_wait`.
    #[error("the next send slot for this credential is {} ms away, beyond rate_limit.max_wait ({} ms); retry in {retry_after} s", wait.as_millis(), max_wait.as_millis())]
    SlotTooFar {
        wait: std::time::Duration,
        max_wait: std::time::Duration,
        retry_after: u64,
    },
    /// `rate_limit.max_queued` requests are waiting for their slots already.
    #[error("{limit} requests are waiting for a send slot already (rate_limit.max_queued); retry in {retry_after} s")]
    QueueFull { limit: usize, retry_after: u64 },
    /// `upstream.max_in_flight` requests were in flight and none finished in time.
    #[error("{limit} requests to the upstream were in flight (upstream.max_in_flight) and none finished within {waited:?}; retry shortly")]
    UpstreamBusy {
        limit: usize,
        waited: std::time::Duration,
    },
    /// A callback (on the callback listener) without a valid signature; `reason` is its
    /// metric label.
    #[error("{message}")]
    CallbackSignature {
        reason: &'static str,
        message: String,
    },
    #[error("{0} is not a callback: CM.com's callbacks are POST requests")]
    CallbackMethod(http::Method),
    #[error("cannot deliver the callback to the app: {0}")]
    CallbackApp(String),
    #[error("the app did not answer the callback within {0:?}")]
    CallbackAppTimeout(std::time::Duration),
}

impl ProxyError {
    /// Every RFC 9209 type [`ProxyError::code`] returns, so that metrics can export each from
    /// the start (an alert sees 0, not an absent series).
    pub const CODES: [&'static str; 13] = [
        "http_request_denied",
        "http_request_error",
        "dns_error",
        "connection_refused",
        "connection_timeout",
        "tls_certificate_error",
        "tls_protocol_error",
        "destination_unavailable",
        "proxy_configuration_error",
        "http_response_timeout",
        "connection_terminated",
        "http_protocol_error",
        "connection_limit_reached",
    ];

    /// The types of the errors for which [`ProxyError::is_connect_error`] holds.
    pub const CONNECT_CODES: [&'static str; 7] = [
        "dns_error",
        "connection_refused",
        "connection_timeout",
        "tls_certificate_error",
        "tls_protocol_error",
        "destination_unavailable",
        "proxy_configuration_error",
    ];

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodRefused(_) | Self::CallbackMethod(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::CallbackSignature { .. } => StatusCode::UNAUTHORIZED,
            Self::ForeignAuthority(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::InvalidTarget | Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            // RFC 9112 §6.1: a transfer coding the server does not understand.
            Self::TransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Upstream(Failure::ConnectTimeout)
            | Self::ResponseTimeout(_)
            | Self::CallbackAppTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded | Self::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::SlotTooFar { .. } | Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream(_) | Self::UpstreamProtocol(_) | Self::CallbackApp(_) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The RFC 9209 §2.3 error type, used as the JSON `code` too.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MethodRefused(_)
            | Self::ForeignAuthority(_)
            | Self::CallbackMethod(_)
            | Self::CallbackSignature { .. } => "http_request_denied",
            Self::InvalidTarget
            | Self::RequestBody(_)
            | Self::RequestBodyTimeout(_)
            | Self::TransferCoding(_) => "http_request_error",
            // A limit the operator configured, so a refusal by policy (RFC 9209 §2.3.16) rather
            // than a malformed request; RFC 9209 has no request-body-size type.
            Self::BodyTooLarge { .. } => "http_request_denied",
            // The rate limit is the proxy's policy too (CM.com's, kept on its behalf).
            Self::SlotTooFar { .. } | Self::QueueFull { .. } => "http_request_denied",
            Self::Upstream(failure) => match failure {
                Failure::Dns(_) => "dns_error",
                Failure::ConnectionRefused => "connection_refused",
                Failure::ConnectTimeout => "connection_timeout",
                Failure::TlsCertificate(_) => "tls_certificate_error",
                Failure::TlsProtocol(_) => "tls_protocol_error",
                Failure::Unreachable(_) | Failure::Egress(_) => "destination_unavailable",
                Failure::EgressAuthentication(_) => "proxy_configuration_error",
                Failure::Terminated(_) => "connection_terminated",
            },
            Self::CallbackApp(_) => "destination_unavailable",
            Self::ResponseTimeout(_) | Self::CallbackAppTimeout(_) => "http_response_timeout",
            Self::UpstreamProtocol(_) => "http_protocol_error",
            // RFC 9209's nearest: a configured limit of the proxy was reached.
            Self::Overloaded | Self::UpstreamBusy { .. } => "connection_limit_reached",
        }
    }

    /// Whether the client, rather than the upstream, is at fault.
    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error() || matches!(self, Self::TransferCoding(_))
    }

    /// Whether connecting to the upstream failed (as opposed to an exchange on a connection).
    pub fn is_connect_error(&self) -> bool {
        matches!(self, Self::Upstream(failure) if failure.is_connect())
    }

    /// Seconds after which the client may try again (RFC 9110 §10.2.3), for refusals that know.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::SlotTooFar { retry_after, .. } | Self::QueueFull { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let proxy_status = format!("{PROXY_NAME}; error={}", self.code());
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            PROXY_STATUS.clone(),
            HeaderValue::try_from(proxy_status).expect("ASCII"),
        );
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        match &self {
            // RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
            Self::CallbackSignature { .. } => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("HMAC"));
            }
            Self::CallbackMethod(_) => {
                headers.insert(ALLOW, HeaderValue::from_static("POST"));
            }
            _ => {}
        }
        response
            .extensions_mut()
            .insert(ProxyErrorCode(self.code()));
        response
    }
}

impl From<InvalidTarget> for ProxyError {
    fn from(_: InvalidTarget) -> Self {
        Self::InvalidTarget
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_json_with_proxy_status() {
        let response = ProxyError::Upstream(Failure::ConnectionRefused).into_response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            response.headers()[&PROXY_STATUS],
            "idmatch-proxy; error=connection_refused"
        );
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "connection_refused");
        assert_eq!(
            json["error"]["message"],
            "the upstream refused the connection"
        );
    }

    /// One error of each variant. The match numbers the variants, so a new one does not compile
    /// until it is numbered, and then the test fails until it has a sample here.
    fn one_of_each() -> Vec<ProxyError> {
        use std::time::Duration;
        let samples = vec![
            ProxyError::MethodRefused(http::Method::TRACE),
            ProxyError::ForeignAuthority("example.com".into()),
            ProxyError::InvalidTarget,
            ProxyError::BodyTooLarge { limit: 1 },
            ProxyError::RequestBody("x".into()),
            ProxyError::RequestBodyTimeout(Duration::from_secs(1)),
            ProxyError::TransferCoding("gzip".into()),
            ProxyError::Upstream(Failure::Dns("x".into())),
            ProxyError::Upstream(Failure::ConnectionRefused),
            ProxyError::Upstream(Failure::ConnectTimeout),
            ProxyError::Upstream(Failure::TlsCertificate("x".into())),
            ProxyError::Upstream(Failure::TlsProtocol("x".into())),
            ProxyError::Upstream(Failure::Unreachable("x".into())),
            ProxyError::Upstream(Failure::Egress("x".into())),
            ProxyError::Upstream(Failure::EgressAuthentication("x".into())),
            ProxyError::ResponseTimeout(Duration::from_secs(1)),
            ProxyError::Upstream(Failure::Terminated("x".into())),
            ProxyError::UpstreamProtocol("x"),
            ProxyError::Overloaded,
            ProxyError::UpstreamBusy {
                limit: 1,
                waited: Duration::from_secs(1),
            },
            ProxyError::SlotTooFar {
                wait: Duration::from_secs(6),
                max_wait: Duration::from_secs(5),
                retry_after: 1,
            },
            ProxyError::QueueFull {
                limit: 1,
                retry_after: 1,
            },
            ProxyError::CallbackSignature {
                reason: "missing",
                message: "x".into(),
            },
            ProxyError::CallbackMethod(http::Method::GET),
            ProxyError::CallbackApp("x".into()),
            ProxyError::CallbackAppTimeout(Duration::from_secs(1)),
        ];
        let number = |error: &ProxyError| match error {
            ProxyError::MethodRefused(_) => 0,
            ProxyError::ForeignAuthority(_) => 1,
            ProxyError::InvalidTarget => 2,
            ProxyError::BodyTooLarge { .. } => 3,
            ProxyError::RequestBody(_) => 4,
            ProxyError::RequestBodyTimeout(_) => 5,
            ProxyError::TransferCoding(_) => 6,
            ProxyError::Upstream(Failure::Dns(_)) => 7,
            ProxyError::Upstream(Failure::ConnectionRefused) => 8,
            ProxyError::Upstream(Failure::ConnectTimeout) => 9,
            ProxyError::Upstream(Failure::TlsCertificate(_)) => 10,
            ProxyError::Upstream(Failure::TlsProtocol(_)) => 11,
            ProxyError::Upstream(Failure::Unreachable(_)) => 12,
            ProxyError::Upstream(Failure::Egress(_)) => 13,
            ProxyError::Upstream(Failure::EgressAuthentication(_)) => 14,
            ProxyError::ResponseTimeout(_) => 15,
            ProxyError::Upstream(Failure::Terminated(_)) => 16,
            ProxyError::UpstreamProtocol(_) => 17,
            ProxyError::Overloaded => 18,
            ProxyError::UpstreamBusy { .. } => 19,
            ProxyError::SlotTooFar { .. } => 20,
            ProxyError::QueueFull { .. } => 21,
            ProxyError::CallbackSignature { .. } => 22,
            ProxyError::CallbackMethod(_) => 23,
            ProxyError::CallbackApp(_) => 24,
            ProxyError::CallbackAppTimeout(_) => 25,
        };
        let numbers: Vec<usize> = samples.iter().map(number).collect();
        assert_eq!(numbers, (0..26).collect::<Vec<_>>());
        samples
    }

    #[test]
    fn the_code_lists_are_exactly_the_codes_errors_have() {
        use std::collections::BTreeSet;
        let errors = one_of_each();
        let codes: BTreeSet<_> = errors.iter().map(ProxyError::code).collect();
        assert_eq!(codes, ProxyError::CODES.into_iter().collect());
        assert_eq!(codes.len(), ProxyError::CODES.len(), "no duplicates");
        let connect: BTreeSet<_> = errors
            .iter()
            .filter(|e| e.is_connect_error())
            .map(ProxyError::code)
            .collect();
        assert_eq!(connect, ProxyError::CONNECT_CODES.into_iter().collect());
    }

    #[tokio::test]
    async fn rate_limit_refusals_are_429_with_retry_after() {
        let response = ProxyError::SlotTooFar {
            wait: std::time::Duration::from_millis(7250),
            max_wait: std::time::Duration::from_secs(5),
            retry_after: 3,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
        assert_eq!(
            response.headers()[&PROXY_STATUS],
            "idmatch-proxy; error=http_request_denied"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["error"]["message"],
            "the next send slot for this credential is 7250 ms away, beyond rate_limit.max_wait (5000 ms); retry in 3 s"
        );
        let full = ProxyError::QueueFull {
            limit: 8,
            retry_after: 1,
        };
        assert!(full.is_client_error());
        assert_eq!(full.into_response().headers()[RETRY_AFTER], "1");
        let other = ProxyError::Upstream(Failure::ConnectionRefused).into_response();
        assert!(!other.headers().contains_key(RETRY_AFTER));
    }

    #[test]
    fn timeouts_are_504_and_refusals_4xx() {
        assert_eq!(
            ProxyError::Upstream(Failure::ConnectTimeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let timeout = ProxyError::ResponseTimeout(std::time::Duration::from_secs(1));
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(ProxyError::MethodRefused(http::Method::CONNECT).is_client_error());
        assert!(!ProxyError::Upstream(Failure::Terminated("x".into())).is_client_error());
    }

    #[test]
    fn callback_refusals_name_what_would_be_accepted() {
        let unsigned = ProxyError::CallbackSignature {
            reason: "mismatch",
            message: "x".into(),
        }
        .into_response();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(unsigned.headers()[WWW_AUTHENTICATE], "HMAC");
        let get = ProxyError::CallbackMethod(http::Method::GET).into_response();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[ALLOW], "POST");
    }
}
