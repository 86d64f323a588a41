//! The layers (default < file < environment), and the typed `Config` built from them.

use super::files::*;
use super::keys::*;
use super::parse::*;
use super::*;

/// A value as written, before parsing.
pub(super) struct Raw {
    text: String,
    origin: Origin,
}

/// The winning raw value of each key that is set in the file or the environment.
#[derive(Default)]
pub(super) struct Layers {
    values: HashMap<Key, Raw>,
}

pub(super) static DEFAULT: Origin = Origin::Default;

impl Layers {
    pub(super) fn read_file(&mut self, path: &Path, source: &str) -> Result<(), ConfigError> {
        let doc = DeTable::parse(source).map_err(|e| {
            // toml's own Display spans several lines (it quotes the source); keep ours to one.
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::new(at_line(path, source, e.span().map(|s| s.start)), message)
        })?;
        self.read_table(path, source, "", doc.get_ref())
    }

    pub(super) fn read_table(
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

    pub(super) fn read_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
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
    pub(super) fn one_source(&mut self, inline: Key, file: Key) -> Result<(), ConfigError> {
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
    pub(super) fn get(&self, key: Key) -> Option<(&str, &Origin)> {
        match self.values.get(&key) {
            Some(raw) => Some((&raw.text, &raw.origin)),
            None => key.spec().default.map(|text| (text, &DEFAULT)),
        }
    }

    pub(super) fn origin(&self, key: Key) -> &Origin {
        self.get(key).map_or(&DEFAULT, |(_, origin)| origin)
    }

    /// An error about `key`, named as the operator wrote it.
    pub(super) fn error(&self, key: Key, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(key.describe(self.origin(key)), problem)
    }

    pub(super) fn optional<T>(
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

    pub(super) fn value<T>(
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
    pub(super) fn path(&self, key: Key) -> Result<Option<PathBuf>, ConfigError> {
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
    pub(super) fn duration(
        &self,
        key: Key,
        resolution: Resolution,
    ) -> Result<Duration, ConfigError> {
        self.value(key, |text| match parse_duration(text) {
            Some(d) if resolution == Resolution::Millis || d.subsec_nanos() == 0 => Ok(d),
            _ => Err(expected(key.expects(), text)),
        })
    }

    /// A duration key that must be greater than zero: a timeout, an interval, a lifetime.
    pub(super) fn positive(
        &self,
        key: Key,
        resolution: Resolution,
    ) -> Result<Duration, ConfigError> {
        match self.duration(key, resolution)? {
            d if d.is_zero() => Err(self.error(key, "must be greater than zero")),
            d => Ok(d),
        }
    }

    pub(super) fn build(&self) -> Result<Config, ConfigError> {
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
    pub(super) fn redis(
        &self,
        url: String,
        connection: redis::ConnectionInfo,
    ) -> Result<Redis, ConfigError> {
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
    pub(super) fn callback(&self) -> Result<Option<CallbackSettings>, ConfigError> {
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
    pub(super) fn key_id(&self) -> Result<(String, Option<PathBuf>), ConfigError> {
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
    pub(super) fn secret(&self) -> Result<(Secret, Option<PathBuf>), ConfigError> {
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
    pub(super) fn validate(&self, token: &TokenSettings) -> Result<(), ConfigError> {
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
    pub(super) fn show_callback(&self, key: Key, callback: Option<&CallbackSettings>) -> String {
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

    pub(super) fn effective(&self, config: &Config) -> Vec<Setting> {
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

/// The candidate nearest to `name` by edit distance, if near enough to be a typo of it: at most
/// one edit per six characters, so that `upstream.urll` finds `upstream.url` but
/// `upstream.foo` finds nothing.
pub(super) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= (candidate.len() / 6).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over bytes (names are ASCII): insertions, deletions, substitutions.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
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
pub(super) fn at_line(path: &Path, source: &str, offset: Option<usize>) -> String {
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
pub(super) fn from_toml(key: Key, value: &DeValue<'_>) -> Result<String, String> {
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
pub(super) fn with_article(noun: &str) -> String {
    match noun.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => format!("an {noun}"),
        _ => format!("a {noun}"),
    }
}
