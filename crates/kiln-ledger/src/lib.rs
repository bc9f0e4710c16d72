//! The credit ledger: grants, reservations and the append-only journal, on PostgreSQL or
//! SQLite. `ops` holds every operation as a function of an open transaction, so a caller
//! (kiln-jobs' enqueue) can reserve credits in the same transaction that enqueues a job;
//! `Ledger` wraps each operation in a transaction of its own for everyone else. Credits only:
//! the job queue is kiln-jobs'.

mod audit;
mod db;
mod error;
mod ops;
pub mod plan;
mod readers;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

pub use audit::{Breach, audit};
pub use db::{Backend, Db, DbOptions, Schema, Tx};
pub use error::LedgerError;
pub use kiln_core::CreditsError;
pub use kiln_core::{AccountId, Action, CreditKind, Credits, PlanId, Pricing, Timestamp};
pub use ops::{
    Ctx, DEFAULT_HOLD_MS, HOLD_MS_RANGE, RESERVED_KEY_PREFIXES, Totals, account,
    account_by_api_key, admin_grant, balance, charge, check_caller_key, check_key, commit,
    create_account, create_hold, credit_flows, due_accounts, due_holds, expire_hold, grants, hold,
    journal, open_holds, optimistic, quote, release, renew, reservation, reserve, reserve_locked,
    resolve_hold, set_plan, topup, totals,
};
pub use readers::{Held, ReadDb, Taken};
pub use types::{
    Account, Balance, CreatedAccount, EntryType, Grant, GrantId, Hold, HoldId, HoldStatus,
    JournalEntry, JournalPage, KindBalance, NewAccount, Operation, Quote, Reservation,
    ReservationId, ReservationState,
};

/// Where the ledger reads the time. Production uses the system clock; tests move a manual one.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(start.millis())))
    }

    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

/// What one scheduled renewal pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RenewReport {
    pub renewed: usize,
    pub failed: Vec<(AccountId, String)>,
}

/// The ledger with its own transactions: each method is one atomic operation.
#[derive(Debug, Clone)]
pub struct Ledger {
    db: Db,
    pricing: Arc<Pricing>,
    clock: Arc<dyn Clock>,
}

/// Runs one `ops` function in a transaction of its own, committing only on success.
macro_rules! in_tx {
    ($self:ident, $begin:ident, |$tx:ident, $ctx:ident| $call:expr) => {{
        let mut tx = $self.db.$begin().await?;
        let $ctx = $self.ctx();
        let $tx = &mut tx;
        let out = $call.await?;
        tx.commit().await?;
        Ok::<_, LedgerError>(out)
    }};
}

impl Ledger {
    pub fn new(db: Db, pricing: Arc<Pricing>, clock: Arc<dyn Clock>) -> Ledger {
        Ledger { db, pricing, clock }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn pricing(&self) -> &Pricing {
        &self.pricing
    }

    /// The context for `ops` calls made in a caller's own transaction.
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx {
            pricing: &self.pricing,
            now: self.clock.now(),
        }
    }

    pub async fn create_account(&self, new: NewAccount) -> Result<CreatedAccount, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::create_account(tx, &ctx, &new))
    }

    pub async fn account(&self, id: AccountId) -> Result<Account, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::account(tx, id))
    }

    pub async fn account_by_api_key(&self, key: &str) -> Result<Option<Account>, LedgerError> {
        ops::account_by_api_key(self.db(), key).await
    }

    pub async fn quote(&self, id: AccountId, action: Action) -> Result<Quote, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::quote(tx, &ctx, id, action))
    }

    pub async fn reserve(
        &self,
        id: AccountId,
        action: Action,
        key: &str,
    ) -> Result<Reservation, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::reserve(
            tx, &ctx, id, action, key
        ))
    }

    pub async fn charge(
        &self,
        id: AccountId,
        action: Action,
        key: &str,
    ) -> Result<Reservation, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::charge(
            tx, &ctx, id, action, key
        ))
    }

    pub async fn commit(&self, id: ReservationId) -> Result<Reservation, LedgerError> {
        // On PostgreSQL a commit is one statement: run it without BEGIN/COMMIT round trips.
        if let Db::Postgres(pool) = &self.db {
            let mut conn = pool.acquire().await?;
            if let Some(r) = ops::commit_pg(&mut conn, self.clock.now(), id).await? {
                return Ok(r);
            }
        }
        in_tx!(self, begin, |tx, ctx| ops::commit(tx, &ctx, id))
    }

    pub async fn release(&self, id: ReservationId) -> Result<Reservation, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::release(tx, &ctx, id))
    }

    pub async fn reservation(&self, id: ReservationId) -> Result<Reservation, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::reservation(tx, id))
    }

    pub async fn topup(
        &self,
        id: AccountId,
        pack: &str,
        payment_ref: &str,
    ) -> Result<Grant, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::topup(
            tx,
            &ctx,
            id,
            pack,
            payment_ref
        ))
    }

    /// Operator: moves the account to another plan ([`ops::set_plan`]).
    pub async fn set_plan(
        &self,
        id: AccountId,
        plan: PlanId,
        allowance: Option<Credits>,
    ) -> Result<Account, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::set_plan(
            tx, &ctx, id, plan, allowance
        ))
    }

    /// Operator: grants credits that never expire, idempotent by `reference`.
    pub async fn admin_grant(
        &self,
        id: AccountId,
        amount: Credits,
        reference: &str,
    ) -> Result<Grant, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::admin_grant(
            tx, &ctx, id, amount, reference
        ))
    }

    /// Books due expiries and grants the current cycle's allowance if it is missing.
    pub async fn renew(&self, id: AccountId) -> Result<Vec<Grant>, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::renew(tx, &ctx, id))
    }

    /// Renews every account that is due, one transaction each. One account that cannot be
    /// renewed does not stop the others; it is reported.
    pub async fn renew_due(&self, limit: u32) -> Result<RenewReport, LedgerError> {
        let due: Vec<AccountId> = in_tx!(self, begin_read, |tx, ctx| ops::due_accounts(
            tx, ctx.now, limit
        ))?;
        let mut report = RenewReport::default();
        for id in due {
            match self.renew(id).await {
                Ok(_) => report.renewed += 1,
                Err(e @ (LedgerError::Database(_) | LedgerError::Io(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(account_id = %id, error = %e, "renewal failed");
                    report.failed.push((id, e.to_string()));
                }
            }
        }
        Ok(report)
    }

    /// A hold for a tool call (`true` when new; the same key again returns the same hold).
    pub async fn create_hold(
        &self,
        id: AccountId,
        action: Action,
        key: &str,
        expires_in_ms: Option<i64>,
    ) -> Result<(Hold, bool), LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::create_hold(
            tx,
            &ctx,
            id,
            action,
            key,
            expires_in_ms
        ))
    }

    /// The account's hold `hold` (`account` `None`: anyone's).
    pub async fn hold(
        &self,
        account: Option<AccountId>,
        hold: HoldId,
    ) -> Result<Hold, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::hold(tx, account, hold))
    }

    /// Captures or voids a hold, once ([`ops::resolve_hold`]).
    pub async fn resolve_hold(
        &self,
        account: AccountId,
        hold: HoldId,
        to: HoldStatus,
    ) -> Result<Hold, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::resolve_hold(
            tx, &ctx, account, hold, to
        ))
    }

    /// Expires every hold past its expiry that nobody resolved, one transaction each, at most
    /// `limit`. Returns how many this call expired: with several processes doing the same, each
    /// hold is expired by exactly one of them.
    pub async fn expire_holds(&self, limit: u32) -> Result<u32, LedgerError> {
        let due = in_tx!(self, begin_read, |tx, ctx| ops::due_holds(
            tx, ctx.now, limit
        ))?;
        let mut expired = 0;
        for id in due {
            if in_tx!(self, begin, |tx, ctx| ops::expire_hold(tx, &ctx, id))? {
                tracing::info!(hold_id = %id, "hold expired: credits released");
                expired += 1;
            }
        }
        Ok(expired)
    }

    pub async fn balance(&self, id: AccountId) -> Result<Balance, LedgerError> {
        in_tx!(self, begin, |tx, ctx| ops::balance(tx, &ctx, id))
    }

    pub async fn journal(
        &self,
        id: AccountId,
        after: Option<i64>,
        limit: u32,
    ) -> Result<JournalPage, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::journal(
            tx, id, after, limit
        ))
    }

    /// The stored totals, read without renewing or booking expiries.
    pub async fn totals(&self, id: AccountId) -> Result<Totals, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::totals(tx, id))
    }

    pub async fn grants(&self, id: AccountId) -> Result<Vec<Grant>, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| ops::grants(tx, id))
    }

    /// Checks every invariant on the whole database; empty means clean.
    pub async fn audit(&self) -> Result<Vec<Breach>, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| audit::audit(tx, None))
    }

    pub async fn audit_account(&self, id: AccountId) -> Result<Vec<Breach>, LedgerError> {
        in_tx!(self, begin_read, |tx, _ctx| audit::audit(tx, Some(id)))
    }
}
