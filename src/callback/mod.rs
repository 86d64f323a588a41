//! The listener for CM.com's signed callbacks (fact sheet §4): verify, then hand to the app.
//!
//! CM.com signs each callback with the secret this sidecar keeps from the apps, so the sidecar
//! verifies it and the app receives only genuine ones. A callback goes through, in order:
//! 1. a slot among `callback.max_in_flight` (else 503, which CM.com retries);
//! 2. `POST` only (405);
//! 3. the body, whole, within `callback.max_body_bytes` (413, before anything reaches the app)
//!    and `callback.body_timeout` (408): the signature covers the raw bytes;
//! 4. the signature ([`verify`]; 401, the app sees nothing);
//! 5. the event id: one the app already acknowledged is answered 200 again ([`dedup`]);
//! 6. the app at `callback.forward_url`, whose status goes back to CM.com; an app that is down
//!    or slow gets 502/504, so that CM.com delivers again.
//!
//! Nothing here reaches the upstream or carries the bearer token: this module has no access to
//! either. The proxy's JSON errors are rendered by [`crate::error`], as everywhere else.

pub mod dedup;
pub mod verify;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, HOST, PROXY_AUTHORIZATION,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::CallbackSettings;
use crate::error::ProxyError;
use crate::headers::remove_hop_by_hop;
use crate::metrics::{CallbackMetrics, Metrics};
use crate::token::Clock;
use crate::upstream::TlsSetupError;

use self::dedup::Delivered;
use self::verify::Verifier;

/// Added to every callback handed to the app: only verified ones are.
pub static VERIFIED: HeaderName = HeaderName::from_static("idmatch-callback-verified");

/// CM.com sends two headers; an Ingress adds a few. hyper's read buffer is at least 8 KiB.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// After an `accept` error (out of file descriptors) wait this long rather than spin, as the
/// proxy's own listener does.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connections to the app idle for this long are closed, below the usual 60 s of servers.
const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

type AppClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Everything a callback needs, built once.
pub struct Callbacks {
    settings: CallbackSettings,
    verifier: Arc<Verifier>,
    delivered: Delivered,
    app: AppClient,
    slots: Arc<Semaphore>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Callbacks {
    /// `secret` is the one the tokens are signed with now; rotations reach the
    /// [`Verifier`] through the credentials' reloader.
    pub fn new(
        settings: &CallbackSettings,
        secret: &[u8],
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsSetupError> {
        let verifier = Verifier::new(secret, settings.previous_secret_grace, clock.clone());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let app = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(APP_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            verifier: Arc::new(verifier),
            delivered: Delivered::new(settings.dedup_ttl, settings.dedup_max_ids),
            app,
            slots: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings: settings.clone(),
            clock,
            metrics,
        })
    }

    /// For the credentials' reloader, which rotates its secret.
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// Answers one callback; see the module doc for its stages.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let metrics = &self.metrics.callbacks;
        metrics.received.inc();
        // The path only: the query is the customer's and may carry a reference to a person.
        let path = request.uri().path().to_owned();
        let (response, outcome, error) = match self.receive(request, metrics).await {
            Ok((response, outcome)) => (response, outcome, None),
            Err(error) => {
                let outcome = match &error {
                    ProxyError::CallbackApp(_) | ProxyError::CallbackAppTimeout(_) => "failed",
                    _ => {
                        let reason = refusal_reason(&error);
                        metrics.refused(reason);
                        reason
                    }
                };
                // The message names what failed, never the signature or the body.
                let message = error.to_string();
                (error.into_response(), outcome, Some(message))
            }
        };
        tracing::info!(
            target: "idmatch_proxy::callback",
            %path,
            status = response.status().as_u16(),
            outcome,
            error = error.as_deref(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "callback"
        );
        response
    }

    async fn receive(
        &self,
        request: Request<Incoming>,
        metrics: &CallbackMetrics,
    ) -> Result<(Response<Full<Bytes>>, &'static str), ProxyError> {
        let _slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::Overloaded)?;
        if request.method() != Method::POST {
            return Err(ProxyError::CallbackMethod(request.method().clone()));
        }
        let (parts, body) = request.into_parts();
        let body = self.read(&parts.headers, body).await?;
        let signed_with = self
            .verifier
            .verify(
                parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
                &body,
            )
            .map_err(ProxyError::from)?;
        metrics.verified(signed_with.label());
        let event = event_id(&body);
        if let Some(id) = &event {
            if self.delivered.contains(id, self.clock.now()) {
                metrics.duplicates.inc();
                return Ok((status_only(StatusCode::OK), "duplicate"));
            }
        }
        let status = self.forward(parts, body).await.inspect_err(|error| {
            metrics.forwarded(match error {
                ProxyError::CallbackAppTimeout(_) => "timeout",
                _ => "unreachable",
            });
        })?;
        metrics.forwarded(status_class(status));
        if status.is_success() {
            if let Some(id) = &event {
                self.delivered.insert(id, self.clock.now());
            }
        }
        Ok((status_only(status), "forwarded"))
    }

    /// The whole body, bounded in size (refused at once when `Content-Length` says it is too
    /// large, else while reading) and in time.
    async fn read(&self, headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ProxyError> {
        let limit = self.settings.max_body_bytes;
        let too_large = ProxyError::BodyTooLarge { limit };
        let announced = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|length| length > limit) {
            return Err(too_large);
        }
        let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
        match tokio::time::timeout(self.settings.body_timeout, limited.collect()).await {
            Err(_) => Err(ProxyError::RequestBodyTimeout(self.settings.body_timeout)),
            Ok(Err(error)) if error.is::<LengthLimitError>() => Err(too_large),
            Ok(Err(error)) => Err(ProxyError::RequestBody(error.to_string())),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    /// Hands the verified callback to the app: the same path, query and body, without the
    /// signature and hop-by-hop fields, with [`VERIFIED`]. Only its status matters: CM.com
    /// ignores the answer's body (fact sheet §4.4).
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Bytes,
    ) -> Result<StatusCode, ProxyError> {
        let forward = &self.settings.forward;
        let uri = crate::upstream::join_uri(
            &forward.scheme,
            &forward.authority,
            &forward.base_path,
            &parts.uri,
        )?;
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers);
        headers.remove(AUTHORIZATION);
        headers.remove(PROXY_AUTHORIZATION);
        // The app's own, set by the client from the URI.
        headers.remove(HOST);
        headers.insert(VERIFIED.clone(), HeaderValue::from_static("true"));
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = parts.headers;
        let timeout = self.settings.forward_timeout;
        match tokio::time::timeout(timeout, self.app.request(request)).await {
            Err(_) => Err(ProxyError::CallbackAppTimeout(timeout)),
            Ok(Err(error)) => Err(ProxyError::CallbackApp(crate::chain(&error))),
            // Dropping the body closes or returns the connection; CM.com wants only the status.
            Ok(Ok(response)) => Ok(response.status()),
        }
    }
}

/// The event's `id` (fact sheet §4.1, §4.2), if the body is a JSON object that has one.
fn event_id(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::Object(mut fields) => match fields.remove("id")? {
            serde_json::Value::String(id) => Some(id),
            _ => None,
        },
        _ => None,
    }
}

fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The label of `callbacks_refused_total{reason}` for a callback refused before the app.
fn refusal_reason(error: &ProxyError) -> &'static str {
    match error {
        ProxyError::CallbackSignature { reason, .. } => reason,
        ProxyError::CallbackMethod(_) => "method",
        ProxyError::BodyTooLarge { .. } => "body_too_large",
        ProxyError::RequestBodyTimeout(_) | ProxyError::RequestBody(_) => "body_incomplete",
        ProxyError::Overloaded => "overloaded",
        _ => "invalid_target",
    }
}

/// Serves callbacks on `listener` (HTTP/1.1) until `stop` resolves, then lets the requests in
/// flight finish; the caller bounds how long. `callback.header_timeout` bounds each request
/// head, and idle keep-alive connections as well.
pub async fn serve(
    listener: TcpListener,
    callbacks: Arc<Callbacks>,
    stop: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(callbacks.settings.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "callback listener: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let callbacks = callbacks.clone();
        let service = service_fn(move |request| {
            let callbacks = callbacks.clone();
            async move { Ok::<_, Infallible>(callbacks.handle(request).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "callback connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
