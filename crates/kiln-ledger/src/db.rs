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

/// Runs `$body` with `$c` bound to the concrete transaction of whichever backend `$tx` holds
/// (kiln-jobs writes its statements the same way).
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Postgres($c) => $body,
            $crate::Tx::Sqlite($c) => $body,
        }
    };
}

/// Runs `$body` with `$p` bound to the pool of whichever backend `$db` is: one statement,
/// outside any transaction (autocommit), for reads that need no more — a `BEGIN` and a
/// `ROLLBACK` would be two round trips more than the statement itself.
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::Db::Postgres($p) => $body,
            $crate::Db::Sqlite($p) => $body,
        }
    };
}

/// Connection settings beyond the URL.
#[derive(Clone, Debug)]
pub struct DbOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite: create the file (and its directory) when missing. Off for commands that must
    /// find a migrated database, so they leave no empty file behind.
    pub create: bool,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            create: true,
        }
    }
}

/// A connection idle this long is pinged before it is handed out.
const PING_WHEN_IDLE: Duration = Duration::from_secs(2);

/// sqlx pings every connection it takes from the pool by default: one round trip more for
/// each statement, which doubled the round trips of a status poll (one indexed read). A
/// connection in steady use has just proven itself; only one idle for a while is pinged, so a
/// server restart during a quiet spell is still noticed before a statement fails on it.
fn ping_when_idle<DB: sqlx::Database>(
    opts: sqlx::pool::PoolOptions<DB>,
) -> sqlx::pool::PoolOptions<DB> {
    opts.test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// `pool.begin()` on a task of its own, so it runs to the end whatever becomes of the caller.
/// sqlx 0.9.0's `Pool::begin` dropped while its `BEGIN` is in flight returns the connection to
/// the pool inside a transaction that nothing will end (transact-rs/sqlx#4393): the next
/// borrower's statements run inside it, hold their locks and are not committed. kiln drops such
/// futures routinely (a lease renewer aborted when its attempt ends, an attempt past its
/// deadline, a client that hung up); here the caller going away leaves a whole transaction
/// behind, and a whole transaction dropped rolls back. (Closing any connection that comes back
/// inside a transaction would also cover begins kiln does not make, apalis's, but the check
/// costs a round trip per release: reserve+commit pairs fell from 0.60x to 0.43x of pgbench.)
async fn begin_pg(pool: &PgPool) -> Result<Transaction<'static, Postgres>, LedgerError> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin().await })
        .await
        .map_err(|e| LedgerError::Database(sqlx::Error::Io(std::io::Error::other(e))))?
        .map_err(LedgerError::from)
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
                ping_when_idle(PgPoolOptions::new())
                    .max_connections(opts.max_connections)
                    .acquire_timeout(opts.acquire_timeout)
                    .connect(url)
                    .await?,
            )),
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(opts.create)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(opts.acquire_timeout);
                if !opts.create && !options.get_filename().exists() {
                    return Err(LedgerError::NoDatabase(
                        options.get_filename().display().to_string(),
                    ));
                }
                if let Some(dir) = options
                    .get_filename()
                    .parent()
                    .filter(|d| opts.create && !d.as_os_str().is_empty())
                {
                    create_dir(dir)?;
                }
                Ok(Db::Sqlite(
                    ping_when_idle(SqlitePoolOptions::new())
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

    /// Applies kiln's own migrations (the ledger's tables and `kit_jobs`). They are recorded in
    /// `kiln_migrations`, not sqlx's default table, which apalis-sqlite claims for its own. The
    /// job queue's engine tables are kiln-jobs' to set up (`kiln_jobs::migrate`).
    pub async fn migrate(&self) -> Result<(), LedgerError> {
        match self {
            Db::Postgres(pool) => migrator(Backend::Postgres).run(pool).await?,
            Db::Sqlite(pool) => migrator(Backend::Sqlite).run(pool).await?,
        }
        Ok(())
    }

    /// Where the schema stands against the migrations this binary carries. Reads only: on a
    /// database nobody migrated it creates nothing.
    pub async fn schema(&self) -> Result<Schema, LedgerError> {
        let applied: Vec<i64> = match self {
            Db::Postgres(pool) => {
                let exists: bool =
                    sqlx::query_scalar("SELECT to_regclass('kiln_migrations') IS NOT NULL")
                        .fetch_one(pool)
                        .await?;
                if !exists {
                    return Ok(Schema::Unmigrated);
                }
                sqlx::query_scalar(
                    "SELECT version FROM kiln_migrations WHERE success ORDER BY version",
                )
                .fetch_all(pool)
                .await?
            }
            Db::Sqlite(pool) => {
                let exists: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'kiln_migrations'",
                )
                .fetch_one(pool)
                .await?;
                if exists == 0 {
                    return Ok(Schema::Unmigrated);
                }
                sqlx::query_scalar(
                    "SELECT version FROM kiln_migrations WHERE success ORDER BY version",
                )
                .fetch_all(pool)
                .await?
            }
        };
        let known: Vec<i64> = migrator(self.backend())
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| m.version)
            .collect();
        Ok(if applied.iter().any(|v| !known.contains(v)) {
            Schema::Newer {
                applied: applied.last().copied().unwrap_or(0),
                known: known.last().copied().unwrap_or(0),
            }
        } else if applied.len() < known.len() {
            Schema::Behind {
                applied: applied.last().copied().unwrap_or(0),
                known: known.last().copied().unwrap_or(0),
            }
        } else {
            Schema::Current
        })
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout instead of failing when a
    /// reader tries to upgrade.
    pub async fn begin(&self) -> Result<Tx, LedgerError> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(begin_pg(pool).await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Begins a read-only transaction (a consistent snapshot; never blocks writers on SQLite).
    pub async fn begin_read(&self) -> Result<Tx, LedgerError> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(begin_pg(pool).await?),
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

/// kiln's migrations for `backend`, embedded in the binary.
fn migrator(backend: Backend) -> sqlx::migrate::Migrator {
    let mut m = match backend {
        Backend::Postgres => sqlx::migrate!("../../migrations/postgres"),
        Backend::Sqlite => sqlx::migrate!("../../migrations/sqlite"),
    };
    m.dangerous_set_table_name("kiln_migrations");
    m
}

/// Where a database's schema stands against this binary's migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// Every migration this binary knows is applied, and no other.
    Current,
    /// Never migrated (no migration table).
    Unmigrated,
    /// Older than this binary: `kiln migrate` brings it up.
    Behind { applied: i64, known: i64 },
    /// Migrated by a newer kiln: this binary must not touch it.
    Newer { applied: i64, known: i64 },
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
