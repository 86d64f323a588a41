//! CM.com's published sandbox identities (fact sheet §3.1) and the rules that turn them into
//! answers. Their SIM swap histories are ours: CM's SIM swap sandbox data is unknown (§3.2).

use time::{macros::datetime, Duration, OffsetDateTime};

/// One subscriber of CM.com's sandbox table, exactly as published.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) phone_number: &'static str,
    first_name: &'static str,
    last_name: &'static str,
    address: &'static str,
    postal_code: &'static str,
    /// A string, not a date: one published value (`2001-09-0`) is not a date.
    date_of_birth: &'static str,
    last_sim_swap: SimSwap,
}

/// When a subscriber's SIM last changed: fixed, or relative to the request so that the
/// recent-swap answers stay true whenever the mock runs.
#[derive(Debug)]
enum SimSwap {
    At(OffsetDateTime),
    Ago(Duration),
}

/// CM.com's SIM swap example timestamp (fact sheet §2.1).
const LONG_AGO: SimSwap = SimSwap::At(datetime!(2017-12-31 14:59:59 UTC));
const HOURS_AGO: SimSwap = SimSwap::Ago(Duration::hours(2));
const DAYS_AGO: SimSwap = SimSwap::Ago(Duration::days(3));
/// Inside CM.com's `range` example, 7 to 14 days.
const DAYS_AGO_10: SimSwap = SimSwap::Ago(Duration::days(10));

const fn identity(
    [phone_number, first_name, last_name, address, postal_code, date_of_birth]: [&'static str; 6],
    last_sim_swap: SimSwap,
) -> Identity {
    Identity {
        phone_number,
        first_name,
        last_name,
        address,
        postal_code,
        date_of_birth,
        last_sim_swap,
    }
}

/// The table of fact sheet §3.1, row for row; the SIM swaps cycle through the four `range`
/// answers.
#[rustfmt::skip]
pub(crate) const IDENTITIES: [Identity; 12] = [
    identity(["+31610000001", "Joris", "Verhoeven", "123", "1234 AB", "1963-12-31"], LONG_AGO),
    identity(["+31610000002", "Anna", "Jansen", "456", "5678 CD", "2019-03-01"], HOURS_AGO),
    identity(["+31610000003", "Lars", "De Vries", "789", "9012 EF", "1995-07-15"], DAYS_AGO),
    identity(["+4915100000001", "Hans", "Mueller", "123", "12345", "2018-12-31"], DAYS_AGO_10),
    identity(["+4915100000002", "Greta", "Schmidt", "456", "67890", "1968-03-22"], LONG_AGO),
    identity(["+4915100000003", "Felix", "Wagner", "789", "54321", "1987-11-09"], HOURS_AGO),
    identity(["+447710000001", "James", "Smith", "123", "AB12 3CD", "1980-09-28"], DAYS_AGO),
    identity(["+447710000002", "Emma", "Brown", "456", "EF45 6GH", "2016-12-31"], DAYS_AGO_10),
    identity(["+447710000003", "Oliver", "Taylor", "789", "IJ78 9KL", "1992-05-17"], LONG_AGO),
    identity(["+33610000001", "Pierre", "Dubois", "123", "12345", "1988-04-12"], HOURS_AGO),
    identity(["+33610000002", "Sophie", "Martin", "456", "67890", "2020-12-31"], DAYS_AGO),
    identity(["+33610000003", "Antoine", "Leroy", "789", "54321", "2001-09-0"], DAYS_AGO_10),
];

pub(crate) fn identity_of(phone_number: &str) -> Option<&'static Identity> {
    IDENTITIES
        .iter()
        .find(|identity| identity.phone_number == phone_number)
}

/// The identity fields a client claims; `None` for a field not sent.
#[derive(Debug, Default)]
pub(crate) struct Claims<'a> {
    pub(crate) first_name: Option<&'a str>,
    pub(crate) last_name: Option<&'a str>,
    pub(crate) address: Option<&'a str>,
    pub(crate) postal_code: Option<&'a str>,
    pub(crate) date_of_birth: Option<&'a str>,
}

/// The six verdicts in CM.com's order: `firstName`, `lastName`, `name`, `address`,
/// `postalCode`, `dateOfBirth`. A field matches when it was sent and equals the registered value
/// exactly (our assumption); an unlisted number matches nothing. `name` is first and last name
/// together, as CM.com's sandbox example shows (false when only the first name differs).
pub(crate) fn verdicts(identity: Option<&Identity>, claims: &Claims<'_>) -> [bool; 6] {
    let Some(identity) = identity else {
        return [false; 6];
    };
    let same = |claimed: Option<&str>, registered: &str| claimed == Some(registered);
    let first_name = same(claims.first_name, identity.first_name);
    let last_name = same(claims.last_name, identity.last_name);
    [
        first_name,
        last_name,
        first_name && last_name,
        same(claims.address, identity.address),
        same(claims.postal_code, identity.postal_code),
        same(claims.date_of_birth, identity.date_of_birth),
    ]
}

impl Identity {
    /// The last SIM swap, to the second.
    pub(crate) fn last_sim_swap(&self, now: OffsetDateTime) -> OffsetDateTime {
        let at = match self.last_sim_swap {
            SimSwap::At(at) => at,
            SimSwap::Ago(ago) => now - ago,
        };
        at.replace_nanosecond(0).unwrap_or(at)
    }
}

/// The `range` answer `(gt, lt)` in seconds for a swap `age` old: the bracket holding it, with
/// CM.com's 7-14 days example and `lt = -1` for "older than `gt`" (fact sheet §2.1). The
/// brackets themselves are ours.
pub(crate) fn range(age: Duration) -> (i64, i64) {
    const DAY: i64 = 86_400;
    match age.whole_seconds() {
        age if age < DAY => (DAY, 0),
        age if age < 7 * DAY => (7 * DAY, DAY),
        age if age < 14 * DAY => (14 * DAY, 7 * DAY),
        _ => (14 * DAY, -1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cm_sandbox_example_verdicts() {
        let claims = Claims {
            first_name: Some("John"),
            last_name: Some("Verhoeven"),
            address: Some("123"),
            postal_code: Some("1234 AB"),
            date_of_birth: Some("1963-12-31"),
        };
        assert_eq!(
            verdicts(identity_of("+31610000001"), &claims),
            [false, true, false, true, true, true]
        );
    }

    #[test]
    fn comparison_is_exact_and_absent_fields_do_not_match() {
        let antoine = identity_of("+33610000003");
        let claims = |first_name, postal_code| Claims {
            first_name: Some(first_name),
            postal_code: Some(postal_code),
            date_of_birth: Some("2001-09-0"),
            ..Claims::default()
        };
        assert_eq!(
            verdicts(antoine, &claims("Antoine", "54321")),
            [true, false, false, false, true, true]
        );
        assert_eq!(
            verdicts(antoine, &claims("antoine", " 54321")),
            [false, false, false, false, false, true]
        );
        assert_eq!(verdicts(None, &claims("Antoine", "54321")), [false; 6]);
    }

    #[test]
    fn ranges_bracket_the_age() {
        assert_eq!(range(Duration::hours(2)), (86_400, 0));
        assert_eq!(range(Duration::DAY), (604_800, 86_400));
        assert_eq!(range(Duration::days(10)), (1_209_600, 604_800));
        assert_eq!(range(Duration::days(14)), (1_209_600, -1));
    }

    #[test]
    fn relative_swaps_are_whole_seconds() {
        let now = OffsetDateTime::now_utc();
        let swap = identity_of("+31610000002").unwrap().last_sim_swap(now);
        assert_eq!(swap.nanosecond(), 0);
        assert!(now - swap >= Duration::hours(2));
    }
}
