//! JSON log lines in the shape of tracing-subscriber's `json().flatten_event(true)` formatter
//! with no current span: `timestamp`, `level`, the event's fields in order, `target`, and
//! `spans` inside spans. Written straight into the line's buffer: tracing-subscriber serializes
//! through serde into an `io::Write` adaptor that re-checks UTF-8 at every token, which made
//! an access-log line cost as much as proxying the request (benches/README.md).

use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter; span fields are recorded by tracing-subscriber's `JsonFields`, as JSON
/// objects.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records from the `log` crate (rustls) carry their level and target as fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        out.write_str("{\"timestamp\":\"")?;
        timestamp(&mut out, SystemTime::now())?;
        out.write_str("\",\"level\":\"")?;
        out.write_str(meta.level().as_str())?;
        out.write_char('"')?;
        let mut fields = Fields {
            out: &mut out,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        out.write_str(",\"target\":")?;
        string(&mut out, meta.target())?;
        if let Some(scope) = ctx.event_scope() {
            out.write_str(",\"spans\":[")?;
            for (i, span) in scope.from_root().enumerate() {
                out.write_str(if i == 0 { "{" } else { ",{" })?;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                    // `JsonFields` left one `{…}` object: its members go in beside the name,
                    // in the order recorded (tracing-subscriber re-parses and sorts them).
                    let object = fields.fields.as_str();
                    let members = object
                        .strip_prefix('{')
                        .and_then(|rest| rest.strip_suffix('}'))
                        .unwrap_or_default();
                    if !members.is_empty() {
                        out.write_str(members)?;
                        out.write_char(',')?;
                    }
                }
                out.write_str("\"name\":")?;
                string(&mut out, span.name())?;
                out.write_char('}')?;
            }
            out.write_char(']')?;
        }
        out.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_char(',')?;
                string(self.out, field.name())?;
                self.out.write_char(':')?;
                value(self.out)
            })();
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| string(out, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |out| number(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    /// `Display` (`%value`) and `Debug` (`?value`, the message) fields: as strings.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// A JSON number as serde_json writes an `f64` (with its float formatter): shortest
/// round-trip digits, always with a fraction or exponent; `null` when not finite.
fn number(out: &mut Writer<'_>, value: f64) -> fmt::Result {
    if value.is_finite() {
        out.write_str(zmij::Buffer::new().format_finite(value))
    } else {
        out.write_str("null")
    }
}

/// A JSON string: `"` and `\` escaped, control characters as serde_json escapes them.
fn string(out: &mut Writer<'_>, value: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(value)?;
    out.write_char('"')
}

/// Escapes what passes through it for the inside of a JSON string.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for Escaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        // Every byte that needs escaping is ASCII, so these slice bounds are character
        // boundaries.
        while let Some(at) = rest
            .bytes()
            .position(|b| b < 0x20 || b == b'"' || b == b'\\')
        {
            self.0.write_str(&rest[..at])?;
            let byte = rest.as_bytes()[at];
            let short = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                _ => "",
            };
            if short.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let code = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                self.0
                    .write_str(std::str::from_utf8(&code).expect("ASCII"))?;
            } else {
                self.0.write_str(short)?;
            }
            rest = &rest[at + 1..];
        }
        self.0.write_str(rest)
    }
}

/// `2026-11-26T01:32:45.123456Z`: UTC, microseconds, as tracing-subscriber's `SystemTime` timer
/// writes it, without its `fmt` machinery.
fn timestamp(out: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        // A clock before 1970: let tracing-subscriber spell it.
        return tracing_subscriber::fmt::time::SystemTime.format_time(out);
    };
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    if year > 9999 {
        return tracing_subscriber::fmt::time::SystemTime.format_time(out);
    }
    let of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since_epoch.subsec_micros()));
    out.write_str(std::str::from_utf8(&text).expect("ASCII"))
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;
    use tracing_subscriber::fmt::format::JsonFields;

    use super::*;
    use crate::telemetry::Captured;

    impl Captured {
        /// The lines as written, with the timestamp's value (27 bytes, checked) cut out.
        fn timeless(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap();
            let text = std::str::from_utf8(&bytes).unwrap();
            text.lines()
                .map(|line| {
                    let time = line.strip_prefix("{\"timestamp\":\"").unwrap();
                    let (time, rest) = time.split_at(27);
                    let shape = time.as_bytes();
                    assert!(
                        shape[10] == b'T' && shape[19] == b'.' && shape[26] == b'Z',
                        "{time}"
                    );
                    rest.to_owned()
                })
                .collect()
        }

        fn lines(&self) -> Vec<Value> {
            let bytes = self.0.lock().unwrap();
            let text = std::str::from_utf8(&bytes).unwrap();
            assert!(text.ends_with('\n'), "{text}");
            text.lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    /// The access log's line, a field of every kind with every character JSON escapes, and
    /// events inside spans.
    fn events() {
        tracing::info!(
            target: "idmatch_proxy::access",
            method = %http::Method::POST,
            path = "/sim-swap?<redacted>",
            status = Some(200_u16),
            bytes = 66_u64,
            duration_ms = 4.1,
            upstream_ms = 4.0,
            request_id = "9f2c",
            error = None::<&str>,
            complete = true,
            "request"
        );
        tracing::warn!(
            text = "a \"b\" \\ c\n\t\r\u{8}\u{c}\u{1}\u{1f}\u{7f} é ✓",
            negative = -5_i64,
            largest = u64::MAX,
            not_a_number = f64::NAN,
            infinite = f64::NEG_INFINITY,
            tiny = 1e-7,
            huge = 1e21,
            negative_zero = -0.0,
            listed = ?["x", "\"y\""],
            "message with \"quotes\" and {}", 42
        );
        let outer = tracing::info_span!("outer", id = 7_u64, label = "l\"1");
        let _outer = outer.enter();
        let inner = tracing::info_span!("inner");
        let _inner = inner.enter();
        tracing::error!(error = %std::io::Error::other("boom"), "inside");
    }

    #[test]
    fn lines_are_tracing_subscribers_json_lines_but_for_the_time() {
        let ours = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(theirs.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, events);

        // Byte for byte, escapes and number formats included.
        assert_eq!(ours.timeless(), theirs.timeless());
        let ours = ours.lines();
        assert_eq!(ours.len(), 3);
        assert_eq!(ours[0]["status"], 200);
        assert_eq!(ours[0]["duration_ms"], 4.1);
        assert!(ours[0]["upstream_ms"].is_f64());
        assert_eq!(ours[1]["not_a_number"], Value::Null);
        assert_eq!(ours[2]["spans"][0]["label"], "l\"1");
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = |seconds: u64, micros: u32| {
            let mut text = String::new();
            let time = UNIX_EPOCH + Duration::new(seconds, micros * 1000 + 999);
            timestamp(&mut Writer::new(&mut text), time).unwrap();
            text
        };
        // Expected values from Python's `datetime.fromtimestamp(s, timezone.utc)`.
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_656_765, 123_456), "2026-11-26T01:32:45.123456Z");
        assert_eq!(at(1_709_164_800, 500_000), "2024-02-29T00:00:00.500000Z");
        assert_eq!(at(1_735_689_599, 999_999), "2024-12-31T23:59:59.999999Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
    }
}
