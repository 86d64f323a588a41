//! The admin listener: liveness, readiness and metrics, never proxied; and `POST /quitquitquit`
//! from loopback, which drains and stops the proxy as SIGTERM does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;
use crate::pace::Pacer;
use crate::token::TokenCache;

/// What the endpoints report on, and act on.
#[derive(Clone)]
pub struct State {
    pub tokens: Arc<TokenCache>,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
    /// Notified once a `POST /quitquitquit` has been answered: the server drains as on SIGTERM.
    pub quit: Arc<Notify>,
    /// The rate limiter, if on, for the seconds until its next free slot. Readiness never
    /// asks it: traffic must not stop because Redis did.
    pub pacer: Option<Arc<Pacer>>,
}

/// Marks the answer to an accepted `POST /quitquitquit`.
#[derive(Clone, Copy)]
struct Quit;

/// Serves the admin endpoints until the task is aborted.
pub async fn serve(listener: TcpListener, state: State) {
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let quit = state.quit.clone();
        let (asked, mut was_asked) = watch::channel(false);
        let state = state.clone();
        let service = service_fn(move |request| {
            let response = answer(&state, &request, peer);
            if response.extensions().get::<Quit>().is_some() {
                asked.send_replace(true);
            }
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            tokio::pin!(connection);
            // The drain starts once the answer is out and the connection closed: with no drain
            // delay the process could otherwise exit before the caller has its answer.
            let quit_asked = tokio::select! {
                _ = connection.as_mut() => *was_asked.borrow(),
                Ok(()) = was_asked.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                    true
                }
            };
            if quit_asked {
                quit.notify_one();
            }
        });
    }
}

fn answer<B>(state: &State, request: &Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let method = request.method();
    let path = request.uri().path();
    if path == "/quitquitquit" {
        return quit(method, peer);
    }
    if method != Method::GET && method != Method::HEAD {
        return not_allowed("GET, HEAD");
    }
    match path {
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

/// `POST /quitquitquit`: how a Job's main container stops the proxy when it is done, where the
/// proxy is an ordinary container that would otherwise keep the pod running (the legacy-sidecar
/// pattern). Only from loopback, that is from the pod's own containers: the admin listener
/// usually binds every address for the kubelet's probes.
fn quit(method: &Method, peer: SocketAddr) -> Response<Full<Bytes>> {
    if method != Method::POST {
        return not_allowed("POST");
    }
    if !peer.ip().to_canonical().is_loopback() {
        tracing::warn!(%peer, "POST /quitquitquit refused: the peer is not on loopback");
        return json(
            StatusCode::FORBIDDEN,
            r#"{"status":"forbidden","reason":"only loopback clients may stop the proxy"}"#,
        );
    }
    tracing::info!(%peer, "shutdown requested by POST /quitquitquit");
    let mut response = json(StatusCode::ACCEPTED, r#"{"status":"draining"}"#);
    response.extensions_mut().insert(Quit);
    response
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"status":"method not allowed"}"#,
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSettings;
    use crate::token::{Signer, SystemClock};

    fn state() -> State {
        State {
            tokens: Arc::new(TokenCache::new(
                Signer::new("kid", b"secret"),
                TokenSettings::default(),
                Arc::new(SystemClock),
            )),
            metrics: Arc::new(Metrics::new()),
            draining: Arc::new(AtomicBool::new(false)),
            quit: Arc::new(Notify::new()),
            pacer: None,
        }
    }

    fn ask(method: Method, path: &str, peer: &str) -> Response<Full<Bytes>> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        answer(&state(), &request, peer.parse().unwrap())
    }

    #[test]
    fn quitquitquit_is_a_post_from_loopback_only() {
        for peer in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
            let accepted = ask(Method::POST, "/quitquitquit", peer);
            assert_eq!(accepted.status(), StatusCode::ACCEPTED, "{peer}");
            assert!(accepted.extensions().get::<Quit>().is_some(), "{peer}");
        }
        // The pod IP, as the kubelet or another pod would reach a 0.0.0.0 listener.
        for peer in [
            "10.1.2.3:40000",
            "[fd00::1]:40000",
            "[::ffff:10.1.2.3]:40000",
        ] {
            let refused = ask(Method::POST, "/quitquitquit", peer);
            assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{peer}");
            assert!(refused.extensions().get::<Quit>().is_none(), "{peer}");
        }
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            let refused = ask(method.clone(), "/quitquitquit", "127.0.0.1:40000");
            assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(refused.headers()[ALLOW], "POST");
            assert!(refused.extensions().get::<Quit>().is_none());
        }
    }

    #[test]
    fn the_other_endpoints_take_get_and_head_only() {
        let refused = ask(Method::POST, "/readyz", "127.0.0.1:40000");
        assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers()[ALLOW], "GET, HEAD");
        assert_eq!(
            ask(Method::GET, "/livez", "10.1.2.3:40000").status(),
            StatusCode::OK
        );
    }
}
