//! idmatch-proxy: a sidecar that lets any application call CM.com's Mobile Identity API
//! without knowing its authentication.
//!
//! # Layout
//! - [`config`]: typed settings from defaults, a TOML file and `IDMATCH_*` variables.
//! - [`token`]: the hand-rolled HS256 signer and the shared, self-refreshing token.
//! - [`proxy`]: per-request rewriting and forwarding; bodies stream, never buffer.
//! - [`headers`]: hop-by-hop and credential hygiene.
//! - [`upstream`]: the pooled rustls client.
//! - [`error`]: what fails, and the one place that renders it as a JSON 4xx/502/504.
//!
//! [`run`] serves on a listener the caller bound, until `shutdown` resolves.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod telemetry;
pub mod token;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::token::{Clock, Signer, SystemClock, TokenCache};

/// After an `accept` error (typically out of file descriptors) wait this long before the next
/// attempt, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A proxy ready to serve: TLS roots loaded, first token minted.
pub struct Server {
    proxy: Arc<Proxy>,
    tokens: Arc<TokenCache>,
    shutdown_timeout: Duration,
}

impl Server {
    pub fn new(config: &Config) -> Result<Self, upstream::TlsSetupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, upstream::TlsSetupError> {
        let client = upstream::client(&config.upstream)?;
        let signer = Signer::new(
            &config.credentials.key_id,
            config.credentials.secret.expose(),
        );
        let tokens = Arc::new(TokenCache::new(signer, config.token.clone(), clock));
        let metrics = Arc::new(Metrics::new());
        let proxy = Arc::new(Proxy::new(
            &config.upstream,
            client,
            tokens.clone(),
            metrics.clone(),
        ));
        Ok(Self {
            proxy,
            tokens,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The shared token, for observing it (tests, metrics).
    pub fn tokens(&self) -> &Arc<TokenCache> {
        &self.tokens
    }

    /// Serves HTTP/1.1 and h2c (prior knowledge) on `listener` until `shutdown` resolves, then
    /// stops accepting and lets in-flight requests finish, for at most `shutdown_timeout`.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let refresher = tokio::spawn(self.tokens.clone().run_refresher());
        let mut http = auto::Builder::new(TokioExecutor::new());
        // A timer enables hyper's default HTTP/1 header read timeout (slowloris).
        http.http1().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);

        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.proxy.clone();
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request, local).await) }
            });
            let connection = http
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
            });
        }

        drop(listener);
        tracing::info!("shutting down: no new connections; waiting for in-flight requests");
        if tokio::time::timeout(self.shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.shutdown_timeout, "connections still open at the shutdown timeout; closing them");
        }
        refresher.abort();
    }
}

/// Builds a [`Server`] for `config` and serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), upstream::TlsSetupError> {
    Server::new(config)?.serve(listener, shutdown).await;
    Ok(())
}
