//! Test harness: a fresh database with the ledger's and the queue's tables per test, on the
//! real PostgreSQL server or a real SQLite file (`kiln_ledger::testing`, one helper for the
//! workspace).
// Each test binary uses a part of this.
#![allow(dead_code, unused_imports)]

use kiln_ledger::{Backend, Pricing};

pub use kiln_ledger::testing::{DAY, HOUR, Harness};

/// Default prices, five connections.
pub async fn harness(backend: Backend) -> Harness {
    kiln_jobs::testing::harness(backend, Pricing::default(), 5).await
}

/// The apalis tasks of `queue`: (id, payload).
pub async fn tasks(
    db: &kiln_ledger::Db,
    queue: &str,
) -> Vec<(kiln_jobs::TaskId, kiln_jobs::KitTask)> {
    kiln_jobs::apalis::tasks(db, queue).await.expect("tasks")
}
