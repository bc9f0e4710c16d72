//! Holds for tool calls (the seed: image and video tools are checked before they run and
//! charged when they do): a reservation with an expiry, resolved once — captured (committed),
//! voided (released), or expired (released by maintenance when nobody resolved it in time).
//!
//! Every resolution is one guarded update of the hold row (`WHERE status = 'held'`) followed by
//! the reservation's commit or release in the same transaction, so of any number of racing
//! resolvers (capture against void, two maintenance loops) exactly one moves the hold. The lock
//! order is the hold row, then the reservation, then the account: a kit job's order.

use super::prelude::*;
use crate::{Hold, HoldId, HoldStatus};

/// How long a hold lives when the caller does not say.
pub const DEFAULT_HOLD_MS: i64 = 15 * 60 * 1000;
/// The shortest and longest expiry a caller may ask for.
pub const HOLD_MS_RANGE: std::ops::RangeInclusive<i64> = 1000..=24 * 60 * 60 * 1000;

/// The reservation's key: holds have their own key space within the account.
fn reservation_key(key: &str) -> String {
    format!("hold:{key}")
}

#[derive(sqlx::FromRow)]
struct HoldRow {
    id: String,
    account_id: String,
    idempotency_key: String,
    action: String,
    reservation_id: i64,
    status: String,
    created_at_ms: i64,
    expires_at_ms: i64,
    resolved_at_ms: Option<i64>,
    amount: i64,
    list_price: i64,
}

impl HoldRow {
    fn into_hold(self) -> Result<Hold> {
        Ok(Hold {
            id: parse(&self.id, "hold id")?,
            account_id: parse(&self.account_id, "account id")?,
            idempotency_key: self.idempotency_key,
            action: parse(&self.action, "action")?,
            amount: credits(self.amount, "hold amount")?,
            list_price: credits(self.list_price, "list price")?,
            status: parse(&self.status, "hold status")?,
            reservation_id: ReservationId(self.reservation_id),
            created_at: ts(self.created_at_ms),
            expires_at: ts(self.expires_at_ms),
            resolved_at: self.resolved_at_ms.map(ts),
        })
    }
}

macro_rules! select_hold {
    ($filter:literal) => {
        concat!(
            "SELECT h.id, h.account_id, h.idempotency_key, h.action, h.reservation_id, h.status, \
    h.created_at_ms, h.expires_at_ms, h.resolved_at_ms, r.amount, r.list_price \
    FROM holds h JOIN reservations r ON r.id = h.reservation_id WHERE ",
            $filter
        )
    };
}

async fn hold_by_id(tx: &mut Tx, id: HoldId) -> Result<Option<Hold>> {
    let row: Option<HoldRow> = on_tx!(tx, c => sqlx::query_as(select_hold!("h.id = $1"))
        .bind(id.to_string())
        .fetch_optional(&mut **c)
        .await?);
    row.map(HoldRow::into_hold).transpose()
}

async fn hold_by_key(tx: &mut Tx, account: AccountId, key: &str) -> Result<Option<Hold>> {
    let row: Option<HoldRow> = on_tx!(tx, c => sqlx::query_as(
        select_hold!("h.account_id = $1 AND h.idempotency_key = $2"))
        .bind(account.to_string())
        .bind(key)
        .fetch_optional(&mut **c)
        .await?);
    row.map(HoldRow::into_hold).transpose()
}

/// The hold `id` if it belongs to `account` (`None` = any account's).
pub async fn hold(tx: &mut Tx, account: Option<AccountId>, id: HoldId) -> Result<Hold> {
    let found = hold_by_id(tx, id).await?;
    found
        .filter(|h| account.is_none_or(|a| h.account_id == a))
        .ok_or(LedgerError::HoldNotFound(id))
}

/// Holds the credits for `action` until `expires_in_ms` from now (default 15 min). The same
/// key again returns the same hold (`false`: not new), whatever its state; the same key for a
/// different action is a conflict.
pub async fn create_hold(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    account: AccountId,
    action: Action,
    key: &str,
    expires_in_ms: Option<i64>,
) -> Result<(Hold, bool)> {
    check_key(key, "idempotency key")?;
    let ttl = expires_in_ms.unwrap_or(DEFAULT_HOLD_MS);
    if !HOLD_MS_RANGE.contains(&ttl) {
        return Err(LedgerError::BadHoldExpiry {
            min_s: HOLD_MS_RANGE.start() / 1000,
            max_s: HOLD_MS_RANGE.end() / 1000,
        });
    }
    if let Some(h) = hold_by_key(tx, account, key).await? {
        return replay(h, key, action).map(|h| (h, false));
    }
    let r = super::reserve::hold(
        tx,
        ctx,
        account,
        action,
        &reservation_key(key),
        Operation::Reserve,
    )
    .await?;
    let id = HoldId::generate();
    // A concurrent request under the same key got the same reservation (the reserve replays
    // it once the other transaction commits): then its hold row is the one to return.
    let inserted = on_tx!(tx, c => sqlx::query(
        "INSERT INTO holds (id, account_id, idempotency_key, action, reservation_id, status, created_at_ms, \
         expires_at_ms) VALUES ($1, $2, $3, $4, $5, 'held', $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(id.to_string())
    .bind(account.to_string())
    .bind(key)
    .bind(action.as_str())
    .bind(r.id.0)
    .bind(ctx.now.millis())
    .bind(ctx.now.millis().saturating_add(ttl))
    .execute(&mut **c)
    .await?
    .rows_affected());
    let found = hold_by_key(tx, account, key).await?;
    let h = found.ok_or_else(|| {
        LedgerError::Corrupt(format!(
            "reservation {} for hold key {key:?} has no hold",
            r.id
        ))
    })?;
    if inserted == 1 {
        Ok((h, true))
    } else {
        replay(h, key, action).map(|h| (h, false))
    }
}

fn replay(h: Hold, key: &str, action: Action) -> Result<Hold> {
    if h.action == action {
        Ok(h)
    } else {
        Err(LedgerError::IdempotencyConflict {
            key: key.to_owned(),
            existing: format!("hold {} of {}", h.id, h.action),
        })
    }
}

/// Moves a held hold to `to` and resolves its reservation to match; `None` if it was not held
/// (someone else resolved it first). `due` adds the expiry condition (maintenance).
async fn move_hold(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: HoldId,
    to: HoldStatus,
    due: bool,
) -> Result<Option<ReservationId>> {
    let sql = if due {
        "UPDATE holds SET status = $2, resolved_at_ms = $3 WHERE id = $1 AND status = 'held' \
         AND expires_at_ms <= $3 RETURNING reservation_id"
    } else {
        "UPDATE holds SET status = $2, resolved_at_ms = $3 WHERE id = $1 AND status = 'held' \
         RETURNING reservation_id"
    };
    let moved: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(sql)
        .bind(id.to_string())
        .bind(to.as_str())
        .bind(ctx.now.millis())
        .fetch_optional(&mut **c)
        .await?);
    let Some(rid) = moved.map(ReservationId) else {
        return Ok(None);
    };
    match to.reservation_state() {
        ReservationState::Committed => commit(tx, ctx, rid).await?,
        ReservationState::Released => release(tx, ctx, rid).await?,
        ReservationState::Held => {
            return Err(LedgerError::Corrupt(format!("hold {id} moved to held")));
        }
    };
    Ok(Some(rid))
}

/// Captures (`Captured`: the credits are charged) or voids (`Voided`: they go back) the
/// account's hold. Once: repeating the same resolution is a no-op that returns the hold; the
/// other one, or capturing a hold past its expiry, is an error.
pub async fn resolve_hold(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    account: AccountId,
    id: HoldId,
    to: HoldStatus,
) -> Result<Hold> {
    let h = hold(tx, Some(account), id).await?;
    if h.status == HoldStatus::Held && to == HoldStatus::Captured && ctx.now >= h.expires_at {
        return Err(LedgerError::HoldExpired(id));
    }
    if h.status == HoldStatus::Held && move_hold(tx, ctx, id, to, false).await?.is_some() {
        return hold(tx, None, id).await;
    }
    // Resolved before us (perhaps while we waited for its row lock): read what won.
    let h = hold(tx, None, id).await?;
    if h.status == to {
        Ok(h)
    } else {
        Err(LedgerError::HoldResolved {
            id,
            status: h.status,
        })
    }
}

/// Holds past their expiry that are still held, oldest first.
pub async fn due_holds(tx: &mut Tx, now: Timestamp, limit: u32) -> Result<Vec<HoldId>> {
    let ids: Vec<String> = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT id FROM holds WHERE status = 'held' AND expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT $2",
    )
    .bind(now.millis())
    .bind(i64::from(limit))
    .fetch_all(&mut **c)
    .await?);
    ids.iter().map(|s| parse(s, "hold id")).collect()
}

/// Expires the hold if it is still held and due: its credits go back, journaled as a release.
/// `false` if it was resolved or expired by someone else first.
pub async fn expire_hold(tx: &mut Tx, ctx: &Ctx<'_>, id: HoldId) -> Result<bool> {
    Ok(move_hold(tx, ctx, id, HoldStatus::Expired, true)
        .await?
        .is_some())
}

/// How many holds are open (held), for the metrics.
/// Credits moved by every journal entry kind since the ledger began (`grant`, `reserve`,
/// `commit`, `release`, `expire`), each a counter: the journal only grows.
pub async fn credit_flows(tx: &mut Tx) -> Result<Vec<(String, i64)>> {
    Ok(on_tx!(tx, c => sqlx::query_as(
        "SELECT entry, CAST(SUM(amount) AS BIGINT) FROM journal GROUP BY entry ORDER BY entry",
    )
    .fetch_all(&mut **c)
    .await?))
}

pub async fn open_holds(tx: &mut Tx) -> Result<u64> {
    let n: i64 = on_tx!(tx, c => sqlx::query_scalar("SELECT COUNT(*) FROM holds WHERE status = 'held'")
        .fetch_one(&mut **c)
        .await?);
    Ok(u64::try_from(n).unwrap_or(0))
}
