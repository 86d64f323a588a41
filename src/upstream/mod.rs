//! Reaching the upstream, and everything that can go wrong there: TLS and its trust
//! ([`Trust`]), the egress tunnel and DNS (`connect`), the pooled connections ([`pool`]) and
//! the classes its failures fall into ([`failure`]), and the connection kept open for sparse
//! traffic (`warm`). Generic over the request body: nothing
//! here knows the proxy's.

mod connect;
pub mod failure;
pub mod pool;
mod warm;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::config::{Roots, Upstream};

pub use connect::{BoxError, ConnectTimeout, Connector, DnsError, EgressError};
use connect::{Egress, Resolver};
pub use failure::Failure;
pub use pool::{PooledBody, RequestBody, SendError, UpstreamClient};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(
        "upstream.roots is native, but the system trust store has no usable certificate ({0})"
    )]
    NoNativeRoots(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates new upstream connections are verified against: `upstream.roots`, loaded
/// once, and the `upstream.ca_file` bundle, replaceable while serving
/// ([`crate::credentials::CaReloader`]). Connections already open are not verified again.
#[derive(Clone)]
pub struct Trust {
    /// Shared with the [`Connector`], which takes the current one for each connection.
    https: Arc<ArcSwap<HttpsConnector<Egress>>>,
    roots: Arc<RootCertStore>,
    egress: Egress,
    offer: Offer,
}

/// What new connections offer the upstream.
#[derive(Clone, Copy)]
struct Offer {
    /// `upstream.allow_insecure_http`: `http://` too, not only `https://`.
    insecure_http: bool,
    /// `upstream.http2`: h2 before http/1.1 in ALPN, else http/1.1 alone.
    http2: bool,
}

impl Trust {
    /// rustls with the configured roots, ALPN `h2` then `http/1.1` (`http/1.1` alone without
    /// `upstream.http2`), TCP_NODELAY, a tunnel
    /// through the egress proxy if one is configured, and `https://` only unless plain HTTP was
    /// explicitly allowed.
    pub fn new(upstream: &Upstream) -> Result<Self, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        match upstream.roots {
            Roots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Roots::Native => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    let errors: Vec<String> =
                        native.errors.iter().map(ToString::to_string).collect();
                    return Err(TlsSetupError::NoNativeRoots(errors.join("; ")));
                }
            }
        }

        let mut http = HttpConnector::new_with_resolver(Resolver::default());
        http.enforce_http(false);
        http.set_nodelay(true);
        let egress = Egress::new(http, upstream.proxy.as_ref());
        if let Some(proxy) = &egress.proxy {
            tracing::info!(
                proxy = %proxy.authority,
                proxy_authorization = proxy.authorization.is_some(),
                "reaching the upstream through a CONNECT tunnel"
            );
        }

        let offer = Offer {
            insecure_http: upstream.allow_insecure_http,
            http2: upstream.http2,
        };
        let https = https(&roots, &upstream.extra_roots, &egress, offer)?;
        Ok(Self {
            https: Arc::new(ArcSwap::from_pointee(https)),
            roots: Arc::new(roots),
            egress,
            offer,
        })
    }

    /// The client for `upstream`, its connections verified by this trust as it is when each is
    /// made, and connecting (TCP, tunnel and TLS) bounded by `upstream.connect_timeout`.
    pub fn client<B: RequestBody>(&self, upstream: &Upstream) -> UpstreamClient<B> {
        let connector = Connector::new(self.https.clone(), upstream.connect_timeout);
        UpstreamClient::new(connector, upstream)
    }

    /// New connections trust `roots` plus `extra`. A fresh TLS configuration, so no session
    /// made under the previous roots is resumed without verification.
    pub fn replace_extra_roots(
        &self,
        extra: &[CertificateDer<'static>],
    ) -> Result<(), TlsSetupError> {
        let https = https(&self.roots, extra, &self.egress, self.offer)?;
        self.https.store(Arc::new(https));
        Ok(())
    }
}

/// The HTTPS connector trusting `roots` plus `extra`.
fn https(
    roots: &RootCertStore,
    extra: &[CertificateDer<'static>],
    egress: &Egress,
    offer: Offer,
) -> Result<HttpsConnector<Egress>, TlsSetupError> {
    let mut roots = roots.clone();
    // Each was checked to be a usable trust anchor when the file was read.
    roots.add_parsable_certificates(extra.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let schemes = HttpsConnectorBuilder::new().with_tls_config(tls);
    let schemes = if offer.insecure_http {
        schemes.https_or_http()
    } else {
        schemes.https_only()
    };
    let http1 = schemes.enable_http1();
    Ok(match offer.http2 {
        true => http1.enable_http2().wrap_connector(egress.clone()),
        false => http1.wrap_connector(egress.clone()),
    })
}

/// A client target that is not an absolute path (`*`, say): nothing to join to a base path.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the target is not an absolute path")]
pub struct InvalidTarget;

/// The upstream base path followed by the client's path and query, byte for byte: no decoding,
/// no normalisation, so `%2F`, `+`, repeated and empty parameters reach CM.com as the client
/// wrote them. Public for the property tests (`tests/properties.rs`).
pub fn join_uri(
    scheme: &Scheme,
    authority: &Authority,
    base_path: &str,
    target: &Uri,
) -> Result<Uri, InvalidTarget> {
    let path_and_query = target.path_and_query().map_or("/", PathAndQuery::as_str);
    if !path_and_query.starts_with('/') {
        return Err(InvalidTarget);
    }
    let mut joined = String::with_capacity(base_path.len() + path_and_query.len());
    joined.push_str(base_path);
    joined.push_str(path_and_query);
    Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(joined)
        .build()
        .map_err(|_| InvalidTarget)
}
