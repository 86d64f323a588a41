//! Any client header fields through `headers::rewrite_request`: exactly one `Authorization`,
//! ours; no hop-by-hop field, nothing `Connection` names, no `Proxy-Authorization`; every
//! other field kept, in order (`Host` too: the pool replaces or removes it per protocol).

#![no_main]

use std::collections::HashSet;

use arbitrary::Arbitrary;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, PROXY_AUTHORIZATION};
use http::HeaderMap;
use idmatch_proxy::headers::rewrite_request;
use libfuzzer_sys::fuzz_target;

const KNOWN: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "host",
    "authorization",
    "proxy-authorization",
    "content-type",
    "x-end",
];
/// The first seven of [`KNOWN`].
const HOP_BY_HOP: usize = 7;

#[derive(Arbitrary, Debug)]
enum Name {
    /// One of [`KNOWN`], with each letter's case from a bit of the mask.
    Known(u8, u64),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Raw(Vec<u8>),
    /// A comma-separated list, as `Connection` holds.
    List(Vec<Name>),
}

#[derive(Arbitrary, Debug)]
struct Field {
    name: Name,
    value: Value,
}

fn value(value: &Value) -> Vec<u8> {
    match value {
        Value::Raw(bytes) => bytes.clone(),
        Value::List(names) => names.iter().map(name).collect::<Vec<_>>().join(&b", "[..]),
    }
}

fn name(name: &Name) -> Vec<u8> {
    match name {
        Name::Known(i, mask) => KNOWN[*i as usize % KNOWN.len()]
            .bytes()
            .enumerate()
            .map(|(j, b)| match mask >> (j % 64) & 1 {
                1 => b.to_ascii_uppercase(),
                _ => b,
            })
            .collect(),
        Name::Raw(bytes) => bytes.clone(),
    }
}

/// RFC 9110 §7.6.1: each comma-separated element of `Connection`, without whitespace, that is
/// a token names a hop-by-hop field.
fn named(map: &HeaderMap) -> HashSet<HeaderName> {
    map.get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|e| HeaderName::from_bytes(e.trim_ascii()).ok())
        .collect()
}

fuzz_target!(|fields: Vec<Field>| {
    let mut input = HeaderMap::new();
    for field in &fields {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&name(&field.name)),
            HeaderValue::from_bytes(&value(&field.value)),
        ) {
            input.append(n, v);
        }
    }
    let authorization = HeaderValue::from_static("Bearer ours");
    let mut output = input.clone();
    rewrite_request(&mut output, authorization.clone());

    let all = |name| output.get_all(name).iter().collect::<Vec<_>>();
    assert_eq!(all(AUTHORIZATION), [&authorization]);
    let mut dropped = named(&input);
    dropped.extend(
        KNOWN[..HOP_BY_HOP]
            .iter()
            .map(|n| HeaderName::from_static(n)),
    );
    dropped.extend([PROXY_AUTHORIZATION, AUTHORIZATION]);
    let rest = |map: &HeaderMap| {
        map.iter()
            .filter(|(n, _)| !dropped.contains(*n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(rest(&output), rest(&input));
    assert_eq!(output.len(), rest(&input).len() + 1);
});
