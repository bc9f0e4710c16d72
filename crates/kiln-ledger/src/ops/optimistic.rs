//! PostgreSQL's optimistic reserve: one read without locks, then one guarded write. The write
//! applies only if the account's journal sequence is still the one read; every change to an
//! account's grants or totals appends to its journal and so moves that sequence, so a matching
//! sequence means the grants are exactly as read. A mismatch writes nothing and the reserve is
//! tried again; twice unlucky, or with an expiry or renewal due, it takes the locking path.
//! kiln-jobs builds its one-statement enqueue on `hold_pg!` and `plan_optimistic`.

use super::prelude::*;

pub const OPTIMISTIC_ATTEMPTS: usize = 2;

pub(crate) enum Optimistic {
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
pub(crate) struct SnapshotRow {
    #[sqlx(flatten)]
    pub(crate) account: AccountRow,
    pub(crate) existing: Option<i64>,
    #[sqlx(flatten)]
    pub(crate) grant: GrantColumns,
}

pub(crate) const SNAPSHOT_PG: &str = "SELECT a.*, \
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
#[macro_export]
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

pub(crate) const HOLD_PG: &str = hold_pg!([], []);

/// Where an optimistic reserve stands after its read.
#[derive(Debug)]
pub enum OptimisticPlan {
    /// The key was used before: this reservation (checked to be for the same request).
    Existing(Reservation),
    /// An expiry or renewal is due: take the locking path.
    NeedsLock,
    /// Ready to write with [`HoldWrite::bind`] on a [`hold_pg`] statement.
    Write(Box<HoldWrite>),
}

/// The planned reservation and the parameters `$1`..`$21` of its guarded write.
#[derive(Debug)]
pub struct HoldWrite {
    /// Its id is 0 until written.
    pub reservation: Reservation,
    pub(crate) account: String,
    pub(crate) expected_seq: i64,
    pub(crate) held: i64,
    pub(crate) committed: i64,
    pub(crate) new_seq: i64,
    pub(crate) grant_ids: Vec<i64>,
    pub(crate) amounts: Vec<i64>,
    pub(crate) seqs: Vec<i64>,
    pub(crate) entries: Vec<&'static str>,
    pub(crate) available_after: Vec<i64>,
    pub(crate) held_after: Vec<i64>,
    pub(crate) draws: i64,
}

impl HoldWrite {
    pub fn bind<'q, O>(
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
pub async fn plan_optimistic(
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

pub(crate) async fn try_hold_optimistic(
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
