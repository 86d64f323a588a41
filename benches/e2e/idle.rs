//! What one idle sidecar costs: it runs in every pod, mostly waiting. After one request (the
//! token minted, the upstream connection open and kept warm), nothing for `QUIET`: resident
//! memory at the end, how often its threads woke (context switches) and the CPU time used. Static
//! nginx, idle the same way, for scale.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{mib, procs, Bench, Kind};

/// Left alone after the first request, before measuring: its connections settle.
const SETTLE: Duration = Duration::from_secs(2);
const QUIET: Duration = Duration::from_secs(30);

impl Bench {
    /// The `idle` phase (module documentation).
    pub fn idle(&mut self) {
        println!("idle: {} s each", QUIET.as_secs());
        let load_before = procs::loadavg();
        let _ = write!(
            self.report,
            "\n### Idle cost: {} s without a request, after one\n\n\
             Upstream keep-alive 600 s (the stub's main servers). Wake-ups: context switches of \
             all its threads (nginx: master and worker).\n\n\
             | target | RSS MiB | wake-ups per s | CPU ms per min |\n|---|---|---|---|\n",
            QUIET.as_secs()
        );
        for kind in [
            Kind::Proxy { access_log: false },
            Kind::ProxyH2,
            Kind::NginxStatic,
        ] {
            if !self.settings.targets.contains(&kind) {
                continue;
            }
            let sut = match self.start_sut(kind) {
                Ok(sut) => sut,
                Err(error) => {
                    self.failed(kind, &error);
                    continue;
                }
            };
            let proc = sut.proc.as_ref().expect("a process of ours");
            std::thread::sleep(SETTLE);
            let (switches, cpu) = (proc.switches(), proc.cpu());
            std::thread::sleep(QUIET);
            let switches = proc.switches() - switches;
            let cpu = proc.cpu() - cpu;
            let per_minute = 60.0 / QUIET.as_secs_f64();
            let _ = writeln!(
                self.report,
                "| {} | {} | {:.2} | {:.1} |",
                kind.name(),
                mib(proc.rss()),
                switches as f64 / QUIET.as_secs_f64(),
                cpu.as_secs_f64() * 1e3 * per_minute,
            );
        }
        let _ = writeln!(
            self.report,
            "\nLoad average before → after: {load_before} → {}.",
            procs::loadavg()
        );
    }
}
