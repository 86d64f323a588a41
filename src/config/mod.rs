//! Configuration: one optional TOML file, environment variables overriding it key by key, and
//! defaults for everything but the credentials.
//!
//! Every setting is one row of the table in `keys.rs` (file key, environment variable, default,
//! parser, how `check` shows it); both layers, the effective configuration and the warnings
//! about unknown variables are read through it. Loading runs in three steps, so that everything
//! but the last one is pure and tested with strings and maps:
//!
//! 1. `Layers` (`layers.rs`) collects the raw text of each key with its [`Origin`]
//!    (default < file < env);
//! 2. `build.rs` parses each key into its type, then checks the rules between keys;
//! 3. it reads the secret and CA files the settings name (`files.rs`); a relative path from the
//!    file is taken from the file's directory.
//!
//! Every failure is one [`ConfigError`] naming the key as the operator wrote it (the environment
//! variable or the file key and file), and what was expected. The secret never appears in an
//! error, in `Debug` output, or in [`Loaded::render`]. An `IDMATCH_*` variable that no key reads
//! is not an error but is reported by [`unknown_variables`], for the caller to warn about.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use rustls::pki_types::CertificateDer;

mod build;
mod files;
mod keys;
mod layers;
mod parse;
#[cfg(test)]
mod tests;

pub use files::{parse_certificates, read_ca_file, read_credential};
use keys::Key;
use layers::{closest, Layers};
use parse::expected;

/// The proxy's settings, parsed and validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub credentials: Credentials,
    pub token: TokenSettings,
    /// Health, readiness and metrics, never proxied.
    pub admin_listen: SocketAddr,
    /// How long the listener keeps accepting after a stop signal, while readiness already
    /// says 503: Kubernetes removes endpoints asynchronously.
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish once the listener has closed.
    pub shutdown_timeout: Duration,
    /// Runtime worker threads; `None` sizes them from the CPU quota.
    pub worker_threads: Option<usize>,
    pub client: ClientLimits,
    pub log: LogSettings,
    pub rate_limit: RateLimit,
    /// The listener for CM.com's signed callbacks; `None` when `callback.listen` is unset.
    pub callback: Option<CallbackSettings>,
}

/// Where CM.com's callbacks are received, and how they are bounded and handed to the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallbackSettings {
    pub listen: SocketAddr,
    /// The app's base URL: each verified callback's path and query are appended to its path.
    pub forward: ForwardUrl,
    /// Largest callback body; beyond it, 413 before anything reaches the app.
    pub max_body_bytes: u64,
    /// Time allowed to send a request head.
    pub header_timeout: Duration,
    /// Time allowed to send the body, once the head is in.
    pub body_timeout: Duration,
    /// Time allowed for the app to answer: connect and response head.
    pub forward_timeout: Duration,
    /// Callbacks handled at once; beyond it, an immediate 503 (CM.com retries 5xx).
    pub max_in_flight: usize,
    /// How long after a secret rotation callbacks signed with the previous secret still pass.
    pub previous_secret_grace: Duration,
    /// How long an event id the app acknowledged is remembered, to answer its redelivery.
    pub dedup_ttl: Duration,
    /// At most this many event ids are remembered; the oldest go first.
    pub dedup_max_ids: usize,
}

/// An http(s) base URL, parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Empty, or starting with `/` and without a trailing `/`.
    pub base_path: String,
}

impl fmt::Display for ForwardUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// CM.com's one request per second per credential set, kept for the applications.
#[derive(Clone, Debug)]
pub struct RateLimit {
    /// Between two requests sent with the credential; zero turns the limiter off.
    pub interval: Duration,
    /// A request whose send slot is further away than this gets a 429 at once.
    pub max_wait: Duration,
    /// Requests waiting for their slot at once, in this replica; beyond it, a 429.
    pub max_queued: usize,
    /// Replicas expected to share the credential: while the shared store is unreachable, each
    /// paces at `interval × replicas`.
    pub replicas: u32,
    /// The shared store, when replicas keep the limit together.
    pub redis: Option<Redis>,
    /// Bounds each reservation's round trip to `redis`; beyond it, local pacing takes over.
    pub redis_timeout: Duration,
}

/// A Redis or Valkey that every replica reserves its slots in.
#[derive(Clone, Debug)]
pub struct Redis {
    /// Parsed from `rate_limit.redis_url`, with the password from its file; its `Debug`
    /// redacts the password.
    pub connection: redis::ConnectionInfo,
    /// The URL as written (it holds no password: that one comes from a file).
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// For `rediss://`: the PEM CA bundle the store's certificate must chain to, instead of the
    /// system's roots (`rate_limit.redis_ca_file`), and where it was read from.
    pub ca: Option<(PathBuf, Vec<u8>)>,
}

/// What the proxy tolerates from the applications that call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Time allowed to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers); beyond it, 431.
    pub max_header_bytes: usize,
    /// Requests handled at once; beyond it, an immediate 503.
    pub max_in_flight: usize,
    /// Largest request body, enforced while streaming; beyond it, 413. `None`: no limit.
    pub max_body_bytes: Option<u64>,
}

/// How the proxy logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Replace the query in access logs (it can hold phone numbers) by `?<redacted>`.
    pub redact_query: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON unless stderr is a terminal.
    Auto,
    Json,
    Pretty,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Auto => "auto",
            LogFormat::Json => "json",
            LogFormat::Pretty => "pretty",
        })
    }
}

/// Where requests are forwarded, and how to trust it.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prefix for every forwarded path: empty, or starting with `/` and without a trailing `/`.
    pub base_path: String,
    pub roots: Roots,
    /// Trusted in addition to `roots` (`upstream.ca_file`).
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Kept so that the CA file can be named in logs and errors.
    pub ca_file: Option<PathBuf>,
    pub allow_insecure_http: bool,
    /// Bounds connecting: TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Bounds the wait for the upstream's response headers.
    pub response_timeout: Duration,
    /// The HTTP proxy to tunnel through with CONNECT (`upstream.proxy`, else `HTTPS_PROXY`),
    /// already `None` when `NO_PROXY` exempts the upstream's host.
    pub proxy: Option<Uri>,
    /// Request bodies up to this size are kept so that a request can be replayed once (after a
    /// 401, or a connection that failed before the request was written).
    pub replay_buffer_bytes: usize,
    /// Requests sent to the upstream at once; more wait for one to finish. Each HTTP/1.1
    /// request in flight holds a TLS connection, and CM.com allows one request per second.
    pub max_in_flight: usize,
    /// Offer h2 as well as http/1.1 by ALPN (the upstream chooses), else http/1.1 alone.
    pub http2: bool,
    /// For this long after start and after each request (zero: never), one connection is kept
    /// open, made in the background, so that a request finds one ready.
    pub keep_warm: Duration,
    /// Pooled HTTP/1.1 connections idle longer are closed by us, rather than risk reusing one
    /// the upstream's load balancer is closing.
    pub idle_timeout: Duration,
    /// HTTP/2 PING this often, idle or not (zero: never), and the connection closed when one
    /// is not answered within `ping_timeout`.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Upstream {
    /// The base URL, e.g. `https://api.cm.com/mobile-identity/v1`.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// The root certificates the upstream's certificate must chain to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Roots {
    /// Mozilla's roots compiled into the binary: works in distroless images.
    Webpki,
    /// The operating system's store.
    Native,
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Roots::Webpki => "webpki",
            Roots::Native => "native",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Credentials {
    /// The JWT `kid`.
    pub key_id: String,
    pub secret: Secret,
    /// Where the secret was read from, re-read on rotation; `None` if it came from
    /// `IDMATCH_SECRET`.
    pub secret_file: Option<PathBuf>,
    /// Where the key id was read from, re-read on rotation; `None` if it was given inline.
    pub key_id_file: Option<PathBuf>,
    /// How often the credential files are checked for changes.
    pub reload_interval: Duration,
}

/// The HMAC key. It has no `Display`, and its `Debug` hides it, so it cannot end up in a log
/// line by accident.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Self {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Timing of the tokens we mint: `iat = nbf = now - backdate`, `exp = iat + lifetime`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    pub lifetime: Duration,
    /// A new token is minted in the background this long before the current one expires.
    pub refresh_before: Duration,
    /// No request is sent with a token that has less validity left than this.
    pub margin: Duration,
    /// Tolerance for CM.com's clock being behind ours.
    pub backdate: Duration,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            lifetime: Duration::from_secs(60),
            refresh_before: Duration::from_secs(15),
            margin: Duration::from_secs(5),
            backdate: Duration::from_secs(5),
        }
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// One row of the effective configuration, for `idmatch-proxy check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The file key, e.g. `upstream.url`.
    pub key: &'static str,
    /// The parsed value, formatted; the secret shows only its length.
    pub value: String,
    pub origin: Origin,
}

/// A configuration together with where each of its values came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    /// One row per key, in the order of the example file.
    pub effective: Vec<Setting>,
}

impl Loaded {
    /// A key as the operator wrote it, for errors found after loading (e.g. binding `listen`):
    /// `IDMATCH_LISTEN (environment)`, `listen in /etc/x.toml`, `listen (default)`.
    pub fn describe(&self, key: &str) -> String {
        let origin = self
            .effective
            .iter()
            .find(|s| s.key == key)
            .map(|s| &s.origin);
        match origin {
            Some(Origin::Env(var)) => format!("{var} (environment)"),
            Some(Origin::File(path)) => format!("{key} in {}", path.display()),
            _ => format!("{key} (default)"),
        }
    }

    /// The effective settings as an aligned table: key, value, origin.
    pub fn render(&self) -> String {
        let header = ["KEY", "VALUE", "ORIGIN"].map(String::from);
        let rows = std::iter::once(header)
            .chain(
                self.effective
                    .iter()
                    .map(|s| [s.key.to_owned(), s.value.clone(), s.origin.to_string()]),
            )
            .collect::<Vec<_>>();
        let width = |column: usize| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (key_width, value_width) = (width(0), width(1));
        rows.iter()
            .map(|[key, value, origin]| {
                format!("{key:key_width$}  {value:value_width$}  {origin}\n")
            })
            .collect()
    }
}

/// A bad configuration: which key, where it came from, and what was expected. Displays as a
/// single line.
#[derive(Debug, thiserror::Error)]
#[error("{subject}: {problem}")]
pub struct ConfigError {
    subject: String,
    problem: String,
}

impl ConfigError {
    fn new(subject: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            subject: escape_controls(subject.into()),
            problem: escape_controls(problem.into()),
        }
    }
}

/// Paths are shown as written, and may hold a newline or an escape sequence: escaped, so that
/// the error stays one line and cannot rewrite the terminal.
fn escape_controls(text: String) -> String {
    if !text.contains(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

impl Config {
    /// Reads the config file (`--config`, given as `flag`, else `IDMATCH_CONFIG`, else none),
    /// then the secret and CA files the settings name.
    pub fn load(flag: Option<&Path>, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
        let file = match (flag, env.get(CONFIG_ENV)) {
            (Some(path), _) => Some(path),
            (None, Some(text)) if text.is_empty() => {
                let problem = expected("the path of a TOML config file", text);
                return Err(ConfigError::new(
                    format!("{CONFIG_ENV} (environment)"),
                    problem,
                ));
            }
            (None, text) => text.map(Path::new),
        };
        let text = file
            .map(|path| {
                fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        format!("config file {}", path.display()),
                        format!("cannot read: {e}"),
                    )
                })
            })
            .transpose()?;
        Self::from_parts(file.zip(text.as_deref()), env)
    }

    /// Same, with the file's text already in hand (tests).
    pub fn from_parts(
        file: Option<(&Path, &str)>,
        env: &HashMap<String, String>,
    ) -> Result<Loaded, ConfigError> {
        let mut layers = Layers::default();
        if let Some((path, text)) = file {
            layers.read_file(path, text)?;
        }
        layers.read_env(env)?;
        let config = layers.build()?;
        let effective = layers.effective(&config);
        Ok(Loaded { config, effective })
    }
}

/// Variables the proxy reads that are not settings.
const OTHER_ENV: [&str; 1] = [CONFIG_ENV];

/// The config file's path, when `--config` is not given.
const CONFIG_ENV: &str = "IDMATCH_CONFIG";

/// An `IDMATCH_*` environment variable that no setting reads: most likely a typo, which would
/// otherwise change nothing and say nothing. Only the name is kept: a misspelt
/// `IDMATCH_SECRET` holds the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownVariable {
    pub name: String,
    /// The known variable it is closest to, if any is close.
    pub suggestion: Option<&'static str>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (environment): not a setting, ignored", self.name)?;
        match self.suggestion {
            Some(known) => write!(f, "; did you mean {known}?"),
            None => Ok(()),
        }
    }
}

/// The variables in `env` that look like ours (`IDMATCH_`, in any case) but are not, sorted.
pub fn unknown_variables(env: &HashMap<String, String>) -> Vec<UnknownVariable> {
    let known = || Key::ALL.iter().map(|key| key.env).chain(OTHER_ENV);
    let mut unknown = env
        .keys()
        .filter(|name| {
            name.get(..PREFIX.len())
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case(PREFIX))
                && !known().any(|known| known == name.as_str())
        })
        .map(|name| UnknownVariable {
            name: escape_controls(name.clone()),
            suggestion: closest(&name.to_ascii_uppercase(), known()),
        })
        .collect::<Vec<_>>();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

const PREFIX: &str = "IDMATCH_";
