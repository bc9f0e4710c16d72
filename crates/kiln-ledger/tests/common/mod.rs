//! Test harness: a fresh, migrated database per test on the real PostgreSQL server or a real
//! SQLite file, and the `backends!` macro that runs one test body against both.
#![allow(dead_code)]

use std::sync::Arc;

use kiln_ledger::{Backend, Db, Ledger, ManualClock, Pricing, Timestamp};

pub use kiln_ledger::testing::TestDb;

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
        let test_db = TestDb::new(backend, max_connections).await;
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
pub async fn tasks(db: &Db, queue: &str) -> Vec<(String, kiln_ledger::jobs::KitTask)> {
    let rows: Vec<(String, Vec<u8>)> = match db {
        Db::Postgres(p) => {
            sqlx::query_as("SELECT id, job FROM apalis.jobs WHERE job_type = $1 ORDER BY id")
                .bind(queue)
                .fetch_all(p)
                .await
                .expect("tasks")
        }
        Db::Sqlite(p) => sqlx::query_as("SELECT id, job FROM Jobs WHERE job_type = $1 ORDER BY id")
            .bind(queue)
            .fetch_all(p)
            .await
            .expect("tasks"),
    };
    rows.into_iter()
        .map(|(id, job)| (id, serde_json::from_slice(&job).expect("task payload")))
        .collect()
}
