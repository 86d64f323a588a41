//! Processes under test and what Linux tells about them: pinning, CPU time, RSS, core load.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A process we started; stopped (SIGTERM, then SIGKILL) when dropped, panics included.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Its stderr, read by a thread (the proxy's access log goes there).
    pub log: Arc<LogDrain>,
}

impl Proc {
    /// Starts `command` with its stderr drained (see [`LogDrain`]).
    pub fn spawn(name: &str, mut command: Command) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = LogDrain::start(child.stderr.take().expect("piped"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This process and its children (nginx: master and worker).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(children(self.pid()));
        pids
    }

    /// CPU time (user + system) of this process and its children so far.
    pub fn cpu(&self) -> Duration {
        self.pids().into_iter().map(|p| cpu_times(p).0).sum()
    }

    /// The system (kernel) part of [`Proc::cpu`].
    pub fn cpu_sys(&self) -> Duration {
        self.pids().into_iter().map(|p| cpu_times(p).1).sum()
    }

    /// Resident set size of this process and its children, in bytes.
    pub fn rss(&self) -> u64 {
        self.pids().into_iter().map(rss).sum()
    }

    /// Context switches of every thread of this process and its children so far: each time one
    /// went to sleep or was put off the core, i.e. about how often it woke.
    pub fn switches(&self) -> u64 {
        self.pids().into_iter().map(switches).sum()
    }

    /// Fails loudly if the process has exited (a bad config, a port in use).
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = self.log.tail();
            panic!("{} exited early with {status}\n{tail}", self.name);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a child's stderr to its end, as a log collector would, so that logging costs the
/// process what it costs in production (a write to a pipe) and never blocks it. Counts lines
/// and remembers when `ready` was seen.
pub struct LogDrain {
    lines: AtomicU64,
    ready_at: Mutex<Option<Instant>>,
    tail: Mutex<Vec<String>>,
    _thread: Mutex<Option<JoinHandle<()>>>,
}

const READY: &str = "idmatch-proxy ready";

impl LogDrain {
    fn start(stderr: impl Read + Send + 'static) -> Arc<LogDrain> {
        let drain = Arc::new(LogDrain {
            lines: AtomicU64::new(0),
            ready_at: Mutex::new(None),
            tail: Mutex::new(Vec::new()),
            _thread: Mutex::new(None),
        });
        let shared = drain.clone();
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 16, stderr);
            let mut line = String::new();
            let mut ready = false;
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                shared.lines.fetch_add(1, Ordering::Relaxed);
                if !ready && line.contains(READY) {
                    ready = true;
                    *shared.ready_at.lock().unwrap() = Some(Instant::now());
                }
                // Keep the first lines (start-up, errors) for diagnostics, not the access log.
                let mut tail = shared.tail.lock().unwrap();
                if tail.len() < 20 {
                    tail.push(line.trim_end().to_owned());
                }
                drop(tail);
                line.clear();
            }
        });
        *drain._thread.lock().unwrap() = Some(thread);
        drain
    }

    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    pub fn ready_at(&self) -> Option<Instant> {
        *self.ready_at.lock().unwrap()
    }

    pub fn tail(&self) -> String {
        self.tail.lock().unwrap().join("\n")
    }
}

/// `taskset -c <cpu> <program>`: the process and every thread it starts run on that core only.
pub fn pinned(cpu: usize, program: &str) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", &cpu.to_string(), program]);
    command
}

/// Re-runs this program pinned to `cpu` unless it already is; returns only in the pinned run.
pub fn pin_self(cpu: usize) {
    const MARK: &str = "IDMATCH_BENCH_PINNED";
    if std::env::var_os(MARK).is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let status = pinned(cpu, exe.to_str().expect("UTF-8 path"))
        .args(std::env::args_os().skip(1))
        .env(MARK, "1")
        .status()
        .expect("taskset is installed (util-linux)");
    std::process::exit(status.code().unwrap_or(1));
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).is_some_and(|f| f.get(1) == Some(&pid.to_string())))
        .collect()
}

/// Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; field n of
/// proc(5) is at index n - 3.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// CPU time of this process (the driver and its generator threads).
pub fn own_cpu() -> Duration {
    cpu_times(std::process::id()).0
}

/// (utime + stime, stime) of a whole process (all threads, dead ones included).
fn cpu_times(pid: u32) -> (Duration, Duration) {
    let Some(fields) = stat_fields(pid) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let ticks = |i: usize| fields[i].parse::<u64>().unwrap_or(0) * 1_000_000_000 / clock_ticks();
    let (user, system) = (ticks(11), ticks(12));
    (
        Duration::from_nanos(user + system),
        Duration::from_nanos(system),
    )
}

fn switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            field(&status, "voluntary_ctxt_switches:")
                + field(&status, "nonvoluntary_ctxt_switches:")
        })
        .sum()
}

pub fn rss(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's RSS every few milliseconds until stopped; keeps the peak.
pub struct RssPeak {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssPeak {
    pub fn start(pids: Vec<u32>) -> RssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(pids.iter().map(|&p| rss(p)).sum());
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssPeak { stop, thread }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

/// Busy and total jiffies of each core, from /proc/stat.
#[derive(Clone, Debug)]
pub struct CoreTimes(Vec<(u64, u64)>);

impl CoreTimes {
    pub fn now() -> CoreTimes {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        CoreTimes(
            stat.lines()
                .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                .map(|l| {
                    let v: Vec<u64> = l
                        .split_whitespace()
                        .skip(1)
                        .map(|x| x.parse().unwrap_or(0))
                        .collect();
                    let total: u64 = v.iter().take(8).sum();
                    // idle + iowait
                    (total - v[3] - v[4], total)
                })
                .collect(),
        )
    }

    /// Busy fraction of each core between `self` and `later`.
    pub fn busy_since(&self, later: &CoreTimes) -> Vec<f64> {
        self.0
            .iter()
            .zip(&later.0)
            .map(|(a, b)| {
                let total = b.1.saturating_sub(a.1).max(1);
                b.0.saturating_sub(a.0) as f64 / total as f64
            })
            .collect()
    }
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A loopback port nothing listens on now (the OS picks it; nginx binds it a moment later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        proc.check_alive();
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{} did not listen on {addr}", proc.name);
}

pub fn write(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
