//! The command line: parse, load the configuration, bind, wire signals, serve.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use idmatch_proxy::config::{self, Config, Loaded, UnknownVariable};
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
    /// TOML configuration file, else from IDMATCH_CONFIG (every key optional; see
    /// config/idmatch-proxy.toml).
    // IDMATCH_CONFIG is read with the other variables, not by clap: an empty one is then a
    // configuration error like any other, not a usage error.
    #[arg(long, global = true, value_name = "FILE")]
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
    let unknown = config::unknown_variables(&env);
    match cli.command.unwrap_or(Command::Run) {
        Command::Healthcheck { url } => {
            let url = match (url, &loaded) {
                (Some(url), _) => url,
                (None, Ok(loaded)) => {
                    format!("http://{}/readyz", reachable(loaded.config.admin_listen))
                }
                // Guessing the default address could find another process there and report
                // it healthy.
                (None, Err(error)) => {
                    return fail(
                        1,
                        format!("healthcheck: cannot tell the admin address (give --url): {error}"),
                    )
                }
            };
            healthcheck(&url)
        }
        // Serving logs unknown variables once logging is set up; otherwise they go to stderr
        // first, ahead of a refusal too: a misspelt name may be its cause.
        command => match loaded {
            Err(error) => {
                warn(&unknown);
                fail(EXIT_CONFIG, error)
            }
            Ok(loaded) => match command {
                Command::Check => {
                    warn(&unknown);
                    check(&loaded)
                }
                Command::Token => {
                    warn(&unknown);
                    token(&loaded)
                }
                _ => serve(loaded, &unknown),
            },
        },
    }
}

fn check(loaded: &Loaded) -> ExitCode {
    if let Err(error) = idmatch_proxy::upstream::Trust::new(&loaded.config.upstream) {
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

fn serve(loaded: Loaded, unknown: &[UnknownVariable]) -> ExitCode {
    telemetry::init(loaded.config.log.format);
    for variable in unknown {
        tracing::warn!(
            variable = %variable.name,
            did_you_mean = variable.suggestion,
            "unknown IDMATCH_ environment variable; ignored"
        );
    }
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
            callback = listeners.callback.as_ref().map(local),
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
    let callback = match &loaded.config.callback {
        Some(callback) => Some(bind("callback.listen", callback.listen).await?),
        None => None,
    };
    Ok(Listeners {
        proxy: bind("listen", loaded.config.listen).await?,
        admin: bind("admin.listen", loaded.config.admin_listen).await?,
        callback,
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

/// GET `url` (plain HTTP/1.1): exit 0 if it answers 200 within two seconds, else 1 (what
/// Docker's HEALTHCHECK expects) with one line saying what happened.
fn healthcheck(url: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(1, format!("cannot start the runtime: {error}")),
    };
    match runtime.block_on(async { tokio::time::timeout(Duration::from_secs(2), probe(url)).await })
    {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(error)) => fail(1, error),
        Err(_) => fail(1, format!("{url}: no answer within 2s")),
    }
}

/// One readiness request, its failures in words rather than hyper's error chain.
async fn probe(url: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let uri: http::Uri = url.parse().map_err(|e| format!("--url {url:?}: {e}"))?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => authority.clone(),
        _ => return Err(format!("--url {url:?}: expected http://host:port/path")),
    };
    let address = format!("{}:{}", authority.host(), uri.port_u16().unwrap_or(80));
    let stream = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| format!("cannot connect to {url}: {}", plainly(&e)))?;
    let unanswered = |e: hyper::Error| format!("{url} did not answer: {e}");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(unanswered)?;
    tokio::spawn(connection);
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("--url {url:?}: {e}"))?;
    let response = sender.send_request(request).await.map_err(unanswered)?;
    let status = response.status();
    if status == http::StatusCode::OK {
        return Ok(());
    }
    // `/readyz` says why in `reason`; any other answer is named by its status alone.
    let body = Limited::new(response.into_body(), 4096).collect().await;
    let reason = body.ok().and_then(|body| {
        let json: serde_json::Value = serde_json::from_slice(&body.to_bytes()).ok()?;
        json["reason"].as_str().map(str::to_owned)
    });
    Err(match reason {
        Some(reason) => format!("{url} answered {}: {reason}", status.as_u16()),
        None => format!("{url} answered {status}"),
    })
}

/// An I/O error as a phrase: "connection refused", not "Connection refused (os error 111)".
fn plainly(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::ConnectionReset => "connection reset".into(),
        ErrorKind::TimedOut => "timed out".into(),
        ErrorKind::HostUnreachable => "host unreachable".into(),
        ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => error.to_string(),
    }
}

/// For the commands that do not log: one line each on stderr.
fn warn(unknown: &[UnknownVariable]) {
    for variable in unknown {
        eprintln!("idmatch-proxy: warning: {variable}");
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("idmatch-proxy: {error}");
    ExitCode::from(code)
}
