//! The invariants of DESIGN.md §3 checked against what is stored. Used by the tests after every
//! step and by `kiln audit` on a live database; an empty list means clean.

use std::collections::HashMap;

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

/// One journal entry, as the replay reads it.
#[derive(sqlx::FromRow)]
struct Entry {
    account_id: String,
    seq: i64,
    entry: String,
    amount: i64,
    grant_id: Option<i64>,
    reservation_id: Option<i64>,
    available_after: i64,
    held_after: i64,
}

macro_rules! journal_entries {
    ($filter:literal) => {
        concat!(
            "SELECT account_id, seq, entry, amount, grant_id, reservation_id, available_after, \
    held_after FROM journal",
            $filter,
            " ORDER BY account_id, seq"
        )
    };
}

/// A grant or a reservation as the replay checks the journal against it.
#[derive(sqlx::FromRow)]
struct Granted {
    id: i64,
    account_id: String,
    amount: i64,
    expired: i64,
}

macro_rules! grant_rows {
    ($filter:literal) => {
        concat!(
            "SELECT id, account_id, amount, expired FROM grants g",
            $filter
        )
    };
}

#[derive(sqlx::FromRow)]
struct Reserved {
    id: i64,
    account_id: String,
    amount: i64,
    list_price: i64,
    exempt: bool,
    state: String,
}

macro_rules! reservation_rows {
    ($filter:literal) => {
        concat!(
            "SELECT id, account_id, amount, list_price, exempt, state FROM reservations r",
            $filter
        )
    };
}

/// Two subscription grants for one billing cycle (the cycle's end is the grants' expiry),
/// whatever their sources say.
#[derive(sqlx::FromRow)]
struct DoubleCycle {
    account_id: String,
    expires_at_ms: Option<i64>,
    n: i64,
}

macro_rules! double_cycles {
    ($filter:literal) => {
        concat!(
            "SELECT g.account_id, g.expires_at_ms, COUNT(*) AS n FROM grants g \
    WHERE g.kind = 'subscription'",
            $filter,
            " GROUP BY g.account_id, g.expires_at_ms HAVING COUNT(*) > 1"
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
    let entries: Vec<Entry> = fetch_sums!(tx, journal_entries, " WHERE account_id = $1", account);
    let grant_rows: Vec<Granted> = fetch_sums!(tx, grant_rows, " WHERE g.account_id = $1", account);
    let reservation_rows: Vec<Reserved> =
        fetch_sums!(tx, reservation_rows, " WHERE r.account_id = $1", account);
    let doubles: Vec<DoubleCycle> =
        fetch_sums!(tx, double_cycles, " AND g.account_id = $1", account);

    let mut out = Vec::new();
    let breach = |out: &mut Vec<Breach>, account: &str, what: String| {
        out.push(Breach {
            account_id: account.to_owned(),
            what,
        })
    };
    for a in &accounts {
        let mut check = |ok: bool, what: String| {
            if !ok {
                breach(&mut out, &a.id, what);
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
                &mut out,
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
                &mut out,
                &r.account_id,
                format!(
                    "reservation {}: amount {} but parts sum to {} (exempt {})",
                    r.id, r.amount, r.parts, r.exempt
                ),
            );
        }
    }
    for d in &doubles {
        breach(
            &mut out,
            &d.account_id,
            format!(
                "{} subscription grants for the one cycle ending at {} ms",
                d.n,
                d.expires_at_ms.map_or("never".into(), |t| t.to_string())
            ),
        );
    }
    for r in &reservation_rows {
        let price = if r.exempt { 0 } else { r.list_price };
        if r.amount != price {
            breach(
                &mut out,
                &r.account_id,
                format!(
                    "reservation {}: amount {} but its list price is {} (exempt {})",
                    r.id, r.amount, r.list_price, r.exempt
                ),
            );
        }
    }
    out.extend(replay(&entries, &accounts, &grant_rows, &reservation_rows));
    for h in &holds {
        let agrees = h
            .status
            .parse::<crate::HoldStatus>()
            .is_ok_and(|s| s.reservation_state().as_str() == h.r_state);
        if !agrees || h.r_account != h.account_id || h.r_action != h.action {
            breach(
                &mut out,
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

/// What the journal says happened to one reservation.
#[derive(Default)]
struct Seen {
    reserved: u32,
    committed: u32,
    released: u32,
}

/// Replays each account's journal from its first entry: the sequence has no gaps, every entry's
/// balances are the running totals after it, every grant is granted once for its amount and
/// expires no more than the grant says, and every reservation is reserved once for its amount
/// and resolved at most once, as its state says. The totals at the end are the account's.
/// (The checks on the last entry and the count alone passed a reservation resolved twice.)
fn replay(
    entries: &[Entry],
    accounts: &[AccountSums],
    grants: &[Granted],
    reservations: &[Reserved],
) -> Vec<Breach> {
    let mut out = Vec::new();
    let grant_by_id: HashMap<i64, &Granted> = grants.iter().map(|g| (g.id, g)).collect();
    let reservation_by_id: HashMap<i64, &Reserved> =
        reservations.iter().map(|r| (r.id, r)).collect();
    let mut granted_seen: HashMap<i64, (u32, i64)> = HashMap::new();
    let mut reserved_seen: HashMap<i64, Seen> = HashMap::new();
    let mut by_account: HashMap<&str, &[Entry]> = HashMap::new();
    for chunk in entries.chunk_by(|a, b| a.account_id == b.account_id) {
        by_account.insert(chunk[0].account_id.as_str(), chunk);
    }
    for a in accounts {
        let mut breach = |what: String| {
            out.push(Breach {
                account_id: a.id.clone(),
                what,
            })
        };
        let journal = by_account.get(a.id.as_str()).copied().unwrap_or_default();
        let (mut granted, mut held, mut committed, mut expired) = (0i64, 0i64, 0i64, 0i64);
        // After the first wrong balance every later one is wrong too: one report is enough.
        let mut balances_ok = true;
        // The same for a gap in the sequence: every later entry is off by it.
        let mut expected_seq = 0i64;
        for e in journal {
            let at = format!("journal entry {}", e.seq);
            expected_seq += 1;
            if e.seq != expected_seq {
                breach(format!("{at} is number {expected_seq} in the journal"));
                expected_seq = e.seq;
            }
            match (e.entry.as_str(), e.grant_id, e.reservation_id) {
                ("grant", Some(g), _) => {
                    granted += e.amount;
                    let seen = granted_seen.entry(g).or_default();
                    seen.0 += 1;
                    match grant_by_id.get(&g) {
                        Some(gr) if gr.account_id == a.id && gr.amount == e.amount => {}
                        Some(gr) => breach(format!(
                            "{at} grants {} from grant {g}, which is {} on account {}",
                            e.amount, gr.amount, gr.account_id
                        )),
                        None => breach(format!("{at} grants from grant {g}, which does not exist")),
                    }
                }
                ("expire", Some(g), _) => {
                    expired += e.amount;
                    granted_seen.entry(g).or_default().1 += e.amount;
                }
                ("reserve" | "commit" | "release", _, Some(r)) => {
                    let seen = reserved_seen.entry(r).or_default();
                    let amount_ok = reservation_by_id
                        .get(&r)
                        .is_some_and(|res| res.account_id == a.id && res.amount == e.amount);
                    if !amount_ok {
                        breach(format!(
                            "{at} ({}) moves {} for reservation {r}, which does not match it",
                            e.entry, e.amount
                        ));
                    }
                    match e.entry.as_str() {
                        "reserve" => {
                            seen.reserved += 1;
                            held += e.amount;
                        }
                        resolution => {
                            if seen.reserved == 0 || seen.committed + seen.released > 0 {
                                breach(format!(
                                    "{at} {}s reservation {r}, which was not held then \
                                     (reserved {} times, resolved {} times before)",
                                    resolution,
                                    seen.reserved,
                                    seen.committed + seen.released
                                ));
                            }
                            held -= e.amount;
                            if resolution == "commit" {
                                seen.committed += 1;
                                committed += e.amount;
                            } else {
                                seen.released += 1;
                            }
                        }
                    }
                }
                _ => breach(format!(
                    "{at} is a {} without its grant or reservation",
                    e.entry
                )),
            }
            let available = granted - held - committed - expired;
            if balances_ok && (e.available_after != available || e.held_after != held) {
                balances_ok = false;
                breach(format!(
                    "{at} says available {} held {} after it; replaying the journal gives \
                     available {available} held {held}",
                    e.available_after, e.held_after
                ));
            }
        }
        if (granted, held, committed, expired) != (a.granted, a.held, a.committed, a.expired) {
            breach(format!(
                "the journal replays to granted {granted} held {held} committed {committed} \
                 expired {expired}; the account says {} {} {} {}",
                a.granted, a.held, a.committed, a.expired
            ));
        }
    }
    for g in grants {
        let (times, expired) = granted_seen.get(&g.id).copied().unwrap_or_default();
        if times != 1 || expired != g.expired {
            out.push(Breach {
                account_id: g.account_id.clone(),
                what: format!(
                    "grant {}: granted {times} times in the journal (once expected), \
                     {expired} expired there, {} on the grant",
                    g.id, g.expired
                ),
            });
        }
    }
    for r in reservations {
        let seen = reserved_seen.remove(&r.id).unwrap_or_default();
        let expected = match r.state.as_str() {
            "held" => (1, 0, 0),
            "committed" => (1, 1, 0),
            _ => (1, 0, 1),
        };
        if (seen.reserved, seen.committed, seen.released) != expected {
            out.push(Breach {
                account_id: r.account_id.clone(),
                what: format!(
                    "reservation {} is {} but the journal reserves it {} times, commits it {} \
                     and releases it {}",
                    r.id, r.state, seen.reserved, seen.committed, seen.released
                ),
            });
        }
    }
    out
}
