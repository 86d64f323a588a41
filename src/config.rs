//! Configuration: one optional TOML file, environment variables overriding it key by key, and
//! defaults for everything but the credentials.
//!
//! Every setting is described once in [`Key`]'s table (file key, environment variable, default);
//! both layers are read through it. Loading runs in three steps, so that everything but the last
//! one is pure and tested with strings and maps:
//!
//! 1. [`Layers`] collects the raw text of each key with its [`Origin`] (default < file < env);
//! 2. each key is parsed into its type, then cross-key rules are checked;
//! 3. the secret and CA files the settings name are read; a relative path from the file is
//!    taken from the file's directory.
//!
//! Every failure is one [`ConfigError`] naming the key as the operator wrote it (the environment
//! variable or the file key and file), and what was expected. The secret never appears in an
//! error, in `Debug` output, or in [`Loaded::render`]. An `IDMATCH_*` variable that no key reads
//! is not an error but is reported by [`unknown_variables`], for the caller to warn about.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use toml::de::{DeTable, DeValue};

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

// === The key table ===

/// Every setting, described by [`Key::spec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    Listen,
    AdminListen,
    DrainDelay,
    ShutdownTimeout,
    WorkerThreads,
    UpstreamUrl,
    UpstreamRoots,
    UpstreamCaFile,
    UpstreamAllowInsecureHttp,
    UpstreamConnectTimeout,
    UpstreamResponseTimeout,
    UpstreamProxy,
    UpstreamNoProxy,
    UpstreamReplayBufferBytes,
    UpstreamMaxInFlight,
    CredentialsKeyId,
    CredentialsKeyIdFile,
    CredentialsSecretFile,
    CredentialsSecret,
    CredentialsReloadInterval,
    TokenLifetime,
    TokenRefreshBefore,
    TokenMargin,
    TokenBackdate,
    ClientHeaderTimeout,
    ClientIdleTimeout,
    ClientMaxHeaderBytes,
    ClientMaxInFlight,
    ClientMaxBodyBytes,
    LogFormat,
    LogRedactQuery,
    RateLimitInterval,
    RateLimitMaxWait,
    RateLimitMaxQueued,
    RateLimitReplicas,
    RateLimitRedisUrl,
    RateLimitRedisPasswordFile,
    RateLimitRedisCaFile,
    RateLimitRedisTimeout,
    CallbackListen,
    CallbackForwardUrl,
    CallbackMaxBodyBytes,
    CallbackHeaderTimeout,
    CallbackBodyTimeout,
    CallbackForwardTimeout,
    CallbackMaxInFlight,
    CallbackPreviousSecretGrace,
    CallbackDedupTtl,
    CallbackDedupMaxIds,
}

struct Spec {
    /// Dotted key in the TOML file.
    name: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    toml: Toml,
}

/// What the key must be in the TOML file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Toml {
    /// A quoted string, described as the text says.
    Str(&'static str),
    Bool,
    /// Not accepted in the file at all.
    Forbidden,
}

impl Key {
    /// The order of `Loaded::effective`, as in the example file.
    const ALL: [Key; 49] = [
        Key::Listen,
        Key::AdminListen,
        Key::DrainDelay,
        Key::ShutdownTimeout,
        Key::WorkerThreads,
        Key::UpstreamUrl,
        Key::UpstreamRoots,
        Key::UpstreamCaFile,
        Key::UpstreamAllowInsecureHttp,
        Key::UpstreamConnectTimeout,
        Key::UpstreamResponseTimeout,
        Key::UpstreamProxy,
        Key::UpstreamNoProxy,
        Key::UpstreamReplayBufferBytes,
        Key::UpstreamMaxInFlight,
        Key::CredentialsKeyId,
        Key::CredentialsKeyIdFile,
        Key::CredentialsSecretFile,
        Key::CredentialsSecret,
        Key::CredentialsReloadInterval,
        Key::TokenLifetime,
        Key::TokenRefreshBefore,
        Key::TokenMargin,
        Key::TokenBackdate,
        Key::ClientHeaderTimeout,
        Key::ClientIdleTimeout,
        Key::ClientMaxHeaderBytes,
        Key::ClientMaxInFlight,
        Key::ClientMaxBodyBytes,
        Key::LogFormat,
        Key::LogRedactQuery,
        Key::RateLimitInterval,
        Key::RateLimitMaxWait,
        Key::RateLimitMaxQueued,
        Key::RateLimitReplicas,
        Key::RateLimitRedisUrl,
        Key::RateLimitRedisPasswordFile,
        Key::RateLimitRedisCaFile,
        Key::RateLimitRedisTimeout,
        Key::CallbackListen,
        Key::CallbackForwardUrl,
        Key::CallbackMaxBodyBytes,
        Key::CallbackHeaderTimeout,
        Key::CallbackBodyTimeout,
        Key::CallbackForwardTimeout,
        Key::CallbackMaxInFlight,
        Key::CallbackPreviousSecretGrace,
        Key::CallbackDedupTtl,
        Key::CallbackDedupMaxIds,
    ];

    #[rustfmt::skip]
    fn spec(self) -> Spec {
        use Toml::*;
        let row = |name, env, default, toml| Spec { name, env, default, toml };
        match self {
            Key::Listen => row("listen", "IDMATCH_LISTEN", Some("127.0.0.1:8080"), Str(ADDR)),
            Key::AdminListen => row("admin.listen", "IDMATCH_ADMIN_LISTEN", Some("127.0.0.1:9901"), Str(ADDR)),
            Key::DrainDelay => row("drain_delay", "IDMATCH_DRAIN_DELAY", Some("5s"), Str(DURATION)),
            Key::ShutdownTimeout => row("shutdown_timeout", "IDMATCH_SHUTDOWN_TIMEOUT", Some("20s"), Str(DURATION)),
            Key::WorkerThreads => row("worker_threads", "IDMATCH_WORKER_THREADS", Some("auto"), Str(THREADS)),
            Key::UpstreamUrl => row("upstream.url", "IDMATCH_UPSTREAM_URL", Some("https://api.cm.com/mobile-identity/v1"), Str(URL)),
            Key::UpstreamRoots => row("upstream.roots", "IDMATCH_UPSTREAM_ROOTS", Some("webpki"), Str(ROOTS)),
            Key::UpstreamCaFile => row("upstream.ca_file", "IDMATCH_UPSTREAM_CA_FILE", None, Str(PATH)),
            Key::UpstreamAllowInsecureHttp => row("upstream.allow_insecure_http", "IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", Some("false"), Bool),
            Key::UpstreamConnectTimeout => row("upstream.connect_timeout", "IDMATCH_UPSTREAM_CONNECT_TIMEOUT", Some("5s"), Str(DURATION)),
            Key::UpstreamResponseTimeout => row("upstream.response_timeout", "IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", Some("30s"), Str(DURATION)),
            Key::UpstreamProxy => row("upstream.proxy", "IDMATCH_UPSTREAM_PROXY", None, Str(PROXY)),
            Key::UpstreamNoProxy => row("upstream.no_proxy", "IDMATCH_UPSTREAM_NO_PROXY", None, Str(NO_PROXY)),
            Key::UpstreamReplayBufferBytes => row("upstream.replay_buffer_bytes", "IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES", Some("64KiB"), Str(SIZE)),
            Key::UpstreamMaxInFlight => row("upstream.max_in_flight", "IDMATCH_UPSTREAM_MAX_IN_FLIGHT", Some("64"), Str(COUNT)),
            Key::CredentialsKeyId => row("credentials.key_id", "IDMATCH_KEY_ID", None, Str(TEXT)),
            Key::CredentialsKeyIdFile => row("credentials.key_id_file", "IDMATCH_KEY_ID_FILE", None, Str(PATH)),
            Key::CredentialsSecretFile => row("credentials.secret_file", "IDMATCH_SECRET_FILE", None, Str(PATH)),
            // A config file is usually a ConfigMap, readable by far more people than a Secret.
            Key::CredentialsSecret => row("credentials.secret", "IDMATCH_SECRET", None, Forbidden),
            Key::CredentialsReloadInterval => row("credentials.reload_interval", "IDMATCH_CREDENTIALS_RELOAD_INTERVAL", Some("1s"), Str(DURATION)),
            Key::TokenLifetime => row("token.lifetime", "IDMATCH_TOKEN_LIFETIME", Some("60s"), Str(SECONDS)),
            Key::TokenRefreshBefore => row("token.refresh_before", "IDMATCH_TOKEN_REFRESH_BEFORE", Some("15s"), Str(REFRESH_BEFORE)),
            Key::TokenMargin => row("token.margin", "IDMATCH_TOKEN_MARGIN", Some("5s"), Str(MARGIN)),
            Key::TokenBackdate => row("token.backdate", "IDMATCH_TOKEN_BACKDATE", Some("5s"), Str(BACKDATE)),
            Key::ClientHeaderTimeout => row("client.header_timeout", "IDMATCH_CLIENT_HEADER_TIMEOUT", Some("10s"), Str(DURATION)),
            Key::ClientIdleTimeout => row("client.idle_timeout", "IDMATCH_CLIENT_IDLE_TIMEOUT", Some("60s"), Str(DURATION)),
            Key::ClientMaxHeaderBytes => row("client.max_header_bytes", "IDMATCH_CLIENT_MAX_HEADER_BYTES", Some("16KiB"), Str(SIZE)),
            Key::ClientMaxInFlight => row("client.max_in_flight", "IDMATCH_CLIENT_MAX_IN_FLIGHT", Some("1024"), Str(COUNT)),
            Key::ClientMaxBodyBytes => row("client.max_body_bytes", "IDMATCH_CLIENT_MAX_BODY_BYTES", None, Str(SIZE)),
            Key::LogFormat => row("log.format", "IDMATCH_LOG_FORMAT", Some("auto"), Str(LOG_FORMAT)),
            Key::LogRedactQuery => row("log.redact_query", "IDMATCH_LOG_REDACT_QUERY", Some("true"), Bool),
            Key::RateLimitInterval => row("rate_limit.interval", "IDMATCH_RATE_LIMIT_INTERVAL", Some("1s"), Str(DURATION)),
            Key::RateLimitMaxWait => row("rate_limit.max_wait", "IDMATCH_RATE_LIMIT_MAX_WAIT", Some("5s"), Str(DURATION)),
            Key::RateLimitMaxQueued => row("rate_limit.max_queued", "IDMATCH_RATE_LIMIT_MAX_QUEUED", Some("128"), Str(COUNT)),
            Key::RateLimitReplicas => row("rate_limit.replicas", "IDMATCH_RATE_LIMIT_REPLICAS", Some("1"), Str(COUNT)),
            Key::RateLimitRedisUrl => row("rate_limit.redis_url", "IDMATCH_RATE_LIMIT_REDIS_URL", None, Str(REDIS_URL)),
            Key::RateLimitRedisPasswordFile => row("rate_limit.redis_password_file", "IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE", None, Str(PATH)),
            Key::RateLimitRedisCaFile => row("rate_limit.redis_ca_file", "IDMATCH_RATE_LIMIT_REDIS_CA_FILE", None, Str(PATH)),
            Key::RateLimitRedisTimeout => row("rate_limit.redis_timeout", "IDMATCH_RATE_LIMIT_REDIS_TIMEOUT", Some("200ms"), Str(DURATION)),
            Key::CallbackListen => row("callback.listen", "IDMATCH_CALLBACK_LISTEN", None, Str(ADDR)),
            Key::CallbackForwardUrl => row("callback.forward_url", "IDMATCH_CALLBACK_FORWARD_URL", None, Str(FORWARD_URL)),
            Key::CallbackMaxBodyBytes => row("callback.max_body_bytes", "IDMATCH_CALLBACK_MAX_BODY_BYTES", Some("64KiB"), Str(SIZE)),
            Key::CallbackHeaderTimeout => row("callback.header_timeout", "IDMATCH_CALLBACK_HEADER_TIMEOUT", Some("10s"), Str(DURATION)),
            Key::CallbackBodyTimeout => row("callback.body_timeout", "IDMATCH_CALLBACK_BODY_TIMEOUT", Some("10s"), Str(DURATION)),
            Key::CallbackForwardTimeout => row("callback.forward_timeout", "IDMATCH_CALLBACK_FORWARD_TIMEOUT", Some("10s"), Str(DURATION)),
            Key::CallbackMaxInFlight => row("callback.max_in_flight", "IDMATCH_CALLBACK_MAX_IN_FLIGHT", Some("64"), Str(COUNT)),
            Key::CallbackPreviousSecretGrace => row("callback.previous_secret_grace", "IDMATCH_CALLBACK_PREVIOUS_SECRET_GRACE", Some("5m"), Str(DURATION)),
            Key::CallbackDedupTtl => row("callback.dedup_ttl", "IDMATCH_CALLBACK_DEDUP_TTL", Some("1h"), Str(DURATION)),
            Key::CallbackDedupMaxIds => row("callback.dedup_max_ids", "IDMATCH_CALLBACK_DEDUP_MAX_IDS", Some("10000"), Str(COUNT)),
        }
    }

    fn name(self) -> &'static str {
        self.spec().name
    }

    fn env(self) -> &'static str {
        self.spec().env
    }

    /// What the key's value must be, as its row describes it.
    fn expects(self) -> &'static str {
        match self.spec().toml {
            Toml::Str(what) => what,
            Toml::Bool => "true or false",
            Toml::Forbidden => TEXT,
        }
    }

    /// The key as the operator wrote it, e.g. `token.lifetime in /etc/x.toml`.
    fn describe(self, origin: &Origin) -> String {
        match origin {
            Origin::Default => format!("{} (default)", self.name()),
            Origin::File(path) => format!("{} in {}", self.name(), path.display()),
            Origin::Env(var) => format!("{var} (environment)"),
        }
    }
}

const ADDR: &str = "a socket address like 127.0.0.1:8080 or [::]:8080";
const URL: &str = "an absolute URL like https://api.cm.com/mobile-identity/v1";
const FORWARD_URL: &str = "an http(s) base URL like http://127.0.0.1:3000/callbacks";
const PATH: &str = "a file path";
const ROOTS: &str = "webpki or native";
// A duration key's description is also what a malformed value is answered with, so its
// examples are values that key accepts with the other keys at their defaults.
const DURATION: &str = "a duration like 60s, 500ms or 2m";
const SECONDS: &str = "whole seconds like 60s or 2m (JWT times have one-second resolution)";
const REFRESH_BEFORE: &str = "whole seconds like 15s or 30s (JWT times have one-second resolution)";
const BACKDATE: &str = "whole seconds like 5s or 0s (JWT times have one-second resolution)";
const MARGIN: &str = "a duration like 5s or 500ms";
const TEXT: &str = "a non-empty string";
const SIZE: &str = "a size in bytes like 65536, 64KiB or 1MiB";
const COUNT: &str = "a positive integer";
const THREADS: &str = "auto or a positive integer";
const LOG_FORMAT: &str = "auto, json or pretty";
const PROXY: &str = "an http:// proxy URL like http://proxy.internal:3128";
const REDIS_URL: &str = "a redis:// or rediss:// URL like redis://valkey.internal:6379";
const NO_PROXY: &str = "a comma-separated list of host names, domain suffixes, IP addresses or *";

/// Variables that other tools also honour, read when ours is unset; first found wins.
fn fallback_env(key: Key) -> &'static [&'static str] {
    match key {
        Key::UpstreamProxy => &["HTTPS_PROXY", "https_proxy"],
        Key::UpstreamNoProxy => &["NO_PROXY", "no_proxy"],
        _ => &[],
    }
}

// === Layers ===

/// A value as written, before parsing.
struct Raw {
    text: String,
    origin: Origin,
}

/// The winning raw value of each key that is set in the file or the environment.
#[derive(Default)]
struct Layers {
    values: HashMap<Key, Raw>,
}

static DEFAULT: Origin = Origin::Default;

impl Layers {
    fn read_file(&mut self, path: &Path, source: &str) -> Result<(), ConfigError> {
        let doc = DeTable::parse(source).map_err(|e| {
            // toml's own Display spans several lines (it quotes the source); keep ours to one.
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::new(at_line(path, source, e.span().map(|s| s.start)), message)
        })?;
        self.read_table(path, source, "", doc.get_ref())
    }

    fn read_table(
        &mut self,
        path: &Path,
        source: &str,
        prefix: &str,
        table: &DeTable<'_>,
    ) -> Result<(), ConfigError> {
        let mut entries = table.iter().collect::<Vec<_>>();
        // Report the first problem in the file, not the first in key order.
        entries.sort_by_key(|(name, _)| name.span().start);
        for (name, value) in entries {
            let dotted = format!("{prefix}{}", name.get_ref());
            // A quoted key containing a dot (`"upstream.url" = ..`) is not `upstream.url`.
            let key = Key::ALL
                .into_iter()
                .find(|k| k.name() == dotted && !name.get_ref().contains('.'));
            let is_table = Key::ALL
                .iter()
                .any(|k| k.name().starts_with(&format!("{dotted}.")));
            let origin = Origin::File(path.to_owned());
            match (key, value.get_ref()) {
                (Some(key), value) => {
                    let text = from_toml(key, value)
                        .map_err(|problem| ConfigError::new(key.describe(&origin), problem))?;
                    self.values.insert(key, Raw { text, origin });
                }
                (None, DeValue::Table(table)) if is_table => {
                    self.read_table(path, source, &format!("{dotted}."), table)?
                }
                (None, value) if is_table => {
                    let problem =
                        format!("expected a table, got {}", with_article(value.type_str()));
                    return Err(ConfigError::new(
                        format!("{dotted} in {}", path.display()),
                        problem,
                    ));
                }
                (None, _) => {
                    let known = Key::ALL
                        .iter()
                        .filter(|k| k.spec().toml != Toml::Forbidden)
                        .map(|k| k.name());
                    let problem = match closest(&dotted, known.clone()) {
                        Some(name) => format!("unknown key {dotted:?} (did you mean {name}?)"),
                        None => format!(
                            "unknown key {dotted:?} (expected one of: {})",
                            known.collect::<Vec<_>>().join(", ")
                        ),
                    };
                    return Err(ConfigError::new(
                        at_line(path, source, Some(name.span().start)),
                        problem,
                    ));
                }
            }
        }
        Ok(())
    }

    fn read_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        for key in Key::ALL {
            let names = std::iter::once(key.env()).chain(fallback_env(key).iter().copied());
            if let Some((name, text)) = names
                .filter_map(|name| env.get(name).map(|text| (name, text)))
                .next()
            {
                let origin = Origin::Env(name);
                self.values.insert(
                    key,
                    Raw {
                        text: text.clone(),
                        origin,
                    },
                );
            }
        }
        // The key id and the secret each have exactly one source, inline or a file; an
        // environment variable for either replaces the file's choice.
        self.one_source(Key::CredentialsKeyId, Key::CredentialsKeyIdFile)?;
        self.one_source(Key::CredentialsSecret, Key::CredentialsSecretFile)
    }

    /// Leaves at most one of `inline` and `file` set: the environment's, if it set one.
    fn one_source(&mut self, inline: Key, file: Key) -> Result<(), ConfigError> {
        let from_env = |layers: &Self, key| {
            matches!(
                layers.values.get(&key).map(|raw| &raw.origin),
                Some(Origin::Env(_))
            )
        };
        let (inline_set, file_set) = (
            self.values.contains_key(&inline),
            self.values.contains_key(&file),
        );
        if !(inline_set && file_set) {
            return Ok(());
        }
        match (from_env(self, inline), from_env(self, file)) {
            (true, true) => Err(ConfigError::new(
                format!("{} and {} (environment)", inline.env(), file.env()),
                "both are set; set only one of them",
            )),
            (true, false) => {
                self.values.remove(&file);
                Ok(())
            }
            (false, true) => {
                self.values.remove(&inline);
                Ok(())
            }
            (false, false) => Err(self.error(
                file,
                format!("{} is set too; set only one of them", inline.name()),
            )),
        }
    }

    /// The winning text and origin of `key`, falling back to its default.
    fn get(&self, key: Key) -> Option<(&str, &Origin)> {
        match self.values.get(&key) {
            Some(raw) => Some((&raw.text, &raw.origin)),
            None => key.spec().default.map(|text| (text, &DEFAULT)),
        }
    }

    fn origin(&self, key: Key) -> &Origin {
        self.get(key).map_or(&DEFAULT, |(_, origin)| origin)
    }

    /// An error about `key`, named as the operator wrote it.
    fn error(&self, key: Key, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(key.describe(self.origin(key)), problem)
    }

    fn optional<T>(
        &self,
        key: Key,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|(text, origin)| {
                parse(text).map_err(|problem| ConfigError::new(key.describe(origin), problem))
            })
            .transpose()
    }

    fn value<T>(
        &self,
        key: Key,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.optional(key, parse)?.ok_or_else(|| {
            let problem = format!(
                "required: set {} or {} in the config file",
                key.env(),
                key.name()
            );
            ConfigError::new(key.name(), problem)
        })
    }

    /// A path key. A relative path from the config file is relative to the file's directory, so
    /// that a file and what it names can move together; one from the environment stays
    /// relative to the working directory, as a shell would read it.
    fn path(&self, key: Key) -> Result<Option<PathBuf>, ConfigError> {
        let path = self.optional(key, path)?;
        Ok(match (path, self.origin(key)) {
            (Some(path), Origin::File(file)) if path.is_relative() => {
                Some(file.parent().unwrap_or(Path::new("")).join(path))
            }
            (path, _) => path,
        })
    }

    /// A duration key, `<integer><unit>`; JWT times in whole seconds. A value refused for its
    /// form is answered with the key's own description.
    fn duration(&self, key: Key, resolution: Resolution) -> Result<Duration, ConfigError> {
        self.value(key, |text| match parse_duration(text) {
            Some(d) if resolution == Resolution::Millis || d.subsec_nanos() == 0 => Ok(d),
            _ => Err(expected(key.expects(), text)),
        })
    }

    /// A duration key that must be greater than zero: a timeout, an interval, a lifetime.
    fn positive(&self, key: Key, resolution: Resolution) -> Result<Duration, ConfigError> {
        match self.duration(key, resolution)? {
            d if d.is_zero() => Err(self.error(key, "must be greater than zero")),
            d => Ok(d),
        }
    }

    fn build(&self) -> Result<Config, ConfigError> {
        use Resolution::{Millis, Seconds};
        let listen = self.value(Key::Listen, socket_addr)?;
        let (scheme, authority, base_path) = self.value(Key::UpstreamUrl, url)?;
        let allow_insecure_http = self.value(Key::UpstreamAllowInsecureHttp, boolean)?;
        // Checked only now: the two keys may come from different layers.
        if scheme == Scheme::HTTP && !allow_insecure_http {
            let problem = format!(
                "http:// would send the bearer token in clear; use https, or for local testing \
                 set {}=true ({} = true in the config file)",
                Key::UpstreamAllowInsecureHttp.env(),
                Key::UpstreamAllowInsecureHttp.name(),
            );
            return Err(self.error(Key::UpstreamUrl, problem));
        }
        let roots = self.value(Key::UpstreamRoots, roots)?;
        let connect_timeout = self.positive(Key::UpstreamConnectTimeout, Millis)?;
        let response_timeout = self.positive(Key::UpstreamResponseTimeout, Millis)?;
        let proxy = self.optional(Key::UpstreamProxy, proxy_url)?;
        let no_proxy = self.optional(Key::UpstreamNoProxy, |t| Ok(t.to_owned()))?;
        // The upstream is fixed, so NO_PROXY is decided once, here.
        let proxy = proxy.filter(|_| {
            !no_proxy
                .as_deref()
                .is_some_and(|list| no_proxy_matches(list, authority.host()))
        });
        let replay_buffer_bytes = self.value(Key::UpstreamReplayBufferBytes, size)?;
        let max_in_flight = self.value(Key::UpstreamMaxInFlight, count)?;
        let reload_interval = self.positive(Key::CredentialsReloadInterval, Millis)?;
        let token = TokenSettings {
            lifetime: self.positive(Key::TokenLifetime, Seconds)?,
            refresh_before: self.duration(Key::TokenRefreshBefore, Seconds)?,
            margin: self.duration(Key::TokenMargin, Millis)?,
            backdate: self.duration(Key::TokenBackdate, Seconds)?,
        };
        self.validate(&token)?;
        let shutdown_timeout = self.positive(Key::ShutdownTimeout, Millis)?;
        let admin_listen = self.value(Key::AdminListen, socket_addr)?;
        let drain_delay = self.duration(Key::DrainDelay, Millis)?;
        let worker_threads = self.value(Key::WorkerThreads, threads)?;
        let client = ClientLimits {
            header_timeout: self.positive(Key::ClientHeaderTimeout, Millis)?,
            idle_timeout: self.positive(Key::ClientIdleTimeout, Millis)?,
            max_header_bytes: self.value(Key::ClientMaxHeaderBytes, |t| {
                size(t).and_then(|n| match n {
                    // hyper's smallest read buffer; the limit is enforced through it.
                    n if n < 8192 => Err(format!("must be at least 8KiB, got {t:?}")),
                    n => Ok(n),
                })
            })?,
            max_in_flight: self.value(Key::ClientMaxInFlight, count)?,
            max_body_bytes: self
                .optional(Key::ClientMaxBodyBytes, size)?
                .map(|n| n as u64),
        };
        let log = LogSettings {
            format: self.value(Key::LogFormat, log_format)?,
            redact_query: self.value(Key::LogRedactQuery, boolean)?,
        };
        let replicas = self.value(Key::RateLimitReplicas, count)?;
        let mut rate_limit = RateLimit {
            interval: self.duration(Key::RateLimitInterval, Millis)?,
            max_wait: self.duration(Key::RateLimitMaxWait, Millis)?,
            max_queued: self.value(Key::RateLimitMaxQueued, count)?,
            replicas: u32::try_from(replicas).map_err(|_| {
                self.error(
                    Key::RateLimitReplicas,
                    format!("must be at most {}", u32::MAX),
                )
            })?,
            redis: None,
            redis_timeout: self.positive(Key::RateLimitRedisTimeout, Millis)?,
        };
        let redis_url = self.optional(Key::RateLimitRedisUrl, redis_url)?;
        let callback = self.callback()?;

        // Files last, once everything they could be wasted on is known to be valid.
        let ca_file = self.path(Key::UpstreamCaFile)?;
        let extra_roots = match &ca_file {
            Some(file) => {
                read_certificates(file).map_err(|p| self.error(Key::UpstreamCaFile, p))?
            }
            None => Vec::new(),
        };
        let (secret, secret_file) = self.secret()?;
        let (key_id, key_id_file) = self.key_id()?;
        if let Some((url, connection)) = redis_url {
            rate_limit.redis = Some(self.redis(url, connection)?);
        }
        // A key id file pointed at the secret would put the secret in every token's header.
        if key_id.as_bytes() == secret.expose() {
            let key = match key_id_file {
                Some(_) => Key::CredentialsKeyIdFile,
                None => Key::CredentialsKeyId,
            };
            return Err(self.error(
                key,
                "the key id equals the secret: it would be sent in every token's header; \
                 check that the key id and the secret come from different files",
            ));
        }
        Ok(Config {
            listen,
            admin_listen,
            drain_delay,
            worker_threads,
            client,
            log,
            callback,
            upstream: Upstream {
                scheme,
                authority,
                base_path,
                roots,
                extra_roots,
                ca_file,
                allow_insecure_http,
                connect_timeout,
                response_timeout,
                proxy,
                replay_buffer_bytes,
                max_in_flight,
            },
            credentials: Credentials {
                key_id,
                secret,
                secret_file,
                key_id_file,
                reload_interval,
            },
            token,
            shutdown_timeout,
            rate_limit,
        })
    }

    /// The shared store's settings, its password read from its file.
    fn redis(&self, url: String, connection: redis::ConnectionInfo) -> Result<Redis, ConfigError> {
        let password_file = self.path(Key::RateLimitRedisPasswordFile)?;
        let connection = match &password_file {
            Some(file) => {
                let password = read_credential(file)
                    .map_err(|p| self.error(Key::RateLimitRedisPasswordFile, p))?;
                let password = String::from_utf8(password).expect("read_credential checks UTF-8");
                let settings = connection.redis_settings().clone().set_password(password);
                connection.set_redis_settings(settings)
            }
            None => connection,
        };
        let ca = match self.path(Key::RateLimitRedisCaFile)? {
            Some(_) if !matches!(connection.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
                return Err(self.error(
                    Key::RateLimitRedisCaFile,
                    format!(
                        "applies to rediss:// only; {} is redis://",
                        Key::RateLimitRedisUrl.name()
                    ),
                ));
            }
            Some(file) => {
                let error = |p| self.error(Key::RateLimitRedisCaFile, p);
                // Checked as the upstream's CA file is; the store's client takes the PEM.
                read_certificates(&file).map_err(error)?;
                let pem = read_bounded(&file, MAX_CA_FILE).map_err(error)?;
                Some((file, pem))
            }
            None => None,
        };
        Ok(Redis {
            connection,
            url,
            password_file,
            ca,
        })
    }

    /// The callback listener's settings, if `callback.listen` is set; the app's URL must be set
    /// with it, and only with it.
    fn callback(&self) -> Result<Option<CallbackSettings>, ConfigError> {
        use Resolution::Millis;
        // Checked even with the listener off, as every other key is: a typo surfaces now rather
        // than on the day the listener is turned on.
        let max_body_bytes = self.value(Key::CallbackMaxBodyBytes, size)? as u64;
        let header_timeout = self.positive(Key::CallbackHeaderTimeout, Millis)?;
        let body_timeout = self.positive(Key::CallbackBodyTimeout, Millis)?;
        let forward_timeout = self.positive(Key::CallbackForwardTimeout, Millis)?;
        let max_in_flight = self.value(Key::CallbackMaxInFlight, count)?;
        let previous_secret_grace = self.duration(Key::CallbackPreviousSecretGrace, Millis)?;
        let dedup_ttl = self.duration(Key::CallbackDedupTtl, Millis)?;
        let dedup_max_ids = self.value(Key::CallbackDedupMaxIds, count)?;
        let listen = self.optional(Key::CallbackListen, socket_addr)?;
        let forward = self.optional(Key::CallbackForwardUrl, |text| {
            url(text).map_err(|problem| problem.replace("an https URL", "an http(s) URL"))
        })?;
        let (listen, (scheme, authority, base_path)) = match (listen, forward) {
            (None, None) => return Ok(None),
            (Some(listen), Some(forward)) => (listen, forward),
            (Some(_), None) => {
                let problem = format!(
                    "is set, so {} ({} in the config file) must name the app that receives the \
                     verified callbacks",
                    Key::CallbackForwardUrl.env(),
                    Key::CallbackForwardUrl.name(),
                );
                return Err(self.error(Key::CallbackListen, problem));
            }
            (None, Some(_)) => {
                let problem = format!(
                    "is set but {} ({} in the config file) is not: no callback would arrive",
                    Key::CallbackListen.env(),
                    Key::CallbackListen.name(),
                );
                return Err(self.error(Key::CallbackForwardUrl, problem));
            }
        };
        Ok(Some(CallbackSettings {
            listen,
            forward: ForwardUrl {
                scheme,
                authority,
                base_path,
            },
            max_body_bytes,
            header_timeout,
            body_timeout,
            forward_timeout,
            max_in_flight,
            previous_secret_grace,
            dedup_ttl,
            dedup_max_ids,
        }))
    }

    /// The key id, and the file it was read from. `read_env` left at most one source.
    fn key_id(&self) -> Result<(String, Option<PathBuf>), ConfigError> {
        if let Some(file) = self.path(Key::CredentialsKeyIdFile)? {
            let key_id =
                read_key_id(&file).map_err(|p| self.error(Key::CredentialsKeyIdFile, p))?;
            return Ok((key_id, Some(file)));
        }
        let key_id = self
            .optional(Key::CredentialsKeyId, non_empty)?
            .ok_or_else(|| {
                let problem = format!(
                    "required: set {} or {}, or {} in the config file",
                    Key::CredentialsKeyId.env(),
                    Key::CredentialsKeyIdFile.env(),
                    Key::CredentialsKeyId.name(),
                );
                ConfigError::new(Key::CredentialsKeyId.name(), problem)
            })?;
        Ok((key_id, None))
    }

    /// The secret, and the file it was read from. `read_env` left at most one source.
    fn secret(&self) -> Result<(Secret, Option<PathBuf>), ConfigError> {
        if let Some(file) = self.path(Key::CredentialsSecretFile)? {
            let secret =
                read_secret(&file).map_err(|p| self.error(Key::CredentialsSecretFile, p))?;
            return Ok((secret, Some(file)));
        }
        let secret = self
            .optional(Key::CredentialsSecret, |text| {
                non_empty(text).map(|text| Secret::new(text.into_bytes()))
            })?
            .ok_or_else(|| {
                let problem = format!(
                    "required: set {} (preferred) or {}, or {} in the config file",
                    Key::CredentialsSecretFile.env(),
                    Key::CredentialsSecret.env(),
                    Key::CredentialsSecretFile.name(),
                );
                ConfigError::new(Key::CredentialsSecret.name(), problem)
            })?;
        Ok((secret, None))
    }

    /// Rules between the token timings, so that a fresh token is always usable and is replaced
    /// before it gets too old to be sent.
    fn validate(&self, token: &TokenSettings) -> Result<(), ConfigError> {
        let shown = |key: Key, value: Duration| {
            format!(
                "{} ({}, {})",
                key.name(),
                show_duration(value),
                self.origin(key)
            )
        };
        if token.backdate >= token.lifetime {
            let problem = format!(
                "must be less than {} or tokens are expired when minted, got {}",
                shown(Key::TokenLifetime, token.lifetime),
                show_duration(token.backdate),
            );
            return Err(self.error(Key::TokenBackdate, problem));
        }
        let validity = token.lifetime - token.backdate;
        if token.refresh_before >= validity {
            let problem = format!(
                "must be less than {} minus {} = {}, the validity of a fresh token, got {}",
                shown(Key::TokenLifetime, token.lifetime),
                shown(Key::TokenBackdate, token.backdate),
                show_duration(validity),
                show_duration(token.refresh_before),
            );
            return Err(self.error(Key::TokenRefreshBefore, problem));
        }
        if token.margin >= token.refresh_before {
            let problem = format!(
                "must be less than {} so that tokens are refreshed before they become too old \
                 to send, got {}",
                shown(Key::TokenRefreshBefore, token.refresh_before),
                show_duration(token.margin),
            );
            return Err(self.error(Key::TokenMargin, problem));
        }
        Ok(())
    }

    /// A `callback.*` key's value; with the listener off, as written (or its default).
    fn show_callback(&self, key: Key, callback: Option<&CallbackSettings>) -> String {
        let Some(callback) = callback else {
            return self
                .get(key)
                .map_or_else(|| "(none)".into(), |(text, _)| text.to_owned());
        };
        match key {
            Key::CallbackListen => callback.listen.to_string(),
            Key::CallbackForwardUrl => callback.forward.to_string(),
            Key::CallbackMaxBodyBytes => callback.max_body_bytes.to_string(),
            Key::CallbackHeaderTimeout => show_duration(callback.header_timeout),
            Key::CallbackBodyTimeout => show_duration(callback.body_timeout),
            Key::CallbackForwardTimeout => show_duration(callback.forward_timeout),
            Key::CallbackMaxInFlight => callback.max_in_flight.to_string(),
            Key::CallbackPreviousSecretGrace => show_duration(callback.previous_secret_grace),
            Key::CallbackDedupTtl => show_duration(callback.dedup_ttl),
            _ => callback.dedup_max_ids.to_string(),
        }
    }

    fn effective(&self, config: &Config) -> Vec<Setting> {
        let (upstream, token) = (&config.upstream, &config.token);
        let rate_limit = &config.rate_limit;
        let redis = rate_limit.redis.as_ref();
        let path = |path: &Option<PathBuf>| {
            path.as_ref()
                .map_or_else(|| "(none)".into(), |p| p.display().to_string())
        };
        Key::ALL
            .into_iter()
            .map(|key| {
                let value = match key {
                    Key::Listen => config.listen.to_string(),
                    Key::AdminListen => config.admin_listen.to_string(),
                    Key::DrainDelay => show_duration(config.drain_delay),
                    Key::WorkerThreads => config
                        .worker_threads
                        .map_or_else(|| "auto".into(), |n| n.to_string()),
                    Key::UpstreamProxy => upstream
                        .proxy
                        .as_ref()
                        .map_or_else(|| "(none)".into(), redacted_proxy),
                    Key::UpstreamNoProxy => self
                        .get(Key::UpstreamNoProxy)
                        .map_or_else(|| "(none)".into(), |(text, _)| text.to_owned()),
                    Key::UpstreamReplayBufferBytes => upstream.replay_buffer_bytes.to_string(),
                    Key::UpstreamMaxInFlight => upstream.max_in_flight.to_string(),
                    Key::CredentialsKeyIdFile => path(&config.credentials.key_id_file),
                    Key::CredentialsReloadInterval => {
                        show_duration(config.credentials.reload_interval)
                    }
                    Key::ClientHeaderTimeout => show_duration(config.client.header_timeout),
                    Key::ClientIdleTimeout => show_duration(config.client.idle_timeout),
                    Key::ClientMaxHeaderBytes => config.client.max_header_bytes.to_string(),
                    Key::ClientMaxInFlight => config.client.max_in_flight.to_string(),
                    Key::ClientMaxBodyBytes => config
                        .client
                        .max_body_bytes
                        .map_or_else(|| "(no limit)".into(), |n| n.to_string()),
                    Key::LogFormat => config.log.format.to_string(),
                    Key::LogRedactQuery => config.log.redact_query.to_string(),
                    Key::UpstreamUrl => upstream.url(),
                    Key::UpstreamCaFile => path(&upstream.ca_file),
                    Key::UpstreamRoots => upstream.roots.to_string(),
                    Key::UpstreamAllowInsecureHttp => upstream.allow_insecure_http.to_string(),
                    Key::UpstreamConnectTimeout => show_duration(upstream.connect_timeout),
                    Key::UpstreamResponseTimeout => show_duration(upstream.response_timeout),
                    Key::CredentialsKeyId => config.credentials.key_id.clone(),
                    Key::CredentialsSecret => {
                        format!("<redacted, {} bytes>", config.credentials.secret.len())
                    }
                    Key::CredentialsSecretFile => path(&config.credentials.secret_file),
                    Key::TokenLifetime => show_duration(token.lifetime),
                    Key::TokenRefreshBefore => show_duration(token.refresh_before),
                    Key::TokenMargin => show_duration(token.margin),
                    Key::TokenBackdate => show_duration(token.backdate),
                    Key::ShutdownTimeout => show_duration(config.shutdown_timeout),
                    Key::RateLimitInterval => show_duration(rate_limit.interval),
                    Key::RateLimitMaxWait => show_duration(rate_limit.max_wait),
                    Key::RateLimitMaxQueued => rate_limit.max_queued.to_string(),
                    Key::RateLimitReplicas => rate_limit.replicas.to_string(),
                    Key::RateLimitRedisUrl => {
                        redis.map_or_else(|| "(none)".into(), |r| r.url.clone())
                    }
                    Key::RateLimitRedisPasswordFile => {
                        path(&redis.and_then(|r| r.password_file.clone()))
                    }
                    Key::RateLimitRedisCaFile => {
                        path(&redis.and_then(|r| r.ca.as_ref().map(|(file, _)| file.clone())))
                    }
                    Key::RateLimitRedisTimeout => show_duration(rate_limit.redis_timeout),
                    Key::CallbackListen
                    | Key::CallbackForwardUrl
                    | Key::CallbackMaxBodyBytes
                    | Key::CallbackHeaderTimeout
                    | Key::CallbackBodyTimeout
                    | Key::CallbackForwardTimeout
                    | Key::CallbackMaxInFlight
                    | Key::CallbackPreviousSecretGrace
                    | Key::CallbackDedupTtl
                    | Key::CallbackDedupMaxIds => self.show_callback(key, config.callback.as_ref()),
                };
                // A secret read from a file comes from wherever the file's path came from.
                let origin = match key {
                    Key::CredentialsSecret if config.credentials.secret_file.is_some() => {
                        self.origin(Key::CredentialsSecretFile)
                    }
                    Key::CredentialsKeyId if config.credentials.key_id_file.is_some() => {
                        self.origin(Key::CredentialsKeyIdFile)
                    }
                    _ => self.origin(key),
                };
                Setting {
                    key: key.name(),
                    value,
                    origin: origin.clone(),
                }
            })
            .collect()
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
    let known = || Key::ALL.into_iter().map(Key::env).chain(OTHER_ENV);
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

/// The candidate nearest to `name` by edit distance, if near enough to be a typo of it: at most
/// one edit per six characters, so that `upstream.urll` finds `upstream.url` but
/// `upstream.foo` finds nothing.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= (candidate.len() / 6).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over bytes (names are ASCII): insertions, deletions, substitutions.
fn edit_distance(a: &str, b: &str) -> usize {
    let mut previous = (0..=b.len()).collect::<Vec<_>>();
    for (i, x) in a.bytes().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, y) in b.bytes().enumerate() {
            let substitution = previous[j] + usize::from(x != y);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// `/etc/x.toml line 4`, from a byte offset into the file.
fn at_line(path: &Path, source: &str, offset: Option<usize>) -> String {
    match offset {
        Some(offset) => {
            let before = &source.as_bytes()[..offset.min(source.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            format!("{} line {line}", path.display())
        }
        None => path.display().to_string(),
    }
}

/// The file's value as text for the key's parser, after checking its TOML type.
fn from_toml(key: Key, value: &DeValue<'_>) -> Result<String, String> {
    match (key.spec().toml, value) {
        (Toml::Str(_), DeValue::String(text)) => Ok(text.to_string()),
        (Toml::Bool, DeValue::Boolean(b)) => Ok(b.to_string()),
        (Toml::Str(what), other) => Err(format!(
            "expected {what} as a quoted string, got {}",
            with_article(other.type_str())
        )),
        (Toml::Bool, other) => Err(format!(
            "expected true or false (unquoted), got {}",
            with_article(other.type_str())
        )),
        (Toml::Forbidden, _) => Err(format!(
            "the secret is not accepted in the config file (often a ConfigMap); use {} or set {} \
             (preferred) or {}",
            Key::CredentialsSecretFile.name(),
            Key::CredentialsSecretFile.env(),
            Key::CredentialsSecret.env(),
        )),
    }
}

/// `an integer`, `a string`.
fn with_article(noun: &str) -> String {
    match noun.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => format!("an {noun}"),
        _ => format!("a {noun}"),
    }
}

// === Parsers: the text of one key into its type ===

fn expected(what: &str, text: &str) -> String {
    format!("expected {what}, got {text:?}")
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| expected(ADDR, text))
}

/// Scheme, authority and base path of the upstream. Whether `http` is allowed depends on
/// another key, so it is checked by the caller.
fn url(text: &str) -> Result<(Scheme, Authority, String), String> {
    // `http::Uri` silently drops a fragment.
    if text.contains('#') {
        return Err("must not have a fragment (#...)".into());
    }
    let uri = text.parse::<Uri>().map_err(|_| expected(URL, text))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(expected(URL, text));
    };
    if *scheme != Scheme::HTTPS && *scheme != Scheme::HTTP {
        return Err(format!(
            "expected an https URL, got scheme {:?}",
            scheme.as_str()
        ));
    }
    // Not echoed: the user info may hold a password.
    if authority.as_str().contains('@') {
        return Err("must not contain user info (user@host); \
                    the proxy sends its own Authorization"
            .into());
    }
    // `port_u16` is `None` both without a port and with an invalid one (`:99999`, `:`).
    let bad_port = authority.port_u16().is_none() && authority.as_str() != authority.host();
    if authority.host().is_empty() || bad_port {
        return Err(expected(URL, text));
    }
    // Not echoed either: a query may carry a key.
    if uri.query().is_some() {
        return Err("must not have a query (?...)".into());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme.clone(), authority.clone(), base_path))
}

fn path(text: &str) -> Result<PathBuf, String> {
    match text {
        "" => Err(expected(PATH, text)),
        _ => Ok(PathBuf::from(text)),
    }
}

fn roots(text: &str) -> Result<Roots, String> {
    match text {
        "webpki" => Ok(Roots::Webpki),
        "native" => Ok(Roots::Native),
        _ => Err(expected(ROOTS, text)),
    }
}

fn boolean(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(expected("true, false, 1 or 0", text)),
    }
}

fn non_empty(text: &str) -> Result<String, String> {
    match text {
        "" => Err(format!("expected {TEXT}, got \"\"")),
        _ => Ok(text.to_owned()),
    }
}

/// The smallest step a duration key can take.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Millis,
    /// JWT times (RFC 7519 NumericDate) are whole seconds.
    Seconds,
}

/// `<integer><unit>`, unit one of `ms`, `s`, `m`, `h`.
fn parse_duration(text: &str) -> Option<Duration> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number = number.parse::<u64>().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => number.checked_mul(60).map(Duration::from_secs),
        "h" => number.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Bytes: a plain integer, or one with a `KiB` or `MiB` suffix.
fn size(text: &str) -> Result<usize, String> {
    let (number, multiplier) = if let Some(n) = text.strip_suffix("KiB") {
        (n, 1024)
    } else if let Some(n) = text.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else {
        (text, 1)
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| expected(SIZE, text))
}

fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(expected(COUNT, text)),
    }
}

fn threads(text: &str) -> Result<Option<usize>, String> {
    match text {
        "auto" => Ok(None),
        _ => count(text).map(Some).map_err(|_| expected(THREADS, text)),
    }
}

fn log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "auto" => Ok(LogFormat::Auto),
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(expected(LOG_FORMAT, text)),
    }
}

/// An `http://host:port` proxy, optionally with `user:password@` for `Proxy-Authorization`.
/// Never echoed: it may hold a password.
fn proxy_url(text: &str) -> Result<Uri, String> {
    let uri = text
        .parse::<Uri>()
        .map_err(|_| format!("expected {PROXY}"))?;
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority))
            if *scheme == Scheme::HTTP && !authority.host().is_empty() =>
        {
            Ok(uri)
        }
        (Some(scheme), Some(_)) => Err(format!(
            "expected {PROXY}: the tunnel to the upstream is TLS already, got scheme {:?}",
            scheme.as_str()
        )),
        _ => Err(format!("expected {PROXY}")),
    }
}

/// A `redis://` or `rediss://` URL without a password (that comes from a file), and the
/// connection it names. Never echoed: a mistyped password would be.
fn redis_url(text: &str) -> Result<(String, redis::ConnectionInfo), String> {
    let uri = text
        .parse::<Uri>()
        .map_err(|_| format!("expected {REDIS_URL}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "redis" && scheme != "rediss" {
        return Err(format!("expected {REDIS_URL}, got scheme {scheme:?}"));
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    if authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'))
    {
        return Err(format!(
            "must not contain a password: set {} instead",
            Key::RateLimitRedisPasswordFile.name()
        ));
    }
    // `redis` reads a fragment as options (`#insecure` turns off certificate checks).
    if text.contains('#') || uri.query().is_some() {
        return Err("must not have a query or a fragment".into());
    }
    let connection = redis::IntoConnectionInfo::into_connection_info(text)
        .map_err(|_| format!("expected {REDIS_URL}"))?;
    Ok((text.to_owned(), connection))
}

/// The proxy URL with any password replaced, for display.
fn redacted_proxy(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("http://{user}:<redacted>@{host}")
        }
        None => format!("http://{authority}"),
    }
}

/// Whether `NO_PROXY` exempts `host`, as curl reads it: `*` for all; otherwise entries that
/// equal the host or are a domain suffix of it (`example.com` and `.example.com` both cover
/// `api.example.com`), compared without case; ports and CIDR ranges are not supported.
fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*"
            || host.eq_ignore_ascii_case(entry)
            || (host.len() > entry.len()
                && !entry.is_empty()
                && host[..host.len() - entry.len()].ends_with('.')
                && host[host.len() - entry.len()..].eq_ignore_ascii_case(entry))
    })
}

/// The inverse of [`duration`]: `60s`, `1500ms`.
fn show_duration(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{}ms", d.as_millis()),
    }
}

// === Files named by the settings ===

/// Far above any HMAC key; smaller than any file mistaken for one.
const MAX_SECRET_FILE: u64 = 64 * 1024;
/// Far above a full public CA bundle (about 250 KiB).
const MAX_CA_FILE: u64 = 16 * 1024 * 1024;

/// Reads at most `limit` bytes: a path set to the wrong file (`/dev/zero`, a disk image) fails
/// instead of exhausting memory.
fn read_bounded(file: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", file.display());
    let mut bytes = Vec::new();
    fs::File::open(file)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(cannot_read)?;
    if bytes.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", file.display()));
    }
    Ok(bytes)
}

fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    read_ca_file(file).and_then(|pem| parse_certificates(file, &pem))
}

/// The bytes of a CA bundle, bounded.
pub fn read_ca_file(file: &Path) -> Result<Vec<u8>, String> {
    read_bounded(file, MAX_CA_FILE)
}

/// The CA certificates of `file`'s PEM, each checked to be usable as a trust anchor.
pub fn parse_certificates(file: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", file.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            file.display()
        ));
    }
    // PEM can wrap anything: check that each block decodes as a trust anchor now, while the
    // key and the file can still be named.
    let mut store = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        store.add(certificate.clone()).map_err(|e| {
            format!(
                "{}: certificate {} cannot be used as a CA: {e}",
                file.display(),
                index + 1
            )
        })?;
    }
    Ok(certificates)
}

fn read_secret(file: &Path) -> Result<Secret, String> {
    read_credential(file).map(Secret::new)
}

fn read_key_id(file: &Path) -> Result<String, String> {
    read_credential(file).map(|bytes| String::from_utf8(bytes).expect("checked UTF-8"))
}

/// A credential file's text: UTF-8, one trailing line ending dropped, not empty.
pub fn read_credential(file: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = read_bounded(file, MAX_SECRET_FILE)?;
    // `echo` and `kubectl create secret --from-file` often leave one line ending.
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if std::str::from_utf8(&bytes).is_err() {
        return Err(format!("{} is not valid UTF-8", file.display()));
    }
    if bytes.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/idmatch/idmatch-proxy.toml";
    const SECRET: &str = "s3cr3t-that-must-never-leak";
    const EXAMPLE: &str = include_str!("../config/idmatch-proxy.toml");

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The two settings without a default, plus `extra`.
    fn env_with(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env = env(&[("IDMATCH_KEY_ID", "kid-1"), ("IDMATCH_SECRET", SECRET)]);
        env.extend(self::env(extra));
        env
    }

    fn load(file: Option<&str>, env: &HashMap<String, String>) -> Result<Loaded, ConfigError> {
        Config::from_parts(file.map(|text| (Path::new(FILE), text)), env)
    }

    fn config(file: &str, extra_env: &[(&str, &str)]) -> Config {
        load(Some(file), &env_with(extra_env)).unwrap().config
    }

    /// The error's message, checked to be one line without the secret.
    fn error(file: Option<&str>, env: &HashMap<String, String>) -> String {
        let message = load(file, env)
            .expect_err("config should be rejected")
            .to_string();
        assert!(!message.contains('\n'), "not one line: {message}");
        assert!(!message.contains(SECRET), "secret leaked: {message}");
        message
    }

    fn file_error(file: &str) -> String {
        error(Some(file), &env_with(&[]))
    }

    fn env_error(extra_env: &[(&str, &str)]) -> String {
        error(None, &env_with(extra_env))
    }

    fn temp_file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, contents).unwrap();
        file
    }

    fn path_of(file: &tempfile::NamedTempFile) -> &str {
        file.path().to_str().unwrap()
    }

    fn origin_of<'a>(loaded: &'a Loaded, key: &str) -> &'a Origin {
        &loaded
            .effective
            .iter()
            .find(|s| s.key == key)
            .unwrap()
            .origin
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn defaults() {
        let loaded = load(None, &env_with(&[])).unwrap();
        let config = &loaded.config;
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.shutdown_timeout, secs(20));
        assert_eq!(
            config.upstream.url(),
            "https://api.cm.com/mobile-identity/v1"
        );
        assert_eq!(config.upstream.scheme, Scheme::HTTPS);
        assert_eq!(config.upstream.authority, "api.cm.com");
        assert_eq!(config.upstream.base_path, "/mobile-identity/v1");
        assert_eq!(config.upstream.roots, Roots::Webpki);
        assert!(config.upstream.extra_roots.is_empty());
        assert_eq!(config.upstream.ca_file, None);
        assert!(!config.upstream.allow_insecure_http);
        assert_eq!(config.upstream.connect_timeout, secs(5));
        assert_eq!(config.upstream.response_timeout, secs(30));
        assert_eq!(config.credentials.key_id, "kid-1");
        assert_eq!(config.credentials.secret.expose(), SECRET.as_bytes());
        assert_eq!(config.credentials.secret_file, None);
        assert_eq!(config.token, TokenSettings::default());
        assert_eq!(origin_of(&loaded, "listen"), &Origin::Default);
        assert_eq!(
            origin_of(&loaded, "credentials.secret"),
            &Origin::Env("IDMATCH_SECRET")
        );
    }

    #[test]
    fn file_overrides_default() {
        let file = r#"
            listen = "0.0.0.0:9000"
            shutdown_timeout = "1m"
            [upstream]
            url = "https://api.cm.com/mobile-identity-sandbox/v1"
            roots = "native"
            connect_timeout = "1500ms"
            [token]
            lifetime = "2m"
            refresh_before = "30s"
        "#;
        let loaded = load(Some(file), &env_with(&[])).unwrap();
        let config = &loaded.config;
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.shutdown_timeout, secs(60));
        assert_eq!(config.upstream.base_path, "/mobile-identity-sandbox/v1");
        assert_eq!(config.upstream.roots, Roots::Native);
        assert_eq!(config.upstream.connect_timeout, Duration::from_millis(1500));
        assert_eq!(config.upstream.response_timeout, secs(30));
        assert_eq!(config.token.lifetime, secs(120));
        assert_eq!(config.token.refresh_before, secs(30));
        assert_eq!(config.token.margin, secs(5));
        let file_origin = Origin::File(FILE.into());
        assert_eq!(origin_of(&loaded, "upstream.roots"), &file_origin);
        assert_eq!(origin_of(&loaded, "token.margin"), &Origin::Default);
    }

    #[test]
    fn env_overrides_file_per_key() {
        let file = r#"
            listen = "0.0.0.0:9000"
            [upstream]
            roots = "native"
            [credentials]
            key_id = "from-file"
        "#;
        let env = env(&[
            ("IDMATCH_LISTEN", "[::1]:7000"),
            ("IDMATCH_SECRET", SECRET),
            ("IDMATCH_UNRELATED", "ignored"),
        ]);
        let loaded = load(Some(file), &env).unwrap();
        assert_eq!(loaded.config.listen, "[::1]:7000".parse().unwrap());
        assert_eq!(loaded.config.upstream.roots, Roots::Native);
        assert_eq!(loaded.config.credentials.key_id, "from-file");
        assert_eq!(origin_of(&loaded, "listen"), &Origin::Env("IDMATCH_LISTEN"));
        assert_eq!(
            origin_of(&loaded, "credentials.key_id"),
            &Origin::File(FILE.into())
        );
    }

    /// The example documents every key with its default, so the two cannot drift apart.
    #[test]
    fn example_file_shows_the_defaults() {
        let secret = temp_file(b"example-secret\n");
        let env = env(&[("IDMATCH_SECRET_FILE", path_of(&secret))]);
        let example = load(Some(EXAMPLE), &env).unwrap();
        let defaults = load(
            None,
            &self::env(&[
                ("IDMATCH_KEY_ID", "3b438437-04a4-40bb-8389-54bb02766fba"),
                ("IDMATCH_SECRET_FILE", path_of(&secret)),
            ]),
        )
        .unwrap();
        assert_eq!(example.effective.len(), Key::ALL.len());
        for (from_example, default) in example.effective.iter().zip(&defaults.effective) {
            assert_eq!(from_example.key, default.key);
            assert_eq!(from_example.value, default.value, "{}", default.key);
            // Every key the file accepts is written out, except those without a default.
            let expected = match from_example.key {
                "upstream.ca_file"
                | "upstream.proxy"
                | "upstream.no_proxy"
                | "credentials.key_id_file"
                | "client.max_body_bytes"
                | "rate_limit.redis_url"
                | "rate_limit.redis_password_file"
                | "rate_limit.redis_ca_file"
                | "callback.listen"
                | "callback.forward_url" => Origin::Default,
                "credentials.secret_file" | "credentials.secret" => {
                    Origin::Env("IDMATCH_SECRET_FILE")
                }
                _ => Origin::File(FILE.into()),
            };
            assert_eq!(from_example.origin, expected, "{}", from_example.key);
        }
        assert_eq!(example.config.token, TokenSettings::default());
        assert_eq!(
            example.config.credentials.secret.expose(),
            b"example-secret"
        );

        // Without the override, the example's own secret file is used.
        let message = error(Some(EXAMPLE), &HashMap::new());
        assert!(
            message.starts_with(&format!(
                "credentials.secret_file in {FILE}: cannot read /run/secrets/idmatch/secret: "
            )),
            "{message}"
        );
    }

    #[test]
    fn duration_syntax() {
        let ok = [
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("60s", secs(60)),
            ("2m", secs(120)),
            ("1h", secs(3600)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Some(expected), "{text}");
        }
        for text in [
            "",
            "60",
            "s",
            "1.5s",
            "-1s",
            " 1s",
            "1 s",
            "1S",
            "1d",
            "1sec",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
        assert_eq!(parse_duration(&format!("{}h", u64::MAX / 60)), None);
        assert_eq!(show_duration(secs(60)), "60s");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn bad_duration_names_key_and_origin() {
        assert_eq!(
            env_error(&[("IDMATCH_TOKEN_LIFETIME", "abc")]),
            r#"IDMATCH_TOKEN_LIFETIME (environment): expected whole seconds like 60s or 2m (JWT times have one-second resolution), got "abc""#
        );
        assert_eq!(
            file_error("[upstream]\nconnect_timeout = \"abc\""),
            format!(
                r#"upstream.connect_timeout in {FILE}: expected a duration like 60s, 500ms or 2m, got "abc""#
            )
        );
    }

    /// A malformed value is answered with examples, and each example must be one the key
    /// accepts: a JWT time suggesting `500ms` would then refuse it.
    #[test]
    fn every_duration_key_suggests_only_values_it_accepts() {
        let durations = Key::ALL.into_iter().filter(|key| {
            matches!(
                key.expects(),
                DURATION | SECONDS | REFRESH_BEFORE | BACKDATE | MARGIN
            )
        });
        let mut checked = 0;
        for key in durations {
            let message = env_error(&[(key.env(), "abc")]);
            let expects = key.expects();
            assert_eq!(
                message,
                format!(
                    "{} (environment): expected {expects}, got \"abc\"",
                    key.env()
                )
            );
            // The examples: every word that starts with a digit, without a trailing comma.
            let examples = expects
                .split_whitespace()
                .filter(|word| word.starts_with(|c: char| c.is_ascii_digit()))
                .map(|word| word.trim_end_matches(','));
            for example in examples {
                let accepted = load(None, &env_with(&[(key.env(), example)]));
                assert!(
                    accepted.is_ok(),
                    "{}={example}: {:?}",
                    key.env(),
                    accepted.err()
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 19, "every duration key");
    }

    #[test]
    fn jwt_times_are_whole_seconds() {
        let message = env_error(&[("IDMATCH_TOKEN_LIFETIME", "1500ms")]);
        assert!(
            message.starts_with("IDMATCH_TOKEN_LIFETIME (environment): expected whole seconds"),
            "{message}"
        );
        let message = file_error("[token]\nbackdate = \"500ms\"");
        assert!(
            message.starts_with(&format!("token.backdate in {FILE}: expected whole seconds")),
            "{message}"
        );
        // A fractional refresh_before could fall due again right after a refresh, since a
        // fresh token's validity is itself a whole number of seconds minus the current fraction.
        let message = env_error(&[("IDMATCH_TOKEN_REFRESH_BEFORE", "14500ms")]);
        assert!(
            message
                .starts_with("IDMATCH_TOKEN_REFRESH_BEFORE (environment): expected whole seconds"),
            "{message}"
        );
        // Other durations may be sub-second.
        assert_eq!(
            config("[token]\nmargin = \"500ms\"", &[]).token.margin,
            Duration::from_millis(500)
        );
        assert_eq!(
            config("", &[("IDMATCH_TOKEN_LIFETIME", "2m")])
                .token
                .lifetime,
            secs(120)
        );
    }

    #[test]
    fn zero_lifetime_and_timeouts_are_refused() {
        for var in [
            "IDMATCH_TOKEN_LIFETIME",
            "IDMATCH_UPSTREAM_CONNECT_TIMEOUT",
            "IDMATCH_UPSTREAM_RESPONSE_TIMEOUT",
            "IDMATCH_SHUTDOWN_TIMEOUT",
        ] {
            assert_eq!(
                env_error(&[(var, "0s")]),
                format!("{var} (environment): must be greater than zero")
            );
        }
        // A zero backdate is fine: it just means trusting both clocks.
        assert_eq!(
            config("", &[("IDMATCH_TOKEN_BACKDATE", "0s")])
                .token
                .backdate,
            Duration::ZERO
        );
    }

    #[test]
    fn token_timings_must_leave_room_for_refresh() {
        assert_eq!(
            env_error(&[("IDMATCH_TOKEN_MARGIN", "15s")]),
            "IDMATCH_TOKEN_MARGIN (environment): must be less than token.refresh_before \
             (15s, default) so that tokens are refreshed before they become too old to send, \
             got 15s"
        );
        assert_eq!(
            error(Some("[token]\nrefresh_before = \"55s\""), &env_with(&[])),
            format!(
                "token.refresh_before in {FILE}: must be less than token.lifetime (60s, default) \
                 minus token.backdate (5s, default) = 55s, the validity of a fresh token, got 55s"
            )
        );
        let message = error(
            Some("[token]\nlifetime = \"10s\""),
            &env_with(&[("IDMATCH_TOKEN_BACKDATE", "10s")]),
        );
        assert_eq!(
            message,
            format!(
                "IDMATCH_TOKEN_BACKDATE (environment): must be less than token.lifetime \
                 (10s, file {FILE}) or tokens are expired when minted, got 10s"
            )
        );
        // The rules hold across layers and accept the tightest valid setting.
        let token = config(
            "[token]\nlifetime = \"10s\"\nbackdate = \"1s\"",
            &[
                ("IDMATCH_TOKEN_REFRESH_BEFORE", "8s"),
                ("IDMATCH_TOKEN_MARGIN", "7s"),
            ],
        )
        .token;
        assert_eq!((token.refresh_before, token.margin), (secs(8), secs(7)));
    }

    #[test]
    fn base_path_is_normalised() {
        let cases = [
            ("https://api.cm.com", "", "https://api.cm.com"),
            ("https://api.cm.com/", "", "https://api.cm.com"),
            (
                "https://api.cm.com/mobile-identity/v1/",
                "/mobile-identity/v1",
                "https://api.cm.com/mobile-identity/v1",
            ),
            (
                "https://api.cm.com/verification-service/v1",
                "/verification-service/v1",
                "https://api.cm.com/verification-service/v1",
            ),
            ("https://[::1]:8443/a//", "/a", "https://[::1]:8443/a"),
        ];
        for (url, base_path, round_trip) in cases {
            let upstream = config("", &[("IDMATCH_UPSTREAM_URL", url)]).upstream;
            assert_eq!(upstream.base_path, base_path, "{url}");
            assert_eq!(upstream.url(), round_trip, "{url}");
        }
        let upstream =
            config("", &[("IDMATCH_UPSTREAM_URL", "https://api.cm.com:8443/x")]).upstream;
        assert_eq!(upstream.authority.host(), "api.cm.com");
        assert_eq!(upstream.authority.port_u16(), Some(8443));
    }

    #[test]
    fn bad_urls_are_refused() {
        let cases = [
            ("api.cm.com/v1", "expected an absolute URL like https://api.cm.com/mobile-identity/v1, got \"api.cm.com/v1\""),
            ("/v1", "expected an absolute URL"),
            ("not a url", "expected an absolute URL"),
            ("ftp://api.cm.com/v1", "expected an https URL, got scheme \"ftp\""),
            ("https://api.cm.com:99999/v1", "expected an absolute URL"),
            ("https://api.cm.com:/v1", "expected an absolute URL"),
            ("https://:443/v1", "expected an absolute URL"),
            ("https:///v1", "expected an absolute URL"),
            ("https://api.cm.com/v1?x=1", "must not have a query"),
            ("https://api.cm.com/v1?", "must not have a query"),
            ("https://api.cm.com/v1#top", "must not have a fragment"),
        ];
        for (url, problem) in cases {
            let message = env_error(&[("IDMATCH_UPSTREAM_URL", url)]);
            assert!(
                message.starts_with(&format!("IDMATCH_UPSTREAM_URL (environment): {problem}")),
                "{url}: {message}"
            );
        }
        let message = file_error("[upstream]\nurl = \"https://user:hunter2@api.cm.com/v1\"");
        assert!(
            message.starts_with(&format!(
                "upstream.url in {FILE}: must not contain user info"
            )),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn insecure_http_needs_an_explicit_opt_in() {
        let message = env_error(&[("IDMATCH_UPSTREAM_URL", "http://127.0.0.1:9000/v1")]);
        assert!(
            message.starts_with(
                "IDMATCH_UPSTREAM_URL (environment): http:// would send the bearer token in clear"
            ),
            "{message}"
        );
        assert!(
            message.contains("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP=true"),
            "{message}"
        );
        assert!(
            message.contains("upstream.allow_insecure_http = true"),
            "{message}"
        );

        // The two keys may come from different layers.
        let upstream = config(
            "[upstream]\nurl = \"http://127.0.0.1:9000/v1\"",
            &[("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", "1")],
        )
        .upstream;
        assert_eq!(upstream.scheme, Scheme::HTTP);
        assert!(upstream.allow_insecure_http);
        let upstream = config(
            "[upstream]\nallow_insecure_http = true",
            &[("IDMATCH_UPSTREAM_URL", "http://127.0.0.1:9000/")],
        )
        .upstream;
        assert_eq!(upstream.url(), "http://127.0.0.1:9000");
        // The opt-in does not turn https into http.
        let upstream = config("[upstream]\nallow_insecure_http = true", &[]).upstream;
        assert_eq!(upstream.scheme, Scheme::HTTPS);
    }

    #[test]
    fn booleans() {
        for (text, expected) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            let env = [("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", text)];
            assert_eq!(
                config("", &env).upstream.allow_insecure_http,
                expected,
                "{text}"
            );
        }
        assert_eq!(
            env_error(&[("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", "yes")]),
            r#"IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP (environment): expected true, false, 1 or 0, got "yes""#
        );
        assert_eq!(
            file_error("[upstream]\nallow_insecure_http = \"true\""),
            format!(
                "upstream.allow_insecure_http in {FILE}: expected true or false (unquoted), got a string"
            )
        );
    }

    #[test]
    fn other_scalars() {
        assert_eq!(
            env_error(&[("IDMATCH_LISTEN", "localhost:8080")]),
            r#"IDMATCH_LISTEN (environment): expected a socket address like 127.0.0.1:8080 or [::]:8080, got "localhost:8080""#
        );
        assert_eq!(
            file_error("[upstream]\nroots = \"system\""),
            format!(r#"upstream.roots in {FILE}: expected webpki or native, got "system""#)
        );
    }

    #[test]
    fn file_values_must_have_the_right_toml_type() {
        assert_eq!(
            file_error("[token]\nlifetime = 60"),
            format!(
                "token.lifetime in {FILE}: expected whole seconds like 60s or 2m (JWT times have \
                 one-second resolution) as a quoted string, got an integer"
            )
        );
        let message = file_error("[upstream]\nurl = [\"https://api.cm.com\"]");
        assert!(
            message.starts_with(&format!("upstream.url in {FILE}: expected an absolute URL")),
            "{message}"
        );
        assert!(
            message.ends_with("as a quoted string, got an array"),
            "{message}"
        );
        let message = file_error("[upstream.url]\nhost = \"api.cm.com\"");
        assert!(message.ends_with("got a table"), "{message}");
        assert_eq!(
            file_error("upstream = \"https://api.cm.com\""),
            format!("upstream in {FILE}: expected a table, got a string")
        );
    }

    #[test]
    fn unknown_keys_name_file_and_line() {
        let message = file_error("listen = \"127.0.0.1:1\"\n\n[upstream]\nfoo = \"https://x\"\n");
        assert_eq!(
            message,
            format!(
                "{FILE} line 4: unknown key \"upstream.foo\" (expected one of: listen, \
                 admin.listen, drain_delay, shutdown_timeout, worker_threads, upstream.url, \
                 upstream.roots, upstream.ca_file, upstream.allow_insecure_http, \
                 upstream.connect_timeout, upstream.response_timeout, upstream.proxy, \
                 upstream.no_proxy, upstream.replay_buffer_bytes, upstream.max_in_flight, \
                 credentials.key_id, \
                 credentials.key_id_file, credentials.secret_file, credentials.reload_interval, \
                 token.lifetime, token.refresh_before, token.margin, token.backdate, \
                 client.header_timeout, client.idle_timeout, client.max_header_bytes, \
                 client.max_in_flight, client.max_body_bytes, log.format, log.redact_query, \
                 rate_limit.interval, rate_limit.max_wait, rate_limit.max_queued, \
                 rate_limit.replicas, rate_limit.redis_url, rate_limit.redis_password_file, \
                 rate_limit.redis_ca_file, rate_limit.redis_timeout, \
                 callback.listen, callback.forward_url, callback.max_body_bytes, \
                 callback.header_timeout, callback.body_timeout, callback.forward_timeout, \
                 callback.max_in_flight, callback.previous_secret_grace, callback.dedup_ttl, \
                 callback.dedup_max_ids)"
            )
        );
        assert!(file_error("\n[upstreams]\nurl = \"x\"")
            .starts_with(&format!("{FILE} line 2: unknown key \"upstreams\" ")));
        // `upstream.url.host` makes `upstream.url` a table.
        assert!(file_error("upstream.url.host = \"x\"").ends_with("got a table"));
        // A quoted key with a dot is a different key.
        assert!(file_error("\"upstream.url\" = \"https://x\"")
            .starts_with(&format!("{FILE} line 1: unknown key \"upstream.url\" ")));
        // The first problem in the file is reported, not the first in key order.
        assert!(file_error("zz = 1\naa = 2").contains("unknown key \"zz\""));
    }

    #[test]
    fn syntax_errors_are_one_line() {
        let cases = [
            (
                "listen = \"127.0.0.1:8080\"\n[token\nlifetime = \"60s\"\n",
                "line 2: unclosed table, expected `]`",
            ),
            ("listen = \"a\"\nlisten = \"b\"\n", "line 2: duplicate key"),
            (
                "[upstream]\nurl = \n",
                "line 2: string values must be quoted, expected literal string",
            ),
        ];
        for (file, problem) in cases {
            assert_eq!(file_error(file), format!("{FILE} {problem}"));
        }
    }

    #[test]
    fn key_id_is_required_and_non_empty() {
        assert_eq!(
            error(None, &env(&[("IDMATCH_SECRET", SECRET)])),
            "credentials.key_id: required: set IDMATCH_KEY_ID or IDMATCH_KEY_ID_FILE, or \
             credentials.key_id in the config file"
        );
        assert_eq!(
            error(
                Some("[credentials]\nkey_id = \"\""),
                &env(&[("IDMATCH_SECRET", SECRET)])
            ),
            format!("credentials.key_id in {FILE}: expected a non-empty string, got \"\"")
        );
        let id = "clé \"quoted\"";
        assert_eq!(config("", &[("IDMATCH_KEY_ID", id)]).credentials.key_id, id);
    }

    #[test]
    fn secret_is_required_from_exactly_one_source() {
        assert_eq!(
            error(None, &env(&[("IDMATCH_KEY_ID", "k")])),
            "credentials.secret: required: set IDMATCH_SECRET_FILE (preferred) or IDMATCH_SECRET, \
             or credentials.secret_file in the config file"
        );
        assert_eq!(
            env_error(&[("IDMATCH_SECRET_FILE", "/run/secret")]),
            "IDMATCH_SECRET and IDMATCH_SECRET_FILE (environment): both are set; set only one of them"
        );
        assert_eq!(
            env_error(&[("IDMATCH_SECRET", "")]),
            "IDMATCH_SECRET (environment): expected a non-empty string, got \"\""
        );
    }

    #[test]
    fn secret_is_refused_in_the_file() {
        let file = format!("[credentials]\nkey_id = \"k\"\nsecret = \"{SECRET}\"\n");
        let message = error(Some(&file), &env_with(&[]));
        assert_eq!(
            message,
            format!(
                "credentials.secret in {FILE}: the secret is not accepted in the config file \
                 (often a ConfigMap); use credentials.secret_file or set IDMATCH_SECRET_FILE \
                 (preferred) or IDMATCH_SECRET"
            )
        );
        let message = error(
            Some(&format!("credentials = {{ secret = \"{SECRET}\" }}")),
            &env_with(&[]),
        );
        assert!(message.starts_with("credentials.secret in"), "{message}");
    }

    #[test]
    fn environment_replaces_the_files_secret_source() {
        let from_file = temp_file(b"from-file");
        let from_env = temp_file(b"from-env-file");
        let file = format!(
            "[credentials]\nkey_id = \"k\"\nsecret_file = \"{}\"",
            path_of(&from_file)
        );

        let loaded = load(Some(&file), &env(&[])).unwrap();
        assert_eq!(loaded.config.credentials.secret.expose(), b"from-file");
        assert_eq!(
            loaded.config.credentials.secret_file.as_deref(),
            Some(from_file.path())
        );
        assert_eq!(
            origin_of(&loaded, "credentials.secret"),
            &Origin::File(FILE.into())
        );

        let loaded = load(Some(&file), &env(&[("IDMATCH_SECRET", SECRET)])).unwrap();
        assert_eq!(loaded.config.credentials.secret.expose(), SECRET.as_bytes());
        assert_eq!(loaded.config.credentials.secret_file, None);

        let loaded = load(
            Some(&file),
            &env(&[("IDMATCH_SECRET_FILE", path_of(&from_env))]),
        )
        .unwrap();
        assert_eq!(loaded.config.credentials.secret.expose(), b"from-env-file");
        assert_eq!(
            loaded.config.credentials.secret_file.as_deref(),
            Some(from_env.path())
        );
        assert_eq!(
            origin_of(&loaded, "credentials.secret"),
            &Origin::Env("IDMATCH_SECRET_FILE")
        );
    }

    #[test]
    fn secret_file_trailing_line_ending_is_stripped() {
        let cases: [(&[u8], &[u8]); 4] = [
            (b"abc", b"abc"),
            (b"abc\n", b"abc"),
            (b"abc\r\n", b"abc"),
            // Only one line ending: anything else is part of the secret.
            (b" abc \n\n", b" abc \n"),
        ];
        for (contents, expected) in cases {
            let file = temp_file(contents);
            let env = env(&[
                ("IDMATCH_KEY_ID", "k"),
                ("IDMATCH_SECRET_FILE", path_of(&file)),
            ]);
            let secret = load(None, &env).unwrap().config.credentials.secret;
            assert_eq!(secret.expose(), expected, "{contents:?}");
            assert_eq!(secret.len(), expected.len());
        }
    }

    #[test]
    fn bad_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let message = error(
            None,
            &env(&[
                ("IDMATCH_KEY_ID", "k"),
                ("IDMATCH_SECRET_FILE", missing.to_str().unwrap()),
            ]),
        );
        assert_eq!(
            message,
            format!(
                "IDMATCH_SECRET_FILE (environment): cannot read {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        for (contents, problem) in [
            (&b""[..], "is empty"),
            (b"\n", "is empty"),
            (b"\r\n", "is empty"),
            (b"\xff\xfe\n", "is not valid UTF-8"),
        ] {
            let secret = temp_file(contents);
            let file = format!(
                "[credentials]\nkey_id = \"k\"\nsecret_file = \"{}\"",
                path_of(&secret)
            );
            assert_eq!(
                error(Some(&file), &env(&[])),
                format!(
                    "credentials.secret_file in {FILE}: {} {problem}",
                    path_of(&secret)
                )
            );
        }
        assert_eq!(
            env_error(&[("IDMATCH_SECRET", ""), ("IDMATCH_SECRET_FILE", "")]),
            "IDMATCH_SECRET and IDMATCH_SECRET_FILE (environment): both are set; set only one of them"
        );
    }

    #[test]
    fn secret_never_shows() {
        let loaded = load(None, &env_with(&[])).unwrap();
        for shown in [
            format!("{loaded:?}"),
            format!("{:?}", loaded.config),
            format!("{:#?}", loaded.config.credentials),
            loaded.render(),
        ] {
            assert!(!shown.contains(SECRET), "secret leaked: {shown}");
        }
        assert_eq!(
            format!("{:?}", loaded.config.credentials.secret),
            "Secret(<redacted>)"
        );
        assert!(format!("{:?}", loaded.config).contains("Secret(<redacted>)"));
        let row = loaded
            .effective
            .iter()
            .find(|s| s.key == "credentials.secret")
            .unwrap();
        assert_eq!(row.value, format!("<redacted, {} bytes>", SECRET.len()));
    }

    const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nAQIDBA==\n-----END CERTIFICATE-----\n";

    #[test]
    fn oversized_files_are_refused() {
        let big = temp_file(&vec![b'x'; MAX_SECRET_FILE as usize + 1]);
        let env = env(&[
            ("IDMATCH_KEY_ID", "k"),
            ("IDMATCH_SECRET_FILE", path_of(&big)),
        ]);
        assert_eq!(
            error(None, &env),
            format!(
                "IDMATCH_SECRET_FILE (environment): {} is larger than 65536 bytes",
                path_of(&big)
            )
        );
        let exactly = temp_file(&vec![b'x'; MAX_SECRET_FILE as usize]);
        let env = self::env(&[
            ("IDMATCH_KEY_ID", "k"),
            ("IDMATCH_SECRET_FILE", path_of(&exactly)),
        ]);
        assert_eq!(
            load(None, &env).unwrap().config.credentials.secret.len(),
            65536
        );
    }

    #[test]
    fn every_key_is_listed_once() {
        let distinct = Key::ALL.iter().collect::<std::collections::HashSet<_>>();
        assert_eq!(distinct.len(), Key::ALL.len());
    }

    #[test]
    fn ca_file_adds_certificates() {
        let (one, two) = (
            idmatch_mock::TestPki::localhost(),
            idmatch_mock::TestPki::localhost(),
        );
        let bundle = temp_file(format!("# comment\n{}{}", one.ca_pem(), two.ca_pem()).as_bytes());
        let upstream = config("", &[("IDMATCH_UPSTREAM_CA_FILE", path_of(&bundle))]).upstream;
        assert_eq!(upstream.extra_roots, [one.ca_der(), two.ca_der()]);
        assert_eq!(upstream.ca_file.as_deref(), Some(bundle.path()));
        assert_eq!(upstream.roots, Roots::Webpki);
    }

    #[test]
    fn ca_file_certificates_must_decode() {
        // Valid PEM around DER that is no certificate.
        let bundle = temp_file(CERTIFICATE.as_bytes());
        let message = env_error(&[("IDMATCH_UPSTREAM_CA_FILE", path_of(&bundle))]);
        assert!(
            message.starts_with(&format!(
                "IDMATCH_UPSTREAM_CA_FILE (environment): {}: certificate 1 cannot be used as a CA",
                path_of(&bundle)
            )),
            "{message}"
        );
    }

    #[test]
    fn bad_ca_files() {
        let message = env_error(&[("IDMATCH_UPSTREAM_CA_FILE", "/nonexistent/ca.pem")]);
        assert_eq!(
            message,
            "IDMATCH_UPSTREAM_CA_FILE (environment): cannot read /nonexistent/ca.pem: \
             No such file or directory (os error 2)"
        );
        let key_only =
            temp_file(b"-----BEGIN PRIVATE KEY-----\nAQIDBA==\n-----END PRIVATE KEY-----\n");
        let file = format!("[upstream]\nca_file = \"{}\"", path_of(&key_only));
        assert_eq!(
            file_error(&file),
            format!(
                "upstream.ca_file in {FILE}: {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
                path_of(&key_only)
            )
        );
        let truncated = temp_file(b"-----BEGIN CERTIFICATE-----\nAQIDBA==\n");
        let message = env_error(&[("IDMATCH_UPSTREAM_CA_FILE", path_of(&truncated))]);
        assert!(
            message.starts_with(&format!(
                "IDMATCH_UPSTREAM_CA_FILE (environment): {} is not valid PEM: ",
                path_of(&truncated)
            )),
            "{message}"
        );
        assert_eq!(
            env_error(&[("IDMATCH_UPSTREAM_CA_FILE", "")]),
            "IDMATCH_UPSTREAM_CA_FILE (environment): expected a file path, got \"\""
        );
    }

    #[test]
    fn load_reads_the_file() {
        let file = temp_file(b"[credentials]\nkey_id = \"from-disk\"\n");
        let loaded = Config::load(Some(file.path()), &env(&[("IDMATCH_SECRET", SECRET)])).unwrap();
        assert_eq!(loaded.config.credentials.key_id, "from-disk");
        assert_eq!(
            origin_of(&loaded, "credentials.key_id"),
            &Origin::File(file.path().to_owned())
        );
        let message = Config::load(Some(Path::new("/nonexistent.toml")), &env_with(&[]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "config file /nonexistent.toml: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn render_is_an_aligned_table() {
        let loaded = load(
            Some("[upstream]\nroots = \"native\""),
            &env_with(&[("IDMATCH_LISTEN", "0.0.0.0:80")]),
        )
        .unwrap();
        let rendered = loaded.render();
        let lines = rendered.lines().collect::<Vec<_>>();
        assert_eq!(lines.len(), Key::ALL.len() + 1);
        let value_column = lines[0].find("VALUE").unwrap();
        let origin_column = lines[0].find("ORIGIN").unwrap();
        for line in &lines {
            assert_eq!(line.chars().nth(value_column - 1), Some(' '), "{line}");
            assert_ne!(line.chars().nth(value_column), Some(' '), "{line}");
            assert_ne!(line.chars().nth(origin_column), Some(' '), "{line}");
        }
        assert!(lines.contains(&"listen                          0.0.0.0:80                             env IDMATCH_LISTEN"), "{rendered}");
        assert!(rendered.contains(&format!("upstream.roots                  native                                 file {FILE}\n")), "{rendered}");
        assert!(
            rendered.contains(
                "upstream.ca_file                (none)                                 default\n"
            ),
            "{rendered}"
        );
    }

    #[test]
    fn operations_keys_parse() {
        let config = config(
            "drain_delay = \"0s\"\nworker_threads = \"3\"\n\
             [admin]\nlisten = \"0.0.0.0:9000\"\n\
             [client]\nmax_header_bytes = \"32KiB\"\nmax_in_flight = \"7\"\nmax_body_bytes = \"1MiB\"\n\
             [log]\nformat = \"pretty\"\nredact_query = false\n\
             [upstream]\nreplay_buffer_bytes = \"0\"\nmax_in_flight = \"3\"",
            &[],
        );
        assert_eq!(config.admin_listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.drain_delay, Duration::ZERO);
        assert_eq!(config.worker_threads, Some(3));
        assert_eq!(config.client.max_header_bytes, 32 * 1024);
        assert_eq!(config.client.max_in_flight, 7);
        assert_eq!(config.client.max_body_bytes, Some(1 << 20));
        assert_eq!(
            config.log,
            LogSettings {
                format: LogFormat::Pretty,
                redact_query: false
            }
        );
        assert_eq!(config.upstream.replay_buffer_bytes, 0);
        assert_eq!(config.upstream.max_in_flight, 3);

        let defaults = load(None, &env_with(&[])).unwrap().config;
        assert_eq!(defaults.worker_threads, None);
        assert_eq!(defaults.client.max_body_bytes, None);
        assert_eq!(defaults.upstream.replay_buffer_bytes, 64 * 1024);
        assert_eq!(defaults.upstream.max_in_flight, 64);

        for (var, value, wanted) in [
            ("IDMATCH_CLIENT_MAX_HEADER_BYTES", "12kb", "a size in bytes"),
            (
                "IDMATCH_CLIENT_MAX_HEADER_BYTES",
                "4KiB",
                "must be at least 8KiB",
            ),
            ("IDMATCH_CLIENT_MAX_IN_FLIGHT", "0", "a positive integer"),
            (
                "IDMATCH_WORKER_THREADS",
                "many",
                "auto or a positive integer",
            ),
            ("IDMATCH_LOG_FORMAT", "xml", "auto, json or pretty"),
        ] {
            let message = env_error(&[(var, value)]);
            assert!(
                message.starts_with(&format!("{var} (environment): ")),
                "{message}"
            );
            assert!(message.contains(wanted), "{message}");
        }
    }

    #[test]
    fn rate_limit_keys_parse() {
        let defaults = load(None, &env_with(&[])).unwrap().config.rate_limit;
        assert_eq!(defaults.interval, secs(1));
        assert_eq!(defaults.max_wait, secs(5));
        assert_eq!(defaults.max_queued, 128);
        assert_eq!(defaults.replicas, 1);
        assert!(defaults.redis.is_none());
        assert_eq!(defaults.redis_timeout, Duration::from_millis(200));

        let password = temp_file(b"hunter2-redis\n");
        let loaded = load(
            Some(
                "[rate_limit]\ninterval = \"0s\"\nmax_wait = \"1500ms\"\nmax_queued = \"3\"\n\
                 replicas = \"4\"\nredis_url = \"rediss://user@valkey.internal:6380/2\"",
            ),
            &env_with(&[("IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE", path_of(&password))]),
        )
        .unwrap();
        let rate_limit = &loaded.config.rate_limit;
        assert_eq!(rate_limit.interval, Duration::ZERO, "0s turns it off");
        assert_eq!(rate_limit.max_wait, Duration::from_millis(1500));
        assert_eq!((rate_limit.max_queued, rate_limit.replicas), (3, 4));
        let redis = rate_limit.redis.as_ref().unwrap();
        assert_eq!(
            redis.connection.redis_settings().password(),
            Some("hunter2-redis")
        );
        assert_eq!(redis.connection.redis_settings().username(), Some("user"));
        assert_eq!(redis.connection.redis_settings().db(), 2);
        assert!(matches!(
            redis.connection.addr(),
            redis::ConnectionAddr::TcpTls { port: 6380, .. }
        ));
        // The password shows nowhere: not in `check`, not in `Debug`.
        let rendered = loaded.render();
        assert!(
            rendered.contains("rediss://user@valkey.internal:6380/2"),
            "{rendered}"
        );
        assert!(!rendered.contains("hunter2"), "{rendered}");
        assert!(!format!("{:?}", loaded.config).contains("hunter2"));

        for (var, value, wanted) in [
            ("IDMATCH_RATE_LIMIT_INTERVAL", "1", "a duration"),
            ("IDMATCH_RATE_LIMIT_MAX_QUEUED", "0", "a positive integer"),
            ("IDMATCH_RATE_LIMIT_REPLICAS", "-1", "a positive integer"),
            (
                "IDMATCH_RATE_LIMIT_REDIS_TIMEOUT",
                "0s",
                "greater than zero",
            ),
            (
                "IDMATCH_RATE_LIMIT_REDIS_URL",
                "http://valkey:6379",
                "got scheme \"http\"",
            ),
            (
                "IDMATCH_RATE_LIMIT_REDIS_URL",
                "valkey:6379",
                "a redis:// or rediss:// URL",
            ),
            (
                "IDMATCH_RATE_LIMIT_REDIS_URL",
                "rediss://valkey/#insecure",
                "fragment",
            ),
            (
                "IDMATCH_RATE_LIMIT_REDIS_URL",
                "redis://:pw-in-url@valkey:6379",
                "must not contain a password: set rate_limit.redis_password_file",
            ),
        ] {
            let message = env_error(&[(var, value)]);
            assert!(
                message.starts_with(&format!("{var} (environment): ")),
                "{message}"
            );
            assert!(message.contains(wanted), "{message}");
            assert!(!message.contains("pw-in-url"), "{message}");
        }
        let message = env_error(&[
            ("IDMATCH_RATE_LIMIT_REDIS_URL", "redis://valkey:6379"),
            ("IDMATCH_RATE_LIMIT_REDIS_CA_FILE", "/etc/ssl/ca.pem"),
        ]);
        assert_eq!(
            message,
            "IDMATCH_RATE_LIMIT_REDIS_CA_FILE (environment): applies to rediss:// only; \
             rate_limit.redis_url is redis://"
        );
        let not_pem = temp_file(b"not a certificate");
        let message = env_error(&[
            ("IDMATCH_RATE_LIMIT_REDIS_URL", "rediss://valkey:6379"),
            ("IDMATCH_RATE_LIMIT_REDIS_CA_FILE", path_of(&not_pem)),
        ]);
        assert!(message.contains("holds no certificate"), "{message}");
        let message = env_error(&[
            ("IDMATCH_RATE_LIMIT_REDIS_URL", "redis://valkey:6379"),
            (
                "IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE",
                "/nonexistent/password",
            ),
        ]);
        assert!(
            message.starts_with(
                "IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE (environment): cannot read /nonexistent/password"
            ),
            "{message}"
        );
    }

    #[test]
    fn egress_proxy_comes_from_our_key_or_https_proxy_unless_no_proxy_exempts() {
        let proxy_of = |extra: &[(&str, &str)]| {
            load(None, &env_with(extra))
                .unwrap()
                .config
                .upstream
                .proxy
                .map(|p| p.to_string())
        };
        assert_eq!(proxy_of(&[]), None);
        assert_eq!(
            proxy_of(&[("https_proxy", "http://low:1")]).as_deref(),
            Some("http://low:1/")
        );
        assert_eq!(
            proxy_of(&[
                ("HTTPS_PROXY", "http://up:1"),
                ("https_proxy", "http://low:1")
            ])
            .as_deref(),
            Some("http://up:1/")
        );
        assert_eq!(
            proxy_of(&[
                ("IDMATCH_UPSTREAM_PROXY", "http://ours:3128"),
                ("HTTPS_PROXY", "http://up:1")
            ])
            .as_deref(),
            Some("http://ours:3128/")
        );
        for exempt in ["*", "cm.com", ".cm.com", "API.CM.COM", "x, api.cm.com ,y"] {
            assert_eq!(
                proxy_of(&[("HTTPS_PROXY", "http://up:1"), ("NO_PROXY", exempt)]),
                None,
                "{exempt}"
            );
        }
        for not_exempt in ["m.com", "pi.cm.com", "example.com", ""] {
            assert!(
                proxy_of(&[("HTTPS_PROXY", "http://up:1"), ("no_proxy", not_exempt)]).is_some(),
                "{not_exempt}"
            );
        }
        let message = env_error(&[("IDMATCH_UPSTREAM_PROXY", "https://user:hunter2@proxy:3128")]);
        assert!(
            message.starts_with("IDMATCH_UPSTREAM_PROXY (environment): expected an http:// proxy"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
        let shown = load(
            None,
            &env_with(&[("HTTPS_PROXY", "http://user:hunter2@proxy:3128")]),
        )
        .unwrap();
        let row = shown
            .effective
            .iter()
            .find(|s| s.key == "upstream.proxy")
            .unwrap();
        assert_eq!(row.value, "http://user:<redacted>@proxy:3128");
        assert_eq!(row.origin, Origin::Env("HTTPS_PROXY"));
    }

    #[test]
    fn key_id_may_come_from_a_file() {
        let file = temp_file(b"rotating-kid\n");
        let mut env = env(&[
            ("IDMATCH_SECRET", SECRET),
            ("IDMATCH_KEY_ID_FILE", path_of(&file)),
        ]);
        let config = load(None, &env).unwrap().config;
        assert_eq!(config.credentials.key_id, "rotating-kid");
        assert_eq!(config.credentials.key_id_file.as_deref(), Some(file.path()));
        // The environment's choice replaces the file's; both in one layer are refused.
        let both_in_file = format!(
            "[credentials]\nkey_id = \"a\"\nkey_id_file = \"{}\"",
            path_of(&file)
        );
        assert_eq!(
            load(Some(&both_in_file), &env)
                .unwrap()
                .config
                .credentials
                .key_id,
            "rotating-kid"
        );
        env.remove("IDMATCH_KEY_ID_FILE");
        let message = error(Some(&both_in_file), &env);
        assert_eq!(
            message,
            format!("credentials.key_id_file in {FILE}: credentials.key_id is set too; set only one of them")
        );
        env.insert("IDMATCH_KEY_ID".into(), "inline".into());
        env.insert("IDMATCH_KEY_ID_FILE".into(), path_of(&file).into());
        assert_eq!(
            error(None, &env),
            "IDMATCH_KEY_ID and IDMATCH_KEY_ID_FILE (environment): both are set; set only one of them"
        );
    }

    #[test]
    fn a_key_id_equal_to_the_secret_is_refused_without_showing_either() {
        let file = temp_file(SECRET.as_bytes());
        let message = error(
            None,
            &env(&[
                ("IDMATCH_KEY_ID_FILE", path_of(&file)),
                ("IDMATCH_SECRET_FILE", path_of(&file)),
            ]),
        );
        assert!(
            message.starts_with("IDMATCH_KEY_ID_FILE (environment): the key id equals the secret"),
            "{message}"
        );
    }

    #[test]
    fn unknown_variables_are_named_with_the_closest_known_one() {
        let env = env_with(&[
            ("IDMATCH_UPSTREAM_URLL", "https://x"),
            // Its value is the secret: only the name may be shown.
            ("IDMATCH_SECRETT", SECRET),
            ("idmatch_listen", "127.0.0.1:1"),
            ("IDMATCH_SOMETHING_ELSE", "1"),
            ("IDMATCH_CONFIG", "/etc/idmatch/idmatch-proxy.toml"),
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("MATCH_LISTEN", "x"),
        ]);
        let unknown = unknown_variables(&env);
        let shown = unknown.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            shown,
            [
                "IDMATCH_SECRETT (environment): not a setting, ignored; did you mean IDMATCH_SECRET?",
                "IDMATCH_SOMETHING_ELSE (environment): not a setting, ignored",
                "IDMATCH_UPSTREAM_URLL (environment): not a setting, ignored; did you mean \
                 IDMATCH_UPSTREAM_URL?",
                "idmatch_listen (environment): not a setting, ignored; did you mean IDMATCH_LISTEN?",
            ]
        );
        assert!(!format!("{unknown:?}").contains(SECRET));
        // Ignored indeed: the configuration loads as if they were absent.
        assert_eq!(
            load(None, &env).unwrap().config.upstream.url(),
            "https://api.cm.com/mobile-identity/v1"
        );
        assert_eq!(unknown_variables(&env_with(&[])), []);
    }

    #[test]
    fn unknown_file_keys_suggest_the_closest_key() {
        assert_eq!(
            file_error("[upstream]\nconect_timeout = \"1s\""),
            format!("{FILE} line 2: unknown key \"upstream.conect_timeout\" (did you mean upstream.connect_timeout?)")
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(
            closest("lisen", ["listen", "log.format"].into_iter()),
            Some("listen")
        );
        assert_eq!(closest("foo", ["listen", "log.format"].into_iter()), None);
        assert_eq!(closest("upstream.foo", ["upstream.url"].into_iter()), None);
    }

    #[test]
    fn an_empty_config_variable_is_a_config_error() {
        let message = Config::load(None, &env_with(&[("IDMATCH_CONFIG", "")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "IDMATCH_CONFIG (environment): expected the path of a TOML config file, got \"\""
        );
        let file = temp_file(b"[credentials]\nkey_id = \"from-variable\"\n");
        let env = env(&[
            ("IDMATCH_CONFIG", path_of(&file)),
            ("IDMATCH_SECRET", SECRET),
        ]);
        let loaded = Config::load(None, &env).unwrap();
        assert_eq!(loaded.config.credentials.key_id, "from-variable");
        // `--config` wins over the variable.
        let flag = temp_file(b"[credentials]\nkey_id = \"from-flag\"\n");
        let loaded = Config::load(Some(flag.path()), &env).unwrap();
        assert_eq!(loaded.config.credentials.key_id, "from-flag");
    }

    #[test]
    fn paths_in_the_file_are_relative_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pki = idmatch_mock::TestPki::localhost();
        fs::create_dir(dir.path().join("conf")).unwrap();
        fs::write(dir.path().join("conf/secret"), "relative-secret\n").unwrap();
        fs::write(dir.path().join("kid"), "relative-kid\n").unwrap();
        fs::write(dir.path().join("conf/ca.pem"), pki.ca_pem()).unwrap();
        let file = dir.path().join("conf/idmatch-proxy.toml");
        fs::write(
            &file,
            "[upstream]\nca_file = \"ca.pem\"\n\
             [credentials]\nsecret_file = \"secret\"\nkey_id_file = \"../kid\"\n",
        )
        .unwrap();
        let loaded = Config::load(Some(&file), &HashMap::new()).unwrap();
        let config = &loaded.config;
        let conf = dir.path().join("conf");
        assert_eq!(config.credentials.secret.expose(), b"relative-secret");
        assert_eq!(config.credentials.secret_file, Some(conf.join("secret")));
        assert_eq!(config.credentials.key_id, "relative-kid");
        assert_eq!(config.credentials.key_id_file, Some(conf.join("../kid")));
        assert_eq!(config.upstream.ca_file, Some(conf.join("ca.pem")));
        assert_eq!(config.upstream.extra_roots, [pki.ca_der()]);
        // `check` shows where each file was read from.
        let rendered = loaded.render();
        let shown = conf.join("secret").display().to_string();
        assert!(rendered.contains(&shown), "{rendered}");

        // A relative config path gives paths relative to the working directory (the crate's,
        // under cargo test), through the file's directory.
        let dev = Config::from_parts(
            Some((
                Path::new("config/dev.toml"),
                "[credentials]\nkey_id = \"k\"\nsecret_file = \"dev-secret\"",
            )),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            dev.config.credentials.secret_file.as_deref(),
            Some(Path::new("config/dev-secret"))
        );

        // The environment's paths are taken as they are, even beside a file.
        let env = env(&[("IDMATCH_SECRET_FILE", "config/dev-secret")]);
        let loaded = Config::load(Some(&file), &env).unwrap();
        assert_eq!(
            loaded.config.credentials.secret_file.as_deref(),
            Some(Path::new("config/dev-secret"))
        );
        // An absolute path in the file is kept.
        let absolute = conf.join("secret");
        let text = format!(
            "[credentials]\nkey_id = \"k\"\nsecret_file = {:?}",
            absolute.to_str().unwrap()
        );
        assert_eq!(
            load(Some(&text), &HashMap::new())
                .unwrap()
                .config
                .credentials
                .secret_file,
            Some(absolute)
        );
    }

    /// `cargo run -- --config config/dev.toml` against `cargo run -p idmatch-mock` with its
    /// defaults, from the repository's root.
    #[test]
    fn the_development_config_matches_the_mock() {
        let dev = Path::new("config/dev.toml");
        let text = fs::read_to_string(dev).unwrap();
        let mut layers = Layers::default();
        layers.read_file(dev, &text).unwrap();
        // Where the mock writes its CA (`--ca-out`, default target/mock-ca.pem), which need not
        // exist yet: the path alone, then a stand-in CA to load the rest.
        assert_eq!(
            layers.path(Key::UpstreamCaFile).unwrap(),
            Some(PathBuf::from("config/../target/mock-ca.pem"))
        );
        let ca = temp_file(idmatch_mock::TestPki::localhost().ca_pem().as_bytes());
        let env = env(&[("IDMATCH_UPSTREAM_CA_FILE", path_of(&ca))]);
        let config = Config::load(Some(dev), &env).unwrap().config;
        assert_eq!(
            config.upstream.url(),
            "https://127.0.0.1:8443/mobile-identity/v1"
        );
        assert_eq!(config.credentials.key_id, "dev-key-id");
        assert_eq!(
            config.credentials.secret.expose(),
            b"dev-secret-not-for-production"
        );
        assert_eq!(config.drain_delay, Duration::ZERO);
    }

    #[test]
    fn the_callback_listener_needs_both_its_addresses() {
        assert_eq!(config("", &[]).callback, None);
        let on = config(
            "[callback]\nforward_url = \"http://app.internal:3000/cm/\"",
            &[("IDMATCH_CALLBACK_LISTEN", "0.0.0.0:8082")],
        );
        let callback = on.callback.unwrap();
        assert_eq!(callback.listen, "0.0.0.0:8082".parse().unwrap());
        assert_eq!(callback.forward.to_string(), "http://app.internal:3000/cm");
        assert_eq!(callback.max_body_bytes, 64 * 1024);
        assert_eq!(callback.previous_secret_grace, secs(300));
        assert_eq!(callback.dedup_ttl, secs(3600));
        assert_eq!(callback.dedup_max_ids, 10_000);

        let message = env_error(&[("IDMATCH_CALLBACK_LISTEN", "0.0.0.0:8082")]);
        assert!(
            message.starts_with(
                "IDMATCH_CALLBACK_LISTEN (environment): is set, so IDMATCH_CALLBACK_FORWARD_URL"
            ),
            "{message}"
        );
        let message = env_error(&[("IDMATCH_CALLBACK_FORWARD_URL", "http://app")]);
        assert!(
            message.starts_with(
                "IDMATCH_CALLBACK_FORWARD_URL (environment): is set but IDMATCH_CALLBACK_LISTEN"
            ),
            "{message}"
        );
        let message = env_error(&[
            ("IDMATCH_CALLBACK_LISTEN", "0.0.0.0:8082"),
            ("IDMATCH_CALLBACK_FORWARD_URL", "ftp://app"),
        ]);
        assert_eq!(
            message,
            "IDMATCH_CALLBACK_FORWARD_URL (environment): expected an http(s) URL, got scheme \"ftp\""
        );
        // Checked with the listener off too.
        let message = file_error("[callback]\nmax_body_bytes = \"lots\"");
        assert!(message.contains("callback.max_body_bytes in"), "{message}");
    }
}
