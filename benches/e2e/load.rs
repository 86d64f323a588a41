//! Load: wrk for the closed-loop maximum, and our own open-loop generator for latency at a
//! fixed rate.
//!
//! Why our own: wrk is closed-loop (a slow response delays the next request, hiding queueing),
//! and tokio-based generators (oha) pace with tokio's 1 ms timer, which sends requests in
//! bursts. Here a pacer thread with a timer slack of 1 ns releases request `i` at
//! `start + i / rate`; the connections live on one tokio thread (an epoll loop, like wrk), and
//! whichever is free takes the next request released. Two latencies are kept per request:
//! - service time, from the first byte written to the last byte of the response read;
//! - response time, from when it was due (what a queue in front of a slow server adds: the
//!   correction for coordinated omission).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idmatch_mock::http1::response_head;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Where requests go, and how.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Trust this CA and speak TLS (the upstream, for the direct baseline).
    pub tls: Option<Arc<ClientConfig>>,
    /// The request, ready to write.
    pub request: Arc<Vec<u8>>,
}

/// `POST path` with a small JSON body, as an app calls `/sim-swap`.
pub fn post(host: &str, path: &str, body: &str, authorization: Option<&str>) -> Vec<u8> {
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: idmatch-bench\r\n\
         Content-Type: application/json\r\n{authorization}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub fn tls_config(ca_pem: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(ca_pem).expect("CA PEM");
    roots.add(ca).expect("usable CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Connection {
    stream: Stream,
    buf: Vec<u8>,
}

impl Connection {
    pub fn open(target: &Target) -> io::Result<Connection> {
        let tcp = TcpStream::connect(target.addr)?;
        tcp.set_nodelay(true)?;
        let stream = match &target.tls {
            None => Stream::Plain(tcp),
            Some(config) => {
                let name = ServerName::try_from("localhost").expect("a DNS name");
                let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
                Stream::Tls(Box::new(StreamOwned::new(conn, tcp)))
            }
        };
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Writes `request` and reads one response; returns its status and body length.
    pub fn exchange(&mut self, request: &[u8]) -> io::Result<(u16, usize)> {
        self.send(request)?;
        self.read_response()
    }

    /// Writes a whole request: on an idle connection it fits the socket buffer at once.
    pub fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.write_all(request)?;
        self.stream.flush()
    }

    /// Reads one response (blocking socket); returns its status and body length.
    pub fn read_response(&mut self) -> io::Result<(u16, usize)> {
        self.try_read_response()?
            .ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }

    /// Reads what has arrived: the response's status and body length once it is all here,
    /// `None` if the (non-blocking) socket has no more yet.
    pub fn try_read_response(&mut self) -> io::Result<Option<(u16, usize)>> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((status, head_end, length)) = response_head(&self.buf)? {
                if self.buf.len() - head_end >= length {
                    return Ok(Some((status, length)));
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }

    pub fn socket(&self) -> &TcpStream {
        match &self.stream {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &tls.sock,
        }
    }

    /// The body of the last response (when it came with the head, as small ones do).
    pub fn last_body(&self) -> String {
        let start = response_head(&self.buf)
            .ok()
            .flatten()
            .map_or(0, |(_, head_end, _)| head_end);
        String::from_utf8_lossy(&self.buf[start..]).into_owned()
    }

    /// A field of the last response's head (`name` in lower case).
    pub fn last_header(&self, name: &str) -> Option<String> {
        let (_, head_end, _) = response_head(&self.buf).ok().flatten()?;
        let head = String::from_utf8_lossy(&self.buf[..head_end]);
        head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    /// Starts a request (no pipelining here): what was read of the last response is dropped.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.buf.clear();
        self.stream.write_all(bytes)
    }
}

/// Latencies of one open-loop run, in nanoseconds, sorted.
pub struct OpenLoop {
    pub rate: u64,
    pub sent: u64,
    pub elapsed: Duration,
    pub errors: u64,
    /// Requests sent more than 1 ms after they were due (the generator fell behind).
    pub late: u64,
    pub service: Vec<u64>,
    pub response: Vec<u64>,
    /// Busy fraction of each core during the run (filled by the caller).
    pub busy: Vec<f64>,
    /// CPU per request of the system under test, the stub and the generator, in µs (filled by
    /// the caller).
    pub cpu_us: [f64; 3],
    /// Load average before and after (filled by the caller).
    pub load: (String, String),
}

impl OpenLoop {
    pub fn achieved(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

/// The `q` quantile (0..=1) of sorted nanoseconds, in microseconds.
pub fn quantile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index] as f64 / 1e3
}

/// How long the open-loop generator waits for a response when it has nothing else to do.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `rate` requests per second for `duration` over `connections` keep-alive connections.
///
/// One thread does everything, with one `epoll_pwait2` per wake-up: it sleeps until the next
/// request is due or a response arrives, whichever is first (nanosecond timeouts, 1 ns of timer
/// slack), sends every request that is due on a free connection and reads every response that
/// is ready. No second thread to hand requests over, no channel, no runtime: what the
/// generator costs per request is a `write`, a `read` and at most one wait, so that at half of
/// the proxy's maximum the harness core, which the upstream stub shares, is not what the tail
/// latencies measure.
pub fn open_loop(target: &Target, rate: u64, duration: Duration, connections: usize) -> OpenLoop {
    use rustix::buffer::spare_capacity;
    use rustix::event::epoll;

    let total = rate * duration.as_secs();
    let mut conns: Vec<Connection> = (0..connections)
        .map(|_| Connection::open(target).expect("connect"))
        .collect();
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    for (i, conn) in conns.iter_mut().enumerate() {
        // The TLS handshakes (direct) and the first request happen before the clock starts.
        let (status, _) = conn.exchange(&target.request).expect("first request");
        assert_eq!(status, 200, "first request");
        let socket = conn.socket();
        socket.set_nonblocking(true).expect("non-blocking");
        epoll::add(
            &poll,
            socket,
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )
        .expect("epoll add");
    }
    // 1 ns of timer slack makes the wait end on time, not up to 50 µs late (the default).
    let _ = std::fs::write("/proc/self/timerslack_ns", "1");

    let interval_ns = 1_000_000_000 / rate;
    let start = Instant::now() + Duration::from_millis(20);
    let due = |i: u64| start + Duration::from_nanos(i * interval_ns);
    let mut run = OpenLoop {
        rate,
        sent: 0,
        elapsed: Duration::ZERO,
        errors: 0,
        late: 0,
        service: Vec::with_capacity(total as usize),
        response: Vec::with_capacity(total as usize),
        busy: Vec::new(),
        cpu_us: [f64::NAN; 3],
        load: Default::default(),
    };
    // Per connection: (due, sent) of the request it carries, `None` when free.
    let mut carrying: Vec<Option<(Instant, Instant)>> = vec![None; connections];
    let mut free: Vec<usize> = (0..connections).rev().collect();
    let mut open = connections;
    let mut events = Vec::with_capacity(connections);
    let mut next = 0u64;
    while next < total || free.len() < open {
        let mut now = Instant::now();
        // Whichever connection is free takes the next request that is due.
        while next < total && due(next) <= now {
            let Some(i) = free.pop() else { break };
            let due = due(next);
            next += 1;
            run.sent += 1;
            if now - due > Duration::from_millis(1) {
                run.late += 1;
            }
            match conns[i].send(&target.request) {
                Ok(()) => carrying[i] = Some((due, now)),
                // A failed connection takes no more requests; the others carry on.
                Err(_) => {
                    run.errors += 1;
                    open -= 1;
                }
            }
            now = Instant::now();
        }
        if open == 0 {
            run.errors += total - next;
            run.sent = total;
            break;
        }
        // Sleep until the next request is due, unless none can be sent before a response; then
        // until one comes, for as long as wrk's `--timeout` elsewhere in this bench.
        let sending = next < total && !free.is_empty();
        let left = if sending {
            due(next).saturating_duration_since(now)
        } else {
            RESPONSE_TIMEOUT
        };
        let wait = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        events.clear();
        match epoll::wait(&poll, spare_capacity(&mut events), Some(&wait)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => panic!("epoll_pwait2: {error}"),
        }
        if events.is_empty() && !sending {
            // Nothing answered in time: what is in flight and what was never sent are errors.
            run.errors += carrying.iter().flatten().count() as u64 + (total - next);
            run.sent = total;
            break;
        }
        let done = Instant::now();
        for event in &events {
            let i = event.data.u64() as usize;
            let Some((due, sent)) = carrying[i] else {
                continue;
            };
            match conns[i].try_read_response() {
                Ok(None) => continue,
                Ok(Some((200, _))) => {
                    run.service.push((done - sent).as_nanos() as u64);
                    run.response.push((done - due).as_nanos() as u64);
                    free.push(i);
                }
                Ok(Some(_)) => {
                    run.errors += 1;
                    free.push(i);
                }
                Err(_) => {
                    run.errors += 1;
                    open -= 1;
                    let _ = epoll::delete(&poll, conns[i].socket());
                }
            }
            carrying[i] = None;
        }
    }
    run.elapsed = start.elapsed();
    run.service.sort_unstable();
    run.response.sort_unstable();
    run
}

/// Result of one wrk run.
#[derive(Debug, Default)]
pub struct Wrk {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub non_2xx: u64,
    pub socket_errors: String,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `wrk -t1 -c<connections> -d<secs>s --latency -s <script> <url>` on the harness core.
pub fn wrk(url: &str, script: &Path, connections: usize, secs: u64) -> Wrk {
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "--latency",
            "-s",
            script.to_str().expect("UTF-8 path"),
            url,
        ])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk failed: {text}");
    let mut wrk = Wrk::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.contains(" requests in ") {
            wrk.requests = words[0].parse().unwrap_or(0);
            wrk.seconds = words[3]
                .trim_end_matches(',')
                .trim_end_matches('s')
                .parse()
                .unwrap_or(f64::NAN);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            wrk.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            wrk.non_2xx = v.trim().parse().unwrap_or(u64::MAX);
        } else if line.starts_with("Socket errors:") {
            wrk.socket_errors = line.to_owned();
        } else if words.len() == 2 && words[0] == "50%" {
            wrk.p50_us = duration_us(words[1]);
        } else if words.len() == 2 && words[0] == "99%" {
            wrk.p99_us = duration_us(words[1]);
        }
    }
    wrk
}

/// wrk's "123.45us", "1.23ms", "1.00s".
fn duration_us(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        "m" => number * 60e6,
        _ => f64::NAN,
    }
}

/// The wrk script for a JSON POST.
pub fn wrk_script(body: &str, authorization: Option<&str>) -> String {
    let mut script = format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
    );
    if let Some(a) = authorization {
        script.push_str(&format!("wrk.headers[\"Authorization\"] = \"{a}\"\n"));
    }
    script
}

/// nginx `stub_status` counters: (accepted connections, requests).
pub fn nginx_status(addr: SocketAddr) -> (u64, u64) {
    let mut conn = Connection {
        stream: Stream::Plain(TcpStream::connect(addr).expect("status listener")),
        buf: Vec::new(),
    };
    conn.exchange(b"GET /status HTTP/1.1\r\nHost: status\r\nConnection: close\r\n\r\n")
        .expect("status");
    let body = conn.last_body();
    // "Active connections: 1 \nserver accepts handled requests\n 10 10 20 \n..."
    let numbers: Vec<u64> = body
        .lines()
        .nth(2)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[2])
}
