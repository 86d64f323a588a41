//! What the machine charges for crossing cores: a small message echoed over loopback TCP,
//! closed loop, with the echo on the harness core and then on the system-under-test's core.
//!
//! Direct is one exchange on the harness core (generator and stub share it); a proxy with a
//! core of its own puts two cross-core round trips in its place (client → proxy → stub and
//! back). The difference between the two placements, doubled, is a floor under the latency
//! any proxy can add here, whatever its code: no HTTP, no TLS, only `write`, `read` and the
//! wake-up of a thread on the other core.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use rustix::thread::{sched_setaffinity, CpuSet};

use crate::load::quantile_us;

const MESSAGE: usize = 64;
const WARM_UP: usize = 2_000;

/// Round-trip times in nanoseconds, sorted, with the echo pinned to `echo_cpu`.
pub fn round_trips(echo_cpu: usize, count: usize) -> Vec<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let echo = std::thread::spawn(move || {
        pin_thread(echo_cpu);
        let (mut socket, _) = listener.accept().expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut message = [0u8; MESSAGE];
        while socket.read_exact(&mut message).is_ok() {
            socket.write_all(&message).expect("echo");
        }
    });
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let mut message = [7u8; MESSAGE];
    let mut times = Vec::with_capacity(count);
    for i in 0..WARM_UP + count {
        let sent = Instant::now();
        socket.write_all(&message).expect("send");
        socket.read_exact(&mut message).expect("echoed");
        if i >= WARM_UP {
            times.push(sent.elapsed().as_nanos() as u64);
        }
    }
    drop(socket);
    echo.join().expect("echo thread");
    times.sort_unstable();
    times
}

fn pin_thread(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).expect("sched_setaffinity");
}

/// p50, p99 and p99.9 of sorted nanoseconds, in µs.
pub fn percentiles(sorted: &[u64]) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|q| quantile_us(sorted, q))
}
