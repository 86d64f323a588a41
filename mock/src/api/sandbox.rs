//! The fixed sandbox subscribers and the rules that turn them into answers.

use time::{
    macros::{date, datetime},
    Date, Duration, OffsetDateTime,
};

/// One subscriber the sandbox knows.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) phone_number: &'static str,
    pub(crate) first_name: &'static str,
    pub(crate) last_name: &'static str,
    pub(crate) postcode: &'static str,
    pub(crate) date_of_birth: Date,
    last_sim_change: SimChange,
}

/// When a subscriber's SIM last changed: fixed, or relative to the request so that the
/// recent-swap answers stay true whenever the mock runs.
#[derive(Debug)]
enum SimChange {
    At(OffsetDateTime),
    Ago(Duration),
}

pub(crate) const SUBSCRIBERS: &[Subscriber] = &[
    Subscriber {
        phone_number: "+31610000001",
        first_name: "Joris",
        last_name: "Verhoeven",
        postcode: "1234 AB",
        date_of_birth: date!(1963 - 12 - 31),
        last_sim_change: SimChange::At(datetime!(2019-06-01 08:00:00 UTC)),
    },
    Subscriber {
        phone_number: "+31610000002",
        first_name: "Sanne",
        last_name: "de Vries",
        postcode: "3511 LN",
        date_of_birth: date!(1988 - 04 - 17),
        last_sim_change: SimChange::Ago(Duration::hours(2)),
    },
    Subscriber {
        phone_number: "+31610000003",
        first_name: "Pieter",
        last_name: "Bakker",
        postcode: "9711 AB",
        date_of_birth: date!(1975 - 09 - 02),
        last_sim_change: SimChange::Ago(Duration::days(3)),
    },
    Subscriber {
        phone_number: "+31610000004",
        first_name: "Emma",
        last_name: "Jansen",
        postcode: "5611 AZ",
        date_of_birth: date!(2001 - 02 - 28),
        last_sim_change: SimChange::Ago(Duration::days(20)),
    },
    Subscriber {
        phone_number: "+31610000005",
        first_name: "Lucas",
        last_name: "Smit",
        postcode: "6511 KL",
        date_of_birth: date!(1995 - 11 - 05),
        last_sim_change: SimChange::Ago(Duration::days(60)),
    },
];

pub(crate) fn subscriber(phone_number: &str) -> Option<&'static Subscriber> {
    SUBSCRIBERS
        .iter()
        .find(|subscriber| subscriber.phone_number == phone_number)
}

impl Subscriber {
    /// The last SIM change, to the second.
    pub(crate) fn last_sim_change(&self, now: OffsetDateTime) -> OffsetDateTime {
        let at = match self.last_sim_change {
            SimChange::At(at) => at,
            SimChange::Ago(ago) => now - ago,
        };
        at.replace_nanosecond(0).unwrap_or(at)
    }
}

/// The `range` bucket of a SIM change `age` old.
pub(crate) fn sim_change_range(age: Duration) -> &'static str {
    if age < Duration::DAY {
        "<24h"
    } else if age < Duration::days(7) {
        "1-7d"
    } else if age < Duration::days(30) {
        "7-30d"
    } else if age < Duration::days(90) {
        "30-90d"
    } else {
        ">90d"
    }
}

/// How alike a claimed name is to the registered one, 0-100: case, surrounding and repeated
/// whitespace are ignored, then 100 × (1 − edit distance / longer length), rounded.
pub(crate) fn name_score(claimed: &str, registered: &str) -> u8 {
    similarity(&normalize_name(claimed), &normalize_name(registered))
}

/// As [`name_score`], but whitespace is ignored entirely: `1234ab` is `1234 AB`.
pub(crate) fn postcode_score(claimed: &str, registered: &str) -> u8 {
    let normalize = |postcode: &str| -> Vec<char> {
        postcode
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_uppercase)
            .collect()
    };
    similarity(&normalize(claimed), &normalize(registered))
}

/// Dates of birth match or do not: 100 or 0.
pub(crate) fn date_score(claimed: Date, registered: Date) -> u8 {
    if claimed == registered {
        100
    } else {
        0
    }
}

fn normalize_name(name: &str) -> Vec<char> {
    name.split_whitespace()
        .flat_map(|word| std::iter::once(' ').chain(word.chars().flat_map(char::to_lowercase)))
        .skip(1)
        .collect()
}

fn similarity(a: &[char], b: &[char]) -> u8 {
    let longer = a.len().max(b.len());
    if longer == 0 {
        return 100;
    }
    let same = longer - edit_distance(a, b);
    // Rounded integer division; the result is at most 100.
    ((same * 100 + longer / 2) / longer) as u8
}

/// Levenshtein distance, one row at a time.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ignore_case_and_spacing() {
        assert_eq!(name_score("  joris ", "Joris"), 100);
        assert_eq!(name_score("de  vries", "de Vries"), 100);
        assert_eq!(name_score("Verhoven", "Verhoeven"), 89);
        assert_eq!(name_score("", "Joris"), 0);
        assert_eq!(name_score("Janssen", "Jansen"), 86);
        assert_eq!(name_score("Smith", "Jansen"), 0);
    }

    #[test]
    fn postcodes_ignore_whitespace_and_case() {
        assert_eq!(postcode_score("1234ab", "1234 AB"), 100);
        assert_eq!(postcode_score("1234 AC", "1234 AB"), 83);
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edit_distance(&chars("kitten"), &chars("sitting")), 3);
        assert_eq!(edit_distance(&chars(""), &chars("abc")), 3);
        assert_eq!(edit_distance(&chars("abc"), &chars("abc")), 0);
    }

    #[test]
    fn ranges_cover_every_sandbox_bucket() {
        let now = OffsetDateTime::now_utc();
        let ranges: Vec<_> = SUBSCRIBERS
            .iter()
            .map(|subscriber| sim_change_range(now - subscriber.last_sim_change(now)))
            .collect();
        assert_eq!(ranges, [">90d", "<24h", "1-7d", "7-30d", "30-90d"]);
    }

    #[test]
    fn relative_changes_are_whole_seconds() {
        let now = OffsetDateTime::now_utc();
        let change = subscriber("+31610000002").unwrap().last_sim_change(now);
        assert_eq!(change.nanosecond(), 0);
        assert!(now - change >= Duration::hours(2));
    }
}
