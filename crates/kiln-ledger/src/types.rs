//! What the ledger hands out. Plain data, serialisable as the API and CLI show it.

use std::fmt;

use kiln_core::{AccountId, Action, CreditKind, Credits, PlanId, Timestamp};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct GrantId(pub i64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct ReservationId(pub i64);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    Held,
    Committed,
    Released,
}

impl ReservationState {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "held",
            ReservationState::Committed => "committed",
            ReservationState::Released => "released",
        }
    }
}

impl fmt::Display for ReservationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a reservation was made: a hold to resolve later, or a charge committed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Reserve,
    Charge,
}

impl Operation {
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Reserve => "reserve",
            Operation::Charge => "charge",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Account {
    pub id: AccountId,
    pub email: Option<String>,
    pub plan: PlanId,
    pub is_admin: bool,
    /// Enterprise accounts' negotiated allowance.
    pub monthly_allowance: Option<Credits>,
    pub cycle_anchor: Timestamp,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAccount {
    pub plan: PlanId,
    pub is_admin: bool,
    pub email: Option<String>,
    pub monthly_allowance: Option<Credits>,
}

/// A new account and its API key, which is shown this once and stored only as a hash.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedAccount {
    #[serde(flatten)]
    pub account: Account,
    pub api_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Grant {
    pub id: GrantId,
    pub account_id: AccountId,
    pub kind: CreditKind,
    pub amount: Credits,
    pub remaining: Credits,
    pub expired: Credits,
    pub granted_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: ReservationId,
    pub account_id: AccountId,
    pub idempotency_key: String,
    pub operation: Operation,
    pub action: Action,
    /// Credits held or charged: 0 for exempt (admin) accounts.
    pub amount: Credits,
    /// What the action costs on the price list.
    pub list_price: Credits,
    pub exempt: bool,
    pub state: ReservationState,
    pub created_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct KindBalance {
    pub kind: CreditKind,
    pub remaining: Credits,
    pub expires_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Balance {
    pub available: Credits,
    pub held: Credits,
    pub committed: Credits,
    pub expired: Credits,
    pub granted: Credits,
    /// Spendable credits by kind and expiry date, in burn-down order.
    pub by_kind: Vec<KindBalance>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Quote {
    pub action: Action,
    pub cost: Credits,
    pub list_price: Credits,
    pub available: Credits,
    pub affordable: bool,
    pub shortfall: Credits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    Grant,
    Reserve,
    Commit,
    Release,
    Expire,
}

impl EntryType {
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryType::Grant => "grant",
            EntryType::Reserve => "reserve",
            EntryType::Commit => "commit",
            EntryType::Release => "release",
            EntryType::Expire => "expire",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JournalEntry {
    pub seq: i64,
    pub at: Timestamp,
    pub entry: EntryType,
    pub amount: Credits,
    pub kind: Option<CreditKind>,
    pub grant_id: Option<GrantId>,
    pub reservation_id: Option<ReservationId>,
    pub action: Option<Action>,
    pub list_price: Option<Credits>,
    pub reference: Option<String>,
    pub available_after: Credits,
    pub held_after: Credits,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JournalPage {
    pub entries: Vec<JournalEntry>,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next_after: Option<i64>,
}

/// A hold for a tool call. Displayed and stored as its 26-character ULID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct HoldId(ulid::Ulid);

impl HoldId {
    pub fn generate() -> HoldId {
        HoldId(ulid::Ulid::generate())
    }
}

impl std::str::FromStr for HoldId {
    type Err = kiln_core::IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s.trim())
            .map(HoldId)
            .map_err(|_| kiln_core::IdError {
                what: "hold",
                value: s.to_owned(),
            })
    }
}

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a hold stands. Only `Held` moves, and only once: to `Captured` (its reservation
/// committed), `Voided` (released on request) or `Expired` (released by maintenance at its
/// expiry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Held,
    Captured,
    Voided,
    Expired,
}

impl HoldStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Held => "held",
            HoldStatus::Captured => "captured",
            HoldStatus::Voided => "voided",
            HoldStatus::Expired => "expired",
        }
    }

    /// The state the hold's reservation must be in.
    pub const fn reservation_state(self) -> ReservationState {
        match self {
            HoldStatus::Held => ReservationState::Held,
            HoldStatus::Captured => ReservationState::Committed,
            HoldStatus::Voided | HoldStatus::Expired => ReservationState::Released,
        }
    }
}

impl fmt::Display for HoldStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HoldStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "held" => HoldStatus::Held,
            "captured" => HoldStatus::Captured,
            "voided" => HoldStatus::Voided,
            "expired" => HoldStatus::Expired,
            _ => return Err(()),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Hold {
    pub id: HoldId,
    pub account_id: AccountId,
    pub idempotency_key: String,
    pub action: Action,
    /// Credits held, then charged on capture: 0 for exempt (admin) accounts.
    pub amount: Credits,
    pub list_price: Credits,
    pub status: HoldStatus,
    pub reservation_id: ReservationId,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
}
