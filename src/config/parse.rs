//! Parsers: the text of one key into its type, each paired with what it expects as a
//! [`Parser`] that the key table's rows name.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;

use super::keys::RATE_LIMIT_REDIS_PASSWORD_FILE;
use super::{ForwardUrl, LogFormat, Roots, Secret};

/// How a key's text becomes its value, and what the file must hold for it.
pub(super) struct Parser<T> {
    pub toml: Toml,
    pub parse: fn(&str) -> Result<T, String>,
}

/// What the key must be in the TOML file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Toml {
    /// A quoted string, described as the text says.
    Str(&'static str),
    Bool,
    /// Not accepted in the file at all.
    Forbidden,
}

/// A key written as a quoted string in the file.
const fn quoted<T>(expects: &'static str, parse: fn(&str) -> Result<T, String>) -> Parser<T> {
    Parser {
        toml: Toml::Str(expects),
        parse,
    }
}

/// Scheme, authority and base path.
pub(super) type BaseUrl = (Scheme, Authority, String);
/// The URL as written, and the connection it names.
pub(super) type RedisUrl = (String, redis::ConnectionInfo);

pub(super) const SOCKET_ADDR: Parser<SocketAddr> = quoted(ADDR, socket_addr);
pub(super) const BASE_URL: Parser<BaseUrl> = quoted(URL, url);
pub(super) const APP_URL: Parser<ForwardUrl> = quoted(FORWARD_URL, forward_url);
pub(super) const FILE_PATH: Parser<PathBuf> = quoted(PATH, path);
pub(super) const ROOT_STORE: Parser<Roots> = quoted(ROOTS, roots);
pub(super) const BOOL: Parser<bool> = Parser {
    toml: Toml::Bool,
    parse: boolean,
};
pub(super) const NON_EMPTY: Parser<String> = quoted(TEXT, non_empty);
pub(super) const INLINE_SECRET: Parser<Secret> = Parser {
    toml: Toml::Forbidden,
    parse: |text| non_empty(text).map(|text| Secret::new(text.into_bytes())),
};
pub(super) const BYTES: Parser<usize> = quoted(SIZE, size);
/// A body length, counted in `u64` as hyper does.
pub(super) const BODY_BYTES: Parser<u64> = quoted(SIZE, |text| size(text).map(|n| n as u64));
pub(super) const HEADER_BYTES: Parser<usize> = quoted(SIZE, |text| match size(text)? {
    // hyper's smallest read buffer; the limit is enforced through it.
    n if n < 8192 => Err(format!("must be at least 8KiB, got {text:?}")),
    n => Ok(n),
});
pub(super) const POSITIVE: Parser<usize> = quoted(COUNT, count);
pub(super) const REPLICAS: Parser<u32> = quoted(COUNT, |text| {
    u32::try_from(count(text)?).map_err(|_| format!("must be at most {}", u32::MAX))
});
pub(super) const THREAD_COUNT: Parser<Option<usize>> = quoted(THREADS, threads);
pub(super) const FORMAT: Parser<LogFormat> = quoted(LOG_FORMATS, log_format);
pub(super) const HTTP_PROXY: Parser<Uri> = quoted(PROXY, proxy_url);
/// Read as a whole by [`no_proxy_matches`].
pub(super) const HOST_LIST: Parser<String> = quoted(NO_PROXY, |text| Ok(text.to_owned()));
pub(super) const REDIS_STORE: Parser<RedisUrl> = quoted(REDIS_URL, redis_url);

// Durations. A timeout, an interval or a lifetime must be greater than zero.
pub(super) const DURATION_OR_ZERO: Parser<Duration> =
    quoted(DURATION, |text| duration(text, DURATION, Millis));
pub(super) const POSITIVE_DURATION: Parser<Duration> = quoted(DURATION, |text| {
    duration(text, DURATION, Millis).and_then(positive)
});
pub(super) const LIFETIME_SECONDS: Parser<Duration> = quoted(SECONDS, |text| {
    duration(text, SECONDS, Seconds).and_then(positive)
});
pub(super) const REFRESH_SECONDS: Parser<Duration> = quoted(REFRESH_BEFORE, |text| {
    duration(text, REFRESH_BEFORE, Seconds)
});
pub(super) const BACKDATE_SECONDS: Parser<Duration> =
    quoted(BACKDATE, |text| duration(text, BACKDATE, Seconds));
pub(super) const MARGIN_DURATION: Parser<Duration> =
    quoted(MARGIN, |text| duration(text, MARGIN, Millis));

// What each kind of value must be: in errors, and in the file, the expected TOML type.
const ADDR: &str = "a socket address like 127.0.0.1:8080 or [::]:8080";
const URL: &str = "an absolute URL like https://api.cm.com/mobile-identity/v1";
const FORWARD_URL: &str = "an http(s) base URL like http://127.0.0.1:3000/callbacks";
const PATH: &str = "a file path";
const ROOTS: &str = "webpki or native";
// A duration key's description is also what a malformed value is answered with, so its
// examples are values that key accepts with the other keys at their defaults.
pub(super) const DURATION: &str = "a duration like 60s, 500ms or 2m";
pub(super) const SECONDS: &str =
    "whole seconds like 60s or 2m (JWT times have one-second resolution)";
pub(super) const REFRESH_BEFORE: &str =
    "whole seconds like 15s or 30s (JWT times have one-second resolution)";
pub(super) const BACKDATE: &str =
    "whole seconds like 5s or 0s (JWT times have one-second resolution)";
pub(super) const MARGIN: &str = "a duration like 5s or 500ms";
const TEXT: &str = "a non-empty string";
const SIZE: &str = "a size in bytes like 65536, 64KiB or 1MiB";
const COUNT: &str = "a positive integer";
const THREADS: &str = "auto or a positive integer";
const LOG_FORMATS: &str = "auto, json or pretty";
const PROXY: &str = "an http:// proxy URL like http://proxy.internal:3128";
const REDIS_URL: &str = "a redis:// or rediss:// URL like redis://valkey.internal:6379";
const NO_PROXY: &str = "a comma-separated list of host names, domain suffixes, IP addresses or *";

pub(super) fn expected(what: &str, text: &str) -> String {
    format!("expected {what}, got {text:?}")
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| expected(ADDR, text))
}

/// Scheme, authority and base path of the upstream. Whether `http` is allowed depends on
/// another key, so it is checked by the caller.
fn url(text: &str) -> Result<BaseUrl, String> {
    // `http::Uri` silently drops a fragment.
    if text.contains('#') {
        return Err("must not have a fragment (#...)".into());
    }
    let uri = text.parse::<Uri>().map_err(|_| expected(URL, text))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(expected(URL, text));
    };
    if *scheme != Scheme::HTTPS && *scheme != Scheme::HTTP {
        return Err(format!(
            "expected an https URL, got scheme {:?}",
            scheme.as_str()
        ));
    }
    // Not echoed: the user info may hold a password.
    if authority.as_str().contains('@') {
        return Err("must not contain user info (user@host); \
                    the proxy sends its own Authorization"
            .into());
    }
    // `port_u16` is `None` both without a port and with an invalid one (`:99999`, `:`).
    let bad_port = authority.port_u16().is_none() && authority.as_str() != authority.host();
    if authority.host().is_empty() || bad_port {
        return Err(expected(URL, text));
    }
    // Not echoed either: a query may carry a key.
    if uri.query().is_some() {
        return Err("must not have a query (?...)".into());
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme.clone(), authority.clone(), base_path))
}

/// The app's base URL, for the callbacks.
fn forward_url(text: &str) -> Result<ForwardUrl, String> {
    match url(text) {
        Ok((scheme, authority, base_path)) => Ok(ForwardUrl {
            scheme,
            authority,
            base_path,
        }),
        Err(problem) => Err(problem.replace("an https URL", "an http(s) URL")),
    }
}

fn path(text: &str) -> Result<PathBuf, String> {
    match text {
        "" => Err(expected(PATH, text)),
        _ => Ok(PathBuf::from(text)),
    }
}

fn roots(text: &str) -> Result<Roots, String> {
    match text {
        "webpki" => Ok(Roots::Webpki),
        "native" => Ok(Roots::Native),
        _ => Err(expected(ROOTS, text)),
    }
}

fn boolean(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(expected("true, false, 1 or 0", text)),
    }
}

fn non_empty(text: &str) -> Result<String, String> {
    match text {
        "" => Err(format!("expected {TEXT}, got \"\"")),
        _ => Ok(text.to_owned()),
    }
}

/// The smallest step a duration key can take.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Millis,
    /// JWT times (RFC 7519 NumericDate) are whole seconds.
    Seconds,
}

use Resolution::{Millis, Seconds};

/// A duration key's value; one refused for its form is answered with the key's own
/// description, `expects`.
fn duration(text: &str, expects: &str, resolution: Resolution) -> Result<Duration, String> {
    match parse_duration(text) {
        Some(d) if resolution == Millis || d.subsec_nanos() == 0 => Ok(d),
        _ => Err(expected(expects, text)),
    }
}

fn positive(d: Duration) -> Result<Duration, String> {
    match d.is_zero() {
        true => Err("must be greater than zero".into()),
        false => Ok(d),
    }
}

/// `<integer><unit>`, unit one of `ms`, `s`, `m`, `h`.
fn parse_duration(text: &str) -> Option<Duration> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number = number.parse::<u64>().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        "m" => number.checked_mul(60).map(Duration::from_secs),
        "h" => number.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Bytes: a plain integer, or one with a `KiB` or `MiB` suffix.
fn size(text: &str) -> Result<usize, String> {
    let (number, multiplier) = if let Some(n) = text.strip_suffix("KiB") {
        (n, 1024)
    } else if let Some(n) = text.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else {
        (text, 1)
    };
    number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| expected(SIZE, text))
}

fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(expected(COUNT, text)),
    }
}

fn threads(text: &str) -> Result<Option<usize>, String> {
    match text {
        "auto" => Ok(None),
        _ => count(text).map(Some).map_err(|_| expected(THREADS, text)),
    }
}

fn log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "auto" => Ok(LogFormat::Auto),
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(expected(LOG_FORMATS, text)),
    }
}

/// An `http://host:port` proxy, optionally with `user:password@` for `Proxy-Authorization`.
/// Never echoed: it may hold a password.
fn proxy_url(text: &str) -> Result<Uri, String> {
    let uri = text
        .parse::<Uri>()
        .map_err(|_| format!("expected {PROXY}"))?;
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority))
            if *scheme == Scheme::HTTP && !authority.host().is_empty() =>
        {
            Ok(uri)
        }
        (Some(scheme), Some(_)) => Err(format!(
            "expected {PROXY}: the tunnel to the upstream is TLS already, got scheme {:?}",
            scheme.as_str()
        )),
        _ => Err(format!("expected {PROXY}")),
    }
}

/// A `redis://` or `rediss://` URL without a password (that comes from a file), and the
/// connection it names. Never echoed: a mistyped password would be.
fn redis_url(text: &str) -> Result<(String, redis::ConnectionInfo), String> {
    let uri = text
        .parse::<Uri>()
        .map_err(|_| format!("expected {REDIS_URL}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "redis" && scheme != "rediss" {
        return Err(format!("expected {REDIS_URL}, got scheme {scheme:?}"));
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    if authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'))
    {
        return Err(format!(
            "must not contain a password: set {} instead",
            RATE_LIMIT_REDIS_PASSWORD_FILE.name
        ));
    }
    // `redis` reads a fragment as options (`#insecure` turns off certificate checks).
    if text.contains('#') || uri.query().is_some() {
        return Err("must not have a query or a fragment".into());
    }
    let connection = redis::IntoConnectionInfo::into_connection_info(text)
        .map_err(|_| format!("expected {REDIS_URL}"))?;
    Ok((text.to_owned(), connection))
}

/// The proxy URL with any password replaced, for display.
pub(super) fn redacted_proxy(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("http://{user}:<redacted>@{host}")
        }
        None => format!("http://{authority}"),
    }
}

/// Whether `NO_PROXY` exempts `host`, as curl reads it: `*` for all; otherwise entries that
/// equal the host or are a domain suffix of it (`example.com` and `.example.com` both cover
/// `api.example.com`), compared without case; ports and CIDR ranges are not supported.
pub(super) fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.');
        entry == "*"
            || host.eq_ignore_ascii_case(entry)
            || (host.len() > entry.len()
                && !entry.is_empty()
                && host[..host.len() - entry.len()].ends_with('.')
                && host[host.len() - entry.len()..].eq_ignore_ascii_case(entry))
    })
}

/// The inverse of [`parse_duration`]: `60s`, `1500ms`.
pub(super) fn show_duration(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{}ms", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn duration_syntax() {
        let ok = [
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("60s", secs(60)),
            ("2m", secs(120)),
            ("1h", secs(3600)),
        ];
        for (text, expected) in ok {
            assert_eq!(parse_duration(text), Some(expected), "{text}");
        }
        for text in [
            "",
            "60",
            "s",
            "1.5s",
            "-1s",
            " 1s",
            "1 s",
            "1S",
            "1d",
            "1sec",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
        assert_eq!(parse_duration(&format!("{}h", u64::MAX / 60)), None);
        assert_eq!(show_duration(secs(60)), "60s");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }
}
