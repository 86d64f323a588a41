//! The `mock-upstream` binary, end to end: configuration from the environment, the CA file, the
//! announced URL, and a clean exit on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
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

#[tokio::test]
async fn serves_with_environment_credentials_until_sigterm() {
    let dir = std::env::temp_dir().join(format!("idmatch-mock-bin-{}", std::process::id()));
    let ca_path = dir.join("nested/ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .arg("--listen=127.0.0.1:0")
        .arg("--ca-out")
        .arg(&ca_path)
        .env("IDMATCH_KEY_ID", KEY_ID)
        .env("IDMATCH_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line
        .strip_prefix("mock-upstream: serving ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected announcement: {line}"));
    assert!(line.contains(&ca_path.display().to_string()), "{line}");
    let port: u16 = url
        .strip_prefix("https://localhost:")
        .and_then(|rest| rest.strip_suffix("/mobile-identity/v1"))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("unexpected URL: {url}"));

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&ca_path).unwrap())
        .unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = Client::tls(([127, 0, 0, 1], port).into(), Arc::new(config), "localhost")
        .await
        .unwrap();
    let request = client
        .request(Method::POST, "/mobile-identity/v1/sim-swap")
        .header("authorization", format!("Bearer {}", valid_token()))
        .body(full(
            r#"{"phoneNumber":"+31610000002","serviceType":"24h"}"#,
        ))
        .unwrap();
    assert_eq!(client.send(request).await.unwrap().status(), StatusCode::OK);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());
    let rest: Vec<String> = stdout.lines().map(Result::unwrap).collect();
    assert_eq!(rest, ["mock-upstream: stopped"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_a_key_id_without_a_secret() {
    let output = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .arg("--key-id=some-key")
        .env_remove("IDMATCH_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no secret"));
}
