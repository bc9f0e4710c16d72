//! The ledger's one error type. Callers match on the business variants; the database ones are
//! infrastructure failures to retry or report.

use kiln_core::{AccountId, Credits, CreditsError, PlanId};

use crate::{HoldId, HoldStatus, ReservationId, ReservationState};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    #[error("reservation {0} not found")]
    ReservationNotFound(ReservationId),
    #[error("insufficient credits: {needed} needed, {available} available, {shortfall} short")]
    InsufficientCredits {
        needed: Credits,
        available: Credits,
        shortfall: Credits,
    },
    #[error("idempotency key {key:?} was already used for a different request ({existing})")]
    IdempotencyConflict { key: String, existing: String },
    #[error("payment reference {0:?} was already used for a different top-up")]
    PaymentRefConflict(String),
    #[error("reservation {id} is already {state}")]
    AlreadyResolved {
        id: ReservationId,
        state: ReservationState,
    },
    #[error("hold {0} not found")]
    HoldNotFound(HoldId),
    #[error("hold {id} is already {status}")]
    HoldResolved { id: HoldId, status: HoldStatus },
    #[error("hold {0} has expired: its credits went back and it can no longer be captured")]
    HoldExpired(HoldId),
    #[error("expires_in_s must be between {min_s} and {max_s} seconds")]
    BadHoldExpiry { min_s: i64, max_s: i64 },
    #[error("unknown top-up pack {pack:?}; expected one of: {expected}")]
    UnknownPack { pack: String, expected: String },
    #[error("the {0} plan needs a monthly allowance (--allowance)")]
    AllowanceRequired(PlanId),
    #[error(
        "the {0} plan's allowance comes from the price list; only enterprise accounts set their own"
    )]
    AllowanceNotAllowed(PlanId),
    #[error("{what} must be 1-200 printable characters")]
    BadKey { what: &'static str },
    #[error(
        "idempotency key {0:?} begins with kit: or hold:, which kiln keeps for the keys of kit orders and holds"
    )]
    ReservedKey(String),
    #[error(transparent)]
    InvalidAmount(#[from] CreditsError),
    #[error("database URL must start with postgres://, postgresql:// or sqlite: (got {0:?})")]
    BadDatabaseUrl(String),
    #[error("there is no database at {0}: run `kiln migrate` first")]
    NoDatabase(String),
    #[error("stored ledger data is inconsistent: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
