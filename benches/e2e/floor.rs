//! The floor: the least a forwarder built on idmatch-proxy's fixed stack (tokio with one worker,
//! hyper's HTTP/1.1 server and client connections, rustls with ring) can do per request. Each
//! client connection gets its own upstream TLS connection; each request gets the upstream path,
//! `Host` and a fixed `Authorization`, and nothing else: no pool, no token, no limits, no
//! metrics, no log. What idmatch-proxy costs above this is its own; what this costs above static
//! nginx is the stack's. With `h2` it offers h2 and http/1.1 by ALPN, as idmatch-proxy does,
//! and if the upstream picks h2, one HTTP/2 connection carries every request: the floor of
//! hyper's HTTP/2 client.
//!
//! The bench driver runs it as `e2e floor LISTEN UPSTREAM CA BEARER_FILE [h2]` (the file holds
//! the whole `Authorization` value), pinned like any other system under test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::header::{AUTHORIZATION, HOST};
use http::{HeaderValue, Request, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// The first argument that makes this binary the floor forwarder rather than the bench driver.
pub const ARG: &str = "floor";

struct Upstream {
    addr: SocketAddr,
    tls: TlsConnector,
    host: HeaderValue,
    authorization: HeaderValue,
}

/// Serves until killed; `args` follow [`ARG`]. SIGTERM ends it through `exit`, so that a build
/// instrumented for PGO writes its profile (benches/README.md, "Profiling recipes").
pub fn run(args: &[String]) -> ! {
    let (listen, upstream, ca, bearer_file, h2) = match args {
        [listen, upstream, ca, bearer] => (listen, upstream, ca, bearer, false),
        [listen, upstream, ca, bearer, h2] if h2 == "h2" => (listen, upstream, ca, bearer, true),
        _ => panic!("usage: e2e {ARG} LISTEN UPSTREAM CA BEARER_FILE [h2]"),
    };
    let bearer = std::fs::read_to_string(bearer_file).expect("bearer file");
    let mut tls = (*super::load::tls_config(Path::new(ca))).clone();
    tls.alpn_protocols = match h2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    let upstream = Arc::new(Upstream {
        addr: upstream.parse().expect("UPSTREAM: host:port"),
        tls: TlsConnector::from(Arc::new(tls)),
        host: HeaderValue::from_static("localhost"),
        authorization: HeaderValue::try_from(bearer.trim()).expect("BEARER_FILE: a header value"),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = TcpListener::bind(listen.as_str()).await.expect("LISTEN");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::spawn(async move {
            terminate.recv().await;
            std::process::exit(0);
        });
        let shared = match h2 {
            true => upstream.connect_h2().await,
            false => None,
        };
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let upstream = upstream.clone();
            match &shared {
                Some(sender) => {
                    tokio::spawn(serve_h2(client, sender.clone(), upstream));
                }
                None => {
                    tokio::spawn(async move {
                        if let Ok(sender) = upstream.connect().await {
                            serve(client, sender, upstream).await;
                        }
                    });
                }
            }
        }
    });
    unreachable!("the accept loop does not end")
}

impl Upstream {
    async fn tls(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("server name");
        self.tls.connect(name, tcp).await
    }

    /// The one HTTP/2 connection, if the upstream picks h2.
    async fn connect_h2(&self) -> Option<http2::SendRequest<Incoming>> {
        let tls = self.tls().await.expect("connect to the upstream");
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return None;
        }
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        Some(sender)
    }

    async fn connect(&self) -> std::io::Result<SendRequest<Incoming>> {
        let tls = self.tls().await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

async fn serve(client: TcpStream, sender: SendRequest<Incoming>, upstream: Arc<Upstream>) {
    // hyper's server hands over one request at a time per connection, so the lock never waits;
    // it only lets the `Fn` service reach the connection's one sender.
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (sender, upstream) = (sender.clone(), upstream.clone());
        async move {
            let path = format!("/mobile-identity/v1{}", request.uri().path());
            *request.uri_mut() = Uri::try_from(path).expect("path");
            let headers = request.headers_mut();
            headers.insert(HOST, upstream.host.clone());
            headers.insert(AUTHORIZATION, upstream.authorization.clone());
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
}

/// Every request of `client` onto the shared HTTP/2 connection: absolute URI (`:authority`),
/// no `Host`.
async fn serve_h2(
    client: TcpStream,
    sender: http2::SendRequest<Incoming>,
    upstream: Arc<Upstream>,
) {
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (mut sender, upstream) = (sender.clone(), upstream.clone());
        async move {
            let uri = format!(
                "https://localhost/mobile-identity/v1{}",
                request.uri().path()
            );
            *request.uri_mut() = Uri::try_from(uri).expect("URI");
            let headers = request.headers_mut();
            headers.remove(HOST);
            headers.insert(AUTHORIZATION, upstream.authorization.clone());
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await;
}
