//! The classes an upstream exchange's failure falls into, found by walking its causes; what each
//! class answers the client is [`crate::error`]'s to say.

use std::error::Error as StdError;
use std::io;

use super::{ConnectTimeout, DnsError, EgressError, SendError};
use crate::chain;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
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
    #[error("the upstream closed the connection before responding: {0}")]
    Terminated(String),
}

impl Failure {
    /// Sorts a client error by walking its causes. rustls' errors arrive wrapped in one or two
    /// `io::Error`s, whose `source` skips the error they wrap, so those are opened by `get_ref`.
    pub fn of(error: &SendError) -> Self {
        let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
        while let Some(e) = cause {
            // Before its causes: the proxy's own connection errors are not the upstream's.
            if let Some(egress) = e.downcast_ref::<EgressError>() {
                return Self::of_egress(egress);
            }
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Self::of_tls(tls);
            }
            if let Some(dns) = e.downcast_ref::<DnsError>() {
                return Self::Dns(dns.to_string());
            }
            if e.is::<ConnectTimeout>() {
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
        let detail = chain(error);
        if matches!(error, SendError::Connect(_)) {
            Self::Unreachable(detail)
        } else {
            Self::Terminated(detail)
        }
    }

    fn of_egress(error: &EgressError) -> Self {
        match error {
            EgressError::AuthenticationRequired { .. }
            | EgressError::AuthenticationRejected { .. } => {
                Self::EgressAuthentication(chain(error))
            }
            _ => Self::Egress(chain(error)),
        }
    }

    fn of_tls(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(_) => Self::TlsCertificate(error.to_string()),
            _ => Self::TlsProtocol(error.to_string()),
        }
    }

    /// Whether connecting failed, as opposed to an exchange on a connection.
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Terminated(_))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::upstream::BoxError;

    /// A connect error whose cause is `error`, wrapped twice in `io::Error` as rustls' are.
    fn connect(error: impl Into<BoxError>) -> SendError {
        let inner = io::Error::other(error.into());
        SendError::Connect(Box::new(io::Error::other(inner)))
    }

    fn proxy() -> http::uri::Authority {
        http::uri::Authority::from_static("proxy.internal:3128")
    }

    #[test]
    fn each_cause_is_sorted_into_its_class() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            Failure::of(&connect(refused)),
            Failure::ConnectionRefused
        ));
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert!(matches!(
            Failure::of(&connect(timed_out)),
            Failure::ConnectTimeout
        ));
        let ours = ConnectTimeout(Duration::from_secs(1));
        assert!(matches!(
            Failure::of(&connect(ours)),
            Failure::ConnectTimeout
        ));
        let dns = DnsError {
            host: "api.cm.com".into(),
            source: Arc::new(io::Error::other("no such host")),
        };
        let Failure::Dns(text) = Failure::of(&connect(dns)) else {
            panic!("not a DNS failure");
        };
        assert_eq!(text, "api.cm.com: no such host");
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(matches!(
            Failure::of(&connect(expired)),
            Failure::TlsCertificate(_)
        ));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure);
        assert!(matches!(
            Failure::of(&connect(alert)),
            Failure::TlsProtocol(_)
        ));
        let Failure::Unreachable(text) = Failure::of(&connect("no route")) else {
            panic!("not unreachable");
        };
        assert_eq!(text, "connecting to the upstream: no route");
    }

    #[test]
    fn the_egress_proxy_is_named_and_its_credentials_told_apart() {
        let wants = EgressError::AuthenticationRequired { proxy: proxy() };
        let Failure::EgressAuthentication(text) = Failure::of(&connect(wants)) else {
            panic!("not an egress credentials failure");
        };
        assert!(text.contains("proxy.internal:3128"), "{text}");
        let rejected = EgressError::AuthenticationRejected { proxy: proxy() };
        assert!(matches!(
            Failure::of(&connect(rejected)),
            Failure::EgressAuthentication(_)
        ));
        let refused = EgressError::Refused {
            proxy: proxy(),
            target: "api.cm.com:443".into(),
            status: http::StatusCode::FORBIDDEN,
        };
        let Failure::Egress(text) = Failure::of(&connect(refused)) else {
            panic!("not an egress failure");
        };
        assert!(text.contains("api.cm.com:443"), "{text}");
        // The egress proxy's own connection refusal is not the upstream's.
        let unreachable = EgressError::Unreachable {
            proxy: proxy(),
            source: Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)),
        };
        assert!(matches!(
            Failure::of(&connect(unreachable)),
            Failure::Egress(_)
        ));
    }

    #[test]
    fn only_a_failed_exchange_is_not_a_connect_failure() {
        assert!(Failure::ConnectTimeout.is_connect());
        assert!(Failure::Egress(String::new()).is_connect());
        assert!(!Failure::Terminated(String::new()).is_connect());
    }
}
