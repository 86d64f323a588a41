//! Properties of the request path under hostile input, checked on generated cases:
//!
//! - header rewriting (`headers::rewrite_request`, `headers::remove_hop_by_hop`): whatever the
//!   client sends, exactly one `Authorization` (ours) leaves, no hop-by-hop field and nothing
//!   `Connection` names does, and everything else passes in order (`Host` too: the pool then
//!   puts the upstream's in its place, or removes it for h2, which the end-to-end case checks);
//! - URI joining (`upstream::join_uri`, behind a base path parsed by the config): the upstream's
//!   scheme and authority, and `base path + path-and-query` byte for byte, whatever the target;
//! - the config parser: any TOML-ish text and environment never panics, and every error is one
//!   line without the secret;
//! - end to end, through the proxy on a socket to recording TLS upstreams (HTTP/1.1 and h2, from
//!   HTTP/1.1 and h2c clients): the upstream sees one `Authorization: Bearer <valid JWT>`, its
//!   own authority, and the target it was sent.
//!
//! The pure properties are checked here rather than by a fuzzer in CI: they are cheap enough to
//! run thousands of cases in a second, and proptest shrinks a failure to a minimal input.
//! Each property runs a bounded number of cases from a fixed seed, so that CI is reproducible
//! and no regression file is needed; `PROPTEST_CASES=<n>` and `PROPTEST_RNG_SEED=<u64>` explore
//! further by hand. Each prints how many cases it ran (`-- --nocapture` shows it).

mod support;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST, PROXY_AUTHORIZATION};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version};
use idmatch_mock::server::{full, Body};
use idmatch_mock::{Server as Upstream, TestPki};
use idmatch_proxy::config::Config;
use idmatch_proxy::headers::{remove_hop_by_hop, rewrite_request};
use idmatch_proxy::upstream::{join_uri, InvalidTarget};
use proptest::prelude::*;
use proptest::test_runner::{Config as Settings, RngSeed, TestCaseError, TestRunner};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The seed of every property unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0x1d_4a7c;

/// The fewest cases a property runs, whatever `PROPTEST_CASES` says.
const MIN_CASES: u32 = 32;

/// Runs `property` on `cases` values of `strategy` (or `PROPTEST_CASES`, at least
/// [`MIN_CASES`]), shrinking a failure to
/// a minimal one, and prints how many cases ran.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Debug,
{
    let from_env = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok());
    // A floor, so that `PROPTEST_CASES=0` cannot make a property pass without running it.
    let cases = from_env("PROPTEST_CASES").map_or(cases, |n: u64| (n as u32).max(MIN_CASES));
    let seed = from_env("PROPTEST_RNG_SEED").unwrap_or(SEED);
    let mut runner = TestRunner::new(Settings {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // The seed reproduces any failure; nothing is written next to the sources.
        failure_persistence: None,
        ..Settings::default()
    });
    let ran = Cell::new(0u64);
    let result = runner.run(&strategy, |value| {
        ran.set(ran.get() + 1);
        property(value)
    });
    println!(
        "property {name}: {} cases run, seed {seed}, {}",
        ran.get(),
        if result.is_ok() { "passed" } else { "FAILED" }
    );
    if let Err(error) = result {
        panic!("property {name} failed (seed {seed}): {error}");
    }
    assert!(
        ran.get() >= u64::from(cases),
        "property {name}: too few cases run"
    );
}

// === Headers ===

/// RFC 9110 §7.6.1's fixed hop-by-hop fields, plus the two older ones clients still send.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
];

/// Names a client may send that the proxy treats specially, or that matter to the upstream.
const KNOWN_NAMES: [&str; 19] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "host",
    "authorization",
    "proxy-authorization",
    "content-type",
    "accept",
    "cookie",
    "traceparent",
    "forwarded",
    "via",
    "x-forwarded-for",
    "proxy-authenticate",
    "www-authenticate",
];

/// Names that the end-to-end property leaves out: they frame the body (`content-length`,
/// `transfer-encoding`), make the server wait (`expect`), or are replaced by the access log
/// layer (`x-request-id`), none of which is what it checks.
const FRAMING: [&str; 4] = [
    "content-length",
    "transfer-encoding",
    "expect",
    "x-request-id",
];

/// `name` with each letter's case chosen by a bit of `mask`.
fn random_case(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| match mask >> (i % 64) & 1 {
            1 => c.to_ascii_uppercase(),
            _ => c.to_ascii_lowercase(),
        })
        .collect()
}

/// A field name in random case: one the proxy treats specially, a common one, or any token.
fn field_name() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        3 => prop::sample::select(&KNOWN_NAMES[..]).prop_map(String::from),
        2 => "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}",
        2 => "x-[a-z0-9-]{1,6}",
    ];
    (name, any::<u64>()).prop_map(|(name, mask)| random_case(&name, mask))
}

/// Any field value bytes: visible ASCII, spaces and tabs, and obs-text (0x80-0xFF).
fn value_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        12 => 0x20u8..=0x7e,
        1 => Just(b'\t'),
        2 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..max)
}

/// A `Connection` value: a comma-separated list of names (any case, with optional whitespace),
/// with empty elements and elements that are no token at all.
fn connection_value() -> impl Strategy<Value = Vec<u8>> {
    let element = prop_oneof![
        5 => field_name().prop_map(String::into_bytes),
        1 => value_bytes(8).prop_map(|bytes| bytes.into_iter().filter(|&b| b != b',').collect()),
        1 => Just(Vec::new()),
    ];
    let space = prop::sample::select(vec![&b""[..], b" ", b"  ", b"\t", b" \t"]);
    prop::collection::vec((space.clone(), element, space), 0..5).prop_map(|elements| {
        let mut value = Vec::new();
        for (i, (before, element, after)) in elements.into_iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(before);
            value.extend_from_slice(&element);
            value.extend_from_slice(after);
        }
        value
    })
}

/// A client's header fields, in the order sent: duplicates, `Connection` fields naming anything
/// (ours included), credentials.
fn fields(max: usize) -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let field = prop_oneof![
        4 => (field_name(), value_bytes(24)),
        1 => (
            (Just("connection"), any::<u64>()).prop_map(|(n, mask)| random_case(n, mask)),
            connection_value()
        ),
    ];
    prop::collection::vec(field, 0..max)
}

fn header_map(fields: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("the generator makes tokens"),
            HeaderValue::from_bytes(value).expect("the generator makes field values"),
        );
    }
    map
}

/// What RFC 9110 §7.6.1 says `Connection` declares hop-by-hop: each comma-separated element,
/// without optional whitespace, that is a token. Elements that are not tokens name nothing.
fn named_by_connection(map: &HeaderMap) -> HashSet<HeaderName> {
    map.get_all(CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|element| {
            let element = element
                .iter()
                .position(|b| !matches!(b, b' ' | b'\t'))
                .map_or(&[][..], |start| &element[start..]);
            let end = element
                .iter()
                .rposition(|b| !matches!(b, b' ' | b'\t'))
                .map_or(0, |last| last + 1);
            HeaderName::from_bytes(&element[..end]).ok()
        })
        .collect()
}

/// Every field a proxy must not forward: the fixed hop-by-hop ones and those `Connection` names.
fn hop_by_hop(map: &HeaderMap) -> HashSet<HeaderName> {
    let mut names = named_by_connection(map);
    names.extend(HOP_BY_HOP.map(HeaderName::from_static));
    names
}

fn pairs(map: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    map.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

fn values(map: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    map.get_all(name).iter().cloned().collect()
}

#[test]
fn rewritten_requests_carry_exactly_our_credentials_and_the_clients_end_to_end_fields() {
    let ours = "Bearer [A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{8,40}\\.[A-Za-z0-9_-]{43}";
    check(
        "rewrite_request",
        2048,
        (fields(16), ours),
        |(fields, authorization)| {
            let authorization = HeaderValue::from_str(&authorization).unwrap();
            let input = header_map(&fields);
            let mut output = input.clone();
            rewrite_request(&mut output, authorization.clone());

            prop_assert_eq!(values(&output, &AUTHORIZATION), [authorization.clone()]);
            // `Host` passes here like any other field: the pool replaces it with the upstream's
            // (tests/rewrite.rs checks what the upstream receives, over HTTP/1.1 and h2).
            let mut dropped = hop_by_hop(&input);
            dropped.insert(PROXY_AUTHORIZATION);
            let ours = |name: &HeaderName| *name == AUTHORIZATION;
            for name in output.keys().filter(|name| !ours(name)) {
                prop_assert!(!dropped.contains(name), "{} was forwarded", name);
            }
            // Everything else, in order (a header map groups values by name, in order of the
            // name's first appearance), duplicates included.
            let expected = pairs(&input)
                .into_iter()
                .filter(|(name, _)| !dropped.contains(name) && !ours(name))
                .collect::<Vec<_>>();
            let kept = pairs(&output)
                .into_iter()
                .filter(|(name, _)| !ours(name))
                .collect::<Vec<_>>();
            prop_assert_eq!(kept, expected);

            // A replay rewrites the rewritten headers again: nothing changes.
            let mut again = output.clone();
            rewrite_request(&mut again, authorization);
            prop_assert_eq!(pairs(&again), pairs(&output));
            Ok(())
        },
    );
}

#[test]
fn responses_lose_exactly_their_hop_by_hop_fields() {
    check("remove_hop_by_hop", 2048, fields(16), |fields| {
        let input = header_map(&fields);
        let mut output = input.clone();
        remove_hop_by_hop(&mut output);
        let dropped = hop_by_hop(&input);
        let expected = pairs(&input)
            .into_iter()
            .filter(|(name, _)| !dropped.contains(name))
            .collect::<Vec<_>>();
        prop_assert_eq!(pairs(&output), expected);
        Ok(())
    });
}

/// What the properties above first found: a `Connection` value holding obs-text was skipped
/// whole, so the fields it named beside that byte went upstream.
#[test]
fn a_connection_value_with_obs_text_still_names_its_fields() {
    let mut headers = header_map(&[
        ("Connection".into(), b"\x80, X-Hop".to_vec()),
        ("x-hop".into(), b"1".to_vec()),
        ("x-end".into(), b"2".to_vec()),
    ]);
    remove_hop_by_hop(&mut headers);
    assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-end"]);
}

// === Request targets ===

/// Characters of a request target: RFC 3986 `pchar`, `/` and `?`, and `%` on its own.
const TARGET_CHARS: &str = "[A-Za-z0-9._~!$&'()*+,;=:@/?%-]";

/// A path-and-query built from single characters and the sequences that break naive joins and
/// normalisers: dot segments, empty segments, encoded slashes and question marks, stray `%`.
fn target_tail() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        6 => TARGET_CHARS.prop_map(String::from),
        1 => prop::sample::select(vec![
            "..", "/../", "/./", "//", "%2F", "%2f", "%3F", "%00", "%", "%zz", "+", "?", "&", "=",
            "&&", "==", "?&=", "%25", "%20",
        ])
        .prop_map(String::from),
    ];
    prop::collection::vec(atom, 0..24).prop_map(|atoms| atoms.concat())
}

/// An upstream authority: a name, IPv4 or IPv6 host, with or without a port.
fn authority() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,2}",
        Just("127.0.0.1".to_owned()),
        Just("[::1]".to_owned()),
        Just("api.cm.com".to_owned()),
    ];
    (host, prop::option::of(1u16..=u16::MAX)).prop_map(|(host, port)| match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// An upstream base path as an operator might write it, trailing slashes included.
fn base_path() -> impl Strategy<Value = String> {
    let segment = "[A-Za-z0-9._~!$&'()*+,;=:@%-]{0,8}";
    (prop::collection::vec(segment, 0..3), 0usize..3).prop_map(|(segments, slashes)| {
        let mut path = segments.iter().map(|s| format!("/{s}")).collect::<String>();
        path.push_str(&"/".repeat(slashes));
        path
    })
}

/// How the client wrote its target.
#[derive(Clone, Debug)]
enum Form {
    /// `/path?query`, as clients of an origin server do.
    Origin,
    /// `http://authority/path?query`: HTTP/1 absolute form (checked against our own socket
    /// before the join) or, in effect, HTTP/2 with any `:authority`.
    Absolute(String),
    /// `*` (`OPTIONS *`).
    Asterisk,
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        4 => Just(Form::Origin),
        2 => prop_oneof![
            authority(),
            Just("evil.example".to_owned()),
            Just("user:pass@127.0.0.1:8080".to_owned()),
            Just("169.254.169.254".to_owned()),
        ]
        .prop_map(Form::Absolute),
        1 => Just(Form::Asterisk),
    ]
}

/// The environment of a valid configuration forwarding to `url`.
fn env_for(url: &str) -> HashMap<String, String> {
    [
        ("IDMATCH_UPSTREAM_URL", url),
        ("IDMATCH_KEY_ID", KEY_ID),
        ("IDMATCH_SECRET", SECRET),
        ("IDMATCH_RATE_LIMIT_INTERVAL", "0s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[test]
fn upstream_uri_is_the_configured_origin_then_base_path_then_target_byte_for_byte() {
    check(
        "upstream_uri",
        2048,
        (authority(), base_path(), target_tail(), form()),
        |(authority, base, tail, form)| {
            let url = format!("https://{authority}{base}");
            let upstream = Config::from_parts(None, &env_for(&url))
                .map_err(|e| TestCaseError::fail(format!("{url} refused: {e}")))?
                .config
                .upstream;
            let trimmed = base.trim_end_matches('/');
            prop_assert_eq!(&upstream.base_path, trimmed);
            prop_assert_eq!(upstream.url(), format!("https://{authority}{trimmed}"));

            let path_and_query = format!("/{tail}");
            let target: Uri = match &form {
                Form::Origin => path_and_query.parse(),
                Form::Absolute(other) => format!("http://{other}{path_and_query}").parse(),
                Form::Asterisk => "*".parse(),
            }
            .map_err(|e| TestCaseError::fail(format!("target does not parse: {e}")))?;
            let joined = join_uri(
                &upstream.scheme,
                &upstream.authority,
                &upstream.base_path,
                &target,
            );
            if let Form::Asterisk = form {
                prop_assert_eq!(joined, Err(InvalidTarget));
                return Ok(());
            }
            // `http::Uri` keeps the target as written: no decoding, no dot-segment removal.
            prop_assert_eq!(
                target.path_and_query().map(|pq| pq.as_str()),
                Some(path_and_query.as_str())
            );
            let joined = joined.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
            prop_assert_eq!(joined.scheme(), Some(&Scheme::HTTPS));
            prop_assert_eq!(joined.authority(), Some(&upstream.authority));
            prop_assert_eq!(
                joined.authority().map(Authority::as_str),
                Some(authority.as_str())
            );
            let expected = format!("{trimmed}{path_and_query}");
            prop_assert_eq!(
                joined.path_and_query().map(|pq| pq.as_str()),
                Some(expected.as_str())
            );
            // What the client library writes is what it reads back.
            let reparsed: Uri = joined.to_string().parse().unwrap();
            prop_assert_eq!(reparsed, joined);
            Ok(())
        },
    );
}

// === The config parser ===

/// Every environment variable the proxy reads, but the secret (set by the case itself).
const ENV_KEYS: [&str; 36] = [
    "IDMATCH_LISTEN",
    "IDMATCH_ADMIN_LISTEN",
    "IDMATCH_DRAIN_DELAY",
    "IDMATCH_SHUTDOWN_TIMEOUT",
    "IDMATCH_WORKER_THREADS",
    "IDMATCH_UPSTREAM_URL",
    "IDMATCH_UPSTREAM_ROOTS",
    "IDMATCH_UPSTREAM_CA_FILE",
    "IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP",
    "IDMATCH_UPSTREAM_CONNECT_TIMEOUT",
    "IDMATCH_UPSTREAM_RESPONSE_TIMEOUT",
    "IDMATCH_UPSTREAM_PROXY",
    "IDMATCH_UPSTREAM_NO_PROXY",
    "IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES",
    "IDMATCH_UPSTREAM_MAX_IN_FLIGHT",
    "IDMATCH_KEY_ID",
    "IDMATCH_KEY_ID_FILE",
    "IDMATCH_SECRET_FILE",
    "IDMATCH_CREDENTIALS_RELOAD_INTERVAL",
    "IDMATCH_TOKEN_LIFETIME",
    "IDMATCH_TOKEN_REFRESH_BEFORE",
    "IDMATCH_TOKEN_MARGIN",
    "IDMATCH_TOKEN_BACKDATE",
    "IDMATCH_CLIENT_HEADER_TIMEOUT",
    "IDMATCH_CLIENT_IDLE_TIMEOUT",
    "IDMATCH_CLIENT_MAX_HEADER_BYTES",
    "IDMATCH_CLIENT_MAX_IN_FLIGHT",
    "IDMATCH_CLIENT_MAX_BODY_BYTES",
    "IDMATCH_LOG_FORMAT",
    "IDMATCH_LOG_REDACT_QUERY",
    "IDMATCH_CONFIG",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "RUST_LOG",
];

/// Keys of the config file, dotted and bare (inside a table header), and tables.
const FILE_KEYS: [&str; 24] = [
    "listen",
    "drain_delay",
    "shutdown_timeout",
    "worker_threads",
    "url",
    "roots",
    "ca_file",
    "allow_insecure_http",
    "connect_timeout",
    "proxy",
    "replay_buffer_bytes",
    "key_id",
    "key_id_file",
    "secret_file",
    "reload_interval",
    "lifetime",
    "margin",
    "format",
    "redact_query",
    "upstream.url",
    "token.lifetime",
    "credentials.key_id",
    "admin.listen",
    "\"upstream.url\"",
];

const TABLES: [&str; 8] = [
    "upstream",
    "credentials",
    "token",
    "client",
    "log",
    "admin",
    "upstream.proxy",
    "nonsense",
];

/// Values that some key accepts, so that cases get past the first key.
const PLAUSIBLE: [&str; 24] = [
    "127.0.0.1:0",
    "[::1]:0",
    "5s",
    "500ms",
    "2m",
    "0s",
    "60s",
    "auto",
    "3",
    "0",
    "true",
    "false",
    "webpki",
    "native",
    "json",
    "pretty",
    "64KiB",
    "1MiB",
    "https://api.cm.com/mobile-identity/v1",
    "http://127.0.0.1:1/x",
    "https://user:pw@api.cm.com/",
    "http://proxy.internal:3128",
    "*",
    "kid",
];

/// Files whose paths the cases use: the secret, and others for any path key, bad in each way.
/// The secret's path is not among them: given as the key id's file it would make the secret
/// the key id, which `check` shows and every token carries (an operator's mistake to avoid).
struct Files {
    _dir: tempfile::TempDir,
    secret: String,
    paths: Vec<String>,
}

fn files(secret: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let secret_file = write("secret", format!("{secret}\n").as_bytes());
    let paths = vec![
        write("other", b"not-the-secret\n"),
        write("empty", b""),
        write("latin1", b"\xe9t\xe9\n"),
        write("pem-junk", b"-----BEGIN CERTIFICATE-----\nAQIDBA==\n"),
        dir.path().to_str().unwrap().to_owned(),
        "/nonexistent/idmatch".to_owned(),
        // A newline and an escape in a path the error will name.
        "/nonexistent/line\nbreak".to_owned(),
        "/nonexistent/\u{1b}[2Jclear".to_owned(),
    ];
    Files {
        _dir: dir,
        secret: secret_file,
        paths,
    }
}

/// Any text: printable, controls, non-ASCII, and the quotes and brackets TOML cares about.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{0,16}",
        1 => "\\PC{0,12}",
        1 => "[\"'\\[\\]{}=,.\\\\\n\r\t\u{0}\u{1b}\u{7f}\u{85}\u{2028}a-z0-9]{0,12}",
    ]
}

fn value_text(paths: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&PLAUSIBLE[..]).prop_map(String::from),
        2 => prop::sample::select(paths),
        3 => any_text(),
    ]
}

/// Where the case puts the secret.
#[derive(Clone, Copy, Debug)]
enum SecretAt {
    /// `IDMATCH_SECRET`.
    Env,
    /// `IDMATCH_SECRET_FILE` naming a file holding it.
    EnvFile,
    /// `secret_file` in the config file.
    FileKey,
    /// In the config file itself, which is refused, written the ways an operator might, some
    /// of them broken TOML.
    Inline(usize),
    /// Both `IDMATCH_SECRET` and `IDMATCH_SECRET_FILE`, which is refused.
    Both,
    Nowhere,
}

/// The ways the secret may be written inline in the file; `{}` is the secret.
const INLINE: [&str; 8] = [
    "[credentials]\nsecret = \"{}\"",
    "credentials.secret = \"{}\"",
    "[credentials]\nsecret = '{}'",
    "[credentials]\nsecret = \"\"\"{}\"\"\"",
    "[credentials]\nsecret = \"{}",
    "[credentials]\nsecret = {}",
    "[credentials]\nsecret = \"{}\"\nsecret = \"{}\"",
    "credentials = { secret = \"{}\" }",
];

fn secret_at() -> impl Strategy<Value = SecretAt> {
    prop_oneof![
        4 => Just(SecretAt::Env),
        3 => Just(SecretAt::EnvFile),
        2 => Just(SecretAt::FileKey),
        2 => (0..INLINE.len()).prop_map(SecretAt::Inline),
        1 => Just(SecretAt::Both),
        1 => Just(SecretAt::Nowhere),
    ]
}

/// A TOML-ish file: table headers, keys with values of every TOML type and none, garbage.
fn toml_text(paths: Vec<String>) -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(&FILE_KEYS[..]).prop_map(String::from),
        1 => "[a-z_.]{1,10}",
    ];
    let quoted = value_text(paths).prop_map(|text| {
        // Rust's quoting, which TOML reads but for `\u{..}` escapes.
        format!("{text:?}")
    });
    let value = prop_oneof![
        4 => quoted,
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec!["true", "false", "[1, \"a\"]", "{ a = 1 }", "1979-05-27", "inf", ""])
            .prop_map(String::from),
        1 => any_text(),
    ];
    let line = prop_oneof![
        2 => prop::sample::select(&TABLES[..]).prop_map(|t| format!("[{t}]")),
        6 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any_text(),
    ];
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

fn environment(paths: Vec<String>) -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        6 => prop::sample::select(&ENV_KEYS[..]).prop_map(String::from),
        1 => "IDMATCH_[A-Z_]{1,10}",
    ];
    prop::collection::vec((key, value_text(paths)), 0..6)
}

#[test]
fn config_never_panics_and_errors_are_one_line_without_the_secret() {
    let secret = "pr0p-s3cret-7f3a9c1e5b2d8e4f";
    let files = files(secret);
    // Accepted (of which with our secret, the one that must never be shown), refused.
    let outcomes = Cell::new((0u32, 0u32, 0u32));
    check(
        "config",
        1024,
        (
            prop::option::weighted(0.6, toml_text(files.paths.clone())),
            environment(files.paths.clone()),
            secret_at(),
            prop::bool::weighted(0.9),
        ),
        |(file, environment, at, with_key_id)| {
            let mut env = environment.into_iter().collect::<HashMap<_, _>>();
            if with_key_id {
                env.insert("IDMATCH_KEY_ID".into(), KEY_ID.into());
            }
            let mut file = file.unwrap_or_default();
            match at {
                SecretAt::Env => {
                    env.insert("IDMATCH_SECRET".into(), secret.into());
                }
                SecretAt::EnvFile => {
                    env.insert("IDMATCH_SECRET_FILE".into(), files.secret.clone());
                }
                SecretAt::FileKey => {
                    file = format!("[credentials]\nsecret_file = {:?}\n{file}", files.secret);
                }
                SecretAt::Inline(i) => {
                    file = format!("{}\n{file}", INLINE[i].replace("{}", secret))
                }
                SecretAt::Both => {
                    env.insert("IDMATCH_SECRET".into(), secret.into());
                    env.insert("IDMATCH_SECRET_FILE".into(), files.secret.clone());
                }
                SecretAt::Nowhere => {}
            }
            let path = Path::new("/etc/idmatch/idmatch-proxy.toml");
            let source = (!file.is_empty()).then_some((path, file.as_str()));
            let (ok, ours_shown, refused) = outcomes.get();
            match Config::from_parts(source, &env) {
                Ok(loaded) => {
                    // Ours, unless the case named another file.
                    let credentials = &loaded.config.credentials;
                    let ours = credentials
                        .secret_file
                        .as_ref()
                        .is_none_or(|file| *file == Path::new(&files.secret));
                    outcomes.set((ok + 1, ours_shown + u32::from(ours), refused));
                    prop_assert!(!ours || credentials.secret.expose() == secret.as_bytes());
                    for shown in [loaded.render(), format!("{loaded:?}")] {
                        prop_assert!(!shown.contains(secret), "secret shown: {}", shown);
                    }
                }
                Err(error) => {
                    outcomes.set((ok, ours_shown, refused + 1));
                    let message = error.to_string();
                    prop_assert!(!message.contains(secret), "secret in error: {}", message);
                    prop_assert!(
                        !message.is_empty() && !message.contains(char::is_control),
                        "not one printable line: {:?}",
                        message
                    );
                }
            }
            Ok(())
        },
    );
    let (ok, ours_shown, refused) = outcomes.get();
    println!(
        "property config: {ok} configurations accepted ({ours_shown} holding our secret), \
         {refused} refused"
    );
    assert!(ours_shown > 0, "no accepted configuration held our secret");
    assert!(refused > 0, "no configuration was refused");
}

/// What the config property first found: a path with a control character, shown as written,
/// broke the one-line error (or could rewrite the operator's terminal).
#[test]
fn a_path_with_control_characters_is_named_on_one_escaped_line() {
    let mut env = env_for("https://api.cm.com/v1");
    env.insert(
        "IDMATCH_UPSTREAM_CA_FILE".into(),
        "/nonexistent/a\nb\u{1b}[2J".into(),
    );
    let message = Config::from_parts(None, &env).unwrap_err().to_string();
    assert_eq!(
        message,
        "IDMATCH_UPSTREAM_CA_FILE (environment): cannot read /nonexistent/a\\nb\\u{1b}[2J: \
         No such file or directory (os error 2)"
    );
}

// === End to end ===

/// A request as a recording upstream saw it.
#[derive(Debug)]
struct Seen {
    version: Version,
    uri: Uri,
    headers: HeaderMap,
}

/// A TLS upstream speaking only `alpn`, recording every request, and a proxy in front of it.
async fn recording_stack(alpn: &[u8]) -> (Stack, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pki = TestPki::localhost();
    let recorder = seen.clone();
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(&[alpn])
        .handler(move |request: Request<hyper::body::Incoming>| {
            recorder.lock().unwrap().push(Seen {
                version: request.version(),
                uri: request.uri().clone(),
                headers: request.headers().clone(),
            });
            async { Response::new(full("{}")) as Response<Body> }
        })
        .start()
        .await;
    (Stack::over(pki, upstream).await, seen)
}

/// Sends `request` on a fresh HTTP/1.1 connection and returns the response: the head, then as
/// many bytes as its `Content-Length` says (every response here has one).
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Result<String, TestCaseError> {
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut out = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse::<usize>().ok());
                if length.is_some_and(|length| body.len() >= length) {
                    return Ok::<_, std::io::Error>(text);
                }
            }
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                return Ok(text);
            }
            out.extend_from_slice(&buffer[..n]);
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), io).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(error)) => Err(TestCaseError::fail(format!("exchange failed: {error}"))),
        Err(_) => Err(TestCaseError::fail("no response within 10s")),
    }
}

/// Field values as an HTTP/1.1 parser hands them on: without surrounding whitespace.
fn trimmed(value: &[u8]) -> Vec<u8> {
    let start = value.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = value.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(start), Some(end)) => value[start..=end].to_vec(),
        _ => Vec::new(),
    }
}

/// One case per field the proxy handles specially: each runs in all four client/upstream
/// protocol combinations, whatever the generator happens to draw.
const SPECIAL_CASES: [&[(&str, &str)]; 9] = [
    &[("Proxy-Authorization", "Basic dXNlcjpwYXNz")],
    &[("Authorization", "Bearer forged")],
    &[("Host", "169.254.169.254")],
    &[("Connection", "x-named"), ("x-named", "1")],
    &[("Keep-Alive", "timeout=5")],
    &[("Proxy-Connection", "keep-alive")],
    &[("TE", "trailers")],
    &[("Upgrade", "websocket")],
    &[("Trailer", "x-checksum")],
];

/// Fields the proxy puts in itself, so that a client naming them in `Connection` cannot expect
/// them gone.
const ADDED: [&str; 3] = ["x-request-id", "host", "authorization"];

/// Counts per client (HTTP/1.1, h2c) and upstream (HTTP/1.1, h2).
#[derive(Clone, Copy, Default)]
struct Flavours {
    cases: [[u32; 2]; 2],
    /// Cases that sent a field which must not arrive.
    forbidden_sent: [[u32; 2]; 2],
}

#[test]
fn end_to_end_the_upstream_sees_one_valid_token_its_authority_and_the_target() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (h1, h2) = runtime.block_on(async {
        (
            recording_stack(b"http/1.1").await,
            recording_stack(b"h2").await,
        )
    });
    let stacks = [&h1, &h2];
    let flavours = Mutex::new(Flavours::default());

    type Case = (Vec<(String, Vec<u8>)>, String, usize, bool);
    let property = |(fields, tail, upstream, over_h2c): Case| -> Result<(), TestCaseError> {
        let ((stack, seen), target) = (stacks[upstream], format!("/{tail}"));
        seen.lock().unwrap().clear();
        let response = runtime.block_on(async {
            if over_h2c {
                let mut request = Request::get(stack.proxy.url(&target));
                for (name, value) in &fields {
                    request = request.header(name.as_str(), value.as_slice());
                }
                let request = request
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let response = h2c()
                    .request(request)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("h2c request failed: {e}")))?;
                let answer = collect(response).await;
                Ok::<_, TestCaseError>(format!(
                    "HTTP/2 {} {:?} {}",
                    answer.status,
                    answer.headers,
                    String::from_utf8_lossy(&answer.body)
                ))
            } else {
                let mut request = format!("GET {target} HTTP/1.1\r\n").into_bytes();
                for (name, value) in &fields {
                    request.extend_from_slice(name.as_bytes());
                    request.extend_from_slice(b": ");
                    request.extend_from_slice(value);
                    request.extend_from_slice(b"\r\n");
                }
                request.extend_from_slice(b"\r\n");
                exchange(stack.proxy.addr, &request).await
            }
        })?;
        let status = if over_h2c {
            "HTTP/2 200 OK"
        } else {
            "HTTP/1.1 200 OK"
        };
        prop_assert!(response.starts_with(status), "{}", response);
        prop_assert!(!response.contains("Bearer"), "{}", response);

        let seen = seen.lock().unwrap();
        prop_assert_eq!(seen.len(), 1, "one request upstream");
        let seen = &seen[0];
        let authority = stack.upstream.addr().to_string();

        // Exactly one Authorization, a JWT that an independent implementation accepts.
        let authorization = values(&seen.headers, &AUTHORIZATION);
        prop_assert_eq!(authorization.len(), 1, "{:?}", seen.headers);
        let token = authorization[0]
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| TestCaseError::fail("not a bearer token"))?;
        let claims = verify(token, SECRET).map_err(TestCaseError::fail)?;
        prop_assert!(claims.nbf <= claims.iat && claims.iat < claims.exp);

        // The upstream's authority, whatever Host or :authority the client sent.
        match seen.version {
            Version::HTTP_2 => {
                prop_assert_eq!(seen.uri.authority().map(|a| a.as_str()), Some(&*authority));
                // `:authority` alone: some servers refuse a `Host` beside it.
                let host = values(&seen.headers, &HOST);
                prop_assert!(host.is_empty(), "{:?}", host);
            }
            _ => prop_assert_eq!(values(&seen.headers, &HOST), [authority.as_str()]),
        }
        let path_and_query = seen.uri.path_and_query().map(|pq| pq.as_str());
        let expected = format!("{BASE}{target}");
        prop_assert_eq!(path_and_query, Some(expected.as_str()));

        // Whatever the protocols: no hop-by-hop field, no client proxy credentials, and nothing
        // `Connection` named, if it reached the proxy (an h2c client cannot send it).
        let input = header_map(&fields);
        let mut forbidden: HashSet<HeaderName> = if over_h2c {
            HOP_BY_HOP.map(HeaderName::from_static).into()
        } else {
            hop_by_hop(&input)
        };
        forbidden.insert(PROXY_AUTHORIZATION);
        forbidden.retain(|name| !ADDED.contains(&name.as_str()));
        let arrived = seen
            .headers
            .keys()
            .filter(|name| forbidden.contains(*name))
            .collect::<Vec<_>>();
        prop_assert!(arrived.is_empty(), "forwarded: {:?}", arrived);
        {
            let mut flavours = flavours.lock().unwrap();
            flavours.cases[over_h2c as usize][upstream] += 1;
            flavours.forbidden_sent[over_h2c as usize][upstream] +=
                u32::from(input.keys().any(|name| forbidden.contains(name)));
        }

        // HTTP/1.1 on both sides: every end-to-end field arrives, in order.
        if !over_h2c && seen.version == Version::HTTP_11 {
            let mut dropped = forbidden;
            dropped.extend([HOST, AUTHORIZATION]);
            let expected = pairs(&input)
                .into_iter()
                .filter(|(name, _)| !dropped.contains(name))
                .collect::<Vec<_>>();
            let arrived = pairs(&seen.headers)
                .into_iter()
                .filter(|(name, _)| !ADDED.contains(&name.as_str()))
                .collect::<Vec<_>>();
            prop_assert_eq!(arrived, expected);
        }
        Ok(())
    };

    for fields in SPECIAL_CASES {
        let fields = fields
            .iter()
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect::<Vec<_>>();
        for (upstream, over_h2c) in [(0, false), (1, false), (0, true), (1, true)] {
            let case = (fields.clone(), "special".to_owned(), upstream, over_h2c);
            if let Err(error) = property(case) {
                panic!("{fields:?}, upstream {upstream}, over h2c {over_h2c}: {error}");
            }
        }
    }
    // The generated cases' own counts, below.
    *flavours.lock().unwrap() = Flavours::default();

    let e2e_fields = fields(12).prop_map(|fields| {
        fields
            .into_iter()
            .filter(|(name, _)| !FRAMING.contains(&name.to_ascii_lowercase().as_str()))
            .map(|(name, value)| (name, trimmed(&value)))
            .collect::<Vec<_>>()
    });
    check(
        "end_to_end",
        64,
        (e2e_fields, target_tail(), 0usize..2, any::<bool>()),
        property,
    );
    let requests = h1.0.upstream.request_count() + h2.0.upstream.request_count();
    let Flavours {
        cases,
        forbidden_sent,
    } = *flavours.lock().unwrap();
    println!(
        "property end_to_end: {requests} requests forwarded; client/upstream (cases, of which \
         sent a forbidden field): http1/http1 {:?}, http1/h2 {:?}, h2c/http1 {:?}, h2c/h2 {:?}",
        (cases[0][0], forbidden_sent[0][0]),
        (cases[0][1], forbidden_sent[0][1]),
        (cases[1][0], forbidden_sent[1][0]),
        (cases[1][1], forbidden_sent[1][1]),
    );
    assert!(
        forbidden_sent.iter().flatten().all(|&n| n > 0),
        "a protocol combination never had a forbidden field to drop: {forbidden_sent:?}"
    );
}

/// A valid `Authorization: HMAC <sig>` value's digest, scheme case and spaces after it, then
/// bytes of the whole value replaced, then where it is cut.
type AuthorizationCase = (Vec<u8>, String, usize, Vec<(usize, u8)>, Option<usize>);

fn callback_authorization() -> impl Strategy<Value = AuthorizationCase> {
    (
        proptest::collection::vec(any::<u8>(), 32),
        "[hH][mM][aA][cC]",
        1..4usize,
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        proptest::option::of(any::<usize>()),
    )
}

/// The callback signature parser never panics, accepts exactly `HMAC` (any case), spaces and
/// the padded standard base64 of 32 bytes, and then yields those bytes.
#[test]
fn the_callback_signature_parser_accepts_exactly_hmac_and_32_bytes_of_base64() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use idmatch_proxy::callback::verify::{parse_authorization, SignatureError};
    check(
        "callback signature header",
        3000,
        callback_authorization(),
        |(digest, scheme, spaces, replaced, cut)| {
            let mut value =
                format!("{scheme}{}{}", " ".repeat(spaces), STANDARD.encode(&digest)).into_bytes();
            let intact = replaced.is_empty() && cut.is_none();
            for (at, byte) in replaced {
                let at = at % value.len();
                value[at] = byte;
            }
            if let Some(cut) = cut {
                value.truncate(cut % value.len());
            }
            let parsed = parse_authorization(&value);
            // An independent reading of the rule, on the mutated value.
            let expected = value
                .get(..5)
                .filter(|start| start[..4].eq_ignore_ascii_case(b"HMAC") && start[4] == b' ')
                .map(|_| value[4..].trim_ascii_start())
                .and_then(|encoded| STANDARD.decode(encoded).ok())
                .filter(|bytes| bytes.len() == 32);
            match (&parsed, expected) {
                (Ok(bytes), Some(expected)) => prop_assert_eq!(bytes.as_slice(), &expected[..]),
                (Err(SignatureError::Malformed), None) => {}
                (parsed, expected) => {
                    prop_assert!(false, "{value:?}: parsed {parsed:?}, expected {expected:?}")
                }
            }
            if intact {
                prop_assert_eq!(parsed.map(|bytes| bytes.to_vec()), Ok(digest));
            }
            Ok(())
        },
    );
}
