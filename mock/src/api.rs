//! A mock of CM.com's Mobile Identity API with deterministic sandbox data.
//!
//! [`MockApi`] is a [`Handler`]: serve it with [`Server`](crate::Server) (tests) or run the
//! `mock-upstream` binary (development).
//!
//! # Routes
//!
//! Served under both `/mobile-identity/v1` and `/mobile-identity-sandbox/v1`, with identical
//! behaviour and shared state:
//!
//! | Method | Path                 | Success |
//! |--------|----------------------|---------|
//! | `POST` | `/sim-swap`          | 200     |
//! | `POST` | `/identity-match`    | 200     |
//! | `POST` | `/number-verify`     | 201     |
//! | `GET`  | `/number-verify/{id}`| 200     |
//!
//! Every response, errors included, is JSON with `Content-Type: application/json`; the examples
//! below show the bytes as sent (keys in lexicographic order, though no client should rely on
//! key order). Request
//! bodies are parsed as JSON whatever their `Content-Type`, up to 64 KiB; unknown fields are
//! ignored and `null` counts as absent.
//!
//! # Authentication (checked first, on every request, even unknown paths)
//!
//! Exactly one `Authorization: Bearer <jwt>` header, where the JWT has header
//! `{"alg":"HS256","typ":"JWT","kid":<key id>}`, an HMAC-SHA256 signature keyed with the secret's
//! UTF-8 bytes, and integer claims `exp`, `nbf` and `iat`. With zero leeway, the current time must
//! be at or after `nbf` and before `exp` (RFC 7519 §4.1.4-5). A failure is:
//!
//! ```text
//! 401 Unauthorized
//! WWW-Authenticate: Bearer error="invalid_token"
//! {"error":{"code":"unauthorized","message":"<reason>"}}
//! ```
//!
//! where `<reason>` is one of `missing bearer token` (no header, another scheme, or an empty
//! token), `multiple authorization headers`, `malformed token`, `unsupported algorithm`,
//! `invalid token type`, `missing kid`, `unknown kid`, `invalid signature`,
//! `missing claim: exp|nbf|iat`, `invalid claim: exp|nbf|iat`, `invalid audience`,
//! `token expired` or `token not yet valid`. Neither the token nor the secret is ever echoed
//! or logged.
//!
//! # Other errors
//!
//! `{"error":{"code":"<code>","message":"<message>"}}` with:
//!
//! - 400 `bad_request`: `invalid JSON body`, `request body must be a JSON object`,
//!   `missing field: <name>`, `invalid field: <name> (<what is expected>)`,
//!   `at least one of firstName, lastName, postcode, dateOfBirth is required`,
//!   `could not read the request body`.
//! - 404 `not_found`: `unknown endpoint` (any other path),
//!   `no data for this phone number` (a valid number outside the sandbox set),
//!   `unknown number verification id`.
//! - 405 `method_not_allowed`, with an `Allow` header: `method not allowed; use POST` (or GET).
//! - 413 `payload_too_large`: `request body exceeds 65536 bytes`.
//! - 500 `internal_error`: `no randomness for a session id` (the OS random source failed).
//!
//! `phoneNumber` must be E.164: `+`, then 8 to 15 digits, the first not `0`.
//!
//! # Sandbox subscribers
//!
//! | phoneNumber    | firstName | lastName  | postcode  | dateOfBirth | last SIM change        | range    |
//! |----------------|-----------|-----------|-----------|-------------|------------------------|----------|
//! | `+31610000001` | Joris     | Verhoeven | `1234 AB` | 1963-12-31  | `2019-06-01T08:00:00Z` | `>90d`   |
//! | `+31610000002` | Sanne     | de Vries  | `3511 LN` | 1988-04-17  | 2 hours ago            | `<24h`   |
//! | `+31610000003` | Pieter    | Bakker    | `9711 AB` | 1975-09-02  | 3 days ago             | `1-7d`   |
//! | `+31610000004` | Emma      | Jansen    | `5611 AZ` | 2001-02-28  | 20 days ago            | `7-30d`  |
//! | `+31610000005` | Lucas     | Smit      | `6511 KL` | 1995-11-05  | 60 days ago            | `30-90d` |
//!
//! Relative times are computed per request, truncated to whole seconds.
//!
//! # `POST /sim-swap`
//!
//! Request `{"phoneNumber":"+31610000002","serviceType":"timestamp"|"24h"|"range"}`; responses:
//!
//! ```json
//! {"latestSimChange":"2019-06-01T08:00:00Z","phoneNumber":"+31610000001","serviceType":"timestamp"}
//! {"phoneNumber":"+31610000002","serviceType":"24h","swapped":true}
//! {"phoneNumber":"+31610000003","range":"1-7d","serviceType":"range"}
//! ```
//!
//! `latestSimChange` is RFC 3339 in UTC; `swapped` is whether it is less than 24 hours ago;
//! `range` is one of `<24h`, `1-7d`, `7-30d`, `30-90d`, `>90d` (lower bound inclusive).
//!
//! # `POST /identity-match`
//!
//! Request `{"phoneNumber", "serviceType":"match"|"score"}` plus at least one of the strings
//! `firstName`, `lastName`, `postcode` and `dateOfBirth` (`YYYY-MM-DD`). `result` has a key
//! for each field given, and only those:
//!
//! ```json
//! {"phoneNumber":"+31610000001","result":{"firstName":true,"lastName":false},"serviceType":"match"}
//! {"phoneNumber":"+31610000001","result":{"firstName":100,"lastName":89},"serviceType":"score"}
//! ```
//!
//! A score is 100 × (1 − edit distance / longer length), rounded, after ignoring case and
//! surrounding or repeated whitespace (all whitespace for `postcode`); `dateOfBirth` scores 100
//! or 0. A field matches when its score is 100.
//!
//! # `POST /number-verify` and `GET /number-verify/{id}`
//!
//! Request `{"phoneNumber":"+31610000001"}`, any valid number. The response is `201 Created`
//! with a `Location` of the session under the same base path, and the session:
//!
//! ```json
//! {"id":"5894b113-034f-4d74-960d-ca756c24a44b","match":null,"sessionUrl":"https://number-verify.mock.invalid/session/5894b113-034f-4d74-960d-ca756c24a44b","state":"pending"}
//! ```
//!
//! `id` is a random UUID (version 4). `GET /number-verify/{id}` returns the same object: the
//! first poll still `pending`, every later one `{"state":"completed","match":true}` for a
//! sandbox subscriber's number and `"match":false` for any other. The 10,000 most recent
//! sessions are kept.

mod auth;
mod sandbox;
mod sessions;

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http::{
    header::{ALLOW, LOCATION, WWW_AUTHENTICATE},
    HeaderValue, Method, Request, Response, StatusCode,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use rustls::crypto::SecureRandom;
use serde_json::{json, Map, Value};
use time::{
    format_description::well_known::Rfc3339, macros::format_description, Date, Duration,
    OffsetDateTime,
};
use tracing::debug;

use self::{
    auth::{TokenError, Verifier},
    sessions::{Sessions, State},
};
use crate::server::{json, Body, Handler, ResponseFuture};

/// The base paths of the production and sandbox APIs; both are served identically.
pub const BASE_PATHS: [&str; 2] = ["/mobile-identity/v1", "/mobile-identity-sandbox/v1"];

const MAX_BODY_BYTES: usize = 64 * 1024;
const SESSION_URL_BASE: &str = "https://number-verify.mock.invalid/session/";

/// The Mobile Identity API mock. Cheap to clone; clones share their Number Verify sessions.
#[derive(Clone)]
pub struct MockApi {
    inner: Arc<Inner>,
}

struct Inner {
    verifier: Verifier,
    sessions: Mutex<Sessions>,
    random: &'static dyn SecureRandom,
}

impl MockApi {
    /// Accepts tokens with header `kid` equal to `key_id`, signed with the UTF-8 bytes of
    /// `secret`.
    pub fn new(key_id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                verifier: Verifier::new(key_id.into(), &secret.into()),
                sessions: Mutex::default(),
                random: rustls::crypto::ring::default_provider().secure_random,
            }),
        }
    }
}

impl fmt::Debug for MockApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Neither the key nor the sessions are worth printing; the secret must not be.
        f.debug_struct("MockApi").finish_non_exhaustive()
    }
}

impl Handler for MockApi {
    fn call(&self, request: Request<Incoming>) -> ResponseFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let answer = match inner.verifier.verify(request.headers()) {
                Ok(()) => inner.route(request).await,
                Err(error) => Err(ApiError::Unauthorized(error)),
            };
            answer.unwrap_or_else(|error| {
                debug!(%method, %path, %error, "refused");
                error.into_response()
            })
        })
    }
}

impl Inner {
    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path();
        let (base, endpoint) = BASE_PATHS
            .iter()
            .find_map(|base| Some((*base, path.strip_prefix(base)?)))
            .ok_or(ApiError::NotFound("unknown endpoint"))?;
        match endpoint {
            "/sim-swap" => {
                allow(&request, Method::POST)?;
                sim_swap(&read_object(request).await?)
            }
            "/identity-match" => {
                allow(&request, Method::POST)?;
                identity_match(&read_object(request).await?)
            }
            "/number-verify" => {
                allow(&request, Method::POST)?;
                self.start_verification(base, &read_object(request).await?)
            }
            _ => match endpoint.strip_prefix("/number-verify/") {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    allow(&request, Method::GET)?;
                    self.poll_verification(id)
                }
                _ => Err(ApiError::NotFound("unknown endpoint")),
            },
        }
    }

    fn start_verification(&self, base: &str, body: &Fields) -> Result<Response<Body>, ApiError> {
        let phone_number = body.phone_number()?;
        let id = self.session_id()?;
        self.sessions()
            .insert(id.clone(), sandbox::subscriber(phone_number).is_some());
        let mut response = json(StatusCode::CREATED, session_json(&id, State::Pending));
        if let Ok(location) = HeaderValue::try_from(format!("{base}/number-verify/{id}")) {
            response.headers_mut().insert(LOCATION, location);
        }
        Ok(response)
    }

    fn poll_verification(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let state = self
            .sessions()
            .poll(id)
            .ok_or(ApiError::NotFound("unknown number verification id"))?;
        Ok(json(StatusCode::OK, session_json(id, state)))
    }

    /// A random (version 4) UUID.
    fn session_id(&self) -> Result<String, ApiError> {
        let mut bytes = [0u8; 16];
        self.random
            .fill(&mut bytes)
            .map_err(|_| ApiError::Internal("no randomness for a session id"))?;
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        Ok(format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        ))
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // Session updates cannot panic halfway, so a poisoned store is still consistent.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn sim_swap(body: &Fields) -> Result<Response<Body>, ApiError> {
    let phone_number = body.phone_number()?;
    let service_type = body.required("serviceType")?;
    if !matches!(service_type, "timestamp" | "24h" | "range") {
        return Err(ApiError::invalid(
            "serviceType",
            "expected timestamp, 24h or range",
        ));
    }
    let subscriber = sandbox::subscriber(phone_number).ok_or(ApiError::UnknownPhoneNumber)?;
    let now = OffsetDateTime::now_utc();
    let changed = subscriber.last_sim_change(now);
    let (field, value) = match service_type {
        "timestamp" => {
            let timestamp = changed
                .format(&Rfc3339)
                .map_err(|_| ApiError::Internal("unformattable timestamp"))?;
            ("latestSimChange", Value::from(timestamp))
        }
        "24h" => ("swapped", Value::from(now - changed < Duration::DAY)),
        _ => (
            "range",
            Value::from(sandbox::sim_change_range(now - changed)),
        ),
    };
    Ok(json(
        StatusCode::OK,
        json!({ "phoneNumber": phone_number, "serviceType": service_type, field: value }),
    ))
}

fn identity_match(body: &Fields) -> Result<Response<Body>, ApiError> {
    let phone_number = body.phone_number()?;
    let service_type = body.required("serviceType")?;
    if !matches!(service_type, "match" | "score") {
        return Err(ApiError::invalid("serviceType", "expected match or score"));
    }
    let first_name = body.optional("firstName")?;
    let last_name = body.optional("lastName")?;
    let postcode = body.optional("postcode")?;
    let date_of_birth = body
        .optional("dateOfBirth")?
        .map(|date| {
            Date::parse(date, format_description!("[year]-[month]-[day]"))
                .map_err(|_| ApiError::invalid("dateOfBirth", "expected a date as YYYY-MM-DD"))
        })
        .transpose()?;
    if first_name.is_none() && last_name.is_none() && postcode.is_none() && date_of_birth.is_none()
    {
        return Err(ApiError::BadRequest(
            "at least one of firstName, lastName, postcode, dateOfBirth is required".into(),
        ));
    }
    let subscriber = sandbox::subscriber(phone_number).ok_or(ApiError::UnknownPhoneNumber)?;

    let scores = [
        first_name.map(|name| {
            (
                "firstName",
                sandbox::name_score(name, subscriber.first_name),
            )
        }),
        last_name.map(|name| ("lastName", sandbox::name_score(name, subscriber.last_name))),
        postcode.map(|code| {
            (
                "postcode",
                sandbox::postcode_score(code, subscriber.postcode),
            )
        }),
        date_of_birth.map(|date| {
            let score = sandbox::date_score(date, subscriber.date_of_birth);
            ("dateOfBirth", score)
        }),
    ];
    let result: Map<String, Value> = scores
        .into_iter()
        .flatten()
        .map(|(field, score)| {
            let value = if service_type == "match" {
                Value::from(score == 100)
            } else {
                Value::from(score)
            };
            (field.to_owned(), value)
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        json!({ "phoneNumber": phone_number, "serviceType": service_type, "result": result }),
    ))
}

fn session_json(id: &str, state: State) -> Value {
    let (state, matched) = match state {
        State::Pending => ("pending", None),
        State::Completed { matched } => ("completed", Some(matched)),
    };
    json!({
        "id": id,
        "state": state,
        "match": matched,
        "sessionUrl": format!("{SESSION_URL_BASE}{id}"),
    })
}

fn allow(request: &Request<Incoming>, method: Method) -> Result<(), ApiError> {
    if *request.method() == method {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed(method))
    }
}

async fn read_object(request: Request<Incoming>) -> Result<Fields, ApiError> {
    let bytes: Bytes = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<LengthLimitError>() {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest("could not read the request body".into())
            }
        })?
        .to_bytes();
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(fields)) => Ok(Fields(fields)),
        Ok(_) => Err(ApiError::BadRequest(
            "request body must be a JSON object".into(),
        )),
        Err(_) => Err(ApiError::BadRequest("invalid JSON body".into())),
    }
}

/// A request body's top-level fields.
struct Fields(Map<String, Value>);

impl Fields {
    fn required(&self, name: &'static str) -> Result<&str, ApiError> {
        self.optional(name)?
            .ok_or_else(|| ApiError::BadRequest(format!("missing field: {name}")))
    }

    fn optional(&self, name: &'static str) -> Result<Option<&str>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(ApiError::invalid(name, "expected a string")),
        }
    }

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
}

/// `+` and 8 to 15 digits, the first not zero (ITU-T E.164 allows at most 15).
fn is_e164(phone_number: &str) -> bool {
    phone_number.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len())
            && !digits.starts_with('0')
            && digits.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// Every way a request fails, rendered in one place.
#[derive(Debug)]
enum ApiError {
    Unauthorized(TokenError),
    BadRequest(String),
    NotFound(&'static str),
    UnknownPhoneNumber,
    MethodNotAllowed(Method),
    PayloadTooLarge,
    Internal(&'static str),
}

impl ApiError {
    fn invalid(field: &str, expected: &str) -> Self {
        Self::BadRequest(format!("invalid field: {field} ({expected})"))
    }

    fn into_response(self) -> Response<Body> {
        let (status, code) = match &self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NotFound(_) | Self::UnknownPhoneNumber => (StatusCode::NOT_FOUND, "not_found"),
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
            Self::BadRequest(message) => f.write_str(message),
            Self::NotFound(message) | Self::Internal(message) => f.write_str(message),
            Self::UnknownPhoneNumber => f.write_str("no data for this phone number"),
            Self::MethodNotAllowed(method) => write!(f, "method not allowed; use {method}"),
            Self::PayloadTooLarge => write!(f, "request body exceeds {MAX_BODY_BYTES} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_e164;

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
}
