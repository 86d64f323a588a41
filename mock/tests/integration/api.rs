//! The Mobile Identity API mock: the documented shapes, CM.com's sandbox data, authentication
//! and error shapes.

use bytes::Bytes;
use http::{Method, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::support::{jwt_header, now, sign, valid_token, Api, Reply, KEY_ID, SECRET};

const V1: &str = "/mobile-identity/v1";
const SANDBOX: &str = "/mobile-identity-sandbox/v1";

/// CM.com's sandbox table (fact sheet §3.1), copied here so that the mock's own copy is checked.
#[rustfmt::skip]
const IDENTITIES: [[&str; 6]; 12] = [
    ["+31610000001", "Joris", "Verhoeven", "123", "1234 AB", "1963-12-31"],
    ["+31610000002", "Anna", "Jansen", "456", "5678 CD", "2019-03-01"],
    ["+31610000003", "Lars", "De Vries", "789", "9012 EF", "1995-07-15"],
    ["+4915100000001", "Hans", "Mueller", "123", "12345", "2018-12-31"],
    ["+4915100000002", "Greta", "Schmidt", "456", "67890", "1968-03-22"],
    ["+4915100000003", "Felix", "Wagner", "789", "54321", "1987-11-09"],
    ["+447710000001", "James", "Smith", "123", "AB12 3CD", "1980-09-28"],
    ["+447710000002", "Emma", "Brown", "456", "EF45 6GH", "2016-12-31"],
    ["+447710000003", "Oliver", "Taylor", "789", "IJ78 9KL", "1992-05-17"],
    ["+33610000001", "Pierre", "Dubois", "123", "12345", "1988-04-12"],
    ["+33610000002", "Sophie", "Martin", "456", "67890", "2020-12-31"],
    ["+33610000003", "Antoine", "Leroy", "789", "54321", "2001-09-0"],
];

fn identity_request(
    service_type: &str,
    [phone, first, last, address, postal, born]: [&str; 6],
) -> Value {
    json!({
        "phoneNumber": phone,
        "serviceType": service_type,
        "firstName": first,
        "lastName": last,
        "address": address,
        "postalCode": postal,
        "dateOfBirth": born,
    })
}

#[tokio::test]
async fn identity_match_answers_cm_sandbox_example_exactly() {
    let api = Api::start().await;
    let reply = api
        .post(
            &format!("{SANDBOX}/identity-match"),
            json!({"phoneNumber": "+31610000001", "serviceType": "match", "firstName": "John", "lastName": "Verhoeven", "address": "123", "postalCode": "1234 AB", "dateOfBirth": "1963-12-31"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.text,
        r#"{"state":"success","firstNameMatch":false,"lastNameMatch":true,"nameMatch":false,"addressMatch":true,"postalCodeMatch":true,"dateOfBirthMatch":true}"#
    );
}

#[tokio::test]
async fn identity_match_knows_all_twelve_sandbox_identities() {
    let api = Api::start().await;
    for (row, identity) in IDENTITIES.iter().enumerate() {
        let matched = api
            .post(
                &format!("{V1}/identity-match"),
                identity_request("match", *identity),
            )
            .await;
        assert_eq!(
            matched.text,
            r#"{"state":"success","firstNameMatch":true,"lastNameMatch":true,"nameMatch":true,"addressMatch":true,"postalCodeMatch":true,"dateOfBirthMatch":true}"#,
            "{}",
            identity[0]
        );
        let scored = api
            .post(
                &format!("{SANDBOX}/identity-match"),
                identity_request("score", *identity),
            )
            .await;
        assert_eq!(
            scored.text,
            r#"{"state":"success","firstNameScore":100,"lastNameScore":100,"nameScore":100,"addressScore":100,"postalCodeScore":100,"dateOfBirthScore":100}"#,
            "{}",
            identity[0]
        );

        // The next row's data differs from this row's in every field.
        let mut other = IDENTITIES[(row + 1) % IDENTITIES.len()];
        other[0] = identity[0];
        let mismatched = api
            .post(
                &format!("{V1}/identity-match"),
                identity_request("score", other),
            )
            .await;
        assert_eq!(
            mismatched.text,
            r#"{"state":"success","firstNameScore":0,"lastNameScore":0,"nameScore":0,"addressScore":0,"postalCodeScore":0,"dateOfBirthScore":0}"#,
            "{}",
            identity[0]
        );
    }
}

#[tokio::test]
async fn identity_match_compares_exactly_and_only_what_was_sent() {
    let api = Api::start().await;
    let verdicts = |reply: &Reply| -> Vec<bool> {
        [
            "firstName",
            "lastName",
            "name",
            "address",
            "postalCode",
            "dateOfBirth",
        ]
        .iter()
        .map(|field| reply.body[format!("{field}Match")].as_bool().unwrap())
        .collect()
    };
    let cases = [
        // Case and spacing count.
        (
            json!({"phoneNumber": "+31610000003", "firstName": "lars", "lastName": "De Vries", "postalCode": "9012EF"}),
            [false, true, false, false, false, false],
        ),
        // Not sent: false; address2 and address3 do not change addressMatch.
        (
            json!({"phoneNumber": "+447710000001", "address": "123", "address2": "Flat 4", "address3": null}),
            [false, false, false, true, false, false],
        ),
        // CM.com's published dateOfBirth, as published.
        (
            json!({"phoneNumber": "+33610000003", "firstName": "Antoine", "lastName": "Leroy", "dateOfBirth": "2001-09-0"}),
            [true, true, true, false, false, true],
        ),
        // A valid number outside the table matches nothing.
        (
            json!({"phoneNumber": "+31699999999", "firstName": "Joris", "lastName": "Verhoeven"}),
            [false; 6],
        ),
        (json!({"phoneNumber": "+31610000001"}), [false; 6]),
    ];
    for (mut request, expected) in cases {
        request["serviceType"] = "match".into();
        let reply = api
            .post(&format!("{V1}/identity-match"), request.clone())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{request}: {:?}", reply.body);
        assert_eq!(verdicts(&reply), expected, "{request}");
    }
}

#[tokio::test]
async fn sim_swap_answers_each_service_type_state_first() {
    let api = Api::start().await;

    // CM.com's own example answer.
    let reply = swap(&api, "+31610000001", "timestamp").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.text,
        r#"{"state":"success","timestamp":"2017-12-31T14:59:59Z"}"#
    );

    // Two hours before the request, to the second.
    let reply = swap(&api, "+31610000002", "timestamp").await;
    let text = reply.body["timestamp"].as_str().unwrap();
    assert!(text.ends_with('Z') && !text.contains('.'), "{text}");
    let age = OffsetDateTime::now_utc() - OffsetDateTime::parse(text, &Rfc3339).unwrap();
    assert!(
        (time::Duration::hours(2)..time::Duration::hours(2) + time::Duration::minutes(1))
            .contains(&age),
        "{age}"
    );

    for (phone_number, within_24h) in [
        ("+31610000002", true),
        ("+31610000003", false),
        ("+31610000001", false),
    ] {
        let reply = swap(&api, phone_number, "24h").await;
        assert_eq!(
            reply.text,
            format!(r#"{{"state":"success","24h":{within_24h}}}"#),
            "{phone_number}"
        );
    }

    for (phone_number, gt, lt) in [
        ("+31610000002", 86_400, 0),
        ("+31610000003", 604_800, 86_400),
        ("+4915100000001", 1_209_600, 604_800),
        ("+31610000001", 1_209_600, -1),
    ] {
        let reply = swap(&api, phone_number, "range").await;
        assert_eq!(
            reply.text,
            format!(r#"{{"state":"success","range":{{"gt":{gt},"lt":{lt}}}}}"#),
            "{phone_number}"
        );
    }

    // Every sandbox number has a history; under the sandbox base path too.
    for [phone_number, ..] in IDENTITIES {
        let reply = api
            .post(
                &format!("{SANDBOX}/sim-swap"),
                json!({"phoneNumber": phone_number, "serviceType": "range"}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{phone_number}");
        assert_eq!(reply.body["state"], "success");
    }

    let reply = swap(&api, "+31699999999", "24h").await;
    assert_eq!(
        reply.error(StatusCode::NOT_FOUND, "not_found"),
        "no SIM swap data for this phone number"
    );
}

#[tokio::test]
async fn number_verify_waits_for_its_session_url() {
    let api = Api::start().await;

    let created = start_number_verify(&api, "+31610000001").await;
    assert_eq!(created.status, StatusCode::OK);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(&id[14..15], "4", "version 4: {id}");
    let session_url = created.body["sessionUrl"].as_str().unwrap().to_owned();
    let session = api.path_of(&session_url).to_owned();
    let token = session.strip_prefix("/v1/dm/session/").unwrap();
    assert!(
        token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{session_url}"
    );
    assert_eq!(
        created.text,
        format!(r#"{{"id":"{id}","state":"pending","match":null,"sessionUrl":"{session_url}"}}"#)
    );

    let pending = poll(&api, &id).await;
    assert_eq!(pending.status, StatusCode::OK);
    assert_eq!(
        pending.text,
        format!(r#"{{"id":"{id}","state":"pending","match":null}}"#)
    );
    assert_eq!(
        poll(&api, &id).await.text,
        pending.text,
        "polling alone moves nothing"
    );

    // The device loads the sessionUrl: no token needed.
    let loaded = api.call(Method::GET, &session, None, None).await;
    let completed = format!(r#"{{"id":"{id}","state":"completed","match":true}}"#);
    assert_eq!(loaded.status, StatusCode::OK);
    assert_eq!(loaded.text, completed);
    assert_eq!(poll(&api, &id).await.text, completed);
    // Only a pending transaction moves.
    let again = api
        .call(Method::GET, &format!("{session}?state=failed"), None, None)
        .await;
    assert_eq!(again.text, completed);

    // A number outside the sandbox table completes without a match.
    let stranger = start_number_verify(&api, "+31699999999").await;
    let stranger_id = stranger.body["id"].as_str().unwrap().to_owned();
    assert_ne!(stranger_id, id);
    let path = api
        .path_of(stranger.body["sessionUrl"].as_str().unwrap())
        .to_owned();
    api.call(Method::GET, &path, None, None).await;
    assert_eq!(
        poll(&api, &stranger_id).await.text,
        format!(r#"{{"id":"{stranger_id}","state":"completed","match":false}}"#)
    );

    // `?state=failed` fails it instead.
    let failing = start_number_verify(&api, "+31610000002").await;
    let failing_id = failing.body["id"].as_str().unwrap().to_owned();
    let path = api
        .path_of(failing.body["sessionUrl"].as_str().unwrap())
        .to_owned();
    api.call(Method::GET, &format!("{path}?state=failed"), None, None)
        .await;
    assert_eq!(
        poll(&api, &failing_id).await.text,
        format!(r#"{{"id":"{failing_id}","state":"failed","match":null}}"#)
    );

    let unknown = poll(&api, "nope").await;
    assert_eq!(
        unknown.error(StatusCode::NOT_FOUND, "not_found"),
        "unknown number verify id"
    );
    let unknown = api
        .call(
            Method::GET,
            "/v1/dm/session/00000000000000000000000000000000",
            None,
            None,
        )
        .await;
    assert_eq!(
        unknown.error(StatusCode::NOT_FOUND, "not_found"),
        "unknown session"
    );
}

#[tokio::test]
async fn callback_urls_must_be_https() {
    let api = Api::start().await;
    for (callback_url, message) in [
        (Value::Null, "missing field: callbackUrl"),
        (json!("http://app.example/callback"), "invalid field: callbackUrl (expected an https:// URL, e.g. https://example.com/callback)"),
        (json!("HTTPS://app.example/callback"), "invalid field: callbackUrl (expected an https:// URL, e.g. https://example.com/callback)"),
        (json!("https://"), "invalid field: callbackUrl (expected an https:// URL, e.g. https://example.com/callback)"),
        (json!(42), "invalid field: callbackUrl (expected a string)"),
    ] {
        for target in [
            format!("{V1}/number-verify"),
            "/verification-service/v1/verify".to_owned(),
        ] {
            let reply = api
                .post(
                    &target,
                    json!({"phoneNumber": "+31610000001", "callbackUrl": callback_url}),
                )
                .await;
            assert_eq!(
                reply.error(StatusCode::BAD_REQUEST, "bad_request"),
                message,
                "{target} {callback_url}"
            );
        }
    }
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
            json!({"phoneNumber": "+31610000001", "serviceType": "fuzzy", "firstName": "Joris"}),
            "invalid field: serviceType (expected match or score)",
        ),
        (
            &identity_match,
            json!({"phoneNumber": "+31610000001", "serviceType": "match", "dateOfBirth": 19631231}),
            "invalid field: dateOfBirth (expected a string)",
        ),
        (
            &identity_match,
            json!({"phoneNumber": "+31610000001", "serviceType": "match", "address3": ["x"]}),
            "invalid field: address3 (expected a string)",
        ),
        (
            &format!("{V1}/number-verify"),
            json!({"phoneNumber": null, "callbackUrl": "https://app.example"}),
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
async fn each_service_is_served_under_its_own_base_paths_only() {
    let api = Api::start().await;
    let swap = json!({"phoneNumber": "+31610000001", "serviceType": "24h"});
    let verify = json!({"phoneNumber": "+31610000001", "callbackUrl": "https://app.example"});
    for base in [V1, SANDBOX] {
        assert_eq!(
            api.post(&format!("{base}/sim-swap"), swap.clone())
                .await
                .status,
            StatusCode::OK
        );
        let reply = api.post(&format!("{base}/verify"), verify.clone()).await;
        assert_eq!(
            reply.error(StatusCode::NOT_FOUND, "not_found"),
            "unknown endpoint",
            "{base}"
        );
    }
    for base in [
        "/verification-service/v1",
        "/verification-service-sandbox/v1",
    ] {
        assert_eq!(
            api.post(&format!("{base}/verify"), verify.clone())
                .await
                .status,
            StatusCode::OK
        );
        for endpoint in ["sim-swap", "identity-match", "number-verify"] {
            let reply = api.post(&format!("{base}/{endpoint}"), swap.clone()).await;
            assert_eq!(
                reply.error(StatusCode::NOT_FOUND, "not_found"),
                "unknown endpoint",
                "{base}/{endpoint}"
            );
        }
    }
    for target in [
        "/mobile-identity/v2/sim-swap",
        "/mobile-identity/v1",
        "/mobile-identity/v1/sim-swap/",
        "/mobile-identity/v1x/sim-swap",
        "/mobile-identity/v1/number-verify/a/b",
        "/verification-service/v1/verify/",
        "/verification-service/v1/verify/a/b",
        "/v1/dm/session",
    ] {
        let reply = api.get(target).await;
        assert_eq!(
            reply.error(StatusCode::NOT_FOUND, "not_found"),
            "unknown endpoint",
            "{target}"
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
        (Method::GET, "/verification-service/v1/verify", "POST"),
        (
            Method::GET,
            "/verification-service/v1/verify/some-id",
            "PUT",
        ),
        (Method::POST, "/v1/dm/session/some-token", "GET"),
    ] {
        let reply = api.call(method, target, Some(&valid_token()), None).await;
        assert_eq!(
            reply.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            format!("method not allowed; use {allow}")
        );
        assert_eq!(reply.header("allow"), allow);
    }
}

async fn swap(api: &Api, phone_number: &str, service_type: &str) -> Reply {
    api.post(
        &format!("{V1}/sim-swap"),
        json!({"phoneNumber": phone_number, "serviceType": service_type}),
    )
    .await
}

async fn start_number_verify(api: &Api, phone_number: &str) -> Reply {
    api.post(
        &format!("{SANDBOX}/number-verify"),
        json!({"phoneNumber": phone_number, "callbackUrl": "https://app.example/callback"}),
    )
    .await
}

async fn poll(api: &Api, id: &str) -> Reply {
    api.get(&format!("{V1}/number-verify/{id}")).await
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
