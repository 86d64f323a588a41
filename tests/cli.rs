//! The real binary's command line, through real processes with only the environment each case
//! sets: how a bad configuration is reported, `check`, `token`, `--help` and `--version`, and
//! serving until SIGTERM or SIGINT.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use idmatch_mock::{MockApi, Server as Upstream, TestPki};
use serde_json::json;
use support::*;

/// EX_CONFIG in sysexits.h: what the binary exits with on a bad configuration.
const EXIT_CONFIG: i32 = 78;

/// A listener that cannot bind (README): not the configuration's fault, it may pass next time.
const EXIT_BIND: i32 = 1;

/// clap's exit status for a command line it rejects.
const EXIT_USAGE: i32 = 2;

/// Bound on one short-lived run (`check`, `token`, a refused start): each takes milliseconds.
const RUN_LIMIT: Duration = Duration::from_secs(10);

/// Bound on the exit after a stop signal, with no request in flight.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// The example configuration, with every key.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/idmatch-proxy.toml");

/// Keys `check` must print, in this relative order (others may be added between them).
const KEYS: [&str; 15] = [
    "listen",
    "shutdown_timeout",
    "upstream.url",
    "upstream.roots",
    "upstream.ca_file",
    "upstream.allow_insecure_http",
    "upstream.connect_timeout",
    "upstream.response_timeout",
    "credentials.key_id",
    "credentials.secret_file",
    "credentials.secret",
    "token.lifetime",
    "token.refresh_before",
    "token.margin",
    "token.backdate",
];

type Env = BTreeMap<&'static str, String>;

/// A configuration that is valid on its own, and binds only ephemeral ports if served.
fn valid_env() -> Env {
    Env::from([
        ("IDMATCH_LISTEN", "127.0.0.1:0".to_owned()),
        ("IDMATCH_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("IDMATCH_KEY_ID", KEY_ID.to_owned()),
        ("IDMATCH_SECRET", SECRET.to_owned()),
    ])
}

/// Runs the binary with `args` and exactly `env`, killing it if it outlives [`RUN_LIMIT`].
fn run(args: &[&str], env: &Env) -> Output {
    run_in(Path::new("."), args, env)
}

/// [`run`] in the working directory `dir`.
fn run_in(dir: &Path, args: &[&str], env: &Env) -> Output {
    let child = Binary::command()
        .current_dir(dir)
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("`{}` still running after {RUN_LIMIT:?}", invocation(args));
        }
    }
}

/// `idmatch-proxy check`, for messages.
fn invocation(args: &[&str]) -> String {
    std::iter::once("idmatch-proxy")
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8 output")
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A refusal as operators should see it: `code`, nothing on stdout, one `idmatch-proxy: ` line
/// on stderr naming each of `names`, no panic, no secret.
fn assert_refused(what: &str, output: &Output, code: i32, names: &[String]) {
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: exit status; stderr: {stderr}"
    );
    assert_eq!(stdout, "", "{what}: nothing on stdout");
    assert!(
        stderr.ends_with('\n') && stderr.lines().count() == 1,
        "{what}: exactly one line on stderr, got {stderr:?}"
    );
    assert!(
        stderr.starts_with("idmatch-proxy: "),
        "{what}: the line starts with the program name: {stderr:?}"
    );
    for name in names {
        assert!(
            stderr.contains(name.as_str()),
            "{what}: {name:?} missing from {stderr:?}"
        );
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{what}: panicked: {stderr}"
    );
    assert!(!stderr.contains(SECRET), "{what}: secret printed: {stderr}");
}

/// One bad input: the environment and arguments that produce it, and what the error must name.
struct Case {
    what: &'static str,
    args: Vec<String>,
    env: Env,
    names: Vec<String>,
}

impl Case {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            args: Vec::new(),
            env: valid_env(),
            names: Vec::new(),
        }
    }

    fn set(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.env.insert(key, value.into());
        self
    }

    fn unset(mut self, key: &'static str) -> Self {
        self.env.remove(key);
        self
    }

    fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    fn names(mut self, names: &[&str]) -> Self {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }
}

// === 1. Bad input ===

#[test]
fn every_bad_configuration_is_one_line_naming_the_key_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let missing = path_str(&dir.path().join("missing"));
    let empty = path_str(&write(dir.path(), "empty", b""));
    let not_pem = path_str(&write(dir.path(), "not-pem.txt", b"hello\n"));
    let unknown_key = path_str(&write(
        dir.path(),
        "unknown.toml",
        b"listen = \"127.0.0.1:0\"\n\n[upstream]\nurll = \"https://x\"\n",
    ));
    let bad_value = path_str(&write(
        dir.path(),
        "bad-value.toml",
        b"[token]\nlifetime = \"abc\"\n",
    ));
    let with_secret = path_str(&write(
        dir.path(),
        "with-secret.toml",
        format!("[credentials]\nsecret = \"{SECRET}\"\n").as_bytes(),
    ));
    let unknown_at = format!("{unknown_key} line 4");
    let bad_value_in = format!("token.lifetime in {bad_value}");
    let with_secret_in = format!("credentials.secret in {with_secret}");

    let cases = [
        Case::new("missing key id").unset("IDMATCH_KEY_ID").names(&[
            "credentials.key_id",
            "IDMATCH_KEY_ID",
            "required",
        ]),
        Case::new("missing secret").unset("IDMATCH_SECRET").names(&[
            "credentials.secret",
            "IDMATCH_SECRET_FILE",
            "IDMATCH_SECRET",
            "required",
        ]),
        Case::new("unreadable secret file")
            .unset("IDMATCH_SECRET")
            .set("IDMATCH_SECRET_FILE", &missing)
            .names(&["IDMATCH_SECRET_FILE (environment)", &missing, "cannot read"]),
        Case::new("empty secret file")
            .unset("IDMATCH_SECRET")
            .set("IDMATCH_SECRET_FILE", &empty)
            .names(&["IDMATCH_SECRET_FILE (environment)", &empty, "is empty"]),
        Case::new("URL without a host")
            .set("IDMATCH_UPSTREAM_URL", "https://")
            .names(&["IDMATCH_UPSTREAM_URL (environment)", "\"https://\""]),
        Case::new("not a URL")
            .set("IDMATCH_UPSTREAM_URL", "not a url")
            .names(&["IDMATCH_UPSTREAM_URL (environment)", "\"not a url\""]),
        Case::new("http upstream without the allow flag")
            .set("IDMATCH_UPSTREAM_URL", "http://127.0.0.1:9/v1")
            .names(&[
                "IDMATCH_UPSTREAM_URL (environment)",
                "IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP",
            ]),
        Case::new("bad duration in the environment")
            .set("IDMATCH_TOKEN_LIFETIME", "abc")
            .names(&["IDMATCH_TOKEN_LIFETIME (environment)", "\"abc\""]),
        Case::new("bad duration in the file")
            .args(&["--config", &bad_value])
            .names(&[&bad_value_in, "\"abc\""]),
        Case::new("unknown key, file from --config")
            .args(&["--config", &unknown_key])
            .names(&[&unknown_at, "unknown key \"upstream.urll\""]),
        Case::new("unknown key, file from IDMATCH_CONFIG")
            .set("IDMATCH_CONFIG", &unknown_key)
            .names(&[&unknown_at, "unknown key \"upstream.urll\""]),
        // Not clap's usage text: a configuration error like the others.
        Case::new("empty IDMATCH_CONFIG")
            .set("IDMATCH_CONFIG", "")
            .names(&[
                "IDMATCH_CONFIG (environment)",
                "expected the path of a TOML config file, got \"\"",
            ]),
        Case::new("nonexistent config file")
            .args(&["--config", &missing])
            .names(&["config file", &missing, "cannot read"]),
        Case::new("the secret itself in the file (not echoed)")
            .args(&["--config", &with_secret])
            .names(&[&with_secret_in, "IDMATCH_SECRET_FILE"]),
        Case::new("nonexistent CA file")
            .set("IDMATCH_UPSTREAM_CA_FILE", &missing)
            .names(&[
                "IDMATCH_UPSTREAM_CA_FILE (environment)",
                &missing,
                "cannot read",
            ]),
        Case::new("CA file that is not PEM")
            .set("IDMATCH_UPSTREAM_CA_FILE", &not_pem)
            .names(&[
                "IDMATCH_UPSTREAM_CA_FILE (environment)",
                &not_pem,
                "no certificate",
            ]),
    ];

    // Every command loads the configuration first, and fails the same way.
    for case in &cases {
        for command in [None, Some("run"), Some("check"), Some("token")] {
            let mut args = case.args.iter().map(String::as_str).collect::<Vec<_>>();
            args.extend(command);
            let what = format!("{} (`{}`)", case.what, invocation(&args));
            assert_refused(&what, &run(&args, &case.env), EXIT_CONFIG, &case.names);
        }
    }
}

#[test]
fn a_port_in_use_is_named_with_its_variable_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut env = valid_env();
    env.insert("IDMATCH_LISTEN", addr.clone());
    assert_refused(
        "port in use",
        &run(&[], &env),
        EXIT_BIND,
        &["IDMATCH_LISTEN".into(), addr],
    );
}

/// A CA file that is PEM but whose certificate cannot be decoded is refused like every other
/// bad key: naming IDMATCH_UPSTREAM_CA_FILE (how the operator set it) and the file.
#[test]
fn a_ca_file_with_an_undecodable_certificate_names_the_variable_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad_der = b"-----BEGIN CERTIFICATE-----\nAQIDBA==\n-----END CERTIFICATE-----\n";
    let ca = path_str(&write(dir.path(), "ca.pem", bad_der));
    let mut env = valid_env();
    env.insert("IDMATCH_UPSTREAM_CA_FILE", ca.clone());
    // `token` never builds the TLS client, so it has no reason to refuse.
    for args in [&[][..], &["check"]] {
        let what = format!("undecodable CA certificate (`{}`)", invocation(args));
        assert_refused(
            &what,
            &run(args, &env),
            EXIT_CONFIG,
            &["IDMATCH_UPSTREAM_CA_FILE (environment)".into(), ca.clone()],
        );
    }
}

// === 2. check ===

/// `check`'s table as (key, value, origin) rows, split at the header's columns.
fn settings(stdout: &str) -> Vec<(String, String, String)> {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header line");
    let (value_at, origin_at) = (
        header.find("VALUE").unwrap(),
        header.find("ORIGIN").unwrap(),
    );
    assert_eq!(&header[..value_at].trim_end(), &"KEY", "{stdout}");
    lines
        .take_while(|line| *line != "configuration OK")
        .map(|line| {
            (
                line[..value_at].trim_end().to_owned(),
                line[value_at..origin_at].trim_end().to_owned(),
                line[origin_at..].to_owned(),
            )
        })
        .collect()
}

fn row<'a>(rows: &'a [(String, String, String)], key: &str) -> (&'a str, &'a str) {
    let (_, value, origin) = rows
        .iter()
        .find(|(k, _, _)| k == key)
        .unwrap_or_else(|| panic!("no row for {key}"));
    (value, origin)
}

#[test]
fn check_prints_every_setting_with_its_origin_and_hides_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = path_str(&write(
        dir.path(),
        "proxy.toml",
        b"shutdown_timeout = \"7s\"\n",
    ));
    let mut env = valid_env();
    env.insert("IDMATCH_LISTEN", "127.0.0.1:9".into());
    let output = run(&["--config", &file, "check"], &env);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "check succeeds: {stderr}");
    assert_eq!(stderr, "", "check writes nothing on stderr");
    assert!(stdout.ends_with("\nconfiguration OK\n"), "{stdout}");

    let rows = settings(stdout);
    let keys = rows
        .iter()
        .map(|(key, _, _)| key.as_str())
        .collect::<Vec<_>>();
    let mut distinct = keys.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), keys.len(), "one row per key:\n{stdout}");
    let listed = keys
        .iter()
        .filter(|key| KEYS.contains(key))
        .copied()
        .collect::<Vec<_>>();
    assert_eq!(listed, KEYS, "every key, in order:\n{stdout}");
    assert_eq!(row(&rows, "listen"), ("127.0.0.1:9", "env IDMATCH_LISTEN"));
    assert_eq!(
        row(&rows, "shutdown_timeout"),
        ("7s", format!("file {file}").as_str())
    );
    assert_eq!(row(&rows, "token.margin"), ("5s", "default"));
    assert_eq!(
        row(&rows, "credentials.key_id"),
        (KEY_ID, "env IDMATCH_KEY_ID")
    );
    let redacted = format!("<redacted, {} bytes>", SECRET.len());
    assert_eq!(
        row(&rows, "credentials.secret"),
        (redacted.as_str(), "env IDMATCH_SECRET")
    );
    assert!(!stdout.contains(SECRET), "secret printed:\n{stdout}");
}

/// The dotted keys a TOML file sets, e.g. `upstream.url`.
fn dotted_keys(source: &str) -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, keys: &mut Vec<String>) {
        for (name, value) in table {
            let dotted = format!("{prefix}{name}");
            match value {
                toml::Value::Table(inner) => walk(&format!("{dotted}."), inner, keys),
                _ => keys.push(dotted),
            }
        }
    }
    let mut keys = Vec::new();
    walk("", &source.parse::<toml::Table>().unwrap(), &mut keys);
    keys
}

#[test]
fn check_passes_the_example_configuration_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let secret = path_str(&write(
        dir.path(),
        "secret",
        format!("{SECRET}\n").as_bytes(),
    ));
    let env = Env::from([("IDMATCH_SECRET_FILE", secret.clone())]);
    let output = run(&["--config", EXAMPLE, "check"], &env);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(0),
        "the example configuration passes: {stderr}"
    );
    assert!(!stdout.contains(SECRET), "secret printed:\n{stdout}");

    let rows = settings(stdout);
    let in_file = dotted_keys(&std::fs::read_to_string(EXAMPLE).unwrap());
    let from_file = format!("file {EXAMPLE}");
    for key in &in_file {
        if key != "credentials.secret_file" {
            assert_eq!(row(&rows, key).1, from_file, "origin of {key}:\n{stdout}");
        }
    }
    for (key, value, origin) in &rows {
        let expected = match key.as_str() {
            "credentials.secret_file" | "credentials.secret" => "env IDMATCH_SECRET_FILE",
            key if in_file.iter().any(|k| k == key) => &from_file,
            // Commented out in the example, like `upstream.ca_file`.
            _ => "default",
        };
        assert_eq!(origin, expected, "origin of {key} = {value}:\n{stdout}");
    }
    assert_eq!(row(&rows, "credentials.secret_file").0, secret);
    assert_eq!(row(&rows, "credentials.key_id").0, KEY_ID);
}

/// Paths in a config file are relative to its directory, wherever the proxy runs from; paths
/// from the environment are relative to the working directory.
#[test]
fn paths_in_a_config_file_are_relative_to_it_from_any_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    write(&conf, "secret", format!("{SECRET}\n").as_bytes());
    write(&conf, "key-id", KEY_ID.as_bytes());
    write(&conf, "ca.pem", TestPki::localhost().ca_pem().as_bytes());
    let file = write(
        &conf,
        "proxy.toml",
        b"[upstream]\nca_file = \"ca.pem\"\n\
          [credentials]\nsecret_file = \"secret\"\nkey_id_file = \"key-id\"\n",
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let shown = |path: &Path| path_str(path);

    let output = run_in(
        elsewhere.path(),
        &["--config", &path_str(&file), "check"],
        &Env::new(),
    );
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let rows = settings(stdout);
    assert_eq!(
        row(&rows, "credentials.secret_file").0,
        shown(&conf.join("secret"))
    );
    assert_eq!(
        row(&rows, "credentials.key_id_file").0,
        shown(&conf.join("key-id"))
    );
    assert_eq!(
        row(&rows, "upstream.ca_file").0,
        shown(&conf.join("ca.pem"))
    );
    assert_eq!(row(&rows, "credentials.key_id").0, KEY_ID);

    // A relative config path: the paths are shown through it, relative to the working directory.
    let output = run_in(
        dir.path(),
        &["--config", "conf/proxy.toml", "check"],
        &Env::new(),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let rows = settings(text(&output.stdout));
    assert_eq!(row(&rows, "credentials.secret_file").0, "conf/secret");

    // The environment's path is the working directory's, even beside the file.
    write(elsewhere.path(), "secret", b"another-secret\n");
    let env = Env::from([("IDMATCH_SECRET_FILE", "secret".to_owned())]);
    let output = run_in(
        elsewhere.path(),
        &["--config", &path_str(&file), "check"],
        &env,
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let rows = settings(text(&output.stdout));
    assert_eq!(
        row(&rows, "credentials.secret_file"),
        ("secret", "env IDMATCH_SECRET_FILE")
    );
    assert_eq!(row(&rows, "credentials.secret").0, "<redacted, 14 bytes>");
}

/// A misspelt variable would otherwise change nothing and say nothing.
#[test]
fn unknown_variables_are_named_with_the_closest_known_one() {
    let mut env = valid_env();
    env.insert("IDMATCH_UPSTREAM_URLL", "https://example.com".into());
    // Its value is the secret: only its name may be shown.
    env.insert("IDMATCH_SECRETT", SECRET.into());
    let warnings = "idmatch-proxy: warning: IDMATCH_SECRETT (environment): not a setting, \
                    ignored; did you mean IDMATCH_SECRET?\n\
                    idmatch-proxy: warning: IDMATCH_UPSTREAM_URLL (environment): not a setting, \
                    ignored; did you mean IDMATCH_UPSTREAM_URL?\n";

    // `check` (and `token`) say so on stderr, leaving stdout to the table (the token).
    for command in ["check", "token"] {
        let output = run(&[command], &env);
        assert_eq!(output.status.code(), Some(0), "{command}");
        assert_eq!(text(&output.stderr), warnings, "{command}");
    }
    // Ahead of a refusal, which the misspelling may have caused.
    let mut refused = env.clone();
    refused.remove("IDMATCH_KEY_ID");
    refused.insert("IDMATCH_KEYID", KEY_ID.into());
    let output = run(&["check"], &refused);
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "idmatch-proxy: warning: IDMATCH_KEYID (environment): not a setting, \
                            ignored; did you mean IDMATCH_KEY_ID?\n"
        ),
        "{stderr}"
    );
    assert!(
        stderr.ends_with(
            "\nidmatch-proxy: credentials.key_id: required: set IDMATCH_KEY_ID \
                              or IDMATCH_KEY_ID_FILE, or credentials.key_id in the config file\n"
        ),
        "{stderr}"
    );

    // Serving logs each once logging is set up, before "ready".
    let env = env
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let proxy = Binary::serve(&env);
    let logs = proxy.logs();
    let warned = logs
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "unknown IDMATCH_ environment variable; ignored")
        .map(|event| {
            assert_eq!(event["level"], "WARN");
            (event["variable"].clone(), event["did_you_mean"].clone())
        })
        .collect::<Vec<_>>();
    assert_eq!(
        warned,
        [
            (json!("IDMATCH_SECRETT"), json!("IDMATCH_SECRET")),
            (
                json!("IDMATCH_UPSTREAM_URLL"),
                json!("IDMATCH_UPSTREAM_URL")
            ),
        ],
        "{logs:#?}"
    );
    assert!(logs.iter().all(|line| !line.contains(SECRET)), "{logs:#?}");
}

/// The sample errors in the README's "Configuration" section are what the binary prints.
#[test]
fn the_readme_sample_errors_are_the_binarys() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sample = |start: &str| {
        let found = readme
            .lines()
            .filter(|line| line.starts_with(start))
            .collect::<Vec<_>>();
        assert_eq!(
            found.len(),
            1,
            "one README line starts with {start:?}: {found:?}"
        );
        format!("{}\n", found[0])
    };

    let mut env = valid_env();
    env.insert("IDMATCH_TOKEN_LIFETIME", "abc".into());
    let output = run(&["check"], &env);
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    assert_eq!(
        text(&output.stderr),
        sample("idmatch-proxy: IDMATCH_TOKEN_LIFETIME (environment): ")
    );

    // The README's file is /etc/idmatch/idmatch-proxy.toml; this one is elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "idmatch-proxy.toml",
        b"listen = \"127.0.0.1:8080\"\n\n[upstream]\nurll = \"https://api.cm.com/mobile-identity/v1\"\n",
    );
    let output = run(&["--config", &path_str(&file), "check"], &valid_env());
    assert_eq!(output.status.code(), Some(EXIT_CONFIG));
    let stderr = text(&output.stderr).replace(&path_str(dir.path()), "/etc/idmatch");
    assert_eq!(
        stderr,
        sample("idmatch-proxy: /etc/idmatch/idmatch-proxy.toml line ")
    );
}

// === 3. token ===

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn token_prints_one_valid_token() {
    let mut env = valid_env();
    env.insert("IDMATCH_TOKEN_LIFETIME", "120s".into());
    let before = unix_now();
    let output = run(&["token"], &env);
    let after = unix_now();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "token succeeds: {stderr}");
    assert_eq!(stderr, "", "token writes nothing on stderr");
    let token = stdout
        .strip_suffix('\n')
        .filter(|token| !token.contains('\n'))
        .unwrap_or_else(|| panic!("exactly one line on stdout, got {stdout:?}"));

    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let claims = verify(token, SECRET).expect("verifies with the secret");
    assert!(
        claims.nbf <= after && before <= claims.exp,
        "nbf {} <= now [{before}, {after}] <= exp {}",
        claims.nbf,
        claims.exp
    );
    assert_eq!(claims.exp - claims.iat, 120, "exp - iat is the lifetime");
}

// === 4. --help, --version, no secret on the command line ===

#[test]
fn help_lists_the_commands_and_no_secret_flag() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["token", "--help"],
    ] {
        let output = run(args, &Env::new());
        let stdout = text(&output.stdout);
        let what = format!("`{}`", invocation(args));
        assert_eq!(output.status.code(), Some(0), "{what}");
        assert!(
            !stdout.contains("--secret"),
            "{what} offers --secret:\n{stdout}"
        );
    }
    let stdout = String::from_utf8(run(&["--help"], &Env::new()).stdout).unwrap();
    for listed in ["check", "token", "--config"] {
        assert!(stdout.contains(listed), "--help lists {listed}:\n{stdout}");
    }
}

#[test]
fn version_prints_name_and_version() {
    let output = run(&["--version"], &Env::new());
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        text(&output.stdout),
        format!("idmatch-proxy {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_secret_cannot_come_from_the_command_line() {
    let flag = format!("--secret={SECRET}");
    let attempts = [
        &["--secret", SECRET][..],
        &[&flag],
        &["run", "--secret", SECRET],
        &["check", "--secret", SECRET],
        &["token", "--secret", SECRET],
    ];
    for args in attempts {
        let what = format!("`{}`", invocation(args));
        // Valid otherwise: the refusal is the flag's.
        let output = run(args, &valid_env());
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(EXIT_USAGE),
            "{what} is a usage error: {stderr}"
        );
        assert!(stderr.contains("'--secret'"), "{what}: {stderr}");
        assert!(
            !stderr.contains(SECRET),
            "{what} echoes the secret: {stderr}"
        );
        assert_eq!(text(&output.stdout), "", "{what}");
    }
}

// === 5. Serving until a signal ===

/// Serves one request with trace logging, stops the proxy with `signal`, then checks the exit
/// and that no credential reached the logs.
async fn serve_then_stop_with(signal: &str) {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(MockApi::new(KEY_ID, SECRET))
        .start()
        .await;
    // Tests run in parallel: no fixed admin port. No drain delay: the exit is what is timed.
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_ADMIN_LISTEN", "127.0.0.1:0")
        .set("IDMATCH_DRAIN_DELAY", "0s")
        .set("RUST_LOG", "trace");
    let mut proxy = Binary::serve(&config.env);

    // The client keeps its connection open: an idle keep-alive must not delay the exit.
    let client = http1();
    let answer = send(
        &client,
        post_json(
            &format!("http://{}/sim-swap", proxy.addr),
            json!({"phoneNumber": "+31610000001", "serviceType": "timestamp"}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"state": "success", "timestamp": "2017-12-31T14:59:59Z"})
    );
    let requests = upstream.requests();
    let authorization = std::str::from_utf8(requests[0].header("authorization").unwrap()).unwrap();
    let token = authorization.strip_prefix("Bearer ").unwrap().to_owned();
    let signature = token.rsplit('.').next().unwrap().to_owned();

    proxy.signal(signal);
    let (status, logs) = tokio::task::block_in_place(|| proxy.finish(STOP_LIMIT));
    assert_eq!(
        status.code(),
        Some(0),
        "SIG{signal} exits 0:\n{}",
        logs.join("\n")
    );

    let events = logs
        .iter()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect::<Vec<_>>();
    let shutdown = events
        .iter()
        .find(|event| event["message"] == "shutdown requested")
        .unwrap_or_else(|| panic!("no shutdown message:\n{}", logs.join("\n")));
    assert_eq!(shutdown["signal"], format!("SIG{signal}"));
    assert!(
        events.iter().any(|event| event["message"] == "stopped"),
        "no final message:\n{}",
        logs.join("\n")
    );
    // Otherwise the checks below would prove little.
    assert!(
        events.iter().any(|event| event["level"] == "TRACE"),
        "RUST_LOG=trace took effect"
    );
    for line in &logs {
        assert!(!line.contains(SECRET), "secret logged: {line}");
        assert!(!line.contains(&token), "token logged: {line}");
        assert!(!line.contains(&signature), "token signature logged: {line}");
        assert!(!line.contains("Bearer ey"), "bearer token logged: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_then_exits_cleanly_on_sigterm() {
    serve_then_stop_with("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_then_exits_cleanly_on_sigint() {
    serve_then_stop_with("INT").await;
}
