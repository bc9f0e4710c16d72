//! Time as kiln stores it (milliseconds since the Unix epoch, UTC) and monthly billing cycles.

use std::fmt;

use chrono::{DateTime, Months, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// A point in time, milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    pub fn now() -> Timestamp {
        Timestamp(Utc::now().timestamp_millis())
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub const fn plus_millis(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    fn datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Parses an RFC 3339 time such as `2026-01-31T10:00:00Z`.
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| Timestamp(d.timestamp_millis()))
    }

    /// RFC 3339 with millisecond precision, e.g. `2026-11-26T09:53:22.000Z`.
    pub fn rfc3339(self) -> String {
        self.datetime().to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// The same wall-clock instant `n` calendar months later; the day clamps to the month's last
    /// day (Jan 31 + 1 month = Feb 28/29).
    pub fn plus_months(self, n: u32) -> Timestamp {
        self.datetime()
            .checked_add_months(Months::new(n))
            .map_or(Timestamp(i64::MAX), |d| Timestamp(d.timestamp_millis()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

/// One monthly billing cycle: `[start, end)`, the `index`th since the anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BillingCycle {
    pub index: u32,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// The billing cycle containing `now` for an account anchored at `anchor`. Cycle `n` starts
/// `n` calendar months after the anchor (computed from the anchor, so short months never make
/// cycles drift). Before the anchor, this is cycle 0.
pub fn billing_cycle(anchor: Timestamp, now: Timestamp) -> BillingCycle {
    let at = |n: u32| anchor.plus_months(n);
    if now <= anchor {
        return BillingCycle {
            index: 0,
            start: anchor,
            end: at(1),
        };
    }
    // Months are 28..=31 days: estimate from 31-day months (never past the answer), then step.
    let days = (now.0 - anchor.0) / 86_400_000;
    let mut n = u32::try_from(days / 31)
        .unwrap_or(u32::MAX)
        .saturating_sub(1);
    while at(n + 1) <= now {
        n += 1;
    }
    BillingCycle {
        index: n,
        start: at(n),
        end: at(n + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        let d = DateTime::parse_from_rfc3339(s).expect("valid test date");
        Timestamp(d.timestamp_millis())
    }

    #[test]
    fn cycles_follow_calendar_months_from_the_anchor() {
        let anchor = ts("2026-01-31T10:00:00Z");
        let c = billing_cycle(anchor, ts("2026-02-28T09:59:59Z"));
        assert_eq!(
            (c.index, c.start, c.end),
            (0, anchor, ts("2026-02-28T10:00:00Z"))
        );
        let c = billing_cycle(anchor, ts("2026-02-28T10:00:00Z"));
        assert_eq!(c.index, 1);
        // Cycle 2 starts on March 31st again: no drift after the short month.
        let c = billing_cycle(anchor, ts("2026-04-01T00:00:00Z"));
        assert_eq!(
            (c.index, c.start, c.end),
            (2, ts("2026-03-31T10:00:00Z"), ts("2026-04-30T10:00:00Z"))
        );
    }

    #[test]
    fn cycle_contains_now_for_random_times() {
        let seed = fastrand::u64(..);
        println!("seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..2_000 {
            let anchor = Timestamp(rng.i64(0..4_000_000_000_000));
            let now = anchor.plus_millis(rng.i64(0..400 * 365 * 86_400_000));
            let c = billing_cycle(anchor, now);
            assert!(
                c.start <= now && now < c.end,
                "seed {seed}: {anchor:?} {now:?} {c:?}"
            );
            assert_eq!(c.start, anchor.plus_months(c.index));
        }
    }
}
