//! The `mock-upstream` binary, end to end: configuration from the environment and files, the CA
//! file, the announced URL, the request log, the rate-limit flag and a clean exit on SIGTERM.

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    sync::Arc,
};

use http::{Method, StatusCode};
use idmatch_mock::server::full;
use rustls::{
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer},
    ClientConfig, RootCertStore,
};

use crate::support::{valid_token, Client, KEY_ID, SECRET};

/// Every variable the binary reads, so that the developer's own settings cannot leak in.
const VARIABLES: [&str; 5] = [
    "IDMATCH_KEY_ID",
    "IDMATCH_KEY_ID_FILE",
    "IDMATCH_SECRET",
    "IDMATCH_SECRET_FILE",
    "RUST_LOG",
];

/// A scratch directory per test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("idmatch-mock-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with only `env` set of [`VARIABLES`].
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mock-upstream"));
    command.args(args);
    for variable in VARIABLES {
        command.env_remove(variable);
    }
    command.envs(env.iter().copied());
    command
}

/// A running `mock-upstream` on an ephemeral port.
struct Running {
    child: Child,
    stdout: BufReader<ChildStdout>,
    port: u16,
    ca: PathBuf,
}

impl Running {
    fn start(scratch: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Self {
        let ca = scratch.0.join("nested/ca.pem");
        let ca_arg = format!("--ca-out={}", ca.display());
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--listen=127.0.0.1:0", &ca_arg])
            .collect();
        let mut child = command(&args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .strip_prefix("mock-upstream: serving ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected announcement: {line}"));
        assert!(line.contains(&ca.display().to_string()), "{line}");
        assert!(
            line.contains("/verification-service/v1") && line.contains("-sandbox/v1"),
            "{line}"
        );
        let port: u16 = url
            .strip_prefix("https://localhost:")
            .and_then(|rest| rest.strip_suffix("/mobile-identity/v1"))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected URL: {url}"));
        Self {
            child,
            stdout,
            port,
            ca,
        }
    }

    /// `POST /mobile-identity/v1/sim-swap` with a valid token, on a connection of its own.
    async fn sim_swap(&self) -> http::Response<hyper::body::Incoming> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.ca).unwrap())
            .unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let addr = ([127, 0, 0, 1], self.port).into();
        let mut client = Client::tls(addr, Arc::new(config), "localhost")
            .await
            .unwrap();
        let request = client
            .request(Method::POST, "/mobile-identity/v1/sim-swap")
            .header("authorization", format!("Bearer {}", valid_token()))
            .body(full(
                r#"{"phoneNumber":"+31610000002","serviceType":"24h"}"#,
            ))
            .unwrap();
        client.send(request).await.unwrap()
    }

    /// SIGTERM; the exit must be clean. Returns what the mock printed after its announcement
    /// and its log.
    fn stop(mut self) -> (Vec<String>, String) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
        let stdout = self.stdout.lines().map(Result::unwrap).collect();
        let mut log = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (stdout, log)
    }
}

#[tokio::test]
async fn serves_with_environment_credentials_and_logs_each_request_at_info() {
    let scratch = Scratch::new("env");
    let mock = Running::start(
        &scratch,
        &[],
        &[("IDMATCH_KEY_ID", KEY_ID), ("IDMATCH_SECRET", SECRET)],
    );
    // No rate limit by default: two requests at once both succeed.
    for _ in 0..2 {
        assert_eq!(mock.sim_swap().await.status(), StatusCode::OK);
    }
    let (stdout, log) = mock.stop();
    assert_eq!(stdout, ["mock-upstream: stopped"]);

    let requests: Vec<&str> = log.lines().filter(|line| line.contains(" INFO ")).collect();
    assert_eq!(requests.len(), 2, "{log}");
    for line in requests {
        assert!(
            line.contains("request method=POST path=/mobile-identity/v1/sim-swap status=200"),
            "{line}"
        );
    }
    for secret in ["Bearer", "eyJ", SECRET, "+31610000002", "phoneNumber"] {
        assert!(!log.contains(secret), "{secret} logged: {log}");
    }
}

#[tokio::test]
async fn reads_the_secret_from_idmatch_secret_file_with_the_serve_subcommand() {
    let scratch = Scratch::new("secret-file");
    let secret_file = scratch.0.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let mock = Running::start(
        &scratch,
        &["serve"],
        &[
            ("IDMATCH_KEY_ID", KEY_ID),
            ("IDMATCH_SECRET_FILE", secret_file.to_str().unwrap()),
        ],
    );
    assert_eq!(mock.sim_swap().await.status(), StatusCode::OK);
    mock.stop();
}

#[tokio::test]
async fn the_rate_limit_flag_switches_the_limit_on() {
    let scratch = Scratch::new("rate-limit");
    let mock = Running::start(
        &scratch,
        &["--rate-limit-interval=10s"],
        &[("IDMATCH_KEY_ID", KEY_ID), ("IDMATCH_SECRET", SECRET)],
    );
    assert_eq!(mock.sim_swap().await.status(), StatusCode::OK);
    let refused = mock.sim_swap().await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    let (_, log) = mock.stop();
    assert!(
        log.contains("status=429 refusal=\"more than one request per 10s for this key id\""),
        "{log}"
    );
}

#[test]
fn refuses_incomplete_or_doubled_credentials() {
    let scratch = Scratch::new("refusals");
    let secret_file = scratch.0.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let secret_file = secret_file.to_str().unwrap();
    for (args, env, message) in [
        (&["--key-id=some-key"][..], &[][..], "no secret"),
        (&[], &[("IDMATCH_SECRET", SECRET)][..], "no key id"),
        (
            &[],
            &[
                ("IDMATCH_KEY_ID", KEY_ID),
                ("IDMATCH_SECRET", SECRET),
                ("IDMATCH_SECRET_FILE", secret_file),
            ][..],
            "IDMATCH_SECRET and IDMATCH_SECRET_FILE (--secret-file): both are set",
        ),
        (
            &["--rate-limit-interval=1m"][..],
            &[][..],
            "expected e.g. 1s or 150ms",
        ),
    ] {
        let output = command(args, env).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?} {env:?}: {stderr}");
        assert_ne!(output.status.code(), Some(0), "{args:?} {env:?}");
    }
    // Configuration errors of ours exit 64 (EX_USAGE); clap's own exit 2.
    let output = command(&["--key-id=some-key"], &[]).output().unwrap();
    assert_eq!(output.status.code(), Some(64));
}
