//! Every ledger operation as a function of an open transaction. Each one that changes credits
//! locks the account row (PostgreSQL `FOR UPDATE`; SQLite's transactions already hold the write
//! lock), so all changes to one account are serialised. Lock order, on PostgreSQL:
//! - reserve, charge, top-ups, renewals: the account, then its grants (the new reservation row
//!   is inserted, so nobody else can be waiting for it);
//! - commit and release of an existing reservation: the reservation, then the account, then (a
//!   release) its grants — and what resolves it locks its owner first: a kit job's row, or a
//!   hold's row.
//!
//! So the order is always owner (job or hold) → reservation → account → grants, and no path
//! locks an existing reservation, job or hold while it holds an account. A transaction that
//! resolves several reservations of one account must not hold the first one's account while it
//! locks the next job: kiln-jobs' reconciler gives each repair its own transaction for that
//! reason (one transaction for all of them deadlocked against a worker). The decisions are made
//! by pure functions (`plan`); these modules load, call them and save:
//!
//! - `accounts`: open, read, quote, balance
//! - `reserve`: holds drawn in burn-down order (the locking path), idempotent by key
//! - `optimistic`: PostgreSQL's lock-free reserve (one read, one guarded write)
//! - `resolve`: commit and release, each at most once
//! - `holds`: holds for tool calls: a reservation with an expiry, captured or voided once
//! - `grants`: grants, renewal on access and by schedule, top-ups
//! - `journal`: the locked account, its totals and journal entries, saved together; the journal read
//! - `rows`: stored rows and their parsing

mod accounts;
mod grants;
mod holds;
mod journal;
pub mod optimistic;
mod reserve;
mod resolve;
mod rows;

use kiln_core::{Pricing, Timestamp};

use crate::LedgerError;

pub use accounts::{account, account_by_api_key, balance, create_account, quote, set_plan, totals};
pub use grants::{admin_grant, due_accounts, grants, renew, topup};
pub use holds::{
    DEFAULT_HOLD_MS, HOLD_MS_RANGE, create_hold, credit_flows, due_holds, expire_hold, hold,
    open_holds, resolve_hold,
};
pub use journal::{Totals, journal};
pub use reserve::{
    RESERVED_KEY_PREFIXES, charge, check_caller_key, reservation, reserve, reserve_locked,
};
pub(crate) use resolve::commit_pg;
pub use resolve::{commit, release};

/// What the ledger's submodules share: its rows, the locked account and each other's helpers.
mod prelude {
    pub(crate) use std::str::FromStr;

    pub(crate) use kiln_core::{
        AccountId, Action, CreditKind, Credits, PlanId, Pricing, Timestamp, billing_cycle,
    };
    pub(crate) use sha2::{Digest, Sha256};

    pub(crate) use super::{Ctx, Result, check_key, commit, release};
    pub(crate) use super::{
        accounts::*, grants::*, journal::*, optimistic::*, reserve::*, rows::*,
    };
    pub(crate) use crate::Tx;
    pub(crate) use crate::plan::{self, OpenGrant};
    pub(crate) use crate::{
        Account, Balance, CreatedAccount, EntryType, Grant, GrantId, JournalEntry, JournalPage,
        KindBalance, LedgerError, NewAccount, Operation, Quote, Reservation, ReservationId,
        ReservationState,
    };
    pub(crate) use crate::{Db, on_pool, on_tx};
}

/// What every operation needs besides the transaction: the price list and the time.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub pricing: &'a Pricing,
    pub now: Timestamp,
}

pub(crate) type Result<T> = std::result::Result<T, LedgerError>;

/// An idempotency key, email or payment reference: 1-200 printable characters. The one check,
/// for every kind of key (kiln-jobs checks kit keys with it too).
pub fn check_key(key: &str, what: &'static str) -> Result<()> {
    let ok = (1..=200).contains(&key.chars().count()) && key.chars().all(|c| !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadKey { what })
    }
}
