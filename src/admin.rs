//! The admin listener: liveness, readiness and metrics, never proxied.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::pace::Pacer;
use crate::token::TokenCache;

/// What the endpoints report on.
#[derive(Clone)]
pub struct State {
    pub tokens: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
    /// The rate limiter, if on, for the seconds until its next free slot. Readiness never
    /// asks it: traffic must not stop because Redis did.
    pub pacer: Option<Arc<Pacer>>,
}

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: State) {
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        let service = service_fn(move |request| {
            let response = answer(&state, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

fn answer<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"status":"method not allowed"}"#,
        );
    }
    match request.uri().path() {
        // Answering at all proves the runtime is alive; nothing upstream is consulted.
        "/livez" => json(StatusCode::OK, r#"{"status":"alive"}"#),
        "/readyz" => readiness(state),
        "/metrics" => {
            if let Some(pacer) = &state.pacer {
                let free_in = pacer.seconds_until_free();
                state.metrics.rate_limit_next_free.set(free_in);
            }
            let mut response =
                Response::new(Full::new(Bytes::from(state.metrics.render(&state.tokens))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => json(StatusCode::NOT_FOUND, r#"{"status":"not found"}"#),
    }
}

/// Ready when a usable token is cached and the process is not draining. The upstream is not
/// called: one probe per pod per few seconds would count against CM.com's rate limit.
fn readiness(state: &State) -> Response<Full<Bytes>> {
    if state.draining.load(Ordering::SeqCst) {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"not ready","reason":"draining"}"#,
        );
    }
    if !state.tokens.is_fresh() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"not ready","reason":"no usable token cached"}"#,
        );
    }
    json(StatusCode::OK, r#"{"status":"ready"}"#)
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
