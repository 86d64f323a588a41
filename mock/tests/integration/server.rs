//! The generic test server: protocols, recording, counters, TLS failures, streaming, shutdown.

use std::{
    future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use idmatch_mock::{
    server::{full, json, Body},
    Recorded, Server, TestPki,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{client, Client};

const ALPN_BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];
const HTTP1: &[&[u8]] = &[b"http/1.1"];

async fn get(client: &mut Client, target: &str) -> Response<Incoming> {
    let request = client.request(Method::GET, target).body(full("")).unwrap();
    client.send(request).await.unwrap()
}

#[tokio::test]
async fn alpn_selects_the_protocol() {
    let pki = TestPki::localhost();
    let both = Server::builder().tls(&pki).start().await;
    let http1 = Server::builder()
        .tls(&pki)
        .alpn(&[b"http/1.1"])
        .start()
        .await;
    let h2 = Server::builder().tls(&pki).alpn(&[b"h2"]).start().await;

    for (server, client_alpn, expected) in [
        (&both, ALPN_BOTH, Version::HTTP_2),
        (&both, HTTP1, Version::HTTP_11),
        (&http1, ALPN_BOTH, Version::HTTP_11),
        (&h2, ALPN_BOTH, Version::HTTP_2),
    ] {
        let mut client = Client::tls(server.addr(), pki.client_config(client_alpn), "localhost")
            .await
            .unwrap();
        assert_eq!(client.version(), expected);
        let response = get(&mut client, "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), expected);
    }
    assert_eq!(both.requests()[0].version, Version::HTTP_2);
    assert_eq!(both.requests()[1].version, Version::HTTP_11);
    assert_eq!(http1.requests()[0].version, Version::HTTP_11);

    // No common protocol: rustls refuses the handshake (RFC 7301 §3.2), and the server goes on.
    let refused = Client::tls(h2.addr(), pki.client_config(HTTP1), "localhost").await;
    assert!(refused.is_err());
    let mut client = client(&h2, &pki).await;
    assert_eq!(get(&mut client, "/").await.status(), StatusCode::OK);
    assert_eq!(h2.connections_accepted(), 3);
    assert_eq!(h2.tls_handshakes_completed(), 2);
}

#[tokio::test]
async fn records_targets_exactly_over_both_protocols() {
    let pki = TestPki::localhost();
    let server = Server::builder().tls(&pki).start().await;
    let target = "/mobile-identity/v1/x?a=%2F&a=+&b=";
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut client = Client::tls(server.addr(), pki.client_config(&[alpn]), "127.0.0.1")
            .await
            .unwrap();
        get(&mut client, target).await;
    }
    let requests = server.requests();
    assert_eq!(server.request_count(), 2);
    for (request, version) in requests.iter().zip([Version::HTTP_2, Version::HTTP_11]) {
        assert_eq!(request.method, Method::GET);
        assert_eq!(request.version, version);
        assert_eq!(request.target, target);
    }
}

#[tokio::test]
async fn records_raw_http1_requests_before_the_handler_runs() {
    let server = Server::builder()
        .handler(|_request: Request<Incoming>| future::pending())
        .start()
        .await;
    assert!(server.url("/base").starts_with("http://127.0.0.1:"));

    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(
        b"GET /p/%2e%2E/q?x=%2F&x=+&y= HTTP/1.1\r\n\
          Host: example.test\r\n\
          X-Dup: one\r\n\
          Authorization: Bearer a\r\n\
          x-dup: two\r\n\
          X-Binary: caf\xe9\r\n\
          \r\n",
    )
    .await
    .unwrap();
    // The handler never answers, yet the request is recorded.
    while server.request_count() == 0 {
        tokio::task::yield_now().await;
    }

    let header = |name: &str, value: &[u8]| (name.to_owned(), value.to_vec());
    assert_eq!(
        server.requests(),
        [Recorded {
            method: Method::GET,
            version: Version::HTTP_11,
            target: "/p/%2e%2E/q?x=%2F&x=+&y=".to_owned(),
            authority: None,
            headers: vec![
                header("host", b"example.test"),
                header("x-dup", b"one"),
                header("x-dup", b"two"),
                header("authorization", b"Bearer a"),
                header("x-binary", b"caf\xe9"),
            ],
        }]
    );
    let recorded = &server.requests()[0];
    assert_eq!(recorded.header("X-Dup"), Some(&b"one"[..]));
    assert_eq!(recorded.header_values("x-dup"), [&b"one"[..], b"two"]);
    assert_eq!(recorded.header("missing"), None);
    assert_eq!(server.tls_handshakes_completed(), 0);
}

#[tokio::test]
async fn untrusted_and_wrong_host_clients_fail_and_the_server_keeps_serving() {
    let pki = TestPki::localhost();
    let server = Server::builder().tls(&pki).start().await;
    assert_eq!(
        server.url("/mobile-identity/v1"),
        format!(
            "https://127.0.0.1:{}/mobile-identity/v1",
            server.addr().port()
        )
    );

    let stranger = TestPki::localhost();
    let untrusted = Client::tls(
        server.addr(),
        stranger.client_config(ALPN_BOTH),
        "localhost",
    )
    .await;
    assert!(untrusted.is_err());
    assert_eq!(server.connections_accepted(), 1);
    assert_eq!(server.tls_handshakes_completed(), 0);

    // Garbage instead of a ClientHello, then an abrupt close.
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    drop(tcp);

    let wrong_host = TestPki::new(&["other.example"]);
    let elsewhere = Server::builder().tls(&wrong_host).start().await;
    let refused = Client::tls(
        elsewhere.addr(),
        wrong_host.client_config(ALPN_BOTH),
        "localhost",
    )
    .await;
    assert!(refused.is_err());
    let accepted = Client::tls(
        elsewhere.addr(),
        wrong_host.client_config(ALPN_BOTH),
        "other.example",
    )
    .await;
    assert!(accepted.is_ok());

    let mut client = client(&server, &pki).await;
    assert_eq!(get(&mut client, "/").await.status(), StatusCode::OK);
    assert_eq!(server.connections_accepted(), 3);
    assert_eq!(server.tls_handshakes_completed(), 1);
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn streams_request_and_response_bodies() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 256; // 16 MiB each way

    async fn count_upload(request: Request<Incoming>) -> Response<Body> {
        let mut body = request.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, Bytes::len),
                Err(error) => return json(StatusCode::BAD_REQUEST, error.to_string().into()),
            }
        }
        json(StatusCode::OK, serde_json::json!({ "bytes": bytes }))
    }

    let pki = TestPki::localhost();
    let uploads = Server::builder()
        .tls(&pki)
        .handler(count_upload)
        .start()
        .await;
    let downloads = Server::builder()
        .tls(&pki)
        .handler(|_request: Request<Incoming>| async {
            let chunks = stream::repeat(Bytes::from(vec![7u8; CHUNK]))
                .take(CHUNKS)
                .map(|chunk| Ok(Frame::data(chunk)));
            Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        })
        .start()
        .await;

    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut client = Client::tls(uploads.addr(), pki.client_config(&[alpn]), "localhost")
            .await
            .unwrap();
        let chunks = stream::repeat(Bytes::from(vec![1u8; CHUNK]))
            .take(CHUNKS)
            .map(|chunk| Ok(Frame::data(chunk)));
        let request = client
            .request(Method::POST, "/upload")
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap();
        let response = client.send(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({ "bytes": CHUNK * CHUNKS })
        );

        let mut client = Client::tls(downloads.addr(), pki.client_config(&[alpn]), "localhost")
            .await
            .unwrap();
        let mut body = get(&mut client, "/download").await.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            bytes += frame.unwrap().data_ref().map_or(0, Bytes::len);
        }
        assert_eq!(bytes, CHUNK * CHUNKS);
    }
}

#[tokio::test]
async fn shutdown_and_drop_abort_connections() {
    let pki = TestPki::localhost();
    let started = Arc::new(AtomicU64::new(0));
    let handler = {
        let started = started.clone();
        move |_request: Request<Incoming>| {
            started.fetch_add(1, Ordering::SeqCst);
            future::pending()
        }
    };
    let server = Server::builder().tls(&pki).handler(handler).start().await;
    let addr = server.addr();

    let mut client = client(&server, &pki).await;
    let request = client.request(Method::GET, "/").body(full("")).unwrap();
    let in_flight = tokio::spawn(async move { client.send(request).await });
    while started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
    assert!(in_flight.await.unwrap().is_err());
    assert!(TcpStream::connect(addr).await.is_err());

    let server = Server::builder().start().await;
    let addr = server.addr();
    let mut idle = Client::plain(addr).await.unwrap();
    assert_eq!(get(&mut idle, "/").await.status(), StatusCode::OK);
    drop(server);
    let request = idle.request(Method::GET, "/").body(full("")).unwrap();
    assert!(idle.send(request).await.is_err());
}

#[tokio::test]
async fn pki_writes_its_ca_and_certifies_ip_addresses() {
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let dir = std::env::temp_dir().join(format!("idmatch-mock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ca.pem");
    pki.write_ca(&path).unwrap();
    let pem = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(pem, pki.ca_pem());
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_ne!(pem, TestPki::new(&["localhost"]).ca_pem());

    let server = Server::builder().tls(&pki).start().await;
    for name in ["127.0.0.1", "localhost"] {
        let connected = Client::tls(server.addr(), pki.client_config(ALPN_BOTH), name).await;
        assert!(connected.is_ok(), "{name}");
    }
    assert!(
        Client::tls(server.addr(), pki.client_config(ALPN_BOTH), "::1")
            .await
            .is_err(),
        "not certified for ::1"
    );
}
