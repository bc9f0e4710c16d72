//! The kit job queue. A job is created with its reservation and its apalis task in one
//! transaction ([`enqueue`]); a worker [`claim`]s it (bumping the fencing token), reports
//! [`progress`], and ends it with [`succeed`] (job succeeded + reservation committed) or
//! [`fail`] (job failed + reservation released), each one transaction that only the holder of
//! the current fencing token can complete. [`reconcile`] repairs what a crash can leave behind.
//!
//! `kit_jobs` keeps the history users poll; apalis's task table is the execution engine only,
//! and only the [`apalis`] module knows its tables. The ledger is used through the caller's
//! transaction, so a job and its charge always change together.
//!
//! - `ids`: `JobId`, `TaskId`, `Fence`, `WorkerName`
//! - `job`: the stored job, its JSON view, reads
//! - `enqueue`: reserve + job + task, idempotent; `submit` in its own transaction
//! - `wake`: waking workers after enqueue commits, batched
//! - `events`: job changes announced to long-polls, across processes on PostgreSQL
//! - `lifecycle`: claim, progress, leases, succeed, fail, retry, hand-back, cancel
//! - `reconcile`: the reconciler and the job/charge audit
//! - `stats`: queue depth and age
//! - `apalis`: the adapter to apalis's tables

pub mod apalis;
mod enqueue;
pub mod events;
mod ids;
mod job;
mod lifecycle;
mod reconcile;
mod stats;
#[cfg(feature = "testing")]
pub mod testing;
mod wake;

use std::sync::Arc;

use kiln_ledger::{Db, Ledger, LedgerError, Schema};

pub use apalis::{KitTask, LiveWorker, TASK_DELIVERIES, live_workers, prune_tasks};
pub use enqueue::{Enqueued, NewJob, check_order_key, enqueue, submit};
pub use ids::{Fence, JobId, TaskId, WorkerName};
pub use job::{
    Charge, JobError, JobStatus, JobView, KitJob, Progress, job, job_by_key, jobs, read_job,
};
pub use lifecycle::{
    Claim, cancel, claim, fail, hand_back, owns, progress, renew_lease, retry_later, succeed,
};
pub use reconcile::{Reconciled, audit, check_charges, reconcile};
pub use stats::{QueueStats, queue_stats};

pub(crate) type Result<T> = std::result::Result<T, JobsError>;

/// The queue's one error type: the ledger's (credits, database) and the queue's own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobsError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("job {0} not found")]
    JobNotFound(JobId),
    #[error("job {id} is {status}: only queued jobs can be cancelled")]
    JobNotCancellable { id: JobId, status: JobStatus },
    #[error("{what} {value:?} is not a ULID")]
    BadId { what: &'static str, value: String },
    #[error("job queue: {0}")]
    Queue(String),
    #[error("stored job data is inconsistent: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for JobsError {
    fn from(e: sqlx::Error) -> Self {
        JobsError::Ledger(LedgerError::Database(e))
    }
}

/// The queue over one ledger: what producers submit to. It owns the wake-up rounds that
/// concurrent submissions share ([`submit`]).
#[derive(Debug, Clone)]
pub struct Queue {
    ledger: Ledger,
    wakes: Arc<wake::Wakes>,
}

impl Queue {
    pub fn new(ledger: Ledger) -> Queue {
        Queue {
            ledger,
            wakes: Arc::default(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub(crate) fn wakes(&self) -> &wake::Wakes {
        &self.wakes
    }
}

/// Creates or upgrades the whole schema: kiln's migrations (ledger and `kit_jobs`), then
/// apalis's tables. `kiln migrate` and `kiln demo` call it; nothing else changes the schema.
pub async fn migrate(db: &Db) -> Result<()> {
    db.migrate().await?;
    apalis::migrate(db).await
}

/// Where the schema stands, read only: kiln's migrations and apalis's tables.
pub async fn schema(db: &Db) -> Result<Schema> {
    let s = db.schema().await?;
    if s == Schema::Current && !apalis::is_migrated(db).await? {
        return Ok(Schema::Behind {
            applied: 0,
            known: 0,
        });
    }
    Ok(s)
}
