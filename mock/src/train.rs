//! The training run for a profile-guided build of idmatch-proxy (`benches/pgo.sh`, through the
//! `pgo-train` binary): this mock over TLS, the (instrumented) proxy in front of it, the
//! traffic a sidecar sees, and SIGTERM, so that the proxy writes its profile on the way out.
//!
//! The mix weighs what the profile should favour: mostly small keep-alive JSON POSTs (the hot
//! path, with and without the access log), then the rest of the API, streamed and chunked
//! bodies, and requests the proxy refuses, so that those paths are laid out as cold, not
//! unknown. Every answer is checked: a profile of failures would optimise the wrong paths.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http1::response_head;
use crate::{api::BASE_PATHS, MockApi, Server, TestPki};

const KEY_ID: &str = "pgo-training-key";
const SECRET: &str = "pgo-training-secret-not-for-production";
const CONNECTIONS: usize = 8;
/// What `benches/pgo.sh` trains with: 16,000 hot-path requests per log level.
pub const REQUESTS_PER_CONNECTION: usize = 2_000;

/// Runs `proxy` twice (access log on, then off) in front of this mock, `per_connection`
/// requests on each of 8 keep-alive connections plus the rare paths; returns the requests
/// answered. `work` receives the mock's CA and the secret file.
pub fn run(proxy: &Path, work: &Path, per_connection: usize) -> io::Result<usize> {
    std::fs::create_dir_all(work)?;
    let pki = TestPki::localhost();
    let ca = work.join("mock-ca.pem");
    pki.write_ca(&ca)?;
    let secret = work.join("secret");
    std::fs::write(&secret, SECRET)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mock = runtime.block_on(
        Server::builder()
            .tls(&pki)
            .handler(MockApi::new(KEY_ID, SECRET))
            .start(),
    );
    let upstream = mock.url(BASE_PATHS[0]);
    // The production default (info: one access-log line per request), then warn, as the
    // benchmarks run it.
    let mut requests = 0;
    for log in ["info", "warn"] {
        let mut running = Proxy::start(proxy, &upstream, &ca, &secret, log)?;
        let result = traffic(running.addr, per_connection);
        running.stop()?;
        requests += result?;
    }
    runtime.block_on(mock.shutdown());
    Ok(requests)
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(
        binary: &Path,
        upstream: &str,
        ca: &Path,
        secret: &Path,
        log: &str,
    ) -> io::Result<Proxy> {
        let (addr, admin) = (free_port()?, free_port()?);
        let child = Command::new(binary)
            .env_clear()
            .env("IDMATCH_LISTEN", addr.to_string())
            .env("IDMATCH_ADMIN_LISTEN", admin.to_string())
            .env("IDMATCH_UPSTREAM_URL", upstream)
            .env("IDMATCH_UPSTREAM_CA_FILE", ca)
            .env("IDMATCH_KEY_ID", KEY_ID)
            .env("IDMATCH_SECRET_FILE", secret)
            .env("IDMATCH_DRAIN_DELAY", "0s")
            // Trained at full speed: the rate limiter would allow one request a second.
            .env("IDMATCH_RATE_LIMIT_INTERVAL", "0s")
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut proxy = Proxy { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = TcpStream::connect(admin)
                .and_then(|stream| {
                    let mut connection = Connection::new(stream)?;
                    connection.exchange(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n")
                })
                .is_ok_and(|(status, _)| status == 200);
            if ready {
                return Ok(proxy);
            }
            if let Some(status) = proxy.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "the proxy exited at start: {status}"
                )));
            }
            if Instant::now() > deadline {
                proxy.child.kill()?;
                return Err(io::Error::other("the proxy was not ready within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as Kubernetes stops it: the profile is written when the process exits normally,
    /// which SIGKILL would prevent. `kill` is the shell's, so no procps is needed.
    fn stop(&mut self) -> io::Result<()> {
        let pid = self.child.id().to_string();
        let sent = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &pid])
            .status()?;
        if !sent.success() {
            return Err(io::Error::other("kill -TERM failed"));
        }
        let status = self.child.wait()?;
        if !status.success() {
            return Err(io::Error::other(format!("the proxy exited with {status}")));
        }
        Ok(())
    }
}

fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The mix, on `CONNECTIONS` keep-alive connections at once; returns the requests answered.
fn traffic(addr: SocketAddr, per_connection: usize) -> io::Result<usize> {
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|worker| std::thread::spawn(move || connection_mix(addr, worker, per_connection)))
        .collect();
    let mut requests = rare_paths(addr)?;
    for worker in workers {
        requests += worker
            .join()
            .map_err(|_| io::Error::other("a worker panicked"))??;
    }
    Ok(requests)
}

/// One keep-alive connection's requests: nine in ten the hot path.
fn connection_mix(addr: SocketAddr, worker: usize, requests: usize) -> io::Result<usize> {
    let mut connection = Connection::new(TcpStream::connect(addr)?)?;
    for i in 0..requests {
        let (request, expected) = match (i + worker) % 20 {
            0 => (
                post(
                    "/identity-match",
                    r#"{"phoneNumber":"+31610000001","serviceType":"match","firstName":"John","lastName":"Verhoeven","postalCode":"1234 AB"}"#,
                ),
                200,
            ),
            1 => (
                post(
                    "/number-verify",
                    r#"{"phoneNumber":"+31610000001","callbackUrl":"https://app.example/callback"}"#,
                ),
                200,
            ),
            n => (
                post(
                    "/sim-swap",
                    match n % 3 {
                        0 => r#"{"phoneNumber":"+31610000001","serviceType":"timestamp"}"#,
                        1 => r#"{"phoneNumber":"+31610000002","serviceType":"24h"}"#,
                        _ => r#"{"phoneNumber":"+31610000003","serviceType":"range"}"#,
                    },
                ),
                200,
            ),
        };
        expect(&request, connection.exchange(&request)?, |status| {
            status == expected
        })?;
    }
    Ok(requests)
}

/// An error naming the request unless its answer's status passes `check`.
fn expect(
    request: &[u8],
    (status, _): (u16, usize),
    check: impl Fn(u16) -> bool,
) -> io::Result<()> {
    if check(status) {
        return Ok(());
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    Err(io::Error::other(format!(
        "{:?} was answered {status}",
        String::from_utf8_lossy(line)
    )))
}

/// Paths a sidecar takes now and then: a GET, a query, bodies streamed rather than kept
/// (larger than the replay buffer, or chunked), and requests the proxy answers itself.
fn rare_paths(addr: SocketAddr) -> io::Result<usize> {
    let large = vec![b'x'; 256 * 1024];
    let mut large_request = format!(
        "POST /sim-swap HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        large.len()
    )
    .into_bytes();
    large_request.extend_from_slice(&large);
    let requests: [&[u8]; 5] = [
        b"GET /number-verify/unknown-session?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        &large_request,
        b"POST /sim-swap HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n\
          3b\r\n{\"phoneNumber\":\"+31610000002\",\"serviceType\":\"timestamp\"}\r\n0\r\n\r\n",
        b"TRACE /sim-swap HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET http://elsewhere.example/sim-swap HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
    ];
    let mut answered = 0;
    for _ in 0..50 {
        for request in requests {
            // A connection of its own: the proxy may close one after refusing a request.
            let mut connection = Connection::new(TcpStream::connect(addr)?)?;
            // The proxy's own refusals are 4xx; a 5xx would be a path that failed.
            expect(request, connection.exchange(request)?, |status| {
                status < 500
            })?;
            answered += 1;
        }
    }
    Ok(answered)
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: pgo-train\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A blocking HTTP/1.1 client connection that reads `Content-Length` responses.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn new(stream: TcpStream) -> io::Result<Connection> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request`, reads the response; its status and body length.
    fn exchange(&mut self, request: &[u8]) -> io::Result<(u16, usize)> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let mut chunk = [0; 4096];
        loop {
            if let Some((status, head_end, length)) = response_head(&self.buf)? {
                if self.buf.len() - head_end >= length {
                    return Ok((status, length));
                }
            }
            match self.stream.read(&mut chunk)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
