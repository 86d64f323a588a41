//! The key table: every setting's file key, environment variable and default.

use super::parse::*;
use super::*;

/// Every setting, described by [`Key::spec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Key {
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

pub(super) struct Spec {
    /// Dotted key in the TOML file.
    pub(super) name: &'static str,
    pub(super) env: &'static str,
    pub(super) default: Option<&'static str>,
    pub(super) toml: Toml,
}

/// What the key must be in the TOML file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Toml {
    /// A quoted string, described as the text says.
    Str(&'static str),
    Bool,
    /// Not accepted in the file at all.
    Forbidden,
}

impl Key {
    /// The order of `Loaded::effective`, as in the example file.
    pub(super) const ALL: [Key; 49] = [
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
    pub(super) fn spec(self) -> Spec {
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

    pub(super) fn name(self) -> &'static str {
        self.spec().name
    }

    pub(super) fn env(self) -> &'static str {
        self.spec().env
    }

    /// What the key's value must be, as its row describes it.
    pub(super) fn expects(self) -> &'static str {
        match self.spec().toml {
            Toml::Str(what) => what,
            Toml::Bool => "true or false",
            Toml::Forbidden => TEXT,
        }
    }

    /// The key as the operator wrote it, e.g. `token.lifetime in /etc/x.toml`.
    pub(super) fn describe(self, origin: &Origin) -> String {
        match origin {
            Origin::Default => format!("{} (default)", self.name()),
            Origin::File(path) => format!("{} in {}", self.name(), path.display()),
            Origin::Env(var) => format!("{var} (environment)"),
        }
    }
}

/// Variables that other tools also honour, read when ours is unset; first found wins.
pub(super) fn fallback_env(key: Key) -> &'static [&'static str] {
    match key {
        Key::UpstreamProxy => &["HTTPS_PROXY", "https_proxy"],
        Key::UpstreamNoProxy => &["NO_PROXY", "no_proxy"],
        _ => &[],
    }
}
