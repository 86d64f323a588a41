//! The key table: one row per setting, and all the loader knows about it.
//!
//! A row names the key in the file and in the environment, gives its default, its parser
//! (which also says what the file must hold), and how `idmatch-proxy check` shows it. The
//! loader, the effective configuration and the unknown-key warnings all walk [`Key::ALL`]; only
//! building [`Config`] names keys one by one. Adding a setting is thus its row here and the field
//! it fills in `Layers::build`.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use super::parse::*;
use super::{CallbackSettings, Config, ForwardUrl, LogFormat, Origin, Redis, Roots, Secret};

/// What the loader needs of every key, whatever its type.
pub(super) struct Key {
    /// Dotted key in the TOML file.
    pub name: &'static str,
    pub env: &'static str,
    /// Variables that other tools also honour, read when `env` is unset; first found wins.
    pub fallback_env: &'static [&'static str],
    pub default: Option<&'static str>,
    pub toml: Toml,
    /// The value as `check` shows it; `None` when [`Config`] does not hold it, to show the
    /// text as written (or the default).
    pub show: fn(&Config) -> Option<String>,
}

/// A key and the parser of its value: what `Layers::value` and friends take.
pub(super) struct Row<T> {
    key: Key,
    pub parse: fn(&str) -> Result<T, String>,
}

impl<T> Deref for Row<T> {
    type Target = Key;

    fn deref(&self) -> &Key {
        &self.key
    }
}

const fn row<T>(
    name: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    parser: Parser<T>,
    show: fn(&Config) -> Option<String>,
) -> Row<T> {
    let key = Key {
        name,
        env,
        fallback_env: &[],
        default,
        toml: parser.toml,
        show,
    };
    Row {
        key,
        parse: parser.parse,
    }
}

impl<T> Row<T> {
    const fn or_env(mut self, names: &'static [&'static str]) -> Self {
        self.key.fallback_env = names;
        self
    }
}

impl Key {
    /// The key as the operator wrote it, e.g. `token.lifetime in /etc/x.toml`.
    pub(super) fn describe(&self, origin: &Origin) -> String {
        match origin {
            Origin::Default => format!("{} (default)", self.name),
            Origin::File(path) => format!("{} in {}", self.name, path.display()),
            Origin::Env(var) => format!("{var} (environment)"),
        }
    }
}

/// Declares each row as a constant, and [`Key::ALL`] listing them in order.
macro_rules! table {
    ($($(#[$doc:meta])* $name:ident: $type:ty = $row:expr;)*) => {
        $($(#[$doc])* pub(super) const $name: Row<$type> = $row;)*

        impl Key {
            /// The order of `Loaded::effective`, as in the example file.
            pub(super) const ALL: &'static [&'static Key] = &[$(&$name.key),*];
        }
    };
}

// NAME: parsed type = row(file key, environment variable, default, parser,
//     shown by `check`);
table! {
    LISTEN: SocketAddr = row("listen", "IDMATCH_LISTEN", Some("127.0.0.1:8080"), SOCKET_ADDR,
        |c| Some(c.listen.to_string()));
    ADMIN_LISTEN: SocketAddr = row("admin.listen", "IDMATCH_ADMIN_LISTEN", Some("127.0.0.1:9901"), SOCKET_ADDR,
        |c| Some(c.admin_listen.to_string()));
    DRAIN_DELAY: Duration = row("drain_delay", "IDMATCH_DRAIN_DELAY", Some("5s"), DURATION_OR_ZERO,
        |c| Some(show_duration(c.drain_delay)));
    SHUTDOWN_TIMEOUT: Duration = row("shutdown_timeout", "IDMATCH_SHUTDOWN_TIMEOUT", Some("20s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.shutdown_timeout)));
    WORKER_THREADS: Option<usize> = row("worker_threads", "IDMATCH_WORKER_THREADS", Some("auto"), THREAD_COUNT,
        |c| Some(c.worker_threads.map_or_else(|| "auto".into(), |n| n.to_string())));
    UPSTREAM_URL: BaseUrl = row("upstream.url", "IDMATCH_UPSTREAM_URL", Some("https://api.cm.com/mobile-identity/v1"), BASE_URL,
        |c| Some(c.upstream.url()));
    UPSTREAM_ROOTS: Roots = row("upstream.roots", "IDMATCH_UPSTREAM_ROOTS", Some("webpki"), ROOT_STORE,
        |c| Some(c.upstream.roots.to_string()));
    UPSTREAM_CA_FILE: PathBuf = row("upstream.ca_file", "IDMATCH_UPSTREAM_CA_FILE", None, FILE_PATH,
        |c| shown_path(c.upstream.ca_file.as_deref()));
    UPSTREAM_ALLOW_INSECURE_HTTP: bool = row("upstream.allow_insecure_http", "IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", Some("false"), BOOL,
        |c| Some(c.upstream.allow_insecure_http.to_string()));
    UPSTREAM_CONNECT_TIMEOUT: Duration = row("upstream.connect_timeout", "IDMATCH_UPSTREAM_CONNECT_TIMEOUT", Some("5s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.upstream.connect_timeout)));
    UPSTREAM_RESPONSE_TIMEOUT: Duration = row("upstream.response_timeout", "IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", Some("30s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.upstream.response_timeout)));
    UPSTREAM_PROXY: Uri = row("upstream.proxy", "IDMATCH_UPSTREAM_PROXY", None, HTTP_PROXY,
        |c| Some(c.upstream.proxy.as_ref().map_or_else(|| "(none)".into(), redacted_proxy))).or_env(&["HTTPS_PROXY", "https_proxy"]);
    // Only decides `upstream.proxy` (the upstream is fixed), so shown as written.
    UPSTREAM_NO_PROXY: String = row("upstream.no_proxy", "IDMATCH_UPSTREAM_NO_PROXY", None, HOST_LIST,
        |_| None).or_env(&["NO_PROXY", "no_proxy"]);
    UPSTREAM_REPLAY_BUFFER_BYTES: usize = row("upstream.replay_buffer_bytes", "IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES", Some("64KiB"), BYTES,
        |c| Some(c.upstream.replay_buffer_bytes.to_string()));
    UPSTREAM_MAX_IN_FLIGHT: usize = row("upstream.max_in_flight", "IDMATCH_UPSTREAM_MAX_IN_FLIGHT", Some("64"), POSITIVE,
        |c| Some(c.upstream.max_in_flight.to_string()));
    UPSTREAM_HTTP2: bool = row("upstream.http2", "IDMATCH_UPSTREAM_HTTP2", Some("true"), BOOL,
        |c| Some(c.upstream.http2.to_string()));
    UPSTREAM_KEEP_WARM: Duration = row("upstream.keep_warm", "IDMATCH_UPSTREAM_KEEP_WARM", Some("10m"), DURATION_OR_ZERO,
        |c| Some(show_duration(c.upstream.keep_warm)));
    UPSTREAM_IDLE_TIMEOUT: Duration = row("upstream.idle_timeout", "IDMATCH_UPSTREAM_IDLE_TIMEOUT", Some("30s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.upstream.idle_timeout)));
    UPSTREAM_PING_INTERVAL: Duration = row("upstream.ping_interval", "IDMATCH_UPSTREAM_PING_INTERVAL", Some("0s"), DURATION_OR_ZERO,
        |c| Some(show_duration(c.upstream.ping_interval)));
    UPSTREAM_PING_TIMEOUT: Duration = row("upstream.ping_timeout", "IDMATCH_UPSTREAM_PING_TIMEOUT", Some("20s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.upstream.ping_timeout)));
    CREDENTIALS_KEY_ID: String = row("credentials.key_id", "IDMATCH_KEY_ID", None, NON_EMPTY,
        |c| Some(c.credentials.key_id.clone()));
    CREDENTIALS_KEY_ID_FILE: PathBuf = row("credentials.key_id_file", "IDMATCH_KEY_ID_FILE", None, FILE_PATH,
        |c| shown_path(c.credentials.key_id_file.as_deref()));
    CREDENTIALS_SECRET_FILE: PathBuf = row("credentials.secret_file", "IDMATCH_SECRET_FILE", None, FILE_PATH,
        |c| shown_path(c.credentials.secret_file.as_deref()));
    // Never in the file: a config file is usually a ConfigMap, readable by far more people than a Secret.
    CREDENTIALS_SECRET: Secret = row("credentials.secret", "IDMATCH_SECRET", None, INLINE_SECRET,
        |c| Some(format!("<redacted, {} bytes>", c.credentials.secret.len())));
    CREDENTIALS_RELOAD_INTERVAL: Duration = row("credentials.reload_interval", "IDMATCH_CREDENTIALS_RELOAD_INTERVAL", Some("10s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.credentials.reload_interval)));
    TOKEN_LIFETIME: Duration = row("token.lifetime", "IDMATCH_TOKEN_LIFETIME", Some("60s"), LIFETIME_SECONDS,
        |c| Some(show_duration(c.token.lifetime)));
    TOKEN_REFRESH_BEFORE: Duration = row("token.refresh_before", "IDMATCH_TOKEN_REFRESH_BEFORE", Some("15s"), REFRESH_SECONDS,
        |c| Some(show_duration(c.token.refresh_before)));
    TOKEN_MARGIN: Duration = row("token.margin", "IDMATCH_TOKEN_MARGIN", Some("5s"), MARGIN_DURATION,
        |c| Some(show_duration(c.token.margin)));
    TOKEN_BACKDATE: Duration = row("token.backdate", "IDMATCH_TOKEN_BACKDATE", Some("5s"), BACKDATE_SECONDS,
        |c| Some(show_duration(c.token.backdate)));
    CLIENT_HEADER_TIMEOUT: Duration = row("client.header_timeout", "IDMATCH_CLIENT_HEADER_TIMEOUT", Some("10s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.client.header_timeout)));
    CLIENT_IDLE_TIMEOUT: Duration = row("client.idle_timeout", "IDMATCH_CLIENT_IDLE_TIMEOUT", Some("60s"), POSITIVE_DURATION,
        |c| Some(show_duration(c.client.idle_timeout)));
    CLIENT_MAX_HEADER_BYTES: usize = row("client.max_header_bytes", "IDMATCH_CLIENT_MAX_HEADER_BYTES", Some("16KiB"), HEADER_BYTES,
        |c| Some(c.client.max_header_bytes.to_string()));
    CLIENT_MAX_IN_FLIGHT: usize = row("client.max_in_flight", "IDMATCH_CLIENT_MAX_IN_FLIGHT", Some("1024"), POSITIVE,
        |c| Some(c.client.max_in_flight.to_string()));
    CLIENT_MAX_BODY_BYTES: u64 = row("client.max_body_bytes", "IDMATCH_CLIENT_MAX_BODY_BYTES", None, BODY_BYTES,
        |c| Some(c.client.max_body_bytes.map_or_else(|| "(no limit)".into(), |n| n.to_string())));
    LOG_FORMAT: LogFormat = row("log.format", "IDMATCH_LOG_FORMAT", Some("auto"), FORMAT,
        |c| Some(c.log.format.to_string()));
    LOG_REDACT_QUERY: bool = row("log.redact_query", "IDMATCH_LOG_REDACT_QUERY", Some("true"), BOOL,
        |c| Some(c.log.redact_query.to_string()));
    RATE_LIMIT_INTERVAL: Duration = row("rate_limit.interval", "IDMATCH_RATE_LIMIT_INTERVAL", Some("1s"), DURATION_OR_ZERO,
        |c| Some(show_duration(c.rate_limit.interval)));
    RATE_LIMIT_MAX_WAIT: Duration = row("rate_limit.max_wait", "IDMATCH_RATE_LIMIT_MAX_WAIT", Some("5s"), DURATION_OR_ZERO,
        |c| Some(show_duration(c.rate_limit.max_wait)));
    RATE_LIMIT_MAX_QUEUED: usize = row("rate_limit.max_queued", "IDMATCH_RATE_LIMIT_MAX_QUEUED", Some("128"), POSITIVE,
        |c| Some(c.rate_limit.max_queued.to_string()));
    RATE_LIMIT_REPLICAS: u32 = row("rate_limit.replicas", "IDMATCH_RATE_LIMIT_REPLICAS", Some("1"), REPLICAS,
        |c| Some(c.rate_limit.replicas.to_string()));
    RATE_LIMIT_REDIS_URL: RedisUrl = row("rate_limit.redis_url", "IDMATCH_RATE_LIMIT_REDIS_URL", None, REDIS_STORE,
        |c| Some(redis(c).map_or_else(|| "(none)".into(), |r| r.url.clone())));
    RATE_LIMIT_REDIS_PASSWORD_FILE: PathBuf = row("rate_limit.redis_password_file", "IDMATCH_RATE_LIMIT_REDIS_PASSWORD_FILE", None, FILE_PATH,
        |c| shown_path(redis(c).and_then(|r| r.password_file.as_deref())));
    RATE_LIMIT_REDIS_CA_FILE: PathBuf = row("rate_limit.redis_ca_file", "IDMATCH_RATE_LIMIT_REDIS_CA_FILE", None, FILE_PATH,
        |c| shown_path(redis(c).and_then(|r| r.ca.as_ref()).map(|(file, _)| file.as_path())));
    RATE_LIMIT_REDIS_TIMEOUT: Duration = row("rate_limit.redis_timeout", "IDMATCH_RATE_LIMIT_REDIS_TIMEOUT", Some("200ms"), POSITIVE_DURATION,
        |c| Some(show_duration(c.rate_limit.redis_timeout)));
    // With the listener off, `Config` holds no `callback.*` value: they are shown as written.
    CALLBACK_LISTEN: SocketAddr = row("callback.listen", "IDMATCH_CALLBACK_LISTEN", None, SOCKET_ADDR,
        |c| callback(c).map(|cb| cb.listen.to_string()));
    CALLBACK_FORWARD_URL: ForwardUrl = row("callback.forward_url", "IDMATCH_CALLBACK_FORWARD_URL", None, APP_URL,
        |c| callback(c).map(|cb| cb.forward.to_string()));
    CALLBACK_MAX_BODY_BYTES: u64 = row("callback.max_body_bytes", "IDMATCH_CALLBACK_MAX_BODY_BYTES", Some("64KiB"), BODY_BYTES,
        |c| callback(c).map(|cb| cb.max_body_bytes.to_string()));
    CALLBACK_HEADER_TIMEOUT: Duration = row("callback.header_timeout", "IDMATCH_CALLBACK_HEADER_TIMEOUT", Some("10s"), POSITIVE_DURATION,
        |c| callback(c).map(|cb| show_duration(cb.header_timeout)));
    CALLBACK_BODY_TIMEOUT: Duration = row("callback.body_timeout", "IDMATCH_CALLBACK_BODY_TIMEOUT", Some("10s"), POSITIVE_DURATION,
        |c| callback(c).map(|cb| show_duration(cb.body_timeout)));
    CALLBACK_FORWARD_TIMEOUT: Duration = row("callback.forward_timeout", "IDMATCH_CALLBACK_FORWARD_TIMEOUT", Some("10s"), POSITIVE_DURATION,
        |c| callback(c).map(|cb| show_duration(cb.forward_timeout)));
    CALLBACK_MAX_IN_FLIGHT: usize = row("callback.max_in_flight", "IDMATCH_CALLBACK_MAX_IN_FLIGHT", Some("64"), POSITIVE,
        |c| callback(c).map(|cb| cb.max_in_flight.to_string()));
    CALLBACK_PREVIOUS_SECRET_GRACE: Duration = row("callback.previous_secret_grace", "IDMATCH_CALLBACK_PREVIOUS_SECRET_GRACE", Some("5m"), DURATION_OR_ZERO,
        |c| callback(c).map(|cb| show_duration(cb.previous_secret_grace)));
    CALLBACK_DEDUP_TTL: Duration = row("callback.dedup_ttl", "IDMATCH_CALLBACK_DEDUP_TTL", Some("1h"), DURATION_OR_ZERO,
        |c| callback(c).map(|cb| show_duration(cb.dedup_ttl)));
    CALLBACK_DEDUP_MAX_IDS: usize = row("callback.dedup_max_ids", "IDMATCH_CALLBACK_DEDUP_MAX_IDS", Some("10000"), POSITIVE,
        |c| callback(c).map(|cb| cb.dedup_max_ids.to_string()));
}

/// The key id and the secret each come from exactly one source, inline or a file: `(inline,
/// file)`.
pub(super) const ONE_SOURCE: [(&Key, &Key); 2] = [
    (&CREDENTIALS_KEY_ID.key, &CREDENTIALS_KEY_ID_FILE.key),
    (&CREDENTIALS_SECRET.key, &CREDENTIALS_SECRET_FILE.key),
];

fn shown_path(path: Option<&Path>) -> Option<String> {
    Some(path.map_or_else(|| "(none)".into(), |p| p.display().to_string()))
}

fn redis(config: &Config) -> Option<&Redis> {
    config.rate_limit.redis.as_ref()
}

fn callback(config: &Config) -> Option<&CallbackSettings> {
    config.callback.as_ref()
}
