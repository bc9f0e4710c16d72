//! Test harness: a fresh, migrated database per test on the real PostgreSQL server or a real
//! SQLite file, and the `backends!` macro that runs one test body against both.
#![allow(dead_code)]

use std::sync::Arc;

use kiln_ledger::{Backend, Ledger, ManualClock, Pricing, Timestamp};

pub use kiln_jobs::testing::TestDb;

/// 2026-01-31T10:00:00Z: a month end, so billing cycles cross short months.
pub fn start_time() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-31T10:00:00Z").expect("valid start time")
}

pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;

/// A ledger on a fresh database with a manual clock.
pub struct Harness {
    pub test_db: TestDb,
    pub ledger: Ledger,
    pub clock: ManualClock,
}

impl Harness {
    pub async fn new(backend: Backend) -> Harness {
        Harness::with(backend, Pricing::default(), 5).await
    }

    pub async fn with(backend: Backend, pricing: Pricing, max_connections: u32) -> Harness {
        let test_db = kiln_jobs::testing::test_db(backend, max_connections).await;
        let clock = ManualClock::new(start_time());
        let ledger = Ledger::new(
            test_db.db.clone(),
            Arc::new(pricing),
            Arc::new(clock.clone()),
        );
        Harness {
            test_db,
            ledger,
            clock,
        }
    }
}

/// The apalis tasks of `queue`: (id, payload).
pub async fn tasks(
    db: &kiln_ledger::Db,
    queue: &str,
) -> Vec<(kiln_jobs::TaskId, kiln_jobs::KitTask)> {
    kiln_jobs::apalis::tasks(db, queue).await.expect("tasks")
}
