//! Test harness: a fresh, migrated database per test on the real PostgreSQL server or a real
//! SQLite file, and the `backends!` macro that runs one test body against both.
// Each test binary uses a part of this.
#![allow(dead_code, unused_imports)]

pub use kiln_ledger::testing::{DAY, HOUR, Harness, TestDb, start_time};

use kiln_ledger::{AccountId, NewAccount, PlanId, Tx};

/// A member (not admin) account on `plan`, price-list allowance.
pub fn new_account(plan: PlanId) -> NewAccount {
    NewAccount {
        plan,
        is_admin: false,
        email: None,
        monthly_allowance: None,
    }
}

/// Opens a Discover account (200 welcome credits).
pub async fn discover_account(h: &Harness) -> AccountId {
    h.ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create account")
        .account
        .id
}

/// Runs `sql` behind the ledger's back (tampering, for the audit tests).
pub async fn tamper(tx: &mut Tx, sql: &'static str) {
    match tx {
        Tx::Postgres(c) => sqlx::query(sql).execute(&mut **c).await.map(drop),
        Tx::Sqlite(c) => sqlx::query(sql).execute(&mut **c).await.map(drop),
    }
    .unwrap_or_else(|e| panic!("tamper {sql}: {e}"));
}
