//! Requests the proxy refuses, and upstream failures it reports as its own JSON errors.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use idmatch_mock::server::json;
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use serde_json::json;
use support::*;

async fn ok_stack() -> Stack {
    let pki = TestPki::localhost();
    let upstream = ok_upstream(&pki).await;
    Stack::over(pki, upstream).await
}

async fn ok_upstream(pki: &TestPki) -> RunningServer {
    Upstream::builder()
        .tls(pki)
        .handler(|_: Request<hyper::body::Incoming>| async { json(StatusCode::OK, json!({})) })
        .start()
        .await
}

#[tokio::test]
async fn connect_and_trace_are_refused() {
    let stack = ok_stack().await;
    let connect = raw(stack.proxy.addr, b"CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\nConnection: close\r\n\r\n").await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(connect.contains("http_request_denied"));
    let trace = send(
        &http1(),
        Request::trace(stack.proxy.url("/sim-swap"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_proxy_error(
        &trace,
        StatusCode::METHOD_NOT_ALLOWED,
        "http_request_denied",
    );
    assert_eq!(stack.upstream.request_count(), 0);
}

#[tokio::test]
async fn absolute_form_for_another_authority_is_misdirected() {
    let stack = ok_stack().await;
    for target in [
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://example.com/sim-swap".to_owned(),
        format!("http://user@{}/sim-swap", stack.proxy.addr),
        "https://api.cm.com/mobile-identity/v1/sim-swap".to_owned(),
    ] {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            stack.proxy.addr
        );
        let response = raw(stack.proxy.addr, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 421"), "{target}: {response}");
        assert!(
            response.contains("proxy-status: idmatch-proxy; error=http_request_denied"),
            "{response}"
        );
    }
    assert_eq!(stack.upstream.request_count(), 0);

    // Absolute-form naming the proxy itself is an ordinary request.
    let own = format!(
        "GET http://{}/sim-swap?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        stack.proxy.addr
    );
    let response = raw(stack.proxy.addr, own.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        stack.upstream.requests()[0].target,
        format!("{BASE}/sim-swap?a=1")
    );
}

/// A client's `Host` (HTTP/1.1) or `:authority` (h2c) never chooses where the token goes, nor
/// what the upstream is told it is: each upstream protocol sees its own address, as `Host` for
/// HTTP/1.1 and as `:authority` alone for h2.
#[tokio::test]
async fn forged_host_and_authority_change_nothing() {
    for alpn in [b"http/1.1".as_slice(), b"h2"] {
        let pki = TestPki::localhost();
        let upstream = Upstream::builder()
            .tls(&pki)
            .alpn(&[alpn])
            .handler(|_: Request<hyper::body::Incoming>| async { json(StatusCode::OK, json!({})) })
            .start()
            .await;
        let stack = Stack::over(pki, upstream).await;
        let forged = Request::get(stack.proxy.url("/sim-swap"))
            .header("host", "169.254.169.254")
            .body(Default::default())
            .unwrap();
        assert_eq!(send(&http1(), forged).await.status, StatusCode::OK);
        // In HTTP/2 the request's URI becomes `:authority`: a forged one, on a connection to
        // the proxy.
        let (mut sender, _connection) = h2c_connection(stack.proxy.addr).await;
        let forged = Request::get("http://169.254.169.254/sim-swap")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = collect(sender.send_request(forged).await.unwrap()).await;
        assert_eq!(answer.status, StatusCode::OK);

        let ours = stack.upstream.addr().to_string();
        let requests = stack.upstream.requests();
        assert_eq!(requests.len(), 2);
        for request in requests {
            let host = request.header_values("host");
            if alpn == b"h2" {
                assert_eq!(request.authority.as_deref(), Some(ours.as_str()));
                assert!(host.is_empty(), "a Host beside :authority: {host:?}");
            } else {
                assert_eq!(request.authority, None);
                assert_eq!(host, [ours.as_bytes()]);
            }
        }
    }
}

#[tokio::test]
async fn upstream_down_is_a_json_502() {
    let pki = TestPki::localhost();
    let closed = refusing_port();
    let config = ProxyConfig::new(&format!("https://{}{BASE}", closed.addr), &pki);
    let proxy = Proxy::start(&config).await;
    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), json!({}))).await;
    assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "connection_refused");
    // The proxy stays up and answers the next one the same way.
    let again = send(&h2c(), get(&proxy.url("/number-verify/1"))).await;
    assert_proxy_error(&again, StatusCode::BAD_GATEWAY, "connection_refused");
}

/// Runs one request through a proxy that trusts `trusted` to an upstream presenting
/// `presented`, and asserts the TLS failure and that no request reached the upstream.
async fn assert_tls_refused(presented: &TestPki, trusted: &TestPki) {
    let upstream = ok_upstream(presented).await;
    let config = ProxyConfig::new(&upstream.url(BASE), trusted);
    let proxy = Proxy::start(&config).await;
    let answer = send(&http1(), post_json(&proxy.url("/sim-swap"), json!({}))).await;
    assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "tls_certificate_error");
    assert!(upstream.connections_accepted() >= 1);
    assert_eq!(upstream.tls_handshakes_completed(), 0);
    assert_eq!(
        upstream.request_count(),
        0,
        "the token never reached the server"
    );
}

#[tokio::test]
async fn untrusted_certificate_never_sees_the_token() {
    assert_tls_refused(&TestPki::localhost(), &TestPki::localhost()).await;
}

#[tokio::test]
async fn wrong_host_certificate_never_sees_the_token() {
    let other = TestPki::new(&["other.example"]);
    assert_tls_refused(&other, &other).await;
}

#[tokio::test]
async fn slow_upstream_is_a_json_504() {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|_: Request<hyper::body::Incoming>| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            json(StatusCode::OK, json!({}))
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki)
        .set("IDMATCH_UPSTREAM_RESPONSE_TIMEOUT", "300ms");
    let proxy = Proxy::start(&config).await;
    let answer = send(&http1(), get(&proxy.url("/number-verify/1"))).await;
    assert_proxy_error(
        &answer,
        StatusCode::GATEWAY_TIMEOUT,
        "http_response_timeout",
    );
}

#[tokio::test]
async fn plain_http_upstream_works_only_when_allowed() {
    let upstream = Upstream::builder()
        .plain()
        .handler(|_: Request<hyper::body::Incoming>| async { json(StatusCode::OK, json!({})) })
        .start()
        .await;
    let pki = TestPki::localhost();
    let refused = ProxyConfig::new(&upstream.url(BASE), &pki);
    assert!(idmatch_proxy::config::Config::from_parts(None, &refused.env).is_err());
    let allowed = refused.set("IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP", "true");
    let proxy = Proxy::start(&allowed).await;
    assert_eq!(
        send(&http1(), get(&proxy.url("/x"))).await.status,
        StatusCode::OK
    );
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test]
async fn stalled_tls_handshake_is_a_json_504_within_the_connect_timeout() {
    let silent = silent_listener().await;
    let pki = TestPki::localhost();
    let config = ProxyConfig::new(&format!("https://{}{BASE}", silent.addr), &pki)
        .set("IDMATCH_UPSTREAM_CONNECT_TIMEOUT", "300ms");
    let proxy = Proxy::start(&config).await;
    let started = std::time::Instant::now();
    let answer = send(&http1(), get(&proxy.url("/number-verify/1"))).await;
    assert_proxy_error(&answer, StatusCode::GATEWAY_TIMEOUT, "connection_timeout");
    // Well before the 30 s response timeout: the connect bound covers the handshake.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unresolvable_upstream_is_a_json_502() {
    let pki = TestPki::localhost();
    let config = ProxyConfig::new(&format!("https://idmatch-proxy-test.invalid{BASE}"), &pki);
    let proxy = Proxy::start(&config).await;
    let answer = send(&http1(), get(&proxy.url("/number-verify/1"))).await;
    assert_proxy_error(&answer, StatusCode::BAD_GATEWAY, "dns_error");
}
