//! The rate-limit switch: arrival times from an injected clock, so the tests step time instead
//! of sleeping.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use idmatch_mock::MockApi;
use serde_json::json;

use crate::support::{Api, Reply, KEY_ID, SECRET};

const INTERVAL: Duration = Duration::from_millis(150);

/// A clock that only moves when told.
#[derive(Clone)]
struct Clock(Arc<Mutex<Instant>>);

impl Clock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

async fn limited(clock: &Clock) -> Api {
    let clock = clock.clone();
    Api::serve(
        MockApi::builder(KEY_ID, SECRET)
            .rate_limit(INTERVAL)
            .clock(move || clock.now())
            .build(),
    )
    .await
}

async fn swap(api: &Api) -> Reply {
    api.post(
        "/mobile-identity/v1/sim-swap",
        json!({"phoneNumber": "+31610000001", "serviceType": "24h"}),
    )
    .await
}

#[tokio::test]
async fn refuses_requests_sooner_than_the_interval_after_the_last_accepted() {
    let clock = Clock::new();
    let api = limited(&clock).await;
    assert_eq!(swap(&api).await.status, StatusCode::OK);

    clock.advance(INTERVAL - Duration::from_nanos(1));
    let refused = swap(&api).await;
    assert_eq!(
        refused.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "more than one request per 150ms for this key id"
    );
    assert_eq!(refused.header("retry-after"), "1");

    // Exactly one interval after the last accepted request: the refusal did not move the window.
    clock.advance(Duration::from_nanos(1));
    assert_eq!(swap(&api).await.status, StatusCode::OK);

    // One window for every Mobile Identity endpoint and base path, and whatever the answer.
    clock.advance(INTERVAL);
    let unknown = api
        .post(
            "/mobile-identity-sandbox/v1/identity-match",
            json!({"phoneNumber": "bad"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    for target in [
        "/mobile-identity/v1/sim-swap",
        "/mobile-identity-sandbox/v1/identity-match",
        "/mobile-identity/v1/number-verify",
        "/mobile-identity/v1/number-verify/some-id",
    ] {
        let reply = api.post(target, json!({})).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{target}");
    }
}

#[tokio::test]
async fn only_authenticated_mobile_identity_requests_count() {
    let clock = Clock::new();
    let api = limited(&clock).await;
    assert_eq!(swap(&api).await.status, StatusCode::OK);
    clock.advance(INTERVAL);

    // Neither a refused token nor the Verification service uses up the window.
    let unauthenticated = api
        .call(Method::POST, "/mobile-identity/v1/sim-swap", None, None)
        .await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    for _ in 0..3 {
        let verify = api
            .post(
                "/verification-service/v1/verify",
                json!({"phoneNumber": "+31610000001", "callbackUrl": "https://app.example"}),
            )
            .await;
        assert_eq!(verify.status, StatusCode::OK);
    }
    assert_eq!(swap(&api).await.status, StatusCode::OK);
}

#[tokio::test]
async fn is_off_unless_switched_on() {
    let clock = Clock::new();
    let api = Api::serve(
        MockApi::builder(KEY_ID, SECRET)
            .clock({
                let clock = clock.clone();
                move || clock.now()
            })
            .build(),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(swap(&api).await.status, StatusCode::OK);
    }
}
