//! Studio Credits: a non-negative whole number with a hard ceiling, so sums of credits can
//! never overflow the 64-bit columns they are stored in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An amount of Studio Credits. Always `0..=Credits::MAX`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(try_from = "i64", into = "u64")]
#[schema(value_type = u64)]
pub struct Credits(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreditsError {
    #[error("credit amounts cannot be negative (got {0})")]
    Negative(i128),
    #[error("credit amount must be positive")]
    Zero,
    #[error("credit amount {0} exceeds the maximum of {max}", max = Credits::MAX.0)]
    TooLarge(i128),
    #[error("not a whole number of credits: {0:?}")]
    NotANumber(String),
    #[error("credit arithmetic would overflow the maximum of {max}", max = Credits::MAX.0)]
    Overflow,
}

impl Credits {
    /// A quadrillion credits: far beyond any real account, and any sum of a few thousand such
    /// amounts still fits in an `i64`.
    pub const MAX: Credits = Credits(1_000_000_000_000_000);
    pub const ZERO: Credits = Credits(0);

    pub const fn new_const(n: u64) -> Credits {
        assert!(n <= Self::MAX.0, "Credits::new_const beyond MAX");
        Credits(n)
    }

    /// Any amount from zero to `MAX`.
    pub fn new(n: i128) -> Result<Credits, CreditsError> {
        if n < 0 {
            return Err(CreditsError::Negative(n));
        }
        let v = u64::try_from(n).map_err(|_| CreditsError::TooLarge(n))?;
        if v > Self::MAX.0 {
            return Err(CreditsError::TooLarge(n));
        }
        Ok(Credits(v))
    }

    /// An amount that must be at least one credit (grants, packs, allowances).
    pub fn positive(n: i128) -> Result<Credits, CreditsError> {
        match Credits::new(n)? {
            Credits(0) => Err(CreditsError::Zero),
            c => Ok(c),
        }
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The value as stored in a BIGINT column. Lossless: `MAX` is far below `i64::MAX`.
    pub fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// Reads a stored value back; a negative or oversized value in storage is an error, never a
    /// silently clamped amount.
    pub fn from_i64(n: i64) -> Result<Credits, CreditsError> {
        Credits::new(i128::from(n))
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Credits) -> Result<Credits, CreditsError> {
        let sum = self.0.checked_add(other.0).ok_or(CreditsError::Overflow)?;
        if sum > Self::MAX.0 {
            return Err(CreditsError::Overflow);
        }
        Ok(Credits(sum))
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    pub fn min(self, other: Credits) -> Credits {
        Credits(self.0.min(other.0))
    }
}

impl TryFrom<i64> for Credits {
    type Error = CreditsError;
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        Credits::new(i128::from(n))
    }
}

impl From<Credits> for u64 {
    fn from(c: Credits) -> u64 {
        c.0
    }
}

impl FromStr for Credits {
    type Err = CreditsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().replace(['_', ','], "");
        let n: i128 = t.parse().map_err(|_| {
            // A long string of digits is a number, just too big for us.
            let digits = t.strip_prefix('-').unwrap_or(&t);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                CreditsError::TooLarge(if t.starts_with('-') {
                    i128::MIN
                } else {
                    i128::MAX
                })
            } else {
                CreditsError::NotANumber(s.to_owned())
            }
        })?;
        if n < 0 {
            return Err(CreditsError::Negative(n));
        }
        Credits::new(n)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::iter::Sum for Credits {
    /// Saturates at `MAX`; callers that must not saturate use `checked_add`.
    fn sum<I: Iterator<Item = Credits>>(iter: I) -> Credits {
        iter.fold(Credits::ZERO, |a, b| {
            a.checked_add(b).unwrap_or(Credits::MAX)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("1_500".parse::<Credits>(), Ok(Credits(1500)));
        assert_eq!("0".parse::<Credits>(), Ok(Credits::ZERO));
        assert!(matches!(
            "-5".parse::<Credits>(),
            Err(CreditsError::Negative(-5))
        ));
        assert!(matches!(
            "12abc".parse::<Credits>(),
            Err(CreditsError::NotANumber(_))
        ));
        assert!(matches!(
            "999999999999999999999999999999999999999999".parse::<Credits>(),
            Err(CreditsError::TooLarge(_))
        ));
        assert!(matches!(
            "1000000000000000001".parse::<Credits>(),
            Err(CreditsError::TooLarge(_))
        ));
        assert_eq!(Credits::positive(0), Err(CreditsError::Zero));
        assert_eq!(
            Credits::MAX.checked_add(Credits(1)),
            Err(CreditsError::Overflow)
        );
        assert_eq!(Credits::from_i64(-1), Err(CreditsError::Negative(-1)));
    }

    #[test]
    fn serde_rejects_negative_and_huge() {
        #[derive(Deserialize)]
        struct W {
            c: Credits,
        }
        let ok: W = toml::from_str("c = 10").expect("10 parses");
        assert_eq!(ok.c, Credits(10));
        assert!(toml::from_str::<W>("c = -1").is_err());
        assert!(toml::from_str::<W>("c = 9223372036854775807").is_err());
    }
}
