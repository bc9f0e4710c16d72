//! Stored rows and their conversion into domain types. A stored value that does not parse is
//! reported as corruption, never clamped.

use super::prelude::*;

#[derive(sqlx::FromRow)]
pub(crate) struct AccountRow {
    pub(crate) id: String,
    pub(crate) email: Option<String>,
    pub(crate) plan: String,
    pub(crate) is_admin: bool,
    pub(crate) monthly_allowance: Option<i64>,
    pub(crate) cycle_anchor_ms: i64,
    pub(crate) renewed_cycle_ms: Option<i64>,
    pub(crate) next_renewal_ms: Option<i64>,
    pub(crate) created_at_ms: i64,
    pub(crate) granted: i64,
    pub(crate) held: i64,
    pub(crate) committed: i64,
    pub(crate) expired: i64,
    pub(crate) journal_seq: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct GrantRow {
    pub(crate) id: i64,
    pub(crate) account_id: String,
    pub(crate) kind: String,
    pub(crate) amount: i64,
    pub(crate) remaining: i64,
    pub(crate) expired: i64,
    pub(crate) granted_at_ms: i64,
    pub(crate) expires_at_ms: Option<i64>,
    pub(crate) source: String,
    pub(crate) fingerprint: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ReservationRow {
    pub(crate) id: i64,
    pub(crate) account_id: String,
    pub(crate) idempotency_key: String,
    pub(crate) operation: String,
    pub(crate) action: String,
    pub(crate) amount: i64,
    pub(crate) list_price: i64,
    pub(crate) exempt: bool,
    pub(crate) state: String,
    pub(crate) created_at_ms: i64,
    pub(crate) resolved_at_ms: Option<i64>,
}

/// An open grant's columns, prefixed `g_` so they can sit beside an account's in one row.
#[derive(sqlx::FromRow)]
pub(crate) struct GrantColumns {
    pub(crate) g_id: Option<i64>,
    pub(crate) g_kind: Option<String>,
    pub(crate) g_remaining: Option<i64>,
    pub(crate) g_granted_at_ms: Option<i64>,
    pub(crate) g_expires_at_ms: Option<i64>,
}

impl GrantColumns {
    /// `None` for the row a LEFT JOIN makes when the account has no open grant.
    pub(crate) fn into_open_grant(self) -> Option<Result<OpenGrant>> {
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
pub(crate) struct KeyAndGrantRow {
    pub(crate) existing: Option<i64>,
    #[sqlx(flatten)]
    pub(crate) grant: GrantColumns,
}

pub(crate) const KEY_AND_GRANTS: &str = "SELECT \
    (SELECT r.id FROM reservations r WHERE r.account_id = $1 AND r.idempotency_key = $2) AS existing, \
    g.id AS g_id, g.kind AS g_kind, g.remaining AS g_remaining, g.granted_at_ms AS g_granted_at_ms, \
    g.expires_at_ms AS g_expires_at_ms \
    FROM (SELECT 1 AS one) AS x LEFT JOIN grants g ON g.account_id = $1 AND g.remaining > 0";

#[derive(sqlx::FromRow)]
pub(crate) struct PartRow {
    pub(crate) grant_id: i64,
    pub(crate) amount: i64,
    pub(crate) expires_at_ms: Option<i64>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct JournalRow {
    pub(crate) seq: i64,
    pub(crate) at_ms: i64,
    pub(crate) entry: String,
    pub(crate) amount: i64,
    pub(crate) kind: Option<String>,
    pub(crate) grant_id: Option<i64>,
    pub(crate) reservation_id: Option<i64>,
    pub(crate) action: Option<String>,
    pub(crate) list_price: Option<i64>,
    pub(crate) reference: Option<String>,
    pub(crate) available_after: i64,
    pub(crate) held_after: i64,
}

pub(crate) fn parse<T: FromStr>(s: &str, what: &str) -> Result<T> {
    s.parse()
        .map_err(|_| LedgerError::Corrupt(format!("stored {what} {s:?} does not parse")))
}

pub(crate) fn credits(n: i64, what: &str) -> Result<Credits> {
    Credits::from_i64(n).map_err(|e| LedgerError::Corrupt(format!("stored {what} {n}: {e}")))
}

pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

pub(crate) fn parse_state(s: &str) -> Result<ReservationState> {
    Ok(match s {
        "held" => ReservationState::Held,
        "committed" => ReservationState::Committed,
        "released" => ReservationState::Released,
        other => return Err(LedgerError::Corrupt(format!("reservation state {other:?}"))),
    })
}

pub(crate) fn parse_operation(s: &str) -> Result<Operation> {
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

pub(crate) fn parse_entry(s: &str) -> Result<EntryType> {
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
    pub(crate) fn into_grant(self) -> Result<Grant> {
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
    pub(crate) fn into_reservation(self) -> Result<Reservation> {
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
    pub(crate) fn into_entry(self) -> Result<JournalEntry> {
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
