//! Identifiers. ULIDs sort by creation time and are what apalis uses for task ids, so kiln
//! uses the same kind everywhere.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {what} id: {value:?}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
}

/// An account. Displayed and stored as its 26-character ULID.
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
#[schema(value_type = String, example = "01KBG8N7ZQ3W5Y6X9R2T4V8M1C")]
pub struct AccountId(Ulid);

impl AccountId {
    pub fn new() -> AccountId {
        AccountId(Ulid::generate())
    }
}

impl Default for AccountId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for AccountId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s.trim())
            .map(AccountId)
            .map_err(|_| IdError {
                what: "account",
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
