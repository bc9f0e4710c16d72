//! The invariants of DESIGN.md §3 checked against what is stored. Used by the tests after every
//! step and by `kiln audit` on a live database; an empty list means clean.

use kiln_core::AccountId;
use serde::Serialize;

use crate::LedgerError;
use crate::db::{Tx, on_tx};

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Breach {
    pub account_id: String,
    pub what: String,
}

#[derive(sqlx::FromRow)]
struct AccountSums {
    id: String,
    granted: i64,
    held: i64,
    committed: i64,
    expired: i64,
    journal_seq: i64,
    g_amount: i64,
    g_remaining: i64,
    g_expired: i64,
    r_held: i64,
    r_committed: i64,
    j_count: i64,
    j_available: Option<i64>,
    j_held: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct GrantSums {
    id: i64,
    account_id: String,
    amount: i64,
    remaining: i64,
    expired: i64,
    drawn: i64,
}

#[derive(sqlx::FromRow)]
struct ReservationSums {
    id: i64,
    account_id: String,
    amount: i64,
    exempt: bool,
    parts: i64,
    part_count: i64,
}

// `CAST(... AS TEXT) IS NULL` selects every account on both databases when no id is given.
const ACCOUNT_SUMS: &str = "SELECT a.id, a.granted, a.held, a.committed, a.expired, a.journal_seq, \
    CAST(COALESCE((SELECT SUM(g.amount) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_amount, \
    CAST(COALESCE((SELECT SUM(g.remaining) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_remaining, \
    CAST(COALESCE((SELECT SUM(g.expired) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_expired, \
    CAST(COALESCE((SELECT SUM(r.amount) FROM reservations r WHERE r.account_id = a.id AND r.state = 'held'), 0) AS BIGINT) AS r_held, \
    CAST(COALESCE((SELECT SUM(r.amount) FROM reservations r WHERE r.account_id = a.id AND r.state = 'committed'), 0) AS BIGINT) AS r_committed, \
    (SELECT COUNT(*) FROM journal j WHERE j.account_id = a.id) AS j_count, \
    (SELECT j.available_after FROM journal j WHERE j.account_id = a.id ORDER BY j.seq DESC LIMIT 1) AS j_available, \
    (SELECT j.held_after FROM journal j WHERE j.account_id = a.id ORDER BY j.seq DESC LIMIT 1) AS j_held \
    FROM accounts a WHERE CAST($1 AS TEXT) IS NULL OR a.id = $1";

const GRANT_SUMS: &str = "SELECT g.id, g.account_id, g.amount, g.remaining, g.expired, \
    CAST(COALESCE((SELECT SUM(p.amount) FROM reservation_parts p JOIN reservations r ON r.id = p.reservation_id \
      WHERE p.grant_id = g.id AND r.state IN ('held', 'committed')), 0) AS BIGINT) AS drawn \
    FROM grants g WHERE CAST($1 AS TEXT) IS NULL OR g.account_id = $1";

const RESERVATION_SUMS: &str = "SELECT r.id, r.account_id, r.amount, r.exempt, \
    CAST(COALESCE((SELECT SUM(p.amount) FROM reservation_parts p WHERE p.reservation_id = r.id), 0) AS BIGINT) AS parts, \
    (SELECT COUNT(*) FROM reservation_parts p WHERE p.reservation_id = r.id) AS part_count \
    FROM reservations r WHERE CAST($1 AS TEXT) IS NULL OR r.account_id = $1";

/// Checks one account, or all of them.
pub async fn audit(tx: &mut Tx, account: Option<AccountId>) -> Result<Vec<Breach>, LedgerError> {
    let filter = account.map(|a| a.to_string());
    let accounts: Vec<AccountSums> =
        on_tx!(tx, c => sqlx::query_as(ACCOUNT_SUMS).bind(&filter).fetch_all(&mut **c).await?);
    let grants: Vec<GrantSums> =
        on_tx!(tx, c => sqlx::query_as(GRANT_SUMS).bind(&filter).fetch_all(&mut **c).await?);
    let reservations: Vec<ReservationSums> =
        on_tx!(tx, c => sqlx::query_as(RESERVATION_SUMS).bind(&filter).fetch_all(&mut **c).await?);

    let mut out = Vec::new();
    let mut breach = |account: &str, what: String| {
        out.push(Breach {
            account_id: account.to_owned(),
            what,
        })
    };
    for a in &accounts {
        let mut check = |ok: bool, what: String| {
            if !ok {
                breach(&a.id, what);
            }
        };
        let available = a.granted - a.held - a.committed - a.expired;
        check(
            a.granted == a.g_remaining + a.held + a.committed + a.expired,
            format!(
                "conservation: granted {} != available {} + held {} + committed {} + expired {}",
                a.granted, a.g_remaining, a.held, a.committed, a.expired
            ),
        );
        check(
            a.granted == a.g_amount,
            format!(
                "granted total {} != sum of grants {}",
                a.granted, a.g_amount
            ),
        );
        check(
            a.expired == a.g_expired,
            format!(
                "expired total {} != sum over grants {}",
                a.expired, a.g_expired
            ),
        );
        check(
            a.held == a.r_held,
            format!("held total {} != held reservations {}", a.held, a.r_held),
        );
        check(
            a.committed == a.r_committed,
            format!(
                "committed total {} != committed reservations {}",
                a.committed, a.r_committed
            ),
        );
        check(
            a.j_count == a.journal_seq,
            format!(
                "journal has {} entries but the sequence is at {}",
                a.j_count, a.journal_seq
            ),
        );
        if a.journal_seq > 0 {
            check(
                a.j_available == Some(available) && a.j_held == Some(a.held),
                format!(
                    "last journal entry says available {:?} held {:?}, totals say {available} and {}",
                    a.j_available, a.j_held, a.held
                ),
            );
        }
    }
    for g in &grants {
        if g.remaining < 0 || g.expired < 0 || g.amount != g.remaining + g.expired + g.drawn {
            breach(
                &g.account_id,
                format!(
                    "grant {}: amount {} != remaining {} + expired {} + drawn by live reservations {}",
                    g.id, g.amount, g.remaining, g.expired, g.drawn
                ),
            );
        }
    }
    for r in &reservations {
        let ok = if r.exempt {
            r.amount == 0 && r.part_count == 0
        } else {
            r.amount == r.parts
        };
        if !ok {
            breach(
                &r.account_id,
                format!(
                    "reservation {}: amount {} but parts sum to {} (exempt {})",
                    r.id, r.amount, r.parts, r.exempt
                ),
            );
        }
    }
    Ok(out)
}
