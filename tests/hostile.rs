//! Hostile input and faults, over raw TCP against the real proxy in front of a recording
//! upstream: request smuggling vectors, header limits, slowloris, `Expect: 100-continue` with an
//! upstream that answers before reading the body, and open-proxy attempts (`user@host`
//! authorities, `Upgrade`, redirects to another host).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use idmatch_mock::server::json;
use idmatch_mock::{Recorded, RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any read from the proxy may take before the test calls the proxy stuck.
const READ_BOUND: Duration = Duration::from_secs(5);

/// One response as it came off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    /// Names lowercased, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// An HTTP/1.1 connection whose responses the test reads itself, so that it sees interim
/// responses, `Connection: close` and the connection's end exactly.
struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn open(addr: std::net::SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes`; an error (the proxy closed) is returned, not raised.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads more bytes; false at the end of the stream (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_BOUND, self.stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!(
                "no byte and no close within {READ_BOUND:?}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Waits until `n` bytes are buffered; false if the stream ended first.
    async fn need(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.fill().await {
                return false;
            }
        }
        true
    }

    /// Takes one CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..at + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one response, interim ones included; `None` if the connection ended before a
    /// complete one.
    async fn response(&mut self) -> Option<Wire> {
        let end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut wire = Wire {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Some(wire);
        }
        if wire
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = self.line().await?;
                let size = String::from_utf8_lossy(&size);
                let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
                if size == 0 {
                    while !self.line().await?.is_empty() {}
                    return Some(wire);
                }
                if !self.need(size + 2).await {
                    return None;
                }
                wire.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            }
        }
        let length = match wire.header("content-length") {
            Some(length) => length.parse().unwrap(),
            None => {
                // Close-delimited.
                while self.fill().await {}
                self.buf.len()
            }
        };
        if !self.need(length).await {
            return None;
        }
        wire.body = self.buf.drain(..length).collect();
        Some(wire)
    }

    /// Reads every further response until the proxy closes the connection.
    async fn rest(&mut self) -> Vec<Wire> {
        let mut responses = Vec::new();
        while let Some(response) = self.response().await {
            responses.push(response);
        }
        assert!(
            self.buf.is_empty(),
            "the connection ended inside a response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        responses
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the upstream read of each request body, by target: its length, or why it was cut
/// short.
type Bodies = Arc<Mutex<Vec<(String, Result<usize, String>)>>>;

/// ALPN offers: HTTP/1.1 only, where anything smuggled through the proxy would be framed by
/// HTTP/1.1 again and show; and h2, what CM.com negotiates.
const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

/// A TLS upstream that reads each request body to its end and answers 200 with `x-body-len`.
async fn body_len_upstream(pki: &TestPki, alpn: &[&[u8]]) -> (RunningServer, Bodies) {
    let bodies = Bodies::default();
    let seen = bodies.clone();
    let upstream = Upstream::builder()
        .tls(pki)
        .alpn(alpn)
        .handler(move |request: Request<Incoming>| {
            let seen = seen.clone();
            let target = request.uri().path().to_owned();
            async move {
                match request.into_body().collect().await {
                    Ok(body) => {
                        let length = body.to_bytes().len();
                        seen.lock().unwrap().push((target, Ok(length)));
                        let mut response = json(StatusCode::OK, json!({ "body_len": length }));
                        response.headers_mut().insert("x-body-len", length.into());
                        response
                    }
                    Err(error) => {
                        seen.lock().unwrap().push((target, Err(error.to_string())));
                        json(StatusCode::BAD_REQUEST, json!({ "body": "cut short" }))
                    }
                }
            }
        })
        .start()
        .await;
    (upstream, bodies)
}

// ---------------------------------------------------------------------------------------------
// Request smuggling
// ---------------------------------------------------------------------------------------------

/// What vectors leave behind, or hide in a body: should the proxy ever parse it as a request,
/// the upstream would record a `/SMUGGLED` target.
const SMUGGLED_PREFIX: &str = "GET /SMUGGLED HTTP/1.1\r\nX-Ignore: ";
const SMUGGLED_REQUEST: &str = "GET /SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n";
/// How long a vector gets to be answered before the follow-up is sent anyway.
const HEAD_WAIT: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// hyper's parser refuses the head with this status (no `Proxy-Status`: the proxy never
    /// saw a request), then the connection is closed and the follow-up never read.
    Status(u16),
    /// The proxy refuses the request with its own JSON error (`Proxy-Status` naming `code`)
    /// before anything is forwarded, then closes the connection.
    Refused { status: u16, code: &'static str },
    /// Forwarded once, with a body of `body_len` bytes. `closes`: the response says
    /// `Connection: close` and the proxy closes without reading the follow-up; otherwise the
    /// connection stays usable and the follow-up is served.
    ForwardedOnce { body_len: usize, closes: bool },
    /// The head was valid, the chunked body was not: the client gets the proxy's 400
    /// `http_request_error` and the connection closes. The request may have started upstream
    /// (the body streams), but never completed there.
    BodyRefused,
}

struct Vector {
    name: &'static str,
    bytes: Vec<u8>,
    outcome: Outcome,
}

/// `POST /v/<name>` with the given extra header lines (each ending in CRLF) and raw body.
fn post(name: &'static str, headers: &str, body: &str, outcome: Outcome) -> Vector {
    Vector {
        name,
        bytes: format!("POST /v/{name} HTTP/1.1\r\nHost: x\r\n{headers}\r\n{body}").into_bytes(),
        outcome,
    }
}

fn vector(name: &'static str, bytes: impl Into<Vec<u8>>, outcome: Outcome) -> Vector {
    Vector {
        name,
        bytes: bytes.into(),
        outcome,
    }
}

/// The vectors, each with why its outcome is right. "hyper" is hyper 1.x's HTTP/1 server
/// parser (httparse underneath), which sees every byte before the proxy does.
fn vectors() -> Vec<Vector> {
    use Outcome::*;
    // A body that ends the chunked stream at once and leaves a request prefix behind.
    let terminated = format!("0\r\n\r\n{SMUGGLED_PREFIX}");
    let cl = |body: &str| format!("Content-Length: {}\r\n", body.len());
    // A chunked body whose only chunk is a whole request.
    let chunk_of_request = format!(
        "{:x}\r\n{SMUGGLED_REQUEST}\r\n0\r\n\r\n",
        SMUGGLED_REQUEST.len()
    );
    let hello = "5\r\nhello\r\n0\r\n\r\n";
    const NOT_IMPLEMENTED: Outcome = Refused {
        status: 501,
        code: "http_request_error",
    };
    vec![
        // CL.TE: a front end using the length would pass the prefix on as body. RFC 9112 §6.3:
        // Transfer-Encoding overrides Content-Length; hyper drops the length, reads the
        // chunked body (empty) and, as §6.1 requires, closes the connection after answering,
        // so the leftover bytes are never parsed.
        post(
            "cl-te",
            &format!("{}Transfer-Encoding: chunked\r\n", cl(&terminated)),
            &terminated,
            ForwardedOnce {
                body_len: 0,
                closes: true,
            },
        ),
        // TE.CL: a back end using the length would take the chunk as the next request. hyper
        // reads the chunk as body, whatever the order of the two fields, and closes.
        post(
            "te-cl",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            &chunk_of_request,
            ForwardedOnce {
                body_len: SMUGGLED_REQUEST.len(),
                closes: true,
            },
        ),
        // TE.TE obfuscations. A coding list not ending in `chunked` cannot be framed (RFC 9112
        // §6.3): hyper answers 400.
        post(
            "te-xchunked",
            &format!("{}Transfer-Encoding: xchunked\r\n", cl(&terminated)),
            &terminated,
            Status(400),
        ),
        // Leading whitespace is OWS around the value (RFC 9110 §5.5), not part of it: this is
        // plain `chunked`, and with a length too, CL.TE again.
        post(
            "te-leading-space",
            &format!("{}Transfer-Encoding:  \tchunked\r\n", cl(&terminated)),
            &terminated,
            ForwardedOnce {
                body_len: 0,
                closes: true,
            },
        ),
        // Codings are case-insensitive (RFC 9112 §7); without a length this is an ordinary
        // chunked request and the connection stays usable.
        post(
            "te-uppercase",
            "Transfer-Encoding: CHUNKED\r\n",
            hello,
            ForwardedOnce {
                body_len: 5,
                closes: false,
            },
        ),
        // A line starting with whitespace is obs-fold (RFC 9112 §5.2), which a server must
        // reject or unfold; httparse rejects it in requests: 400.
        post(
            "te-space-before-name",
            &format!(" Transfer-Encoding: chunked\r\n{}", cl(&terminated)),
            &terminated,
            Status(400),
        ),
        // Whitespace between name and colon must be rejected (RFC 9112 §5.1): 400.
        post(
            "te-space-before-colon",
            &format!("Transfer-Encoding : chunked\r\n{}", cl(&terminated)),
            &terminated,
            Status(400),
        ),
        // Duplicated Transfer-Encoding lines form one list (RFC 9110 §5.3); here it ends in
        // `identity`, not `chunked`: 400.
        post(
            "te-duplicate-chunked-identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            hello,
            Status(400),
        ),
        // Lists that do end in `chunked` pass hyper, which decodes the chunked framing only:
        // forwarded without the field, a second line naming `x`, a `gzip` or a second
        // `chunked` would reach the upstream still applied and undeclared. The proxy refuses
        // any coding but `chunked` alone (RFC 9112 §6.1: 501) and closes the connection.
        post(
            "te-duplicate-x-chunked",
            &format!(
                "Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n{}",
                cl(&terminated)
            ),
            &terminated,
            NOT_IMPLEMENTED,
        ),
        post(
            "te-gzip-chunked",
            "Transfer-Encoding: gzip, chunked\r\n",
            hello,
            NOT_IMPLEMENTED,
        ),
        post(
            "te-chunked-twice",
            "Transfer-Encoding: chunked, chunked\r\n",
            hello,
            NOT_IMPLEMENTED,
        ),
        // HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1: faulty framing): 400.
        vector(
            "te-http10",
            format!("POST /v/te-http10 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{terminated}"),
            Status(400),
        ),
        // Content-Length is 1*DIGIT (RFC 9110 §8.6): a sign, a list, a negative number or one
        // beyond u64 is invalid, and so are two different lengths: 400.
        post("cl-plus", "Content-Length: +5\r\n", "hello", Status(400)),
        post("cl-list", "Content-Length: 5, 6\r\n", "hello", Status(400)),
        // A list of equal values MAY be accepted (RFC 9110 §8.6); hyper's server does not.
        post("cl-list-equal", "Content-Length: 5, 5\r\n", "hello", Status(400)),
        post(
            "cl-duplicate-conflicting",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "hello!",
            Status(400),
        ),
        post("cl-negative", "Content-Length: -5\r\n", "hello", Status(400)),
        post(
            "cl-overflow",
            "Content-Length: 18446744073709551616\r\n",
            "hello",
            Status(400),
        ),
        // Repeating the same length is harmless and accepted; so are leading zeros (still
        // 1*DIGIT).
        post(
            "cl-duplicate-equal",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "hello",
            ForwardedOnce {
                body_len: 5,
                closes: false,
            },
        ),
        post(
            "cl-leading-zeros",
            "Content-Length: 0005\r\n",
            "hello",
            ForwardedOnce {
                body_len: 5,
                closes: false,
            },
        ),
        // CL.0: a back end ignoring the length of a GET would parse the body as a request.
        // The proxy honours it: the bytes are a body, forwarded as one.
        vector(
            "cl-0",
            format!(
                "GET /v/cl-0 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{SMUGGLED_REQUEST}",
                SMUGGLED_REQUEST.len()
            ),
            ForwardedOnce {
                body_len: SMUGGLED_REQUEST.len(),
                closes: false,
            },
        ),
        // Chunk sizes past u64 overflow and a chunk line ended by a bare LF (RFC 9112 §7.1
        // wants CRLF) fail in hyper's chunked decoder, after the head was accepted and while
        // the body streams upstream: the proxy answers 400 (the client's fault, not a 502) and
        // hyper closes the connection, whose framing is lost.
        post(
            "chunk-size-overflow",
            "Transfer-Encoding: chunked\r\n",
            &format!("10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED_REQUEST}"),
            BodyRefused,
        ),
        post(
            "chunk-size-bare-lf",
            "Transfer-Encoding: chunked\r\n",
            &format!("5\nhello\r\n0\r\n\r\n{SMUGGLED_REQUEST}"),
            BodyRefused,
        ),
        post(
            "chunk-extension-bare-lf",
            "Transfer-Encoding: chunked\r\n",
            &format!("5;x\nhello\r\n0\r\n\r\n{SMUGGLED_REQUEST}"),
            BodyRefused,
        ),
        // Line endings: a bare CR is never a line ending (RFC 9112 §2.2): 400. A bare LF MAY be
        // one (same section) and httparse takes it: one ordinary request.
        vector(
            "bare-cr",
            "GET /v/bare-cr HTTP/1.1\rHost: x\r\r",
            Status(400),
        ),
        vector(
            "bare-lf",
            "GET /v/bare-lf HTTP/1.1\nHost: x\n\n",
            ForwardedOnce {
                body_len: 0,
                closes: false,
            },
        ),
        // Field values may not hold CR, LF or NUL (RFC 9110 §5.5), nor other controls: 400.
        post("cr-in-value", "X-A: a\rb\r\n", "", Status(400)),
        post("obs-fold", "X-Folded: a\r\n b\r\n", "", Status(400)),
        post("nul-in-value", "X-A: a\0b\r\n", "", Status(400)),
        post("ctl-in-value", "X-A: a\x01b\r\n", "", Status(400)),
        post("del-in-value", "X-A: a\x7fb\r\n", "", Status(400)),
        post("nul-in-name", "X-\0A: b\r\n", "", Status(400)),
        // A request target with a space or a control byte: 400.
        vector(
            "space-in-target",
            "GET /v/space in-target HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(400),
        ),
        vector(
            "ctl-in-target",
            "GET /v/ctl\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            Status(400),
        ),
        // The whole head must fit `client.max_header_bytes` (16 KiB), request line included:
        // 431 before hyper looks at the target (its own 414 starts at 64 KiB).
        vector(
            "overlong-request-line",
            format!("GET /v/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024)),
            Status(431),
        ),
    ]
}

/// Sent after each vector on the same connection. A vector that leaves
/// `GET /SMUGGLED HTTP/1.1\r\nX-Ignore: ` behind would have this complete that request.
fn follow_up(name: &str) -> Vec<u8> {
    format!("GET /follow-up/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

/// What the client saw of one vector.
struct Answers {
    first: Option<Wire>,
    later: Vec<Wire>,
}

/// Sends the vector on a fresh connection, then the follow-up; reads until the proxy closes.
async fn run(vector: &Vector, proxy: &Proxy) -> Answers {
    let mut conn = RawConn::open(proxy.addr).await;
    // The proxy may refuse before reading all of it.
    let _ = conn.write(&vector.bytes).await;
    // hyper parses a head once it has seen its blank line; while nothing comes back, the
    // follow-up may be what ends the vector's head (as for `bare-cr`).
    let waited = tokio::time::timeout(HEAD_WAIT, conn.fill()).await.is_err();
    if waited {
        let _ = conn.write(&follow_up(vector.name)).await;
    }
    let first = conn.response().await;
    if !waited {
        let _ = conn.write(&follow_up(vector.name)).await;
    }
    let later = conn.rest().await;
    Answers { first, later }
}

/// The differences between what was expected and what happened; empty if none. `upstream` and
/// `bodies` are what the upstream saw for this vector and its follow-up.
fn check(
    vector: &Vector,
    answers: &Answers,
    upstream: &[&Recorded],
    bodies: &[Result<usize, String>],
) -> Option<String> {
    let name = vector.name;
    let target = format!("{BASE}/v/{name}");
    let targets: Vec<&str> = upstream.iter().map(|r| r.target.as_str()).collect();
    let first = answers.first.as_ref().map(|w| w.status);
    let proxy_status = answers
        .first
        .as_ref()
        .and_then(|w| w.header("proxy-status"));
    let later: Vec<u16> = answers.later.iter().map(|w| w.status).collect();
    let got = format!(
        "got {first:?} ({proxy_status:?}) then {later:?}; upstream {targets:?}, bodies {bodies:?}"
    );
    match vector.outcome {
        Outcome::Status(status) => {
            let right = first == Some(status)
                && proxy_status.is_none()
                && later.is_empty()
                && targets.is_empty();
            (!right)
                .then(|| format!("expected hyper's {status} then close, upstream untouched; {got}"))
        }
        Outcome::Refused { status, code } => {
            let expected = format!("idmatch-proxy; error={code}");
            let right = first == Some(status)
                && proxy_status == Some(expected.as_str())
                && answers.first.as_ref().is_some_and(Wire::closes)
                && later.is_empty()
                && targets.is_empty();
            (!right).then(|| {
                format!(
                    "expected the proxy's {status} ({expected}), close, upstream untouched; {got}"
                )
            })
        }
        Outcome::ForwardedOnce { body_len, closes } => {
            let length = answers
                .first
                .as_ref()
                .and_then(|w| w.header("x-body-len"))
                .and_then(|l| l.parse::<usize>().ok());
            let closed = answers.first.as_ref().is_some_and(Wire::closes);
            let follow = format!("{BASE}/follow-up/{name}");
            let (want_later, want_targets) = if closes {
                (vec![], vec![target.as_str()])
            } else {
                (vec![200], vec![target.as_str(), follow.as_str()])
            };
            let right = first == Some(200)
                && length == Some(body_len)
                && closed == closes
                && later == want_later
                && targets == want_targets
                && bodies.first() == Some(&Ok(body_len));
            (!right).then(|| {
                format!(
                    "expected 200 for a {body_len}-byte body (closes: {closes}), upstream \
                     {want_targets:?}; {got} (x-body-len {length:?}, closes: {closed})"
                )
            })
        }
        Outcome::BodyRefused => {
            let right = first == Some(400)
                && proxy_status == Some("idmatch-proxy; error=http_request_error")
                && later.is_empty()
                && (targets.is_empty() || targets == [target.as_str()])
                && bodies.iter().all(Result::is_err);
            (!right).then(|| {
                format!("expected the proxy's 400, close, never a whole body upstream; {got}")
            })
        }
    }
}

/// Every vector on a fresh connection, then the follow-up on the same one; the upstream
/// speaks `alpn`.
async fn assert_vectors(alpn: &[&[u8]]) {
    let pki = TestPki::localhost();
    let (upstream, bodies) = body_len_upstream(&pki, alpn).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let vectors = vectors();
    let mut answers = Vec::new();
    for vector in &vectors {
        answers.push(run(vector, &proxy).await);
    }
    // The upstream records a request before its handler reads the body, and a stream reset
    // after its head (the h2 upstream, for a body that fails) may be recorded after the client
    // had its answer: wait until every recorded request has its body's outcome.
    let deadline = Instant::now() + READ_BOUND;
    while upstream.request_count() > bodies.lock().unwrap().len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recorded = upstream.requests();
    let bodies = bodies.lock().unwrap().clone();
    let smuggled: Vec<&str> = recorded
        .iter()
        .map(|r| r.target.as_str())
        .filter(|t| t.contains("SMUGGLED"))
        .collect();
    assert!(
        smuggled.is_empty(),
        "smuggled requests reached the upstream: {smuggled:?}"
    );
    let mut failures = Vec::new();
    for (vector, answers) in vectors.iter().zip(&answers) {
        let ours = |target: &str| {
            target == format!("{BASE}/v/{}", vector.name)
                || target == format!("{BASE}/follow-up/{}", vector.name)
        };
        let upstream: Vec<&Recorded> = recorded.iter().filter(|r| ours(&r.target)).collect();
        let bodies: Vec<Result<usize, String>> = bodies
            .iter()
            .filter(|(target, _)| ours(target))
            .map(|(_, body)| body.clone())
            .collect();
        if let Some(wrong) = check(vector, answers, &upstream, &bodies) {
            failures.push(format!("{}: {wrong}", vector.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test]
async fn smuggling_vectors_are_refused_or_forwarded_once_to_an_http1_upstream() {
    assert_vectors(H1).await;
}

#[tokio::test]
async fn smuggling_vectors_are_refused_or_forwarded_once_to_an_h2_upstream() {
    assert_vectors(H2).await;
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// An `X-Request-Id` line and `count` more distinct header lines.
fn header_lines(count: usize) -> String {
    let lines: String = (0..count).map(|i| format!("X-H{i}: v\r\n")).collect();
    format!("X-Request-Id: limits\r\n{lines}")
}

#[tokio::test]
async fn oversized_heads_get_431_or_414_and_the_connection_closes() {
    let pki = TestPki::localhost();
    let (upstream, _bodies) = body_len_upstream(&pki, H1).await;
    let default = ProxyConfig::new(&upstream.url(BASE), &pki);
    let roomy = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_CLIENT_MAX_HEADER_BYTES", "128KiB");
    let (default, roomy) = (Proxy::start(&default).await, Proxy::start(&roomy).await);
    let big_field = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let long_target = format!("/{}", "a".repeat(70 * 1024));
    let cases = [
        // The whole head must fit `client.max_header_bytes` (default 16 KiB): hyper's read
        // buffer fills before the head ends, and hyper answers 431.
        ("a 64 KiB field", &default, "/f", big_field.clone(), 431),
        // hyper parses at most 100 fields (its default `max_headers`), and answers 431
        // beyond. With Host, X-Request-Id (sent, so that the proxy adds none and the mock
        // upstream, hyper too, gets 100 as well) and Connection.
        ("100 fields", &default, "/f", header_lines(97), 200),
        ("101 fields", &default, "/f", header_lines(98), 431),
        // A long target is refused by the same buffer, before hyper looks at it...
        (
            "a 70 KiB target",
            &default,
            &long_target,
            String::new(),
            431,
        ),
        // ...and with a larger buffer, by hyper's own limit on targets (65,534 bytes): 414.
        (
            "a 70 KiB target, 128 KiB heads",
            &roomy,
            &long_target,
            String::new(),
            414,
        ),
        (
            "a 64 KiB field, 128 KiB heads",
            &roomy,
            "/f",
            big_field.clone(),
            200,
        ),
    ];
    for (what, proxy, target, fields, status) in cases {
        let before = upstream.request_count();
        let mut conn = RawConn::open(proxy.addr).await;
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n");
        // Refused before it is all read: a failed write is expected then.
        let _ = conn.write(request.as_bytes()).await;
        let answer = conn.response().await.expect(what);
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        // Refusals come from the proxy's parser, never from the upstream through the proxy
        // (which would add an `X-Request-Id`).
        assert_eq!(
            answer.header("x-request-id").is_some(),
            status == 200,
            "{what}"
        );
        assert!(answer.closes(), "{what}: {:?}", answer.headers);
        assert!(conn.rest().await.is_empty(), "{what}: closed after");
        let forwarded = usize::from(status == 200);
        assert_eq!(upstream.request_count() - before, forwarded, "{what}");
    }
}

/// The soft and hard limits on open files, from `/proc/self/limits`.
fn open_files_limit() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line["Max open files".len()..]
        .split_whitespace()
        .map(|n| n.parse().unwrap_or(u64::MAX));
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// Makes sure this process (and the proxy it starts next, which inherits the limit) may hold
/// `needed` descriptors, raising the soft limit to the hard one with util-linux's `prlimit` if
/// it must.
fn ensure_open_files(needed: u64) {
    let (soft, hard) = open_files_limit();
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test needs {needed} open files; the hard limit is {hard} (raise `ulimit -Hn`)"
    );
    let raised = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    assert!(
        raised.is_ok_and(|s| s.success()) && open_files_limit().0 >= needed,
        "this test needs {needed} open files and could not raise the soft limit {soft}: \
         run it after `ulimit -n {needed}`"
    );
}

/// What a slowloris connection saw: how long after connecting the proxy closed it (`None`: not
/// within the bound), and whether the proxy sent anything first.
struct Slow {
    closed_after: Option<Duration>,
    answered: bool,
}

/// Sends most of a request head, then one more byte every 200 ms, never ending it.
async fn trickle(mut stream: TcpStream, connected: Instant, bound: Duration) -> Slow {
    let mut answered = false;
    if stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .is_err()
    {
        return Slow {
            closed_after: Some(connected.elapsed()),
            answered,
        };
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.tick().await;
    let give_up = tokio::time::sleep_until((connected + bound).into());
    tokio::pin!(give_up);
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    return Slow { closed_after: Some(connected.elapsed()), answered };
                }
                Ok(_) => answered = true,
            },
            _ = tick.tick() => {
                // A write to a closed connection fails, or draws a reset that the read sees.
                let _ = stream.write_all(b"a").await;
            }
            () = &mut give_up => return Slow { closed_after: None, answered },
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_at_the_header_timeout_while_traffic_flows() {
    const SLOW: usize = 1000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
    // Generous: the proxy's clock starts at its accept, a little after our connect.
    const CLOSE_BOUND: Duration = Duration::from_secs(5);
    // The proxy is the real binary, so that its descriptors are its own; ours are the 1,000
    // client ends, the upstream's and the test harness's.
    ensure_open_files(SLOW as u64 + 512);
    let pki = TestPki::localhost();
    let (upstream, _bodies) = body_len_upstream(&pki, H2).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_CLIENT_HEADER_TIMEOUT", "1s")
        .set("IDMATCH_CLIENT_IDLE_TIMEOUT", "30s");
    let proxy = tokio::task::block_in_place(|| Binary::serve(&config.env));

    let attack_started = Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        slow.spawn(trickle(stream, Instant::now(), CLOSE_BOUND));
    }
    let connected_in = attack_started.elapsed();

    // Legitimate traffic on one keep-alive connection, every 10 ms for 2 s, across the moment
    // the slow connections are cut.
    let client = http1();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let traffic_started = Instant::now();
    while traffic_started.elapsed() < Duration::from_secs(2) {
        tick.tick().await;
        let sent = Instant::now();
        let answer = send(&client, get(&proxy.url("/legit"))).await;
        latencies.push(sent.elapsed());
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }

    let mut closed = Vec::new();
    while let Some(outcome) = slow.join_next().await {
        let outcome = outcome.unwrap();
        assert!(
            !outcome.answered,
            "the proxy answered a request it never received"
        );
        closed.push(outcome.closed_after.unwrap_or_else(|| {
            panic!("a slow connection was still open {CLOSE_BOUND:?} after connecting")
        }));
    }
    closed.sort();
    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
    eprintln!(
        "slowloris: {SLOW} connections opened in {connected_in:?}, closed {:?}..{:?} after \
         connecting; {} legitimate requests during the attack: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        closed[0],
        closed[closed.len() - 1],
        latencies.len(),
    );
    // Not before the header timeout (less a little: the proxy's clock starts at its accept)...
    assert!(
        closed[0] >= HEADER_TIMEOUT - Duration::from_millis(100),
        "{:?}",
        closed[0]
    );
    // ...and a very loose sanity bound on the legitimate traffic.
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert!(
        latencies.len() >= 100,
        "only {} requests in 2 s",
        latencies.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue against an upstream that answers before reading the body
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream: `…/early-401` and `…/early-413` answer at once without reading the
/// body (401 with `WWW-Authenticate`, like CM.com's); any other path reads it and answers 200.
async fn early_answering_upstream(pki: &TestPki) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .alpn(H1)
        .handler(|request: Request<Incoming>| async move {
            let path = request.uri().path().to_owned();
            if path.ends_with("/early-401") {
                let mut response = json(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": {"code": "unauthorized", "message": "early"}}),
                );
                response.headers_mut().insert(
                    "www-authenticate",
                    http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return response;
            }
            if path.ends_with("/early-413") {
                return json(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": "early"}));
            }
            let length = request
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len();
            json(StatusCode::OK, json!({ "body_len": length }))
        })
        .start()
        .await
}

/// What the clients saw, summed over connections.
#[derive(Default, Debug)]
struct Tally {
    /// Requests with a complete response.
    complete: usize,
    /// `Expect` requests answered `100 Continue` before their final response.
    continued: usize,
    /// `Expect` requests answered with a final response at once (the body never sent).
    answered_first: usize,
    /// Responses that said `Connection: close`, each followed by a clean close.
    closed_cleanly: usize,
    /// Requests whose connection ended before a complete response, or failed on reuse.
    broken: Vec<String>,
}

/// One request on `conn` (reconnecting if the proxy closed it cleanly); with `expect`, the head
/// goes first and the body only after `100 Continue` (RFC 9110 §10.1.1).
async fn exchange(
    conn: &mut RawConn,
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
    expect: bool,
    tally: &mut Tally,
) -> Option<Wire> {
    let expectation = if expect {
        "Expect: 100-continue\r\n"
    } else {
        ""
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{expectation}\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut answer = if expect {
        if let Err(error) = conn.write(head.as_bytes()).await {
            tally
                .broken
                .push(format!("{path}: writing the head: {error}"));
            return None;
        }
        match conn.response().await {
            Some(interim) if interim.status == 100 => {
                tally.continued += 1;
                if let Err(error) = conn.write(body).await {
                    tally
                        .broken
                        .push(format!("{path}: writing the body: {error}"));
                    return None;
                }
                conn.response().await
            }
            // A final answer instead: the body is not sent (RFC 9110 §10.1.1).
            Some(last) => {
                tally.answered_first += 1;
                if !last.closes() {
                    // Whether the server would take the next bytes for our body is not said:
                    // the connection is not reused.
                    *conn = RawConn::open(addr).await;
                }
                Some(last)
            }
            None => None,
        }
    } else {
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        match conn.write(&request).await {
            Ok(()) => conn.response().await,
            Err(_) => None,
        }
    };
    let Some(answer) = answer.take() else {
        tally.broken.push(format!(
            "{path}: the connection ended before a complete response"
        ));
        return None;
    };
    tally.complete += 1;
    if answer.closes() {
        if conn.rest().await.is_empty() {
            tally.closed_cleanly += 1;
        } else {
            tally
                .broken
                .push(format!("{path}: more after Connection: close"));
        }
        *conn = RawConn::open(addr).await;
    }
    Some(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_with_an_upstream_answering_early_breaks_no_connection() {
    const CONNECTIONS: usize = 6;
    const ROUNDS: usize = 5;
    let pki = TestPki::localhost();
    let upstream = early_answering_upstream(&pki).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let addr = proxy.addr;
    // Small JSON bodies, which the proxy reads whole (to replay after a 401): it answers
    // `100 Continue` itself, when it starts reading.
    let body = Arc::new(format!(
        r#"{{"phoneNumber":"+31610000001","pad":"{}"}}"#,
        "p".repeat(900)
    ));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let body = body.clone();
        clients.spawn(async move {
            let mut tally = Tally::default();
            let mut conn = RawConn::open(addr).await;
            let body = body.as_bytes();
            for _ in 0..ROUNDS {
                // Interleaved: early 401, normal, early 413, normal with Expect, normal.
                let steps: [(&str, bool, u16); 5] = [
                    ("/early-401", true, 401),
                    ("/sim-swap", false, 200),
                    ("/early-413", true, 413),
                    ("/sim-swap", true, 200),
                    ("/identity-match", false, 200),
                ];
                for (path, expect, status) in steps {
                    let Some(answer) =
                        exchange(&mut conn, addr, path, body, expect, &mut tally).await
                    else {
                        conn = RawConn::open(addr).await;
                        continue;
                    };
                    assert_eq!(answer.status, status, "{path}: {answer:?}");
                    // The upstream's answers come back as they were, never the proxy's.
                    assert_eq!(answer.header("proxy-status"), None, "{path}");
                    match status {
                        401 => {
                            assert_eq!(
                                answer.header("www-authenticate"),
                                Some("Bearer error=\"invalid_token\"")
                            );
                            assert_eq!(
                                answer.body,
                                br#"{"error":{"code":"unauthorized","message":"early"}}"#
                            );
                        }
                        413 => assert_eq!(answer.body, br#"{"error":"early"}"#),
                        _ => assert_eq!(
                            answer.body,
                            format!(r#"{{"body_len":{}}}"#, body.len()).as_bytes()
                        ),
                    }
                }
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(tally) = clients.join_next().await {
        let tally = tally.unwrap();
        total.complete += tally.complete;
        total.continued += tally.continued;
        total.answered_first += tally.answered_first;
        total.closed_cleanly += tally.closed_cleanly;
        total.broken.extend(tally.broken);
    }
    eprintln!("100-continue: {total:?}");
    assert!(total.broken.is_empty(), "{:#?}", total.broken);
    let requests = CONNECTIONS * ROUNDS * 5;
    assert_eq!(total.complete, requests);
    // Every Expect request was told to continue: the proxy reads kept bodies before the
    // upstream can answer, so the early answers never race the client's body.
    assert_eq!(total.continued, CONNECTIONS * ROUNDS * 3);
    assert_eq!(total.answered_first, 0);
    // Nothing made the proxy give up a connection.
    assert_eq!(total.closed_cleanly, 0);
    // Each early 401 was replayed once with a fresh token, unless another connection's replay
    // had just been refused too (then the proxy stops replaying until a request succeeds);
    // nothing else was sent twice.
    let skipped = scrape(
        proxy.admin,
        "idmatch_proxy_unauthorized_replays_skipped_total",
    )
    .await as usize;
    assert_eq!(upstream.request_count(), CONNECTIONS * ROUNDS * 6 - skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_to_streamed_uploads_break_no_connection() {
    const ROUNDS: usize = 100;
    let pki = TestPki::localhost();
    let upstream = early_answering_upstream(&pki).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let addr = proxy.addr;
    // Too large to keep (64 KiB): the body streams, so the upstream can answer before the
    // proxy has read it, and the 401 is passed on rather than replayed. The upstream (hyper)
    // then closes its connection without reading the rest, and a reset can destroy its own
    // answer in flight: the client gets a JSON 502 instead. Either way, an answer given before
    // the client's body ended says `Connection: close`, because the proxy will not read the
    // rest either.
    let body = vec![b'a'; 200 * 1024];
    let mut tally = Tally::default();
    let mut conn = RawConn::open(addr).await;
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..ROUNDS {
        for (path, expect, status) in [
            ("/early-401", true, 401),
            ("/early-413", true, 413),
            ("/sim-swap", true, 200),
            ("/sim-swap", false, 200),
        ] {
            let Some(answer) = exchange(&mut conn, addr, path, &body, expect, &mut tally).await
            else {
                conn = RawConn::open(addr).await;
                continue;
            };
            let made_by_proxy = answer.header("proxy-status").map(str::to_owned);
            *answers
                .entry((path, answer.status, made_by_proxy.clone()))
                .or_insert(0) += 1;
            if answer.status == status {
                assert_eq!(made_by_proxy, None, "{path}");
                if status == 401 {
                    assert_eq!(
                        answer.body,
                        br#"{"error":{"code":"unauthorized","message":"early"}}"#
                    );
                }
            } else {
                // The upstream reset the connection that carried its answer, or that it had
                // left in the pool (streamed bodies are never sent twice).
                assert_eq!(answer.status, 502, "{path}: {answer:?}");
                assert_eq!(
                    made_by_proxy.as_deref(),
                    Some("idmatch-proxy; error=connection_terminated")
                );
            }
        }
    }
    eprintln!("streamed early answers: {answers:?}; {tally:?}");
    assert!(tally.broken.is_empty(), "{:#?}", tally.broken);
    assert_eq!(tally.complete, ROUNDS * 4);
    assert!(
        upstream.request_count() <= ROUNDS * 4,
        "nothing was sent twice"
    );
}

// ---------------------------------------------------------------------------------------------
// Open-proxy and SSRF attempts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_requests_are_forwarded_as_plain_requests_and_never_switch() {
    let pki = TestPki::localhost();
    let (upstream, _bodies) = body_len_upstream(&pki, H1).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let upgrades = [
        (
            "/websocket",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        ),
        (
            "/h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
    ];
    for (path, fields) in upgrades {
        let mut conn = RawConn::open(proxy.addr).await;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
        conn.write(request.as_bytes()).await.unwrap();
        let answer = conn.response().await.expect(path);
        // An ordinary answer: no 101, no `Upgrade`.
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert_eq!(answer.header("upgrade"), None, "{path}");
        // The connection still speaks HTTP/1.1: a second request on it is served.
        conn.write(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let after = conn.response().await.expect("a second answer");
        assert_eq!(after.status, 200, "{path}: {after:?}");
        assert!(conn.rest().await.is_empty());
    }
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 4);
    for request in recorded.iter().step_by(2) {
        // Hop-by-hop: `Upgrade`, `Connection` and the fields it names never leave the proxy.
        for field in ["upgrade", "connection", "http2-settings"] {
            assert_eq!(request.header(field), None, "{}: {field}", request.target);
        }
        assert_eq!(request.version, http::Version::HTTP_11);
    }
}

#[tokio::test]
async fn a_101_the_proxy_never_asked_for_is_a_json_502() {
    let pki = TestPki::localhost();
    // An upstream that switches protocols whatever it is asked.
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(H1)
        .handler(|_: Request<Incoming>| async {
            let mut response = http::Response::new(idmatch_mock::server::full(""));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
            headers.insert("connection", http::HeaderValue::from_static("upgrade"));
            response
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    for fields in ["", "Connection: Upgrade\r\nUpgrade: websocket\r\n"] {
        let mut conn = RawConn::open(proxy.addr).await;
        let request = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
        conn.write(request.as_bytes()).await.unwrap();
        let answer = conn.response().await.unwrap();
        assert_eq!(answer.status, 502, "{fields:?}: {answer:?}");
        assert_eq!(
            answer.header("proxy-status"),
            Some("idmatch-proxy; error=http_protocol_error")
        );
        assert_eq!(answer.header("upgrade"), None);
        // Nothing was switched: the connection carries the next request.
        conn.write(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(conn.response().await.unwrap().status, 502);
        assert!(conn.rest().await.is_empty());
    }
}

/// Every redirect status, with the method a client would typically send before it.
const REDIRECTS: [(u16, &str); 5] = [
    (301, "GET"),
    (302, "GET"),
    (303, "POST"),
    (307, "POST"),
    (308, "POST"),
];

#[tokio::test]
async fn redirects_to_another_host_pass_back_and_are_never_followed() {
    let pki = TestPki::localhost();
    // Where the redirects point: a server that would see the token if the proxy followed.
    let elsewhere = Upstream::builder().tls(&pki).start().await;
    let location = format!("{}/steal?token=yes", elsewhere.url(""));
    let target = location.clone();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(move |request: Request<Incoming>| {
            let location = target.clone();
            async move {
                let status: u16 = request
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(200);
                let mut response = json(
                    StatusCode::from_u16(status).unwrap(),
                    json!({ "moved": status }),
                );
                response
                    .headers_mut()
                    .insert("location", location.parse().unwrap());
                response
            }
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let client = http1(); // hyper's client never follows redirects itself
    for (status, method) in REDIRECTS {
        let request = Request::builder()
            .method(method)
            .uri(proxy.url(&format!("/redirect/{status}")))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let answer = send(&client, request).await;
        assert_eq!(answer.status.as_u16(), status);
        assert_eq!(answer.headers["location"], location.as_str(), "{status}");
        assert_eq!(answer.json()["moved"], status);
        assert!(!answer.headers.contains_key("proxy-status"));
    }
    // Each request reached the upstream once; nothing, and so no token, went elsewhere.
    assert_eq!(upstream.request_count(), REDIRECTS.len());
    assert_eq!(elsewhere.connections_accepted(), 0);
}

#[tokio::test]
async fn authorities_with_userinfo_or_tricks_never_choose_the_destination() {
    let pki = TestPki::localhost();
    let (upstream, _bodies) = body_len_upstream(&pki, H1).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Proxy::start(&config).await;
    let me = proxy.addr;
    // `http://user@{me}/` is covered in tests/refusals.rs; these dress up another host as us,
    // or us as another host.
    let cases = [
        // Credentials for the metadata service: another authority, 421.
        (
            "http://user:pass@169.254.169.254/latest/meta-data/".to_owned(),
            421,
        ),
        // Our address as userinfo: the host is still 169.254.169.254.
        (format!("http://{me}@169.254.169.254/"), 421),
        // Our address, reached through userinfo naming another: `user@host` is never how a
        // client addresses us, 421.
        (format!("http://169.254.169.254@{me}/sim-swap"), 421),
        (format!("http://user@localhost:{}/sim-swap", me.port()), 421),
        // A backslash is not allowed in an authority (WHATWG parsers would read it as `/`):
        // hyper's parser refuses the target, 400.
        (format!("http://169.254.169.254\\@{me}/"), 400),
        // Here `#` ends the authority (ours) and starts a fragment, which hyper's URI parser
        // drops: an ordinary request for `/`, sent where every request goes.
        (format!("http://{me}#@169.254.169.254/"), 200),
    ];
    for (target, status) in &cases {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {me}\r\nConnection: close\r\n\r\n");
        let mut conn = RawConn::open(me).await;
        conn.write(request.as_bytes()).await.unwrap();
        let answer = conn.response().await.expect(target);
        assert_eq!(answer.status, *status, "{target}: {answer:?}");
        if *status == 421 {
            assert_eq!(
                answer.header("proxy-status"),
                Some("idmatch-proxy; error=http_request_denied"),
                "{target}"
            );
        }
        assert!(conn.rest().await.is_empty(), "{target}: closed");
    }
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, [format!("{BASE}/")]);
}
