//! Callbacks (fact sheet §4): when a Number Verify transaction or a verification changes, the
//! event is POSTed to the `callbackUrl` its request gave, signed as CM.com signs it:
//! `Authorization: HMAC <standard base64 of HMAC-SHA256(body, secret's UTF-8 bytes)>` (§4.3).
//!
//! Our choices where CM.com is silent (§4.4, §7.1): one event per changed property; the event id
//! stays the same across retries; a 5xx, no answer within [`ATTEMPT_TIMEOUT`] or a failed
//! connection is retried after each of the configured delays (default 1 s, 2 s, 4 s), then the
//! event is dropped; a 2xx, 3xx or 4xx ends the delivery. A development mock must never call
//! the internet by surprise (CM's own examples name public hosts): a `callbackUrl` whose host is
//! not a loopback name or address is logged and not called, unless remote callbacks are allowed.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use time::macros::format_description;
use time::OffsetDateTime;
use tracing::info;

/// The delays before each retry, unless the builder sets others.
pub(super) const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// How long one attempt may take to get an answer's status.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Signs and sends events. Cheap to clone.
#[derive(Clone)]
pub(super) struct Notifier {
    key: ring::hmac::Key,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    retry_delays: Arc<[Duration]>,
    /// Whether hosts other than this machine's are called.
    remote: bool,
}

impl Notifier {
    pub(super) fn new(secret: &str, retry_delays: Vec<Duration>, remote: bool) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // http:// URLs are refused when the session starts, unless explicitly allowed.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            // ring, not the proxy's HMAC: the two check each other in the tests.
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
            client: Client::builder(TokioExecutor::new()).build(connector),
            retry_delays: retry_delays.into(),
            remote,
        }
    }

    /// Sends the event `{"id","type",<object>: fields,"created"}` to `url` in the background;
    /// `fields` is the object's JSON text, its keys in CM.com's order.
    pub(super) fn send(
        &self,
        url: &str,
        event_id: String,
        kind: &'static str,
        object: &'static str,
        fields: String,
    ) {
        if !self.remote && !on_this_machine(url) {
            info!(
                kind,
                "callback not sent: its host is not on this machine (--allow-remote-callbacks)"
            );
            return;
        }
        let created = OffsetDateTime::now_utc()
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]+00:00"
            ))
            .unwrap_or_default();
        // Keys in CM.com's order (§4.1, §4.2).
        let body = format!(
            "{{\"id\":{},\"type\":{},{}:{fields},\"created\":{}}}",
            Value::from(event_id),
            Value::from(kind),
            Value::from(object),
            Value::from(created),
        );
        let signature = format!(
            "HMAC {}",
            STANDARD.encode(ring::hmac::sign(&self.key, body.as_bytes()))
        );
        let (notifier, url) = (self.clone(), url.to_owned());
        tokio::spawn(async move {
            notifier
                .deliver(&url, kind, Bytes::from(body), &signature)
                .await
        });
    }

    async fn deliver(&self, url: &str, kind: &'static str, body: Bytes, signature: &str) {
        let mut delays = self.retry_delays.iter();
        for attempt in 1.. {
            let request = Request::builder()
                .method(Method::POST)
                .uri(url)
                .header(CONTENT_TYPE, "application/json")
                .header(AUTHORIZATION, signature)
                .body(Full::new(body.clone()));
            let Ok(request) = request else {
                return;
            };
            let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(request)).await;
            let status = match outcome {
                Ok(Ok(response)) => Some(response.status()),
                _ => None,
            };
            // Never the URL's query, the body or the signature.
            info!(
                kind,
                attempt,
                status = status.map(|status| status.as_u16()),
                "callback"
            );
            if status.is_some_and(|status| !status.is_server_error()) {
                return;
            }
            match delays.next() {
                Some(delay) => tokio::time::sleep(*delay).await,
                None => return,
            }
        }
    }
}

/// Whether `url` names a loopback host (`localhost`, `127.0.0.0/8`, `::1`), decided without a
/// DNS lookup.
fn on_this_machine(url: &str) -> bool {
    let Some(host) = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::on_this_machine;

    #[test]
    fn only_loopback_hosts_are_on_this_machine() {
        for url in [
            "https://localhost/cb",
            "http://LOCALHOST:8082/cb?x=1",
            "http://127.0.0.1:8082/cb",
            "http://127.9.9.9/cb",
            "http://[::1]:8082/cb",
        ] {
            assert!(on_this_machine(url), "{url}");
        }
        for url in [
            "https://example.com/callback",
            "https://mycallbackurl",
            "https://10.0.0.1/cb",
            "https://localhost.example.com/cb",
            "not a url",
        ] {
            assert!(!on_this_machine(url), "{url}");
        }
    }
}
