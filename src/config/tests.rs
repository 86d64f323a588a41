use super::files::*;
use super::keys::*;
use super::layers::*;
use super::parse::*;
use super::*;

const FILE: &str = "/etc/idmatch/idmatch-proxy.toml";
const SECRET: &str = "s3cr3t-that-must-never-leak";
const EXAMPLE: &str = include_str!("../../config/idmatch-proxy.toml");

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
            "credentials.secret_file" | "credentials.secret" => Origin::Env("IDMATCH_SECRET_FILE"),
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
    // What the key's value must be, as its parser describes it.
    let expects = |key: &Key| match key.toml {
        Toml::Str(what) => what,
        Toml::Bool | Toml::Forbidden => "",
    };
    let durations = Key::ALL.iter().filter(|key| {
        matches!(
            expects(key),
            DURATION | SECONDS | REFRESH_BEFORE | BACKDATE | MARGIN
        )
    });
    let mut checked = 0;
    for key in durations {
        let message = env_error(&[(key.env, "abc")]);
        let expects = expects(key);
        assert_eq!(
            message,
            format!("{} (environment): expected {expects}, got \"abc\"", key.env)
        );
        // The examples: every word that starts with a digit, without a trailing comma.
        let examples = expects
            .split_whitespace()
            .filter(|word| word.starts_with(|c: char| c.is_ascii_digit()))
            .map(|word| word.trim_end_matches(','));
        for example in examples {
            let accepted = load(None, &env_with(&[(key.env, example)]));
            assert!(
                accepted.is_ok(),
                "{}={example}: {:?}",
                key.env,
                accepted.err()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 23, "every duration key");
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
        message.starts_with("IDMATCH_TOKEN_REFRESH_BEFORE (environment): expected whole seconds"),
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
    let upstream = config("", &[("IDMATCH_UPSTREAM_URL", "https://api.cm.com:8443/x")]).upstream;
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
             upstream.http2, upstream.keep_warm, upstream.idle_timeout, upstream.ping_interval, \
             upstream.ping_timeout, \
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
    for field in [|key: &Key| key.name, |key: &Key| key.env] {
        let distinct = Key::ALL
            .iter()
            .map(|key| field(key))
            .collect::<std::collections::HashSet<_>>();
        assert_eq!(distinct.len(), Key::ALL.len());
    }
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
    let key_only = temp_file(b"-----BEGIN PRIVATE KEY-----\nAQIDBA==\n-----END PRIVATE KEY-----\n");
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
    assert!(
        rendered.contains(&format!(
            "upstream.roots                  native                                 file {FILE}\n"
        )),
        "{rendered}"
    );
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
        layers.path(&UPSTREAM_CA_FILE).unwrap(),
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
