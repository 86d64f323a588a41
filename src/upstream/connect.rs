//! Connecting to the upstream: TCP with DNS answers shared by concurrent lookups, the egress
//! proxy's CONNECT tunnel if one is configured, then TLS, all within one deadline.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;

use crate::lock;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

/// Connecting to the upstream (TCP, the egress proxy's tunnel if any, then TLS) took longer than
/// `upstream.connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connecting took longer than {0:?}")]
pub struct ConnectTimeout(pub(super) Duration);

/// The HTTPS connector with one deadline over TCP connect, tunnel and TLS handshake together.
#[derive(Clone, Debug)]
pub struct Connector {
    /// The current one, as [`Trust`](super::Trust) last set it.
    https: Arc<ArcSwap<HttpsConnector<Egress>>>,
    timeout: Duration,
}

impl Connector {
    pub(super) fn new(https: Arc<ArcSwap<HttpsConnector<Egress>>>, timeout: Duration) -> Self {
        Self { https, timeout }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    /// Always ready, as the TCP connector under it is; so `call` may use whichever HTTPS
    /// connector is current by then.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let connecting = HttpsConnector::clone(&self.https.load()).call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(ConnectTimeout(timeout).into()),
            }
        })
    }
}

/// TCP to the upstream: direct, or through a tunnel that the egress proxy opens with `CONNECT`
/// (RFC 9110 §9.3.6). TLS to the upstream then runs inside the tunnel, end to end, with the
/// upstream's name for SNI and verification: the proxy sees the `CONNECT` request and then
/// only ciphertext, never the token. The name we resolve is the proxy's; the upstream's is
/// resolved by the proxy.
///
/// A plain `http://` upstream (allowed for local testing only) is tunnelled the same way, so
/// that the egress path does not depend on the scheme; the proxy can then read the token, as
/// can anyone else on that path.
#[derive(Clone, Debug)]
pub(super) struct Egress {
    tcp: HttpConnector<Resolver>,
    pub(super) proxy: Option<Arc<EgressProxy>>,
}

/// The egress proxy, prepared once: where to connect and what to authenticate with.
#[derive(Debug)]
pub(super) struct EgressProxy {
    /// `http://host:port/` without userinfo: what `tcp` connects to.
    uri: Uri,
    /// The proxy's host and port, for logs and errors; never the userinfo.
    pub(super) authority: Authority,
    /// `Basic` credentials from the proxy URL's userinfo (RFC 7617), marked sensitive.
    pub(super) authorization: Option<HeaderValue>,
}

impl Egress {
    pub(super) fn new(tcp: HttpConnector<Resolver>, proxy: Option<&Uri>) -> Self {
        let proxy = proxy.and_then(Uri::authority).map(|authority| {
            let (userinfo, host_port) = match authority.as_str().rsplit_once('@') {
                Some((userinfo, host_port)) => (Some(userinfo), host_port),
                None => (None, authority.as_str()),
            };
            let authority: Authority = host_port
                .parse()
                .expect("the host and port of a valid authority");
            let uri = Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .expect("scheme, authority and path make a valid URI");
            Arc::new(EgressProxy {
                uri,
                authority,
                authorization: userinfo.map(basic_authorization),
            })
        });
        Self { tcp, proxy }
    }
}

type Tunnelling = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl tower::Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Tunnelling;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Tunnelling {
        let Some(proxy) = self.proxy.clone() else {
            let connecting = self.tcp.call(dst);
            return Box::pin(async move { Ok(connecting.await?) });
        };
        let connecting = self.tcp.call(proxy.uri.clone());
        Box::pin(async move {
            let mut io = connecting
                .await
                .map_err(|source| proxy.unreachable(source.into()))?;
            proxy.open(io.inner_mut(), &connect_target(&dst)).await?;
            Ok(io)
        })
    }
}

/// The egress proxy failed us, so the upstream was never reached (and no request was sent).
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot connect to the egress proxy {proxy}")]
    Unreachable {
        proxy: Authority,
        #[source]
        source: BoxError,
    },
    #[error("the egress proxy {proxy} refused the tunnel to {target}: {status}")]
    Refused {
        proxy: Authority,
        target: String,
        status: StatusCode,
    },
    #[error("the egress proxy {proxy} wants credentials (407), and its URL has no user:password")]
    AuthenticationRequired { proxy: Authority },
    #[error("the egress proxy {proxy} rejected the user:password in its URL (407)")]
    AuthenticationRejected { proxy: Authority },
    #[error("the egress proxy {proxy} answered CONNECT with {problem}")]
    Malformed {
        proxy: Authority,
        problem: &'static str,
    },
}

/// A proxy's answer to `CONNECT` is a status line and a few headers; beyond this it is not one.
const MAX_ANSWER_HEAD: usize = 8 * 1024;

impl EgressProxy {
    /// Asks the proxy for a tunnel to `target` and reads its answer, which ends with its head:
    /// after a 2xx the connection is the tunnel (RFC 9110 §9.3.6).
    async fn open(&self, stream: &mut TcpStream, target: &str) -> Result<(), EgressError> {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        if let Some(authorization) = &self.authorization {
            request.extend_from_slice(b"Proxy-Authorization: ");
            request.extend_from_slice(authorization.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        stream
            .write_all(&request)
            .await
            .map_err(|e| self.unreachable(e.into()))?;

        let mut answer = vec![0; MAX_ANSWER_HEAD];
        let mut len = 0;
        let head_end = loop {
            let read = stream
                .read(&mut answer[len..])
                .await
                .map_err(|e| self.unreachable(e.into()))?;
            if read == 0 {
                return Err(self.malformed("nothing: it closed the connection"));
            }
            len += read;
            if let Some(end) = answer[..len].windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if len == answer.len() {
                return Err(self.malformed("a response head over 8 KiB"));
            }
        };
        let status = status_code(&answer[..head_end])
            .ok_or_else(|| self.malformed("something other than an HTTP/1 response"))?;
        let proxy = self.authority.clone();
        match status {
            // The upstream speaks only after our TLS ClientHello (or HTTP request), so bytes
            // already here came from the proxy, not through the tunnel.
            _ if status.is_success() && len > head_end => {
                Err(self.malformed("data ahead of the tunnel"))
            }
            _ if status.is_success() => Ok(()),
            StatusCode::PROXY_AUTHENTICATION_REQUIRED if self.authorization.is_some() => {
                Err(EgressError::AuthenticationRejected { proxy })
            }
            StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
                Err(EgressError::AuthenticationRequired { proxy })
            }
            _ => Err(EgressError::Refused {
                proxy,
                target: target.to_owned(),
                status,
            }),
        }
    }

    fn unreachable(&self, source: BoxError) -> EgressError {
        EgressError::Unreachable {
            proxy: self.authority.clone(),
            source,
        }
    }

    fn malformed(&self, problem: &'static str) -> EgressError {
        EgressError::Malformed {
            proxy: self.authority.clone(),
            problem,
        }
    }
}

/// The authority-form target of `CONNECT`: host and port, the port always present (RFC 9110
/// §9.3.6), an IPv6 address in brackets.
fn connect_target(dst: &Uri) -> String {
    let host = dst.host().unwrap_or_default();
    let default_port = if dst.scheme() == Some(&Scheme::HTTP) {
        80
    } else {
        443
    };
    format!("{host}:{}", dst.port_u16().unwrap_or(default_port))
}

/// The status code of the HTTP/1.0 or HTTP/1.1 status line that starts `head`.
fn status_code(head: &[u8]) -> Option<StatusCode> {
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    match rest.get(3) {
        Some(b' ' | b'\r') => StatusCode::from_bytes(&rest[..3]).ok(),
        _ => None,
    }
}

/// `Basic base64(user:password)` from a URL's userinfo, each part percent-decoded first (RFC
/// 3986 §3.2.1): `p%40ss` is the password `p@ss`.
fn basic_authorization(userinfo: &str) -> HeaderValue {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let mut credentials = percent_decode(user);
    credentials.push(b':');
    credentials.extend(percent_decode(password));
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value =
        HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// `%XX` escapes decoded to bytes; anything else, including a malformed escape, kept as is.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match (bytes[at], hex(at + 1), hex(at + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                at += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                at += 1;
            }
        }
    }
    out
}

/// The failed lookup of the upstream's (or the egress proxy's) host name; its own type so that
/// errors can be sorted.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{host}: {source}")]
pub struct DnsError {
    pub(super) host: String,
    /// Shared: one failed lookup answers every connection that was waiting for it.
    pub(super) source: Arc<std::io::Error>,
}

type Addresses = Result<Vec<SocketAddr>, DnsError>;

/// The system resolver (getaddrinfo on the blocking pool), with errors of our own type. A name
/// already being looked up is not looked up again: its waiters share the one answer. Otherwise
/// a cold start under load would run one blocking thread and send one DNS query per connection
/// being opened, up to `upstream.max_in_flight` at once. Nothing is cached past the lookup.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    lookups: Coalesced<String, Addresses>,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, DnsError>> + Send>>;

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        let lookups = self.lookups.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses = lookups
                .run(host.clone(), async move {
                    let found = tokio::net::lookup_host((host.as_str(), 0))
                        .await
                        .map(Iterator::collect);
                    found.map_err(|source| DnsError {
                        host,
                        source: Arc::new(source),
                    })
                })
                .await?;
            Ok(addresses.into_iter())
        })
    }
}

/// Work keyed by `K` that callers share while it runs: the first caller's future runs, later
/// callers wait for its output. If the caller running it goes away, a waiting one takes over.
#[derive(Debug)]
struct Coalesced<K, V> {
    running: Arc<Mutex<HashMap<K, Arc<OnceCell<V>>>>>,
}

impl<K, V> Default for Coalesced<K, V> {
    fn default() -> Self {
        Self {
            running: Arc::default(),
        }
    }
}

impl<K, V> Clone for Coalesced<K, V> {
    fn clone(&self) -> Self {
        Self {
            running: self.running.clone(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalesced<K, V> {
    async fn run(&self, key: K, work: impl Future<Output = V>) -> V {
        let cell = { lock(&self.running).entry(key.clone()).or_default().clone() };
        let value = cell.get_or_init(|| work).await.clone();
        // Done: the next caller starts afresh. (A newer cell under the key stays.)
        let mut running = lock(&self.running);
        if running
            .get(&key)
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            running.remove(&key);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use super::*;

    /// Sixteen connections resolving the same name at once: one lookup, one answer for all;
    /// the next resolution after it looks up again.
    #[tokio::test(start_paused = true)]
    async fn concurrent_lookups_of_one_name_share_one() {
        let lookups = Coalesced::<&str, usize>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let lookup = |runs: Arc<AtomicUsize>| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            runs.fetch_add(1, SeqCst) + 1
        };
        let waiting: Vec<_> = (0..16)
            .map(|_| {
                let (lookups, runs) = (lookups.clone(), runs.clone());
                tokio::spawn(async move { lookups.run("api.cm.com", lookup(runs)).await })
            })
            .collect();
        for answer in waiting {
            assert_eq!(answer.await.unwrap(), 1);
        }
        assert_eq!(runs.load(SeqCst), 1);
        assert!(lookups.running.lock().unwrap().is_empty(), "nothing kept");
        assert_eq!(lookups.run("api.cm.com", lookup(runs.clone())).await, 2);
        assert_eq!(lookups.run("other.example", lookup(runs.clone())).await, 3);
    }

    /// The connection whose lookup runs gives up (its connect timeout, its client gone): one
    /// that was waiting runs its own, rather than waiting forever.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_lookup_takes_over_from_one_abandoned() {
        let lookups = Coalesced::<&str, &str>::default();
        let first = tokio::spawn({
            let lookups = lookups.clone();
            async move {
                let stuck = async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "first"
                };
                lookups.run("api.cm.com", stuck).await
            }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let lookups = lookups.clone();
            async move { lookups.run("api.cm.com", async { "second" }).await }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "waiting for the first lookup");
        first.abort();
        assert_eq!(second.await.unwrap(), "second");
    }

    #[test]
    fn connect_target_always_has_a_port() {
        let target = |uri: &str| connect_target(&uri.parse().unwrap());
        assert_eq!(target("https://api.cm.com/v1/x"), "api.cm.com:443");
        assert_eq!(target("http://localhost/x"), "localhost:80");
        assert_eq!(target("https://127.0.0.1:8443/x"), "127.0.0.1:8443");
        assert_eq!(target("https://[::1]:8443/x"), "[::1]:8443");
    }

    #[test]
    fn status_lines() {
        let ok = Some(StatusCode::OK);
        assert_eq!(status_code(b"HTTP/1.1 200 Connection established\r\n"), ok);
        assert_eq!(status_code(b"HTTP/1.0 200\r\n"), ok);
        assert_eq!(
            status_code(b"HTTP/1.1 407 Proxy Authentication Required\r\n"),
            Some(StatusCode::PROXY_AUTHENTICATION_REQUIRED)
        );
        for bad in [
            &b"HTTP/2 200 OK\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 20\r\n",
            b"SSH-2.0-OpenSSH\r\n",
        ] {
            assert_eq!(status_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn userinfo_is_percent_decoded_into_basic_credentials() {
        let decoded = |value: HeaderValue| {
            assert!(value.is_sensitive());
            let encoded = value.to_str().unwrap().strip_prefix("Basic ").unwrap();
            let bytes = base64::engine::general_purpose::STANDARD.decode(encoded);
            String::from_utf8(bytes.unwrap()).unwrap()
        };
        // RFC 7617's example.
        assert_eq!(
            basic_authorization("Aladdin:open%20sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(decoded(basic_authorization("u%40x:p%3Aw%2")), "u@x:p:w%2");
        assert_eq!(decoded(basic_authorization("user")), "user:");
    }

    #[test]
    fn the_proxy_is_dialled_without_its_userinfo() {
        let proxy = "http://user:p%40ss@proxy.internal:3128".parse().unwrap();
        let egress = Egress::new(
            HttpConnector::new_with_resolver(Resolver::default()),
            Some(&proxy),
        );
        let proxy = egress.proxy.unwrap();
        assert_eq!(proxy.uri, "http://proxy.internal:3128/");
        assert_eq!(proxy.authority, "proxy.internal:3128");
        assert!(proxy.authorization.is_some());
    }
}
