//! Any request target through `proxy::upstream_uri`: the configured scheme and authority, and
//! the base path followed by the target's path and query, byte for byte.

#![no_main]

use http::uri::{Authority, Scheme};
use http::Uri;
use idmatch_proxy::error::ProxyError;
use idmatch_proxy::proxy::upstream_uri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (bool, &[u8])| {
    let (with_base, target) = input;
    let Ok(target) = Uri::try_from(target) else {
        return;
    };
    let authority = Authority::from_static("api.cm.com");
    let base = if with_base { "/mobile-identity/v1" } else { "" };
    let joined = upstream_uri(&Scheme::HTTPS, &authority, base, &target);
    let path_and_query = target.path_and_query().map_or("/", |pq| pq.as_str());
    if !path_and_query.starts_with('/') {
        assert!(matches!(joined, Err(ProxyError::InvalidTarget)));
        return;
    }
    let joined = joined.expect("an absolute path always joins");
    assert_eq!(joined.scheme(), Some(&Scheme::HTTPS));
    assert_eq!(joined.authority(), Some(&authority));
    let expected = format!("{base}{path_and_query}");
    assert_eq!(joined.path_and_query().unwrap().as_str(), expected);
    assert_eq!(joined.to_string().parse::<Uri>().unwrap(), joined);
});
