//! What can go wrong with a request, and the one place that turns it into a response.
//!
//! Responses the proxy makes itself carry `Proxy-Status` (RFC 9209) naming this proxy and the
//! error type, and a JSON body `{"error":{"code","message"}}` whose `code` is the same RFC 9209
//! error type. A client tells them from CM.com's own answers by that header.

use std::error::Error as StdError;
use std::io;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;

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
    #[error("cannot resolve the upstream host: {0}")]
    Dns(String),
    #[error("the upstream refused the connection")]
    ConnectionRefused,
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    #[error("the upstream's TLS certificate was rejected: {0}")]
    TlsCertificate(String),
    #[error("the TLS handshake with the upstream failed: {0}")]
    TlsProtocol(String),
    #[error("cannot connect to the upstream: {0}")]
    Unreachable(String),
    /// The egress proxy could not be reached or would not open the tunnel; the message names it.
    #[error("{0}")]
    Egress(String),
    /// The egress proxy wants other credentials than its URL gives: an operator must act.
    #[error("{0}")]
    EgressAuthentication(String),
    #[error("the upstream sent no response headers within {0:?}")]
    ResponseTimeout(std::time::Duration),
    #[error("the upstream closed the connection before responding: {0}")]
    Terminated(String),
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
    /// A callback (on the callback listener) without a valid signature.
    #[error("{0}")]
    CallbackSignature(crate::callback::verify::SignatureError),
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

    /// Sorts a client error by walking its causes. rustls' errors arrive wrapped in one or two
    /// `io::Error`s, whose `source` skips the error they wrap, so those are opened by `get_ref`.
    pub fn from_upstream(error: crate::pool::SendError) -> Self {
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
        while let Some(e) = cause {
            // Before its causes: the proxy's own connection errors are not the upstream's.
            if let Some(egress) = e.downcast_ref::<crate::upstream::EgressError>() {
                return Self::from_egress(egress);
            }
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Self::from_tls(tls);
            }
            if let Some(dns) = e.downcast_ref::<crate::upstream::DnsError>() {
                return Self::Dns(dns.to_string());
            }
            if e.is::<crate::upstream::ConnectTimeout>() {
                return Self::ConnectTimeout;
            }
            cause = match e.downcast_ref::<io::Error>() {
                Some(io) => match io.kind() {
                    io::ErrorKind::ConnectionRefused => return Self::ConnectionRefused,
                    io::ErrorKind::TimedOut => return Self::ConnectTimeout,
                    _ => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
                },
                None => e.source(),
            };
        }
        let detail = chain(&error);
        if matches!(error, crate::pool::SendError::Connect(_)) {
            Self::Unreachable(detail)
        } else {
            Self::Terminated(detail)
        }
    }

    fn from_egress(error: &crate::upstream::EgressError) -> Self {
        use crate::upstream::EgressError;
        match error {
            EgressError::AuthenticationRequired { .. }
            | EgressError::AuthenticationRejected { .. } => {
                Self::EgressAuthentication(chain(error))
            }
            _ => Self::Egress(chain(error)),
        }
    }

    fn from_tls(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(_) => Self::TlsCertificate(error.to_string()),
            _ => Self::TlsProtocol(error.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodRefused(_) | Self::CallbackMethod(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::CallbackSignature(_) => StatusCode::UNAUTHORIZED,
            Self::ForeignAuthority(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::InvalidTarget | Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            // RFC 9112 §6.1: a transfer coding the server does not understand.
            Self::TransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::ConnectTimeout | Self::ResponseTimeout(_) | Self::CallbackAppTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Overloaded | Self::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::SlotTooFar { .. } | Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Dns(_)
            | Self::ConnectionRefused
            | Self::TlsCertificate(_)
            | Self::TlsProtocol(_)
            | Self::Unreachable(_)
            | Self::Egress(_)
            | Self::EgressAuthentication(_)
            | Self::Terminated(_)
            | Self::UpstreamProtocol(_)
            | Self::CallbackApp(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The RFC 9209 §2.3 error type, used as the JSON `code` too.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MethodRefused(_)
            | Self::ForeignAuthority(_)
            | Self::CallbackMethod(_)
            | Self::CallbackSignature(_) => "http_request_denied",
            Self::InvalidTarget
            | Self::RequestBody(_)
            | Self::RequestBodyTimeout(_)
            | Self::TransferCoding(_) => "http_request_error",
            // A limit the operator configured, so a refusal by policy (RFC 9209 §2.3.16) rather
            // than a malformed request; RFC 9209 has no request-body-size type.
            Self::BodyTooLarge { .. } => "http_request_denied",
            // The rate limit is the proxy's policy too (CM.com's, kept on its behalf).
            Self::SlotTooFar { .. } | Self::QueueFull { .. } => "http_request_denied",
            Self::Dns(_) => "dns_error",
            Self::ConnectionRefused => "connection_refused",
            Self::ConnectTimeout => "connection_timeout",
            Self::TlsCertificate(_) => "tls_certificate_error",
            Self::TlsProtocol(_) => "tls_protocol_error",
            Self::Unreachable(_) | Self::Egress(_) | Self::CallbackApp(_) => {
                "destination_unavailable"
            }
            Self::EgressAuthentication(_) => "proxy_configuration_error",
            Self::ResponseTimeout(_) | Self::CallbackAppTimeout(_) => "http_response_timeout",
            Self::Terminated(_) => "connection_terminated",
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
        matches!(
            self,
            Self::Dns(_)
                | Self::ConnectionRefused
                | Self::ConnectTimeout
                | Self::TlsCertificate(_)
                | Self::TlsProtocol(_)
                | Self::Unreachable(_)
                | Self::Egress(_)
                | Self::EgressAuthentication(_)
        )
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
            Self::CallbackSignature(_) => {
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

/// `error: cause: cause`, as one line.
pub(crate) fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_json_with_proxy_status() {
        let response = ProxyError::ConnectionRefused.into_response();
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
            ProxyError::Dns("x".into()),
            ProxyError::ConnectionRefused,
            ProxyError::ConnectTimeout,
            ProxyError::TlsCertificate("x".into()),
            ProxyError::TlsProtocol("x".into()),
            ProxyError::Unreachable("x".into()),
            ProxyError::Egress("x".into()),
            ProxyError::EgressAuthentication("x".into()),
            ProxyError::ResponseTimeout(Duration::from_secs(1)),
            ProxyError::Terminated("x".into()),
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
            ProxyError::CallbackSignature(crate::callback::verify::SignatureError::Missing),
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
            ProxyError::Dns(_) => 7,
            ProxyError::ConnectionRefused => 8,
            ProxyError::ConnectTimeout => 9,
            ProxyError::TlsCertificate(_) => 10,
            ProxyError::TlsProtocol(_) => 11,
            ProxyError::Unreachable(_) => 12,
            ProxyError::Egress(_) => 13,
            ProxyError::EgressAuthentication(_) => 14,
            ProxyError::ResponseTimeout(_) => 15,
            ProxyError::Terminated(_) => 16,
            ProxyError::UpstreamProtocol(_) => 17,
            ProxyError::Overloaded => 18,
            ProxyError::UpstreamBusy { .. } => 19,
            ProxyError::SlotTooFar { .. } => 20,
            ProxyError::QueueFull { .. } => 21,
            ProxyError::CallbackSignature(_) => 22,
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
        let other = ProxyError::ConnectionRefused.into_response();
        assert!(!other.headers().contains_key(RETRY_AFTER));
    }

    #[test]
    fn timeouts_are_504_and_refusals_4xx() {
        assert_eq!(
            ProxyError::ConnectTimeout.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        let timeout = ProxyError::ResponseTimeout(std::time::Duration::from_secs(1));
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(ProxyError::MethodRefused(http::Method::CONNECT).is_client_error());
        assert!(!ProxyError::Terminated("x".into()).is_client_error());
    }

    #[test]
    fn callback_refusals_name_what_would_be_accepted() {
        use crate::callback::verify::SignatureError;
        let unsigned = ProxyError::CallbackSignature(SignatureError::Mismatch).into_response();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(unsigned.headers()[WWW_AUTHENTICATE], "HMAC");
        let get = ProxyError::CallbackMethod(http::Method::GET).into_response();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[ALLOW], "POST");
    }
}
