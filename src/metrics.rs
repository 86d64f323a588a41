//! Prometheus metrics. Labels are small closed sets (method, status class, error type): never
//! a path, a query, a token or a secret.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::ProxyError;
use crate::token::TokenCache;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    status_class: &'static str,
}

/// `requests{method}`: folded so that clients cannot grow the label set.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];
/// `requests{status_class}`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::PATCH => 3,
        http::Method::DELETE => 4,
        http::Method::HEAD => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class_index(status: http::StatusCode) -> usize {
    usize::from((status.as_u16() / 100).clamp(1, 5) - 1)
}

/// An RFC 9209 error type, as `ProxyError::code` returns it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub code: &'static str,
}

/// `upstream_retries{reason}`: after a connect failure, after a 401, after the upstream's 429.
const RETRY_REASONS: [&str; 3] = ["connect", "unauthorized", "rate_limited"];
/// `rate_limit_refusals{cause}`.
const REFUSAL_CAUSES: [&str; 3] = ["wait_bound", "queue_full", "upstream"];
/// `rate_limit_abandoned_slots{outcome}`.
const ABANDONED_OUTCOMES: [&str; 2] = ["given_back", "wasted"];
/// `credential_reloads{outcome}`, `upstream_ca_reloads{outcome}`.
const RELOAD_OUTCOMES: [&str; 2] = ["success", "failure"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Why the proxy answered 429: `wait_bound`, `queue_full` or `upstream`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

/// Where send slots are reserved: `local`, `shared` or `fallback`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabels {
    secret: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `callbacks_refused{reason}`: why a callback never reached the app.
const CALLBACK_REFUSALS: [&str; 8] = [
    "method",
    "missing_signature",
    "malformed_signature",
    "bad_signature",
    "body_too_large",
    "body_incomplete",
    "invalid_target",
    "overloaded",
];
/// `callbacks_verified{secret}`: the current one, or the previous one during its grace period.
const CALLBACK_SECRETS: [&str; 2] = ["current", "previous"];
/// `callbacks_forwarded{result}`: the app's status class, or why it gave none.
const CALLBACK_RESULTS: [&str; 7] = [
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "other",
    "unreachable",
    "timeout",
];

/// The callback listener's counters (`callbacks_*`).
#[derive(Default)]
pub struct CallbackMetrics {
    pub received: Counter,
    verified: Family<SecretLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    /// Redeliveries of an event the app had acknowledged, answered without it.
    pub duplicates: Counter,
    forwarded: Family<ResultLabels, Counter>,
}

impl CallbackMetrics {
    pub fn verified(&self, secret: &'static str) {
        self.verified.get_or_create(&SecretLabels { secret }).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn forwarded(&self, result: &'static str) {
        self.forwarded.get_or_create(&ResultLabels { result }).inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "callbacks_received",
            "Requests received on the callback listener",
            self.received.clone(),
        );
        registry.register(
            "callbacks_verified",
            "Callbacks whose signature matched, by the secret that signed them",
            self.verified.clone(),
        );
        registry.register(
            "callbacks_refused",
            "Callbacks refused before reaching the app, by reason",
            self.refused.clone(),
        );
        registry.register(
            "callbacks_duplicates",
            "Verified callbacks of an event the app had acknowledged, answered without it",
            self.duplicates.clone(),
        );
        registry.register(
            "callbacks_forwarded",
            "Verified callbacks handed to the app, by its status class or failure",
            self.forwarded.clone(),
        );
        for secret in CALLBACK_SECRETS {
            self.verified.get_or_create_owned(&SecretLabels { secret });
        }
        for reason in CALLBACK_REFUSALS {
            self.refused.get_or_create_owned(&ReasonLabels { reason });
        }
        for result in CALLBACK_RESULTS {
            self.forwarded.get_or_create_owned(&ResultLabels { result });
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabels {
    trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric the proxy exports. Handles are cheap clones of shared atomics.
pub struct Metrics {
    registry: Registry,
    /// Finished requests (response sent, body included).
    requests: Family<RequestLabels, Counter>,
    /// `requests`' counters, each looked up in the family once: the family's lock and hashing
    /// stay off the request path.
    request_counters: [OnceLock<Counter>; METHODS.len() * STATUS_CLASSES.len()],
    /// From request head received to the last byte of the response body.
    pub request_duration: Histogram,
    /// From request head received to the upstream's response head.
    pub upstream_ttfb: Histogram,
    pub in_flight: Gauge,
    /// Requests waiting for one of the `upstream.max_in_flight` slots.
    pub upstream_waiting: Gauge,
    /// Responses the proxy made itself, by RFC 9209 error type.
    pub proxy_errors: Family<ErrorLabels, Counter>,
    /// Failures to connect to the upstream (DNS, TCP, TLS, timeout), by error type.
    pub upstream_connect_errors: Family<ErrorLabels, Counter>,
    /// Requests sent again: after a connection failure before writing, or a 401.
    pub retries: Family<ReasonLabels, Counter>,
    /// Replays after a 401 that were not possible because the body was too large to keep.
    pub unauthorized_not_replayed: Counter,
    /// Re-reads of changed credential files, by outcome (`success` or `failure`).
    pub credential_reloads: Family<OutcomeLabels, Counter>,
    /// Re-reads of a changed `upstream.ca_file`, by outcome.
    pub ca_reloads: Family<OutcomeLabels, Counter>,
    /// 401s passed on without a replay because a freshly minted token was refused before.
    pub unauthorized_replays_skipped: Counter,
    /// 1 while 401s are not replayed (a fresh token was refused), else 0.
    credentials_refused: Gauge,
    token_mints: Family<TriggerLabels, Counter<u64, AtomicU64>>,
    token_expiry: Gauge,
    /// Requests waiting for their send slot.
    pub rate_limit_queued: Gauge,
    /// How long requests waited for their send slot.
    pub rate_limit_wait: Histogram,
    /// 429s, by cause.
    pub rate_limit_refusals: Family<CauseLabels, Counter>,
    /// 1 for the schedule in use, 0 for the others.
    pub rate_limit_backend: Family<BackendLabels, Gauge>,
    /// Failed round trips to the Redis store (errors and timeouts).
    pub rate_limit_redis_errors: Counter,
    /// Slots of requests whose client went away, given back or left unused.
    pub rate_limit_abandoned: Family<OutcomeLabels, Counter>,
    /// Seconds until the credential's next free send slot, as last seen.
    pub rate_limit_next_free: Gauge<f64, AtomicU64>,
    pub callbacks: CallbackMetrics,
}

impl Metrics {
    /// Counts a finished request in `requests_total`.
    pub fn count_request(&self, method: &http::Method, status: http::StatusCode) {
        self.count(method_index(method), status_class_index(status));
    }

    /// Counts in `requests_total` a request whose head hyper could not parse: its method is
    /// unknown, so `other`.
    pub fn count_unparsed(&self, status: http::StatusCode) {
        self.count(METHODS.len() - 1, status_class_index(status));
    }

    fn count(&self, method: usize, class: usize) {
        self.request_counters[method * STATUS_CLASSES.len() + class]
            .get_or_init(|| {
                let labels = RequestLabels {
                    method: METHODS[method],
                    status_class: STATUS_CLASSES[class],
                };
                self.requests.get_or_create(&labels).clone()
            })
            .inc();
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idmatch_proxy");
        let latency = || Histogram::new(LATENCY_BUCKETS.iter().copied());
        let metrics = Self {
            requests: Family::default(),
            request_counters: std::array::from_fn(|_| OnceLock::new()),
            request_duration: latency(),
            upstream_ttfb: latency(),
            in_flight: Gauge::default(),
            upstream_waiting: Gauge::default(),
            proxy_errors: Family::default(),
            upstream_connect_errors: Family::default(),
            retries: Family::default(),
            unauthorized_not_replayed: Counter::default(),
            credential_reloads: Family::default(),
            ca_reloads: Family::default(),
            unauthorized_replays_skipped: Counter::default(),
            credentials_refused: Gauge::default(),
            token_mints: Family::default(),
            token_expiry: Gauge::default(),
            rate_limit_queued: Gauge::default(),
            rate_limit_wait: Histogram::new(WAIT_BUCKETS.iter().copied()),
            rate_limit_refusals: Family::default(),
            rate_limit_backend: Family::default(),
            rate_limit_redis_errors: Counter::default(),
            rate_limit_abandoned: Family::default(),
            rate_limit_next_free: Gauge::default(),
            callbacks: CallbackMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by method and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            metrics.request_duration.clone(),
        );
        registry.register(
            "upstream_response_seconds",
            "Time from request head to the upstream's response head (time to first byte)",
            metrics.upstream_ttfb.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being handled now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "upstream_requests_waiting",
            "Requests waiting because upstream.max_in_flight requests to the upstream are in flight",
            metrics.upstream_waiting.clone(),
        );
        registry.register(
            "proxy_errors",
            "Responses made by the proxy itself, by RFC 9209 error type",
            metrics.proxy_errors.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failures to connect to the upstream, by RFC 9209 error type",
            metrics.upstream_connect_errors.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests sent to the upstream again, by reason",
            metrics.retries.clone(),
        );
        registry.register(
            "unauthorized_not_replayed",
            "401 answers passed to the client because the request body was too large to replay",
            metrics.unauthorized_not_replayed.clone(),
        );
        registry.register(
            "unauthorized_replays_skipped",
            "401 answers passed to the client without a replay because a freshly minted token was refused before",
            metrics.unauthorized_replays_skipped.clone(),
        );
        registry.register(
            "credentials_refused",
            "1 while 401s are not replayed because the upstream refused a freshly minted token",
            metrics.credentials_refused.clone(),
        );
        registry.register(
            "rate_limit_queued",
            "Requests waiting for their send slot",
            metrics.rate_limit_queued.clone(),
        );
        registry.register(
            "rate_limit_wait_seconds",
            "Time requests waited for their send slot",
            metrics.rate_limit_wait.clone(),
        );
        registry.register(
            "rate_limit_refusals",
            "429 answers, by cause (wait_bound, queue_full, upstream)",
            metrics.rate_limit_refusals.clone(),
        );
        registry.register(
            "rate_limit_backend",
            "1 for where send slots are reserved now (local, shared or fallback)",
            metrics.rate_limit_backend.clone(),
        );
        registry.register(
            "rate_limit_redis_errors",
            "Failed or timed-out round trips to the Redis store",
            metrics.rate_limit_redis_errors.clone(),
        );
        registry.register(
            "rate_limit_abandoned_slots",
            "Send slots of requests whose client went away, by outcome (given_back, wasted)",
            metrics.rate_limit_abandoned.clone(),
        );
        registry.register(
            "rate_limit_next_free_seconds",
            "Seconds until the credential's next free send slot, as last seen",
            metrics.rate_limit_next_free.clone(),
        );
        registry.register(
            "credential_reloads",
            "Reloads of changed credential files, by outcome",
            metrics.credential_reloads.clone(),
        );
        registry.register(
            "upstream_ca_reloads",
            "Reloads of a changed upstream.ca_file, by outcome",
            metrics.ca_reloads.clone(),
        );
        registry.register(
            "token_mints",
            "Tokens signed, by trigger (background, inline, rotation, reauth)",
            metrics.token_mints.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the cached token expires",
            metrics.token_expiry.clone(),
        );
        // Every label value exists from the start: an alert on a rate then sees 0, not an
        // absent series, before the first event.
        for code in ProxyError::CODES {
            metrics
                .proxy_errors
                .get_or_create_owned(&ErrorLabels { code });
        }
        for code in ProxyError::CONNECT_CODES {
            (metrics.upstream_connect_errors).get_or_create_owned(&ErrorLabels { code });
        }
        for reason in RETRY_REASONS {
            metrics
                .retries
                .get_or_create_owned(&ReasonLabels { reason });
        }
        for outcome in RELOAD_OUTCOMES {
            (metrics.credential_reloads).get_or_create_owned(&OutcomeLabels { outcome });
            (metrics.ca_reloads).get_or_create_owned(&OutcomeLabels { outcome });
        }
        for cause in REFUSAL_CAUSES {
            (metrics.rate_limit_refusals).get_or_create_owned(&CauseLabels { cause });
        }
        for outcome in ABANDONED_OUTCOMES {
            (metrics.rate_limit_abandoned).get_or_create_owned(&OutcomeLabels { outcome });
        }
        metrics.callbacks.register(&mut registry);
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version", build_info);
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition, with the token gauges read from `tokens` now.
    pub fn render(&self, tokens: &TokenCache) -> String {
        let counts = tokens.mint_counts();
        for (trigger, count) in [
            ("background", counts.background),
            ("inline", counts.inline),
            ("rotation", counts.rotation),
            ("reauth", counts.reauth),
        ] {
            let counter = self.token_mints.get_or_create(&TriggerLabels { trigger });
            counter
                .inner()
                .store(count, std::sync::atomic::Ordering::Relaxed);
        }
        self.token_expiry.set(tokens.seconds_until_expiry());
        self.credentials_refused
            .set(i64::from(tokens.credentials_refused()));
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// From 100 µs (the proxy's own cost) to 30 s (the default response timeout).
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// From no wait to beyond any sensible `rate_limit.max_wait`.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSettings;
    use crate::token::{Signer, SystemClock};
    use http::{Method, StatusCode};

    #[test]
    fn requests_are_counted_by_folded_method_and_status_class() {
        let metrics = Metrics::new();
        let tokens = TokenCache::new(
            Signer::new("kid", b"secret"),
            TokenSettings::default(),
            std::sync::Arc::new(SystemClock),
        );
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        for (method, status) in [
            (&Method::POST, 200),
            (&Method::POST, 204),
            (&Method::GET, 404),
            (&propfind, 207),
            (&Method::DELETE, 599),
            (&Method::HEAD, 101),
        ] {
            metrics.count_request(method, StatusCode::from_u16(status).unwrap());
        }
        let text = metrics.render(&tokens);
        let mut counted: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("idmatch_proxy_requests_total{"))
            .collect();
        counted.sort_unstable();
        assert_eq!(
            counted,
            [
                "idmatch_proxy_requests_total{method=\"DELETE\",status_class=\"5xx\"} 1",
                "idmatch_proxy_requests_total{method=\"GET\",status_class=\"4xx\"} 1",
                "idmatch_proxy_requests_total{method=\"HEAD\",status_class=\"1xx\"} 1",
                "idmatch_proxy_requests_total{method=\"POST\",status_class=\"2xx\"} 2",
                "idmatch_proxy_requests_total{method=\"other\",status_class=\"2xx\"} 1",
            ]
        );
    }
}
