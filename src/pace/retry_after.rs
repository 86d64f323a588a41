//! `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.

use std::time::{Duration, SystemTime};

use http::HeaderValue;

/// How long the upstream asked us to wait, judged at `now` (wall clock, for a date). `None`
/// for anything that is neither form: a malformed value is ignored, not trusted.
pub fn parse(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Digits that overflow are still "a long time": capped rather than dropped.
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    // A date in the past asks for no wait at all.
    Some(date.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now: SystemTime, text: &str) -> Option<Duration> {
        parse(&HeaderValue::from_str(text).unwrap(), now)
    }

    #[test]
    fn seconds_dates_and_garbage() {
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(at(now, "0"), Some(Duration::ZERO));
        assert_eq!(at(now, "120"), Some(Duration::from_secs(120)));
        assert_eq!(at(now, " 3 "), Some(Duration::from_secs(3)));
        assert_eq!(
            at(now, "99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            at(now, "Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        // The obsolete forms RFC 9110 says recipients must accept.
        assert_eq!(
            at(now, "Sunday, 06-Nov-94 08:49:42 GMT"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            at(now, "Sun Nov  6 08:49:38 1994"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            at(now, "Sun, 06 Nov 1994 08:00:00 GMT"),
            Some(Duration::ZERO),
            "a past date: no wait"
        );
        for garbage in ["", "-1", "1.5", "soon", "5s", "0x10", "Sun, 06 Nov 1994"] {
            assert_eq!(at(now, garbage), None, "{garbage:?}");
        }
        assert_eq!(parse(&HeaderValue::from_bytes(b"\xff").unwrap(), now), None);
    }
}
