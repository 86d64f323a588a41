//! `pgo-train PROXY_BINARY WORK_DIR`: the training run of `benches/pgo.sh` ([`idmatch_mock::train`]).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use idmatch_mock::train;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [proxy, work] = args.as_slice() else {
        eprintln!("usage: pgo-train PROXY_BINARY WORK_DIR");
        return ExitCode::from(64);
    };
    match train::run(proxy, work, train::REQUESTS_PER_CONNECTION) {
        Ok(requests) => {
            println!("pgo-train: {requests} requests through {}", proxy.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("pgo-train: {error}");
            ExitCode::FAILURE
        }
    }
}
