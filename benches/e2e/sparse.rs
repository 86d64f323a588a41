//! Sparse traffic: single requests with pauses between them, through a relay that adds a 20 ms
//! round trip, to an upstream that closes connections idle for 3 s.
//!
//! On loopback a handshake costs next to nothing, so the dense phases cannot see it. Real
//! traffic is one request every few seconds or minutes per credential, over a link with a
//! round trip of its own, and a request that finds no open upstream connection waits for the
//! TCP and TLS handshakes first. Three situations: the first request after start, requests one
//! after another (warm), and a request after a pause longer than the upstream's keep-alive
//! timeout. `upstream.keep_warm` serves the first and the last on a connection made in the
//! background (at start, and whenever the upstream closes the one open); each is measured with
//! it off as well.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::load::{self, Connection, Target};
use crate::procs::{self, Proc};
use crate::{ms, proxy_env, Bench, Kind, BODY, PROXY_BIN, UPSTREAM_PATH};

/// Each way through the relay.
const ONE_WAY: Duration = Duration::from_millis(10);
/// Longer than the stub's `keepalive_timeout 3s` (upstream.conf.template): by then the
/// upstream has closed the connection.
const IDLE: Duration = Duration::from_secs(5);
/// After `/readyz` answers 200: time for the connection made at start to be up, so that the
/// first request measures what a request a moment after start finds.
const SETTLE: Duration = Duration::from_millis(500);
const WARM: usize = 10;
const AFTER_IDLE: usize = 3;
/// Fresh starts measured for the first request after start, per setting: one sample each.
const STARTS: usize = 3;

/// A TCP relay on loopback that holds every chunk `ONE_WAY` in each direction, in order: a
/// link with a 20 ms round trip. Counts the connections it opened to the upstream.
struct Relay {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicU64::new(0));
        let count = connections.clone();
        // Accepts until the bench exits: the port is its own.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || relay(client, upstream));
            }
        });
        Relay { addr, connections }
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

fn relay(client: TcpStream, upstream: SocketAddr) {
    // The client's connect returned at once (loopback), but over the link the TCP handshake
    // takes a round trip before the first byte can leave: connecting onwards only after that
    // round trip makes the first bytes arrive when they would.
    std::thread::sleep(2 * ONE_WAY);
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    // Small writes (TLS records, h2 frames) must not wait for Nagle on top of the delay.
    for socket in [&client, &server] {
        let _ = socket.set_nodelay(true);
    }
    let (Ok(client_out), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    delayed(client, server_out);
    delayed(server, client_out);
}

/// Copies `from` to `to`, each chunk written `ONE_WAY` after it was read, in order, and passes
/// the end of the stream on as late.
fn delayed(mut from: TcpStream, mut to: TcpStream) {
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // An empty chunk is the end of the stream (or an error: ended alike).
            let n = from.read(&mut buf).unwrap_or(0);
            let sent = chunks.send((Instant::now() + ONE_WAY, buf[..n].to_vec()));
            if sent.is_err() || n == 0 {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for (at, chunk) in due {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if chunk.is_empty() || to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Times of one situation, and the upstream connections the relay opened meanwhile: a handshake
/// on the requests' path.
#[derive(Default)]
struct Sample {
    times: Vec<Duration>,
    opened: u64,
}

impl Sample {
    fn add(&mut self, other: Sample) {
        self.times.extend(other.times);
        self.opened += other.opened;
    }

    fn median(&self) -> Duration {
        let mut sorted = self.times.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }
}

/// Runs `requests` and counts the upstream connections opened while they ran.
fn counted(relay: &Relay, requests: impl FnOnce() -> Vec<Duration>) -> Sample {
    let before = relay.connections();
    let times = requests();
    Sample {
        times,
        opened: relay.connections() - before,
    }
}

/// A request on a new connection, timed from the connect to the answer's last byte (direct:
/// the client's handshakes included; to the proxy: a loopback connect, microseconds).
fn single(target: &Target) -> (Connection, Duration) {
    let started = Instant::now();
    let mut conn = Connection::open(target).expect("connect");
    exchange(&mut conn, target);
    (conn, started.elapsed())
}

fn exchange(conn: &mut Connection, target: &Target) {
    let (status, _) = conn.exchange(&target.request).expect("response");
    assert_eq!(status, 200, "sparse: {}", conn.last_body());
}

/// First, warm and after-idle, in that order, on a target just started; and the upstream
/// connections opened during the pauses, with no request on the way.
fn situations(relay: &Relay, target: &Target) -> ([Sample; 3], u64) {
    let mut conn = None;
    let first = counted(relay, || {
        let (open, time) = single(target);
        conn = Some(open);
        vec![time]
    });
    let mut conn = conn.expect("opened");
    let warm = counted(relay, || {
        (0..WARM)
            .map(|_| {
                let started = Instant::now();
                exchange(&mut conn, target);
                started.elapsed()
            })
            .collect()
    });
    drop(conn);
    let mut idle = Sample::default();
    let mut opened_idle = 0;
    for _ in 0..AFTER_IDLE {
        let before = relay.connections();
        std::thread::sleep(IDLE);
        opened_idle += relay.connections() - before;
        idle.add(counted(relay, || vec![single(target).1]));
    }
    ([first, warm, idle], opened_idle)
}

/// A table row: who, in which situation, and the warm median its ratio is taken to.
struct Row {
    target: &'static str,
    situation: String,
    sample: Sample,
    warm: Duration,
}

impl Bench {
    /// The `sparse` phase (module documentation).
    pub fn sparse(&mut self) {
        println!("sparse");
        let load_before = procs::loadavg();
        let relay = Relay::start(self.upstream_short_addr);
        let mut rows = Vec::new();
        let ours = "idmatch-proxy, RUST_LOG=warn";
        if self
            .settings
            .targets
            .contains(&Kind::Proxy { access_log: false })
        {
            let off = [("IDMATCH_UPSTREAM_KEEP_WARM", "0s")];
            let (proxy, target) = self.start_proxy(&relay, &[]);
            let ([mut first, warm, idle], opened_idle) = situations(&relay, &target);
            drop(proxy);
            let (proxy, target) = self.start_proxy(&relay, &off);
            let ([mut first_off, _, idle_off], opened_idle_off) = situations(&relay, &target);
            drop(proxy);
            let http1 = [("IDMATCH_UPSTREAM_HTTP2", "false")];
            let (proxy, target) = self.start_proxy(&relay, &http1);
            let ([_, warm_http1, idle_http1], opened_idle_http1) = situations(&relay, &target);
            drop(proxy);
            // More fresh starts, alternating between the two settings so that both see the
            // same load.
            for _ in 1..STARTS {
                first.add(self.first_after_start(&relay, &[]));
                first_off.add(self.first_after_start(&relay, &off));
            }
            let warm_median = warm.median();
            let paused = AFTER_IDLE as u64 * IDLE.as_secs();
            rows.extend([
                Row {
                    target: ours,
                    situation: format!(
                        "first after start (/readyz 200 + {} ms), {STARTS} starts",
                        SETTLE.as_millis()
                    ),
                    sample: first,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: "warm: one after another, right after the first".into(),
                    sample: warm,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: format!(
                        "after {} s idle (upstream keep-alive 3 s); {opened_idle} connections made ahead in {paused} s of pauses",
                        IDLE.as_secs()
                    ),
                    sample: idle,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: "warm, `IDMATCH_UPSTREAM_HTTP2=false` (http/1.1 to the upstream)".into(),
                    sample: warm_http1,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: format!(
                        "after {} s idle, `IDMATCH_UPSTREAM_HTTP2=false`; {opened_idle_http1} connections made ahead in {paused} s of pauses",
                        IDLE.as_secs()
                    ),
                    sample: idle_http1,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: "first after start, `IDMATCH_UPSTREAM_KEEP_WARM=0s`".into(),
                    sample: first_off,
                    warm: warm_median,
                },
                Row {
                    target: ours,
                    situation: format!(
                        "after {} s idle, `IDMATCH_UPSTREAM_KEEP_WARM=0s`; {opened_idle_off} connections made in {paused} s of pauses",
                        IDLE.as_secs()
                    ),
                    sample: idle_off,
                    warm: warm_median,
                },
            ]);
        }
        if self.settings.targets.contains(&Kind::Direct) {
            let target = Target {
                addr: relay.addr,
                tls: Some(load::tls_config(&self.ca)),
                request: Arc::new(load::post(
                    "localhost",
                    UPSTREAM_PATH,
                    BODY,
                    Some(&self.bearer),
                )),
            };
            let ([first, warm, idle], _) = situations(&relay, &target);
            let direct = "direct (client → upstream, TLS, HTTP/1.1)";
            let warm_median = warm.median();
            for (situation, sample) in [
                ("first, on a new connection".to_owned(), first),
                ("warm: one after another on it".to_owned(), warm),
                (
                    format!("after {} s idle, on a new connection", IDLE.as_secs()),
                    idle,
                ),
            ] {
                rows.push(Row {
                    target: direct,
                    situation,
                    sample,
                    warm: warm_median,
                });
            }
        }
        self.sparse_table(&rows, &load_before);
    }

    /// idmatch-proxy through `relay`, with `env` on top of the bench's settings, once `/readyz`
    /// answers 200 and `SETTLE` has passed; and how to send it the request.
    fn start_proxy(&self, relay: &Relay, env: &[(&str, &str)]) -> (Proc, Target) {
        let (listen, admin) = (procs::free_port(), procs::free_port());
        let mut command = procs::pinned(self.settings.sut_cpu, PROXY_BIN);
        proxy_env(&mut command, &self.run, relay.addr, listen, admin);
        command.env("RUST_LOG", "warn").envs(env.iter().copied());
        let mut proxy = Proc::spawn("idmatch-proxy (sparse)", command);
        let readyz = Target {
            addr: SocketAddr::from(([127, 0, 0, 1], admin)),
            tls: None,
            request: Arc::new(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n".to_vec()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = Connection::open(&readyz).and_then(|mut c| c.exchange(&readyz.request));
            if matches!(status, Ok((200, _))) {
                break;
            }
            proxy.check_alive();
            assert!(Instant::now() < deadline, "/readyz: {status:?} after 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(SETTLE);
        let addr = SocketAddr::from(([127, 0, 0, 1], listen));
        let target = Target {
            addr,
            tls: None,
            request: Arc::new(load::post(&addr.to_string(), "/sim-swap", BODY, None)),
        };
        (proxy, target)
    }

    fn first_after_start(&self, relay: &Relay, env: &[(&str, &str)]) -> Sample {
        let (_proxy, target) = self.start_proxy(relay, env);
        counted(relay, || vec![single(&target).1])
    }

    fn sparse_table(&mut self, rows: &[Row], load_before: &str) {
        let _ = write!(
            self.report,
            "\n### Sparse traffic: single requests through a 20 ms round trip, upstream keep-alive 3 s\n\n\
             A relay on loopback holds every chunk {} ms each way, and a new connection's first \
             bytes one round trip more, as its TCP handshake would. Behind it, the stub's \
             third server: h2 and http/1.1 offered (idmatch-proxy speaks h2 to it), idle \
             connections closed after 3 s. The client is on loopback in front of the proxy. Each \
             time is one request, from the client's connect to the last byte of the answer. \
             \"Upstream connections\": opened by anyone while those requests ran, i.e. handshakes \
             on their path.\n\n\
             | target | situation | requests | ms | median ms | ÷ warm | upstream connections opened |\n\
             |---|---|---|---|---|---|---|\n",
            ONE_WAY.as_millis()
        );
        for row in rows {
            let times = &row.sample.times;
            // Each of a few single requests; the range of the warm ones.
            let each = if times.len() > AFTER_IDLE.max(STARTS) {
                let (min, max) = (times.iter().min(), times.iter().max());
                format!("{:.1}–{:.1}", ms(*min.unwrap()), ms(*max.unwrap()))
            } else {
                let each: Vec<String> = times.iter().map(|t| format!("{:.1}", ms(*t))).collect();
                each.join(" / ")
            };
            let median = row.sample.median();
            let _ = writeln!(
                self.report,
                "| {} | {} | {} | {each} | **{:.1}** | {:.2} | {} |",
                row.target,
                row.situation,
                times.len(),
                ms(median),
                median.as_secs_f64() / row.warm.as_secs_f64(),
                row.sample.opened,
            );
        }
        let _ = writeln!(
            self.report,
            "\nLoad average before → after: {load_before} → {}.",
            procs::loadavg()
        );
    }
}
