//! `mock-upstream`: the mock of CM.com's Mobile Identity API and Verification service, for local
//! development.

#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    fs,
    future::Future,
    io::{self, IsTerminal},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use idmatch_mock::{
    api::{BASE_PATHS, VERIFICATION_BASE_PATHS},
    demo::{Demo, Ports, DEV_KEY_ID, DEV_SECRET},
    MockApi, Server, TestPki,
};
use idmatch_proxy::config::read_credential;
use tracing_subscriber::EnvFilter;

/// sysexits.h EX_USAGE: the command line or environment is wrong.
const EXIT_USAGE: u8 = 64;

/// Serves a mock of CM.com's Mobile Identity API and Verification service over TLS, with a
/// certificate from a CA generated at startup, verifying HS256 bearer tokens.
#[derive(Debug, Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Credentials are read as idmatch-proxy reads them: the key id from \
                  IDMATCH_KEY_ID or IDMATCH_KEY_ID_FILE, the secret from IDMATCH_SECRET or \
                  IDMATCH_SECRET_FILE (one trailing newline ignored), never from a flag value. \
                  With neither a key id nor a secret configured, the development credentials \
                  key id \"dev-key-id\" and secret \"dev-secret-not-for-production\" are \
                  used.\n\nEach request is logged at info (method, path, status); set \
                  RUST_LOG=warn to silence that, or RUST_LOG=idmatch_mock=debug for failed \
                  handshakes too."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// What runs when no subcommand is given.
    #[command(flatten)]
    serve: Serve,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the mock until SIGINT or SIGTERM (the default).
    Serve(Serve),
    /// See the whole path work: the mock and two idmatch-proxy instances in this process (Mobile
    /// Identity on 127.0.0.1:8080, the Verification service on 127.0.0.1:8081), one request to
    /// each endpoint printed as the curl line that sends it, then serving until Ctrl-C.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Listen on free ports chosen by the system instead of 8080, 8081, 9901 and 9902.
    #[arg(long)]
    free_ports: bool,
}

#[derive(Debug, Args)]
struct Serve {
    /// Address of the HTTPS listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,

    /// Also serve plain HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,

    /// Where to write the PEM certificate of the generated CA, for clients to trust.
    #[arg(long, value_name = "PATH", default_value = "target/mock-ca.pem")]
    ca_out: PathBuf,

    /// Key id that tokens must carry as `kid`.
    #[arg(long, env = "IDMATCH_KEY_ID")]
    key_id: Option<String>,

    /// File holding the key id; one trailing newline is ignored.
    #[arg(long, value_name = "PATH", env = "IDMATCH_KEY_ID_FILE")]
    key_id_file: Option<PathBuf>,

    /// File holding the HMAC secret; one trailing newline is ignored.
    #[arg(long, value_name = "PATH", env = "IDMATCH_SECRET_FILE")]
    secret_file: Option<PathBuf>,

    /// Refuse, with 429, a Mobile Identity request arriving sooner than this after the last
    /// one accepted, as CM.com asks clients to stay under one request per second per key id
    /// (e.g. `1s`, `150ms`). Off by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    rate_limit_interval: Option<Duration>,

    /// Accept `http://` callback URLs (CM.com requires https), to send callbacks to a callback
    /// listener on this machine.
    #[arg(long)]
    allow_http_callbacks: bool,

    /// Call callback URLs on other machines too. Without it a callback whose host is not
    /// loopback (localhost, 127.0.0.0/8, ::1) is logged and not sent.
    #[arg(long)]
    allow_remote_callbacks: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        // Colours only for a person watching; log files and test captures get plain text.
        .with_ansi(io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(serve) => run(serve).await,
        Command::Demo(args) => run_demo(args).await,
    }
}

async fn run_demo(args: DemoArgs) -> ExitCode {
    let ports = match args.free_ports {
        true => Ports::any(),
        false => Ports::default(),
    };
    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(error) => return demo_failed(&format!("waiting for Ctrl-C: {error}")),
    };
    let demo = match Demo::start(ports).await {
        Ok(demo) => demo,
        Err(error) => return demo_failed(&error),
    };
    let mut out = io::stdout();
    if let Err(error) = demo.describe(&mut out) {
        return demo_failed(&error);
    }
    if let Err(error) = demo.tour(&mut out).await {
        return demo_failed(&error);
    }
    println!("The curl lines above work as they are. Ctrl-C stops everything.");
    shutdown.await;
    match demo.stop().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => demo_failed(&error),
    }
}

fn demo_failed(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("mock-upstream demo: {error}");
    ExitCode::FAILURE
}

async fn run(args: Serve) -> ExitCode {
    let sources = Sources {
        key_id: args.key_id.map(OsString::from),
        key_id_file: args.key_id_file,
        secret: std::env::var_os("IDMATCH_SECRET"),
        secret_file: args.secret_file,
    };
    let (key_id, secret) = match credentials(sources) {
        Ok(Some(credentials)) => credentials,
        Ok(None) => {
            println!(
                "mock-upstream: using the development credentials: key id \"{DEV_KEY_ID}\", \
                 secret \"{DEV_SECRET}\""
            );
            (DEV_KEY_ID.to_owned(), DEV_SECRET.to_owned())
        }
        Err(error) => return usage(&error),
    };
    let mut api = MockApi::builder(key_id, secret)
        .allow_http_callbacks(args.allow_http_callbacks)
        .allow_remote_callbacks(args.allow_remote_callbacks);
    if let Some(interval) = args.rate_limit_interval {
        api = api.rate_limit(interval);
    }
    let api = api.build();

    let shutdown = match shutdown_signal() {
        Ok(shutdown) => shutdown,
        Err(error) => {
            eprintln!("mock-upstream: listening for shutdown signals: {error}");
            return ExitCode::FAILURE;
        }
    };

    let pki = TestPki::new(&certificate_hosts(args.listen.ip()));
    if let Err(error) = write_ca(&pki, &args.ca_out) {
        eprintln!("mock-upstream: writing {}: {error}", args.ca_out.display());
        return ExitCode::FAILURE;
    }

    let https = Server::builder()
        .tls(&pki)
        .bind(args.listen)
        .handler(api.clone());
    let https = match https.try_start().await {
        Ok(server) => server,
        Err(error) => return bind_failed(args.listen, &error),
    };
    println!(
        "mock-upstream: serving {} ({}); trust the CA in {}",
        base_url("https", https.addr()),
        other_bases(),
        args.ca_out.display()
    );
    let mut servers = vec![https];
    if let Some(addr) = args.http_listen {
        let http = match Server::builder().bind(addr).handler(api).try_start().await {
            Ok(server) => server,
            Err(error) => return bind_failed(addr, &error),
        };
        println!(
            "mock-upstream: serving {} ({})",
            base_url("http", http.addr()),
            other_bases()
        );
        servers.push(http);
    }

    shutdown.await;
    for server in servers {
        server.shutdown().await;
    }
    println!("mock-upstream: stopped");
    ExitCode::SUCCESS
}

/// `<integer>ms` or `<integer>s`, as idmatch-proxy writes durations.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected e.g. 1s or 150ms, not {text:?}"))?;
    let interval = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        _ => return Err(format!("expected e.g. 1s or 150ms, not {text:?}")),
    };
    if interval.is_zero() {
        return Err("must be more than zero; leave the flag out for no limit".into());
    }
    Ok(interval)
}

/// Where each credential may come from; a value and a file for the same one are refused, as
/// idmatch-proxy refuses them.
#[derive(Debug, Default)]
struct Sources {
    key_id: Option<OsString>,
    key_id_file: Option<PathBuf>,
    secret: Option<OsString>,
    secret_file: Option<PathBuf>,
}

/// The key id and secret, `None` for the development credentials, or why neither applies.
fn credentials(sources: Sources) -> Result<Option<(String, String)>, String> {
    let key_id = credential(
        ("IDMATCH_KEY_ID (--key-id)", sources.key_id),
        ("IDMATCH_KEY_ID_FILE (--key-id-file)", sources.key_id_file),
    )?;
    let secret = credential(
        ("IDMATCH_SECRET", sources.secret),
        ("IDMATCH_SECRET_FILE (--secret-file)", sources.secret_file),
    )?;
    match (key_id, secret) {
        (None, None) => Ok(None),
        (Some(_), None) => {
            Err("a key id is set but no secret: set IDMATCH_SECRET or IDMATCH_SECRET_FILE".into())
        }
        (None, Some(_)) => {
            Err("a secret is set but no key id: set IDMATCH_KEY_ID or IDMATCH_KEY_ID_FILE".into())
        }
        (Some(key_id), Some(secret)) => Ok(Some((key_id, secret))),
    }
}

/// One credential from its value or its file, not both; UTF-8 and not empty.
fn credential(
    (value_name, value): (&str, Option<OsString>),
    (file_name, file): (&str, Option<PathBuf>),
) -> Result<Option<String>, String> {
    let text = match (value, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(format!(
                "{value_name} and {file_name}: both are set; set only one of them"
            ))
        }
        (Some(value), None) => value
            .into_string()
            .map_err(|_| format!("{value_name}: not valid UTF-8"))?,
        (None, Some(file)) => read_credential(&file)
            .map(|bytes| String::from_utf8(bytes).expect("read_credential checks UTF-8"))
            .map_err(|error| format!("{file_name}: {error}"))?,
    };
    if text.is_empty() {
        return Err(format!("{value_name}: must not be empty"));
    }
    Ok(Some(text))
}

/// The base paths other than the one announced first.
fn other_bases() -> String {
    let mut bases = vec![BASE_PATHS[1]];
    bases.extend(VERIFICATION_BASE_PATHS);
    format!("and {}", bases.join(", "))
}

/// Every name a local client may use, plus the listen address when it is a specific remote one.
fn certificate_hosts(listen: IpAddr) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !listen.is_loopback() && !listen.is_unspecified() {
        hosts.push(listen.to_string());
    }
    hosts
}

fn write_ca(pki: &TestPki, path: &Path) -> io::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        fs::create_dir_all(parent)?;
    }
    pki.write_ca(path)
}

/// The production base URL, naming loopback and wildcard listeners `localhost` as clients would.
fn base_url(scheme: &str, addr: SocketAddr) -> String {
    let ip = addr.ip();
    let host = match ip {
        _ if ip.is_loopback() || ip.is_unspecified() => "localhost".to_owned(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("{scheme}://{host}:{}{}", addr.port(), BASE_PATHS[0])
}

/// Resolves on SIGINT or SIGTERM. Both are registered before this returns, so that a signal sent
/// as soon as the mock has announced itself stops it cleanly instead of killing it.
fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

fn usage(message: &str) -> ExitCode {
    eprintln!("mock-upstream: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn bind_failed(addr: SocketAddr, error: &io::Error) -> ExitCode {
    eprintln!("mock-upstream: listening on {addr}: {error}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_credentials_only_when_nothing_is_configured() {
        let sources = |key_id: Option<&str>, secret: Option<&str>| Sources {
            key_id: key_id.map(OsString::from),
            secret: secret.map(OsString::from),
            ..Sources::default()
        };
        assert_eq!(credentials(sources(None, None)), Ok(None));
        assert!(credentials(sources(Some("kid"), None)).is_err());
        assert!(credentials(sources(None, Some("secret"))).is_err());
        assert!(credentials(sources(Some(""), Some("secret"))).is_err());
        assert_eq!(
            credentials(sources(Some("kid"), Some("secret"))),
            Ok(Some(("kid".to_owned(), "secret".to_owned())))
        );
    }

    #[test]
    fn credential_files_drop_one_newline_and_exclude_values() {
        let dir = std::env::temp_dir().join(format!("mock-upstream-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (key_id, secret) = (dir.join("key-id"), dir.join("secret"));
        fs::write(&key_id, "kid\n").unwrap();
        fs::write(&secret, "s3cret\n\n").unwrap();
        let files = || Sources {
            key_id_file: Some(key_id.clone()),
            secret_file: Some(secret.clone()),
            ..Sources::default()
        };
        assert_eq!(
            credentials(files()),
            Ok(Some(("kid".to_owned(), "s3cret\n".to_owned())))
        );
        let both = Sources {
            secret: Some("s".into()),
            ..files()
        };
        assert_eq!(
            credentials(both),
            Err(
                "IDMATCH_SECRET and IDMATCH_SECRET_FILE (--secret-file): both are set; set only \
                 one of them"
                    .to_owned()
            )
        );
        let missing = Sources {
            secret_file: Some(dir.join("missing")),
            ..files()
        };
        assert!(credentials(missing)
            .unwrap_err()
            .starts_with("IDMATCH_SECRET_FILE (--secret-file): cannot read"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn intervals_are_milliseconds_or_seconds() {
        assert_eq!(parse_interval("150ms"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        for bad in ["", "1", "1m", "s", "-1s", "0ms", "1.5s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base_url_names_local_listeners_localhost() {
        let url = |addr: &str| base_url("https", addr.parse().unwrap());
        assert_eq!(
            url("127.0.0.1:8443"),
            "https://localhost:8443/mobile-identity/v1"
        );
        assert_eq!(
            url("0.0.0.0:8443"),
            "https://localhost:8443/mobile-identity/v1"
        );
        assert_eq!(
            url("10.1.2.3:8443"),
            "https://10.1.2.3:8443/mobile-identity/v1"
        );
        assert_eq!(
            url("[fd00::1]:8443"),
            "https://[fd00::1]:8443/mobile-identity/v1"
        );
    }
}
