//! Test support shared by kiln's test suites (feature `testing`): a fresh, migrated database
//! per test on the real PostgreSQL server (`KILN_TEST_PG_URL`, default the local one that
//! `make test` starts) or a real SQLite file, removed when dropped, even after a panic.

use std::sync::Arc;

use crate::{Backend, Db, DbOptions, Ledger, ManualClock, Pricing, Timestamp};

/// 2026-01-31T10:00:00Z: a month end, so billing cycles cross short months.
pub fn start_time() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-31T10:00:00Z").expect("valid start time")
}

pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 24 * HOUR;

/// A ledger on a fresh database with a manual clock that starts at [`start_time`].
#[derive(Debug)]
pub struct Harness {
    pub test_db: TestDb,
    pub ledger: Ledger,
    pub clock: ManualClock,
}

impl Harness {
    /// The ledger's schema, default prices, five connections.
    pub async fn new(backend: Backend) -> Harness {
        Harness::with(backend, Pricing::default(), 5).await
    }

    /// The ledger's schema.
    pub async fn with(backend: Backend, pricing: Pricing, max_connections: u32) -> Harness {
        Harness::on(TestDb::new(backend, max_connections).await, pricing)
    }

    /// On a database the caller made (e.g. with the job queue's tables too).
    pub fn on(test_db: TestDb, pricing: Pricing) -> Harness {
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

/// Shows logs on stderr when `TEST_LOG` is set (`TEST_LOG=1` for info, or a filter such as
/// `TEST_LOG=kit_worker=debug`); tests stay quiet otherwise. Every suite's databases come from
/// here, so every suite honours it.
pub fn init_test_log() {
    let Some(filter) = test_log_filter() else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// `TEST_LOG`'s log filter (`1` means info), if it is set.
pub fn test_log_filter() -> Option<String> {
    std::env::var("TEST_LOG")
        .ok()
        .map(|f| if f == "1" { "info".to_owned() } else { f })
}

/// The PostgreSQL server the tests create their databases on (`make test` starts it).
pub fn pg_admin_url() -> String {
    std::env::var("KILN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// A database that exists for one test and is removed when dropped, even after a panic.
#[derive(Debug)]
pub struct TestDb {
    pub db: Db,
    pub url: String,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    Postgres(String),
    Sqlite(std::path::PathBuf),
}

impl TestDb {
    /// A fresh database with the ledger's schema (kiln's migrations).
    pub async fn new(backend: Backend, max_connections: u32) -> TestDb {
        let t = TestDb::unmigrated(backend, max_connections).await;
        t.db.migrate().await.expect("migrate test database");
        t
    }

    /// A fresh, empty database: nothing migrated.
    pub async fn unmigrated(backend: Backend, max_connections: u32) -> TestDb {
        init_test_log();
        let tag = ulid::Ulid::generate().to_string().to_lowercase();
        let opts = DbOptions {
            max_connections,
            ..DbOptions::default()
        };
        let (url, cleanup) = match backend {
            Backend::Postgres => {
                let name = format!("kiln_test_{tag}");
                let admin = Db::connect(&pg_admin_url()).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is not reachable at {} ({e}); run `make test`",
                        pg_admin_url()
                    )
                });
                if let Db::Postgres(pool) = &admin {
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                        .execute(pool)
                        .await
                        .expect("create test database");
                }
                admin.close().await;
                let base = pg_admin_url();
                let root = base
                    .rsplit_once('/')
                    .map_or(base.as_str(), |(root, _)| root);
                (format!("{root}/{name}"), Cleanup::Postgres(name))
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("kiln-test-{tag}"));
                (
                    format!("sqlite://{}/kiln.db", dir.display()),
                    Cleanup::Sqlite(dir),
                )
            }
        };
        let db = Db::connect_with(&url, &opts)
            .await
            .expect("connect to test database");
        TestDb { db, url, cleanup }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Postgres(name) => {
                let name = name.clone();
                // Drop runs inside the test's runtime: do the async clean-up on a thread of its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let admin = Db::connect(&pg_admin_url()).await.ok()?;
                        if let Db::Postgres(pool) = &admin {
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await;
                        }
                        admin.close().await;
                        Some(())
                    })
                })
                .join();
            }
        }
    }
}

/// Runs each named `async fn(Backend)` as two tests: `<name>::postgres` and `<name>::sqlite`.
#[macro_export]
macro_rules! backends {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(kiln_ledger::Backend::Postgres).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(kiln_ledger::Backend::Sqlite).await
                }
            }
        )+
    };
}
