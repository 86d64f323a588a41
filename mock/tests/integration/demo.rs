//! The demo (`mock-upstream demo`): the mock and two real proxies, one request per endpoint,
//! each printed under the `curl` line that sends it; and that line, run by the real `curl`,
//! answers the same.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use idmatch_mock::demo::{Demo, Ports};
use serde_json::Value;

/// The printed tour as (`curl` line, answer) pairs.
fn pairs(printed: &str) -> Vec<(String, String)> {
    let mut lines = printed.lines();
    let mut pairs = Vec::new();
    while let Some(line) = lines.next() {
        if let Some(command) = line.strip_prefix("$ ") {
            let answer = lines.next().expect("an answer under each curl line");
            pairs.push((command.to_owned(), answer.to_owned()));
        }
    }
    pairs
}

/// An answer without the values that differ on every call (new ids and session URLs).
fn comparable(answer: &str) -> Value {
    let mut value: Value = serde_json::from_str(answer)
        .unwrap_or_else(|e| panic!("the demo printed an answer that is not JSON ({e}): {answer}"));
    if let Some(object) = value.as_object_mut() {
        object.remove("id");
        object.remove("sessionUrl");
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_printed_curl_line_answers_what_the_demo_printed() {
    let demo = Demo::start(Ports::any()).await.expect("the demo starts");
    let mut printed = Vec::new();
    demo.tour(&mut printed).await.expect("the tour runs");
    let printed = String::from_utf8(printed).unwrap();
    let pairs = pairs(&printed);
    let paths: Vec<&str> = pairs
        .iter()
        .map(|(command, _)| {
            let url = command
                .split(' ')
                .find(|w| w.starts_with("http://"))
                .unwrap();
            url.splitn(4, '/').nth(3).unwrap()
        })
        .collect();
    assert_eq!(paths.len(), 6, "{printed}");
    for (expected, path) in [
        "sim-swap",
        "identity-match",
        "number-verify",
        "number-verify/",
        "verify",
        "verify/",
    ]
    .iter()
    .zip(&paths)
    {
        assert!(
            path.starts_with(expected),
            "{path} is not {expected}: {printed}"
        );
    }

    for (command, answer) in pairs {
        assert!(!answer.contains("(HTTP "), "{command}\n{answer}");
        let output = tokio::task::spawn_blocking({
            let command = command.clone();
            move || Command::new("sh").arg("-c").arg(command).output()
        })
        .await
        .unwrap()
        .expect("curl runs (Debian package curl)");
        assert!(output.status.success(), "{command}");
        let again = String::from_utf8(output.stdout).unwrap();
        assert_eq!(comparable(&again), comparable(&answer), "{command}");
    }
    demo.stop().await.expect("the demo stops");
}

#[test]
fn the_binary_tours_then_stops_on_one_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-upstream"))
        .args(["demo", "--free-ports"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }
    assert_eq!(pairs(&printed).len(), 6, "{printed}");
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(logs.contains("sim-swap"), "no request logged: {logs}");
}
