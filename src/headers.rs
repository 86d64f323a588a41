//! Header hygiene between the client and the upstream.

use http::header::{
    Entry, HeaderName, AUTHORIZATION, CONNECTION, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue};

/// The fixed hop-by-hop fields of RFC 9110 §7.6.1, plus `Keep-Alive` and `Proxy-Connection`,
/// which predate it and which clients still send.
static HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    TRAILER,
];

/// Removes the fields that describe one connection rather than the message (RFC 9110
/// §7.6.1): every field named in `Connection`, then the fixed list. Used in both directions.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, false);
}

/// Turns the client's request headers into the upstream's: hop-by-hop fields and the client's
/// own proxy credentials go, exactly one `Authorization` comes in. Everything else stays in its
/// original order.
///
/// The client's `Host` stays for now: the pool replaces it in place with the upstream's for
/// HTTP/1.1 and removes it for HTTP/2, which carries `:authority` instead ([`crate::upstream::pool`]).
pub fn rewrite_request(headers: &mut HeaderMap, authorization: HeaderValue) {
    strip(headers, true);
    // `insert` replaces every value the client sent, in the first one's place.
    headers.insert(AUTHORIZATION, authorization);
}

/// Removes hop-by-hop fields (and `Proxy-Authorization` if `request`), keeping the order of
/// the rest. `HeaderMap::remove` moves the last field into the hole, so fields come off the end
/// (which moves nothing) back to the first doomed one, and the kept ones among them go back in
/// their order; when one kept field is left after that one, `remove` moving it is the order.
/// Usually there is nothing to remove; when there is, it is near the end (nginx puts
/// `Connection` after its own fields and before `add_header`'s: benches/README.md).
fn strip(headers: &mut HeaderMap, request: bool) {
    let fixed =
        |name: &HeaderName| HOP_BY_HOP.contains(name) || (request && name == PROXY_AUTHORIZATION);
    // `Connection` is on the fixed list: without any of those, nothing else is named either,
    // and one look at each name settles it (the usual request).
    let Some(first_fixed) = headers.keys().position(fixed) else {
        return;
    };
    let named = connection_named(headers);
    let doomed = |name: &HeaderName| fixed(name) || named.contains(name);
    let first = headers
        .keys()
        .take(first_fixed)
        .position(|name| named.contains(name))
        .unwrap_or(first_fixed);
    // Kept fields in reverse order (each field's values reversed too), so that the re-appending
    // below can walk it backwards.
    let mut kept: Vec<(HeaderName, HeaderValue)> = Vec::new();
    while headers.keys_len() > first {
        // Down to the doomed field at `first` and one kept field after it (nginx's
        // `Connection`, then one `add_header`): `remove` moves that one into the hole, which
        // keeps the order, and nothing has to come off.
        if headers.keys_len() - first == 2 && headers.keys().last().is_some_and(|n| !doomed(n)) {
            if let Some(name) = headers.keys().nth(first).cloned() {
                headers.remove(name);
            }
            break;
        }
        let last = headers.keys().last().cloned();
        let Some(Entry::Occupied(entry)) = last.map(|name| headers.entry(name)) else {
            break; // cannot happen: the name was just read from the map
        };
        let (name, values) = entry.remove_entry_mult();
        if doomed(&name) {
            continue;
        }
        let start = kept.len();
        kept.extend(values.map(|value| (name.clone(), value)));
        kept[start..].reverse();
    }
    for (name, value) in kept.into_iter().rev() {
        headers.append(name, value);
    }
}

/// The fields that `Connection` declares hop-by-hop. Split as bytes: an element that is not a
/// token (obs-text, say) names nothing, but must not hide the names beside it. The usual
/// options cost no allocation: `keep-alive` is on the fixed list already, `close` is static.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    static CLOSE: HeaderName = HeaderName::from_static("close");
    headers
        .get_all(CONNECTION)
        .iter()
        // The usual value whole, before splitting it byte by byte (nginx, Python, Java).
        .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|name| !name.eq_ignore_ascii_case(b"keep-alive"))
        .filter_map(|name| {
            if name.eq_ignore_ascii_case(b"close") {
                Some(CLOSE.clone())
            } else {
                HeaderName::from_bytes(name).ok()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn each_fixed_hop_by_hop_field_is_removed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "trailer",
        ] {
            let mut headers = map(&[(name, "x"), ("content-type", "application/json")]);
            remove_hop_by_hop(&mut headers);
            assert_eq!(
                pairs(&headers),
                [("content-type".into(), "application/json".into())],
                "{name}"
            );
        }
    }

    #[test]
    fn fields_named_by_connection_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Hop , x-other"),
            ("connection", "x-third,,"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("x-third", "3"),
            ("x-end-to-end", "4"),
        ]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(pairs(&headers), [("x-end-to-end".into(), "4".into())]);
    }

    /// `Connection` last, naming a field before it: the trailing removal alone is not enough.
    #[test]
    fn a_field_named_by_a_trailing_connection_is_removed_too() {
        let mut headers = map(&[
            ("x-hop", "1"),
            ("content-type", "application/json"),
            ("connection", "x-hop"),
        ]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(
            pairs(&headers),
            [("content-type".into(), "application/json".into())]
        );
    }

    /// The options that are not looked up as names still remove what they name.
    #[test]
    fn keep_alive_and_close_in_any_case_name_their_fields_too() {
        let mut headers = map(&[
            ("close", "1"),
            ("keep-alive", "timeout=5"),
            ("content-type", "application/json"),
            ("connection", "Keep-Alive, CLOSE"),
        ]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(
            pairs(&headers),
            [("content-type".into(), "application/json".into())]
        );
    }

    #[test]
    fn request_gets_exactly_one_authorization_and_keeps_host_for_the_pool() {
        let mut headers = map(&[
            ("host", "evil.example"),
            ("authorization", "Basic client"),
            ("authorization", "Bearer client"),
            ("proxy-authorization", "Basic p"),
            ("accept", "application/json"),
        ]);
        rewrite_request(&mut headers, HeaderValue::from_static("Bearer ours"));
        assert_eq!(
            pairs(&headers),
            [
                ("host".into(), "evil.example".into()),
                ("authorization".into(), "Bearer ours".into()),
                ("accept".into(), "application/json".into()),
            ]
        );
    }

    #[test]
    fn connection_cannot_smuggle_out_our_authorization() {
        let mut headers = map(&[("connection", "authorization, host")]);
        rewrite_request(&mut headers, HeaderValue::from_static("Bearer ours"));
        assert_eq!(headers.get_all(AUTHORIZATION).iter().count(), 1);
        assert!(!headers.contains_key(HOST));
    }

    #[test]
    fn removal_keeps_the_order_of_the_rest() {
        let mut headers = map(&[
            ("x-a", "1"),
            ("te", "trailers"),
            ("x-b", "2"),
            ("proxy-authorization", "Basic p"),
            ("x-c", "3"),
            ("x-a", "4"),
            ("x-d", "5"),
        ]);
        rewrite_request(&mut headers, HeaderValue::from_static("Bearer ours"));
        let names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "x-b", "x-c", "x-d", "authorization"]);
        assert_eq!(
            headers.get_all("x-a").iter().collect::<Vec<_>>(),
            ["1", "4"]
        );
    }

    #[test]
    fn duplicates_keep_their_order() {
        let mut headers = map(&[
            ("x-dup", "first"),
            ("accept", "a"),
            ("x-dup", "second"),
            ("x-dup", "third"),
        ]);
        remove_hop_by_hop(&mut headers);
        let dup: Vec<_> = headers.get_all("x-dup").iter().collect();
        assert_eq!(dup, ["first", "second", "third"]);
        assert_eq!(headers["accept"], "a");
    }

    /// nginx's order: its own fields, `Connection`, then `add_header`'s. The fields after the
    /// first doomed one come off and go back, values of each in their order.
    #[test]
    fn fields_after_connection_go_back_in_their_order() {
        let mut headers = map(&[
            ("x-named", "1"),
            ("server", "nginx"),
            ("content-length", "2"),
            ("connection", "keep-alive, x-named"),
            ("x-stub-protocol", "HTTP/1.1"),
            ("set-cookie", "a=1"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "b=2"),
            ("x-last", "3"),
        ]);
        remove_hop_by_hop(&mut headers);
        assert_eq!(
            pairs(&headers),
            [
                ("server".into(), "nginx".into()),
                ("content-length".into(), "2".into()),
                ("x-stub-protocol".into(), "HTTP/1.1".into()),
                ("set-cookie".into(), "a=1".into()),
                ("set-cookie".into(), "b=2".into()),
                ("x-last".into(), "3".into()),
            ]
        );
    }

    /// One kept field after the last doomed one is moved into its place by `remove`; two or more
    /// come off and go back. Either way the order stays, the moved field's values too.
    #[test]
    fn one_or_two_fields_after_the_doomed_one_keep_their_order() {
        type Fields<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Fields, Fields); 4] = [
            (
                &[("x-stub-protocol", "HTTP/1.1")],
                &[("x-stub-protocol", "HTTP/1.1")],
            ),
            (
                &[("set-cookie", "a=1"), ("set-cookie", "b=2")],
                &[("set-cookie", "a=1"), ("set-cookie", "b=2")],
            ),
            (
                &[("x-stub-protocol", "HTTP/1.1"), ("x-last", "3")],
                &[("x-stub-protocol", "HTTP/1.1"), ("x-last", "3")],
            ),
            (
                &[
                    ("set-cookie", "a=1"),
                    ("x-last", "3"),
                    ("set-cookie", "b=2"),
                ],
                &[
                    ("set-cookie", "a=1"),
                    ("set-cookie", "b=2"),
                    ("x-last", "3"),
                ],
            ),
        ];
        for (tail, kept) in cases {
            let head = [("server", "nginx"), ("connection", "keep-alive")];
            let mut headers = map(&[&head[..], tail].concat());
            remove_hop_by_hop(&mut headers);
            let expected: Vec<_> = [("server", "nginx")]
                .iter()
                .chain(kept)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            assert_eq!(pairs(&headers), expected, "{tail:?}");
        }
    }

    /// Hop-by-hop fields at the end only, and with others after them.
    #[test]
    fn trailing_and_inner_hop_by_hop_fields_keep_the_order_of_the_rest() {
        let cases: [&[(&str, &str)]; 2] = [
            &[
                ("x-dup", "first"),
                ("server", "nginx"),
                ("x-dup", "second"),
                ("keep-alive", "timeout=5"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "max=100"),
            ],
            &[
                ("x-dup", "first"),
                ("te", "trailers"),
                ("server", "nginx"),
                ("x-dup", "second"),
                ("connection", "keep-alive"),
            ],
        ];
        for case in cases {
            let mut headers = map(case);
            remove_hop_by_hop(&mut headers);
            assert_eq!(
                pairs(&headers),
                [
                    ("x-dup".into(), "first".into()),
                    ("x-dup".into(), "second".into()),
                    ("server".into(), "nginx".into()),
                ],
                "{case:?}"
            );
        }
    }
}
