//! Resolving a reservation, once: commit (held -> committed) and release (held -> released,
//! credits back to their grants in reverse order).

use super::prelude::*;

/// Moves a held reservation to `state`, taking its row lock. `None` when it is not held (or
/// does not exist): see `unresolved`.
pub(crate) async fn resolve_row(
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
pub(crate) async fn unresolved(
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

// PostgreSQL: the whole commit in one statement — the commit rule of `Locked::committed`, in
// SQL. The reservation's row lock is taken first, then the account's; no other path locks an
// existing reservation while holding its account.
pub(crate) const COMMIT_PG: &str = "WITH r AS (UPDATE reservations SET state = 'committed', resolved_at_ms = $2 \
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
