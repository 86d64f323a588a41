//! Building [`Config`] from the layers: each key read typed, the rules between keys, then the
//! files the settings name; and the effective configuration that `check` shows.

use std::path::PathBuf;
use std::time::Duration;

use http::uri::Scheme;

use super::files::{read_ca_file, read_certificates, read_credential, read_key_id, read_secret};
use super::keys::*;
use super::layers::Layers;
use super::parse::{no_proxy_matches, show_duration};
use super::*;

impl Layers {
    pub(super) fn build(&self) -> Result<Config, ConfigError> {
        let listen = self.value(&LISTEN)?;
        let (scheme, authority, base_path) = self.value(&UPSTREAM_URL)?;
        let allow_insecure_http = self.value(&UPSTREAM_ALLOW_INSECURE_HTTP)?;
        // Checked only now: the two keys may come from different layers.
        if scheme == Scheme::HTTP && !allow_insecure_http {
            let problem = format!(
                "http:// would send the bearer token in clear; use https, or for local testing \
                 set {}=true ({} = true in the config file)",
                UPSTREAM_ALLOW_INSECURE_HTTP.env, UPSTREAM_ALLOW_INSECURE_HTTP.name,
            );
            return Err(self.error(&UPSTREAM_URL, problem));
        }
        let roots = self.value(&UPSTREAM_ROOTS)?;
        let connect_timeout = self.value(&UPSTREAM_CONNECT_TIMEOUT)?;
        let response_timeout = self.value(&UPSTREAM_RESPONSE_TIMEOUT)?;
        let proxy = self.optional(&UPSTREAM_PROXY)?;
        let no_proxy = self.optional(&UPSTREAM_NO_PROXY)?;
        // The upstream is fixed, so NO_PROXY is decided once, here.
        let proxy = proxy.filter(|_| {
            !no_proxy
                .as_deref()
                .is_some_and(|list| no_proxy_matches(list, authority.host()))
        });
        let replay_buffer_bytes = self.value(&UPSTREAM_REPLAY_BUFFER_BYTES)?;
        let max_in_flight = self.value(&UPSTREAM_MAX_IN_FLIGHT)?;
        let reload_interval = self.value(&CREDENTIALS_RELOAD_INTERVAL)?;
        let token = TokenSettings {
            lifetime: self.value(&TOKEN_LIFETIME)?,
            refresh_before: self.value(&TOKEN_REFRESH_BEFORE)?,
            margin: self.value(&TOKEN_MARGIN)?,
            backdate: self.value(&TOKEN_BACKDATE)?,
        };
        self.validate(&token)?;
        let shutdown_timeout = self.value(&SHUTDOWN_TIMEOUT)?;
        let admin_listen = self.value(&ADMIN_LISTEN)?;
        let drain_delay = self.value(&DRAIN_DELAY)?;
        let worker_threads = self.value(&WORKER_THREADS)?;
        let client = ClientLimits {
            header_timeout: self.value(&CLIENT_HEADER_TIMEOUT)?,
            idle_timeout: self.value(&CLIENT_IDLE_TIMEOUT)?,
            max_header_bytes: self.value(&CLIENT_MAX_HEADER_BYTES)?,
            max_in_flight: self.value(&CLIENT_MAX_IN_FLIGHT)?,
            max_body_bytes: self.optional(&CLIENT_MAX_BODY_BYTES)?,
        };
        let log = LogSettings {
            format: self.value(&LOG_FORMAT)?,
            redact_query: self.value(&LOG_REDACT_QUERY)?,
        };
        let replicas = self.value(&RATE_LIMIT_REPLICAS)?;
        let mut rate_limit = RateLimit {
            interval: self.value(&RATE_LIMIT_INTERVAL)?,
            max_wait: self.value(&RATE_LIMIT_MAX_WAIT)?,
            max_queued: self.value(&RATE_LIMIT_MAX_QUEUED)?,
            replicas,
            redis: None,
            redis_timeout: self.value(&RATE_LIMIT_REDIS_TIMEOUT)?,
        };
        let redis_url = self.optional(&RATE_LIMIT_REDIS_URL)?;
        let callback = self.callback()?;

        // Files last, once everything they could be wasted on is known to be valid.
        let ca_file = self.path(&UPSTREAM_CA_FILE)?;
        let extra_roots = match &ca_file {
            Some(file) => read_certificates(file).map_err(|p| self.error(&UPSTREAM_CA_FILE, p))?,
            None => Vec::new(),
        };
        let (secret, secret_file) = self.secret()?;
        let (key_id, key_id_file) = self.key_id()?;
        if let Some((url, connection)) = redis_url {
            rate_limit.redis = Some(self.redis(url, connection)?);
        }
        // A key id file pointed at the secret would put the secret in every token's header.
        if key_id.as_bytes() == secret.expose() {
            let key: &Key = match key_id_file {
                Some(_) => &CREDENTIALS_KEY_ID_FILE,
                None => &CREDENTIALS_KEY_ID,
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
                http2: self.value(&UPSTREAM_HTTP2)?,
                keep_warm: self.value(&UPSTREAM_KEEP_WARM)?,
                idle_timeout: self.value(&UPSTREAM_IDLE_TIMEOUT)?,
                ping_interval: self.value(&UPSTREAM_PING_INTERVAL)?,
                ping_timeout: self.value(&UPSTREAM_PING_TIMEOUT)?,
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
        let password_file = self.path(&RATE_LIMIT_REDIS_PASSWORD_FILE)?;
        let connection = match &password_file {
            Some(file) => {
                let password = read_credential(file)
                    .map_err(|p| self.error(&RATE_LIMIT_REDIS_PASSWORD_FILE, p))?;
                let password = String::from_utf8(password).expect("read_credential checks UTF-8");
                let settings = connection.redis_settings().clone().set_password(password);
                connection.set_redis_settings(settings)
            }
            None => connection,
        };
        let ca = match self.path(&RATE_LIMIT_REDIS_CA_FILE)? {
            Some(_) if !matches!(connection.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
                return Err(self.error(
                    &RATE_LIMIT_REDIS_CA_FILE,
                    format!(
                        "applies to rediss:// only; {} is redis://",
                        RATE_LIMIT_REDIS_URL.name
                    ),
                ));
            }
            Some(file) => {
                let error = |p| self.error(&RATE_LIMIT_REDIS_CA_FILE, p);
                // Checked as the upstream's CA file is; the store's client takes the PEM.
                read_certificates(&file).map_err(error)?;
                let pem = read_ca_file(&file).map_err(error)?;
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
        // Checked even with the listener off, as every other key is: a typo surfaces now rather
        // than on the day the listener is turned on.
        let max_body_bytes = self.value(&CALLBACK_MAX_BODY_BYTES)?;
        let header_timeout = self.value(&CALLBACK_HEADER_TIMEOUT)?;
        let body_timeout = self.value(&CALLBACK_BODY_TIMEOUT)?;
        let forward_timeout = self.value(&CALLBACK_FORWARD_TIMEOUT)?;
        let max_in_flight = self.value(&CALLBACK_MAX_IN_FLIGHT)?;
        let previous_secret_grace = self.value(&CALLBACK_PREVIOUS_SECRET_GRACE)?;
        let dedup_ttl = self.value(&CALLBACK_DEDUP_TTL)?;
        let dedup_max_ids = self.value(&CALLBACK_DEDUP_MAX_IDS)?;
        let listen = self.optional(&CALLBACK_LISTEN)?;
        let forward = self.optional(&CALLBACK_FORWARD_URL)?;
        let (listen, forward) = match (listen, forward) {
            (None, None) => return Ok(None),
            (Some(listen), Some(forward)) => (listen, forward),
            (Some(_), None) => {
                let problem = format!(
                    "is set, so {} ({} in the config file) must name the app that receives the \
                     verified callbacks",
                    CALLBACK_FORWARD_URL.env, CALLBACK_FORWARD_URL.name,
                );
                return Err(self.error(&CALLBACK_LISTEN, problem));
            }
            (None, Some(_)) => {
                let problem = format!(
                    "is set but {} ({} in the config file) is not: no callback would arrive",
                    CALLBACK_LISTEN.env, CALLBACK_LISTEN.name,
                );
                return Err(self.error(&CALLBACK_FORWARD_URL, problem));
            }
        };
        Ok(Some(CallbackSettings {
            listen,
            forward,
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
        if let Some(file) = self.path(&CREDENTIALS_KEY_ID_FILE)? {
            let key_id = read_key_id(&file).map_err(|p| self.error(&CREDENTIALS_KEY_ID_FILE, p))?;
            return Ok((key_id, Some(file)));
        }
        let key_id = self.optional(&CREDENTIALS_KEY_ID)?.ok_or_else(|| {
            let problem = format!(
                "required: set {} or {}, or {} in the config file",
                CREDENTIALS_KEY_ID.env, CREDENTIALS_KEY_ID_FILE.env, CREDENTIALS_KEY_ID.name,
            );
            ConfigError::new(CREDENTIALS_KEY_ID.name, problem)
        })?;
        Ok((key_id, None))
    }

    /// The secret, and the file it was read from. `read_env` left at most one source.
    fn secret(&self) -> Result<(Secret, Option<PathBuf>), ConfigError> {
        if let Some(file) = self.path(&CREDENTIALS_SECRET_FILE)? {
            let secret = read_secret(&file).map_err(|p| self.error(&CREDENTIALS_SECRET_FILE, p))?;
            return Ok((secret, Some(file)));
        }
        let secret = self.optional(&CREDENTIALS_SECRET)?.ok_or_else(|| {
            let problem = format!(
                "required: set {} (preferred) or {}, or {} in the config file",
                CREDENTIALS_SECRET_FILE.env, CREDENTIALS_SECRET.env, CREDENTIALS_SECRET_FILE.name,
            );
            ConfigError::new(CREDENTIALS_SECRET.name, problem)
        })?;
        Ok((secret, None))
    }

    /// Rules between the token timings, so that a fresh token is always usable and is replaced
    /// before it gets too old to be sent.
    fn validate(&self, token: &TokenSettings) -> Result<(), ConfigError> {
        let shown = |key: &Key, value: Duration| {
            format!(
                "{} ({}, {})",
                key.name,
                show_duration(value),
                self.origin(key)
            )
        };
        if token.backdate >= token.lifetime {
            let problem = format!(
                "must be less than {} or tokens are expired when minted, got {}",
                shown(&TOKEN_LIFETIME, token.lifetime),
                show_duration(token.backdate),
            );
            return Err(self.error(&TOKEN_BACKDATE, problem));
        }
        let validity = token.lifetime - token.backdate;
        if token.refresh_before >= validity {
            let problem = format!(
                "must be less than {} minus {} = {}, the validity of a fresh token, got {}",
                shown(&TOKEN_LIFETIME, token.lifetime),
                shown(&TOKEN_BACKDATE, token.backdate),
                show_duration(validity),
                show_duration(token.refresh_before),
            );
            return Err(self.error(&TOKEN_REFRESH_BEFORE, problem));
        }
        if token.margin >= token.refresh_before {
            let problem = format!(
                "must be less than {} so that tokens are refreshed before they become too old \
                 to send, got {}",
                shown(&TOKEN_REFRESH_BEFORE, token.refresh_before),
                show_duration(token.margin),
            );
            return Err(self.error(&TOKEN_MARGIN, problem));
        }
        Ok(())
    }

    /// One row per key, in the table's order, with the value as `Config` holds it.
    pub(super) fn effective(&self, config: &Config) -> Vec<Setting> {
        Key::ALL
            .iter()
            .map(|key| {
                let value = (key.show)(config).unwrap_or_else(|| {
                    self.get(key)
                        .map_or_else(|| "(none)".into(), |(text, _)| text.to_owned())
                });
                // A credential read from a file comes from wherever the file's path came from.
                let source = ONE_SOURCE
                    .into_iter()
                    .find(|(inline, file)| inline.name == key.name && self.get(file).is_some())
                    .map_or(*key, |(_, file)| file);
                Setting {
                    key: key.name,
                    value,
                    origin: self.origin(source).clone(),
                }
            })
            .collect()
    }
}
