//! A caller that goes away while its `BEGIN` is in flight (an aborted lease renewer, an attempt
//! past its deadline, an HTTP client that hangs up) must not leave the pooled connection inside
//! a transaction: the next borrower's statements would run in it, hold their locks, and never
//! be committed (sqlx 0.9.0 on PostgreSQL: transact-rs/sqlx#4393).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use kiln_ledger::testing::TestDb;
use kiln_ledger::{Backend, Db};

/// Polls `f` once — far enough to put its `BEGIN` on the wire — and drops it.
async fn poll_once_and_drop<F: Future>(f: F) {
    let mut f: Pin<Box<F>> = Box::pin(f);
    std::future::poll_fn(|cx| {
        let _ = f.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
    drop(f);
}

fn pool(db: &Db) -> &sqlx::PgPool {
    match db {
        Db::Postgres(p) => p,
        Db::Sqlite(_) => unreachable!("a PostgreSQL test database"),
    }
}

/// kiln's own begin finishes on its own: after each dropped begin, a one-statement write on the
/// pool's only connection is committed (seen from another connection), and the transaction
/// having been rolled back whole, the connection is lent again: every round runs on the one
/// server session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_db_begin_leaves_no_transaction_open() {
    // One connection, so every round reuses the one the dropped begin had.
    let t = TestDb::new(Backend::Postgres, 1).await;
    let other = Db::connect(&t.url).await.expect("a second pool");
    sqlx::query("CREATE TABLE probe (n int)")
        .execute(pool(&t.db))
        .await
        .expect("create");
    let mut sessions = std::collections::BTreeSet::new();
    for n in 0..40 {
        poll_once_and_drop(t.db.begin()).await;
        let pid: i32 =
            sqlx::query_scalar("INSERT INTO probe VALUES ($1) RETURNING pg_backend_pid()")
                .bind(n)
                .fetch_one(pool(&t.db))
                .await
                .expect("insert");
        sessions.insert(pid);
        let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM probe WHERE n = $1")
            .bind(n)
            .fetch_one(pool(&other))
            .await
            .expect("count");
        assert_eq!(
            seen, 1,
            "round {n}: a write after a dropped begin is not committed (the connection came \
             back from the pool inside a transaction)"
        );
    }
    other.close().await;
    assert_eq!(sessions.len(), 1, "a dropped begin cost its connection");
}
