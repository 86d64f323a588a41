//! The secrets sweep: the real binary at `RUST_LOG=trace`, driven through every path that could
//! leak a credential, and then everything that came out of it searched for one.
//!
//! The workload: requests over HTTP/1.1 and h2c to an h2 and an HTTP/1.1-only upstream; a 401
//! replayed with a fresh token, a 401 that persists, a 401 to a streamed body (not replayed);
//! the proxy's own errors (405, 421, 400, 413, 504); client aborts mid-response and mid-body;
//! a credential rotation through `IDMATCH_SECRET_FILE` and a failed reload; a refused connect;
//! an upstream whose certificate is not trusted; refused configurations; `check`; `token`;
//! `/metrics`, `/readyz`, `/livez`.
//!
//! Afterwards none of the secrets, none of the tokens the upstreams saw or `token` printed, none
//! of their signatures, and no `Bearer ey`/JWT header may appear in any log line of any process,
//! any response the clients received (status, headers, body), `/metrics`, `check`'s output or a
//! refused start's message; and the untrusted upstream must have received no request at all.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use idmatch_mock::server::{full, ResponseFuture};
use idmatch_mock::{Handler, MockApi, RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the secret file holds after the rotation.
const ROTATED: &str = "rotated-Zq8vN3xW5kT1pL7mR4yB6cH9dF2gJ0s";

/// The prefix of every token we mint: base64url of `{"alg":"HS256",`.
const JWT_HEADER: &str = "eyJhbGciOi";

/// Bound on `check`, `token` and a refused start.
const RUN_LIMIT: Duration = Duration::from_secs(10);

/// An upstream answering by path: the API mock for its own paths, and paths that exercise the
/// proxy's 401 replay, its response timeout and plain success.
fn handler(api: MockApi) -> impl Handler {
    let rejected_once = Arc::new(AtomicBool::new(false));
    move |request: Request<hyper::body::Incoming>| -> ResponseFuture {
        let path = request.uri().path().to_owned();
        let tail = path.strip_prefix(BASE).unwrap_or(&path).to_owned();
        let unauthorized = || {
            let mut response = Response::new(full(r#"{"message":"Unauthorized"}"#));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        };
        match tail.as_str() {
            "/sim-swap" | "/identity-match" => api.call(request),
            "/reject-once" if !rejected_once.swap(true, Ordering::SeqCst) => {
                Box::pin(async move { unauthorized() })
            }
            "/always-401" => Box::pin(async move { unauthorized() }),
            "/slow" => Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Response::new(full("{}"))
            }),
            _ => Box::pin(async { Response::new(full(r#"{"ok":true}"#)) }),
        }
    }
}

async fn upstream(pki: &TestPki, alpn: &[&[u8]]) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .alpn(alpn)
        .handler(handler(MockApi::new(KEY_ID, SECRET)))
        .start()
        .await
}

/// Everything the sweep collected: what must not leak, and where it must not appear.
#[derive(Default)]
struct Sweep {
    /// Where to look: a label and the text.
    outputs: Vec<(String, String)>,
}

impl Sweep {
    fn saw(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.outputs.push((what.into(), text.into()));
    }

    fn answer(&mut self, what: &str, answer: &Answer) -> StatusCode {
        self.saw(
            what,
            format!(
                "{} {:?} {}",
                answer.status,
                answer.headers,
                String::from_utf8_lossy(&answer.body)
            ),
        );
        answer.status
    }

    async fn send(
        &mut self,
        what: &str,
        client: &HttpClient,
        request: Request<Full<Bytes>>,
    ) -> StatusCode {
        let answer = send(client, request).await;
        self.answer(what, &answer)
    }

    async fn raw(&mut self, what: &str, addr: std::net::SocketAddr, request: &[u8]) -> String {
        let response = raw(addr, request).await;
        self.saw(what, response.clone());
        response
    }
}

/// Runs the binary to completion with `args` and exactly `env`.
fn run(args: &[&str], env: &HashMap<String, String>) -> Output {
    let mut child = Binary::command()
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + RUN_LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "`idmatch-proxy {}` still running after {RUN_LIMIT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `request` and closes the connection after `after`, before the response.
async fn abort(addr: std::net::SocketAddr, request: &[u8], after: Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    tokio::time::sleep(after).await;
    drop(stream);
}

/// Every bearer token `upstream` received.
fn tokens_seen(upstream: &RunningServer) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .flat_map(|r| {
            r.header_values("authorization")
                .into_iter()
                .map(|v| text(v).strip_prefix("Bearer ").unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_leaves_except_in_the_authorization_sent_to_the_configured_upstream() {
    let started = Instant::now();
    let mut sweep = Sweep::default();
    let pki = TestPki::localhost();
    let h2 = upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let h1 = upstream(&pki, &[b"http/1.1"]).await;
    // Same host, another CA: the proxy must refuse it before sending anything.
    let untrusted = upstream(&TestPki::localhost(), &[b"h2", b"http/1.1"]).await;
    let refused = refusing_port();

    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let serving = |url: &str| {
        let mut config = ProxyConfig::new(url, &pki)
            .set("RUST_LOG", "trace")
            .set("IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", "1s")
            .set("IDMATCH_UPSTREAM_CONNECT_TIMEOUT", "2s")
            .set("IDMATCH_CLIENT_MAX_BODY_BYTES", "1MiB")
            .set("IDMATCH_CREDENTIALS_RELOAD_INTERVAL", "50ms")
            .set("IDMATCH_SECRET_FILE", secret_file.to_str().unwrap());
        config.env.remove("IDMATCH_SECRET");
        config
    };
    let main = serving(&h2.url(BASE));
    let mut proxies = vec![
        ("h2 upstream", Binary::serve(&main.env)),
        (
            "http/1.1 upstream",
            Binary::serve(&serving(&h1.url(BASE)).env),
        ),
        (
            "untrusted upstream",
            Binary::serve(&serving(&untrusted.url(BASE)).env),
        ),
        (
            "refused upstream",
            Binary::serve(&serving(&format!("https://{}{BASE}", refused.addr)).env),
        ),
    ];
    let [proxy, proxy_h1, proxy_untrusted, proxy_refused] =
        [0, 1, 2, 3].map(|i| (proxies[i].1.addr, proxies[i].1.admin));

    // Successes, over HTTP/1.1 and h2c, to both upstreams.
    let swap = json!({"phoneNumber": "+31610000001", "serviceType": "timestamp"});
    let url = |addr: std::net::SocketAddr, path: &str| format!("http://{addr}{path}");
    for (name, client) in [("http/1.1", http1()), ("h2c", h2c())] {
        for (upstream, (addr, _)) in [("h2", proxy), ("http/1.1", proxy_h1)] {
            let what = format!("{name} to the {upstream} upstream");
            let request = post_json(&url(addr, "/sim-swap"), swap.clone());
            assert_eq!(
                sweep.send(&what, &client, request).await,
                StatusCode::OK,
                "{what}"
            );
            let request = post_json(&url(addr, "/reject-once"), json!({}));
            assert_eq!(
                sweep.send(&what, &client, request).await,
                StatusCode::OK,
                "{what}"
            );
            let request = post_json(&url(addr, "/always-401"), json!({}));
            let status = sweep.send(&what, &client, request).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
            let request = get(&url(addr, "/number-verify/unknown?phone=%2B31610000001"));
            sweep.send(&what, &client, request).await;
        }
    }
    // A streamed body is not replayed after a 401.
    let chunked = b"POST /always-401 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
        Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    for (addr, _) in [proxy, proxy_h1] {
        let response = sweep.raw("streamed 401", addr, chunked).await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    }

    // The proxy's own answers.
    let (addr, _) = proxy;
    let refusals: [(&[u8], &str); 6] = [
        (b"CONNECT api.cm.com:443 HTTP/1.1\r\nHost: api.cm.com:443\r\nConnection: close\r\n\r\n", "405"),
        (b"TRACE / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client\r\nConnection: close\r\n\r\n", "405"),
        (b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", "421"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "400"),
        (b"POST /sim-swap HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n", "413"),
        (b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", "504"),
    ];
    for (request, status) in refusals {
        let response = sweep.raw("a refusal", addr, request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{response}"
        );
    }
    // Clients that go away: waiting for the response, and in the middle of the body.
    abort(
        addr,
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        Duration::from_millis(200),
    )
    .await;
    abort(
        addr,
        b"POST /sim-swap HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"phone",
        Duration::from_millis(50),
    )
    .await;

    // Upstreams the token must not reach, or cannot.
    for (what, (addr, _), code) in [
        ("untrusted", proxy_untrusted, "tls_certificate_error"),
        ("refused", proxy_refused, "connection_refused"),
    ] {
        for client in [http1(), h2c()] {
            let answer = send(&client, post_json(&url(addr, "/sim-swap"), swap.clone())).await;
            assert_eq!(
                sweep.answer(what, &answer),
                StatusCode::BAD_GATEWAY,
                "{what}"
            );
            assert_eq!(answer.json()["error"]["code"], code, "{what}");
        }
    }

    // Rotation: the file changes, then briefly holds nothing usable, then changes again.
    let client = http1();
    let newest = || tokens_seen(&h2).last().cloned().unwrap();
    std::fs::write(&secret_file, format!("{ROTATED}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while verify(&newest(), ROTATED).is_err() {
        assert!(Instant::now() < deadline, "the rotated secret was not used");
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweep
            .send("after rotation", &client, get(&url(addr, "/plain")))
            .await;
    }
    let failed_reloads = "idmatch_proxy_credential_reloads_total{outcome=\"failure\"}";
    let failed_before = scrape(proxy.1, failed_reloads).await;
    std::fs::write(&secret_file, "").unwrap();
    eventually(
        Duration::from_secs(5),
        "the empty secret file read",
        || async { scrape(proxy.1, failed_reloads).await > failed_before },
    )
    .await;
    sweep
        .send("during a failed reload", &client, get(&url(addr, "/plain")))
        .await;
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while verify(&newest(), SECRET).is_err() {
        assert!(
            Instant::now() < deadline,
            "the restored secret was not used"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweep
            .send("after restoring", &client, get(&url(addr, "/plain")))
            .await;
    }

    // The admin endpoints.
    let mut metrics = String::new();
    for (name, (_, admin)) in [
        ("main", proxy),
        ("untrusted", proxy_untrusted),
        ("refused", proxy_refused),
    ] {
        for path in ["/metrics", "/readyz", "/livez"] {
            let answer = send(&client, get(&format!("http://{admin}{path}"))).await;
            sweep.answer(&format!("{name} {path}"), &answer);
            if name == "main" && path == "/metrics" {
                metrics = text(&answer.body);
            }
        }
    }
    for (metric, what) in [
        (
            "idmatch_proxy_upstream_retries_total{reason=\"unauthorized\"}",
            "a 401 replayed",
        ),
        (
            "idmatch_proxy_unauthorized_not_replayed_total",
            "a 401 not replayed",
        ),
        (
            "idmatch_proxy_token_mints_total{trigger=\"rotation\"}",
            "a rotation",
        ),
        (
            "idmatch_proxy_credential_reloads_total{outcome=\"failure\"}",
            "a failed reload",
        ),
    ] {
        let count = metrics
            .lines()
            .find_map(|line| line.strip_prefix(metric))
            .and_then(|value| value.trim().parse::<f64>().ok());
        assert!(
            count.is_some_and(|n| n >= 1.0),
            "the sweep covers {what}:\n{metrics}"
        );
    }

    // The command line: `check`, `token`, and refused configurations.
    let command_line = tokio::task::block_in_place(|| {
        let mut inline = main.env.clone();
        inline.remove("IDMATCH_SECRET_FILE");
        inline.insert("IDMATCH_SECRET".into(), SECRET.into());
        let check = run(&["check"], &main.env);
        assert!(check.status.success(), "check: {}", text(&check.stderr));
        let token = run(&["token"], &inline);
        assert!(token.status.success(), "token: {}", text(&token.stderr));

        let config_file = secret_dir.path().join("config.toml");
        let mut refusals = Vec::new();
        for (what, file, extra) in [
            (
                "plain http",
                None,
                vec![("IDMATCH_UPSTREAM_URL", "http://api.cm.com/v1")],
            ),
            (
                "two secrets",
                None,
                vec![("IDMATCH_SECRET_FILE", secret_file.to_str().unwrap())],
            ),
            (
                "the secret in the file",
                Some(format!("[credentials]\nsecret = \"{SECRET}\"\n")),
                vec![],
            ),
            (
                "the secret in broken TOML",
                Some(format!("[credentials]\nsecret = \"{SECRET}\n")),
                vec![],
            ),
            (
                "the secret unquoted",
                Some(format!("[credentials]\nsecret = {SECRET}\n")),
                vec![],
            ),
        ] {
            let mut env = inline.clone();
            env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
            let mut args = vec![];
            if let Some(contents) = file {
                std::fs::write(&config_file, contents).unwrap();
                args = vec!["--config", config_file.to_str().unwrap()];
            }
            let output = run(&args, &env);
            assert_eq!(
                output.status.code(),
                Some(78),
                "{what}: {}",
                text(&output.stderr)
            );
            let stderr = text(&output.stderr);
            assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
            refusals.push((what, output));
        }
        (check, token, refusals)
    });
    let (check, token, refusals) = command_line;
    sweep.saw("check stdout", text(&check.stdout));
    sweep.saw("check stderr", text(&check.stderr));
    sweep.saw("token stderr", text(&token.stderr));
    for (what, output) in refusals {
        sweep.saw(format!("{what}: stdout"), text(&output.stdout));
        sweep.saw(format!("{what}: stderr"), text(&output.stderr));
    }
    let printed = text(&token.stdout).trim_end().to_owned();
    assert!(
        verify(&printed, SECRET).is_ok(),
        "token prints a valid token: {printed}"
    );

    // Stop every proxy and take all of its log.
    let mut trace_events = 0;
    for (name, binary) in &mut proxies {
        binary.signal("TERM");
        let (status, logs) = tokio::task::block_in_place(|| binary.finish(Duration::from_secs(10)));
        assert_eq!(
            status.code(),
            Some(0),
            "{name} exits 0:\n{}",
            logs.join("\n")
        );
        trace_events += logs
            .iter()
            .filter(|line| line.contains(r#""level":"TRACE""#))
            .count();
        for line in logs {
            sweep.saw(format!("{name} log"), line);
        }
    }
    assert!(trace_events > 0, "RUST_LOG=trace took effect");

    // The token went only to the configured, trusted upstreams.
    assert!(
        untrusted.connections_accepted() > 0,
        "the untrusted upstream was tried"
    );
    assert_eq!(
        untrusted.tls_handshakes_completed(),
        0,
        "no TLS session with it"
    );
    assert_eq!(
        untrusted.request_count(),
        0,
        "no request, so no token, reached it"
    );

    // What must not appear anywhere.
    let mut tokens = tokens_seen(&h2);
    tokens.extend(tokens_seen(&h1));
    tokens.push(printed);
    let tokens = tokens.into_iter().collect::<BTreeSet<_>>();
    assert!(
        tokens.iter().any(|t| verify(t, ROTATED).is_ok())
            && tokens.iter().any(|t| verify(t, SECRET).is_ok()),
        "tokens of both secrets were minted"
    );
    let mut forbidden = vec![
        SECRET.to_owned(),
        ROTATED.to_owned(),
        "Bearer ey".to_owned(),
        JWT_HEADER.to_owned(),
    ];
    for token in &tokens {
        forbidden.push(token.clone());
        forbidden.push(token.rsplit('.').next().unwrap().to_owned());
    }
    for (what, output) in &sweep.outputs {
        for secret in &forbidden {
            assert!(
                !output.contains(secret.as_str()),
                "{what} holds a credential: {output}"
            );
        }
        assert!(!output.contains("panicked"), "{what}: {output}");
    }
    println!(
        "secrets sweep: {} outputs searched for {} credentials ({} distinct tokens) in {:?}",
        sweep.outputs.len(),
        forbidden.len(),
        tokens.len(),
        started.elapsed()
    );
}
