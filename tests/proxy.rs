//! The proxy end to end: a real TLS upstream, the proxy on a real socket, real clients.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use idmatch_mock::server::json;
use idmatch_mock::{Recorded, Server as Upstream, TestPki};
use idmatch_proxy::token::{Clock, SystemClock};
use serde_json::json;
use support::*;

/// The one bearer token in a recorded request, checked with `jsonwebtoken`.
fn claims_of(request: &Recorded) -> Claims {
    bearer_claims(request.header_values("authorization"))
}

/// An upstream that answers every request with 200 and the path it saw.
async fn recording_upstream(pki: &TestPki, alpn: &[&[u8]]) -> idmatch_mock::RunningServer {
    Upstream::builder()
        .tls(pki)
        .alpn(alpn)
        .handler(|request: Request<hyper::body::Incoming>| async move {
            json(
                StatusCode::OK,
                json!({ "target": request.uri().to_string() }),
            )
        })
        .start()
        .await
}

#[tokio::test]
async fn every_endpoint_works_through_the_proxy_over_http1_and_h2c() {
    let stack = Stack::api().await;
    for client in [http1(), h2c()] {
        let url = |path: &str| stack.proxy.url(path);
        let swap = send(
            &client,
            post_json(
                &url("/sim-swap"),
                json!({"phoneNumber": "+31610000001", "serviceType": "24h"}),
            ),
        )
        .await;
        assert_eq!(swap.status, StatusCode::OK, "{:?}", swap.body);
        assert_eq!(swap.headers["content-type"], "application/json");
        assert!(swap.json().is_object());

        let matched = send(
            &client,
            post_json(
                &url("/identity-match"),
                json!({"phoneNumber": "+31610000001", "serviceType": "match", "lastName": "Verhoeven", "postalCode": "1234 AB", "dateOfBirth": "1963-12-31"}),
            ),
        )
        .await;
        assert_eq!(matched.status, StatusCode::OK, "{:?}", matched.body);

        let started = send(
            &client,
            post_json(
                &url("/number-verify"),
                json!({"phoneNumber": "+31610000001", "callbackUrl": "https://app.example/callback"}),
            ),
        )
        .await;
        assert!(started.status.is_success(), "{:?}", started.body);
        let session = started.json();
        assert_eq!(session["state"], "pending");
        let id = session["id"].as_str().unwrap();
        let polled = send(&client, get(&url(&format!("/number-verify/{id}")))).await;
        assert_eq!(polled.status, StatusCode::OK);
        assert_eq!(polled.json()["id"], id);
    }
    let requests = stack.upstream.requests();
    assert_eq!(requests.len(), 8);
    for request in &requests {
        assert!(request.target.starts_with(BASE), "{}", request.target);
        claims_of(request);
    }
}

/// CM.com's own errors reach the client as CM.com sent them: status, body byte for byte, its
/// headers, and nothing of ours.
#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    const BODY: &str = r#"{"message":"serviceType 24h needs a phoneNumber","code":4711}"#;
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|_: Request<hyper::body::Incoming>| async {
            http::Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-type", "application/problem+json; charset=utf-8")
                .header("x-cm-trace", "b7f1")
                .header("cache-control", "no-store")
                .body(idmatch_mock::server::full(BODY))
                .unwrap()
        })
        .start()
        .await;
    let stack = Stack::over(pki, upstream).await;
    for client in [http1(), h2c()] {
        let answer = send(
            &client,
            post_json(&stack.proxy.url("/sim-swap"), json!({"serviceType": "24h"})),
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.body, BODY);
        assert_eq!(
            answer.headers["content-type"],
            "application/problem+json; charset=utf-8"
        );
        assert_eq!(answer.headers["x-cm-trace"], "b7f1");
        assert_eq!(answer.headers["cache-control"], "no-store");
        assert!(
            answer.headers.get("proxy-status").is_none(),
            "CM.com's own errors carry no Proxy-Status"
        );
    }
}

#[tokio::test]
async fn works_over_http1_only_and_h2_only_upstreams() {
    for alpn in [&[b"http/1.1".as_slice()][..], &[b"h2".as_slice()][..]] {
        let pki = TestPki::localhost();
        let upstream = recording_upstream(&pki, alpn).await;
        let stack = Stack::over(pki, upstream).await;
        for client in [http1(), h2c()] {
            let answer = send(&client, get(&stack.proxy.url("/number-verify/1"))).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let requests = stack.upstream.requests();
        let expected = if alpn[0] == b"h2" {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert!(
            requests.iter().all(|r| r.version == expected),
            "{:?}",
            requests.iter().map(|r| r.version).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn concurrent_requests_share_one_token() {
    let pki = TestPki::localhost();
    let upstream = recording_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let stack = Stack::over(pki, upstream).await;
    let client = http1();
    let requests = (0..64).map(|i| {
        let (client, url) = (
            client.clone(),
            stack.proxy.url(&format!("/number-verify/{i}")),
        );
        tokio::spawn(async move { send(&client, get(&url)).await.status })
    });
    for status in join_all(requests).await {
        assert_eq!(status, StatusCode::OK);
    }
    let seen: std::collections::HashSet<Vec<u8>> = stack
        .upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_vec())
        .collect();
    assert_eq!(seen.len(), 1, "one token for all");
    let counts = stack.proxy.tokens.mint_counts();
    assert_eq!((counts.background, counts.inline), (1, 0));
}

/// The wall clock, `ahead` from its second reading on: the token minted when the cache is built
/// (the first reading) is already due for refresh when the refresher first looks, as after a
/// suspend.
struct JumpsAfterFirstReading {
    read: AtomicBool,
    ahead: Duration,
}

impl Clock for JumpsAfterFirstReading {
    fn now(&self) -> Duration {
        let jumped = self.read.swap(true, Ordering::SeqCst);
        SystemClock.now() + if jumped { self.ahead } else { Duration::ZERO }
    }
}

/// The background refresher replaces a due token before any request needs it: the request
/// path signs nothing. (The first mint counts as a background one: only a second proves it.)
#[tokio::test]
async fn the_background_refresher_replaces_a_due_token_before_requests_need_it() {
    let pki = TestPki::localhost();
    let upstream = recording_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    // Default timing: exp = iat + 60 s, refreshed 15 s before; 50 s on is 5 s past due.
    let clock = Arc::new(JumpsAfterFirstReading {
        read: AtomicBool::new(false),
        ahead: Duration::from_secs(50),
    });
    let proxy = Proxy::start_with_clock(&config, clock).await;
    eventually(Duration::from_secs(10), "a background refresh", || {
        std::future::ready(proxy.tokens.mint_counts().background == 2)
    })
    .await;
    let answer = send(&http1(), get(&proxy.url("/number-verify/1"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let counts = proxy.tokens.mint_counts();
    assert_eq!((counts.background, counts.inline), (2, 0));
    // The refreshed token went out (its `nbf` is 45 s ahead of the real clock: not decoded).
    let sent = upstream.requests()[0]
        .header("authorization")
        .map(<[u8]>::to_vec);
    assert_eq!(
        sent.as_deref(),
        Some(proxy.tokens.authorization().as_bytes())
    );
}

async fn join_all<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test]
async fn tokens_are_fresh_and_backdated() {
    let stack = Stack::api().await;
    send(&http1(), get(&stack.proxy.url("/number-verify/x"))).await;
    let claims = claims_of(&stack.upstream.requests()[0]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(claims.nbf, claims.iat);
    assert_eq!(claims.exp - claims.iat, 60, "default lifetime");
    assert!(
        claims.iat <= now - 5 && claims.iat + 10 >= now,
        "iat {} now {now}",
        claims.iat
    );
}

#[tokio::test]
async fn one_pooled_upstream_connection_serves_sequential_requests() {
    let stack = Stack::api().await;
    // Several client connections, one after the other: the upstream side is shared.
    for _ in 0..5 {
        let client = http1();
        for _ in 0..4 {
            assert_eq!(
                send(&client, get(&stack.proxy.url("/number-verify/x")))
                    .await
                    .status,
                StatusCode::NOT_FOUND
            );
        }
    }
    assert_eq!(stack.upstream.request_count(), 20);
    assert_eq!(stack.upstream.tls_handshakes_completed(), 1);
}

#[tokio::test]
async fn native_roots_plus_the_extra_ca_work() {
    let pki = TestPki::localhost();
    let upstream = recording_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let config =
        ProxyConfig::new(&upstream.url(BASE), &pki).set("IDMATCH_UPSTREAM_ROOTS", "native");
    let proxy = Proxy::start(&config).await;
    assert_eq!(
        send(&http1(), get(&proxy.url("/x"))).await.status,
        StatusCode::OK
    );
}

/// An HTTP/1.1 upstream connection goes back to the pool when its response body has ended, not
/// when the head arrives: a request meanwhile gets a connection of its own instead of queueing
/// behind a body that may take long, and afterwards both connections are reused.
#[tokio::test]
async fn an_upstream_connection_is_reused_only_once_its_response_body_has_ended() {
    let pki = TestPki::localhost();
    let (release, held) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let held = std::sync::Arc::new(std::sync::Mutex::new(Some(held)));
    let upstream = Upstream::builder()
        .tls(&pki)
        .alpn(&[b"http/1.1"])
        .handler(move |request: Request<hyper::body::Incoming>| {
            let held = held
                .lock()
                .unwrap()
                .take_if(|_| request.uri().path().ends_with("/slow"));
            async move {
                let Some(held) = held else {
                    return json(StatusCode::OK, json!({}));
                };
                http::Response::new(channel_body(held))
            }
        })
        .start()
        .await;
    let proxy = Proxy::start(&ProxyConfig::new(&upstream.url(BASE), &pki)).await;
    let client = http1();

    // The slow response's head arrives; its body is held open by the upstream.
    let slow = client.request(get(&proxy.url("/slow"))).await.unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    assert_eq!(upstream.connections_accepted(), 1);
    // Meanwhile: a second connection, at once.
    let fast = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        send(&client, get(&proxy.url("/a"))),
    );
    assert_eq!(
        fast.await.expect("not queued behind the slow body").status,
        StatusCode::OK
    );
    assert_eq!(upstream.connections_accepted(), 2);

    release
        .send(bytes::Bytes::from_static(b"done"))
        .await
        .unwrap();
    drop(release);
    let body = http_body_util::BodyExt::collect(slow.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "done");
    // Both connections are back: two requests at once need no third.
    let (a, b) = tokio::join!(
        send(&client, get(&proxy.url("/b"))),
        send(&client, get(&proxy.url("/c")))
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(upstream.connections_accepted(), 2);
    assert_eq!(upstream.request_count(), 4);
}
