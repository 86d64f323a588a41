//! `mock-upstream demo`: the whole path working on one machine, with no credentials.
//!
//! Starts the mock (TLS, a CA made just now, the development credentials) and two idmatch-proxy
//! instances in this process, one per CM.com service as in production (one sidecar serves one
//! upstream URL), sends one request to each endpoint through them and prints each answer under
//! the `curl` line that sends the same request. Then it keeps serving, so that the printed lines
//! can be tried by hand, until `shutdown` resolves.

use std::{
    fmt, fs, io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use idmatch_proxy::{config::Config, Listeners};
use tokio::{net::TcpListener, sync::watch};

use crate::{MockApi, RunningServer, Server, TestPki};

/// The development credentials the mock accepts by default; `config/dev.toml` names them too.
pub const DEV_KEY_ID: &str = "dev-key-id";
pub const DEV_SECRET: &str = "dev-secret-not-for-production";

/// How long the proxies may take to report ready before the demo gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the demo listens: the README's ports by default, so that its `curl` lines work as they
/// are; a port already taken is replaced by a free one (the printed lines say which).
#[derive(Clone, Debug)]
pub struct Ports {
    pub mobile_identity: SocketAddr,
    pub verification: SocketAddr,
    pub mobile_identity_admin: SocketAddr,
    pub verification_admin: SocketAddr,
}

impl Ports {
    /// Free ports, chosen by the system: for tests.
    pub fn any() -> Self {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            mobile_identity: any,
            verification: any,
            mobile_identity_admin: any,
            verification_admin: any,
        }
    }
}

impl Default for Ports {
    fn default() -> Self {
        let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Self {
            mobile_identity: local(8080),
            verification: local(8081),
            mobile_identity_admin: local(9901),
            verification_admin: local(9902),
        }
    }
}

/// Why the demo could not run.
#[derive(Debug)]
pub enum DemoError {
    Io(&'static str, io::Error),
    Proxy(String),
    Request(String),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(what, error) => write!(f, "{what}: {error}"),
            Self::Proxy(message) | Self::Request(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DemoError {}

/// The mock and the two proxies, serving in this process until [`Demo::stop`].
pub struct Demo {
    /// The Mobile Identity proxy (upstream `/mobile-identity/v1`) and its admin listener.
    pub mobile_identity: RunningProxy,
    /// The Verification service proxy (upstream `/verification-service/v1`).
    pub verification: RunningProxy,
    mock: RunningServer,
    stop: watch::Sender<bool>,
    ca_file: PathBuf,
}

impl Demo {
    /// Starts the mock, then both proxies, and waits until both report ready.
    pub async fn start(ports: Ports) -> Result<Self, DemoError> {
        let pki = TestPki::localhost();
        // The proxies read their extra trust anchor from a file, as in production.
        let ca_file =
            std::env::temp_dir().join(format!("idmatch-demo-ca-{}.pem", std::process::id()));
        pki.write_ca(&ca_file)
            .map_err(|e| DemoError::Io("writing the mock's CA", e))?;
        let mock = Server::builder()
            .tls(&pki)
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .handler(MockApi::new(DEV_KEY_ID, DEV_SECRET))
            .try_start()
            .await
            .map_err(|e| DemoError::Io("starting the mock", e))?;
        let (stop, stopped) = watch::channel(false);
        let upstream = |base_path| format!("https://localhost:{}{base_path}", mock.addr().port());
        let mobile_identity = RunningProxy::start(
            upstream("/mobile-identity/v1"),
            &ca_file,
            ports.mobile_identity,
            ports.mobile_identity_admin,
            stopped.clone(),
        )
        .await?;
        let verification = RunningProxy::start(
            upstream("/verification-service/v1"),
            &ca_file,
            ports.verification,
            ports.verification_admin,
            stopped,
        )
        .await?;
        let demo = Self {
            mobile_identity,
            verification,
            mock,
            stop,
            ca_file,
        };
        demo.mobile_identity.wait_ready().await?;
        demo.verification.wait_ready().await?;
        Ok(demo)
    }

    /// What is where, for the user.
    pub fn describe(&self, out: &mut dyn io::Write) -> io::Result<()> {
        writeln!(out, "demo: the mock of CM.com's API on https://localhost:{} (TLS, a CA made just now; development credentials)", self.mock.addr().port())?;
        for (name, proxy) in [
            ("Mobile Identity", &self.mobile_identity),
            ("Verification service", &self.verification),
        ] {
            writeln!(
                out,
                "demo: {name}: idmatch-proxy on http://{} -> {} (admin http://{})",
                proxy.addr, proxy.upstream, proxy.admin
            )?;
        }
        writeln!(out)
    }

    /// One request to each endpoint, each printed as the `curl` line that sends it, then the
    /// body curl would print.
    pub async fn tour(&self, out: &mut dyn io::Write) -> Result<(), DemoError> {
        let mobile_identity = self.mobile_identity.addr;
        let verification = self.verification.addr;
        call(
            out,
            mobile_identity,
            Method::POST,
            "/sim-swap",
            Some(r#"{"phoneNumber":"+31610000001","serviceType":"timestamp"}"#),
        )
        .await?;
        call(out, mobile_identity, Method::POST, "/identity-match", Some(r#"{"phoneNumber":"+31610000001","serviceType":"match","firstName":"John","lastName":"Verhoeven","address":"123","postalCode":"1234 AB","dateOfBirth":"1963-12-31"}"#)).await?;
        let session = call(
            out,
            mobile_identity,
            Method::POST,
            "/number-verify",
            Some(r#"{"phoneNumber":"+31610000001","callbackUrl":"https://example.com/callback"}"#),
        )
        .await?;
        call(
            out,
            mobile_identity,
            Method::GET,
            &format!("/number-verify/{}", id_of(&session)?),
            None,
        )
        .await?;
        let started = call(
            out,
            verification,
            Method::POST,
            "/verify",
            Some(r#"{"phoneNumber":"+31610000001","callbackUrl":"https://example.com/callback"}"#),
        )
        .await?;
        call(
            out,
            verification,
            Method::PUT,
            &format!("/verify/{}", id_of(&started)?),
            Some(r#"{"verificationCode":"999999"}"#),
        )
        .await?;
        writeln!(
            out,
            "Metrics: curl -s http://{}/metrics\n\
             Logs: on stderr, a line per request from each proxy (access log) and from the mock.",
            self.mobile_identity.admin
        )
        .map_err(|e| DemoError::Io("writing", e))
    }

    /// Stops both proxies (draining nothing: no delay), then the mock.
    pub async fn stop(self) -> Result<(), DemoError> {
        let _ = self.stop.send(true);
        for proxy in [self.mobile_identity, self.verification] {
            proxy
                .task
                .await
                .map_err(|e| DemoError::Proxy(format!("the proxy stopped: {e}")))?;
        }
        self.mock.shutdown().await;
        let _ = fs::remove_file(&self.ca_file);
        Ok(())
    }
}

/// One idmatch-proxy of the demo.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: String,
    task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    async fn start(
        upstream: String,
        ca_file: &Path,
        listen: SocketAddr,
        admin: SocketAddr,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<Self, DemoError> {
        let listeners = Listeners {
            proxy: bind_or_any(listen).await?,
            admin: bind_or_any(admin).await?,
            callback: None,
        };
        let addr = listeners
            .proxy
            .local_addr()
            .map_err(|e| DemoError::Io("listening", e))?;
        let admin = listeners
            .admin
            .local_addr()
            .map_err(|e| DemoError::Io("listening", e))?;
        let ca_file = ca_file
            .to_str()
            .ok_or_else(|| DemoError::Proxy("the work folder's path is not UTF-8".into()))?;
        let env = [
            ("IDMATCH_UPSTREAM_URL", upstream.as_str()),
            ("IDMATCH_UPSTREAM_CA_FILE", ca_file),
            ("IDMATCH_KEY_ID", DEV_KEY_ID),
            ("IDMATCH_SECRET", DEV_SECRET),
            ("IDMATCH_DRAIN_DELAY", "0s"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
        let loaded = Config::from_parts(None, &env).map_err(|e| DemoError::Proxy(e.to_string()))?;
        let server = idmatch_proxy::Server::new(&loaded.config)
            .map_err(|e| DemoError::Proxy(e.to_string()))?;
        let task = tokio::spawn(server.serve(listeners, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        Ok(Self {
            addr,
            admin,
            upstream,
            task,
        })
    }

    async fn wait_ready(&self) -> Result<(), DemoError> {
        let admin = self.admin;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok((StatusCode::OK, _)) = send(admin, Method::GET, "/readyz", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DemoError::Proxy(format!(
                    "the proxy's admin listener http://{admin}/readyz never answered 200"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn bind_or_any(addr: SocketAddr) -> Result<TcpListener, DemoError> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .await
                .map_err(|e| DemoError::Io("listening", e))
        }
        Err(error) => Err(DemoError::Io("listening", error)),
    }
}

/// Sends one request through the proxy at `proxy` and prints it as the `curl` line that sends
/// the same request, then the answer's body as curl prints it (and the status when not 2xx).
async fn call(
    out: &mut dyn io::Write,
    proxy: SocketAddr,
    method: Method,
    path: &str,
    json: Option<&str>,
) -> Result<Bytes, DemoError> {
    let mut line = String::from("$ curl -s");
    if method != Method::GET && method != Method::POST {
        line.push_str(&format!(" -X {method}"));
    }
    line.push_str(&format!(" http://{proxy}{path}"));
    if let Some(json) = json {
        line.push_str(&format!(" -H 'Content-Type: application/json' -d '{json}'"));
    }
    let (status, body) = send(proxy, method, path, json).await?;
    let mut answer = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        answer.push_str(&format!("    (HTTP {status})"));
    }
    writeln!(out, "{line}\n{answer}\n").map_err(|e| DemoError::Io("writing", e))?;
    Ok(body)
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    json: Option<&str>,
) -> Result<(StatusCode, Bytes), DemoError> {
    let failed =
        |e: &dyn fmt::Display| DemoError::Request(format!("{method} http://{addr}{path}: {e}"));
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| failed(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if json.is_some() {
        request = request.header(http::header::CONTENT_TYPE, "application/json");
    }
    let body = Full::new(Bytes::from(json.unwrap_or_default().to_owned()));
    let request = request.body(body).map_err(|e| failed(&e))?;
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(&e))?
        .to_bytes();
    Ok((status, body))
}

/// The `id` of a JSON answer, for the call that follows it.
fn id_of(body: &[u8]) -> Result<String, DemoError> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("id")?.as_str().map(str::to_owned))
        .ok_or_else(|| {
            DemoError::Request(format!(
                "no \"id\" in the answer {}",
                String::from_utf8_lossy(body)
            ))
        })
}
