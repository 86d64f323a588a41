//! Mocks of CM.com's Mobile Identity API and Verification service (VaaS), answering as CM.com
//! documents them, with CM.com's sandbox data, and with our own choices where CM.com is silent.
//!
//! [`MockApi`] is a [`Handler`]: serve it with [`Server`](crate::Server) (tests) or run the
//! `mock-upstream` binary (development). `mock/README.md` is the contract: every route, body and
//! status with examples, what CM.com documents and what we assumed.
//!
//! A request goes through, in order: the session page (no token: a device loads it), the bearer
//! token, the base path, the rate limit (Mobile Identity only), the endpoint.

mod auth;
mod callbacks;
mod limit;
mod mobile_identity;
mod sandbox;
mod sessions;
mod verification;

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header::{ALLOW, HOST, RETRY_AFTER, WWW_AUTHENTICATE},
    request::Parts,
    uri::Scheme,
    HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use rustls::crypto::SecureRandom;
use serde_json::{json, Map, Value};
use tracing::info;

use self::{
    auth::{TokenError, Verifier},
    callbacks::Notifier,
    limit::RateLimit,
    mobile_identity::NumberVerify,
    sessions::Sessions,
    verification::Verification,
};
use crate::server::{json, json_text, Body, Handler, ResponseFuture};

/// The Mobile Identity API's production and sandbox base paths (fact sheet §1.1), served alike.
pub const BASE_PATHS: [&str; 2] = ["/mobile-identity/v1", "/mobile-identity-sandbox/v1"];

/// The Verification service's production and sandbox base paths (fact sheet §1.1), served alike.
pub const VERIFICATION_BASE_PATHS: [&str; 2] = [
    "/verification-service/v1",
    "/verification-service-sandbox/v1",
];

/// The path of a `sessionUrl`, as in CM.com's examples (fact sheet §2.3), followed by a token.
/// The mock serves it itself, without a bearer token, so that loading it moves the session on.
pub const SESSION_PATH: &str = "/v1/dm/session/";

const MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the rate limit reads arrival times from.
type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// The mock. Cheap to clone; clones share their sessions and their rate-limit window.
#[derive(Clone)]
pub struct MockApi {
    inner: Arc<Inner>,
}

struct Inner {
    verifier: Verifier,
    clock: Clock,
    rate_limit: Option<RateLimit>,
    number_verify: Mutex<Sessions<Subscribed<NumberVerify>>>,
    verifications: Mutex<Sessions<Subscribed<Verification>>>,
    random: &'static dyn SecureRandom,
    notifier: Notifier,
    /// Whether a `callbackUrl` may be `http://` (local use only; CM.com requires https).
    allow_http_callbacks: bool,
}

/// A session and the `callbackUrl` its changes are sent to.
#[derive(Debug)]
struct Subscribed<T> {
    session: T,
    callback_url: String,
}

impl MockApi {
    /// Accepts tokens with header `kid` equal to `key_id`, signed with the UTF-8 bytes of
    /// `secret`; no rate limit.
    pub fn new(key_id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self::builder(key_id, secret).build()
    }

    /// As [`new`](Self::new), with the options of [`Builder`].
    pub fn builder(key_id: impl Into<String>, secret: impl Into<String>) -> Builder {
        Builder {
            key_id: key_id.into(),
            secret: secret.into(),
            rate_limit: None,
            clock: Arc::new(Instant::now),
            allow_http_callbacks: false,
            allow_remote_callbacks: false,
            callback_retry_delays: callbacks::RETRY_DELAYS.to_vec(),
        }
    }
}

/// Configures a [`MockApi`].
pub struct Builder {
    key_id: String,
    secret: String,
    rate_limit: Option<Duration>,
    clock: Clock,
    allow_http_callbacks: bool,
    allow_remote_callbacks: bool,
    callback_retry_delays: Vec<Duration>,
}

impl Builder {
    /// Accepts `http://` callback URLs, for a callback listener on this machine; CM.com
    /// requires https (fact sheet §2.3). Off unless set.
    pub fn allow_http_callbacks(mut self, allow: bool) -> Self {
        self.allow_http_callbacks = allow;
        self
    }

    /// Calls callback URLs on other machines too; off unless set, so that the mock never calls
    /// the internet by surprise (a `callbackUrl` like CM's `https://mycallbackurl` is logged,
    /// not called).
    pub fn allow_remote_callbacks(mut self, allow: bool) -> Self {
        self.allow_remote_callbacks = allow;
        self
    }

    /// The delays before each retry of a callback answered 5xx or not at all; default 1 s,
    /// 2 s, 4 s.
    pub fn callback_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        self.callback_retry_delays = delays;
        self
    }

    /// Enforces CM.com's "one request per second per key id" (fact sheet §5) with `interval`
    /// in place of the second: an authenticated Mobile Identity request arriving less than
    /// `interval` after the last one accepted is answered 429. Off unless set.
    pub fn rate_limit(mut self, interval: Duration) -> Self {
        self.rate_limit = Some(interval);
        self
    }

    /// The clock arrival times are read from, for tests that step time instead of sleeping;
    /// default [`Instant::now`]. Tokens are checked against the system clock regardless.
    pub fn clock(mut self, clock: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    pub fn build(self) -> MockApi {
        MockApi {
            inner: Arc::new(Inner {
                verifier: Verifier::new(self.key_id, &self.secret),
                clock: self.clock,
                rate_limit: self.rate_limit.map(RateLimit::new),
                number_verify: Mutex::default(),
                verifications: Mutex::default(),
                random: rustls::crypto::ring::default_provider().secure_random,
                notifier: Notifier::new(
                    &self.secret,
                    self.callback_retry_delays,
                    self.allow_remote_callbacks,
                ),
                allow_http_callbacks: self.allow_http_callbacks,
            }),
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("Builder")
            .field("key_id", &self.key_id)
            .field("rate_limit", &self.rate_limit)
            .field("allow_http_callbacks", &self.allow_http_callbacks)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for MockApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the key nor the sessions are worth printing; the secret must not be.
        f.debug_struct("MockApi")
            .field("rate_limit", &self.inner.rate_limit)
            .finish_non_exhaustive()
    }
}

impl Handler for MockApi {
    fn call(&self, request: Request<Incoming>) -> ResponseFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let arrival = (inner.clock)();
            let (head, body) = request.into_parts();
            let method = head.method.clone();
            let path = head.uri.path().to_owned();
            // Read whole before answering, even a refusal: over HTTP/2 a client still sending
            // its body (curl) may drop an answer that comes first.
            let body = read_body(body).await;
            let (response, refusal) = match inner.answer(Received { head, body }, arrival) {
                Ok(response) => (response, None),
                Err(error) => (error.to_response(), Some(error.to_string())),
            };
            // Never headers, query or body: they carry the token and personal data. A refusal's
            // reason names fields, never their values.
            info!(
                %method,
                %path,
                status = response.status().as_u16(),
                refusal = refusal.as_deref(),
                "request"
            );
            response
        })
    }
}

impl Inner {
    fn answer(&self, request: Received, arrival: Instant) -> Result<Response<Body>, ApiError> {
        let path = request.head.uri.path().to_owned();
        if let Some(token) = path.strip_prefix(SESSION_PATH) {
            request.allow(Method::GET)?;
            return self.load_session(token, request.head.uri.query() == Some("state=failed"));
        }
        self.verifier
            .verify(&request.head.headers)
            .map_err(ApiError::Unauthorized)?;
        if let Some(endpoint) = endpoint(&path, &BASE_PATHS) {
            if let Some(limit) = &self.rate_limit {
                limit.admit(arrival).map_err(|wait| ApiError::RateLimited {
                    interval: limit.interval(),
                    wait,
                })?;
            }
            self.mobile_identity(request, endpoint)
        } else if let Some(endpoint) = endpoint(&path, &VERIFICATION_BASE_PATHS) {
            self.verification(request, endpoint)
        } else {
            Err(ApiError::NotFound("unknown endpoint"))
        }
    }

    /// The device loading a `sessionUrl`: a Number Verify transaction or a verification.
    fn load_session(&self, token: &str, failed: bool) -> Result<Response<Body>, ApiError> {
        if let Some((id, transaction)) = lock(&self.number_verify).by_token(token) {
            if transaction.session.load(failed) {
                self.notify_number_verify(id, transaction)?;
            }
            return Ok(transaction.session.to_response(id));
        }
        if let Some((id, verification)) = lock(&self.verifications).by_token(token) {
            let changes = verification.session.load(failed);
            self.notify_verification(id, verification, changes)?;
            return Ok(verification.session.to_response(id));
        }
        Err(ApiError::NotFound("unknown session"))
    }

    /// A new id (a version 4 UUID) and `sessionUrl` token (32 hex digits, as CM.com's).
    fn new_session(&self) -> Result<(String, String), ApiError> {
        let mut token = [0u8; 16];
        self.random
            .fill(&mut token)
            .map_err(|_| ApiError::Internal("no randomness for a session token"))?;
        Ok((self.new_uuid()?, hex(&token)))
    }

    /// A version 4 UUID: session and event ids.
    fn new_uuid(&self) -> Result<String, ApiError> {
        let mut bytes = [0u8; 16];
        self.random
            .fill(&mut bytes)
            .map_err(|_| ApiError::Internal("no randomness for an id"))?;
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let uuid = hex(&bytes);
        Ok(format!(
            "{}-{}-{}-{}-{}",
            &uuid[..8],
            &uuid[8..12],
            &uuid[12..16],
            &uuid[16..20],
            &uuid[20..]
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Session updates cannot panic halfway, so a poisoned store is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What follows one of `bases` in `path`, if it starts with one.
fn endpoint<'a>(path: &'a str, bases: &[&str]) -> Option<&'a str> {
    bases.iter().find_map(|base| path.strip_prefix(base))
}

/// The `{id}` of `{prefix}{id}`: one non-empty segment.
fn id_in<'a>(endpoint: &'a str, prefix: &str) -> Option<&'a str> {
    endpoint
        .strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// A JSON object with its keys in the order given, as CM.com's examples show them (`state`
/// first). serde_json's `Map` sorts keys, and its `preserve_order` feature would reorder the
/// proxy's JSON too wherever the workspace builds both.
fn object<'a>(
    status: StatusCode,
    fields: impl IntoIterator<Item = (&'a str, Value)>,
) -> Response<Body> {
    json_text(status, object_text(fields))
}

/// The JSON text of [`object`]'s body; callbacks' events too.
fn object_text<'a>(fields: impl IntoIterator<Item = (&'a str, Value)>) -> String {
    let mut text = String::from("{");
    for (key, value) in fields {
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(&Value::from(key).to_string());
        text.push(':');
        text.push_str(&value.to_string());
    }
    text.push('}');
    text
}

/// A request read whole: its head, and its body or why that could not be read.
struct Received {
    head: Parts,
    body: Result<Bytes, ApiError>,
}

impl Received {
    fn allow(&self, method: Method) -> Result<(), ApiError> {
        if self.head.method == method {
            Ok(())
        } else {
            Err(ApiError::MethodNotAllowed(method))
        }
    }

    /// `scheme://authority` as the client reached the mock, for a `sessionUrl` it can load.
    fn origin(&self) -> String {
        let scheme = self
            .head
            .extensions
            .get::<Scheme>()
            .or(self.head.uri.scheme())
            .map_or("http", Scheme::as_str);
        let authority = self
            .head
            .uri
            .authority()
            .map(|authority| authority.as_str())
            .or_else(|| self.head.headers.get(HOST)?.to_str().ok())
            .unwrap_or("localhost");
        format!("{scheme}://{authority}")
    }

    /// The body as a JSON object.
    fn object(self) -> Result<Fields, ApiError> {
        match serde_json::from_slice(&self.body?) {
            Ok(Value::Object(fields)) => Ok(Fields(fields)),
            Ok(_) => Err(ApiError::BadRequest(
                "request body must be a JSON object".into(),
            )),
            Err(_) => Err(ApiError::BadRequest("invalid JSON body".into())),
        }
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    Ok(Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<LengthLimitError>() {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest("could not read the request body".into())
            }
        })?
        .to_bytes())
}

/// A request body's top-level fields; `null` counts as absent, unknown fields are ignored.
struct Fields(Map<String, Value>);

impl Fields {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|value| !value.is_null())
    }

    fn required(&self, name: &'static str) -> Result<&str, ApiError> {
        self.optional(name)?
            .ok_or_else(|| ApiError::BadRequest(format!("missing field: {name}")))
    }

    fn optional(&self, name: &'static str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(ApiError::invalid(name, "expected a string")),
        }
    }

    /// Every documented `phoneNumber` is E.164 (fact sheet §2).
    fn phone_number(&self) -> Result<&str, ApiError> {
        let phone_number = self.required("phoneNumber")?;
        if is_e164(phone_number) {
            Ok(phone_number)
        } else {
            Err(ApiError::invalid(
                "phoneNumber",
                "expected E.164, e.g. +31610000001",
            ))
        }
    }

    /// Required, and must begin with `https://` (fact sheet §2.3, §2.5.2), or `http://` when
    /// allowed for local use; we also require a host after it.
    fn callback_url(&self, allow_http: bool) -> Result<&str, ApiError> {
        let url = self.required("callbackUrl")?;
        let scheme_allowed =
            url.starts_with("https://") || (allow_http && url.starts_with("http://"));
        let valid = scheme_allowed
            && url
                .parse::<Uri>()
                .is_ok_and(|uri| uri.host().is_some_and(|host| !host.is_empty()));
        if valid {
            Ok(url)
        } else {
            Err(ApiError::invalid(
                "callbackUrl",
                "expected an https:// URL, e.g. https://example.com/callback",
            ))
        }
    }
}

/// `+` and 8 to 15 digits, the first not zero (ITU-T E.164 allows at most 15).
fn is_e164(phone_number: &str) -> bool {
    phone_number.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len())
            && !digits.starts_with('0')
            && digits.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// Every way a request fails, rendered in one place. CM.com documents no error status or body
/// (fact sheet §2.6): these are ours.
#[derive(Debug)]
enum ApiError {
    Unauthorized(TokenError),
    RateLimited { interval: Duration, wait: Duration },
    BadRequest(String),
    NotFound(&'static str),
    MethodNotAllowed(Method),
    PayloadTooLarge,
    Internal(&'static str),
}

impl ApiError {
    fn invalid(field: &str, expected: &str) -> Self {
        Self::BadRequest(format!("invalid field: {field} ({expected})"))
    }

    fn to_response(&self) -> Response<Body> {
        let (status, code) = match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        let mut response = json(
            status,
            json!({ "error": { "code": code, "message": self.to_string() } }),
        );
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized(_) => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            Self::RateLimited { wait, .. } => {
                // Whole seconds (RFC 9110 §10.2.3), rounded up so that a client honouring it
                // is never early.
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            Self::MethodNotAllowed(method) => {
                if let Ok(allow) = HeaderValue::from_str(method.as_str()) {
                    headers.insert(ALLOW, allow);
                }
            }
            _ => {}
        }
        response
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unauthorized(error) => error.fmt(f),
            Self::RateLimited { interval, .. } => {
                write!(f, "more than one request per {interval:?} for this key id")
            }
            Self::BadRequest(message) => f.write_str(message),
            Self::NotFound(message) | Self::Internal(message) => f.write_str(message),
            Self::MethodNotAllowed(method) => write!(f, "method not allowed; use {method}"),
            Self::PayloadTooLarge => write!(f, "request body exceeds {MAX_BODY_BYTES} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        assert!(is_e164("+31610000001"));
        assert!(is_e164("+123456789012345"));
        assert!(!is_e164("+1234567890123456"));
        assert!(!is_e164("31610000001"));
        assert!(!is_e164("+031610000001"));
        assert!(!is_e164("+3161000000a"));
        assert!(!is_e164("+1234567"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let retry_after = |wait| {
            let error = ApiError::RateLimited {
                interval: Duration::from_secs(1),
                wait,
            };
            error.to_response().headers()[RETRY_AFTER].clone()
        };
        assert_eq!(retry_after(Duration::from_millis(1)), "1");
        assert_eq!(retry_after(Duration::from_secs(1)), "1");
        assert_eq!(retry_after(Duration::from_millis(1001)), "2");
    }
}
