//! The one module that knows apalis's tables: its task rows (written here as apalis's own
//! `push_tasks` writes them, so a task joins the caller's transaction), the wake-up channel its
//! listening workers use, its worker registry, its migrations, and the statuses the reconciler
//! and pruning read. An apalis upgrade that changes any of them changes this file only, and the
//! job suite (`tests/jobs.rs`) runs every statement here on both databases.

use kiln_core::{Kit, Timestamp};
use kiln_ledger::{Db, LedgerError, Tx};
use serde::{Deserialize, Serialize};

use crate::{Fence, JobId, JobsError, Result, TaskId};

/// The channel apalis's PostgreSQL workers listen on for new tasks.
macro_rules! channel {
    () => {
        "apalis::job::insert"
    };
}

/// The channel apalis's PostgreSQL workers listen on for new tasks (payload: JSON with the
/// queue as `job_type` and the task `id`).
pub const WAKE_CHANNEL: &str = channel!();

/// apalis's NOTIFY for one task, as its own insert trigger sends it: `$q` the queue, `$id` the
/// task id (SQL expressions).
macro_rules! notify {
    ($q:literal, $id:literal) => {
        concat!(
            "pg_notify('",
            channel!(),
            "', json_build_object('job_type', ",
            $q,
            ", 'id', ",
            $id,
            ")::text)"
        )
    };
}

/// What an apalis task carries: only the job's id; everything else is read from `kit_jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KitTask {
    pub job: JobId,
}

/// The apalis task that runs a job, as apalis's own `push_tasks` writes it (payload through the
/// JSON codec, `TASK_DELIVERIES` deliveries, default priority, no metadata).
pub(crate) struct TaskRow {
    id: TaskId,
    queue: &'static str,
    payload: Vec<u8>,
    /// apalis keeps whole seconds.
    run_at_secs: i64,
}

impl TaskRow {
    pub(crate) fn new(kit: Kit, task: &TaskId, job: &JobId, run_at: Timestamp) -> Result<TaskRow> {
        let payload = serde_json::to_vec(&KitTask { job: job.clone() })
            .map_err(|e| JobsError::Corrupt(format!("task payload: {e}")))?;
        Ok(TaskRow {
            id: task.clone(),
            queue: kit.queue(),
            payload,
            run_at_secs: run_at.millis().div_euclid(1000).max(0),
        })
    }

    /// Binds the last four parameters of a [`task_pg`] statement: queue, payload, deliveries
    /// and run_at (the task id is the head's to bind).
    pub(crate) fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(self.queue)
            .bind(&self.payload)
            .bind(i32::try_from(TASK_DELIVERIES).unwrap_or(i32::MAX))
            .bind(self.run_at_secs)
    }
}

/// PostgreSQL: the apalis task for the row of CTE `k` (columns `task_id, queue, payload,
/// deliveries, run_at_secs`), if there is one, and a wake-up for listening workers when the task
/// is due now (a delayed retry is found by a worker's heartbeat fetch), sent at commit.
/// `task_pg!(ctes)` gives the CTEs after `k`, `task_pg!(wakes)` the result column counting the
/// wake-ups sent. (apalis's own insert trigger is dropped by [`migrate`]: kiln wakes workers
/// itself, and [`crate::submit`] does it after its commit.)
macro_rules! task_pg {
    (ctes) => {
        ", t AS (INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, \
         run_at, priority, metadata) SELECT k.task_id, k.queue, k.payload, 'Pending', 0, \
         k.deliveries, to_timestamp(k.run_at_secs), 0, ''::hstore FROM k \
         RETURNING id, job_type, run_at)"
    };
    (wakes) => {
        concat!(
            "(SELECT COUNT(CASE WHEN run_at <= clock_timestamp() THEN ",
            notify!("job_type", "id"),
            "::text END) FROM t)"
        )
    };
}
pub(crate) use task_pg;

/// How many times apalis may deliver one task (crash recoveries). kiln's own attempt count on
/// the job is the real bound (claims past `max_attempts` fail the job); this is a backstop, and
/// a task apalis gives up on is repaired by the reconciler.
pub const TASK_DELIVERIES: usize = 10;

/// Pushes the apalis task that runs `job` at `run_at` (whole seconds, as apalis stores them),
/// and on PostgreSQL wakes listening workers when the transaction commits.
pub(crate) async fn push_task(
    tx: &mut Tx,
    kit: Kit,
    task: &TaskId,
    job: &JobId,
    run_at: Timestamp,
) -> Result<()> {
    let t = TaskRow::new(kit, task, job, run_at)?;
    match tx {
        Tx::Postgres(c) => {
            let _: (i64,) = t
                .bind(sqlx::query_as(PUSH_TASK_PG).bind(t.id.as_str()))
                .fetch_one(&mut **c)
                .await?;
        }
        Tx::Sqlite(c) => {
            use apalis_core::task::builder::TaskBuilder;
            let id: apalis_core::task::task_id::TaskId =
                t.id.as_str()
                    .parse()
                    .map_err(|_| JobsError::Corrupt(format!("task id {task} is not a ULID")))?;
            let task = TaskBuilder::new(t.payload)
                .task_id(id)
                .run_at_timestamp(u64::try_from(t.run_at_secs).unwrap_or(0))
                .max_attempts(TASK_DELIVERIES)
                .build();
            apalis_sqlite::queries::push_tasks(&mut **c, t.queue, &[task])
                .await
                .map_err(|e| JobsError::Queue(e.to_string()))?;
        }
    }
    Ok(())
}

const PUSH_TASK_PG: &str = concat!(
    "WITH k AS (SELECT $1::text AS task_id, $2::text AS queue, $3::bytea AS payload, \
     $4::int AS deliveries, $5::bigint AS run_at_secs)",
    task_pg!(ctes),
    " SELECT ",
    task_pg!(wakes)
);

/// A worker that has reported to apalis recently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveWorker {
    pub name: String,
    pub queue: String,
    pub last_seen_secs_ago: i64,
}

/// Workers seen within the last `within_secs` seconds.
pub async fn live_workers(tx: &mut Tx, within_secs: i64) -> Result<Vec<LiveWorker>> {
    let rows: Vec<(String, String, i64)> = match tx {
        Tx::Postgres(c) => sqlx::query_as(
            "SELECT id, worker_type, EXTRACT(EPOCH FROM now() - last_seen)::BIGINT FROM apalis.workers \
             WHERE last_seen > now() - make_interval(secs => $1) ORDER BY worker_type, id",
        )
        .bind(within_secs as f64)
        .fetch_all(&mut **c)
        .await?,
        Tx::Sqlite(c) => sqlx::query_as(
            "SELECT id, worker_type, CAST(strftime('%s', 'now') AS INTEGER) - last_seen FROM Workers \
             WHERE last_seen > CAST(strftime('%s', 'now') AS INTEGER) - $1 ORDER BY worker_type, id",
        )
        .bind(within_secs)
        .fetch_all(&mut **c)
        .await?,
    };
    Ok(rows
        .into_iter()
        .map(|(name, queue, ago)| LiveWorker {
            name,
            queue,
            last_seen_secs_ago: ago.max(0),
        })
        .collect())
}

/// Deletes finished apalis tasks older than `older_than_ms` (kit_jobs keeps the history).
pub async fn prune_tasks(tx: &mut Tx, now: Timestamp, older_than_ms: i64) -> Result<u64> {
    let cutoff_secs = (now.millis() - older_than_ms).div_euclid(1000);
    let n = match tx {
        Tx::Postgres(c) => sqlx::query(
            "DELETE FROM apalis.jobs WHERE status IN ('Done', 'Failed', 'Killed') \
             AND done_at IS NOT NULL AND done_at < to_timestamp($1)",
        )
        .bind(cutoff_secs)
        .execute(&mut **c)
        .await?
        .rows_affected(),
        Tx::Sqlite(c) => sqlx::query(
            "DELETE FROM Jobs WHERE status IN ('Done', 'Failed', 'Killed') \
             AND done_at IS NOT NULL AND done_at < $1",
        )
        .bind(cutoff_secs)
        .execute(&mut **c)
        .await?
        .rows_affected(),
    };
    Ok(n)
}

/// Wakes the workers listening for `task`'s queue when the caller's transaction commits.
pub(crate) async fn wake_on_commit(
    c: &mut sqlx::PgConnection,
    kit: Kit,
    task: &TaskId,
) -> Result<()> {
    sqlx::query(concat!("SELECT ", notify!("$1::text", "$2::text")))
        .bind(kit.queue())
        .bind(task.as_str())
        .execute(c)
        .await?;
    Ok(())
}

/// Wakes the listening workers of tasks already committed, in one statement that does not wait
/// for a WAL flush (a lost wake-up only means a worker finds the task at its next heartbeat).
pub(crate) async fn wake_now(
    c: &mut sqlx::PgConnection,
    queues: &[&'static str],
    tasks: &[String],
) -> Result<()> {
    sqlx::query(concat!(
        "SELECT set_config('synchronous_commit', 'off', true), ",
        notify!("w.q", "w.id"),
        " FROM UNNEST($1::text[], $2::text[]) AS w(q, id)"
    ))
    .bind(queues)
    .bind(tasks)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Open jobs (queued or running) untouched since `stale_before_ms` whose apalis task is gone or
/// finished (pruned, killed, or marked done by a stale attempt): what the reconciler repairs.
/// (job, fence, attempts, max_attempts)
pub(crate) async fn orphans(
    tx: &mut Tx,
    stale_before_ms: i64,
) -> Result<Vec<(JobId, Fence, i32, i32)>> {
    let sql = match tx {
        Tx::Postgres(_) => {
            "SELECT j.id, j.fence, j.attempts, j.max_attempts FROM kit_jobs j \
             LEFT JOIN apalis.jobs t ON t.id = j.task_id \
             WHERE j.status IN ('queued', 'running') AND j.updated_at_ms < $1 \
             AND (t.id IS NULL OR t.status NOT IN ('Pending', 'Queued', 'Running'))"
        }
        Tx::Sqlite(_) => {
            "SELECT j.id, j.fence, j.attempts, j.max_attempts FROM kit_jobs j \
             LEFT JOIN Jobs t ON t.id = j.task_id \
             WHERE j.status IN ('queued', 'running') AND j.updated_at_ms < $1 \
             AND (t.id IS NULL OR t.status NOT IN ('Pending', 'Queued', 'Running'))"
        }
    };
    let rows: Vec<(String, i64, i32, i32)> = kiln_ledger::on_tx!(tx, c => sqlx::query_as(sql)
        .bind(stale_before_ms)
        .fetch_all(&mut **c)
        .await?);
    rows.into_iter()
        .map(|(id, fence, attempts, max)| {
            let id = id.parse().map_err(|_| crate::job::corrupt("id", &id))?;
            Ok((id, Fence(fence), attempts, max))
        })
        .collect()
}

/// Sets up apalis's tables after kiln's own migrations. PostgreSQL: the hstore extension and
/// apalis's migrations (history in `apalis._sqlx_migrations`), then, every time (a later apalis
/// could bring them back), its insert trigger and two duplicate indexes dropped: kiln writes
/// every task itself and wakes workers after its commit, because a NOTIFY inside the enqueue
/// transaction serializes enqueue commits (docs/JOBS.md), and `unique_job_id` (= the primary
/// key) and `lidx` (= `idx_apalis_jobs_lock_by`) cost every task insert and status change for
/// nothing. SQLite: apalis's migrations, history in sqlx's default table, and not
/// `SqliteStorage::setup`, which would switch the file to `synchronous=OFF`.
pub(crate) async fn migrate(db: &Db) -> Result<()> {
    match db {
        Db::Postgres(pool) => {
            sqlx::query("CREATE EXTENSION IF NOT EXISTS hstore")
                .execute(pool)
                .await?;
            apalis_postgres::PostgresStorage::migrations()
                .run(pool)
                .await
                .map_err(LedgerError::from)?;
            sqlx::raw_sql(
                "DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs; \
                 DROP INDEX IF EXISTS apalis.unique_job_id; \
                 DROP INDEX IF EXISTS apalis.lidx;",
            )
            .execute(pool)
            .await?;
        }
        Db::Sqlite(pool) => {
            apalis_sqlite::SqliteStorage::migrations()
                .run(pool)
                .await
                .map_err(LedgerError::from)?;
        }
    }
    Ok(())
}

/// Whether apalis's tables are set up as this binary's apalis expects: every migration it
/// carries applied. Reads only.
pub(crate) async fn is_migrated(db: &Db) -> Result<bool> {
    let (known, applied): (Vec<i64>, Vec<i64>) = match db {
        Db::Postgres(pool) => {
            let known = apalis_postgres::PostgresStorage::migrations()
                .iter()
                .map(|m| m.version)
                .collect();
            let exists: bool =
                sqlx::query_scalar("SELECT to_regclass('apalis._sqlx_migrations') IS NOT NULL")
                    .fetch_one(pool)
                    .await?;
            let applied = if exists {
                sqlx::query_scalar("SELECT version FROM apalis._sqlx_migrations WHERE success")
                    .fetch_all(pool)
                    .await?
            } else {
                Vec::new()
            };
            (known, applied)
        }
        Db::Sqlite(pool) => {
            let known = apalis_sqlite::SqliteStorage::migrations()
                .iter()
                .map(|m| m.version)
                .collect();
            let exists: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            )
            .fetch_one(pool)
            .await?;
            let applied = if exists > 0 {
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(pool)
                    .await?
            } else {
                Vec::new()
            };
            (known, applied)
        }
    };
    Ok(known.iter().all(|v| applied.contains(v)))
}

/// The apalis tasks of `queue` on `db`, oldest first: (task id, payload). For tests and
/// operators who want to see the engine's side.
pub async fn tasks(db: &Db, queue: &str) -> Result<Vec<(TaskId, KitTask)>> {
    let rows: Vec<(String, Vec<u8>)> = match db {
        Db::Postgres(p) => {
            sqlx::query_as("SELECT id, job FROM apalis.jobs WHERE job_type = $1 ORDER BY id")
                .bind(queue)
                .fetch_all(p)
                .await?
        }
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT id, job FROM Jobs WHERE job_type = $1 ORDER BY id")
                .bind(queue)
                .fetch_all(p)
                .await?
        }
    };
    rows.into_iter()
        .map(|(id, job)| {
            let task = serde_json::from_slice(&job)
                .map_err(|e| JobsError::Corrupt(format!("task {id} payload: {e}")))?;
            Ok((id.parse()?, task))
        })
        .collect()
}

/// Deletes one task (what pruning does to finished ones): for tests and operators repairing by
/// hand; the reconciler gives its job a new task once the job's lease has run out.
pub async fn delete_task(db: &Db, task: &TaskId) -> Result<()> {
    match db {
        Db::Postgres(p) => sqlx::query("DELETE FROM apalis.jobs WHERE id = $1")
            .bind(task.as_str())
            .execute(p)
            .await
            .map(drop)?,
        Db::Sqlite(p) => sqlx::query("DELETE FROM Jobs WHERE id = $1")
            .bind(task.as_str())
            .execute(p)
            .await
            .map(drop)?,
    }
    Ok(())
}

/// Tasks apalis holds as running, per queue: after every worker has stopped, anything here was
/// left behind (its job is repaired by the reconciler). For `kiln status` and tests.
pub async fn running_tasks(tx: &mut Tx) -> Result<Vec<(String, u64)>> {
    let sql = match tx {
        Tx::Postgres(_) => {
            "SELECT job_type, COUNT(*) FROM apalis.jobs WHERE status = 'Running' \
             GROUP BY job_type ORDER BY job_type"
        }
        Tx::Sqlite(_) => {
            "SELECT job_type, COUNT(*) FROM Jobs WHERE status = 'Running' \
             GROUP BY job_type ORDER BY job_type"
        }
    };
    let rows: Vec<(String, i64)> =
        kiln_ledger::on_tx!(tx, c => sqlx::query_as(sql).fetch_all(&mut **c).await?);
    Ok(rows
        .into_iter()
        .map(|(q, n)| (q, u64::try_from(n).unwrap_or(0)))
        .collect())
}

/// When a worker fetched each job's current task (PostgreSQL's `lock_at`, Unix ms), for
/// pickup measurements: (job, fetched at). SQLite keeps whole seconds only: empty there.
pub async fn fetched_at(db: &Db) -> Result<Vec<(JobId, f64)>> {
    let Db::Postgres(pool) = db else {
        return Ok(Vec::new());
    };
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT j.id, (EXTRACT(EPOCH FROM t.lock_at) * 1000)::float8 FROM kit_jobs j \
         JOIN apalis.jobs t ON t.id = j.task_id WHERE t.lock_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(id, at)| Ok((id.parse()?, at)))
        .collect()
}
