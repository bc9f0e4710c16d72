//! The two databases behind one connection type. `Tx` is an open transaction on either; the
//! `on_tx!` macro expands one body of query code once per backend, so every statement is
//! written once and compiled against each concrete driver (no runtime SQL assembly, no `Any`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};

use crate::LedgerError;

/// Which database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A connection pool on either database.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// An open transaction on either database. Dropped without `commit`, it rolls back.
#[derive(Debug)]
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// Runs `$body` with `$c` bound to the concrete transaction of whichever backend `$tx` holds.
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        match $tx {
            $crate::db::Tx::Postgres($c) => $body,
            $crate::db::Tx::Sqlite($c) => $body,
        }
    };
}
pub(crate) use on_tx;

/// Connection settings beyond the URL.
#[derive(Clone, Debug)]
pub struct DbOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
        }
    }
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend, LedgerError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(LedgerError::BadDatabaseUrl(url.to_owned()))
        }
    }
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db, LedgerError> {
        Db::connect_with(url, &DbOptions::default()).await
    }

    /// Opens a pool. SQLite files (and their directory) are created when missing, in WAL mode
    /// with `synchronous=FULL`: a committed charge survives power loss.
    pub async fn connect_with(url: &str, opts: &DbOptions) -> Result<Db, LedgerError> {
        match Backend::of_url(url)? {
            Backend::Postgres => Ok(Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect(url)
                    .await?,
            )),
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(opts.acquire_timeout);
                if let Some(dir) = options
                    .get_filename()
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                {
                    create_dir(dir)?;
                }
                Ok(Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(opts.max_connections)
                        .acquire_timeout(opts.acquire_timeout)
                        .connect_with(options)
                        .await?,
                ))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies kiln's migrations. They are recorded in `kiln_migrations`, not sqlx's default
    /// table, which apalis-sqlite claims for its own.
    pub async fn migrate(&self) -> Result<(), LedgerError> {
        match self {
            Db::Postgres(pool) => {
                let mut m = sqlx::migrate!("../../migrations/postgres");
                m.dangerous_set_table_name("kiln_migrations");
                m.run(pool).await?;
                // apalis's task tables (schema `apalis`, history in apalis._sqlx_migrations).
                sqlx::query("CREATE EXTENSION IF NOT EXISTS hstore")
                    .execute(pool)
                    .await?;
                apalis_postgres::PostgresStorage::migrations()
                    .run(pool)
                    .await?;
                // After apalis's migrations, every time (a later apalis version could bring
                // them back): kiln writes every task itself and wakes workers itself, after
                // its commit, because a NOTIFY inside the enqueue transaction serializes
                // enqueue commits (docs/JOBS.md); and two of apalis's indexes duplicate
                // others (`unique_job_id` = the primary key, `lidx` = `idx_apalis_jobs_lock_by`),
                // costing every task insert and status change for nothing.
                sqlx::raw_sql(
                    "DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs; \
                     DROP INDEX IF EXISTS apalis.unique_job_id; \
                     DROP INDEX IF EXISTS apalis.lidx;",
                )
                .execute(pool)
                .await?;
            }
            Db::Sqlite(pool) => {
                let mut m = sqlx::migrate!("../../migrations/sqlite");
                m.dangerous_set_table_name("kiln_migrations");
                m.run(pool).await?;
                // apalis's task tables, with their history in sqlx's default table. Not
                // `SqliteStorage::setup`: it would switch the file to `synchronous=OFF`.
                apalis_sqlite::SqliteStorage::migrations().run(pool).await?;
            }
        }
        Ok(())
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout instead of failing when a
    /// reader tries to upgrade.
    pub async fn begin(&self) -> Result<Tx, LedgerError> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Begins a read-only transaction (a consistent snapshot; never blocks writers on SQLite).
    pub async fn begin_read(&self) -> Result<Tx, LedgerError> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
        })
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), LedgerError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        LedgerError::Io(format!(
            "cannot create database directory {}: {e}",
            dir.display()
        ))
    })
}

impl Tx {
    pub async fn commit(self) -> Result<(), LedgerError> {
        on_tx!(self, c => c.commit().await?);
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Tx::Postgres(_) => Backend::Postgres,
            Tx::Sqlite(_) => Backend::Sqlite,
        }
    }
}
