//! idmatch-proxy: a sidecar that lets any application call CM.com's Mobile Identity API
//! without knowing its authentication.
//!
//! # The map
//! A request's stages, in the order [`proxy::Proxy::serve`] runs them, and who owns each:
//! - admit (`client.max_in_flight`), id and account: [`observe`] (access log, metrics);
//! - refuse (method, authority, codings, size): `proxy::refuse`;
//! - target, then the body, kept for a replay or streamed: `proxy::targets`, `proxy::body`;
//! - pace (the credential's send slot, local or through Redis): [`pace`];
//! - upstream slot and token: [`proxy`], the token from [`token`] (signer, shared cache);
//! - exchange and its replay rules: `proxy::exchange`, over [`upstream`] (TLS and its
//!   [`upstream::Trust`], egress tunnel, DNS, the pool and the connection it keeps warm, and
//!   the classes of its failures);
//! - response hygiene: [`headers`] (hop-by-hop and credentials), then [`error`], the one
//!   place a failure becomes a JSON 4xx/502/503/504 with `Proxy-Status`.
//!
//! Around it: [`server`] (listeners, each connection's timeouts, drain and shutdown),
//! [`callback`] (CM.com's signed callbacks: verify, dedup, hand to the app), [`credentials`]
//! (secrets and CA files re-read while serving), [`admin`] (`/livez`, `/readyz`, `/metrics`,
//! `/quitquitquit`), [`config`], [`metrics`] and [`telemetry`]. Modules depend downwards
//! only: `tests/architecture.rs` fails on an import cycle.
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
