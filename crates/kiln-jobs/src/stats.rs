//! Cheap numbers for operators and autoscalers: queue depth and the oldest waiting job per queue.

use kiln_core::{Kit, Timestamp};
use kiln_ledger::{Tx, on_tx};
use serde::Serialize;

use crate::Result;

/// Queue depth and the age of the oldest waiting job, per kit: cheap to read for autoscalers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: &'static str,
    pub queued: u64,
    pub running: u64,
    pub oldest_queued_ms: Option<i64>,
}

pub async fn queue_stats(tx: &mut Tx, now: Timestamp) -> Result<Vec<QueueStats>> {
    let mut out = Vec::new();
    for kit in [Kit::Essentials, Kit::Caratzon] {
        let (queued, running, oldest): (i64, i64, Option<i64>) = on_tx!(tx, c => sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0), \
             MIN(CASE WHEN status = 'queued' THEN run_at_ms END) \
             FROM kit_jobs WHERE kit = $1 AND status IN ('queued', 'running')",
        )
        .bind(kit.as_str())
        .fetch_one(&mut **c)
        .await?);
        out.push(QueueStats {
            queue: kit.queue(),
            queued: u64::try_from(queued).unwrap_or(0),
            running: u64::try_from(running).unwrap_or(0),
            oldest_queued_ms: oldest.map(|t| (now.millis() - t).max(0)),
        });
    }
    Ok(out)
}
