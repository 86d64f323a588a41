//! The README's API examples, run as a reader would run them: each `curl` line of "Calling the
//! API through it" is run by the real `curl` against the mock behind two real proxies (the
//! `demo`'s), and what curl prints must be what the README shows under it.

use std::process::Command;

use idmatch_mock::demo::{Demo, Ports};

/// The README's section whose examples are checked.
const SECTION: &str = "## Calling the API through it";

/// One `curl` line of the README and the answer it shows (`# → …`), where `…` stands for any
/// characters but a quote (ids, times).
#[derive(Debug)]
struct Example {
    command: String,
    shown: String,
}

/// The examples of `SECTION`: logical lines of its `sh` blocks (a trailing `\` continues one),
/// each `curl` line followed by the `# → ` line that shows its answer.
fn examples(readme: &str) -> Vec<Example> {
    let start = readme
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let section = &readme[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut examples = Vec::new();
    let mut in_sh = false;
    let mut command = String::new();
    let mut pending: Option<String> = None;
    for line in section.lines() {
        match line.trim_end() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            line if in_sh => {
                if let Some(shown) = line.trim_start().strip_prefix("# → ") {
                    let command = pending.take().unwrap_or_else(|| {
                        panic!("README.md: the answer {shown:?} follows no curl line")
                    });
                    examples.push(Example {
                        command,
                        shown: shown.to_owned(),
                    });
                } else if !line.trim_start().starts_with('#') && !line.trim().is_empty() {
                    command.push_str(line.trim().trim_end_matches('\\'));
                    command.push(' ');
                    if !line.ends_with('\\') {
                        let complete = std::mem::take(&mut command);
                        assert!(
                            pending.replace(complete.trim().to_owned()).is_none(),
                            "README.md: a curl line shows no answer (add `# → …` under it)"
                        );
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        pending.is_none(),
        "README.md: the last curl line shows no answer"
    );
    examples
}

/// Whether `text` is `pattern`, where each `…` in `pattern` matches any run of characters
/// without a quote.
fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('…');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for part in parts {
        // The shortest wildcard run that keeps the rest matchable, never across a quote.
        let mut found = false;
        for (at, _) in rest.match_indices(part) {
            if !rest[..at].contains('"') {
                rest = &rest[at + part.len()..];
                found = true;
                break;
            }
        }
        if !found {
            return false;
        }
    }
    rest.is_empty()
}

#[test]
fn the_wildcard_matches_only_within_a_string() {
    assert!(matches(
        r#"{"id":"…","state":"pending"}"#,
        r#"{"id":"6f8d","state":"pending"}"#
    ));
    assert!(!matches(
        r#"{"id":"…","state":"pending"}"#,
        r#"{"id":"6f8d","state":"failed"}"#
    ));
    assert!(!matches(r#"{"id":"…"}"#, r#"{"id":"a","x":"b"}"#));
    assert!(!matches(r#"{"a":1}"#, r#"{"a":1} "#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_example_answers_as_shown() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md is readable");
    let examples = examples(&readme);
    for endpoint in [
        "/sim-swap",
        "/identity-match",
        "/number-verify ",
        "/number-verify/<id>",
        "/verify ",
        "/verify/<id>",
    ] {
        assert!(
            examples.iter().any(|e| e.command.contains(endpoint)),
            "README.md shows no example for {endpoint:?}"
        );
    }

    let demo = Demo::start(Ports::any()).await.expect("the demo starts");
    let mut last_id = None::<String>;
    for example in &examples {
        let mut command = example
            .command
            .replace("127.0.0.1:8080", &demo.mobile_identity.addr.to_string())
            .replace("127.0.0.1:8081", &demo.verification.addr.to_string());
        if command.contains("<id>") {
            let id = last_id
                .as_deref()
                .expect("an earlier example answered an id");
            command = command.replace("<id>", id);
        }
        let output =
            tokio::task::spawn_blocking(move || Command::new("sh").arg("-c").arg(command).output())
                .await
                .unwrap()
                .expect("curl runs (Debian package curl; .ci/run installs it)");
        let printed = String::from_utf8_lossy(&output.stdout);
        let printed = printed.trim_end();
        assert!(
            output.status.success() && matches(&example.shown, printed),
            "README.md: `{}` printed\n  {printed}\nbut the README shows\n  {}",
            example.command,
            example.shown
        );
        if let Ok(answer) = serde_json::from_str::<serde_json::Value>(printed) {
            if let Some(id) = answer.get("id").and_then(|id| id.as_str()) {
                last_id = Some(id.to_owned());
            }
        }
    }
    demo.stop().await.expect("the demo stops");
}
