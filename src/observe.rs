//! Bookkeeping around every proxied request: the in-flight limit, `X-Request-Id`, the access
//! log line and the request metrics. The log line and the metrics are written when the
//! response body ends (or is abandoned), so that durations and byte counts are the real ones.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{ProxyError, ProxyErrorCode};
use crate::metrics::{ErrorLabels, Metrics, RequestLabels};
use crate::proxy::{Proxy, ProxyBody};
use crate::server::Activity;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The access log's `tracing` target: `RUST_LOG=idmatch_proxy::access=off` silences it.
const ACCESS: &str = "idmatch_proxy::access";

pub struct Observer {
    metrics: Arc<Metrics>,
    in_flight: Arc<Semaphore>,
    redact_query: bool,
    draining: Arc<AtomicBool>,
    ids: RequestIds,
}

impl Observer {
    pub fn new(
        metrics: Arc<Metrics>,
        max_in_flight: usize,
        redact_query: bool,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Self {
            metrics,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            redact_query,
            draining,
            ids: RequestIds::new(),
        }
    }

    pub async fn handle(
        &self,
        proxy: &Proxy,
        mut request: Request<Incoming>,
        local: SocketAddr,
        activity: Arc<Activity>,
    ) -> Response<ObservedBody> {
        let started = Instant::now();
        let request_id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = self.ids.next();
                request
                    .headers_mut()
                    .insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let entry = Entry {
            method: request.method().clone(),
            target: self.loggable_target(request.uri()),
            request_id: request_id.clone(),
            started,
        };
        let version = request.version();

        // Beyond the limit, answer at once: a queue would only grow while the upstream is slow.
        let (mut response, permit) = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.in_flight.inc();
                (proxy.handle(request, local).await, Some(permit))
            }
            Err(_) => (
                ProxyError::Overloaded.into_response().map(ProxyBody::Right),
                None,
            ),
        };
        let to_headers = started.elapsed();

        let code = response.extensions().get::<ProxyErrorCode>().map(|c| c.0);
        match code {
            Some(code) => {
                self.metrics
                    .proxy_errors
                    .get_or_create(&ErrorLabels { code })
                    .inc();
            }
            None => self.metrics.upstream_ttfb.observe(to_headers.as_secs_f64()),
        }
        let headers = response.headers_mut();
        headers.insert(X_REQUEST_ID.clone(), request_id);
        if version < Version::HTTP_2 && self.draining.load(Ordering::Relaxed) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status();
        response.map(|inner| ObservedBody {
            inner,
            finish: Some(Finish {
                entry,
                status,
                code,
                upstream_ms: code.is_none().then_some(to_headers.as_secs_f64() * 1e3),
                metrics: self.metrics.clone(),
                permit,
                activity,
            }),
            bytes: 0,
        })
    }

    /// The path, and the query unless it is redacted: it can hold phone numbers.
    fn loggable_target(&self, uri: &http::Uri) -> String {
        match (uri.query(), self.redact_query) {
            (Some(_), true) => format!("{}?<redacted>", uri.path()),
            (Some(query), false) => format!("{}?{query}", uri.path()),
            (None, _) => uri.path().to_owned(),
        }
    }
}

/// What the access log needs from the request.
struct Entry {
    method: Method,
    target: String,
    request_id: HeaderValue,
    started: Instant,
}

/// Written once, when the body ends or is dropped.
struct Finish {
    entry: Entry,
    status: StatusCode,
    code: Option<&'static str>,
    upstream_ms: Option<f64>,
    metrics: Arc<Metrics>,
    permit: Option<OwnedSemaphorePermit>,
    activity: Arc<Activity>,
}

impl Finish {
    fn write(self, bytes: u64, complete: bool) {
        let Self {
            entry,
            status,
            code,
            upstream_ms,
            metrics,
            permit,
            activity,
        } = self;
        let duration = entry.started.elapsed();
        metrics
            .requests
            .get_or_create(&RequestLabels::new(&entry.method, status))
            .inc();
        metrics.request_duration.observe(duration.as_secs_f64());
        if permit.is_some() {
            metrics.in_flight.dec();
        }
        drop(permit);
        activity.request_finished();
        tracing::info!(
            target: ACCESS,
            method = %entry.method,
            path = %entry.target,
            status = status.as_u16(),
            bytes,
            duration_ms = duration.as_secs_f64() * 1e3,
            upstream_ms,
            request_id = entry.request_id.to_str().unwrap_or("<binary>"),
            error = code,
            complete,
            "request"
        );
    }
}

/// The response body, counted; finishing it writes the log line and the metrics.
pub struct ObservedBody {
    inner: ProxyBody,
    finish: Option<Finish>,
    bytes: u64,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(finish) = self.finish.take() {
                    finish.write(self.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            // hyper may drop a body it has seen `is_end_stream` on without polling it to the
            // end: that is still a complete response.
            let complete = self.inner.is_end_stream();
            finish.write(self.bytes, complete);
        }
    }
}

/// Request ids: a random per-process prefix and a counter; unique, cheap, no syscall.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // `RandomState` is seeded from the OS's random source: enough to tell processes apart.
        let prefix = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        HeaderValue::try_from(format!("{:016x}{n:016x}", self.prefix)).expect("hex is ASCII")
    }
}
