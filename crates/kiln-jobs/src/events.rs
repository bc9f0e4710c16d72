//! Job changes, for long-polls (`GET /v1/jobs/{id}?wait=`): every change of a `kit_jobs` row is
//! announced in this process ([`subscribe`]) so a waiting request re-reads its job at once
//! instead of polling. On PostgreSQL a trigger (migration 0004) sends `NOTIFY kiln_job_changed`
//! with the job id, delivered on commit to every process, and [`listen`] forwards those here; on
//! SQLite (one machine, workers usually in the serving process) the writers call [`changed`]
//! after they commit.

use std::sync::{Arc, LazyLock};

use kiln_ledger::Db;
use tokio::sync::broadcast;

use crate::JobId;

/// The PostgreSQL channel the `kit_jobs` trigger notifies.
pub const CHANNEL: &str = "kiln_job_changed";

/// Sent instead of a job id when changes may have been missed (the listener reconnected, or a
/// receiver lagged): every waiter re-reads.
pub const ANY: &str = "*";

static EVENTS: LazyLock<broadcast::Sender<Arc<str>>> = LazyLock::new(|| broadcast::channel(4096).0);

/// Job ids as they change (or [`ANY`]). Subscribe before reading the job, so a change between
/// the read and the wait is not missed.
pub fn subscribe() -> broadcast::Receiver<Arc<str>> {
    EVENTS.subscribe()
}

/// Announces in this process that job `id` changed (after the change committed).
pub fn changed(id: &JobId) {
    // No receivers is fine: nobody is waiting.
    let _ = EVENTS.send(Arc::from(id.as_str()));
}

fn changed_str(id: &str) {
    let _ = EVENTS.send(Arc::from(id));
}

/// On PostgreSQL, forwards the trigger's notifications into this process until the returned
/// task is aborted; it is listening when this returns. On SQLite there is nothing to listen to.
pub async fn listen(db: &Db) -> crate::Result<Option<tokio::task::JoinHandle<()>>> {
    let Db::Postgres(pool) = db else {
        return Ok(None);
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(Some(tokio::spawn(async move {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => changed_str(n.payload()),
                // The connection dropped and came back: what was sent meanwhile is lost.
                Ok(None) => changed_str(ANY),
                Err(e) => {
                    tracing::warn!("job change listener: {e}; reconnecting");
                    changed_str(ANY);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    })))
}
