//! idmatch-proxy: a sidecar that lets any application call CM.com's Mobile Identity API
//! without knowing its authentication.
//!
//! # Layout
//! - [`config`]: typed settings from defaults, a TOML file and `IDMATCH_*` variables.
//! - [`token`]: the hand-rolled HS256 signer and the shared, self-refreshing token.
//! - [`proxy`]: per-request rewriting and forwarding; bodies stream, never buffer.
//! - [`pace`]: the rate limiter: each request waits for its credential's send slot, kept
//!   locally or shared by the replicas through Redis.
//! - [`headers`]: hop-by-hop and credential hygiene.
//! - [`upstream`]: TLS, the egress tunnel and DNS towards the upstream; [`pool`]: its
//!   connections.
//! - [`error`]: what fails, and the one place that renders it as a JSON 4xx/502/503/504.
//! - [`server`]: listeners, connection timeouts, drain and shutdown.
//! - [`observe`]: per-request id, in-flight limit, access log and metrics.
//! - [`callback`]: the optional listener for CM.com's signed callbacks: verify, dedup, hand to
//!   the app.
//! - [`admin`]: `/livez`, `/readyz`, `/metrics`, and `/quitquitquit` (loopback) on their own listener.
//! - [`metrics`]: the Prometheus registry; [`telemetry`]: logging.
//!
//! [`run`] serves on listeners the caller bound, until `shutdown` resolves.

#![forbid(unsafe_code)]

pub mod admin;
pub mod callback;
pub mod config;
pub mod credentials;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod observe;
pub mod pace;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod token;
pub mod upstream;

pub use server::{Listeners, Server};

use std::future::Future;

use crate::config::Config;

/// Locks `mutex`, poisoned or not: nothing in this crate panics while holding a lock, so a
/// poisoned one still guards whole data.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `error: cause: cause`, as one line.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Builds a [`Server`] for `config` and serves on `listeners` until `shutdown` resolves.
pub async fn run(
    config: &Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), upstream::TlsSetupError> {
    Server::new(config)?.serve(listeners, shutdown).await;
    Ok(())
}
