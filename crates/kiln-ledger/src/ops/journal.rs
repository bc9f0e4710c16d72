//! A locked account being worked on: its totals change in memory (`Locked`) and are saved, with
//! the journal entries that explain each change, in `save`; and the journal read back, paged.

use super::prelude::*;

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

pub(crate) struct NewEntry {
    pub(crate) entry: EntryType,
    pub(crate) amount: Credits,
    pub(crate) kind: Option<CreditKind>,
    pub(crate) grant_id: Option<GrantId>,
    pub(crate) reservation_id: Option<ReservationId>,
    pub(crate) action: Option<Action>,
    pub(crate) list_price: Option<Credits>,
    pub(crate) reference: Option<String>,
    pub(crate) available_after: Credits,
    pub(crate) held_after: Credits,
}

impl NewEntry {
    pub(crate) fn new(entry: EntryType, amount: Credits) -> NewEntry {
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

    pub(crate) fn for_grant(
        entry: EntryType,
        amount: Credits,
        grant: GrantId,
        kind: CreditKind,
    ) -> NewEntry {
        NewEntry {
            kind: Some(kind),
            grant_id: Some(grant),
            ..NewEntry::new(entry, amount)
        }
    }

    pub(crate) fn for_reservation(entry: EntryType, r: &Reservation) -> NewEntry {
        NewEntry {
            reservation_id: Some(r.id),
            action: Some(r.action),
            list_price: Some(r.list_price),
            reference: Some(r.idempotency_key.clone()),
            ..NewEntry::new(entry, r.amount)
        }
    }
}

pub(crate) struct Locked {
    pub(crate) account: Account,
    pub(crate) renewed_cycle: Option<Timestamp>,
    pub(crate) next_renewal: Option<Timestamp>,
    pub(crate) totals: Totals,
    pub(crate) journal_seq: i64,
    pub(crate) entries: Vec<NewEntry>,
}

pub(crate) fn corrupt_sub(what: &str) -> LedgerError {
    LedgerError::Corrupt(format!("{what} would go negative"))
}

impl Locked {
    pub(crate) fn from_row(row: AccountRow) -> Result<Locked> {
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

    pub(crate) fn record(&mut self, mut e: NewEntry) {
        e.available_after = self.totals.available();
        e.held_after = self.totals.held;
        self.entries.push(e);
    }

    pub(crate) fn granted(&mut self, g: &Grant) -> Result<()> {
        self.totals.granted = self.totals.granted.checked_add(g.amount)?;
        let mut e = NewEntry::for_grant(EntryType::Grant, g.amount, g.id, g.kind);
        e.reference = Some(g.source.clone());
        self.record(e);
        Ok(())
    }

    pub(crate) fn expired(
        &mut self,
        grant: GrantId,
        kind: Option<CreditKind>,
        amount: Credits,
    ) -> Result<()> {
        self.totals.expired = self.totals.expired.checked_add(amount)?;
        self.record(NewEntry {
            kind,
            grant_id: Some(grant),
            ..NewEntry::new(EntryType::Expire, amount)
        });
        Ok(())
    }

    pub(crate) fn reserved(&mut self, r: &Reservation) -> Result<()> {
        self.totals.held = self.totals.held.checked_add(r.amount)?;
        self.record(NewEntry::for_reservation(EntryType::Reserve, r));
        Ok(())
    }

    /// A reservation stops being held (committed or released).
    pub(crate) fn unhold(&mut self, r: &Reservation) -> Result<()> {
        self.totals.held = self
            .totals
            .held
            .checked_sub(r.amount)
            .ok_or_else(|| corrupt_sub("held"))?;
        Ok(())
    }

    /// A new reservation: held, and for a charge committed at once.
    pub(crate) fn held_for(&mut self, r: &Reservation) -> Result<()> {
        self.reserved(r)?;
        if r.state == ReservationState::Committed {
            self.committed(r)?;
        }
        Ok(())
    }

    /// **The commit rule**: the amount leaves `held` for `committed`, and one `commit` entry
    /// records it with the balances after. This is its source; `resolve::COMMIT_PG` is the
    /// same rule in one PostgreSQL statement, and the model test holds both to the model
    /// (SQLite commits through here, PostgreSQL through the statement).
    pub(crate) fn committed(&mut self, r: &Reservation) -> Result<()> {
        self.unhold(r)?;
        self.totals.committed = self.totals.committed.checked_add(r.amount)?;
        self.record(NewEntry::for_reservation(EntryType::Commit, r));
        Ok(())
    }

    pub(crate) fn released(&mut self, r: &Reservation) -> Result<()> {
        self.unhold(r)?;
        self.record(NewEntry::for_reservation(EntryType::Release, r));
        Ok(())
    }

    /// The monthly allowance this account is granted each cycle, if any.
    pub(crate) fn allowance(&self, pricing: &Pricing) -> Option<Credits> {
        match self.account.plan {
            PlanId::Enterprise => self
                .account
                .monthly_allowance
                .or(pricing.plan(PlanId::Enterprise).monthly_credits),
            plan => pricing.plan(plan).monthly_credits,
        }
    }
}

pub(crate) const LOCK_ACCOUNT_PG: &str = "SELECT * FROM accounts WHERE id = $1 FOR UPDATE";

// SQLite writers hold the database write lock from BEGIN IMMEDIATE on.
pub(crate) const LOCK_ACCOUNT_SQLITE: &str = "SELECT * FROM accounts WHERE id = $1";

pub(crate) async fn lock(tx: &mut Tx, id: AccountId) -> Result<Locked> {
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

pub(crate) const UPDATE_ACCOUNT: &str = "UPDATE accounts SET granted = $2, held = $3, committed = $4, expired = $5, \
    journal_seq = $6, renewed_cycle_ms = $7, next_renewal_ms = $8 WHERE id = $1";

pub(crate) const INSERT_JOURNAL: &str = "INSERT INTO journal (account_id, seq, at_ms, entry, amount, kind, grant_id, \
    reservation_id, action, list_price, reference, available_after, held_after) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

// PostgreSQL: the journal entries and the totals in one statement, whatever the number of entries.
pub(crate) const SAVE_PG: &str = "WITH j AS (INSERT INTO journal (account_id, seq, at_ms, entry, amount, kind, grant_id, \
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
pub(crate) fn column<'e, T>(entries: &'e [NewEntry], f: impl Fn(&'e NewEntry) -> T) -> Vec<T> {
    entries.iter().map(f).collect()
}

/// Writes the account's totals and appends its new journal entries.
pub(crate) async fn save(tx: &mut Tx, acct: &mut Locked, now: Timestamp) -> Result<()> {
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
