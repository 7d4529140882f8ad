//! Statistics for dashboards: counts of stored messages and dialogs grouped by language, customer and a
//! time bucket in an IANA time zone, and counts of consent decisions per bucket. The database computes them
//! (GROUP BY on SQLite, an aggregation pipeline on MongoDB); this module holds what both need: the
//! grouping, the buckets, and for SQLite (which has no zone database) the zone's UTC offsets over the
//! period asked for.

use chrono::{NaiveDate, NaiveDateTime, Offset, TimeZone};
use chrono_tz::Tz;

use crate::error::ApiError;
use crate::model::{CustomerId, Language};

/// The length of a time bucket; weeks start on Monday.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketUnit {
    Hour,
    Day,
    Week,
    Month,
}

impl BucketUnit {
    /// The unit's name in MongoDB's `$dateTrunc`.
    pub fn mongo_name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }
}

/// Time buckets: a unit, in a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buckets {
    pub unit: BucketUnit,
    pub zone: Tz,
}

impl Buckets {
    /// Parses an IANA zone name (`Europe/Berlin`, `UTC`); `field` names the input in the error.
    pub fn parse_zone(field: &'static str, name: &str) -> Result<Tz, ApiError> {
        name.parse::<Tz>().map_err(|_| {
            ApiError::invalid(
                field,
                format!(
                    "is not an IANA time zone name (got {name:?}): use names such as \"UTC\", \
                     \"Europe/Berlin\" or \"America/New_York\""
                ),
            )
        })
    }

    /// The UTC instant (ms) at which the bucket labelled `label` starts. `label` is the local start as
    /// SQLite writes it (`YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM:SS` for hours); `offset_ms` is the zone's offset
    /// that hour buckets are grouped with (an hour repeated when clocks go back is two buckets).
    pub fn start_of(&self, label: &str, offset_ms: i64) -> Option<i64> {
        if self.unit == BucketUnit::Hour {
            let local = NaiveDateTime::parse_from_str(label, "%Y-%m-%dT%H:%M:%S").ok()?;
            return Some(local.and_utc().timestamp_millis() - offset_ms);
        }
        let midnight = NaiveDate::parse_from_str(label, "%Y-%m-%d")
            .ok()?
            .and_hms_opt(0, 0, 0)?;
        // A midnight skipped by a clock change starts at the first instant after it.
        let start = match self.zone.from_local_datetime(&midnight) {
            chrono::LocalResult::Single(time) | chrono::LocalResult::Ambiguous(time, _) => time,
            chrono::LocalResult::None => self
                .zone
                .from_local_datetime(&(midnight + chrono::Duration::hours(1)))
                .earliest()?,
        };
        Some(start.timestamp_millis())
    }
}

/// Which dimensions the message statistics are grouped by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grouping {
    pub language: bool,
    pub customer: bool,
    pub buckets: Option<Buckets>,
}

/// One group of the message statistics; a dimension not grouped by is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageStats {
    pub language: Option<Language>,
    pub customer_id: Option<CustomerId>,
    /// When the bucket starts (ms since the epoch).
    pub bucket: Option<i64>,
    pub messages: u64,
    /// Distinct dialogs among the group's messages.
    pub dialogs: u64,
}

/// Consent decisions of one bucket (or of the whole period).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsentStats {
    pub bucket: Option<i64>,
    /// Decisions `true` (first ones, and consent given again after a withdrawal).
    pub granted: u64,
    /// Decisions `false` for dialogs that had never had consent.
    pub refused: u64,
    /// Decisions `false` that took back a consent (withdrawals).
    pub withdrawn: u64,
}

/// How far apart the offsets of a zone are sampled before a change is searched to the millisecond: zones
/// change their offset at most a few times a year, and never twice within this.
const SAMPLE_MS: i64 = 15 * 60 * 1000;

/// The zone's UTC offset (ms) at `at` (ms since the epoch).
fn offset_at(zone: Tz, at: i64) -> i64 {
    match chrono::DateTime::from_timestamp_millis(at) {
        Some(time) => {
            i64::from(
                zone.offset_from_utc_datetime(&time.naive_utc())
                    .fix()
                    .local_minus_utc(),
            ) * 1000
        }
        None => 0,
    }
}

/// The zone's offsets over `[from, to]` (ms since the epoch), as `(since, offset)` pairs in time order: each
/// offset holds from its `since` until the next one's. The first `since` is `from`.
pub fn offsets(zone: Tz, from: i64, to: i64) -> Vec<(i64, i64)> {
    let mut segments = vec![(from, offset_at(zone, from))];
    let mut at = from;
    while at < to {
        let next = at.saturating_add(SAMPLE_MS).min(to);
        let current = segments.last().expect("one segment").1;
        if offset_at(zone, next) != current {
            // The change lies in (at, next]: find its first millisecond.
            let (mut before, mut after) = (at, next);
            while after - before > 1 {
                let middle = before + (after - before) / 2;
                if offset_at(zone, middle) == current {
                    before = middle;
                } else {
                    after = middle;
                }
            }
            segments.push((after, offset_at(zone, after)));
        }
        at = next;
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn offsets_change_at_the_exact_instant_of_a_clock_change() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Clocks went back from +02:00 to +01:00 at 2026-10-25T01:00:00Z.
        let segments = offsets(
            berlin,
            ms("2026-10-24T00:00:00Z"),
            ms("2026-10-27T00:00:00Z"),
        );
        assert_eq!(
            segments,
            [
                (ms("2026-10-24T00:00:00Z"), 7_200_000),
                (ms("2026-10-25T01:00:00Z"), 3_600_000)
            ]
        );
        let utc: Tz = "UTC".parse().unwrap();
        assert_eq!(offsets(utc, 0, 10 * 365 * 86_400_000).len(), 1);
    }

    #[test]
    fn buckets_start_at_local_boundaries() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let day = Buckets {
            unit: BucketUnit::Day,
            zone: berlin,
        };
        // The day of the change is 25 hours long, from local midnight (+02:00).
        assert_eq!(
            day.start_of("2026-10-25", 0),
            Some(ms("2026-10-25T00:00:00+02:00"))
        );
        assert_eq!(
            day.start_of("2026-10-26", 0),
            Some(ms("2026-10-26T00:00:00+01:00"))
        );
        // The repeated hour is two buckets, told apart by their offsets.
        let hour = Buckets {
            unit: BucketUnit::Hour,
            zone: berlin,
        };
        assert_eq!(
            hour.start_of("2026-10-25T02:00:00", 7_200_000),
            Some(ms("2026-10-25T00:00:00Z"))
        );
        assert_eq!(
            hour.start_of("2026-10-25T02:00:00", 3_600_000),
            Some(ms("2026-10-25T01:00:00Z"))
        );
        // A zone whose midnight is skipped (Santiago springs forward at 24:00).
        let santiago = Buckets {
            unit: BucketUnit::Day,
            zone: "America/Santiago".parse().unwrap(),
        };
        assert!(santiago.start_of("2026-09-06", 0).is_some());
    }

    #[test]
    fn zone_names_are_checked() {
        assert!(Buckets::parse_zone("timeZone", "Europe/Berlin").is_ok());
        let error = Buckets::parse_zone("timeZone", "Mars/Olympus").unwrap_err();
        assert_eq!(error.code(), "BAD_USER_INPUT");
        assert!(error.message().contains("IANA"));
    }
}
