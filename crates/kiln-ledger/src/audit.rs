//! The invariants of DESIGN.md §3 checked against what is stored. Used by the tests after every
//! step and by `kiln audit` on a live database; an empty list means clean.

use kiln_core::AccountId;
use serde::Serialize;

use crate::LedgerError;
use crate::{Tx, on_tx};

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

// Each query comes in two forms, for every account and for one (which can use the indexes).
macro_rules! account_sums { ($filter:literal) => { concat!("SELECT a.id, a.granted, a.held, a.committed, a.expired, a.journal_seq, \
    CAST(COALESCE((SELECT SUM(g.amount) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_amount, \
    CAST(COALESCE((SELECT SUM(g.remaining) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_remaining, \
    CAST(COALESCE((SELECT SUM(g.expired) FROM grants g WHERE g.account_id = a.id), 0) AS BIGINT) AS g_expired, \
    CAST(COALESCE((SELECT SUM(r.amount) FROM reservations r WHERE r.account_id = a.id AND r.state = 'held'), 0) AS BIGINT) AS r_held, \
    CAST(COALESCE((SELECT SUM(r.amount) FROM reservations r WHERE r.account_id = a.id AND r.state = 'committed'), 0) AS BIGINT) AS r_committed, \
    (SELECT COUNT(*) FROM journal j WHERE j.account_id = a.id) AS j_count, \
    (SELECT j.available_after FROM journal j WHERE j.account_id = a.id ORDER BY j.seq DESC LIMIT 1) AS j_available, \
    (SELECT j.held_after FROM journal j WHERE j.account_id = a.id ORDER BY j.seq DESC LIMIT 1) AS j_held \
    FROM accounts a", $filter) }; }

// Joins and GROUP BY rather than a subquery per row: one pass over the parts, whatever the
// planner's statistics say.
macro_rules! grant_sums {
    ($filter:literal) => {
        concat!(
            "SELECT g.id, g.account_id, g.amount, g.remaining, g.expired, \
    CAST(COALESCE(SUM(CASE WHEN r.id IS NULL THEN 0 ELSE p.amount END), 0) AS BIGINT) AS drawn \
    FROM grants g \
    LEFT JOIN reservation_parts p ON p.grant_id = g.id \
    LEFT JOIN reservations r ON r.id = p.reservation_id AND r.state IN ('held', 'committed')",
            $filter,
            " GROUP BY g.id, g.account_id, g.amount, g.remaining, g.expired"
        )
    };
}

macro_rules! reservation_sums {
    ($filter:literal) => {
        concat!(
            "SELECT r.id, r.account_id, r.amount, r.exempt, \
    CAST(COALESCE(SUM(p.amount), 0) AS BIGINT) AS parts, COUNT(p.reservation_id) AS part_count \
    FROM reservations r LEFT JOIN reservation_parts p ON p.reservation_id = r.id",
            $filter,
            " GROUP BY r.id, r.account_id, r.amount, r.exempt"
        )
    };
}

#[derive(sqlx::FromRow)]
struct HoldCheck {
    id: String,
    account_id: String,
    status: String,
    r_account: String,
    r_state: String,
    r_action: String,
    action: String,
}

macro_rules! hold_checks {
    ($filter:literal) => {
        concat!(
            "SELECT h.id, h.account_id, h.status, h.action, r.account_id AS r_account, r.state AS r_state, \
    r.action AS r_action FROM holds h JOIN reservations r ON r.id = h.reservation_id",
            $filter
        )
    };
}

/// Runs one of the queries above for every account, or for the one given.
macro_rules! fetch_sums {
    ($tx:expr, $query:ident, $one:literal, $account:expr) => {
        match $account {
            None => on_tx!($tx, c => sqlx::query_as($query!("")).fetch_all(&mut **c).await?),
            Some(id) => on_tx!($tx, c => sqlx::query_as($query!($one))
                .bind(id.to_string())
                .fetch_all(&mut **c)
                .await?),
        }
    };
}

/// Checks one account, or all of them.
pub async fn audit(tx: &mut Tx, account: Option<AccountId>) -> Result<Vec<Breach>, LedgerError> {
    let accounts: Vec<AccountSums> = fetch_sums!(tx, account_sums, " WHERE a.id = $1", account);
    let grants: Vec<GrantSums> = fetch_sums!(tx, grant_sums, " WHERE g.account_id = $1", account);
    let reservations: Vec<ReservationSums> =
        fetch_sums!(tx, reservation_sums, " WHERE r.account_id = $1", account);

    let holds: Vec<HoldCheck> = fetch_sums!(tx, hold_checks, " WHERE h.account_id = $1", account);

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
    for h in &holds {
        let agrees = h
            .status
            .parse::<crate::HoldStatus>()
            .is_ok_and(|s| s.reservation_state().as_str() == h.r_state);
        if !agrees || h.r_account != h.account_id || h.r_action != h.action {
            breach(
                &h.account_id,
                format!(
                    "hold {} is {} for {} but its reservation is {} for {} on account {}",
                    h.id, h.status, h.action, h.r_state, h.r_action, h.r_account
                ),
            );
        }
    }
    Ok(out)
}
