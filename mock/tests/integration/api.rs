//! The Mobile Identity API mock: authentication, endpoints and error shapes.

use bytes::Bytes;
use http::{Method, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use crate::support::{jwt_header, now, sign, valid_token, Api, KEY_ID, SECRET};

const V1: &str = "/mobile-identity/v1";
const SANDBOX: &str = "/mobile-identity-sandbox/v1";

#[tokio::test]
async fn sim_swap_answers_each_service_type() {
    let api = Api::start().await;

    let reply = api
        .post(
            &format!("{V1}/sim-swap"),
            json!({"phoneNumber": "+31610000001", "serviceType": "timestamp"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.body,
        json!({
            "phoneNumber": "+31610000001",
            "serviceType": "timestamp",
            "latestSimChange": "2019-06-01T08:00:00Z",
        })
    );

    for (phone_number, swapped) in [("+31610000002", true), ("+31610000003", false)] {
        let reply = api
            .post(
                &format!("{SANDBOX}/sim-swap"),
                json!({"phoneNumber": phone_number, "serviceType": "24h"}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.body,
            json!({"phoneNumber": phone_number, "serviceType": "24h", "swapped": swapped})
        );
    }

    for (phone_number, range) in [
        ("+31610000001", ">90d"),
        ("+31610000002", "<24h"),
        ("+31610000003", "1-7d"),
        ("+31610000004", "7-30d"),
        ("+31610000005", "30-90d"),
    ] {
        let reply = api
            .post(
                &format!("{V1}/sim-swap"),
                json!({"phoneNumber": phone_number, "serviceType": "range"}),
            )
            .await;
        assert_eq!(
            reply.body,
            json!({"phoneNumber": phone_number, "serviceType": "range", "range": range})
        );
    }

    let recent = api
        .post(
            &format!("{V1}/sim-swap"),
            json!({"phoneNumber": "+31610000002", "serviceType": "timestamp"}),
        )
        .await;
    let timestamp = recent.body["latestSimChange"].as_str().unwrap();
    assert!(
        timestamp.len() == "2019-06-01T08:00:00Z".len() && timestamp.ends_with('Z'),
        "{timestamp}"
    );
}

#[tokio::test]
async fn identity_match_matches_and_scores_given_fields() {
    let api = Api::start().await;
    let claims = json!({
        "phoneNumber": "+31610000001",
        "firstName": "joris",
        "lastName": "Verhoven",
        "postcode": "1234ab",
        "dateOfBirth": "1963-12-31",
    });

    let mut request = claims.clone();
    request["serviceType"] = "match".into();
    let reply = api.post(&format!("{V1}/identity-match"), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({
            "phoneNumber": "+31610000001",
            "serviceType": "match",
            "result": {"firstName": true, "lastName": false, "postcode": true, "dateOfBirth": true},
        })
    );

    let mut request = claims;
    request["serviceType"] = "score".into();
    let reply = api
        .post(&format!("{SANDBOX}/identity-match"), request)
        .await;
    assert_eq!(
        reply.body,
        json!({
            "phoneNumber": "+31610000001",
            "serviceType": "score",
            "result": {"firstName": 100, "lastName": 89, "postcode": 100, "dateOfBirth": 100},
        })
    );

    let reply = api
        .post(
            &format!("{V1}/identity-match"),
            json!({"phoneNumber": "+31610000002", "serviceType": "score", "dateOfBirth": "1990-01-01"}),
        )
        .await;
    assert_eq!(
        reply.body,
        json!({"phoneNumber": "+31610000002", "serviceType": "score", "result": {"dateOfBirth": 0}})
    );
}

#[tokio::test]
async fn number_verify_creates_and_completes_sessions() {
    let api = Api::start().await;

    let created = api
        .post(
            &format!("{SANDBOX}/number-verify"),
            json!({"phoneNumber": "+31610000001"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(&id[14..15], "4", "version 4: {id}");
    assert_eq!(
        created.body,
        json!({
            "id": id,
            "state": "pending",
            "match": null,
            "sessionUrl": format!("https://number-verify.mock.invalid/session/{id}"),
        })
    );
    assert_eq!(
        created.header("location"),
        format!("{SANDBOX}/number-verify/{id}")
    );

    let first = api.get(&format!("{V1}/number-verify/{id}")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, created.body);
    let second = api.get(&format!("{V1}/number-verify/{id}")).await;
    assert_eq!(second.body["state"], "completed");
    assert_eq!(second.body["match"], true);

    let stranger = api
        .post(
            &format!("{V1}/number-verify"),
            json!({"phoneNumber": "+31699999999"}),
        )
        .await;
    assert_eq!(stranger.status, StatusCode::CREATED);
    let stranger_id = stranger.body["id"].as_str().unwrap();
    assert_ne!(stranger_id, id);
    api.get(&format!("{V1}/number-verify/{stranger_id}")).await;
    let completed = api.get(&format!("{V1}/number-verify/{stranger_id}")).await;
    assert_eq!(completed.body["state"], "completed");
    assert_eq!(completed.body["match"], false);

    let unknown = api.get(&format!("{V1}/number-verify/nope")).await;
    assert_eq!(
        unknown.error(StatusCode::NOT_FOUND, "not_found"),
        "unknown number verification id"
    );
}

#[tokio::test]
async fn rejects_bad_tokens_with_the_reason() {
    let api = Api::start().await;
    let now = now();
    let claims = |iat: u64, nbf: u64, exp: u64| json!({"iat": iat, "nbf": nbf, "exp": exp});
    let valid_claims = claims(now, now, now + 300);
    let mut hs384 = jwt_header(KEY_ID);
    hs384.alg = Algorithm::HS384;
    let mut untyped = jwt_header(KEY_ID);
    untyped.typ = None;
    let mut kidless = jwt_header(KEY_ID);
    kidless.kid = None;

    let cases = [
        // Within jsonwebtoken's default 60 s leeway: proves it is zero.
        (
            sign(
                &jwt_header(KEY_ID),
                &claims(now - 90, now - 90, now - 30),
                SECRET,
            ),
            "token expired",
        ),
        (
            sign(
                &jwt_header(KEY_ID),
                &claims(now - 90, now - 90, now),
                SECRET,
            ),
            "token expired",
        ),
        (
            sign(
                &jwt_header(KEY_ID),
                &claims(now, now + 30, now + 300),
                SECRET,
            ),
            "token not yet valid",
        ),
        (
            sign(&jwt_header(KEY_ID), &valid_claims, "another-secret"),
            "invalid signature",
        ),
        (
            sign(&jwt_header("another-key-id"), &valid_claims, SECRET),
            "unknown kid",
        ),
        (sign(&kidless, &valid_claims, SECRET), "missing kid"),
        (sign(&untyped, &valid_claims, SECRET), "invalid token type"),
        (sign(&hs384, &valid_claims, SECRET), "unsupported algorithm"),
        (
            sign(
                &jwt_header(KEY_ID),
                &json!({"iat": now, "nbf": now}),
                SECRET,
            ),
            "missing claim: exp",
        ),
        (
            sign(
                &jwt_header(KEY_ID),
                &json!({"iat": now, "exp": now + 300}),
                SECRET,
            ),
            "missing claim: nbf",
        ),
        (
            sign(
                &jwt_header(KEY_ID),
                &json!({"nbf": now, "exp": now + 300}),
                SECRET,
            ),
            "missing claim: iat",
        ),
        (
            sign(
                &jwt_header(KEY_ID),
                &json!({"iat": "now", "nbf": now, "exp": now + 300}),
                SECRET,
            ),
            "invalid claim: iat",
        ),
        ("not.a.jwt".to_owned(), "malformed token"),
    ];
    for (token, reason) in cases {
        let reply = api
            .call(
                Method::POST,
                &format!("{V1}/sim-swap"),
                Some(&token),
                Some(json!({"phoneNumber": "+31610000001", "serviceType": "24h"})),
            )
            .await;
        assert_unauthorized(&reply, reason);
    }

    let reply = api
        .call(Method::POST, &format!("{V1}/sim-swap"), None, None)
        .await;
    assert_unauthorized(&reply, "missing bearer token");

    let reply = api
        .send(
            Method::POST,
            &format!("{V1}/sim-swap"),
            &[("authorization", "Basic dXNlcjpwYXNz")],
            Bytes::new(),
        )
        .await;
    assert_unauthorized(&reply, "missing bearer token");

    let bearer = format!("Bearer {}", valid_token());
    let reply = api
        .send(
            Method::POST,
            &format!("{V1}/sim-swap"),
            &[("authorization", &bearer), ("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_unauthorized(&reply, "multiple authorization headers");
}

#[tokio::test]
async fn checks_the_token_before_routing() {
    let api = Api::start().await;
    for (method, target) in [
        (Method::GET, "/elsewhere"),
        (Method::GET, "/mobile-identity/v1/sim-swap"),
        (Method::POST, "/mobile-identity/v1/unknown"),
    ] {
        let reply = api.call(method, target, None, None).await;
        assert_unauthorized(&reply, "missing bearer token");
    }
}

#[tokio::test]
async fn accepts_a_token_at_its_not_before_second_and_a_lowercase_scheme() {
    let api = Api::start().await;
    let now = now();
    let token = sign(
        &jwt_header(KEY_ID),
        &json!({"iat": now, "nbf": now, "exp": now + 300}),
        SECRET,
    );
    let reply = api
        .send(
            Method::POST,
            &format!("{V1}/sim-swap"),
            &[("authorization", &format!("bearer {token}"))],
            Bytes::from(r#"{"phoneNumber":"+31610000001","serviceType":"24h"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn reports_bad_requests_by_field() {
    let api = Api::start().await;
    let sim_swap = format!("{V1}/sim-swap");
    let identity_match = format!("{V1}/identity-match");
    let cases: [(&str, Value, &str); 10] = [
        (
            &sim_swap,
            json!({"serviceType": "24h"}),
            "missing field: phoneNumber",
        ),
        (
            &sim_swap,
            json!({"phoneNumber": "+31610000001"}),
            "missing field: serviceType",
        ),
        (
            &sim_swap,
            json!({"phoneNumber": "+31610000001", "serviceType": "weekly"}),
            "invalid field: serviceType (expected timestamp, 24h or range)",
        ),
        (
            &sim_swap,
            json!({"phoneNumber": "0610000001", "serviceType": "24h"}),
            "invalid field: phoneNumber (expected E.164, e.g. +31610000001)",
        ),
        (
            &sim_swap,
            json!({"phoneNumber": 31610000001u64, "serviceType": "24h"}),
            "invalid field: phoneNumber (expected a string)",
        ),
        (
            &sim_swap,
            json!([1, 2]),
            "request body must be a JSON object",
        ),
        (
            &identity_match,
            json!({"phoneNumber": "+31610000001", "serviceType": "match"}),
            "at least one of firstName, lastName, postcode, dateOfBirth is required",
        ),
        (
            &identity_match,
            json!({"phoneNumber": "+31610000001", "serviceType": "fuzzy", "firstName": "Joris"}),
            "invalid field: serviceType (expected match or score)",
        ),
        (
            &identity_match,
            json!({"phoneNumber": "+31610000001", "serviceType": "match", "dateOfBirth": "31-12-1963"}),
            "invalid field: dateOfBirth (expected a date as YYYY-MM-DD)",
        ),
        (
            &format!("{V1}/number-verify"),
            json!({"phoneNumber": null}),
            "missing field: phoneNumber",
        ),
    ];
    for (target, body, message) in cases {
        let reply = api.post(target, body).await;
        assert_eq!(reply.error(StatusCode::BAD_REQUEST, "bad_request"), message);
    }

    let bearer = format!("Bearer {}", valid_token());
    let reply = api
        .send(
            Method::POST,
            &sim_swap,
            &[("authorization", &bearer)],
            Bytes::from_static(b"{\"phoneNumber\":"),
        )
        .await;
    assert_eq!(
        reply.error(StatusCode::BAD_REQUEST, "bad_request"),
        "invalid JSON body"
    );

    let reply = api
        .send(
            Method::POST,
            &sim_swap,
            &[("authorization", &bearer)],
            Bytes::from(vec![b' '; 64 * 1024 + 1]),
        )
        .await;
    assert_eq!(
        reply.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        "request body exceeds 65536 bytes"
    );
}

#[tokio::test]
async fn unknown_paths_and_numbers_are_not_found() {
    let api = Api::start().await;
    for target in [
        "/mobile-identity/v2/sim-swap",
        "/mobile-identity/v1",
        "/mobile-identity/v1/sim-swap/",
        "/mobile-identity/v1x/sim-swap",
        "/mobile-identity/v1/number-verify/a/b",
    ] {
        let reply = api.get(target).await;
        assert_eq!(
            reply.error(StatusCode::NOT_FOUND, "not_found"),
            "unknown endpoint",
            "{target}"
        );
    }

    for (endpoint, service_type) in [("sim-swap", "24h"), ("identity-match", "match")] {
        let reply = api
            .post(
                &format!("{V1}/{endpoint}"),
                json!({"phoneNumber": "+31699999999", "serviceType": service_type, "firstName": "A"}),
            )
            .await;
        assert_eq!(
            reply.error(StatusCode::NOT_FOUND, "not_found"),
            "no data for this phone number"
        );
    }
}

#[tokio::test]
async fn wrong_methods_are_not_allowed() {
    let api = Api::start().await;
    for (method, target, allow) in [
        (Method::GET, "/mobile-identity/v1/sim-swap", "POST"),
        (Method::PUT, "/mobile-identity/v1/identity-match", "POST"),
        (
            Method::GET,
            "/mobile-identity-sandbox/v1/number-verify",
            "POST",
        ),
        (
            Method::DELETE,
            "/mobile-identity/v1/number-verify/some-id",
            "GET",
        ),
    ] {
        let reply = api.call(method, target, Some(&valid_token()), None).await;
        assert_eq!(
            reply.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            format!("method not allowed; use {allow}")
        );
        assert_eq!(reply.header("allow"), allow);
    }
}

fn assert_unauthorized(reply: &crate::support::Reply, reason: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "expected {reason}: {:?}",
        reply.body
    );
    assert_eq!(
        reply.error(StatusCode::UNAUTHORIZED, "unauthorized"),
        reason,
        "expected {reason}"
    );
    assert_eq!(
        reply.header("www-authenticate"),
        r#"Bearer error="invalid_token""#
    );
}
