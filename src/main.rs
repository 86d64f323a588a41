//! The command line: parse, load the configuration, bind, wire signals, serve.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idmatch_proxy::config::{Config, Loaded};
use idmatch_proxy::token::{claims_at, Clock, Signer, SystemClock};
use idmatch_proxy::{telemetry, Server};

/// Exit status for a bad configuration (EX_CONFIG in sysexits.h).
const EXIT_CONFIG: u8 = 78;

/// A sidecar that forwards plain HTTP to CM.com's Mobile Identity API over HTTPS, adding a
/// cached HS256 `Authorization: Bearer` token.
///
/// Settings come from the TOML file and IDMATCH_* environment variables (which win); the
/// secret only from IDMATCH_SECRET_FILE or IDMATCH_SECRET, never from the command line.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML configuration file (every key optional; see config/idmatch-proxy.toml).
    #[arg(long, env = "IDMATCH_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the configuration and print the effective settings, secret redacted.
    Check,
    /// Print one freshly minted token, e.g. for curl -H "Authorization: Bearer $(idmatch-proxy token)".
    Token,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Variables that are not UTF-8 cannot be ours; skipping them beats panicking in env::vars.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let loaded = match Config::load(cli.config.as_deref(), &env) {
        Ok(loaded) => loaded,
        Err(error) => return fail(EXIT_CONFIG, error),
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&loaded),
        Command::Token => {
            let credentials = &loaded.config.credentials;
            let signer = Signer::new(&credentials.key_id, credentials.secret.expose());
            println!(
                "{}",
                signer.sign(claims_at(&loaded.config.token, SystemClock.now()))
            );
            ExitCode::SUCCESS
        }
        Command::Run => serve(loaded, env.get("IDMATCH_LOG_FORMAT").map(String::as_str)),
    }
}

fn check(loaded: &Loaded) -> ExitCode {
    if let Err(error) = idmatch_proxy::upstream::client(&loaded.config.upstream) {
        return fail(EXIT_CONFIG, error);
    }
    print!("{}", loaded.render());
    println!("configuration OK");
    ExitCode::SUCCESS
}

fn serve(loaded: Loaded, log_format: Option<&str>) -> ExitCode {
    if let Err(error) = telemetry::init(log_format) {
        return fail(EXIT_CONFIG, error);
    }
    let config = loaded.config;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(async {
        let server = match Server::new(&config) {
            Ok(server) => server,
            Err(error) => return fail(EXIT_CONFIG, error),
        };
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                let origin = loaded
                    .effective
                    .iter()
                    .find(|s| s.key == "listen")
                    .map(|s| &s.origin);
                let origin = origin.map(|o| format!(" ({o})")).unwrap_or_default();
                return fail(
                    1,
                    format!(
                        "listen{origin}: cannot listen on {}: {error}",
                        config.listen
                    ),
                );
            }
        };
        let listen = listener.local_addr().unwrap_or(config.listen);
        tracing::info!(
            %listen,
            upstream = %config.upstream.url(),
            version = env!("CARGO_PKG_VERSION"),
            "idmatch-proxy ready"
        );
        server.serve(listener, shutdown_signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("idmatch-proxy: {error}");
    ExitCode::from(code)
}
