//! Enqueue: reserve the kit's credits, insert its `kit_jobs` row and push its apalis task, all
//! or nothing, idempotent by the order's key. On PostgreSQL the common case is ONE guarded
//! statement built on the ledger's optimistic hold; an account that needs locking (a renewal
//! or expiry due, or lost races) takes the ledger's locking path in a transaction.

use kiln_core::{AccountId, Kit};
use kiln_ledger::optimistic::{OPTIMISTIC_ATTEMPTS, OptimisticPlan, plan_optimistic};
use kiln_ledger::{Ctx, Db, LedgerError, Operation, ReservationId, Tx, on_tx};

use crate::apalis::{TaskRow, push_task, task_pg, wake_on_commit};
use crate::job::job_by_key;
use crate::{JobsError, KitJob, Queue, Result};

/// What the producer asks for.
#[derive(Clone, Debug)]
pub struct NewJob<'a> {
    pub account: AccountId,
    pub kit: Kit,
    pub idempotency_key: &'a str,
    pub upload_key: &'a str,
    pub spec: &'a str,
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct Enqueued {
    pub job: KitJob,
    /// The idempotency key had been used for this same request: nothing new was reserved.
    pub replayed: bool,
}

/// The key of a job's reservation: its idempotency key, prefixed (the audit finds kit
/// reservations by it).
pub(crate) fn reservation_key(key: &str) -> String {
    format!("kit:{key}")
}

/// Checks an idempotency key the way `enqueue` will use it, so callers can refuse a bad one
/// before doing any work for it.
pub fn check_order_key(key: &str) -> Result<()> {
    let what = "idempotency key (with its kit: prefix)";
    if key.is_empty() {
        return Err(LedgerError::BadKey { what }.into());
    }
    Ok(kiln_ledger::check_key(&reservation_key(key), what)?)
}

/// The whole enqueue in one statement: the guarded hold (`$1`..`$21`), the job row drawing
/// its account and reservation from it (`$22`..`$28`) and its task (`$29`..`$32`). No row back
/// when the hold did not apply. No wake-up: a NOTIFY makes PostgreSQL serialize the commits of
/// notifying transactions (one global lock held through the WAL flush), which cost a tenth of
/// enqueue throughput; [`submit`] wakes workers after the commit instead (`wake::Wakes`), and an
/// [`enqueue`] in a caller's transaction that takes this path wakes them in that transaction.
const ENQUEUE_PG: &str = kiln_ledger::hold_pg!(
    [
        ", k AS (INSERT INTO kit_jobs (id, account_id, idempotency_key, kit, status, reservation_id, \
     upload_key, spec, cost, max_attempts, task_id, run_at_ms, created_at_ms, updated_at_ms) \
     SELECT $22, a.id, $23, $24, 'queued', r.id, $25, $26, $10, $27, $28, $13, $13, $13 FROM a, r \
     RETURNING task_id, $29::text AS queue, $30::bytea AS payload, $31::int AS deliveries, \
     $32::bigint AS run_at_secs)",
        task_pg!(ctes)
    ],
    []
);

/// Reserves the kit's credits, inserts the job and pushes its apalis task, all in `tx`.
/// A replayed idempotency key returns the existing job; the same key for a different request
/// is a conflict.
pub async fn enqueue(tx: &mut Tx, ctx: &Ctx<'_>, new: &NewJob<'_>) -> Result<Enqueued> {
    check_order_key(new.idempotency_key)?;
    if let Tx::Postgres(c) = tx {
        match enqueue_optimistic(c, ctx, new).await? {
            Optimistic::Done(e) => {
                // Delivered when the caller commits (and dropped if it rolls back).
                wake_on_commit(c, e.job.kit, &e.job.task_id).await?;
                return Ok(*e);
            }
            Optimistic::Replay => return replayed(tx, new).await,
            Optimistic::Locking => {}
        }
    }
    // The reservation is idempotent by the same key: a replay gets the existing one back (or a
    // conflict if the key was used for another kit), and the insert below then finds the job.
    let reservation = kiln_ledger::reserve_locked(
        tx,
        ctx,
        new.account,
        new.kit.action(),
        &reservation_key(new.idempotency_key),
    )
    .await?;
    let job = KitJob::queued(ctx, new, &reservation);
    let inserted = on_tx!(tx, c => sqlx::query(
        "INSERT INTO kit_jobs (id, account_id, idempotency_key, kit, status, reservation_id, \
         upload_key, spec, cost, max_attempts, task_id, run_at_ms, created_at_ms, updated_at_ms) \
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11, $11, $11) \
         ON CONFLICT (account_id, idempotency_key) DO NOTHING",
    )
    .bind(job.id.as_str())
    .bind(new.account.to_string())
    .bind(new.idempotency_key)
    .bind(new.kit.as_str())
    .bind(reservation.id.0)
    .bind(new.upload_key)
    .bind(new.spec)
    .bind(reservation.list_price.as_i64())
    .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
    .bind(job.task_id.as_str())
    .bind(ctx.now.millis())
    .execute(&mut **c)
    .await?
    .rows_affected());
    if inserted == 0 {
        return replayed(tx, new).await;
    }
    push_task(tx, new.kit, &job.task_id, &job.id, ctx.now).await?;
    Ok(Enqueued {
        job,
        replayed: false,
    })
}

/// [`enqueue`] in a transaction of its own. On PostgreSQL it is first tried as one statement
/// in autocommit (atomic by itself: the guarded hold, the job and its task), which saves the
/// round trips of BEGIN and COMMIT, and workers are woken after that commit (`wake::Wakes`); when
/// the account needs locking (a renewal or expiry due, or two lost races) it runs in a
/// transaction.
pub async fn submit(queue: &Queue, new: &NewJob<'_>) -> Result<Enqueued> {
    check_order_key(new.idempotency_key)?;
    let (db, ctx) = (queue.ledger().db(), queue.ledger().ctx());
    if let Db::Postgres(pool) = db {
        let mut c = pool.acquire().await.map_err(LedgerError::from)?;
        match enqueue_optimistic(&mut c, &ctx, new).await? {
            Optimistic::Done(e) => {
                let wake = (e.job.kit.queue(), e.job.task_id.to_string());
                if let Err(err) = queue.wakes().send(&mut c, wake).await {
                    tracing::warn!(job = %e.job.id, "workers not woken (the next heartbeat fetch will find the job): {err}");
                }
                return Ok(*e);
            }
            Optimistic::Replay => {
                drop(c);
                let mut tx = db.begin_read().await?;
                return replayed(&mut tx, new).await;
            }
            Optimistic::Locking => {}
        }
    }
    let mut tx = db.begin().await?;
    let e = enqueue(&mut tx, &ctx, new).await?;
    tx.commit().await?;
    Ok(e)
}

enum Optimistic {
    Done(Box<Enqueued>),
    /// The key has a reservation already.
    Replay,
    /// Take the locking path.
    Locking,
}

/// The ledger's optimistic reserve ([`plan_optimistic`]) with the job and its task written by the
/// same guarded statement ([`ENQUEUE_PG`]); on any PostgreSQL connection.
async fn enqueue_optimistic(
    c: &mut sqlx::PgConnection,
    ctx: &Ctx<'_>,
    new: &NewJob<'_>,
) -> Result<Optimistic> {
    let key = reservation_key(new.idempotency_key);
    for _ in 0..OPTIMISTIC_ATTEMPTS {
        let plan = plan_optimistic(
            c,
            ctx,
            new.account,
            new.kit.action(),
            &key,
            Operation::Reserve,
        )
        .await?;
        let w = match plan {
            OptimisticPlan::Existing(_) => return Ok(Optimistic::Replay),
            OptimisticPlan::NeedsLock => return Ok(Optimistic::Locking),
            OptimisticPlan::Write(w) => w,
        };
        let mut job = KitJob::queued(ctx, new, &w.reservation);
        let task = TaskRow::new(new.kit, &job.task_id, &job.id, ctx.now)?;
        let row: Option<(i64, i32)> = task
            .bind(
                w.bind(sqlx::query_as(ENQUEUE_PG))
                    .bind(job.id.as_str())
                    .bind(new.idempotency_key)
                    .bind(new.kit.as_str())
                    .bind(new.upload_key)
                    .bind(new.spec)
                    .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
                    .bind(job.task_id.as_str()),
            )
            .fetch_optional(&mut *c)
            .await
            .map_err(LedgerError::from)?;
        if let Some((reservation, _)) = row {
            job.reservation_id = ReservationId(reservation);
            return Ok(Optimistic::Done(Box::new(Enqueued {
                job,
                replayed: false,
            })));
        }
    }
    Ok(Optimistic::Locking)
}

/// The job an idempotency key already made, if it is for the same request.
async fn replayed(tx: &mut Tx, new: &NewJob<'_>) -> Result<Enqueued> {
    let job = job_by_key(tx, new.account, new.idempotency_key)
        .await?
        .ok_or_else(|| {
            JobsError::Corrupt(format!("job for key {:?} vanished", new.idempotency_key))
        })?;
    if job.kit != new.kit || job.upload_key != new.upload_key || job.spec != new.spec {
        return Err(LedgerError::IdempotencyConflict {
            key: new.idempotency_key.to_owned(),
            existing: format!("{} job {} for another design or spec", job.kit, job.id),
        }
        .into());
    }
    Ok(Enqueued {
        job,
        replayed: true,
    })
}
