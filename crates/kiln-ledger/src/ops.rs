//! Every ledger operation as a function of an open transaction. Each one that changes credits
//! first locks the account row (PostgreSQL `FOR UPDATE`; SQLite's transactions already hold
//! the write lock), so all changes to one account are serialised and the lock order is always
//! account, then reservation, then grants. The decisions are made by pure functions (`plan`);
//! this module loads, calls them and saves.

use std::str::FromStr;

use kiln_core::{
    AccountId, Action, CreditKind, Credits, PlanId, Pricing, Timestamp, billing_cycle,
};
use sha2::{Digest, Sha256};

use crate::db::{Tx, on_tx};
use crate::plan::{self, OpenGrant};
use crate::{
    Account, Balance, CreatedAccount, EntryType, Grant, GrantId, JournalEntry, JournalPage,
    KindBalance, LedgerError, NewAccount, Operation, Quote, Reservation, ReservationId,
    ReservationState,
};

/// What every operation needs besides the transaction: the price list and the time.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub pricing: &'a Pricing,
    pub now: Timestamp,
}

type Result<T> = std::result::Result<T, LedgerError>;

// ---------------------------------------------------------------------------------------------
// Rows and their conversion into domain types. A stored value that does not parse is reported
// as corruption, never clamped.

#[derive(sqlx::FromRow)]
struct AccountRow {
    id: String,
    email: Option<String>,
    plan: String,
    is_admin: bool,
    monthly_allowance: Option<i64>,
    cycle_anchor_ms: i64,
    renewed_cycle_ms: Option<i64>,
    next_renewal_ms: Option<i64>,
    created_at_ms: i64,
    granted: i64,
    held: i64,
    committed: i64,
    expired: i64,
    journal_seq: i64,
}

#[derive(sqlx::FromRow)]
struct GrantRow {
    id: i64,
    account_id: String,
    kind: String,
    amount: i64,
    remaining: i64,
    expired: i64,
    granted_at_ms: i64,
    expires_at_ms: Option<i64>,
    source: String,
    fingerprint: String,
}

#[derive(sqlx::FromRow)]
struct ReservationRow {
    id: i64,
    account_id: String,
    idempotency_key: String,
    operation: String,
    action: String,
    amount: i64,
    list_price: i64,
    exempt: bool,
    state: String,
    created_at_ms: i64,
    resolved_at_ms: Option<i64>,
}

/// An open grant's columns, prefixed `g_` so they can sit beside an account's in one row.
#[derive(sqlx::FromRow)]
struct GrantColumns {
    g_id: Option<i64>,
    g_kind: Option<String>,
    g_remaining: Option<i64>,
    g_granted_at_ms: Option<i64>,
    g_expires_at_ms: Option<i64>,
}

impl GrantColumns {
    /// `None` for the row a LEFT JOIN makes when the account has no open grant.
    fn into_open_grant(self) -> Option<Result<OpenGrant>> {
        let (id, kind, remaining, granted_at) = (
            self.g_id?,
            self.g_kind?,
            self.g_remaining?,
            self.g_granted_at_ms?,
        );
        Some((|| {
            Ok(OpenGrant {
                id: GrantId(id),
                kind: parse(&kind, "grant kind")?,
                remaining: credits(remaining, "grant remaining")?,
                granted_at: ts(granted_at),
                expires_at: self.g_expires_at_ms.map(ts),
            })
        })())
    }
}

/// An idempotency-key lookup and the account's open grants, in one round trip.
#[derive(sqlx::FromRow)]
struct KeyAndGrantRow {
    existing: Option<i64>,
    #[sqlx(flatten)]
    grant: GrantColumns,
}

const KEY_AND_GRANTS: &str = "SELECT \
    (SELECT r.id FROM reservations r WHERE r.account_id = $1 AND r.idempotency_key = $2) AS existing, \
    g.id AS g_id, g.kind AS g_kind, g.remaining AS g_remaining, g.granted_at_ms AS g_granted_at_ms, \
    g.expires_at_ms AS g_expires_at_ms \
    FROM (SELECT 1 AS one) AS x LEFT JOIN grants g ON g.account_id = $1 AND g.remaining > 0";

#[derive(sqlx::FromRow)]
struct PartRow {
    grant_id: i64,
    amount: i64,
    expires_at_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct JournalRow {
    seq: i64,
    at_ms: i64,
    entry: String,
    amount: i64,
    kind: Option<String>,
    grant_id: Option<i64>,
    reservation_id: Option<i64>,
    action: Option<String>,
    list_price: Option<i64>,
    reference: Option<String>,
    available_after: i64,
    held_after: i64,
}

fn parse<T: FromStr>(s: &str, what: &str) -> Result<T> {
    s.parse()
        .map_err(|_| LedgerError::Corrupt(format!("stored {what} {s:?} does not parse")))
}

fn credits(n: i64, what: &str) -> Result<Credits> {
    Credits::from_i64(n).map_err(|e| LedgerError::Corrupt(format!("stored {what} {n}: {e}")))
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn parse_state(s: &str) -> Result<ReservationState> {
    Ok(match s {
        "held" => ReservationState::Held,
        "committed" => ReservationState::Committed,
        "released" => ReservationState::Released,
        other => return Err(LedgerError::Corrupt(format!("reservation state {other:?}"))),
    })
}

fn parse_operation(s: &str) -> Result<Operation> {
    Ok(match s {
        "reserve" => Operation::Reserve,
        "charge" => Operation::Charge,
        other => {
            return Err(LedgerError::Corrupt(format!(
                "reservation operation {other:?}"
            )));
        }
    })
}

fn parse_entry(s: &str) -> Result<EntryType> {
    Ok(match s {
        "grant" => EntryType::Grant,
        "reserve" => EntryType::Reserve,
        "commit" => EntryType::Commit,
        "release" => EntryType::Release,
        "expire" => EntryType::Expire,
        other => return Err(LedgerError::Corrupt(format!("journal entry {other:?}"))),
    })
}

impl GrantRow {
    fn into_grant(self) -> Result<Grant> {
        Ok(Grant {
            id: GrantId(self.id),
            account_id: parse(&self.account_id, "account id")?,
            kind: parse(&self.kind, "grant kind")?,
            amount: credits(self.amount, "grant amount")?,
            remaining: credits(self.remaining, "grant remaining")?,
            expired: credits(self.expired, "grant expired")?,
            granted_at: ts(self.granted_at_ms),
            expires_at: self.expires_at_ms.map(ts),
            source: self.source,
        })
    }
}

impl ReservationRow {
    fn into_reservation(self) -> Result<Reservation> {
        Ok(Reservation {
            id: ReservationId(self.id),
            account_id: parse(&self.account_id, "account id")?,
            idempotency_key: self.idempotency_key,
            operation: parse_operation(&self.operation)?,
            action: parse(&self.action, "action")?,
            amount: credits(self.amount, "reservation amount")?,
            list_price: credits(self.list_price, "list price")?,
            exempt: self.exempt,
            state: parse_state(&self.state)?,
            created_at: ts(self.created_at_ms),
            resolved_at: self.resolved_at_ms.map(ts),
        })
    }
}

impl JournalRow {
    fn into_entry(self) -> Result<JournalEntry> {
        Ok(JournalEntry {
            seq: self.seq,
            at: ts(self.at_ms),
            entry: parse_entry(&self.entry)?,
            amount: credits(self.amount, "journal amount")?,
            kind: self
                .kind
                .as_deref()
                .map(|k| parse(k, "grant kind"))
                .transpose()?,
            grant_id: self.grant_id.map(GrantId),
            reservation_id: self.reservation_id.map(ReservationId),
            action: self
                .action
                .as_deref()
                .map(|a| parse(a, "action"))
                .transpose()?,
            list_price: self
                .list_price
                .map(|p| credits(p, "list price"))
                .transpose()?,
            reference: self.reference,
            available_after: credits(self.available_after, "journal available")?,
            held_after: credits(self.held_after, "journal held")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A locked account being worked on: its totals change in memory and are saved, with the journal
// entries that explain each change, in `save`.

/// An account's running totals. `granted = available + held + committed + expired` always.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub granted: Credits,
    pub held: Credits,
    pub committed: Credits,
    pub expired: Credits,
}

impl Totals {
    pub fn available(&self) -> Credits {
        self.granted
            .saturating_sub(self.held)
            .saturating_sub(self.committed)
            .saturating_sub(self.expired)
    }
}

struct NewEntry {
    entry: EntryType,
    amount: Credits,
    kind: Option<CreditKind>,
    grant_id: Option<GrantId>,
    reservation_id: Option<ReservationId>,
    action: Option<Action>,
    list_price: Option<Credits>,
    reference: Option<String>,
    available_after: Credits,
    held_after: Credits,
}

impl NewEntry {
    fn new(entry: EntryType, amount: Credits) -> NewEntry {
        NewEntry {
            entry,
            amount,
            kind: None,
            grant_id: None,
            reservation_id: None,
            action: None,
            list_price: None,
            reference: None,
            available_after: Credits::ZERO,
            held_after: Credits::ZERO,
        }
    }

    fn for_grant(entry: EntryType, amount: Credits, grant: GrantId, kind: CreditKind) -> NewEntry {
        NewEntry {
            kind: Some(kind),
            grant_id: Some(grant),
            ..NewEntry::new(entry, amount)
        }
    }

    fn for_reservation(entry: EntryType, r: &Reservation) -> NewEntry {
        NewEntry {
            reservation_id: Some(r.id),
            action: Some(r.action),
            list_price: Some(r.list_price),
            reference: Some(r.idempotency_key.clone()),
            ..NewEntry::new(entry, r.amount)
        }
    }
}

struct Locked {
    account: Account,
    renewed_cycle: Option<Timestamp>,
    next_renewal: Option<Timestamp>,
    totals: Totals,
    journal_seq: i64,
    entries: Vec<NewEntry>,
}

fn corrupt_sub(what: &str) -> LedgerError {
    LedgerError::Corrupt(format!("{what} would go negative"))
}

impl Locked {
    fn from_row(row: AccountRow) -> Result<Locked> {
        Ok(Locked {
            account: Account {
                id: parse(&row.id, "account id")?,
                email: row.email,
                plan: parse(&row.plan, "plan")?,
                is_admin: row.is_admin,
                monthly_allowance: row
                    .monthly_allowance
                    .map(|a| credits(a, "allowance"))
                    .transpose()?,
                cycle_anchor: ts(row.cycle_anchor_ms),
                created_at: ts(row.created_at_ms),
            },
            renewed_cycle: row.renewed_cycle_ms.map(ts),
            next_renewal: row.next_renewal_ms.map(ts),
            totals: Totals {
                granted: credits(row.granted, "granted")?,
                held: credits(row.held, "held")?,
                committed: credits(row.committed, "committed")?,
                expired: credits(row.expired, "expired")?,
            },
            journal_seq: row.journal_seq,
            entries: Vec::new(),
        })
    }

    fn record(&mut self, mut e: NewEntry) {
        e.available_after = self.totals.available();
        e.held_after = self.totals.held;
        self.entries.push(e);
    }

    fn granted(&mut self, g: &Grant) -> Result<()> {
        self.totals.granted = self.totals.granted.checked_add(g.amount)?;
        let mut e = NewEntry::for_grant(EntryType::Grant, g.amount, g.id, g.kind);
        e.reference = Some(g.source.clone());
        self.record(e);
        Ok(())
    }

    fn expired(&mut self, grant: GrantId, kind: Option<CreditKind>, amount: Credits) -> Result<()> {
        self.totals.expired = self.totals.expired.checked_add(amount)?;
        self.record(NewEntry {
            kind,
            grant_id: Some(grant),
            ..NewEntry::new(EntryType::Expire, amount)
        });
        Ok(())
    }

    fn reserved(&mut self, r: &Reservation) -> Result<()> {
        self.totals.held = self.totals.held.checked_add(r.amount)?;
        self.record(NewEntry::for_reservation(EntryType::Reserve, r));
        Ok(())
    }

    /// A reservation stops being held (committed or released).
    fn unhold(&mut self, r: &Reservation) -> Result<()> {
        self.totals.held = self
            .totals
            .held
            .checked_sub(r.amount)
            .ok_or_else(|| corrupt_sub("held"))?;
        Ok(())
    }

    /// A new reservation: held, and for a charge committed at once.
    fn held_for(&mut self, r: &Reservation) -> Result<()> {
        self.reserved(r)?;
        if r.state == ReservationState::Committed {
            self.committed(r)?;
        }
        Ok(())
    }

    fn committed(&mut self, r: &Reservation) -> Result<()> {
        self.unhold(r)?;
        self.totals.committed = self.totals.committed.checked_add(r.amount)?;
        self.record(NewEntry::for_reservation(EntryType::Commit, r));
        Ok(())
    }

    fn released(&mut self, r: &Reservation) -> Result<()> {
        self.unhold(r)?;
        self.record(NewEntry::for_reservation(EntryType::Release, r));
        Ok(())
    }

    /// The monthly allowance this account is granted each cycle, if any.
    fn allowance(&self, pricing: &Pricing) -> Option<Credits> {
        match self.account.plan {
            PlanId::Enterprise => self
                .account
                .monthly_allowance
                .or(pricing.plan(PlanId::Enterprise).monthly_credits),
            plan => pricing.plan(plan).monthly_credits,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL. Placeholders are `$n` on both databases (sqlx-sqlite binds `$n` by position).

const LOCK_ACCOUNT_PG: &str = "SELECT * FROM accounts WHERE id = $1 FOR UPDATE";
// SQLite writers hold the database write lock from BEGIN IMMEDIATE on.
const LOCK_ACCOUNT_SQLITE: &str = "SELECT * FROM accounts WHERE id = $1";

async fn lock(tx: &mut Tx, id: AccountId) -> Result<Locked> {
    let id_s = id.to_string();
    let row: Option<AccountRow> = match tx {
        Tx::Postgres(c) => {
            sqlx::query_as(LOCK_ACCOUNT_PG)
                .bind(&id_s)
                .fetch_optional(&mut **c)
                .await?
        }
        Tx::Sqlite(c) => {
            sqlx::query_as(LOCK_ACCOUNT_SQLITE)
                .bind(&id_s)
                .fetch_optional(&mut **c)
                .await?
        }
    };
    Locked::from_row(row.ok_or(LedgerError::AccountNotFound(id))?)
}

const UPDATE_ACCOUNT: &str = "UPDATE accounts SET granted = $2, held = $3, committed = $4, expired = $5, \
    journal_seq = $6, renewed_cycle_ms = $7, next_renewal_ms = $8 WHERE id = $1";

const INSERT_JOURNAL: &str = "INSERT INTO journal (account_id, seq, at_ms, entry, amount, kind, grant_id, \
    reservation_id, action, list_price, reference, available_after, held_after) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

// PostgreSQL: the journal entries and the totals in one statement, whatever the number of entries.
const SAVE_PG: &str = "WITH j AS (INSERT INTO journal (account_id, seq, at_ms, entry, amount, kind, grant_id, \
    reservation_id, action, list_price, reference, available_after, held_after) \
    SELECT $1, e.seq, $9, e.entry, e.amount, e.kind, e.grant_id, e.reservation_id, e.action, e.list_price, \
    e.reference, e.available_after, e.held_after \
    FROM UNNEST($10::bigint[], $11::text[], $12::bigint[], $13::text[], $14::bigint[], $15::bigint[], $16::text[], \
    $17::bigint[], $18::text[], $19::bigint[], $20::bigint[]) \
    AS e(seq, entry, amount, kind, grant_id, reservation_id, action, list_price, reference, available_after, held_after)) \
    UPDATE accounts SET granted = $2, held = $3, committed = $4, expired = $5, \
    journal_seq = $6, renewed_cycle_ms = $7, next_renewal_ms = $8 WHERE id = $1";

/// Binds `$1..=$8` of `UPDATE_ACCOUNT` / `SAVE_PG`.
macro_rules! bind_account {
    ($q:expr, $id:expr, $acct:expr) => {
        $q.bind($id)
            .bind($acct.totals.granted.as_i64())
            .bind($acct.totals.held.as_i64())
            .bind($acct.totals.committed.as_i64())
            .bind($acct.totals.expired.as_i64())
            .bind($acct.journal_seq)
            .bind($acct.renewed_cycle.map(Timestamp::millis))
            .bind($acct.next_renewal.map(Timestamp::millis))
    };
}

/// One field of every pending journal entry, as an array parameter for `UNNEST`.
fn column<'e, T>(entries: &'e [NewEntry], f: impl Fn(&'e NewEntry) -> T) -> Vec<T> {
    entries.iter().map(f).collect()
}

/// Writes the account's totals and appends its new journal entries.
async fn save(tx: &mut Tx, acct: &mut Locked, now: Timestamp) -> Result<()> {
    let id = acct.account.id.to_string();
    let entries = std::mem::take(&mut acct.entries);
    let seqs: Vec<i64> = (acct.journal_seq + 1..).take(entries.len()).collect();
    acct.journal_seq +=
        i64::try_from(entries.len()).map_err(|_| LedgerError::Corrupt("journal length".into()))?;
    match tx {
        Tx::Postgres(c) => {
            bind_account!(sqlx::query(SAVE_PG), &id, acct)
                .bind(now.millis())
                .bind(seqs)
                .bind(column(&entries, |e| e.entry.as_str()))
                .bind(column(&entries, |e| e.amount.as_i64()))
                .bind(column(&entries, |e| e.kind.map(CreditKind::as_str)))
                .bind(column(&entries, |e| e.grant_id.map(|g| g.0)))
                .bind(column(&entries, |e| e.reservation_id.map(|r| r.0)))
                .bind(column(&entries, |e| e.action.map(Action::as_str)))
                .bind(column(&entries, |e| e.list_price.map(Credits::as_i64)))
                .bind(column(&entries, |e| e.reference.as_deref()))
                .bind(column(&entries, |e| e.available_after.as_i64()))
                .bind(column(&entries, |e| e.held_after.as_i64()))
                .execute(&mut **c)
                .await?;
        }
        Tx::Sqlite(c) => {
            for (seq, e) in seqs.into_iter().zip(entries) {
                sqlx::query(INSERT_JOURNAL)
                    .bind(&id)
                    .bind(seq)
                    .bind(now.millis())
                    .bind(e.entry.as_str())
                    .bind(e.amount.as_i64())
                    .bind(e.kind.map(CreditKind::as_str))
                    .bind(e.grant_id.map(|g| g.0))
                    .bind(e.reservation_id.map(|r| r.0))
                    .bind(e.action.map(Action::as_str))
                    .bind(e.list_price.map(Credits::as_i64))
                    .bind(e.reference)
                    .bind(e.available_after.as_i64())
                    .bind(e.held_after.as_i64())
                    .execute(&mut **c)
                    .await?;
            }
            bind_account!(sqlx::query(UPDATE_ACCOUNT), &id, acct)
                .execute(&mut **c)
                .await?;
        }
    }
    Ok(())
}

async fn open_grants(tx: &mut Tx, id: AccountId) -> Result<Vec<OpenGrant>> {
    let rows: Vec<GrantRow> = on_tx!(tx, c => sqlx::query_as(
        "SELECT * FROM grants WHERE account_id = $1 AND remaining > 0",
    )
    .bind(id.to_string())
    .fetch_all(&mut **c)
    .await?);
    rows.into_iter()
        .map(|r| {
            let g = r.into_grant()?;
            Ok(OpenGrant {
                id: g.id,
                kind: g.kind,
                remaining: g.remaining,
                granted_at: g.granted_at,
                expires_at: g.expires_at,
            })
        })
        .collect()
}

async fn grant_by_source(tx: &mut Tx, source: &str) -> Result<Option<(Grant, String)>> {
    let row: Option<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE source = $1")
        .bind(source)
        .fetch_optional(&mut **c)
        .await?);
    row.map(|r| {
        let fp = r.fingerprint.clone();
        Ok((r.into_grant()?, fp))
    })
    .transpose()
}

struct GrantSpec<'a> {
    kind: CreditKind,
    amount: Credits,
    expires_at: Option<Timestamp>,
    source: &'a str,
    fingerprint: &'a str,
}

/// Inserts a grant unless one with the same source exists. Returns the new grant, or `None`
/// when the source was already used (the caller decides whether that is a replay or a conflict).
async fn insert_grant(
    tx: &mut Tx,
    acct: &mut Locked,
    now: Timestamp,
    spec: &GrantSpec<'_>,
) -> Result<Option<Grant>> {
    let id: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "INSERT INTO grants (account_id, kind, amount, remaining, granted_at_ms, expires_at_ms, source, fingerprint) \
         VALUES ($1, $2, $3, $3, $4, $5, $6, $7) ON CONFLICT (source) DO NOTHING RETURNING id",
    )
    .bind(acct.account.id.to_string())
    .bind(spec.kind.as_str())
    .bind(spec.amount.as_i64())
    .bind(now.millis())
    .bind(spec.expires_at.map(Timestamp::millis))
    .bind(spec.source)
    .bind(spec.fingerprint)
    .fetch_optional(&mut **c)
    .await?);
    let Some(id) = id else { return Ok(None) };
    let grant = Grant {
        id: GrantId(id),
        account_id: acct.account.id,
        kind: spec.kind,
        amount: spec.amount,
        remaining: spec.amount,
        expired: Credits::ZERO,
        granted_at: now,
        expires_at: spec.expires_at,
        source: spec.source.to_owned(),
    };
    acct.granted(&grant)?;
    Ok(Some(grant))
}

async fn exec_grant_update(
    tx: &mut Tx,
    sql: &'static str,
    grant: GrantId,
    amount: Credits,
) -> Result<()> {
    let done = on_tx!(tx, c => sqlx::query(sql).bind(grant.0).bind(amount.as_i64()).execute(&mut **c).await?
        .rows_affected());
    if done == 1 {
        Ok(())
    } else {
        Err(LedgerError::Corrupt(format!(
            "grant {grant} could not be updated ({sql})"
        )))
    }
}

const DRAW: &str = "UPDATE grants SET remaining = remaining - $2 WHERE id = $1 AND remaining >= $2";

const INSERT_RESERVATION: &str = "INSERT INTO reservations (account_id, idempotency_key, operation, action, amount, \
    list_price, exempt, state, created_at_ms, resolved_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id";
const INSERT_PART: &str =
    "INSERT INTO reservation_parts (reservation_id, seq, grant_id, amount) VALUES ($1, $2, $3, $4)";
// PostgreSQL: the draws from the grants, the reservation and its parts in one statement; it
// returns the reservation id and how many grants were drawn from.
const INSERT_RESERVATION_PG: &str = "WITH g AS (UPDATE grants SET remaining = remaining - d.amount \
    FROM UNNEST($11::bigint[], $12::bigint[]) AS d(id, amount) \
    WHERE grants.id = d.id AND grants.remaining >= d.amount RETURNING grants.id), \
    r AS (INSERT INTO reservations (account_id, idempotency_key, operation, \
    action, amount, list_price, exempt, state, created_at_ms, resolved_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id), \
    p AS (INSERT INTO reservation_parts (reservation_id, seq, grant_id, amount) \
    SELECT r.id, d.seq, d.grant_id, d.amount FROM r, UNNEST($11::bigint[], $12::bigint[]) WITH ORDINALITY AS d(grant_id, amount, seq)) \
    SELECT r.id, (SELECT COUNT(*) FROM g) AS drawn FROM r";
const RETURN: &str = "UPDATE grants SET remaining = remaining + $2 WHERE id = $1";
const EXPIRE_RETURNED: &str = "UPDATE grants SET expired = expired + $2 WHERE id = $1";
const EXPIRE_REMAINING: &str = "UPDATE grants SET expired = expired + remaining, remaining = 0 WHERE id = $1 AND remaining = $2";

async fn reservation_row(tx: &mut Tx, id: ReservationId) -> Result<Reservation> {
    let row: Option<ReservationRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM reservations WHERE id = $1")
        .bind(id.0)
        .fetch_optional(&mut **c)
        .await?);
    row.ok_or(LedgerError::ReservationNotFound(id))?
        .into_reservation()
}

// ---------------------------------------------------------------------------------------------
// On access: book expiries that are due and grant the current cycle's allowance if missing.

/// Brings the account up to `now` and returns its spendable grants.
async fn touch(tx: &mut Tx, ctx: &Ctx<'_>, acct: &mut Locked) -> Result<Vec<OpenGrant>> {
    let open = open_grants(tx, acct.account.id).await?;
    touch_with(tx, ctx, acct, open).await
}

/// `touch` with the account's open grants already loaded.
async fn touch_with(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    acct: &mut Locked,
    open: Vec<OpenGrant>,
) -> Result<Vec<OpenGrant>> {
    let mut live = Vec::new();
    for g in open {
        if g.is_expired(ctx.now) {
            exec_grant_update(tx, EXPIRE_REMAINING, g.id, g.remaining).await?;
            acct.expired(g.id, Some(g.kind), g.remaining)?;
        } else {
            live.push(g);
        }
    }
    if let Some(allowance) = acct.allowance(ctx.pricing) {
        let cycle = billing_cycle(acct.account.cycle_anchor, ctx.now);
        if acct.renewed_cycle.is_none_or(|r| r < cycle.start) {
            let source = format!("sub:{}:{}", acct.account.id, cycle.start.millis());
            let spec = GrantSpec {
                kind: CreditKind::Subscription,
                amount: allowance,
                expires_at: Some(cycle.end),
                source: &source,
                fingerprint: &source,
            };
            if let Some(g) = insert_grant(tx, acct, ctx.now, &spec).await? {
                live.push(OpenGrant {
                    id: g.id,
                    kind: g.kind,
                    remaining: g.remaining,
                    granted_at: g.granted_at,
                    expires_at: g.expires_at,
                });
            }
            acct.renewed_cycle = Some(cycle.start);
            acct.next_renewal = Some(cycle.end);
        }
    }
    Ok(live)
}

// ---------------------------------------------------------------------------------------------
// Operations.

pub(crate) fn check_key(key: &str, what: &'static str) -> Result<()> {
    let ok = (1..=200).contains(&key.chars().count()) && key.chars().all(|c| !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadKey { what })
    }
}

fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub async fn create_account(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    new: &NewAccount,
) -> Result<CreatedAccount> {
    match (new.plan, new.monthly_allowance) {
        (PlanId::Enterprise, None)
            if ctx
                .pricing
                .plan(PlanId::Enterprise)
                .monthly_credits
                .is_none() =>
        {
            return Err(LedgerError::AllowanceRequired(PlanId::Enterprise));
        }
        (PlanId::Enterprise, Some(a)) if a.is_zero() => {
            return Err(Credits::positive(0).unwrap_err().into());
        }
        (PlanId::Enterprise, _) | (_, None) => {}
        (plan, Some(_)) => return Err(LedgerError::AllowanceNotAllowed(plan)),
    }
    if let Some(email) = &new.email {
        check_key(email, "email")?;
    }
    let id = AccountId::new();
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret)
        .map_err(|e| LedgerError::Io(format!("no randomness for an API key: {e}")))?;
    let api_key = format!("kiln_{}", hex::encode(secret));
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO accounts (id, email, plan, is_admin, monthly_allowance, api_key_hash, cycle_anchor_ms, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
    )
    .bind(id.to_string())
    .bind(new.email.as_deref())
    .bind(new.plan.as_str())
    .bind(new.is_admin)
    .bind(new.monthly_allowance.map(Credits::as_i64))
    .bind(hash_api_key(&api_key))
    .bind(ctx.now.millis())
    .execute(&mut **c)
    .await?
        .rows_affected());
    let mut acct = lock(tx, id).await?;
    let welcome = ctx.pricing.plan(new.plan).welcome_credits;
    if !welcome.is_zero() {
        let source = format!("welcome:{id}");
        let spec = GrantSpec {
            kind: CreditKind::Welcome,
            amount: welcome,
            expires_at: None,
            source: &source,
            fingerprint: &source,
        };
        insert_grant(tx, &mut acct, ctx.now, &spec).await?;
    }
    touch(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    Ok(CreatedAccount {
        account: acct.account,
        api_key,
    })
}

async fn read_account(tx: &mut Tx, id: AccountId) -> Result<Locked> {
    let row: Option<AccountRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM accounts WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **c)
        .await?);
    Locked::from_row(row.ok_or(LedgerError::AccountNotFound(id))?)
}

pub async fn account(tx: &mut Tx, id: AccountId) -> Result<Account> {
    Ok(read_account(tx, id).await?.account)
}

pub async fn account_by_api_key(tx: &mut Tx, key: &str) -> Result<Option<Account>> {
    let row: Option<AccountRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM accounts WHERE api_key_hash = $1")
        .bind(hash_api_key(key))
        .fetch_optional(&mut **c)
        .await?);
    row.map(|r| Ok(Locked::from_row(r)?.account)).transpose()
}

pub async fn quote(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId, action: Action) -> Result<Quote> {
    let mut acct = lock(tx, id).await?;
    let live = touch(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    let list_price = ctx.pricing.cost(action);
    let cost = if acct.account.is_admin {
        Credits::ZERO
    } else {
        list_price
    };
    let available = plan::available(&live, ctx.now);
    Ok(Quote {
        action,
        cost,
        list_price,
        available,
        affordable: cost <= available,
        shortfall: cost.saturating_sub(available),
    })
}

/// Holds the credits for `action`, drawn from grants in burn-down order.
pub async fn reserve(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
) -> Result<Reservation> {
    hold(tx, ctx, id, action, key, Operation::Reserve).await
}

/// Reserves and commits in one step.
pub async fn charge(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
) -> Result<Reservation> {
    hold(tx, ctx, id, action, key, Operation::Charge).await
}

async fn hold(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<Reservation> {
    check_key(key, "idempotency key")?;
    if let Tx::Postgres(c) = tx
        && let Some(r) = hold_optimistic(c, ctx, id, action, key, op).await?
    {
        return Ok(r);
    }
    hold_locked(tx, ctx, id, action, key, op).await
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL's optimistic reserve: one read without locks, then one guarded write. The write
// applies only if the account's journal sequence is still the one read; every change to an
// account's grants or totals appends to its journal and so moves that sequence, so a matching
// sequence means the grants are exactly as read. A mismatch writes nothing and the reserve is
// tried again; twice unlucky, or with an expiry or renewal due, it takes the locking path.

pub(crate) const OPTIMISTIC_ATTEMPTS: usize = 2;

enum Optimistic {
    Done(Reservation),
    Raced,
    NeedsLock,
}

/// The optimistic reserve on any PostgreSQL connection: in a caller's transaction, or on its
/// own in autocommit (each statement is atomic by itself). `None`: take the locking path.
pub(crate) async fn hold_optimistic(
    c: &mut sqlx::PgConnection,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<Option<Reservation>> {
    for _ in 0..OPTIMISTIC_ATTEMPTS {
        match try_hold_optimistic(c, ctx, id, action, key, op).await? {
            Optimistic::Done(r) => return Ok(Some(r)),
            Optimistic::Raced => continue,
            Optimistic::NeedsLock => break,
        }
    }
    Ok(None)
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    #[sqlx(flatten)]
    account: AccountRow,
    existing: Option<i64>,
    #[sqlx(flatten)]
    grant: GrantColumns,
}

const SNAPSHOT_PG: &str = "SELECT a.*, \
    (SELECT r.id FROM reservations r WHERE r.account_id = a.id AND r.idempotency_key = $2) AS existing, \
    g.id AS g_id, g.kind AS g_kind, g.remaining AS g_remaining, \
    g.granted_at_ms AS g_granted_at_ms, g.expires_at_ms AS g_expires_at_ms \
    FROM accounts a LEFT JOIN grants g ON g.account_id = a.id AND g.remaining > 0 WHERE a.id = $1";

// Everything a reserve writes, applied only when the journal sequence is unchanged ($2). The
// final guard divides by zero (failing, so rolling back, the whole statement) if fewer grants
// were drawn than planned. `hold_pg!(ctes, columns)` adds more CTEs (which may read `a`, the
// account, and `r`, the reservation; parameters from `$22`) and more result columns; the row
// comes back only when the hold applied.
#[rustfmt::skip]
macro_rules! hold_pg {
    ([$($ctes:expr),*], [$($columns:expr),*]) => {
        concat!(
            "WITH a AS (UPDATE accounts SET held = $3, committed = $4, journal_seq = $5 \
    WHERE id = $1 AND journal_seq = $2 RETURNING id), \
    g AS (UPDATE grants SET remaining = grants.remaining - d.amount \
    FROM a, UNNEST($14::bigint[], $15::bigint[]) AS d(id, amount) \
    WHERE grants.id = d.id AND grants.remaining >= d.amount RETURNING grants.id), \
    r AS (INSERT INTO reservations (account_id, idempotency_key, operation, action, amount, list_price, exempt, \
    state, created_at_ms, resolved_at_ms) SELECT a.id, $6, $7, $8, $9, $10, $11, $12, $13, $16 FROM a RETURNING id), \
    p AS (INSERT INTO reservation_parts (reservation_id, seq, grant_id, amount) \
    SELECT r.id, d.seq, d.grant_id, d.amount FROM r, \
    UNNEST($14::bigint[], $15::bigint[]) WITH ORDINALITY AS d(grant_id, amount, seq)), \
    j AS (INSERT INTO journal (account_id, seq, at_ms, entry, amount, reservation_id, action, list_price, reference, \
    available_after, held_after) SELECT a.id, e.seq, $13, e.entry, $9, r.id, $8, $10, $6, e.available_after, \
    e.held_after FROM a, r, UNNEST($17::bigint[], $18::text[], $19::bigint[], $20::bigint[]) \
    AS e(seq, entry, available_after, held_after))",
            $($ctes,)*
            " SELECT r.id, 1 / (CASE WHEN (SELECT COUNT(*) FROM g) = $21::bigint THEN 1 ELSE 0 END) AS guard",
            $($columns,)*
            " FROM r"
        )
    };
}
pub(crate) use hold_pg;

const HOLD_PG: &str = hold_pg!([], []);

/// Where an optimistic reserve stands after its read.
pub(crate) enum OptimisticPlan {
    /// The key was used before: this reservation (checked to be for the same request).
    Existing(Reservation),
    /// An expiry or renewal is due: take the locking path.
    NeedsLock,
    /// Ready to write with [`HoldWrite::bind`] on a [`hold_pg`] statement.
    Write(Box<HoldWrite>),
}

/// The planned reservation and the parameters `$1`..`$21` of its guarded write.
pub(crate) struct HoldWrite {
    /// Its id is 0 until written.
    pub(crate) reservation: Reservation,
    account: String,
    expected_seq: i64,
    held: i64,
    committed: i64,
    new_seq: i64,
    grant_ids: Vec<i64>,
    amounts: Vec<i64>,
    seqs: Vec<i64>,
    entries: Vec<&'static str>,
    available_after: Vec<i64>,
    held_after: Vec<i64>,
    draws: i64,
}

impl HoldWrite {
    pub(crate) fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let r = &self.reservation;
        q.bind(&self.account)
            .bind(self.expected_seq)
            .bind(self.held)
            .bind(self.committed)
            .bind(self.new_seq)
            .bind(&r.idempotency_key)
            .bind(r.operation.as_str())
            .bind(r.action.as_str())
            .bind(r.amount.as_i64())
            .bind(r.list_price.as_i64())
            .bind(r.exempt)
            .bind(r.state.as_str())
            .bind(r.created_at.millis())
            .bind(&self.grant_ids)
            .bind(&self.amounts)
            .bind(r.resolved_at.map(Timestamp::millis))
            .bind(&self.seqs)
            .bind(&self.entries)
            .bind(&self.available_after)
            .bind(&self.held_after)
            .bind(self.draws)
    }
}

/// The read half of the optimistic reserve: the account, its open grants and any reservation
/// under `key`, without locks; then the plan. Works on any PostgreSQL connection.
pub(crate) async fn plan_optimistic(
    c: &mut sqlx::PgConnection,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<OptimisticPlan> {
    check_key(key, "idempotency key")?;
    let rows: Vec<SnapshotRow> = sqlx::query_as(SNAPSHOT_PG)
        .bind(id.to_string())
        .bind(key)
        .fetch_all(&mut *c)
        .await?;
    let Some(first) = rows.first() else {
        return Err(LedgerError::AccountNotFound(id));
    };
    if let Some(existing) = first.existing {
        let row: ReservationRow = sqlx::query_as("SELECT * FROM reservations WHERE id = $1")
            .bind(existing)
            .fetch_one(&mut *c)
            .await?;
        return replay(row.into_reservation()?, key, action, op).map(OptimisticPlan::Existing);
    }
    let mut grants = Vec::new();
    let mut account = None;
    for row in rows {
        if let Some(g) = row.grant.into_open_grant() {
            grants.push(g?);
        }
        account.get_or_insert(row.account);
    }
    let Some(account) = account else {
        return Err(LedgerError::AccountNotFound(id));
    };
    let mut acct = Locked::from_row(account)?;
    let renewal_due = acct.allowance(ctx.pricing).is_some()
        && acct
            .renewed_cycle
            .is_none_or(|r| r < billing_cycle(acct.account.cycle_anchor, ctx.now).start);
    if renewal_due || grants.iter().any(|g| g.is_expired(ctx.now)) {
        return Ok(OptimisticPlan::NeedsLock);
    }
    let (r, draws) = plan_hold(ctx, &acct, &grants, id, action, key, op)?;
    let expected_seq = acct.journal_seq;
    // The journal entries, computed as `Locked` would.
    acct.held_for(&r)?;
    let entries = std::mem::take(&mut acct.entries);
    let seqs: Vec<i64> = (expected_seq + 1..).take(entries.len()).collect();
    Ok(OptimisticPlan::Write(Box::new(HoldWrite {
        account: id.to_string(),
        expected_seq,
        held: acct.totals.held.as_i64(),
        committed: acct.totals.committed.as_i64(),
        new_seq: seqs.last().copied().unwrap_or(expected_seq),
        grant_ids: draws.iter().map(|d| d.grant_id.0).collect(),
        amounts: draws.iter().map(|d| d.amount.as_i64()).collect(),
        seqs,
        entries: column(&entries, |e| e.entry.as_str()),
        available_after: column(&entries, |e| e.available_after.as_i64()),
        held_after: column(&entries, |e| e.held_after.as_i64()),
        draws: i64::try_from(draws.len()).unwrap_or(i64::MAX),
        reservation: r,
    })))
}

async fn try_hold_optimistic(
    c: &mut sqlx::PgConnection,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<Optimistic> {
    let w = match plan_optimistic(c, ctx, id, action, key, op).await? {
        OptimisticPlan::Existing(r) => return Ok(Optimistic::Done(r)),
        OptimisticPlan::NeedsLock => return Ok(Optimistic::NeedsLock),
        OptimisticPlan::Write(w) => w,
    };
    let row: Option<(i64, i32)> = w
        .bind(sqlx::query_as(HOLD_PG))
        .fetch_optional(&mut *c)
        .await?;
    Ok(match row {
        Some((rid, _)) => {
            let mut r = w.reservation;
            r.id = ReservationId(rid);
            Optimistic::Done(r)
        }
        None => Optimistic::Raced,
    })
}

/// What a hold will make: the reservation (its id is set once inserted) and the grants it draws
/// from, or InsufficientCredits. Admins are held at zero with the list price recorded.
fn plan_hold(
    ctx: &Ctx<'_>,
    acct: &Locked,
    live: &[OpenGrant],
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<(Reservation, Vec<plan::Draw>)> {
    let list_price = ctx.pricing.cost(action);
    let exempt = acct.account.is_admin;
    let amount = if exempt { Credits::ZERO } else { list_price };
    let draws =
        plan::plan_draws(live, ctx.now, amount).map_err(|s| LedgerError::InsufficientCredits {
            needed: s.needed,
            available: s.available,
            shortfall: s.needed.saturating_sub(s.available),
        })?;
    let charge = op == Operation::Charge;
    let r = Reservation {
        id: ReservationId(0),
        account_id: id,
        idempotency_key: key.to_owned(),
        operation: op,
        action,
        amount,
        list_price,
        exempt,
        state: if charge {
            ReservationState::Committed
        } else {
            ReservationState::Held
        },
        created_at: ctx.now,
        resolved_at: charge.then_some(ctx.now),
    };
    Ok((r, draws))
}

/// The same idempotency key again: the original reservation if the request matches, else a
/// conflict.
fn replay(r: Reservation, key: &str, action: Action, op: Operation) -> Result<Reservation> {
    if r.operation == op && r.action == action {
        Ok(r)
    } else {
        Err(LedgerError::IdempotencyConflict {
            key: key.to_owned(),
            existing: format!("{} of {}", r.operation.as_str(), r.action),
        })
    }
}

async fn hold_locked(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
    op: Operation,
) -> Result<Reservation> {
    let mut acct = lock(tx, id).await?;
    // After the lock, so a reservation another transaction made under this key is visible.
    let rows: Vec<KeyAndGrantRow> = on_tx!(tx, c => sqlx::query_as(KEY_AND_GRANTS)
        .bind(id.to_string())
        .bind(key)
        .fetch_all(&mut **c)
        .await?);
    if let Some(existing) = rows.first().and_then(|r| r.existing) {
        return replay(
            reservation_row(tx, ReservationId(existing)).await?,
            key,
            action,
            op,
        );
    }
    let open = rows
        .into_iter()
        .filter_map(|r| r.grant.into_open_grant())
        .collect::<Result<Vec<_>>>()?;
    let live = touch_with(tx, ctx, &mut acct, open).await?;
    let (mut r, draws) = plan_hold(ctx, &acct, &live, id, action, key, op)?;
    let grant_ids: Vec<i64> = draws.iter().map(|d| d.grant_id.0).collect();
    let amounts: Vec<i64> = draws.iter().map(|d| d.amount.as_i64()).collect();
    // Binds `$1..=$10` of INSERT_RESERVATION / INSERT_RESERVATION_PG.
    macro_rules! bind_reservation {
        ($q:expr) => {
            $q.bind(id.to_string())
                .bind(key)
                .bind(op.as_str())
                .bind(action.as_str())
                .bind(r.amount.as_i64())
                .bind(r.list_price.as_i64())
                .bind(r.exempt)
                .bind(r.state.as_str())
                .bind(ctx.now.millis())
                .bind(r.resolved_at.map(Timestamp::millis))
        };
    }
    let rid: i64 = match tx {
        Tx::Postgres(c) => {
            let (rid, drawn): (i64, i64) = bind_reservation!(sqlx::query_as(INSERT_RESERVATION_PG))
                .bind(&grant_ids)
                .bind(&amounts)
                .fetch_one(&mut **c)
                .await?;
            if usize::try_from(drawn).ok() != Some(draws.len()) {
                return Err(LedgerError::Corrupt(format!(
                    "drew from {drawn} of {} grants",
                    draws.len()
                )));
            }
            rid
        }
        Tx::Sqlite(c) => {
            for d in &draws {
                let drawn = sqlx::query(DRAW)
                    .bind(d.grant_id.0)
                    .bind(d.amount.as_i64())
                    .execute(&mut **c)
                    .await?
                    .rows_affected();
                if drawn != 1 {
                    return Err(LedgerError::Corrupt(format!(
                        "grant {} could not be drawn from",
                        d.grant_id
                    )));
                }
            }
            let rid: i64 = bind_reservation!(sqlx::query_scalar(INSERT_RESERVATION))
                .fetch_one(&mut **c)
                .await?;
            for (seq, (g, a)) in (1_i32..).zip(grant_ids.iter().zip(&amounts)) {
                sqlx::query(INSERT_PART)
                    .bind(rid)
                    .bind(seq)
                    .bind(g)
                    .bind(a)
                    .execute(&mut **c)
                    .await?;
            }
            rid
        }
    };
    r.id = ReservationId(rid);
    acct.held_for(&r)?;
    save(tx, &mut acct, ctx.now).await?;
    Ok(r)
}

/// Moves a held reservation to `state`, taking its row lock. `None` when it is not held (or
/// does not exist): see `unresolved`.
async fn resolve_row(
    tx: &mut Tx,
    id: ReservationId,
    state: ReservationState,
    now: Timestamp,
) -> Result<Option<Reservation>> {
    let row: Option<ReservationRow> = on_tx!(tx, c => sqlx::query_as(
        "UPDATE reservations SET state = $2, resolved_at_ms = $3 WHERE id = $1 AND state = 'held' RETURNING *",
    )
    .bind(id.0)
    .bind(state.as_str())
    .bind(now.millis())
    .fetch_optional(&mut **c)
    .await?);
    row.map(ReservationRow::into_reservation).transpose()
}

/// A reservation that was not held: resolving it again the same way is a no-op, the other way
/// is an error.
async fn unresolved(
    tx: &mut Tx,
    id: ReservationId,
    wanted: ReservationState,
) -> Result<Reservation> {
    let r = reservation_row(tx, id).await?;
    if r.state == wanted {
        Ok(r)
    } else {
        Err(LedgerError::AlreadyResolved { id, state: r.state })
    }
}

// PostgreSQL: the whole commit in one statement. The reservation's row lock is taken first, then
// the account's; no other path locks an existing reservation while holding its account.
const COMMIT_PG: &str = "WITH r AS (UPDATE reservations SET state = 'committed', resolved_at_ms = $2 \
    WHERE id = $1 AND state = 'held' RETURNING *), \
    a AS (UPDATE accounts SET held = accounts.held - r.amount, committed = accounts.committed + r.amount, \
    journal_seq = accounts.journal_seq + 1 FROM r WHERE accounts.id = r.account_id \
    RETURNING accounts.id, accounts.journal_seq, accounts.held, \
    accounts.granted - accounts.held - accounts.committed - accounts.expired AS available), \
    j AS (INSERT INTO journal (account_id, seq, at_ms, entry, amount, reservation_id, action, list_price, reference, \
    available_after, held_after) SELECT a.id, a.journal_seq, $2, 'commit', r.amount, r.id, r.action, r.list_price, \
    r.idempotency_key, a.available, a.held FROM a, r) \
    SELECT * FROM r";

/// The PostgreSQL commit statement on any connection: in a caller's transaction, or on its own
/// (it is atomic by itself). `None` when the reservation was not held.
pub(crate) async fn commit_pg(
    conn: &mut sqlx::PgConnection,
    now: Timestamp,
    id: ReservationId,
) -> Result<Option<Reservation>> {
    let row: Option<ReservationRow> = sqlx::query_as(COMMIT_PG)
        .bind(id.0)
        .bind(now.millis())
        .fetch_optional(conn)
        .await?;
    row.map(ReservationRow::into_reservation).transpose()
}

/// held -> committed. Committing again is a no-op; committing a released reservation is an error.
pub async fn commit(tx: &mut Tx, ctx: &Ctx<'_>, id: ReservationId) -> Result<Reservation> {
    if let Tx::Postgres(c) = tx {
        return match commit_pg(c, ctx.now, id).await? {
            Some(r) => Ok(r),
            None => unresolved(tx, id, ReservationState::Committed).await,
        };
    }
    let Some(r) = resolve_row(tx, id, ReservationState::Committed, ctx.now).await? else {
        return unresolved(tx, id, ReservationState::Committed).await;
    };
    let mut acct = lock(tx, r.account_id).await?;
    acct.committed(&r)?;
    save(tx, &mut acct, ctx.now).await?;
    Ok(r)
}

/// held -> released: the credits go back to the grants they came from, in reverse order; what
/// goes back to a grant that has expired meanwhile expires at once.
pub async fn release(tx: &mut Tx, ctx: &Ctx<'_>, id: ReservationId) -> Result<Reservation> {
    let Some(r) = resolve_row(tx, id, ReservationState::Released, ctx.now).await? else {
        return unresolved(tx, id, ReservationState::Released).await;
    };
    let mut acct = lock(tx, r.account_id).await?;
    let parts: Vec<PartRow> = on_tx!(tx, c => sqlx::query_as(
        "SELECT p.grant_id, p.amount, g.expires_at_ms FROM reservation_parts p JOIN grants g ON g.id = p.grant_id \
         WHERE p.reservation_id = $1 ORDER BY p.seq DESC",
    )
    .bind(id.0)
    .fetch_all(&mut **c)
    .await?);
    acct.released(&r)?;
    for p in parts {
        let (grant, amount) = (GrantId(p.grant_id), credits(p.amount, "part amount")?);
        if plan::is_expired(p.expires_at_ms.map(ts), ctx.now) {
            exec_grant_update(tx, EXPIRE_RETURNED, grant, amount).await?;
            acct.expired(grant, None, amount)?;
        } else {
            exec_grant_update(tx, RETURN, grant, amount).await?;
        }
    }
    save(tx, &mut acct, ctx.now).await?;
    Ok(r)
}

pub async fn reservation(tx: &mut Tx, id: ReservationId) -> Result<Reservation> {
    reservation_row(tx, id).await
}

/// Buys a top-up pack. Idempotent by payment reference: the same reference for the same account
/// and pack returns the original grant; for anything else it is a conflict.
pub async fn topup(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    pack: &str,
    payment_ref: &str,
) -> Result<Grant> {
    let pack = ctx
        .pricing
        .pack(pack)
        .ok_or_else(|| LedgerError::UnknownPack {
            pack: pack.to_owned(),
            expected: ctx
                .pricing
                .packs()
                .iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    check_key(payment_ref, "payment reference")?;
    let mut acct = lock(tx, id).await?;
    let source = format!("topup:{payment_ref}");
    let fingerprint = format!("{id}:{}:{}", pack.id, pack.credits);
    if let Some((g, fp)) = grant_by_source(tx, &source).await? {
        return if fp == fingerprint {
            Ok(g)
        } else {
            Err(LedgerError::PaymentRefConflict(payment_ref.to_owned()))
        };
    }
    touch(tx, ctx, &mut acct).await?;
    let spec = GrantSpec {
        kind: CreditKind::TopUp,
        amount: pack.credits,
        expires_at: None,
        source: &source,
        fingerprint: &fingerprint,
    };
    let grant = match insert_grant(tx, &mut acct, ctx.now, &spec).await? {
        Some(g) => g,
        // Another account's transaction took this reference between our check and insert.
        None => return Err(LedgerError::PaymentRefConflict(payment_ref.to_owned())),
    };
    save(tx, &mut acct, ctx.now).await?;
    Ok(grant)
}

pub async fn renew(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId) -> Result<Vec<Grant>> {
    let mut acct = lock(tx, id).await?;
    let before = acct.entries.len();
    touch(tx, ctx, &mut acct).await?;
    let mut new = Vec::new();
    for e in &acct.entries[before..] {
        if let (EntryType::Grant, Some(g)) = (e.entry, e.grant_id) {
            let row: Option<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE id = $1")
                .bind(g.0)
                .fetch_optional(&mut **c)
                .await?);
            if let Some(row) = row {
                new.push(row.into_grant()?);
            }
        }
    }
    save(tx, &mut acct, ctx.now).await?;
    Ok(new)
}

/// Accounts with a renewal or an expiry due at `now`. Only subscription grants expire, and they
/// expire when the cycle renews, so the renewal date covers both.
pub async fn due_accounts(tx: &mut Tx, now: Timestamp, limit: u32) -> Result<Vec<AccountId>> {
    let ids: Vec<String> = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT id FROM accounts WHERE next_renewal_ms <= $1 ORDER BY next_renewal_ms LIMIT $2",
    )
    .bind(now.millis())
    .bind(i64::from(limit))
    .fetch_all(&mut **c)
    .await?);
    ids.iter().map(|s| parse(s, "account id")).collect()
}

pub async fn balance(tx: &mut Tx, ctx: &Ctx<'_>, id: AccountId) -> Result<Balance> {
    let mut acct = lock(tx, id).await?;
    let mut live = touch(tx, ctx, &mut acct).await?;
    save(tx, &mut acct, ctx.now).await?;
    plan::sort_burn_down(&mut live);
    let mut by_kind: Vec<KindBalance> = Vec::new();
    for g in live {
        match by_kind.last_mut() {
            Some(k) if k.kind == g.kind && k.expires_at == g.expires_at => {
                k.remaining = k.remaining.checked_add(g.remaining)?;
            }
            _ => by_kind.push(KindBalance {
                kind: g.kind,
                remaining: g.remaining,
                expires_at: g.expires_at,
            }),
        }
    }
    let t = &acct.totals;
    Ok(Balance {
        available: t.available(),
        held: t.held,
        committed: t.committed,
        expired: t.expired,
        granted: t.granted,
        by_kind,
    })
}

/// The account's journal, oldest first, `limit` entries after sequence number `after`.
pub async fn journal(
    tx: &mut Tx,
    id: AccountId,
    after: Option<i64>,
    limit: u32,
) -> Result<JournalPage> {
    account(tx, id).await?;
    let limit = limit.clamp(1, 1_000);
    let rows: Vec<JournalRow> = on_tx!(tx, c => sqlx::query_as(
        "SELECT * FROM journal WHERE account_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(id.to_string())
    .bind(after.unwrap_or(0))
    .bind(i64::from(limit) + 1)
    .fetch_all(&mut **c)
    .await?);
    let mut entries = rows
        .into_iter()
        .map(JournalRow::into_entry)
        .collect::<Result<Vec<_>>>()?;
    let more = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    let next_after = if more {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(JournalPage {
        entries,
        next_after,
    })
}

/// The account's running totals as stored, without bringing the account up to date first (no
/// expiry booking, no renewal): a pure read, for audits and operators.
pub async fn totals(tx: &mut Tx, id: AccountId) -> Result<Totals> {
    Ok(read_account(tx, id).await?.totals)
}

/// Every grant of the account, oldest first.
pub async fn grants(tx: &mut Tx, id: AccountId) -> Result<Vec<Grant>> {
    account(tx, id).await?;
    let rows: Vec<GrantRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM grants WHERE account_id = $1 ORDER BY id")
        .bind(id.to_string())
        .fetch_all(&mut **c)
        .await?);
    rows.into_iter().map(GrantRow::into_grant).collect()
}
