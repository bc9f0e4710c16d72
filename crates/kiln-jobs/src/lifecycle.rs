//! A job's life after enqueue: a worker `claim`s it (a new fencing token), reports `progress`
//! and renews its lease, and ends it with `succeed` (job succeeded + reservation committed) or
//! `fail` (job failed + reservation released), each one transaction that only the holder of the
//! current fencing token can complete; or hands it back (`retry_later`, `hand_back`) on a new
//! task. Owners `cancel` queued jobs.

use kiln_core::{AccountId, Kit, Timestamp};
use kiln_ledger::{Ctx, ReservationId, Tx, on_tx};

use crate::apalis::push_task;
use crate::job::{corrupt, job, vanished};
use crate::{Fence, JobId, JobStatus, JobsError, KitJob, Progress, Result, TaskId, WorkerName};

/// What a worker may do with a delivered task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Run the job; finish it with this fencing token.
    Run { job: KitJob, fence: Fence },
    /// Nothing to do: the job has already ended (or the task is an old one).
    Finished(JobStatus),
    /// Another attempt is running the job and renewed its lease recently: leave it alone (a
    /// duplicate delivery). If that attempt dies, its lease runs out and the reconciler
    /// hands the job to a new task.
    Busy,
    /// The job ran out of attempts: it has been failed and its credits released.
    GaveUp(KitJob),
}

/// Takes the job for `worker`: running, attempts + 1, a new fencing token. A delivery of a
/// task the job no longer runs on (`task` differs) is refused, so a superseded task cannot
/// start a second run; so is one that finds the job running under a lease renewed within
/// `lease_ms` (the attempt holding it is alive).
pub async fn claim(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: &JobId,
    task: &TaskId,
    worker: &WorkerName,
    lease_ms: i64,
) -> Result<Claim> {
    let Some(current) = job(tx, id).await? else {
        return Ok(Claim::Finished(JobStatus::Failed));
    };
    if current.status.is_terminal() || current.task_id != *task {
        return Ok(Claim::Finished(current.status));
    }
    if current.status == JobStatus::Running
        && current.updated_at.millis() > ctx.now.millis() - lease_ms
    {
        return Ok(Claim::Busy);
    }
    if current.attempts >= current.max_attempts {
        let fence = current.fence;
        fail(
            tx,
            ctx,
            id,
            fence,
            "attempts_exhausted",
            &format!(
                "the job was started {} times without finishing (the worker crashed or was stopped each time)",
                current.attempts
            ),
        )
        .await?;
        let job = job(tx, id).await?.ok_or_else(|| vanished(id))?;
        return Ok(Claim::GaveUp(job));
    }
    let fence: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'running', attempts = attempts + 1, fence = fence + 1, \
         worker = $2, started_at_ms = COALESCE(started_at_ms, $3), updated_at_ms = $3 \
         WHERE id = $1 AND status IN ('queued', 'running') AND fence = $4 RETURNING fence",
    )
    .bind(id.as_str())
    .bind(worker.as_str())
    .bind(ctx.now.millis())
    .bind(current.fence.0)
    .fetch_optional(&mut **c)
    .await?);
    let Some(fence) = fence else {
        // Someone else claimed it between our read and write: they own it now.
        return Ok(Claim::Finished(JobStatus::Running));
    };
    let job = job(tx, id).await?.ok_or_else(|| vanished(id))?;
    Ok(Claim::Run {
        job,
        fence: Fence(fence),
    })
}

/// Progress and lease renewals need no durability (a crash loses at most the last few, and a
/// lost lease renewal only makes a dead attempt look dead sooner): on PostgreSQL their commits
/// skip the WAL flush wait.
async fn relaxed(tx: &mut Tx) -> Result<()> {
    if let Tx::Postgres(c) = tx {
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut **c)
            .await?;
    }
    Ok(())
}

/// Records progress; `false` if `fence` is no longer current (a newer attempt owns the job).
pub async fn progress(
    tx: &mut Tx,
    now: Timestamp,
    id: &JobId,
    fence: Fence,
    p: &Progress,
) -> Result<bool> {
    relaxed(tx).await?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE kit_jobs SET step = $3, steps_done = $4, steps_total = $5, updated_at_ms = $6 \
         WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .bind(p.step.as_deref())
    .bind(i32::try_from(p.done).unwrap_or(i32::MAX))
    .bind(i32::try_from(p.total).unwrap_or(i32::MAX))
    .bind(now.millis())
    .execute(&mut **c)
    .await?
    .rows_affected());
    Ok(n == 1)
}

/// Renews the running attempt's lease; `false` if `fence` is no longer current.
pub async fn renew_lease(tx: &mut Tx, now: Timestamp, id: &JobId, fence: Fence) -> Result<bool> {
    relaxed(tx).await?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE kit_jobs SET updated_at_ms = $3 WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .bind(now.millis())
    .execute(&mut **c)
    .await?
    .rows_affected());
    Ok(n == 1)
}

/// Whether `fence` still owns the running job (checked before each write to storage, so a
/// superseded attempt stops publishing as soon as it can tell).
pub async fn owns(tx: &mut Tx, id: &JobId, fence: Fence) -> Result<bool> {
    let n: i64 = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT COUNT(*) FROM kit_jobs WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .fetch_one(&mut **c)
    .await?);
    Ok(n == 1)
}

/// Job succeeded + reservation committed. `false` (and nothing written) if `fence` is stale.
pub async fn succeed(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: &JobId,
    fence: Fence,
    manifest_key: &str,
) -> Result<bool> {
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'succeeded', finished_at_ms = $3, updated_at_ms = $3, \
         manifest_key = $4, step = NULL, steps_done = steps_total, error_code = NULL, error_message = NULL \
         WHERE id = $1 AND fence = $2 AND status = 'running' RETURNING reservation_id",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .bind(ctx.now.millis())
    .bind(manifest_key)
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Ok(false);
    };
    kiln_ledger::commit(tx, ctx, ReservationId(r)).await?;
    Ok(true)
}

/// Job failed + reservation released. `false` if `fence` is stale or the job already ended.
pub async fn fail(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: &JobId,
    fence: Fence,
    code: &str,
    message: &str,
) -> Result<bool> {
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'failed', finished_at_ms = $3, updated_at_ms = $3, \
         error_code = $4, error_message = $5 \
         WHERE id = $1 AND fence = $2 AND status IN ('queued', 'running') RETURNING reservation_id",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .bind(ctx.now.millis())
    .bind(code)
    .bind(message)
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Ok(false);
    };
    kiln_ledger::release(tx, ctx, ReservationId(r)).await?;
    Ok(true)
}

/// Hands the job back to the queue to run again at `run_at` on a new task (kiln's own backoff:
/// apalis would retry at once), recording why. `false` if `fence` is stale.
pub async fn retry_later(
    tx: &mut Tx,
    now: Timestamp,
    id: &JobId,
    fence: Fence,
    run_at: Timestamp,
    code: &str,
    message: &str,
) -> Result<bool> {
    requeue(
        tx,
        id,
        fence,
        now,
        run_at,
        Some((code, message)),
        Attempt::Counts,
    )
    .await
}

/// Whether the attempt a requeue ends counts against the job's `max_attempts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// It ran and failed (or went silent): it counts.
    Counts,
    /// It was stopped from outside (a deploy's hand-back): it is given back.
    GivenBack,
}

/// Cancels a queued job of `account`'s and releases its credits. Any other status is
/// `JobNotCancellable`; another account's job is `JobNotFound`.
pub async fn cancel(tx: &mut Tx, ctx: &Ctx<'_>, account: AccountId, id: &JobId) -> Result<KitJob> {
    let found = job(tx, id)
        .await?
        .filter(|j| j.account_id == account)
        .ok_or_else(|| JobsError::JobNotFound(id.clone()))?;
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'cancelled', finished_at_ms = $2, updated_at_ms = $2 \
         WHERE id = $1 AND status = 'queued' RETURNING reservation_id",
    )
    .bind(id.as_str())
    .bind(ctx.now.millis())
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Err(JobsError::JobNotCancellable {
            id: id.clone(),
            status: found.status,
        });
    };
    kiln_ledger::release(tx, ctx, ReservationId(r)).await?;
    job(tx, id).await?.ok_or_else(|| vanished(id))
}

/// Back to queued on a fresh task due at `run_at`, with a new fencing token that shuts out any
/// straggler; `error` (code, message) is recorded when given, and the attempt given back when
/// `attempt` says so. `false` if `fence` is stale or the job has ended.
pub(crate) async fn requeue(
    tx: &mut Tx,
    id: &JobId,
    fence: Fence,
    now: Timestamp,
    run_at: Timestamp,
    error: Option<(&str, &str)>,
    attempt: Attempt,
) -> Result<bool> {
    let task = TaskId::generate();
    let kit: Option<String> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'queued', task_id = $3, fence = fence + 1, worker = NULL, \
         run_at_ms = $4, updated_at_ms = $5, error_code = COALESCE($6, error_code), \
         error_message = COALESCE($7, error_message), \
         attempts = attempts - CASE WHEN $8 = 1 AND status = 'running' AND attempts > 0 THEN 1 ELSE 0 END \
         WHERE id = $1 AND fence = $2 AND status IN ('queued', 'running') RETURNING kit",
    )
    .bind(id.as_str())
    .bind(fence.0)
    .bind(task.as_str())
    .bind(run_at.millis())
    .bind(now.millis())
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
    .bind(i32::from(attempt == Attempt::GivenBack))
    .fetch_optional(&mut **c)
    .await?);
    let Some(kit) = kit else {
        return Ok(false);
    };
    let kit: Kit = kit.parse().map_err(|_| corrupt("kit", &kit))?;
    push_task(tx, kit, &task, id, run_at).await?;
    Ok(true)
}

/// Hands back the jobs still running under worker names starting with `worker_prefix` (a
/// `kiln work` process whose grace period ran out): queued again at once on new tasks, so
/// another worker takes them without waiting for their leases to run out, and with the attempt
/// given back — a deploy is not the kit's failure, and on its last attempt the next claim
/// would otherwise fail it as `attempts_exhausted`. Returns how many.
pub async fn hand_back(tx: &mut Tx, now: Timestamp, worker_prefix: &str) -> Result<u32> {
    let held: Vec<(String, i64)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT id, fence FROM kit_jobs WHERE status = 'running' AND worker LIKE $1",
    )
    .bind(format!("{worker_prefix}%"))
    .fetch_all(&mut **c)
    .await?);
    let mut n = 0;
    for (id, fence) in held {
        let id: JobId = id.parse().map_err(|_| corrupt("id", &id))?;
        if requeue(tx, &id, Fence(fence), now, now, None, Attempt::GivenBack).await? {
            n += 1;
        }
    }
    Ok(n)
}
