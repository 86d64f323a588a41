//! Parsers: the text of one key into its type.

use super::keys::*;
use super::*;

// What each kind of value must be: in errors, and in the file, the expected TOML type.
pub(super) const ADDR: &str = "a socket address like 127.0.0.1:8080 or [::]:8080";
pub(super) const URL: &str = "an absolute URL like https://api.cm.com/mobile-identity/v1";
pub(super) const FORWARD_URL: &str = "an http(s) base URL like http://127.0.0.1:3000/callbacks";
pub(super) const PATH: &str = "a file path";
pub(super) const ROOTS: &str = "webpki or native";
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
pub(super) const TEXT: &str = "a non-empty string";
pub(super) const SIZE: &str = "a size in bytes like 65536, 64KiB or 1MiB";
pub(super) const COUNT: &str = "a positive integer";
pub(super) const THREADS: &str = "auto or a positive integer";
pub(super) const LOG_FORMAT: &str = "auto, json or pretty";
pub(super) const PROXY: &str = "an http:// proxy URL like http://proxy.internal:3128";
pub(super) const REDIS_URL: &str = "a redis:// or rediss:// URL like redis://valkey.internal:6379";
pub(super) const NO_PROXY: &str =
    "a comma-separated list of host names, domain suffixes, IP addresses or *";

pub(super) fn expected(what: &str, text: &str) -> String {
    format!("expected {what}, got {text:?}")
}

pub(super) fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| expected(ADDR, text))
}

/// Scheme, authority and base path of the upstream. Whether `http` is allowed depends on
/// another key, so it is checked by the caller.
pub(super) fn url(text: &str) -> Result<(Scheme, Authority, String), String> {
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

pub(super) fn path(text: &str) -> Result<PathBuf, String> {
    match text {
        "" => Err(expected(PATH, text)),
        _ => Ok(PathBuf::from(text)),
    }
}

pub(super) fn roots(text: &str) -> Result<Roots, String> {
    match text {
        "webpki" => Ok(Roots::Webpki),
        "native" => Ok(Roots::Native),
        _ => Err(expected(ROOTS, text)),
    }
}

pub(super) fn boolean(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(expected("true, false, 1 or 0", text)),
    }
}

pub(super) fn non_empty(text: &str) -> Result<String, String> {
    match text {
        "" => Err(format!("expected {TEXT}, got \"\"")),
        _ => Ok(text.to_owned()),
    }
}

/// The smallest step a duration key can take.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolution {
    Millis,
    /// JWT times (RFC 7519 NumericDate) are whole seconds.
    Seconds,
}

/// `<integer><unit>`, unit one of `ms`, `s`, `m`, `h`.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
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
pub(super) fn size(text: &str) -> Result<usize, String> {
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

pub(super) fn count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(expected(COUNT, text)),
    }
}

pub(super) fn threads(text: &str) -> Result<Option<usize>, String> {
    match text {
        "auto" => Ok(None),
        _ => count(text).map(Some).map_err(|_| expected(THREADS, text)),
    }
}

pub(super) fn log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "auto" => Ok(LogFormat::Auto),
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(expected(LOG_FORMAT, text)),
    }
}

/// An `http://host:port` proxy, optionally with `user:password@` for `Proxy-Authorization`.
/// Never echoed: it may hold a password.
pub(super) fn proxy_url(text: &str) -> Result<Uri, String> {
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
pub(super) fn redis_url(text: &str) -> Result<(String, redis::ConnectionInfo), String> {
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
            Key::RateLimitRedisPasswordFile.name()
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

/// The inverse of [`duration`]: `60s`, `1500ms`.
pub(super) fn show_duration(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{}ms", d.as_millis()),
    }
}
