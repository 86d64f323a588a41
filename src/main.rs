//! The command line: parse, load the configuration, bind, wire signals, serve.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use idmatch_proxy::config::{Config, Loaded};
use idmatch_proxy::token::{claims_at, Clock, Signer, SystemClock};
use idmatch_proxy::{telemetry, Listeners, Server};

/// Exit status for a bad configuration (EX_CONFIG in sysexits.h).
const EXIT_CONFIG: u8 = 78;
/// Exit status when a second stop signal cuts the drain short (128 + SIGINT, by convention).
const EXIT_FORCED: i32 = 130;

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
    /// Exit 0 if the running proxy is ready, 1 if not: a container health check that needs no
    /// shell or curl in the image.
    Healthcheck {
        /// Readiness URL; by default /readyz on the configured admin listener.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Variables that are not UTF-8 cannot be ours; skipping them beats panicking in env::vars.
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let loaded = Config::load(cli.config.as_deref(), &env);
    match cli.command.unwrap_or(Command::Run) {
        // A health check must answer even if, say, the secret file is briefly unreadable.
        Command::Healthcheck { url } => {
            let admin = loaded
                .as_ref()
                .map_or_else(|_| default_admin(), |l| l.config.admin_listen);
            healthcheck(url.unwrap_or_else(|| format!("http://{}/readyz", reachable(admin))))
        }
        command => match loaded {
            Err(error) => fail(EXIT_CONFIG, error),
            Ok(loaded) => match command {
                Command::Check => check(&loaded),
                Command::Token => token(&loaded),
                _ => serve(loaded),
            },
        },
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

fn token(loaded: &Loaded) -> ExitCode {
    let credentials = &loaded.config.credentials;
    let signer = Signer::new(&credentials.key_id, credentials.secret.expose());
    println!(
        "{}",
        signer.sign(claims_at(&loaded.config.token, SystemClock.now()))
    );
    ExitCode::SUCCESS
}

fn serve(loaded: Loaded) -> ExitCode {
    telemetry::init(loaded.config.log.format);
    let config = &loaded.config;
    // `available_parallelism` honours the cgroup CPU quota and the affinity mask.
    let workers = config.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    // Multi-thread even with one worker: a current-thread runtime measured no faster, and on a
    // core shared with its clients it held 1 % of requests for milliseconds (benches/README.md).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_park(telemetry::on_park)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(async {
        let server = match Server::new(config) {
            Ok(server) => server,
            Err(error) => return fail(EXIT_CONFIG, error),
        };
        let listeners = match bind(&loaded).await {
            Ok(listeners) => listeners,
            Err(error) => return fail(1, error),
        };
        let local =
            |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            listen = %local(&listeners.proxy),
            admin = %local(&listeners.admin),
            upstream = %config.upstream.url(),
            workers,
            version = env!("CARGO_PKG_VERSION"),
            "idmatch-proxy ready"
        );
        server.serve(listeners, stop_signals()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn bind(loaded: &Loaded) -> Result<Listeners, String> {
    let bind = |key: &'static str, addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| format!("{}: cannot listen on {addr}: {error}", loaded.describe(key)))
    };
    Ok(Listeners {
        proxy: bind("listen", loaded.config.listen).await?,
        admin: bind("admin.listen", loaded.config.admin_listen).await?,
    })
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn stop_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(signal = name, "second stop signal: exiting now");
        telemetry::flush();
        std::process::exit(EXIT_FORCED);
    });
}

fn default_admin() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 9901))
}

/// The address to dial for a listener bound to `addr`: a wildcard becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// GET `url` (plain HTTP), ready if 200 within two seconds.
fn healthcheck(url: String) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, format!("cannot start the runtime: {error}")),
    };
    let probe = async {
        let uri: http::Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let response = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
        match response.status() {
            http::StatusCode::OK => Ok(()),
            status => Err(format!("{url}: {status}")),
        }
    };
    match runtime.block_on(async { tokio::time::timeout(Duration::from_secs(2), probe).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(error)) => fail(1, error),
        Err(_) => fail(1, format!("{url}: no answer within 2s")),
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("idmatch-proxy: {error}");
    ExitCode::from(code)
}
