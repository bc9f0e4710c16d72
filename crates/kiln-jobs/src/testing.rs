//! Test support (feature `testing`): the workspace's one test-database helper
//! (`kiln_ledger::testing::TestDb`), with the queue's tables set up too.

pub use kiln_ledger::testing::{Harness, TestDb};

/// A fresh database with the whole schema: kiln's migrations and apalis's tables.
pub async fn test_db(backend: kiln_ledger::Backend, max_connections: u32) -> TestDb {
    let t = TestDb::unmigrated(backend, max_connections).await;
    crate::migrate(&t.db).await.expect("migrate test database");
    t
}

/// A [`Harness`] on a fresh database with the whole schema.
pub async fn harness(
    backend: kiln_ledger::Backend,
    pricing: kiln_ledger::Pricing,
    max_connections: u32,
) -> Harness {
    Harness::on(test_db(backend, max_connections).await, pricing)
}
