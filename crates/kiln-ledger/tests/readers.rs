//! Held connections for status reads (`ReadDb`): a read on a connection the server closed in
//! the meantime (a restart, an idle timeout) runs again on a fresh one instead of failing.

use kiln_ledger::testing::TestDb;
use kiln_ledger::{Backend, Db, ReadDb, on_read};

async fn backend_pid(reads: &ReadDb) -> i32 {
    on_read!(reads, c => sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(c).await)
        .expect("a read")
}

#[tokio::test]
async fn a_held_connection_closed_by_the_server_is_replaced_on_the_next_read() {
    let t = TestDb::new(Backend::Postgres, 4).await;
    let reads = ReadDb::new(&t.db, 1);
    let first = backend_pid(&reads).await;
    assert_eq!(
        backend_pid(&reads).await,
        first,
        "one held connection, reused"
    );
    let Db::Postgres(pool) = &t.db else {
        unreachable!("a PostgreSQL test database")
    };
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(pool)
        .await
        .expect("terminate");
    assert!(killed);
    // Wait until the server has let the backend go, so the next read meets a closed socket.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(first)
                .fetch_one(pool)
                .await
                .expect("pg_stat_activity");
        if !alive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backend {first} still alive"
        );
        tokio::task::yield_now().await;
    }
    let second = backend_pid(&reads).await;
    assert_ne!(
        second, first,
        "a fresh connection after the old one was closed"
    );
}

#[tokio::test]
async fn on_sqlite_reads_use_the_pool() {
    let t = TestDb::new(Backend::Sqlite, 2).await;
    let reads = ReadDb::new(&t.db, 4);
    assert!(matches!(reads, ReadDb::Pool(_)));
    let one: i64 =
        on_read!(&reads, c => sqlx::query_scalar("SELECT 1").fetch_one(c).await).expect("read");
    assert_eq!(one, 1);
}
