//! What the upstream receives, and what the client gets back: headers and request targets.

mod support;

use http::{Request, StatusCode};
use idmatch_mock::server::{full, Body};
use idmatch_mock::{Server as Upstream, TestPki};
use support::*;

/// An upstream over HTTP/1.1 only (HTTP/2 forbids hop-by-hop fields outright, so only HTTP/1
/// can send them back) that answers with hop-by-hop fields of its own.
async fn upstream() -> Stack {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(&[b"http/1.1"])
        .handler(|_request: Request<hyper::body::Incoming>| async move {
            http::Response::builder()
                .header("content-type", "application/json")
                .header("connection", "x-upstream-hop")
                .header("x-upstream-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-connection", "keep-alive")
                .header("trailer", "x-checksum")
                .header("upgrade", "h2c")
                .header("x-end-to-end", "a")
                .header("x-end-to-end", "b")
                .body::<Body>(full("{}"))
                .unwrap()
        })
        .start()
        .await;
    Stack::over(pki, upstream).await
}

fn pairs(recorded: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    recorded
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

#[tokio::test]
async fn request_headers_are_cleaned_and_the_rest_passes_in_order() {
    let stack = upstream().await;
    let request = b"POST /sim-swap HTTP/1.1\r\n\
        Host: evil.example\r\n\
        X-First: 1\r\n\
        X-Request-Id: r-1\r\n\
        Authorization: Bearer client-token\r\n\
        Authorization: Basic Zm9vOmJhcg==\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
        Connection: close, X-Hop\r\n\
        X-Hop: dropped\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers\r\n\
        Upgrade: websocket\r\n\
        Trailer: X-Checksum\r\n\
        X-Dup: one\r\n\
        Content-Type: application/json\r\n\
        X-Dup: two\r\n\
        traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
        Content-Length: 2\r\n\
        \r\n{}";
    let response = raw(stack.proxy.addr, request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let recorded = &stack.upstream.requests()[0];
    let mut headers = pairs(&recorded.headers);
    let authorization = headers
        .iter()
        .position(|(n, _)| n == "authorization")
        .unwrap();
    let (_, bearer) = headers.remove(authorization);
    assert!(bearer.starts_with("Bearer ey") && bearer != "Bearer client-token");
    assert_eq!(
        headers,
        // The upstream's `Host` in place of the client's: first, as clients send it.
        [
            ("host", stack.upstream.addr().to_string().as_str()),
            ("x-first", "1"),
            ("x-request-id", "r-1"),
            ("x-dup", "one"),
            ("x-dup", "two"),
            ("content-type", "application/json"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
            ("content-length", "2"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
}

/// HTTP/2 names the authority in `:authority`; a `Host` beside it is refused by some servers
/// (nginx: 400, "duplicate host header"), so none is sent.
#[tokio::test]
async fn an_h2_upstream_gets_authority_and_no_host() {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(&[b"h2"])
        .handler(|_request: Request<hyper::body::Incoming>| async move {
            http::Response::new(full("{}"))
        })
        .start()
        .await;
    let stack = Stack::over(pki, upstream).await;
    for client in [http1(), h2c()] {
        let request = Request::get(stack.proxy.url("/number-verify/1"))
            .header("host", "forged.example")
            .body(Default::default())
            .unwrap();
        assert_eq!(send(&client, request).await.status, StatusCode::OK);
    }
    for recorded in stack.upstream.requests() {
        assert_eq!(recorded.version, http::Version::HTTP_2);
        assert_eq!(recorded.header("host"), None, "{:?}", recorded.headers);
    }
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_removed() {
    let stack = upstream().await;
    let answer = send(&http1(), get(&stack.proxy.url("/number-verify/1"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    for gone in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert!(
            answer.headers.get(gone).is_none(),
            "{gone} leaked: {:?}",
            answer.headers
        );
    }
    let kept: Vec<_> = answer.headers.get_all("x-end-to-end").iter().collect();
    assert_eq!(kept, ["a", "b"]);
    assert_eq!(answer.headers["content-type"], "application/json");
}

#[tokio::test]
async fn path_and_query_reach_the_upstream_byte_for_byte() {
    let stack = upstream().await;
    let targets = [
        "/number-verify/a%2Fb?x=1+2&x=&y=%20&x=3",
        "/sim-swap?",
        "/",
        "/number-verify/%7Eid/../..%2F?q=%E2%9C%93&&=",
        "//double//slashes/",
    ];
    for target in targets {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let response = raw(stack.proxy.addr, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{target}: {response}");
    }
    let seen: Vec<String> = stack
        .upstream
        .requests()
        .into_iter()
        .map(|r| r.target)
        .collect();
    let expected: Vec<String> = targets.iter().map(|t| format!("{BASE}{t}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn h2c_requests_are_rewritten_the_same_way() {
    let stack = upstream().await;
    let request = Request::get(stack.proxy.url("/number-verify/a%2Fb?x=1+2&x="))
        .header("authorization", "Bearer client")
        .header("x-dup", "1")
        .header("x-dup", "2")
        .body(Default::default())
        .unwrap();
    assert_eq!(send(&h2c(), request).await.status, StatusCode::OK);
    let recorded = &stack.upstream.requests()[0];
    assert_eq!(
        recorded.target,
        format!("{BASE}/number-verify/a%2Fb?x=1+2&x=")
    );
    assert_eq!(recorded.header_values("authorization").len(), 1);
    assert_ne!(recorded.header("authorization").unwrap(), b"Bearer client");
    assert_eq!(recorded.header_values("x-dup"), [b"1".as_slice(), b"2"]);
    assert_eq!(
        recorded.header("host").unwrap(),
        stack.upstream.addr().to_string().as_bytes()
    );
}
