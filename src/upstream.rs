//! The one pooled HTTPS client the process uses to reach the upstream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use tokio::net::TcpStream;

use crate::config::{Roots, Upstream};

pub type UpstreamClient = Client<Connector, Incoming>;

/// Pooled connections idle longer than this are closed by us rather than risk reusing one the
/// upstream's load balancer is closing (commonly at 60 s).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("upstream.roots = native: the system trust store has no usable certificate ({0})")]
    NoNativeRoots(String),
    #[error("upstream.ca_file: certificate {index} is not a valid CA certificate: {source}")]
    BadExtraRoot { index: usize, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the client: rustls with the configured roots, ALPN `h2` then `http/1.1`, TCP_NODELAY,
/// a bound on connecting (TCP and TLS), and `https://` only unless plain HTTP was explicitly
/// allowed.
pub fn client(upstream: &Upstream) -> Result<UpstreamClient, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match upstream.roots {
        Roots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::Native => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
                return Err(TlsSetupError::NoNativeRoots(errors.join("; ")));
            }
        }
    }
    for (index, cert) in upstream.extra_roots.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|source| TlsSetupError::BadExtraRoot { index, source })?;
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new_with_resolver(Resolver);
    http.enforce_http(false);
    http.set_nodelay(true);

    let schemes = HttpsConnectorBuilder::new().with_tls_config(tls);
    let schemes = if upstream.allow_insecure_http {
        schemes.https_or_http()
    } else {
        schemes.https_only()
    };
    let https = schemes.enable_http1().enable_http2().wrap_connector(http);
    let connector = Connector {
        https,
        timeout: upstream.connect_timeout,
    };

    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

/// Connecting to the upstream (TCP, then TLS) took longer than `upstream.connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connecting took longer than {0:?}")]
pub struct ConnectTimeout(Duration);

/// The HTTPS connector with one deadline over TCP connect and TLS handshake together.
#[derive(Clone, Debug)]
pub struct Connector {
    https: HttpsConnector<HttpConnector<Resolver>>,
    timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let connecting = self.https.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(ConnectTimeout(timeout).into()),
            }
        })
    }
}

/// The failed lookup of the upstream's host name; its own type so that errors can be sorted.
#[derive(Debug, thiserror::Error)]
#[error("{host}: {source}")]
pub struct DnsError {
    host: String,
    source: std::io::Error,
}

/// The system resolver (getaddrinfo on the blocking pool), with errors of our own type.
#[derive(Clone, Copy, Debug)]
pub struct Resolver;

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, DnsError>> + Send>>;

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        Box::pin(async move {
            match tokio::net::lookup_host((name.as_str(), 0)).await {
                Ok(addrs) => Ok(addrs.collect::<Vec<_>>().into_iter()),
                Err(source) => Err(DnsError {
                    host: name.as_str().to_owned(),
                    source,
                }),
            }
        })
    }
}
