//! End to end on loopback: small JSON `POST /sim-swap` with client keep-alive, against a local
//! nginx TLS stub, directly and through each proxy, every proxy pinned to its own core.
//!
//! `cargo bench --bench e2e` builds the release binary (the bench profile shares it) and runs
//! everything; benches/README.md has the install line, the knobs and the latest table.
//!
//! # Plan (2 cores)
//! - core 0, the harness: this driver, wrk, our open-loop generator, the upstream stub (nginx,
//!   1 worker) and, for the upload, the in-process mock upstream;
//! - core 1, the system under test, alone: idmatch-proxy (`IDMATCH_WORKER_THREADS=1`), the
//!   nginx + njs peer (1 worker), nginx with a static header (1 worker), or the floor: this
//!   binary as a bare forwarder on idmatch-proxy's stack (floor.rs). One at a time.
//!
//! Every number that depends on the machine's load comes with the load: the load average before
//! and after, and how busy each core was during the run (anything above what our processes used
//! is someone else's).

mod floor;
mod hops;
mod idle;
mod load;
mod pacing;
mod procs;
mod sparse;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use idmatch_mock::server::json;
use idmatch_mock::{Server, TestPki};

use load::{quantile_us, Connection, OpenLoop, Target, Wrk};
use procs::{CoreTimes, Proc, RssPeak};

const PROXY_BIN: &str = env!("CARGO_BIN_EXE_idmatch-proxy");
const BODY: &str = r#"{"phoneNumber":"+31610000001","serviceType":"24h"}"#;
const UPSTREAM_PATH: &str = "/mobile-identity/v1/sim-swap";
const KEY_ID: &str = "3b438437-04a4-40bb-8389-54bb02766fba";
const SECRET: &str = "AC4Etykn7jusGR5FwLDAtILtQbiQbTMKedP31szXg4WlSbjGEXyNMZ";
const MIB: f64 = 1024.0 * 1024.0;

/// Knobs, from the environment (see benches/README.md).
struct Settings {
    harness_cpu: usize,
    sut_cpu: usize,
    /// Length of each closed-loop maximum-throughput run.
    max_secs: u64,
    /// Length of each fixed-rate latency run.
    latency_secs: u64,
    /// wrk connections for the maximum.
    connections: usize,
    /// Open-loop generator connections.
    latency_connections: usize,
    upload_bytes: u64,
    ready_runs: usize,
    /// `BENCH_TARGETS`: which systems to measure (default: all).
    targets: Vec<Kind>,
    /// `BENCH_RATES`: fixed rates instead of 5/25/50 % of idmatch-proxy's maximum.
    rates: Option<Vec<u64>>,
    /// `BENCH_SKIP`: phases to leave out: start, max, rounds, hops, latency, upload, sparse, idle,
    /// pacing.
    skip: Vec<String>,
    /// `BENCH_ONLY`: the phases to run, if not all.
    only: Option<Vec<String>>,
    /// `BENCH_UPSTREAMS`: the rounds against the stub offering http/1.1 only (`http1`), and
    /// offering h2 too (`h2`); both by default.
    upstreams: Vec<bool>,
    /// `BENCH_ROUNDS`: interleaved repeats of the maximum for idmatch-proxy, the peer and
    /// static nginx, whose median ratios do not hang on one run's luck.
    rounds: usize,
}

/// A comma-separated variable.
fn list(name: &str) -> Option<Vec<String>> {
    let value = std::env::var(name).ok()?;
    Some(value.split(',').map(|v| v.trim().to_owned()).collect())
}

impl Settings {
    fn runs(&self, phase: &str) -> bool {
        let only = self.only.as_ref();
        !self.skip.iter().any(|s| s == phase) && only.is_none_or(|o| o.iter().any(|s| s == phase))
    }

    fn from_env() -> Settings {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name}={v:?}: expected a number"))
                })
                .unwrap_or(default)
        };
        let quick = std::env::var_os("BENCH_QUICK").is_some();
        Settings {
            harness_cpu: var("BENCH_HARNESS_CPU", 0) as usize,
            sut_cpu: var("BENCH_SUT_CPU", 1) as usize,
            max_secs: var("BENCH_MAX_SECS", if quick { 3 } else { 10 }),
            latency_secs: var("BENCH_LATENCY_SECS", if quick { 3 } else { 10 }),
            connections: var("BENCH_CONNECTIONS", 64) as usize,
            latency_connections: var("BENCH_LATENCY_CONNECTIONS", 32) as usize,
            upload_bytes: var("BENCH_UPLOAD_MIB", if quick { 256 } else { 1024 }) << 20,
            ready_runs: var("BENCH_READY_RUNS", if quick { 3 } else { 10 }) as usize,
            targets: list("BENCH_TARGETS").map_or(Kind::ALL.to_vec(), |ids| {
                Kind::ALL
                    .into_iter()
                    .filter(|k| ids.iter().any(|id| id == k.id()))
                    .collect()
            }),
            rates: list("BENCH_RATES").map(|rates| {
                rates
                    .iter()
                    .map(|r| r.parse().expect("BENCH_RATES: requests per second"))
                    .collect()
            }),
            skip: list("BENCH_SKIP").unwrap_or_default(),
            only: list("BENCH_ONLY"),
            upstreams: list("BENCH_UPSTREAMS").map_or(vec![false, true], |names| {
                names
                    .iter()
                    .map(|name| match name.as_str() {
                        "http1" => false,
                        "h2" => true,
                        _ => panic!("BENCH_UPSTREAMS={name:?}: expected http1 or h2"),
                    })
                    .collect()
            }),
            rounds: var("BENCH_ROUNDS", if quick { 2 } else { 3 }) as usize,
        }
    }
}

/// What the systems under test share: certificates, credentials, the upstream stub.
struct Bench {
    settings: Settings,
    run: PathBuf,
    ca: PathBuf,
    upstream_addr: SocketAddr,
    /// The same stub, offering `h2` then `http/1.1` in ALPN.
    upstream_h2_addr: SocketAddr,
    /// Another server of the stub, offering h2 and http/1.1, that closes connections idle for
    /// 3 s (the `sparse` phase).
    upstream_short_addr: SocketAddr,
    status_addr: SocketAddr,
    upstream: Proc,
    /// Every target reaches the stub at `upstream_h2_addr` rather than `upstream_addr`.
    upstream_offers_h2: bool,
    /// A token minted by `idmatch-proxy token`: the direct client's and the static nginx's.
    bearer: String,
    report: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Direct,
    /// idmatch-proxy; `access_log`: at the default level (info), else `RUST_LOG=warn`.
    Proxy {
        access_log: bool,
    },
    /// idmatch-proxy (`RUST_LOG=warn`) to an upstream that offers HTTP/2.
    ProxyH2,
    /// idmatch-proxy's profile-guided build (`benches/pgo.sh`, as the image ships it), warn.
    ProxyPgo,
    NginxNjs,
    NginxStatic,
    /// The least a forwarder on idmatch-proxy's stack does (floor.rs).
    Floor,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Proxy { access_log: false },
        Kind::ProxyPgo,
        Kind::Proxy { access_log: true },
        Kind::ProxyH2,
        Kind::NginxNjs,
        Kind::NginxStatic,
        Kind::Floor,
    ];

    /// Its name in `BENCH_TARGETS`.
    fn id(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Proxy { access_log: false } => "proxy",
            Kind::Proxy { access_log: true } => "proxy-log",
            Kind::ProxyH2 => "proxy-h2",
            Kind::ProxyPgo => "proxy-pgo",
            Kind::NginxNjs => "njs",
            Kind::NginxStatic => "static",
            Kind::Floor => "floor",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct (client → upstream, TLS)",
            Kind::Proxy { access_log: false } => "idmatch-proxy, RUST_LOG=warn",
            Kind::Proxy { access_log: true } => "idmatch-proxy, default (access log on)",
            Kind::ProxyH2 => "idmatch-proxy, RUST_LOG=warn, upstream offers h2",
            Kind::ProxyPgo => "idmatch-proxy, PGO build (benches/pgo.sh), RUST_LOG=warn",
            Kind::NginxNjs => "nginx + njs peer (signs per request)",
            Kind::NginxStatic => "nginx, static header (no signing)",
            Kind::Floor => "floor: bare hyper + rustls forwarder, static header",
        }
    }
}

/// A running system under test and how to reach it.
struct Sut {
    kind: Kind,
    proc: Option<Proc>,
    /// What the stub saw the first request come over: `HTTP/1.1` or `HTTP/2.0`.
    protocol: String,
    target: Target,
    url: String,
    script: PathBuf,
}

impl Sut {
    fn cpu(&self) -> Duration {
        self.proc.as_ref().map_or(Duration::ZERO, Proc::cpu)
    }
    fn cpu_sys(&self) -> Duration {
        self.proc.as_ref().map_or(Duration::ZERO, Proc::cpu_sys)
    }
    fn rss(&self) -> u64 {
        self.proc.as_ref().map_or(0, Proc::rss)
    }
}

/// One closed-loop maximum run.
struct MaxRun {
    wrk: Wrk,
    sut_cpu: Duration,
    /// The kernel's part of `sut_cpu`.
    sut_sys: Duration,
    stub_cpu: Duration,
    handshakes: u64,
    busy: Vec<f64>,
    load: (String, String),
}

/// Open-loop runs of one target, one per rate.
struct Latency {
    kind: Kind,
    runs: Vec<OpenLoop>,
}

struct Row {
    kind: Kind,
    max: MaxRun,
    rss_idle: u64,
    /// With 512 keep-alive connections open, each having sent one request, now idle.
    rss_512_idle: Option<u64>,
    /// Peak under `wrk -c512` (every connection busy), that run, and its new handshakes.
    rss_512: Option<(u64, Wrk, u64)>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(floor::ARG) {
        floor::run(&args[1..]);
    }
    let settings = Settings::from_env();
    procs::pin_self(settings.harness_cpu);
    preflight();
    let mut bench = Bench::start(settings);
    let started = Instant::now();
    bench.machine();
    let targets = bench.settings.targets.clone();
    if bench.settings.runs("start") {
        bench.binary_and_start();
    }
    let mut base = None;
    if bench.settings.runs("max") {
        let rows: Vec<Row> = targets.iter().filter_map(|&k| bench.maximum(k)).collect();
        bench.throughput_table(&rows);
        bench.memory_table(&rows);
        base = rows
            .iter()
            .find(|r| r.kind == Kind::Proxy { access_log: false })
            .map(|r| r.max.wrk.rps);
    }
    if bench.settings.runs("rounds") {
        bench.rounds();
    }
    if bench.settings.runs("hops") {
        bench.hops();
    }
    if bench.settings.runs("latency") {
        let rates = match (&bench.settings.rates, base) {
            (Some(rates), _) => rates.clone(),
            (None, Some(base)) => [0.05, 0.25, 0.5]
                .map(|f| ((base * f / 100.0).round() as u64).max(1) * 100)
                .to_vec(),
            (None, None) => panic!("latency rates: measure `proxy`'s maximum or set BENCH_RATES"),
        };
        let latency: Vec<Latency> = targets
            .iter()
            .filter_map(|&k| bench.latency(k, &rates))
            .collect();
        bench.latency_table(&rates, &latency);
    }
    if bench.settings.runs("upload") {
        bench.upload();
    }
    if bench.settings.runs("sparse") {
        bench.sparse();
    }
    if bench.settings.runs("idle") {
        bench.idle();
    }
    if bench.settings.runs("pacing") {
        bench.pacing();
    }
    let _ = writeln!(
        bench.report,
        "\nWhole run: {:.0} s; load average at the end {}.",
        started.elapsed().as_secs_f64(),
        procs::loadavg()
    );
    let path = bench.run.join("results.md");
    procs::write(&path, &bench.report);
    println!("\n{}\n(written to {})", bench.report, path.display());
}

fn preflight() {
    let missing: Vec<&str> = ["nginx", "wrk", "taskset", "openssl"]
        .into_iter()
        .filter(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    let njs = Path::new("/usr/lib/nginx/modules/ngx_http_js_module.so").exists();
    if !missing.is_empty() || !njs {
        eprintln!(
            "e2e bench: missing {missing:?}{}; install with\n  apt-get update && apt-get install -y nginx libnginx-mod-http-js wrk",
            if njs { "" } else { " and the njs module" }
        );
        std::process::exit(2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    println!("cores online: {} (this driver sees {cores})", online.trim());
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().to_owned()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

fn fill(template: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (key, value) in pairs {
        out = out.replace(key, value);
    }
    // Comments may name placeholders; directives must not keep any.
    let unfilled = out
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split('@').skip(1).step_by(2))
        .find(|key| !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
    assert!(
        unfilled.is_none(),
        "unfilled placeholder @{}@",
        unfilled.unwrap_or_default()
    );
    out
}

fn openssl(run: &Path, args: &str) {
    let status = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

/// The runtime of an in-process mock upstream: one worker, on the harness's core.
fn mock_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(fraction: f64) -> String {
    format!("{:.0} %", fraction * 100.0)
}

impl Bench {
    fn start(settings: Settings) -> Bench {
        let run = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).expect("run directory");
        // A throwaway CA and a certificate for localhost and 127.0.0.1, as nginx wants them.
        openssl(
            &run,
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
             -out ca.pem -days 2 -subj /CN=bench-CA -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign",
        );
        openssl(
            &run,
            "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key \
             -out server.csr -subj /CN=localhost",
        );
        procs::write(
            &run.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        openssl(
            &run,
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
             -days 2 -extfile server.ext",
        );
        procs::write(&run.join("secret"), SECRET);

        let [tls, tls_h2, tls_short, status] = [(); 4].map(|()| procs::free_port());
        let run_str = run.to_str().expect("UTF-8 path");
        let conf = fill(
            include_str!("upstream.conf.template"),
            &[
                ("@RUN@", run_str),
                ("@TLS@", &tls.to_string()),
                ("@TLS_H2@", &tls_h2.to_string()),
                ("@TLS_SHORT@", &tls_short.to_string()),
                ("@STATUS@", &status.to_string()),
            ],
        );
        procs::write(&run.join("upstream.conf"), conf);
        let mut nginx = procs::pinned(settings.harness_cpu, "nginx");
        nginx.args([
            "-e",
            "stderr",
            "-c",
            &format!("{run_str}/upstream.conf"),
            "-p",
            run_str,
        ]);
        let mut upstream = Proc::spawn("upstream nginx", nginx);
        let upstream_addr = SocketAddr::from(([127, 0, 0, 1], tls));
        let upstream_h2_addr = SocketAddr::from(([127, 0, 0, 1], tls_h2));
        let upstream_short_addr = SocketAddr::from(([127, 0, 0, 1], tls_short));
        let status_addr = SocketAddr::from(([127, 0, 0, 1], status));
        procs::wait_listening(upstream_addr, &mut upstream);
        procs::wait_listening(upstream_h2_addr, &mut upstream);
        procs::wait_listening(upstream_short_addr, &mut upstream);
        procs::wait_listening(status_addr, &mut upstream);

        let mut token = Command::new(PROXY_BIN);
        token.arg("token");
        proxy_env(
            &mut token,
            &run,
            SocketAddr::from(([127, 0, 0, 1], tls)),
            0,
            0,
        );
        let token = token.output().expect("idmatch-proxy token");
        assert!(token.status.success(), "idmatch-proxy token: {token:?}");
        let bearer = format!(
            "Bearer {}",
            String::from_utf8(token.stdout).expect("UTF-8").trim()
        );

        let ca = run.join("ca.pem");
        Bench {
            settings,
            run,
            ca,
            upstream_addr,
            upstream_h2_addr,
            upstream_short_addr,
            status_addr,
            upstream,
            upstream_offers_h2: false,
            bearer,
            report: String::new(),
        }
    }

    fn machine(&mut self) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let s = &self.settings;
        let _ = write!(
            self.report,
            "## End to end (`cargo bench --bench e2e`)\n\n\
             - Date: {}; machine: {} × {cpu}, kernel {}; {}; {}; {}.\n\
             - Pinning: harness (driver, wrk, open-loop generator, upstream nginx stub) on core {}; \
             the system under test alone on core {} (idmatch-proxy with IDMATCH_WORKER_THREADS=1, \
             nginx with 1 worker).\n\
             - Load average at start: {}.\n",
            command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            command_output("uname", &["-r"]),
            command_output("nginx", &["-v"]).replace("nginx version: ", ""),
            command_output("wrk", &["-v"]).lines().next().unwrap_or("wrk").split(" [").next().unwrap_or("wrk"),
            command_output("rustc", &["-V"]),
            s.harness_cpu,
            s.sut_cpu,
            procs::loadavg(),
        );
    }

    fn failed(&mut self, kind: Kind, error: &str) {
        println!("  FAILED: {error}");
        let _ = writeln!(
            self.report,
            "\n**{} could not be measured: {error}.**",
            kind.name()
        );
    }

    /// Binary size and start to ready.
    fn binary_and_start(&mut self) {
        let size = std::fs::metadata(PROXY_BIN).expect("binary").len();
        let stripped = self.run.join("idmatch-proxy.stripped");
        let strip = Command::new("strip")
            .args(["-o", stripped.to_str().unwrap(), PROXY_BIN])
            .status()
            .is_ok_and(|s| s.success());
        let stripped_size = if strip {
            std::fs::metadata(&stripped).map_or(0, |m| m.len())
        } else {
            size
        };

        let load = procs::loadavg();
        let mut times = Vec::new();
        for _ in 0..self.settings.ready_runs {
            let (admin, listen) = (procs::free_port(), procs::free_port());
            let mut command = procs::pinned(self.settings.sut_cpu, PROXY_BIN);
            proxy_env(&mut command, &self.run, self.upstream_addr, listen, admin);
            let exec = Instant::now();
            let mut proxy = Proc::spawn("idmatch-proxy", command);
            let log = proxy.log.clone();
            let ready = loop {
                if let Some(at) = log.ready_at() {
                    break at;
                }
                proxy.check_alive();
                std::thread::sleep(Duration::from_micros(200));
            };
            times.push(ready - exec);
            let mut readyz = Connection::open(&Target {
                addr: SocketAddr::from(([127, 0, 0, 1], admin)),
                tls: None,
                request: Arc::new(Vec::new()),
            })
            .expect("admin listener");
            let (status, _) = readyz
                .exchange(b"GET /readyz HTTP/1.1\r\nHost: admin\r\n\r\n")
                .expect("readyz");
            assert_eq!(status, 200, "ready line seen but /readyz is {status}");
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let _ = write!(
            self.report,
            "\n### Binary and start\n\n\
             | what | value | target |\n|---|---|---|\n\
             | release binary (`strip = true` in the profile) | {} MiB ({} bytes; `strip` again: {} bytes) | ≤ 8 MiB |\n\
             | exec → `idmatch-proxy ready` (listening, token minted), {} runs, `taskset -c {}` included | median {:.1} ms, max {:.1} ms | ≤ 50 ms |\n",
            mib(size),
            size,
            stripped_size,
            times.len(),
            self.settings.sut_cpu,
            ms(times[times.len() / 2]),
            ms(*times.last().unwrap()),
        );
        if let Ok(size) = pgo_binary().and_then(|b| std::fs::metadata(b).map_err(|e| e.to_string()))
        {
            let size = size.len();
            let _ = writeln!(
                self.report,
                "| PGO build (benches/pgo.sh) | {} MiB ({size} bytes) | ≤ 8 MiB |",
                mib(size)
            );
        }
        let _ = writeln!(self.report, "\nLoad average before the start runs: {load}.");
    }

    /// Starts one system under test on the SUT core and waits until it answers.
    /// Fails if the first request through it is not answered 200.
    fn start_sut(&self, kind: Kind) -> Result<Sut, String> {
        let run = self.run.to_str().unwrap();
        let listen = procs::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], listen));
        let upstream_addr = match kind == Kind::ProxyH2 || self.upstream_offers_h2 {
            true => self.upstream_h2_addr,
            false => self.upstream_addr,
        };
        let upstream = upstream_addr.to_string();
        let nginx_pairs = |name: &str| {
            vec![
                ("@RUN@".to_owned(), run.to_owned()),
                ("@DIR@".to_owned(), peers_dir().to_str().unwrap().to_owned()),
                ("@UPSTREAM@".to_owned(), upstream.clone()),
                ("@LISTEN@".to_owned(), addr.to_string()),
                ("@KID@".to_owned(), KEY_ID.to_owned()),
                ("@SECRET@".to_owned(), SECRET.to_owned()),
                ("@SNI@".to_owned(), "localhost".to_owned()),
                ("@CA@".to_owned(), self.ca.to_str().unwrap().to_owned()),
                ("@BEARER@".to_owned(), self.bearer.clone()),
                ("@NAME@".to_owned(), name.to_owned()),
            ]
        };
        let nginx = |template: &str, name: &str| {
            let pairs = nginx_pairs(name);
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let conf = self.run.join(format!("{name}.conf"));
            procs::write(&conf, fill(template, &pairs));
            let mut command = procs::pinned(self.settings.sut_cpu, "nginx");
            command.args(["-e", "stderr", "-c", conf.to_str().unwrap(), "-p", run]);
            Proc::spawn(name, command)
        };
        let (proc, target_addr, path, authorization, tls) = match kind {
            Kind::Direct => (
                None,
                upstream_addr,
                UPSTREAM_PATH,
                Some(self.bearer.as_str()),
                Some(load::tls_config(&self.ca)),
            ),
            Kind::Proxy { .. } | Kind::ProxyH2 | Kind::ProxyPgo => {
                let binary = match kind {
                    Kind::ProxyPgo => pgo_binary()?,
                    _ => PathBuf::from(PROXY_BIN),
                };
                let mut command = procs::pinned(self.settings.sut_cpu, binary.to_str().unwrap());
                proxy_env(
                    &mut command,
                    &self.run,
                    upstream_addr,
                    listen,
                    procs::free_port(),
                );
                if kind != (Kind::Proxy { access_log: true }) {
                    command.env("RUST_LOG", "warn");
                }
                (
                    Some(Proc::spawn("idmatch-proxy", command)),
                    addr,
                    "/sim-swap",
                    None,
                    None,
                )
            }
            Kind::NginxNjs => (
                Some(nginx(
                    include_str!("../peers/nginx-njs/nginx.conf.template"),
                    "peer-njs",
                )),
                addr,
                UPSTREAM_PATH,
                None,
                None,
            ),
            Kind::NginxStatic => (
                Some(nginx(
                    include_str!("../peers/nginx-static.conf.template"),
                    "nginx-static",
                )),
                addr,
                UPSTREAM_PATH,
                None,
                None,
            ),
            Kind::Floor => {
                let bearer = self.run.join("floor.bearer");
                procs::write(&bearer, &self.bearer);
                let exe = std::env::current_exe().expect("current_exe");
                let mut command = procs::pinned(self.settings.sut_cpu, exe.to_str().unwrap());
                command.arg(floor::ARG).args([
                    &addr.to_string(),
                    &upstream,
                    self.ca.to_str().unwrap(),
                    bearer.to_str().unwrap(),
                ]);
                if self.upstream_offers_h2 {
                    command.arg("h2");
                }
                (
                    Some(Proc::spawn("floor", command)),
                    addr,
                    "/sim-swap",
                    None,
                    None,
                )
            }
        };
        let mut proc = proc;
        if let Some(proc) = proc.as_mut() {
            procs::wait_listening(target_addr, proc);
        }
        let host = if tls.is_some() {
            "localhost".to_owned()
        } else {
            target_addr.to_string()
        };
        let target = Target {
            addr: target_addr,
            tls,
            request: Arc::new(load::post(&host, path, BODY, authorization)),
        };
        // One request proves the whole path (token added, upstream reached) before timing it.
        let mut conn = Connection::open(&target).expect("connect");
        let (status, _) = conn.exchange(&target.request).expect("first request");
        if status != 200 {
            let body = conn.last_body();
            let title = body
                .split("<title>")
                .nth(1)
                .and_then(|t| t.split('<').next())
                .unwrap_or(&body);
            return Err(format!("the first request got {status} ({})", title.trim()));
        }
        let protocol = conn
            .last_header("x-stub-protocol")
            .unwrap_or_else(|| "(not said)".into());

        let scheme = if target.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let script = self.run.join(format!(
            "{}.lua",
            if authorization.is_some() {
                "direct"
            } else {
                "proxied"
            }
        ));
        procs::write(&script, load::wrk_script(BODY, authorization));
        Ok(Sut {
            kind,
            proc,
            protocol,
            url: format!("{scheme}://{target_addr}{path}"),
            target,
            script,
        })
    }

    fn measure_max(&self, sut: &Sut, connections: usize, secs: u64) -> MaxRun {
        let load_before = procs::loadavg();
        let (accepts_before, _) = load::nginx_status(self.status_addr);
        let (sut_before, sys_before, stub_before, cores_before) = (
            sut.cpu(),
            sut.cpu_sys(),
            self.upstream.cpu(),
            CoreTimes::now(),
        );
        let wrk = load::wrk(&sut.url, &sut.script, connections, secs);
        let cores_after = CoreTimes::now();
        let (sut_cpu, stub_cpu) = (sut.cpu() - sut_before, self.upstream.cpu() - stub_before);
        let (accepts_after, _) = load::nginx_status(self.status_addr);
        assert_eq!(
            wrk.non_2xx,
            0,
            "{}: non-2xx responses under load",
            sut.kind.name()
        );
        MaxRun {
            // Each status query is one plain connection: the second one is in the count.
            handshakes: accepts_after.saturating_sub(accepts_before + 1),
            wrk,
            sut_cpu,
            sut_sys: sut.cpu_sys() - sys_before,
            stub_cpu,
            busy: cores_before.busy_since(&cores_after),
            load: (load_before, procs::loadavg()),
        }
    }

    /// Closed-loop maximum, CPU and handshakes per request, RSS idle and at 512 connections.
    fn maximum(&mut self, kind: Kind) -> Option<Row> {
        println!("maximum: {}", kind.name());
        let sut = match self.start_sut(kind) {
            Ok(sut) => sut,
            Err(error) => {
                self.failed(kind, &error);
                return None;
            }
        };
        std::thread::sleep(Duration::from_millis(300));
        let rss_idle = sut.rss();
        let s = &self.settings;
        let _ = load::wrk(&sut.url, &sut.script, s.connections, 2);
        let max = self.measure_max(&sut, s.connections, s.max_secs);
        let rss_512_idle = sut.proc.as_ref().map(|p| {
            let open: Vec<Connection> = (0..512)
                .map(|_| {
                    let mut conn = Connection::open(&sut.target).expect("connect");
                    let (status, _) = conn.exchange(&sut.target.request).expect("request");
                    assert_eq!(status, 200);
                    conn
                })
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let rss = p.rss();
            drop(open);
            rss
        });
        let rss_512 = sut.proc.as_ref().map(|p| {
            let peak = RssPeak::start(p.pids());
            let run = self.measure_max(&sut, 512, s.max_secs.min(5));
            (peak.finish(), run.wrk, run.handshakes)
        });
        if let Some(proc) = &sut.proc {
            println!("  {} log lines", proc.log.lines());
        }
        Some(Row {
            kind,
            max,
            rss_idle,
            rss_512_idle,
            rss_512,
        })
    }

    fn throughput_table(&mut self, rows: &[Row]) {
        let rps = |k: Kind| {
            rows.iter()
                .find(|r| r.kind == k)
                .map_or(f64::NAN, |r| r.max.wrk.rps)
        };
        let (direct, peer, fixed) = (
            rps(Kind::Direct),
            rps(Kind::NginxNjs),
            rps(Kind::NginxStatic),
        );
        let cpu10k = |r: &Row| r.max.sut_cpu.as_secs_f64() / r.max.wrk.requests as f64 * 1e4;
        let capacity = |r: &Row| 1e4 / cpu10k(r);
        let find = |k: Kind| rows.iter().find(|r| r.kind == k);
        let ours = find(Kind::Proxy { access_log: false });
        let peer_capacity = find(Kind::NginxNjs).map_or(f64::NAN, capacity);
        let static_capacity = find(Kind::NginxStatic).map_or(f64::NAN, capacity);
        let _ = write!(
            self.report,
            "\n### Maximum throughput (closed loop: `wrk -t1 -c{} -d{}s`, POST {} B JSON, all 200)\n\n\
             | target | req/s | ÷ direct | ÷ peer | ÷ static nginx | SUT CPU (cores) | SUT CPU s / 10k req (kernel share) | CPU-bound capacity (req/s per core) | stub CPU s / 10k | upstream TLS handshakes / 10k req | core 0 / core 1 busy | load avg before → after |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.settings.connections,
            self.settings.max_secs,
            BODY.len()
        );
        for r in rows {
            let m = &r.max;
            let direct_kind = r.kind == Kind::Direct;
            let _ = writeln!(
                self.report,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.3} | {:.1} | {} / {} | {} → {} |",
                r.kind.name(),
                m.wrk.rps,
                m.wrk.rps / direct,
                m.wrk.rps / peer,
                m.wrk.rps / fixed,
                if direct_kind { "—".into() } else { format!("{:.2}", m.sut_cpu.as_secs_f64() / m.wrk.seconds) },
                if direct_kind {
                    "—".into()
                } else {
                    format!(
                        "{:.3} ({:.0} %)",
                        cpu10k(r),
                        m.sut_sys.as_secs_f64() / m.sut_cpu.as_secs_f64().max(1e-9) * 100.0
                    )
                },
                if direct_kind { "—".into() } else { format!("{:.0}", capacity(r)) },
                m.stub_cpu.as_secs_f64() / m.wrk.requests as f64 * 1e4,
                m.handshakes as f64 / m.wrk.requests as f64 * 1e4,
                pct(m.busy.first().copied().unwrap_or(f64::NAN)),
                pct(m.busy.get(1).copied().unwrap_or(f64::NAN)),
                m.load.0,
                m.load.1,
            );
        }
        let _ = writeln!(
            self.report,
            "\nCPU-bound capacity = 10,000 / (SUT CPU s per 10k requests): what one core sustains \
             if it does nothing else; unlike req/s it does not depend on whether the harness core \
             saturated first, and little on other load. Static nginx ÷ peer by capacity: **{:.2}** \
             (the most any proxy at least as costly as nginx's own forwarding can reach).",
            static_capacity / peer_capacity
        );
        for ours in [ours, find(Kind::ProxyPgo), find(Kind::ProxyH2)]
            .into_iter()
            .flatten()
        {
            let c = capacity(ours);
            let _ = writeln!(
                self.report,
                "{} ÷ peer: **{:.2}** by capacity, **{:.2}** by measured req/s; \
                 ÷ static nginx: **{:.2}** by capacity, **{:.2}** by measured req/s.",
                ours.kind.name(),
                c / peer_capacity,
                ours.max.wrk.rps / peer,
                c / static_capacity,
                ours.max.wrk.rps / fixed,
            );
        }
        if let (Some(floor), Some(ours)) = (find(Kind::Floor), ours) {
            let _ = writeln!(
                self.report,
                "The floor (the same stack with nothing of ours on it) ÷ static nginx: **{:.2}** by \
                 capacity; idmatch-proxy (warn) ÷ the floor: **{:.2}**.",
                capacity(floor) / static_capacity,
                capacity(ours) / capacity(floor),
            );
        }
    }

    /// The maximum again, `BENCH_ROUNDS` times, idmatch-proxy, the peer and static nginx in
    /// turn, each freshly started and warmed: on a shared VM the same binary's CPU per request
    /// moves by ±10 % from one run to the next, so the ratios are given per round and as medians.
    /// Loopback round trips within the harness core and across to the SUT's (`hops.rs`).
    fn hops(&mut self) {
        println!("hops");
        const COUNT: usize = 50_000;
        let s = &self.settings;
        let same = hops::percentiles(&hops::round_trips(s.harness_cpu, COUNT));
        let cross = hops::percentiles(&hops::round_trips(s.sut_cpu, COUNT));
        let _ = writeln!(
            self.report,
            "\n### Round trips across cores (64 bytes over loopback TCP, echoed, closed loop, {COUNT} each)\n\n\
             What this machine charges for a wake-up on the other core, with no HTTP or TLS: \
             direct is one exchange within the harness core, a proxy on its own core makes it \
             two round trips across, so it adds about 2 × across − within whatever its code (at \
             the median; tails do not add up that simply).\n\n\
             | echo on | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|\n\
             | the harness core (cpu {}) | {:.0} | {:.0} | {:.0} |\n\
             | the system-under-test core (cpu {}) | {:.0} | {:.0} | {:.0} |\n\
             | **2 × across − within**: the least a proxy adds here | **{:+.0}** | **{:+.0}** | **{:+.0}** |",
            s.harness_cpu,
            same[0],
            same[1],
            same[2],
            s.sut_cpu,
            cross[0],
            cross[1],
            cross[2],
            2.0 * cross[0] - same[0],
            2.0 * cross[1] - same[1],
            2.0 * cross[2] - same[2],
        );
    }

    /// The rounds against each upstream of `BENCH_UPSTREAMS`.
    fn rounds(&mut self) {
        for offers_h2 in self.settings.upstreams.clone() {
            self.upstream_offers_h2 = offers_h2;
            self.rounds_against();
        }
        self.upstream_offers_h2 = false;
    }

    fn rounds_against(&mut self) {
        let kinds: Vec<Kind> = [
            Kind::Proxy { access_log: false },
            Kind::ProxyPgo,
            Kind::NginxNjs,
            Kind::NginxStatic,
            Kind::Floor,
        ]
        .into_iter()
        // Without a PGO build, the rounds go on without it (`maximum` says why).
        .filter(|k| {
            self.settings.targets.contains(k) && (*k != Kind::ProxyPgo || pgo_binary().is_ok())
        })
        .collect();
        if kinds.len() < 2 || self.settings.rounds == 0 {
            return;
        }
        let (connections, secs) = (self.settings.connections, self.settings.max_secs);
        let upstream = match self.upstream_offers_h2 {
            true => "upstream offers h2 and http/1.1",
            false => "upstream offers http/1.1 only",
        };
        let mut rounds: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut protocols = vec![String::new(); kinds.len()];
        for round in 1..=self.settings.rounds {
            println!("rounds ({upstream}): {round} of {}", self.settings.rounds);
            let mut cpu = Vec::new();
            for (&kind, protocol) in kinds.iter().zip(&mut protocols) {
                let sut = match self.start_sut(kind) {
                    Ok(sut) => sut,
                    Err(error) => return self.failed(kind, &error),
                };
                protocol.clone_from(&sut.protocol);
                let _ = load::wrk(&sut.url, &sut.script, connections, 2);
                let run = self.measure_max(&sut, connections, secs);
                let per_10k = |d: Duration| d.as_secs_f64() / run.wrk.requests as f64 * 1e4;
                cpu.push((per_10k(run.sut_cpu), per_10k(run.sut_sys)));
            }
            rounds.push(cpu);
        }
        let _ = write!(
            self.report,
            "\n### Maximum throughput, {} interleaved rounds, {upstream}\n\n\
             Each round starts and warms each target in turn, then `wrk -t1 -c{connections} \
             -d{secs}s`. SUT CPU s per 10k requests (kernel share); the ratios are by CPU-bound \
             capacity, each idmatch-proxy build (warn) ÷ the others. Under each target, the \
             protocol it spoke to the upstream, as the stub saw it.\n\n| round |",
            rounds.len()
        );
        for (kind, protocol) in kinds.iter().zip(&protocols) {
            let _ = write!(self.report, " {} ({protocol}) |", kind.name());
        }
        let is_ours = |k: &Kind| matches!(k, Kind::Proxy { .. } | Kind::ProxyPgo);
        // (ours, other) column pairs, by index into `kinds`.
        let pairs: Vec<(usize, usize)> = (0..kinds.len())
            .filter(|&o| is_ours(&kinds[o]))
            .flat_map(|o| {
                (0..kinds.len())
                    .filter(|&t| !is_ours(&kinds[t]))
                    .map(move |t| (o, t))
            })
            .collect();
        for &(o, t) in &pairs {
            let ours = if kinds[o] == Kind::ProxyPgo {
                "PGO"
            } else {
                "plain"
            };
            let _ = write!(self.report, " {ours} ÷ {} |", kinds[t].name());
        }
        let _ = writeln!(
            self.report,
            "\n|---|{}",
            "---|".repeat(kinds.len() + pairs.len())
        );
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
        for (i, cpu) in rounds.iter().enumerate() {
            let _ = write!(self.report, "| {} |", i + 1);
            for (total, sys) in cpu {
                let _ = write!(self.report, " {total:.3} ({:.0} %) |", sys / total * 100.0);
            }
            for (j, &(o, t)) in pairs.iter().enumerate() {
                let ratio = cpu[t].0 / cpu[o].0;
                ratios[j].push(ratio);
                let _ = write!(self.report, " {ratio:.2} |");
            }
            let _ = writeln!(self.report);
        }
        let _ = write!(self.report, "| median |{}", " |".repeat(kinds.len()));
        for ratios in &mut ratios {
            ratios.sort_by(f64::total_cmp);
            let middle = ratios.len() / 2;
            let median = if ratios.len() % 2 == 1 {
                ratios[middle]
            } else {
                (ratios[middle - 1] + ratios[middle]) / 2.0
            };
            let _ = write!(self.report, " **{median:.2}** |");
        }
        let _ = writeln!(self.report);
    }

    fn memory_table(&mut self, rows: &[Row]) {
        let _ = write!(
            self.report,
            "\n### Memory (RSS; nginx: master + worker)\n\n\
             In order, one process per target: idle after start; after the maximum run, with 512 \
             keep-alive connections open (each sent one request, one after another, then idle); \
             peak while `wrk -c512` keeps all 512 busy ({} s).\n\n\
             | target | idle after start | 512 open, idle | 512 busy (peak) | req/s at 512 busy | upstream TLS handshakes / 10k at 512 busy |\n\
             |---|---|---|---|---|---|\n",
            self.settings.max_secs.min(5)
        );
        for r in rows.iter().filter(|r| r.kind != Kind::Direct) {
            if let (Some(idle), Some((peak, wrk, handshakes))) = (r.rss_512_idle, &r.rss_512) {
                let _ = writeln!(
                    self.report,
                    "| {} | {} MiB | {} MiB | {} MiB | {:.0} | {:.1} |",
                    r.kind.name(),
                    mib(r.rss_idle),
                    mib(idle),
                    mib(*peak),
                    wrk.rps,
                    *handshakes as f64 / wrk.requests.max(1) as f64 * 1e4
                );
            }
        }
    }

    /// Open-loop latency at fixed rates.
    fn latency(&mut self, kind: Kind, rates: &[u64]) -> Option<Latency> {
        println!("latency: {}", kind.name());
        let sut = match self.start_sut(kind) {
            Ok(sut) => sut,
            Err(error) => {
                self.failed(kind, &error);
                return None;
            }
        };
        let s = &self.settings;
        let _ = load::open_loop(
            &sut.target,
            rates[0],
            Duration::from_secs(2),
            s.latency_connections,
        );
        let runs = rates
            .iter()
            .map(|&rate| {
                let (load_before, before) = (procs::loadavg(), CoreTimes::now());
                let cpu = [sut.cpu(), self.upstream.cpu(), procs::own_cpu()];
                let mut run = load::open_loop(
                    &sut.target,
                    rate,
                    Duration::from_secs(s.latency_secs),
                    s.latency_connections,
                );
                run.busy = before.busy_since(&CoreTimes::now());
                let after = [sut.cpu(), self.upstream.cpu(), procs::own_cpu()];
                for i in 0..3 {
                    run.cpu_us[i] =
                        (after[i] - cpu[i]).as_secs_f64() * 1e6 / run.sent.max(1) as f64;
                }
                run.load = (load_before, procs::loadavg());
                run
            })
            .collect();
        Some(Latency { kind, runs })
    }

    fn latency_table(&mut self, rates: &[u64], results: &[Latency]) {
        let _ = write!(
            self.report,
            "\n### Latency at fixed rates (open loop, {} keep-alive connections, {} s per rate)\n\n\
             Rates: {} req/s ({}). Service time: first byte written → last byte read. \
             Δ = the target's percentile minus direct's at the same rate (the latency a proxy \
             adds). due→done: from when the request was due to the last byte, which adds any \
             queueing (corrected for coordinated omission). A run whose requests went out late \
             (the generator or the machine could not keep the rate) is not a clean sample.\n\n\
             | target | rate (achieved) | p50 µs | p99 µs | p99.9 µs | Δp50 | Δp99 | Δp99.9 | due→done p50 / p99 / p99.9 µs | sent > 1 ms late | errors | CPU µs/req: SUT / stub / generator | core 0 / 1 busy | load avg before → after |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.settings.latency_connections,
            self.settings.latency_secs,
            rates.iter().map(u64::to_string).collect::<Vec<_>>().join(" / "),
            if self.settings.rates.is_some() {
                "BENCH_RATES"
            } else {
                "5 %, 25 % and 50 % of idmatch-proxy's (warn) maximum above"
            },
        );
        let direct = results.iter().find(|r| r.kind == Kind::Direct);
        for i in 0..rates.len() {
            for Latency { kind, runs } in results {
                let run = &runs[i];
                let q = |v: &[u64], p| quantile_us(v, p);
                let added = |p| match direct {
                    Some(direct) if *kind != Kind::Direct => {
                        format!("{:+.0}", q(&run.service, p) - q(&direct.runs[i].service, p))
                    }
                    _ => "—".to_owned(),
                };
                let _ = writeln!(
                    self.report,
                    "| {} | {} ({:.0}) | {:.0} | {:.0} | {:.0} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.2} % | {} | {:.1} / {:.1} / {:.1} | {} / {} | {} → {} |",
                    kind.name(),
                    run.rate,
                    run.achieved(),
                    q(&run.service, 0.5),
                    q(&run.service, 0.99),
                    q(&run.service, 0.999),
                    added(0.5),
                    added(0.99),
                    added(0.999),
                    q(&run.response, 0.5),
                    q(&run.response, 0.99),
                    q(&run.response, 0.999),
                    run.late as f64 / run.sent.max(1) as f64 * 100.0,
                    run.errors,
                    run.cpu_us[0],
                    run.cpu_us[1],
                    run.cpu_us[2],
                    pct(run.busy.first().copied().unwrap_or(f64::NAN)),
                    pct(run.busy.get(1).copied().unwrap_or(f64::NAN)),
                    run.load.0,
                    run.load.1,
                );
            }
        }
    }

    /// A streamed upload through idmatch-proxy to the in-process mock, which counts the bytes.
    fn upload(&mut self) {
        println!("upload: {} MiB", self.settings.upload_bytes >> 20);
        let runtime = mock_runtime();
        let pki = TestPki::localhost();
        let mock = runtime.block_on(
            Server::builder()
                .tls(&pki)
                .handler(|request: Request<Incoming>| async move {
                    let mut body = request.into_body();
                    let mut received = 0u64;
                    while let Some(Ok(frame)) = body.frame().await {
                        received += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    json(StatusCode::OK, serde_json::json!({ "received": received }))
                })
                .start(),
        );
        let ca = self.run.join("mock-ca.pem");
        pki.write_ca(&ca).expect("write CA");
        let listen = procs::free_port();
        let mut command = procs::pinned(self.settings.sut_cpu, PROXY_BIN);
        proxy_env(
            &mut command,
            &self.run,
            mock.addr(),
            listen,
            procs::free_port(),
        );
        command
            .env("IDMATCH_UPSTREAM_CA_FILE", &ca)
            .env("RUST_LOG", "warn");
        let mut proxy = Proc::spawn("idmatch-proxy (upload)", command);
        let addr = SocketAddr::from(([127, 0, 0, 1], listen));
        procs::wait_listening(addr, &mut proxy);
        let target = Target {
            addr,
            tls: None,
            request: Arc::new(load::post(&addr.to_string(), "/sim-swap", BODY, None)),
        };
        let mut conn = Connection::open(&target).expect("connect");
        assert_eq!(conn.exchange(&target.request).expect("warm-up").0, 200);
        std::thread::sleep(Duration::from_millis(300));
        let idle = proxy.rss();

        let n = self.settings.upload_bytes;
        let load_before = procs::loadavg();
        let peak = RssPeak::start(proxy.pids());
        let started = Instant::now();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).expect("head");
        let chunk = vec![0u8; 256 * 1024];
        let mut left = n;
        while left > 0 {
            let len = left.min(chunk.len() as u64) as usize;
            conn.write_all(&chunk[..len]).expect("body");
            left -= len as u64;
        }
        let (status, _) = conn.read_response().expect("upload response");
        let elapsed = started.elapsed();
        let peak = peak.finish();
        let body = conn.last_body();
        assert_eq!(status, 200, "upload: {body}");
        assert!(
            body.contains(&format!("\"received\":{n}")),
            "upload: the mock got {body}"
        );
        drop(proxy);
        runtime.block_on(mock.shutdown());

        // The peer, as its template ships: nginx's default client_max_body_size is 1 MiB.
        let peer = self
            .start_sut(Kind::NginxNjs)
            .expect("the peer answers small requests");
        let mut conn = Connection::open(&peer.target).expect("connect");
        conn.write_all(
            format!("POST {UPSTREAM_PATH} HTTP/1.1\r\nHost: peer\r\nContent-Length: {n}\r\n\r\n")
                .as_bytes(),
        )
        .expect("head");
        let (peer_status, _) = conn.read_response().expect("peer answer");

        let _ = write!(
            self.report,
            "\n### Streamed upload ({} MiB, Content-Length, through idmatch-proxy to the in-process mock, which counted every byte)\n\n\
             | RSS idle before | RSS peak during | added | throughput | load avg before → after |\n|---|---|---|---|---|\n\
             | {} MiB | {} MiB | {} MiB | {:.0} MiB/s | {load_before} → {} |\n\n\
             The nginx + njs peer, as its template ships, answers {peer_status} to the same request \
             (nginx's default `client_max_body_size` is 1 MiB).\n",
            n >> 20,
            mib(idle),
            mib(peak),
            mib(peak.saturating_sub(idle)),
            n as f64 / MIB / elapsed.as_secs_f64(),
            procs::loadavg(),
        );
    }
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/nginx-njs")
}

/// The proxy's configuration for the bench: environment only, nothing inherited (no
/// `HTTPS_PROXY` from the caller's shell), JSON logs as in a container.
/// The profile-guided build: `BENCH_PGO_BIN`, or where `benches/pgo.sh` leaves it.
fn pgo_binary() -> Result<PathBuf, String> {
    let binary = std::env::var_os("BENCH_PGO_BIN").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
                "target/pgo/use/{}-unknown-linux-gnu/release/idmatch-proxy",
                std::env::consts::ARCH
            ))
        },
        PathBuf::from,
    );
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "no PGO build at {}: run benches/pgo.sh first (or set BENCH_PGO_BIN)",
            binary.display()
        ))
    }
}

fn proxy_env(command: &mut Command, run: &Path, upstream: SocketAddr, listen: u16, admin: u16) {
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("IDMATCH_LISTEN", format!("127.0.0.1:{listen}"))
        .env("IDMATCH_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env(
            "IDMATCH_UPSTREAM_URL",
            format!("https://{upstream}/mobile-identity/v1"),
        )
        .env("IDMATCH_UPSTREAM_CA_FILE", run.join("ca.pem"))
        .env("IDMATCH_KEY_ID", KEY_ID)
        .env("IDMATCH_SECRET_FILE", run.join("secret"))
        .env("IDMATCH_WORKER_THREADS", "1")
        // Throughput is measured with the rate limiter off: on, it allows one request a second.
        .env("IDMATCH_RATE_LIMIT_INTERVAL", "0s")
        .env("IDMATCH_DRAIN_DELAY", "0s")
        .env("IDMATCH_SHUTDOWN_TIMEOUT", "1s")
        .env("IDMATCH_LOG_FORMAT", "json");
}
