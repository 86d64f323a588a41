//! Accounting for every proxied request: its `X-Request-Id`, the access log line and the
//! request metrics. The log line and the metrics are written when the response body ends (or is
//! abandoned), so that durations and byte counts are the real ones. What the request holds while
//! in flight (its admission, its upstream slot) is held by its [`Record`] too, and let go with it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{ErrorLabels, Metrics};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The access log's `tracing` target: `RUST_LOG=idmatch_proxy::access=off` silences it.
const ACCESS: &str = "idmatch_proxy::access";

/// Told when each request on a connection has ended, however it ended: the server's connection
/// code starts its idle clock then.
pub trait RequestEnd: Send + Sync {
    fn request_ended(&self);
}

/// Makes each request's [`Record`].
pub struct Accounting {
    metrics: Arc<Metrics>,
    redact_query: bool,
    ids: RequestIds,
}

impl Accounting {
    pub fn new(metrics: Arc<Metrics>, redact_query: bool) -> Self {
        Self {
            metrics,
            redact_query,
            ids: RequestIds::new(),
        }
    }

    /// Starts the record of `request`, whose `X-Request-Id` is the client's or, added here, a
    /// new one. From then on, however the request ends (even by the client going away while
    /// the proxy waits, which drops the record), it is accounted for once.
    pub fn begin<B>(&self, request: &mut Request<B>, connection: Arc<dyn RequestEnd>) -> Record {
        let started = Instant::now();
        // One lookup for both finding the client's id and adding ours.
        let request_id = match request.headers_mut().entry(&X_REQUEST_ID) {
            header::Entry::Occupied(mut id) => {
                never_indexed(id.get_mut());
                id.get().clone()
            }
            header::Entry::Vacant(slot) => slot.insert(self.ids.next()).clone(),
        };
        Record {
            entry: Entry {
                method: request.method().clone(),
                target: LoggedTarget {
                    uri: request.uri().clone(),
                    redact_query: self.redact_query,
                },
                request_id,
                started,
            },
            status: None,
            code: None,
            upstream: None,
            paced: None,
            bytes: 0,
            complete: false,
            metrics: self.metrics.clone(),
            admitted: None,
            slot: None,
            connection,
        }
    }

    /// Accounts for a request whose head hyper could not parse, and answered itself before any
    /// service ran: 400, or 431 or 414 for a head or target over the limits. That answer is
    /// hyper's, bare: it has no hook to add `Proxy-Status` or a body. The log line names the
    /// peer and hyper's reason, never the bytes received.
    pub fn unparsed(&self, peer: SocketAddr, error: &hyper::Error) {
        let reason = error.to_string();
        // hyper tells its two size limits (the head, the target) apart only in words.
        let status = match (error.is_parse_too_large(), reason.as_str()) {
            (false, _) => StatusCode::BAD_REQUEST,
            (true, "URI too long") => StatusCode::URI_TOO_LONG,
            (true, _) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        };
        // Over a limit of the proxy's is a refusal by policy, as for 413 (see `ProxyError::code`).
        let code = if error.is_parse_too_large() {
            "http_request_denied"
        } else {
            "http_request_error"
        };
        self.metrics.count_unparsed(status);
        self.metrics
            .proxy_errors
            .get_or_create(&ErrorLabels { code })
            .inc();
        tracing::info!(
            target: ACCESS,
            %peer,
            status = status.as_u16(),
            error = code,
            reason,
            "request"
        );
    }
}

/// The request target as the access log shows it: the path, and the query unless it is
/// redacted (it can hold phone numbers). The client's `Uri` shares hyper's read buffer, so
/// keeping it costs no copy; the text is made only if the line is written.
struct LoggedTarget {
    uri: http::Uri,
    redact_query: bool,
}

impl std::fmt::Display for LoggedTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.uri.path())?;
        match (self.uri.query(), self.redact_query) {
            (Some(_), true) => f.write_str("?<redacted>"),
            (Some(query), false) => write!(f, "?{query}"),
            (None, _) => Ok(()),
        }
    }
}

/// What the access log needs from the request.
struct Entry {
    method: Method,
    target: LoggedTarget,
    request_id: HeaderValue,
    started: Instant,
}

/// One request's accounting, written once, when it is dropped: with the response body (after
/// its last byte, or abandoned), or earlier if the request never got a response.
pub struct Record {
    entry: Entry,
    /// `None` if the client went away before the response.
    status: Option<StatusCode>,
    /// The proxy's own error type, when the proxy answered.
    code: Option<&'static str>,
    /// Time to the upstream's response head, when the upstream answered.
    upstream: Option<Duration>,
    /// Time spent waiting for the credential's send slot (`rate_limit`).
    paced: Option<Duration>,
    bytes: u64,
    /// The response body reached its end.
    complete: bool,
    metrics: Arc<Metrics>,
    /// One of `client.max_in_flight`; `None` when refused for being over the limit.
    admitted: Option<OwnedSemaphorePermit>,
    /// One of `upstream.max_in_flight`, let go as soon as the response body ends or fails.
    slot: Option<OwnedSemaphorePermit>,
    connection: Arc<dyn RequestEnd>,
}

impl Record {
    pub fn request_id(&self) -> &HeaderValue {
        &self.entry.request_id
    }

    /// Takes one of `in_flight`'s permits for the request's lifetime, if one is free.
    pub fn admit(&mut self, in_flight: &Arc<Semaphore>) -> bool {
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            return false;
        };
        self.metrics.in_flight.inc();
        self.admitted = Some(permit);
        true
    }

    /// Holds the request's upstream slot until its response body ends.
    pub fn hold(&mut self, slot: OwnedSemaphorePermit) {
        self.slot = Some(slot);
    }

    pub fn paced(&mut self, waited: Duration) {
        self.paced = Some(waited);
    }

    /// The response goes out: its status, and `code` if the proxy made it itself (else the time
    /// to the upstream's head is recorded); its body carries the record to its end.
    pub fn respond<B: Body>(
        mut self,
        mut response: Response<B>,
        code: Option<&'static str>,
    ) -> Response<AccountedBody<B>> {
        self.status = Some(response.status());
        self.code = code;
        match code {
            Some(code) => {
                self.metrics
                    .proxy_errors
                    .get_or_create(&ErrorLabels { code })
                    .inc();
            }
            None => {
                let to_headers = self.entry.started.elapsed();
                self.metrics.upstream_ttfb.observe(to_headers.as_secs_f64());
                self.upstream = Some(to_headers);
            }
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), self.entry.request_id.clone());
        response.map(|inner| AccountedBody {
            inner,
            record: self,
        })
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let duration = self.entry.started.elapsed();
        let metrics = &self.metrics;
        if let Some(status) = self.status {
            metrics.count_request(&self.entry.method, status);
            metrics.request_duration.observe(duration.as_secs_f64());
        }
        if self.admitted.take().is_some() {
            metrics.in_flight.dec();
        }
        self.connection.request_ended();
        tracing::info!(
            target: ACCESS,
            method = %self.entry.method,
            path = %self.entry.target,
            status = self.status.map(|s| s.as_u16()),
            bytes = self.bytes,
            duration_ms = millis(duration),
            upstream_ms = self.upstream.map(millis),
            paced_ms = self.paced.map(millis),
            request_id = self.entry.request_id.to_str().unwrap_or("<binary>"),
            error = self.code,
            complete = self.complete,
            "request"
        );
    }
}

/// `duration` in milliseconds with microsecond resolution: whole microseconds divided by 1000
/// print with at most three decimals (`3.41`), where `as_secs_f64() * 1e3` carries float
/// noise into the log line (`3.4104389999999998`).
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1e3
}

/// The response body, counted; dropping it writes the request's log line and metrics.
pub struct AccountedBody<B: Body> {
    inner: B,
    record: Record,
}

impl<B> Body for AccountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.record.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                self.record.complete = true;
                self.record.slot = None;
            }
            Poll::Ready(Some(Err(_))) => self.record.slot = None,
            Poll::Pending => {}
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

impl<B: Body> Drop for AccountedBody<B> {
    fn drop(&mut self) {
        // hyper may drop a body it saw `is_end_stream` on without polling it to the end: that
        // is still a complete response.
        self.record.complete |= self.inner.is_end_stream();
    }
}

/// Request ids: 32 hex digits, a random per-process prefix and a counter; unique, cheap, no
/// syscall, no formatting machinery.
struct RequestIds {
    prefix: [u8; 16],
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // `RandomState` is seeded from the OS's random source: enough to tell processes apart.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            prefix: hex(seed),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let mut id = [0; 32];
        id[..16].copy_from_slice(&self.prefix);
        id[16..].copy_from_slice(&hex(self.counter.fetch_add(1, Ordering::Relaxed)));
        // Shared from the start: the id is cloned into the upstream request, the log entry and
        // the response, and a copied `Vec` would be moved to shared storage at the first clone,
        // a second allocation.
        let mut id = HeaderValue::from_maybe_shared(Bytes::from_owner(id))
            .expect("hex digits are a valid header value");
        never_indexed(&mut id);
        id
    }
}

/// Keeps a request id out of HPACK's dynamic tables (RFC 7541 §6.2.3), upstream and towards h2
/// clients. Each id is sent once, so indexing it bought nothing and cost much: the table filled
/// with ids, evicting the fields that do repeat, and the `h2` encoder compared each new id with
/// every one indexed (2.7k instructions a request; benches/README.md, issue 19).
fn never_indexed(id: &mut HeaderValue) {
    id.set_sensitive(true);
}

/// `value` as 16 lowercase hex digits.
fn hex(value: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    std::array::from_fn(|i| DIGITS[(value >> (60 - 4 * i)) as usize & 0xf])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_durations_are_milliseconds_to_the_microsecond() {
        assert_eq!(
            millis(Duration::from_nanos(3_410_438_999)).to_string(),
            "3410.438"
        );
        assert_eq!(millis(Duration::from_nanos(3_410_439)).to_string(), "3.41");
        assert_eq!(millis(Duration::from_micros(1)).to_string(), "0.001");
        assert_eq!(millis(Duration::from_nanos(999)).to_string(), "0");
        // Float noise in any of the first ten million: the division is correctly rounded, so
        // the shortest text that reads back as it is the decimal one.
        for micros in (0..10_000_000_u64).step_by(7) {
            let text = millis(Duration::from_micros(micros)).to_string();
            let decimals = text
                .split_once('.')
                .map_or(0, |(_, fraction)| fraction.len());
            assert!(decimals <= 3, "{micros} µs: {text}");
        }
    }

    #[test]
    fn request_ids_are_a_process_prefix_and_a_counter_in_hex() {
        assert_eq!(&hex(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&hex(u64::MAX), b"ffffffffffffffff");
        let ids = RequestIds::new();
        ids.counter.store(0xfe, Ordering::Relaxed);
        let (first, second) = (ids.next(), ids.next());
        let prefix = std::str::from_utf8(&ids.prefix).unwrap();
        assert_eq!(first, format!("{prefix}00000000000000fe").as_str());
        assert_eq!(second, format!("{prefix}00000000000000ff").as_str());
        assert!(prefix
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(RequestIds::new().prefix, ids.prefix, "processes tell apart");
    }

    struct Unwatched;

    impl RequestEnd for Unwatched {
        fn request_ended(&self) {}
    }

    /// The id goes upstream and back marked never-indexed, whether it is ours or the client's.
    #[test]
    fn request_ids_are_never_indexed_whoever_made_them() {
        let accounting = Accounting::new(Arc::new(Metrics::new()), false);
        for client_id in [None, Some("client-chosen-1")] {
            let mut request = Request::new(());
            if let Some(id) = client_id {
                let id = HeaderValue::from_static(id);
                request.headers_mut().insert(&X_REQUEST_ID, id);
            }
            let record = accounting.begin(&mut request, Arc::new(Unwatched));
            assert!(
                request.headers()[&X_REQUEST_ID].is_sensitive(),
                "{client_id:?}"
            );
            assert!(record.entry.request_id.is_sensitive(), "{client_id:?}");
        }
    }
}
