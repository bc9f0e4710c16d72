//! Connections held open for one-statement reads on the hottest path (a job status poll): a
//! read through sqlx's pool pays a ping when the connection goes back (sqlx does it
//! unconditionally, in a spawned task), so a poll cost two round trips where one does. A
//! handful of connections kept outside the pool pay neither. Connected lazily, replaced after
//! any error, and on SQLite (no network) the pool is used as it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Mutex, MutexGuard};

use crate::Db;

/// Where one-statement reads run: held connections on PostgreSQL, the pool otherwise.
#[derive(Clone, Debug)]
pub enum ReadDb {
    Held(Arc<Held>),
    Pool(Db),
}

impl ReadDb {
    /// Up to `n` held connections on PostgreSQL (opened on first use); the pool itself on
    /// SQLite.
    pub fn new(db: &Db, n: usize) -> ReadDb {
        match db {
            Db::Postgres(pool) => ReadDb::Held(Arc::new(Held {
                options: (*pool.connect_options()).clone(),
                slots: (0..n.max(1)).map(|_| Mutex::new(None)).collect(),
                next: AtomicUsize::new(0),
            })),
            Db::Sqlite(_) => ReadDb::Pool(db.clone()),
        }
    }
}

/// A few PostgreSQL connections, each used by one read at a time.
#[derive(Debug)]
pub struct Held {
    options: PgConnectOptions,
    slots: Vec<Mutex<Option<PgConnection>>>,
    next: AtomicUsize,
}

/// One held connection, taken for one statement.
#[derive(Debug)]
pub struct Taken<'a>(MutexGuard<'a, Option<PgConnection>>, &'a Held);

impl Held {
    /// A free connection if there is one, else the next in turn once it is free.
    pub async fn take(&self) -> Result<Taken<'_>, sqlx::Error> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let free = (0..n).find_map(|k| self.slots[(start + k) % n].try_lock().ok());
        let guard = match free {
            Some(g) => g,
            None => self.slots[start % n].lock().await,
        };
        let mut taken = Taken(guard, self);
        taken.connect().await?;
        Ok(taken)
    }
}

impl Taken<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("connected in take")
    }

    /// Opens the connection if it is closed.
    pub async fn connect(&mut self) -> Result<(), sqlx::Error> {
        if self.0.is_none() {
            *self.0 = Some(self.1.options.connect().await?);
        }
        Ok(())
    }

    /// After `error`: closes the connection (the next read opens a fresh one) and says whether
    /// the statement is worth one more try on a fresh connection — the server closed this one
    /// (a restart, an idle timeout), which says nothing about the next.
    pub fn failed(&mut self, error: &sqlx::Error) -> bool {
        self.0.take();
        match error {
            sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(e) => e
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
            _ => false,
        }
    }
}

/// Runs `$body` (a `Result<_, sqlx::Error>`) with `$c` bound to a held connection
/// (`&mut PgConnection`) or to the pool, as `$r` (a `ReadDb`) has it. A statement that fails
/// because the server closed a held connection runs once more on a fresh one.
#[macro_export]
macro_rules! on_read {
    ($r:expr, $c:ident => $body:expr) => {
        match $r {
            $crate::ReadDb::Held(held) => match held.take().await {
                Err(e) => Err(e),
                Ok(mut taken) => {
                    let first = {
                        let $c = taken.conn();
                        $body
                    };
                    match first {
                        Err(e) if taken.failed(&e) => match taken.connect().await {
                            Err(e) => Err(e),
                            Ok(()) => {
                                let $c = taken.conn();
                                let again = $body;
                                if let Err(e) = &again {
                                    taken.failed(e);
                                }
                                again
                            }
                        },
                        other => other,
                    }
                }
            },
            $crate::ReadDb::Pool(db) => $crate::on_pool!(db, $c => $body),
        }
    };
}
