//! The Verification service mock: creating a verification, CM.com's sandbox codes, the session
//! page.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::support::{Api, Reply};

const V1: &str = "/verification-service/v1";
const SANDBOX: &str = "/verification-service-sandbox/v1";

/// CM.com's example request (fact sheet §2.5.2), with an email of ours.
fn example() -> Value {
    json!({
        "phoneNumber": "+31612345678",
        "email": "user@example.com",
        "callbackUrl": "https://mycallbackurl",
        "excludeChannels": ["sms", "voice"],
    })
}

async fn create(api: &Api, base: &str, body: Value) -> (String, Reply) {
    let reply = api.post(&format!("{base}/verify"), body).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    (reply.body["id"].as_str().unwrap().to_owned(), reply)
}

#[tokio::test]
async fn creates_a_pending_silent_verification() {
    let api = Api::start().await;
    for (base, body) in [
        (V1, example()),
        (
            SANDBOX,
            json!({"phoneNumber": "+4915100000001", "callbackUrl": "https://app.example/cb"}),
        ),
        (
            SANDBOX,
            json!({"phoneNumber": "+4915100000001", "callbackUrl": "https://app.example/cb", "excludeChannels": ["whatsapp", "voice", "sms", "rcs", "viber"]}),
        ),
    ] {
        let (id, reply) = create(&api, base, body).await;
        assert_eq!(reply.header("content-type"), "application/json");
        assert_eq!(&id[14..15], "4", "a version 4 UUID: {id}");
        let session_url = reply.body["sessionUrl"].as_str().unwrap();
        assert!(api.path_of(session_url).starts_with("/v1/dm/session/"));
        assert_eq!(
            reply.text,
            format!(
                r#"{{"id":"{id}","state":"pending","type":"silent","sessionUrl":"{session_url}"}}"#
            )
        );
    }
}

#[tokio::test]
async fn sandbox_codes_set_the_state() {
    let api = Api::start().await;
    let (id, _) = create(&api, SANDBOX, example()).await;
    for (code, state) in [
        ("999999", "success"),
        ("000000", "pending"),
        ("111111", "failed"),
        ("222222", "expired"),
    ] {
        for base in [SANDBOX, V1] {
            let reply = api
                .put(
                    &format!("{base}/verify/{id}"),
                    json!({"verificationCode": code}),
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{code}");
            assert_eq!(
                reply.text,
                format!(r#"{{"id":"{id}","state":"{state}","type":"smart"}}"#),
                "{code}"
            );
        }
    }

    for (body, message) in [
        (
            json!({"verificationCode": "123456"}),
            "invalid field: verificationCode (the sandbox knows 000000, 111111, 222222 and 999999)",
        ),
        (
            json!({"verificationCode": 999999}),
            "invalid field: verificationCode (expected a string)",
        ),
        (json!({}), "missing field: verificationCode"),
    ] {
        let reply = api.put(&format!("{SANDBOX}/verify/{id}"), body).await;
        assert_eq!(reply.error(StatusCode::BAD_REQUEST, "bad_request"), message);
    }
    let reply = api
        .put(
            &format!("{SANDBOX}/verify/unknown"),
            json!({"verificationCode": "999999"}),
        )
        .await;
    assert_eq!(
        reply.error(StatusCode::NOT_FOUND, "not_found"),
        "unknown verification id"
    );
}

#[tokio::test]
async fn loading_the_session_url_ends_silent_authentication() {
    let api = Api::start().await;

    let (id, created) = create(&api, V1, example()).await;
    let path = api
        .path_of(created.body["sessionUrl"].as_str().unwrap())
        .to_owned();
    let success = format!(r#"{{"id":"{id}","state":"success","type":"silent"}}"#);
    assert_eq!(load(&api, path.clone()).await.text, success);
    assert_eq!(
        load(&api, format!("{path}?state=failed")).await.text,
        success
    );

    // Silent authentication failed: the flow falls back to an OTP, whose code comes next.
    let (id, created) = create(&api, V1, example()).await;
    let path = api
        .path_of(created.body["sessionUrl"].as_str().unwrap())
        .to_owned();
    assert_eq!(
        load(&api, format!("{path}?state=failed")).await.text,
        format!(r#"{{"id":"{id}","state":"pending","type":"smart"}}"#)
    );
    let reply = api
        .put(
            &format!("{V1}/verify/{id}"),
            json!({"verificationCode": "999999"}),
        )
        .await;
    assert_eq!(
        reply.text,
        format!(r#"{{"id":"{id}","state":"success","type":"smart"}}"#)
    );
}

/// The device loading a `sessionUrl` path: no token.
async fn load(api: &Api, path: impl AsRef<str>) -> Reply {
    api.call(Method::GET, path.as_ref(), None, None).await
}

#[tokio::test]
async fn reports_bad_requests_by_field() {
    let api = Api::start().await;
    let with = |field: &str, value: Value| {
        let mut body = example();
        body[field] = value;
        body
    };
    let channels =
        "invalid field: excludeChannels (expected an array of whatsapp, voice, sms, rcs, viber)";
    for (body, message) in [
        (
            with("phoneNumber", json!("+0612345678")),
            "invalid field: phoneNumber (expected E.164, e.g. +31610000001)",
        ),
        (
            with("email", json!(1)),
            "invalid field: email (expected a string)",
        ),
        (with("excludeChannels", json!(["email"])), channels),
        (with("excludeChannels", json!("sms")), channels),
        (with("excludeChannels", json!([null])), channels),
    ] {
        let reply = api.post(&format!("{V1}/verify"), body).await;
        assert_eq!(reply.error(StatusCode::BAD_REQUEST, "bad_request"), message);
    }
}
