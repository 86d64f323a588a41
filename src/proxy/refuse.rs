//! The requests refused before anything else is done for them: each is named by a rule here,
//! answered at once, and never reaches the upstream.

use std::net::{IpAddr, SocketAddr};

use http::header::TRANSFER_ENCODING;
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Version};
use hyper::body::Body;

use crate::error::ProxyError;

/// Refuses what must not be forwarded; otherwise returns the body's announced length, if known.
/// `local` is the address the client connected to.
pub(super) fn refuse<B: Body>(
    request: &Request<B>,
    local: SocketAddr,
    max_body_bytes: Option<u64>,
) -> Result<Option<u64>, ProxyError> {
    // CONNECT would make us a tunnel anywhere; TRACE would echo our token to the client
    // (RFC 9110 §9.3.8 warns of exactly that).
    if matches!(*request.method(), Method::CONNECT | Method::TRACE) {
        return Err(ProxyError::MethodRefused(request.method().clone()));
    }
    // HTTP/1 absolute-form is how forward-proxy clients speak; only our own authority is
    // accepted. In HTTP/2, `:authority` always appears and plays the part of `Host`, which
    // we ignore: the destination is fixed.
    if request.version() < Version::HTTP_2 {
        if let Some(authority) = request.uri().authority() {
            if !names_local(authority, local) {
                return Err(ProxyError::ForeignAuthority(authority.to_string()));
            }
        }
    }
    // hyper frames a body by its last transfer coding, which it checks is `chunked`, and
    // hands us what that decodes to; the field itself is hop-by-hop and removed. Any other
    // coding (`gzip, chunked`, `chunked` twice, a second line naming `x`) would reach the
    // upstream still applied and no longer declared. RFC 9112 §6.1: 501.
    if let Some(codings) = other_codings(request.headers()) {
        return Err(ProxyError::TransferCoding(codings));
    }
    // hyper has parsed and checked `Content-Length` (HTTP/1.1: it is the exact size; h2:
    // a DATA overrun is a stream error), so an announced size is known here without
    // reading; a GET without a body is 0.
    let length = request.body().size_hint().exact();
    if let (Some(limit), Some(length)) = (max_body_bytes, length) {
        if length > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    Ok(length)
}

/// The request's `Transfer-Encoding` lines, joined, when they say anything but `chunked` alone
/// (empty list elements do not count, RFC 9110 §5.6.1).
fn other_codings(headers: &HeaderMap) -> Option<String> {
    let lines = headers.get_all(TRANSFER_ENCODING);
    let mut codings = lines
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => None,
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some(
            lines
                .iter()
                .map(|line| String::from_utf8_lossy(line.as_bytes()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

/// Whether an absolute-form authority names the socket the client connected to.
fn names_local(authority: &Authority, local: SocketAddr) -> bool {
    // `user@host` is never how a client addresses us, whoever `host` is.
    if authority.as_str().contains('@') || authority.port_u16().unwrap_or(80) != local.port() {
        return false;
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => ip == local.ip(),
        Err(_) => host.eq_ignore_ascii_case("localhost") && local.ip().is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn only_chunked_alone_is_a_supported_transfer_encoding() {
        let codings = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(TRANSFER_ENCODING, HeaderValue::from_str(line).unwrap());
            }
            other_codings(&headers)
        };
        assert_eq!(codings(&[]), None);
        assert_eq!(codings(&["chunked"]), None);
        assert_eq!(codings(&["CHUNKED"]), None);
        assert_eq!(codings(&[", chunked ,"]), None);
        // One coding, not `chunked`: hyper's HTTP/1 server answers 400 first, but the rule
        // does not lean on it.
        assert_eq!(codings(&["gzip"]).as_deref(), Some("gzip"));
        assert_eq!(codings(&["xchunked"]).as_deref(), Some("xchunked"));
        assert_eq!(
            codings(&["gzip, chunked"]).as_deref(),
            Some("gzip, chunked")
        );
        assert_eq!(
            codings(&["chunked, chunked"]).as_deref(),
            Some("chunked, chunked")
        );
        assert_eq!(codings(&["x", "chunked"]).as_deref(), Some("x, chunked"));
    }

    #[test]
    fn absolute_form_must_name_the_local_socket() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let yes = ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"];
        let no = [
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "api.cm.com:8080",
            "169.254.169.254",
            "127.0.0.1",
        ];
        for a in yes {
            assert!(names_local(&a.parse().unwrap(), local), "{a}");
        }
        for a in no {
            assert!(!names_local(&a.parse().unwrap(), local), "{a}");
        }
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(names_local(&"[::1]".parse().unwrap(), v6));
        assert!(names_local(&"localhost".parse().unwrap(), v6));
        assert!(!names_local(&"user@localhost:8080".parse().unwrap(), local));
    }
}
