//! Test harness: a fresh, migrated database per test on the real PostgreSQL server or a real
//! SQLite file, and the `backends!` macro that runs one test body against both.
// Each test binary uses a part of this.
#![allow(dead_code, unused_imports)]

pub use kiln_ledger::testing::{DAY, HOUR, Harness, TestDb, start_time};
