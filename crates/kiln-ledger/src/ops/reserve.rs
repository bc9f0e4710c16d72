//! Reserving credits: the hold drawn from grants in burn-down order, on the locking path (both
//! databases), with idempotency by key. PostgreSQL first tries `optimistic`.

use super::prelude::*;

pub(crate) const DRAW: &str =
    "UPDATE grants SET remaining = remaining - $2 WHERE id = $1 AND remaining >= $2";

pub(crate) const INSERT_RESERVATION: &str = "INSERT INTO reservations (account_id, idempotency_key, operation, action, amount, \
    list_price, exempt, state, created_at_ms, resolved_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id";

pub(crate) const INSERT_PART: &str =
    "INSERT INTO reservation_parts (reservation_id, seq, grant_id, amount) VALUES ($1, $2, $3, $4)";

// PostgreSQL: the draws from the grants, the reservation and its parts in one statement; it
// returns the reservation id and how many grants were drawn from.
pub(crate) const INSERT_RESERVATION_PG: &str = "WITH g AS (UPDATE grants SET remaining = remaining - d.amount \
    FROM UNNEST($11::bigint[], $12::bigint[]) AS d(id, amount) \
    WHERE grants.id = d.id AND grants.remaining >= d.amount RETURNING grants.id), \
    r AS (INSERT INTO reservations (account_id, idempotency_key, operation, \
    action, amount, list_price, exempt, state, created_at_ms, resolved_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id), \
    p AS (INSERT INTO reservation_parts (reservation_id, seq, grant_id, amount) \
    SELECT r.id, d.seq, d.grant_id, d.amount FROM r, UNNEST($11::bigint[], $12::bigint[]) WITH ORDINALITY AS d(grant_id, amount, seq)) \
    SELECT r.id, (SELECT COUNT(*) FROM g) AS drawn FROM r";

pub(crate) async fn reservation_row(tx: &mut Tx, id: ReservationId) -> Result<Reservation> {
    let row: Option<ReservationRow> = on_tx!(tx, c => sqlx::query_as("SELECT * FROM reservations WHERE id = $1")
        .bind(id.0)
        .fetch_optional(&mut **c)
        .await?);
    row.ok_or(LedgerError::ReservationNotFound(id))?
        .into_reservation()
}

/// The prefixes of the reservation keys kiln makes itself: a kit order's (`kit:` + the order's
/// key, kiln-jobs) and a hold's (`hold:` + the hold's key). A caller's own reserve or charge key
/// may not begin with one, so it can never take — or be mistaken for — a kit's or a hold's.
pub const RESERVED_KEY_PREFIXES: [&str; 2] = ["kit:", "hold:"];

/// A caller's idempotency key for a reserve or charge: [`check_key`], and not in the key space
/// of kits or holds ([`RESERVED_KEY_PREFIXES`]).
pub fn check_caller_key(key: &str) -> Result<()> {
    check_key(key, "idempotency key")?;
    if RESERVED_KEY_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return Err(LedgerError::ReservedKey(key.to_owned()));
    }
    Ok(())
}

/// Holds the credits for `action`, drawn from grants in burn-down order. `key` is the caller's
/// ([`check_caller_key`]).
pub async fn reserve(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
) -> Result<Reservation> {
    check_caller_key(key)?;
    hold(tx, ctx, id, action, key, Operation::Reserve).await
}

/// [`reserve`] on the locking path only, for a caller (kiln-jobs' enqueue) that has just tried
/// the optimistic path itself.
pub async fn reserve_locked(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
) -> Result<Reservation> {
    check_key(key, "idempotency key")?;
    hold_locked(tx, ctx, id, action, key, Operation::Reserve).await
}

/// Reserves and commits in one step. `key` is the caller's ([`check_caller_key`]).
pub async fn charge(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: AccountId,
    action: Action,
    key: &str,
) -> Result<Reservation> {
    check_caller_key(key)?;
    hold(tx, ctx, id, action, key, Operation::Charge).await
}

pub(crate) async fn hold(
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

/// What a hold will make: the reservation (its id is set once inserted) and the grants it draws
/// from, or InsufficientCredits. Admins are held at zero with the list price recorded.
pub(crate) fn plan_hold(
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
pub(crate) fn replay(
    r: Reservation,
    key: &str,
    action: Action,
    op: Operation,
) -> Result<Reservation> {
    if r.operation == op && r.action == action {
        Ok(r)
    } else {
        Err(LedgerError::IdempotencyConflict {
            key: key.to_owned(),
            existing: format!("{} of {}", r.operation.as_str(), r.action),
        })
    }
}

pub(crate) async fn hold_locked(
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
    let live = bring_up_to_date_with(tx, ctx, &mut acct, open).await?;
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

pub async fn reservation(tx: &mut Tx, id: ReservationId) -> Result<Reservation> {
    reservation_row(tx, id).await
}
