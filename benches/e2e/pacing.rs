//! Pacing precision: with the rate limiter on and a queue that never empties, how long after its
//! send slot each request reaches the upstream.
//!
//! Slots are `rate_limit.interval` apart, so with requests always waiting the n-th leaves at the
//! first slot plus n intervals. The upstream, in this process, notes when each request arrives.
//! The earliest arrival against its slot is taken as the path's own delay (loopback, TLS, the
//! upstream's parsing); each request's lateness is how much later than that it came. Slots kept
//! in the process, then in a local Redis (if `redis-server` is installed), as replicas share
//! them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use idmatch_mock::server::json;
use idmatch_mock::{Server, TestPki};

use crate::load::{self, Connection, Target};
use crate::procs::{self, Proc};
use crate::{mock_runtime, ms, proxy_env, Bench, BODY, PROXY_BIN};

const INTERVAL: Duration = Duration::from_millis(100);
const REQUESTS: usize = 200;
/// Clients sending one request after another: 8 waiting at any time, 0.8 s of queue, under the
/// default `rate_limit.max_wait` of 5 s.
const CLIENTS: usize = 8;

/// One store's run: each request's lateness and the shortest gap between two sends.
struct Paced {
    store: String,
    late: Vec<Duration>,
    shortest_gap: Duration,
}

impl Bench {
    /// The `pacing` phase (module documentation).
    pub fn pacing(&mut self) {
        println!("pacing");
        let load_before = procs::loadavg();
        let runtime = mock_runtime();
        let pki = TestPki::localhost();
        let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let noted = arrivals.clone();
        let upstream = runtime.block_on(
            Server::builder()
                .tls(&pki)
                .handler(move |_: Request<Incoming>| {
                    noted.lock().unwrap().push(Instant::now());
                    async { json(StatusCode::OK, serde_json::json!({})) }
                })
                .start(),
        );
        let ca = self.run.join("pacing-ca.pem");
        pki.write_ca(&ca).expect("write CA");

        let mut runs = vec![self.paced("in the process", upstream.addr(), &ca, &[], &arrivals)];
        match Redis::start(self.settings.harness_cpu) {
            Some(redis) => {
                let url = format!("redis://{}", redis.addr);
                let env = [("IDMATCH_RATE_LIMIT_REDIS_URL", url.as_str())];
                runs.push(self.paced("in Redis", upstream.addr(), &ca, &env, &arrivals));
            }
            None => println!("pacing: redis-server not installed; slots in Redis not measured"),
        }
        self.pacing_table(&runs, &load_before);
    }

    fn paced(
        &self,
        store: &str,
        upstream: SocketAddr,
        ca: &std::path::Path,
        env: &[(&str, &str)],
        arrivals: &Mutex<Vec<Instant>>,
    ) -> Paced {
        let listen = procs::free_port();
        let mut command = procs::pinned(self.settings.sut_cpu, PROXY_BIN);
        proxy_env(
            &mut command,
            &self.run,
            upstream,
            listen,
            procs::free_port(),
        );
        command
            .env("IDMATCH_UPSTREAM_CA_FILE", ca)
            .env(
                "IDMATCH_RATE_LIMIT_INTERVAL",
                format!("{}ms", INTERVAL.as_millis()),
            )
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied());
        let mut proxy = Proc::spawn("idmatch-proxy (pacing)", command);
        let addr = SocketAddr::from(([127, 0, 0, 1], listen));
        procs::wait_listening(addr, &mut proxy);
        let target = Arc::new(Target {
            addr,
            tls: None,
            request: Arc::new(load::post(&addr.to_string(), "/sim-swap", BODY, None)),
        });
        // The token, the upstream connection and the store's script are ready before timing.
        let mut warm_up = Connection::open(&target).expect("connect");
        assert_eq!(warm_up.exchange(&target.request).expect("warm-up").0, 200);
        arrivals.lock().unwrap().clear();

        let sent = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (target, sent) = (target.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut conn = Connection::open(&target).expect("connect");
                    while sent.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                        let (status, _) = conn.exchange(&target.request).expect("response");
                        assert_eq!(status, 200, "pacing: {}", conn.last_body());
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().expect("client");
        }
        proxy.check_alive();
        let arrivals = std::mem::take(&mut *arrivals.lock().unwrap());
        assert_eq!(arrivals.len(), REQUESTS);
        lateness(store, &arrivals)
    }

    fn pacing_table(&mut self, runs: &[Paced], load_before: &str) {
        let _ = write!(
            self.report,
            "\n### Pacing precision: {REQUESTS} requests, `rate_limit.interval` {} ms, {CLIENTS} clients always waiting\n\n\
             Lateness: how much later than its slot a request reached the upstream, beyond the \
             path's own delay (the earliest arrival against its slot). The shortest gap between \
             two arrivals shows the limit was never exceeded by more than that jitter.\n\n\
             | slots kept | requests | p50 late ms | p99 late ms | max late ms | shortest gap ms |\n\
             |---|---|---|---|---|---|\n",
            INTERVAL.as_millis()
        );
        for run in runs {
            let mut late = run.late.clone();
            late.sort();
            let at = |q: f64| ms(late[((late.len() - 1) as f64 * q).round() as usize]);
            let _ = writeln!(
                self.report,
                "| {} | {} | {:.2} | **{:.2}** | {:.2} | {:.2} |",
                run.store,
                late.len(),
                at(0.5),
                at(0.99),
                at(1.0),
                ms(run.shortest_gap)
            );
        }
        let _ = writeln!(
            self.report,
            "\nLoad average before → after: {load_before} → {}.",
            procs::loadavg()
        );
    }
}

/// Each arrival's lateness against the grid of slots `INTERVAL` apart that fits them best
/// from below.
fn lateness(store: &str, arrivals: &[Instant]) -> Paced {
    let first = arrivals[0];
    let offsets: Vec<f64> = arrivals
        .iter()
        .enumerate()
        .map(|(n, at)| (*at - first).as_secs_f64() - n as f64 * INTERVAL.as_secs_f64())
        .collect();
    let earliest = offsets.iter().copied().fold(f64::INFINITY, f64::min);
    let late = offsets
        .iter()
        .map(|offset| Duration::from_secs_f64(offset - earliest))
        .collect();
    let shortest_gap = arrivals
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .min()
        .expect("two arrivals");
    Paced {
        store: store.to_owned(),
        late,
        shortest_gap,
    }
}

/// A throwaway redis-server on a free loopback port, without persistence, on the harness's core.
struct Redis {
    addr: SocketAddr,
    _proc: Proc,
}

impl Redis {
    fn start(cpu: usize) -> Option<Redis> {
        let port = procs::free_port();
        let mut command = procs::pinned(cpu, "redis-server");
        command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        command.args(["--appendonly", "no"]);
        let found = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return None;
        }
        let mut proc = Proc::spawn("redis-server", command);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        procs::wait_listening(addr, &mut proc);
        Some(Redis { addr, _proc: proc })
    }
}
