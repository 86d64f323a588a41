//! `mock-upstream`: the Mobile Identity API mock for local development.

#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser;
use idmatch_mock::{api::BASE_PATHS, MockApi, Server, TestPki};
use tracing_subscriber::EnvFilter;

const DEV_KEY_ID: &str = "dev-key-id";
const DEV_SECRET: &str = "dev-secret-not-for-production";

/// sysexits.h EX_USAGE: the command line or environment is wrong.
const EXIT_USAGE: u8 = 64;

/// Serves a mock of CM.com's Mobile Identity API over TLS, with a certificate from a CA generated
/// at startup, verifying HS256 bearer tokens.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "The secret is read from the environment variable IDMATCH_SECRET or from \
                  --secret-file, never from a flag value. With neither a key id nor a secret \
                  configured, the development credentials key id \"dev-key-id\" and secret \
                  \"dev-secret-not-for-production\" are used.\n\nSet \
                  RUST_LOG=idmatch_mock=debug to see refused requests and failed handshakes."
)]
struct Args {
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

    /// File holding the HMAC secret; one trailing newline is ignored.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .init();
    let args = Args::parse();

    let secret = match &args.secret_file {
        Some(path) => match read_secret_file(path) {
            Ok(secret) => Some(secret),
            Err(error) => {
                return usage(&format!(
                    "reading --secret-file {}: {error}",
                    path.display()
                ))
            }
        },
        None => std::env::var_os("IDMATCH_SECRET"),
    };
    let (key_id, secret) = match credentials(args.key_id, secret) {
        Ok(Some(credentials)) => credentials,
        Ok(None) => {
            println!(
                "mock-upstream: using the development credentials: key id \"{DEV_KEY_ID}\", \
                 secret \"{DEV_SECRET}\""
            );
            (DEV_KEY_ID.to_owned(), DEV_SECRET.to_owned())
        }
        Err(error) => return usage(error),
    };
    let api = MockApi::new(key_id, secret);

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
        "mock-upstream: serving {} (and {}); trust the CA in {}",
        base_url("https", https.addr()),
        BASE_PATHS[1],
        args.ca_out.display()
    );
    let mut servers = vec![https];
    if let Some(addr) = args.http_listen {
        let http = match Server::builder().bind(addr).handler(api).try_start().await {
            Ok(server) => server,
            Err(error) => return bind_failed(addr, &error),
        };
        println!(
            "mock-upstream: serving {} (and {})",
            base_url("http", http.addr()),
            BASE_PATHS[1]
        );
        servers.push(http);
    }

    if let Err(error) = shutdown_signal().await {
        eprintln!("mock-upstream: waiting for a shutdown signal: {error}");
    }
    for server in servers {
        server.shutdown().await;
    }
    println!("mock-upstream: stopped");
    ExitCode::SUCCESS
}

/// The key id and secret, `None` for the development credentials, or why neither applies.
fn credentials(
    key_id: Option<String>,
    secret: Option<OsString>,
) -> Result<Option<(String, String)>, &'static str> {
    match (key_id, secret) {
        (None, None) => Ok(None),
        (Some(_), None) => {
            Err("a key id is set but no secret: set IDMATCH_SECRET or --secret-file")
        }
        (None, Some(_)) => Err("a secret is set but no key id: set IDMATCH_KEY_ID or --key-id"),
        (Some(key_id), Some(secret)) => {
            let secret = secret
                .into_string()
                .map_err(|_| "the secret is not valid UTF-8")?;
            if key_id.is_empty() || secret.is_empty() {
                return Err("the key id and the secret must not be empty");
            }
            Ok(Some((key_id, secret)))
        }
    }
}

fn read_secret_file(path: &Path) -> io::Result<OsString> {
    let secret = fs::read_to_string(path)?;
    let secret = secret.strip_suffix('\n').unwrap_or(&secret);
    Ok(secret.strip_suffix('\r').unwrap_or(secret).into())
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

async fn shutdown_signal() -> io::Result<()> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let terminate = terminate.recv();
    #[cfg(not(unix))]
    let terminate = std::future::pending::<Option<()>>();
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate => Ok(()),
    }
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
        assert_eq!(credentials(None, None), Ok(None));
        assert!(credentials(Some("kid".into()), None).is_err());
        assert!(credentials(None, Some("secret".into())).is_err());
        assert!(credentials(Some(String::new()), Some("secret".into())).is_err());
        assert_eq!(
            credentials(Some("kid".into()), Some("secret".into())),
            Ok(Some(("kid".to_owned(), "secret".to_owned())))
        );
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
