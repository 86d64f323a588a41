//! A minimal HTTP/1.1 + HTTP/2 client over TLS or TCP, and token minting.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header::HOST, request, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idmatch_mock::{
    server::{full, Body},
    MockApi, RunningServer, Server, TestPki,
};
use jsonwebtoken::{encode, get_current_timestamp, Algorithm, EncodingKey, Header};
use rustls::{pki_types::ServerName, ClientConfig};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub const KEY_ID: &str = "test-key-id";
pub const SECRET: &str = "test-secret-ü";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One client connection.
pub struct Client {
    sender: Sender,
    scheme: &'static str,
    authority: String,
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Client {
    /// Connects over TLS to `server` as `server_name`, speaking whatever ALPN negotiated.
    pub async fn tls(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<Self, BoxError> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(server_name.to_owned())?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Self::handshake(TokioIo::new(tls), h2, "https", addr).await
    }

    /// Connects over plain TCP with HTTP/1.1.
    pub async fn plain(addr: SocketAddr) -> Result<Self, BoxError> {
        let tcp = TcpStream::connect(addr).await?;
        Self::handshake(TokioIo::new(tcp), false, "http", addr).await
    }

    async fn handshake<I>(
        io: I,
        h2: bool,
        scheme: &'static str,
        addr: SocketAddr,
    ) -> Result<Self, BoxError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let sender = if h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        Ok(Self {
            sender,
            scheme,
            authority: addr.to_string(),
        })
    }

    pub fn version(&self) -> Version {
        match self.sender {
            Sender::Http1(_) => Version::HTTP_11,
            Sender::Http2(_) => Version::HTTP_2,
        }
    }

    /// A request for `target` (path and query): origin-form plus `Host` over HTTP/1.1,
    /// `:scheme` and `:authority` over HTTP/2.
    pub fn request(&self, method: Method, target: &str) -> request::Builder {
        match self.sender {
            Sender::Http1(_) => Request::builder()
                .method(method)
                .uri(target)
                .header(HOST, &self.authority),
            Sender::Http2(_) => Request::builder()
                .method(method)
                .uri(format!("{}://{}{target}", self.scheme, self.authority))
                .version(Version::HTTP_2),
        }
    }

    pub async fn send(&mut self, request: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// A trusting TLS client for `server`, by IP.
pub async fn client(server: &RunningServer, pki: &TestPki) -> Client {
    Client::tls(
        server.addr(),
        pki.client_config(&[b"h2", b"http/1.1"]),
        "127.0.0.1",
    )
    .await
    .expect("connect to the mock")
}

/// The API mock over TLS with the test credentials.
pub struct Api {
    pub server: RunningServer,
    pki: TestPki,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    /// The body as sent, for key order.
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    /// Asserts an error response and returns its message.
    pub fn error(&self, status: StatusCode, code: &str) -> &str {
        assert_eq!(self.status, status, "{:?}", self.body);
        assert_eq!(self.header("content-type"), "application/json");
        assert_eq!(self.body["error"]["code"], code, "{:?}", self.body);
        self.body["error"]["message"].as_str().unwrap()
    }
}

impl Api {
    pub async fn start() -> Self {
        Self::serve(MockApi::new(KEY_ID, SECRET)).await
    }

    /// Serves `api`, which should accept the test credentials.
    pub async fn serve(api: MockApi) -> Self {
        let pki = TestPki::localhost();
        let server = Server::builder().tls(&pki).handler(api).start().await;
        Self { server, pki }
    }

    /// The path of `url` if it points at this server; panics otherwise.
    pub fn path_of<'a>(&self, url: &'a str) -> &'a str {
        let origin = self.server.url("");
        url.strip_prefix(&origin)
            .unwrap_or_else(|| panic!("{url} is not on {origin}"))
    }

    /// `PUT target` with a valid token.
    pub async fn put(&self, target: &str, body: Value) -> Reply {
        self.call(Method::PUT, target, Some(&valid_token()), Some(body))
            .await
    }

    /// Sends `body` (if any) with `Authorization: Bearer <token>` (if any).
    pub async fn call(
        &self,
        method: Method,
        target: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let authorization = token.map(|token| format!("Bearer {token}"));
        let headers: Vec<_> = authorization
            .iter()
            .map(|value| ("authorization", value.as_str()))
            .collect();
        let body = body.map_or_else(Bytes::new, |body| Bytes::from(body.to_string()));
        self.send(method, target, &headers, body).await
    }

    /// `POST target` with a valid token.
    pub async fn post(&self, target: &str, body: Value) -> Reply {
        self.call(Method::POST, target, Some(&valid_token()), Some(body))
            .await
    }

    /// `GET target` with a valid token.
    pub async fn get(&self, target: &str) -> Reply {
        self.call(Method::GET, target, Some(&valid_token()), None)
            .await
    }

    /// Sends a request with exactly `headers` on a new connection.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut client = client(&self.server, &self.pki).await;
        let mut request = client.request(method, target);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = client
            .send(request.body(full(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_slice(&bytes).expect("a JSON body"),
            text: String::from_utf8(bytes.to_vec()).expect("a UTF-8 body"),
        }
    }
}

pub fn now() -> u64 {
    get_current_timestamp()
}

pub fn jwt_header(kid: &str) -> Header {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    header
}

pub fn sign(header: &Header, claims: &Value, secret: &str) -> String {
    encode(header, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

pub fn valid_token() -> String {
    let now = now();
    sign(
        &jwt_header(KEY_ID),
        &json!({ "iat": now, "nbf": now, "exp": now + 300 }),
        SECRET,
    )
}
