//! The real binary's life: drain on SIGTERM under load, a second signal, the health check
//! command, worker sizing, and what its logs say (and never say).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use idmatch_mock::server::json;
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;

async fn upstream(pki: &TestPki, delay: Duration) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(move |_: Request<hyper::body::Incoming>| async move {
            tokio::time::sleep(delay).await;
            json(StatusCode::OK, json!({"ok": true}))
        })
        .start()
        .await
}

fn env_for(
    upstream: &RunningServer,
    pki: &TestPki,
    extra: &[(&str, &str)],
) -> (ProxyConfig, HashMap<String, String>) {
    let mut config = ProxyConfig::new(&upstream.url(BASE), pki);
    for (key, value) in extra {
        config = config.set(key, value);
    }
    let env = config.env.clone();
    (config, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_steady_load_loses_no_request() {
    sigterm_under_steady_load(&[]).await;
}

/// One worker (a sidecar with one CPU): the same guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_steady_load_loses_no_request_with_one_worker() {
    sigterm_under_steady_load(&[("IDMATCH_WORKER_THREADS", "1")]).await;
}

async fn sigterm_under_steady_load(extra: &[(&str, &str)]) {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::from_millis(20)).await;
    let settings = [
        ("IDMATCH_DRAIN_DELAY", "1500ms"),
        ("IDMATCH_SHUTDOWN_TIMEOUT", "5s"),
    ];
    let (_config, env) = env_for(&upstream, &pki, &[&settings[..], extra].concat());
    let mut proxy = Binary::serve(&env);
    let client = http1();
    let url = proxy.url("/sim-swap");

    // Open loop: one request every 10 ms whatever the answers, for 1.5 s; SIGTERM after 0.5 s,
    // so the last second of traffic falls inside the drain delay.
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut signalled = false;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_millis(1500) {
        tick.tick().await;
        if !signalled && started.elapsed() >= Duration::from_millis(500) {
            proxy.signal("TERM");
            signalled = true;
        }
        let (client, request) = (client.clone(), post_json(&url, json!({})));
        sent.push(tokio::spawn(async move {
            client.request(request).await.map(|r| r.status())
        }));
    }
    let total = sent.len();
    let mut failed = Vec::new();
    for task in sent {
        match task.await.unwrap() {
            Ok(StatusCode::OK) => {}
            other => failed.push(format!("{other:?}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} failed: {failed:?}",
        failed.len()
    );
    assert!(total > 100, "{total}");

    let stopping = Instant::now();
    let status = proxy.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    // New connections are refused after the drain.
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::from_secs(60)).await;
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_DRAIN_DELAY", "30s")]);
    let mut proxy = Binary::serve(&env);
    let client = http1();
    let url = proxy.url("/stuck");
    let _stuck = tokio::spawn(async move { client.request(get(&url)).await.map(|r| r.status()) });
    eventually(
        Duration::from_secs(5),
        "the request at the upstream",
        || std::future::ready(upstream.request_count() > 0),
    )
    .await;
    proxy.signal("TERM");
    // Until the first signal is logged, a second one would race the handler's installation.
    eventually(Duration::from_secs(5), "the first signal logged", || {
        std::future::ready(
            proxy
                .logs()
                .iter()
                .any(|l| l.contains("shutdown requested")),
        )
    })
    .await;
    let started = Instant::now();
    proxy.signal("INT");
    let status = proxy.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn healthcheck_command_follows_readiness() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[]);
    let proxy = Binary::serve(&env);
    let healthcheck = |args: &[String], env: &HashMap<String, String>| {
        Binary::command()
            .arg("healthcheck")
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    };
    let url = format!("http://{}/readyz", proxy.admin);
    let ok = healthcheck(&["--url".into(), url], &HashMap::new());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Without --url, the admin listener from the configuration is used; 0.0.0.0 means loopback.
    let mut from_config = env.clone();
    from_config.insert(
        "IDMATCH_ADMIN_LISTEN".into(),
        format!("0.0.0.0:{}", proxy.admin.port()),
    );
    assert!(healthcheck(&[], &from_config).status.success());

    let closed = refusing_port();
    let url = format!("http://{}/readyz", closed.addr);
    let down = healthcheck(&["--url".into(), url.clone()], &HashMap::new());
    assert_eq!(down.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&down.stderr),
        format!("idmatch-proxy: cannot connect to {url}: connection refused\n")
    );

    // Without --url and without a configuration that loads, there is no address to ask: no
    // guess at a default, which another process could be answering.
    let mut broken = env.clone();
    broken.insert("IDMATCH_TOKEN_LIFETIME".into(), "abc".into());
    let unknown = healthcheck(&[], &broken);
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.starts_with("idmatch-proxy: healthcheck: cannot tell the admin address")
            && stderr.contains("IDMATCH_TOKEN_LIFETIME")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    // With --url the configuration is not needed.
    let url = format!("http://{}/readyz", proxy.admin);
    assert!(healthcheck(&["--url".into(), url], &broken)
        .status
        .success());
}

/// `POST /quitquitquit` on the admin listener, from loopback: the drain SIGTERM starts, and the
/// health check says so plainly.
#[tokio::test]
async fn quitquitquit_drains_and_exits_0() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_DRAIN_DELAY", "2s")]);
    let mut proxy = Binary::serve(&env);
    let client = http1();
    let quit = Request::post(format!("http://{}/quitquitquit", proxy.admin))
        .body(Default::default())
        .unwrap();
    let answer = send(&client, quit).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.json()["status"], "draining");

    // Draining: not ready, still serving.
    let url = format!("http://{}/readyz", proxy.admin);
    let draining = eventually_some(Duration::from_secs(5), "healthcheck failing", || {
        let check = Binary::command()
            .args(["healthcheck", "--url", &url])
            .output()
            .unwrap();
        std::future::ready((!check.status.success()).then_some(check))
    })
    .await;
    assert_eq!(draining.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&draining.stderr),
        format!("idmatch-proxy: {url} answered 503: draining\n")
    );
    assert_eq!(
        send(&client, get(&proxy.url("/sim-swap"))).await.status,
        StatusCode::OK
    );

    let (status, logs) = proxy.finish(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("shutdown requested by POST /quitquitquit")),
        "{logs:#?}"
    );
    assert!(logs.last().unwrap().contains("\"stopped\""), "{logs:#?}");
}

/// With no drain delay the process stops right after answering: the answer still arrives whole.
#[tokio::test]
async fn quitquitquit_is_answered_before_an_immediate_exit() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[]);
    let mut proxy = Binary::serve(&env);
    let answer = raw(
        proxy.admin,
        b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202 "), "{answer:?}");
    assert!(answer.ends_with(r#"{"status":"draining"}"#), "{answer:?}");
    assert!(proxy.wait(Duration::from_secs(10)).success());
}

/// A stop signal during a drain that `/quitquitquit` started counts as the first one: the
/// drain goes on, and the next signal exits at once.
#[tokio::test]
async fn after_quitquitquit_a_signal_is_the_first_and_the_next_exits_at_once() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_DRAIN_DELAY", "30s")]);
    let mut proxy = Binary::serve(&env);
    let quit = Request::post(format!("http://{}/quitquitquit", proxy.admin))
        .body(Default::default())
        .unwrap();
    assert_eq!(send(&http1(), quit).await.status, StatusCode::ACCEPTED);
    let logged = |proxy: &Binary, text: &str| proxy.logs().iter().any(|l| l.contains(text));
    eventually(Duration::from_secs(5), "draining logged", || {
        std::future::ready(logged(&proxy, "draining: readiness is 503"))
    })
    .await;
    proxy.signal("TERM");
    eventually(Duration::from_secs(5), "SIGTERM logged", || {
        std::future::ready(logged(&proxy, "\"signal\":\"SIGTERM\""))
    })
    .await;
    assert!(proxy
        .logs()
        .iter()
        .all(|l| !l.contains("second stop signal")));
    proxy.signal("TERM");
    assert_eq!(proxy.wait(Duration::from_secs(5)).code(), Some(130));
}

/// `pretty` asked for, stderr a pipe (as in every test): no colour escape sequences.
#[test]
fn pretty_logs_into_a_pipe_have_no_colours() {
    use std::io::BufRead;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = TestPki::localhost();
    let upstream = rt.block_on(upstream(&pki, Duration::ZERO));
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_LOG_FORMAT", "pretty")]);
    let mut child = Binary::command()
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let ready = line.contains("idmatch-proxy ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains("idmatch-proxy ready")),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "{lines:#?}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&lines[0]).is_err(),
        "pretty, not JSON"
    );
}

#[tokio::test]
async fn workers_follow_the_cpus_we_may_use_unless_set() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let workers = |env: &HashMap<String, String>| {
        let proxy = Binary::serve(env);
        let ready = proxy
            .logs()
            .into_iter()
            .find(|l| l.contains("idmatch-proxy ready"))
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&ready).unwrap()["workers"]
            .as_u64()
            .unwrap()
    };
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_WORKER_THREADS", "3")]);
    assert_eq!(workers(&env), 3);
    // `taskset` limits the CPUs like a container's CPU quota would; `auto` follows either.
    let (_config, env) = env_for(&upstream, &pki, &[]);
    let proxy = Binary::serve_pinned(&env, "0");
    let ready = proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("idmatch-proxy ready"))
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready).unwrap()["workers"],
        1
    );
}

#[tokio::test]
async fn one_access_log_line_per_request_with_the_query_redacted() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[]);
    let mut proxy = Binary::serve(&env);
    let client = http1();
    let request = Request::post(proxy.url("/sim-swap?phoneNumber=%2B31610000001"))
        .header("x-request-id", "trace-me-1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let answer = send(&client, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    proxy.signal("TERM");
    let (_, logs) = proxy.finish(Duration::from_secs(10));
    let access: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "idmatch_proxy::access")
        .collect();
    assert_eq!(access.len(), 1, "{logs:#?}");
    let line = &access[0];
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/sim-swap?<redacted>");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"], answer.body.len());
    assert_eq!(line["request_id"], "trace-me-1");
    assert_eq!(line["complete"], true);
    assert!(line["duration_ms"].as_f64().unwrap() >= line["upstream_ms"].as_f64().unwrap());
    // Milliseconds to the microsecond, without float noise such as 3.4104389999999998.
    let raw = logs.iter().find(|l| l.contains("trace-me-1")).unwrap();
    for field in ["duration_ms", "upstream_ms"] {
        let value = raw.split(&format!("\"{field}\":")).nth(1).unwrap();
        let number = value.split([',', '}']).next().unwrap();
        let decimals = number.split_once('.').map_or(0, |(_, f)| f.len());
        assert!(decimals <= 3, "{field}: {number}");
    }
    assert!(
        !logs.iter().any(|l| l.contains("31610000001")),
        "a phone number reached the logs"
    );
}

/// Lines are collected per runtime thread and written in batches: under a burst none is lost,
/// cut or interleaved, each comes out while the proxy runs, and the last ones on exit.
async fn every_line_of_a_burst_arrives_whole(workers: &str) {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[("IDMATCH_WORKER_THREADS", workers)]);
    let mut proxy = Binary::serve(&env);
    let client = http1();
    let burst: Vec<_> = (0..300)
        .map(|i| {
            let request = Request::get(proxy.url(&format!("/burst/{i}")))
                .header("x-request-id", format!("burst-{i}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let client = client.clone();
            tokio::spawn(async move { client.request(request).await.unwrap().status() })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    let access_ids = |logs: &[String]| -> Vec<String> {
        logs.iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a whole JSON line"))
            .filter(|e| e["target"] == "idmatch_proxy::access")
            .map(|e| e["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Out while the proxy runs: it went idle after the burst.
    eventually(Duration::from_secs(5), "300 access lines", || {
        std::future::ready(access_ids(&proxy.logs()).len() >= 300)
    })
    .await;
    assert_eq!(access_ids(&proxy.logs()).len(), 300);

    proxy.signal("TERM");
    let (status, logs) = proxy.finish(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let mut ids = access_ids(&logs);
    ids.sort_unstable();
    let mut expected: Vec<String> = (0..300).map(|i| format!("burst-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert!(
        logs.last().unwrap().contains("\"stopped\""),
        "{:?}",
        logs.last()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_burst_arrives_whole_with_one_worker() {
    every_line_of_a_burst_arrives_whole("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_burst_arrives_whole_with_two_workers() {
    every_line_of_a_burst_arrives_whole("2").await;
}

/// `benches/pgo.sh` trains the profile-guided build with `pgo-train`: its whole mix must get
/// the answers it expects through the real binary (a profile of failures would optimise the
/// wrong paths), and the binary must exit normally on SIGTERM, which is when it writes the
/// profile.
#[test]
fn the_pgo_training_mix_runs_through_the_binary_and_it_exits_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let proxy = std::path::Path::new(env!("CARGO_BIN_EXE_idmatch-proxy"));
    let answered = idmatch_mock::train::run(proxy, work.path(), 25).unwrap();
    // 8 connections × 25, the 250 rare requests, twice (access log on, then off).
    assert_eq!(answered, 2 * (8 * 25 + 250));
}

/// A head hyper refuses (and answers itself) still gets an access-log line: the peer and
/// hyper's reason, never the bytes received.
#[tokio::test]
async fn a_request_hyper_refuses_is_logged_without_its_bytes() {
    let pki = TestPki::localhost();
    let upstream = upstream(&pki, Duration::ZERO).await;
    let (_config, env) = env_for(&upstream, &pki, &[]);
    let mut proxy = Binary::serve(&env);
    let answer = raw(
        proxy.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\nmarker-7f3a without a colon\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    proxy.signal("TERM");
    let (_, logs) = proxy.finish(Duration::from_secs(10));
    let access: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "idmatch_proxy::access")
        .collect();
    assert_eq!(access.len(), 1, "{logs:#?}");
    let line = &access[0];
    assert_eq!(line["status"], 400);
    assert_eq!(line["error"], "http_request_error");
    assert_eq!(line["reason"], "invalid HTTP header parsed");
    assert!(
        line["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(!logs.iter().any(|l| l.contains("marker-7f3a")), "{logs:#?}");
}
