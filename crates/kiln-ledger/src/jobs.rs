//! Kit jobs and their charges. A job is created with its reservation and its apalis task in one
//! transaction (`enqueue`); a worker `claim`s it (bumping the fencing token), reports
//! `progress`, and ends it with `succeed` (job succeeded + reservation committed) or `fail`
//! (job failed + reservation released), each one transaction that only the holder of the
//! current fencing token can complete. `reconcile` repairs what a crash can leave behind.
//!
//! The apalis task table is the execution engine only: tasks are pushed here (inside the
//! caller's transaction) and pruned; `kit_jobs` keeps the history users poll.

use kiln_core::{AccountId, Credits, Kit, Timestamp};
use serde::{Deserialize, Serialize};

use crate::db::{Db, Tx, on_tx};
use crate::ops::{self, Ctx};
use crate::{LedgerError, ReservationId, ReservationState};

type Result<T> = std::result::Result<T, LedgerError>;

/// What an apalis task carries: only the job's id; everything else is read from `kit_jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KitTask {
    pub job: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The charge behind a job, as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    Held,
    Committed,
    Released,
    Exempt,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub step: Option<String>,
    pub done: u32,
    pub total: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// A kit job as stored. `view()` gives the JSON of the interface contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KitJob {
    pub id: String,
    pub account_id: AccountId,
    pub idempotency_key: String,
    pub kit: Kit,
    pub status: JobStatus,
    pub reservation_id: ReservationId,
    pub reservation_state: ReservationState,
    pub exempt: bool,
    pub upload_key: String,
    pub spec: String,
    pub cost: Credits,
    pub attempts: u32,
    pub max_attempts: u32,
    pub fence: i64,
    pub worker: Option<String>,
    pub task_id: String,
    pub progress: Progress,
    pub run_at: Timestamp,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    pub error: Option<JobError>,
    pub manifest_key: Option<String>,
}

/// The job JSON of DESIGN.md §6.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub kit: Kit,
    pub status: JobStatus,
    pub progress: Progress,
    pub attempts: u32,
    pub cost: Credits,
    pub charge: Charge,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<JobError>,
}

impl KitJob {
    pub fn charge(&self) -> Charge {
        match (self.exempt, self.reservation_state) {
            (true, _) => Charge::Exempt,
            (false, ReservationState::Held) => Charge::Held,
            (false, ReservationState::Committed) => Charge::Committed,
            (false, ReservationState::Released) => Charge::Released,
        }
    }

    pub fn view(&self) -> JobView {
        JobView {
            id: self.id.clone(),
            kit: self.kit,
            status: self.status,
            progress: self.progress.clone(),
            attempts: self.attempts,
            cost: self.cost,
            charge: self.charge(),
            created_at: self.created_at.rfc3339(),
            started_at: self.started_at.map(|t| t.rfc3339()),
            finished_at: self.finished_at.map(|t| t.rfc3339()),
            error: self.error.clone(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    account_id: String,
    idempotency_key: String,
    kit: String,
    status: String,
    reservation_id: i64,
    upload_key: String,
    spec: String,
    cost: i64,
    attempts: i32,
    max_attempts: i32,
    fence: i64,
    worker: Option<String>,
    task_id: String,
    step: Option<String>,
    steps_done: i32,
    steps_total: i32,
    run_at_ms: i64,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    updated_at_ms: i64,
    error_code: Option<String>,
    error_message: Option<String>,
    manifest_key: Option<String>,
    charge_state: String,
    exempt: bool,
}

fn corrupt(what: &str, v: &str) -> LedgerError {
    LedgerError::Corrupt(format!("kit_jobs.{what} holds {v:?}"))
}

fn count(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl TryFrom<JobRow> for KitJob {
    type Error = LedgerError;

    fn try_from(r: JobRow) -> Result<KitJob> {
        Ok(KitJob {
            account_id: r
                .account_id
                .parse()
                .map_err(|_| corrupt("account_id", &r.account_id))?,
            kit: r.kit.parse().map_err(|_| corrupt("kit", &r.kit))?,
            status: JobStatus::parse(&r.status).ok_or_else(|| corrupt("status", &r.status))?,
            reservation_id: ReservationId(r.reservation_id),
            reservation_state: match r.charge_state.as_str() {
                "held" => ReservationState::Held,
                "committed" => ReservationState::Committed,
                "released" => ReservationState::Released,
                other => return Err(corrupt("charge", other)),
            },
            exempt: r.exempt,
            cost: Credits::new(i128::from(r.cost))
                .map_err(|_| corrupt("cost", &r.cost.to_string()))?,
            attempts: count(r.attempts),
            max_attempts: count(r.max_attempts),
            fence: r.fence,
            progress: Progress {
                step: r.step,
                done: count(r.steps_done),
                total: count(r.steps_total),
            },
            run_at: Timestamp::from_millis(r.run_at_ms),
            created_at: Timestamp::from_millis(r.created_at_ms),
            started_at: r.started_at_ms.map(Timestamp::from_millis),
            finished_at: r.finished_at_ms.map(Timestamp::from_millis),
            updated_at: Timestamp::from_millis(r.updated_at_ms),
            error: r.error_code.map(|code| JobError {
                code,
                message: r.error_message.unwrap_or_default(),
            }),
            id: r.id,
            idempotency_key: r.idempotency_key,
            upload_key: r.upload_key,
            spec: r.spec,
            worker: r.worker,
            task_id: r.task_id,
            manifest_key: r.manifest_key,
        })
    }
}

const SELECT_JOB: &str = "SELECT j.*, r.state AS charge_state, r.exempt FROM kit_jobs j \
     JOIN reservations r ON r.id = j.reservation_id";

pub async fn job(tx: &mut Tx, id: &str) -> Result<Option<KitJob>> {
    let sql = format!("{SELECT_JOB} WHERE j.id = $1");
    let row: Option<JobRow> = on_tx!(tx, c => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(id)
        .fetch_optional(&mut **c)
        .await?);
    row.map(KitJob::try_from).transpose()
}

async fn job_by_key(tx: &mut Tx, account: AccountId, key: &str) -> Result<Option<KitJob>> {
    let sql = format!("{SELECT_JOB} WHERE j.account_id = $1 AND j.idempotency_key = $2");
    let row: Option<JobRow> = on_tx!(tx, c => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(account.to_string())
        .bind(key)
        .fetch_optional(&mut **c)
        .await?);
    row.map(KitJob::try_from).transpose()
}

/// An account's jobs, newest first; `before` pages by job id (ULIDs sort by creation).
pub async fn jobs(
    tx: &mut Tx,
    account: AccountId,
    status: Option<JobStatus>,
    before: Option<&str>,
    limit: u32,
) -> Result<Vec<KitJob>> {
    let sql = format!(
        "{SELECT_JOB} WHERE j.account_id = $1 AND ($2 IS NULL OR j.status = $2) \
         AND ($3 IS NULL OR j.id < $3) ORDER BY j.id DESC LIMIT $4"
    );
    let rows: Vec<JobRow> = on_tx!(tx, c => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(account.to_string())
        .bind(status.map(JobStatus::as_str))
        .bind(before)
        .bind(i64::from(limit.min(500)))
        .fetch_all(&mut **c)
        .await?);
    rows.into_iter().map(KitJob::try_from).collect()
}

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
fn reservation_key(key: &str) -> String {
    format!("kit:{key}")
}

/// Checks an idempotency key the way `enqueue` will use it, so callers can refuse a bad one
/// before doing any work for it.
pub fn check_key(key: &str) -> Result<()> {
    let what = "idempotency key (with its kit: prefix)";
    if key.is_empty() {
        return Err(LedgerError::BadKey { what });
    }
    ops::check_key(&reservation_key(key), what)
}

/// The apalis task that runs a job, as apalis's own `push_tasks` writes it (payload through the
/// JSON codec, `TASK_DELIVERIES` deliveries, default priority, no metadata).
struct TaskRow {
    id: String,
    queue: &'static str,
    payload: Vec<u8>,
    /// apalis keeps whole seconds.
    run_at_secs: i64,
}

impl TaskRow {
    fn new(kit: Kit, task: &str, job: &str, run_at: Timestamp) -> Result<TaskRow> {
        let payload = serde_json::to_vec(&KitTask {
            job: job.to_owned(),
        })
        .map_err(|e| LedgerError::Corrupt(format!("task payload: {e}")))?;
        task.parse::<ulid::Ulid>()
            .map_err(|_| LedgerError::Corrupt(format!("task id {task:?} is not a ULID")))?;
        Ok(TaskRow {
            id: task.to_owned(),
            queue: kit.queue(),
            payload,
            run_at_secs: run_at.millis().div_euclid(1000).max(0),
        })
    }

    /// Binds the last four parameters of a [`task_pg`] statement: queue, payload, deliveries
    /// and run_at (the task id is the head's to bind).
    fn bind<'q, O>(
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
/// wake-ups sent. (apalis's own insert trigger is dropped by [`Db::migrate`]: kiln wakes workers
/// itself, and [`submit`] does it after its commit.)
macro_rules! task_pg {
    (ctes) => {
        ", t AS (INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, \
         run_at, priority, metadata) SELECT k.task_id, k.queue, k.payload, 'Pending', 0, \
         k.deliveries, to_timestamp(k.run_at_secs), 0, ''::hstore FROM k \
         RETURNING id, job_type, run_at)"
    };
    (wakes) => {
        "(SELECT COUNT(CASE WHEN run_at <= clock_timestamp() THEN \
         pg_notify('apalis::job::insert', json_build_object('job_type', job_type, 'id', id)::text)::text \
         END) FROM t)"
    };
}

/// The whole enqueue in one statement: the guarded hold (`$1`..`$21`), the job row drawing
/// its account and reservation from it (`$22`..`$28`) and its task (`$29`..`$32`). No row back
/// when the hold did not apply. No wake-up: a NOTIFY makes PostgreSQL serialize the commits of
/// notifying transactions (one global lock held through the WAL flush), which cost a tenth of
/// enqueue throughput; [`submit`] wakes workers after the commit instead ([`Wakes`]), and an
/// [`enqueue`] in a caller's transaction that takes this path wakes them in that transaction.
const ENQUEUE_PG: &str = ops::hold_pg!(
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

/// Wakes the workers listening for `job`'s queue when the caller's transaction commits.
async fn wake_on_commit(c: &mut sqlx::PgConnection, job: &KitJob) -> Result<()> {
    sqlx::query(
        "SELECT pg_notify('apalis::job::insert', \
         json_build_object('job_type', $1::text, 'id', $2::text)::text)",
    )
    .bind(job.kit.queue())
    .bind(&job.task_id)
    .execute(c)
    .await?;
    Ok(())
}

/// Reserves the kit's credits, inserts the job and pushes its apalis task, all in `tx`.
/// A replayed idempotency key returns the existing job; the same key for a different request
/// is a conflict.
pub async fn enqueue(tx: &mut Tx, ctx: &Ctx<'_>, new: &NewJob<'_>) -> Result<Enqueued> {
    check_key(new.idempotency_key)?;
    if let Tx::Postgres(c) = tx {
        match enqueue_optimistic(c, ctx, new).await? {
            Optimistic::Done(e) => {
                // Delivered when the caller commits (and dropped if it rolls back).
                wake_on_commit(c, &e.job).await?;
                return Ok(*e);
            }
            Optimistic::Replay => return replayed(tx, new).await,
            Optimistic::Locking => {}
        }
    }
    // The reservation is idempotent by the same key: a replay gets the existing one back (or a
    // conflict if the key was used for another kit), and the insert below then finds the job.
    let reservation = ops::reserve(
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
    .bind(&job.id)
    .bind(new.account.to_string())
    .bind(new.idempotency_key)
    .bind(new.kit.as_str())
    .bind(reservation.id.0)
    .bind(new.upload_key)
    .bind(new.spec)
    .bind(reservation.list_price.as_i64())
    .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
    .bind(&job.task_id)
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
/// round trips of BEGIN and COMMIT, and workers are woken after that commit ([`Wakes`]); when
/// the account needs locking (a renewal or expiry due, or two lost races) it runs in a
/// transaction.
pub async fn submit(ledger: &crate::Ledger, new: &NewJob<'_>) -> Result<Enqueued> {
    check_key(new.idempotency_key)?;
    let (db, ctx) = (ledger.db(), ledger.ctx());
    if let Db::Postgres(pool) = db {
        let mut c = pool.acquire().await?;
        match enqueue_optimistic(&mut c, &ctx, new).await? {
            Optimistic::Done(e) => {
                let wake = (e.job.kit.queue(), e.job.task_id.clone());
                if let Err(err) = ledger.wakes().send(&mut c, wake).await {
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

/// Wake-ups for workers of tasks already committed, sent group-commit style: a caller with
/// one to send queues it and, unless another caller is sending already, sends everything
/// queued, round after round, until nothing is left; each round is one small transaction that
/// does not wait for a WAL flush (a lost wake-up only means the task waits for a worker's next
/// look, at its heartbeat).
/// PostgreSQL serializes the commits of notifying transactions, so under load one round for
/// many tasks costs what one wake-up would.
#[derive(Debug, Default)]
pub struct Wakes {
    state: std::sync::Mutex<WakeState>,
}

#[derive(Debug, Default)]
struct WakeState {
    /// (queue, task id)
    queued: Vec<(&'static str, String)>,
    sending: bool,
}

/// Clears `sending` if the sender stops early (failed, or its future dropped); a normal finish
/// clears it itself, under the same lock that finds the queue empty, so a wake-up queued just
/// then is not left without a sender.
struct Sending<'a>(&'a Wakes);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.lock().sending = false;
    }
}

impl Wakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        // A panic elsewhere cannot leave the queue in a state worth refusing.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(&self, c: &mut sqlx::PgConnection, wake: (&'static str, String)) -> Result<()> {
        {
            let mut s = self.lock();
            s.queued.push(wake);
            if s.sending {
                return Ok(());
            }
            s.sending = true;
        }
        let sending = Sending(self);
        loop {
            let round = {
                let mut s = self.lock();
                if s.queued.is_empty() {
                    s.sending = false;
                    drop(s);
                    std::mem::forget(sending);
                    return Ok(());
                }
                std::mem::take(&mut s.queued)
            };
            let (queues, ids): (Vec<&str>, Vec<String>) = round.into_iter().unzip();
            sqlx::query(
                "SELECT set_config('synchronous_commit', 'off', true), \
                 pg_notify('apalis::job::insert', json_build_object('job_type', w.q, 'id', w.id)::text) \
                 FROM UNNEST($1::text[], $2::text[]) AS w(q, id)",
            )
            .bind(&queues)
            .bind(&ids)
            .execute(&mut *c)
            .await?;
        }
    }
}

enum Optimistic {
    Done(Box<Enqueued>),
    /// The key has a reservation already.
    Replay,
    /// Take the locking path.
    Locking,
}

/// The optimistic reserve ([`ops::plan_optimistic`]) with the job and its task written by the
/// same guarded statement ([`ENQUEUE_PG`]); on any PostgreSQL connection.
async fn enqueue_optimistic(
    c: &mut sqlx::PgConnection,
    ctx: &Ctx<'_>,
    new: &NewJob<'_>,
) -> Result<Optimistic> {
    let key = reservation_key(new.idempotency_key);
    for _ in 0..ops::OPTIMISTIC_ATTEMPTS {
        let plan = ops::plan_optimistic(
            c,
            ctx,
            new.account,
            new.kit.action(),
            &key,
            crate::Operation::Reserve,
        )
        .await?;
        let w = match plan {
            ops::OptimisticPlan::Existing(_) => return Ok(Optimistic::Replay),
            ops::OptimisticPlan::NeedsLock => return Ok(Optimistic::Locking),
            ops::OptimisticPlan::Write(w) => w,
        };
        let mut job = KitJob::queued(ctx, new, &w.reservation);
        let task = TaskRow::new(new.kit, &job.task_id, &job.id, ctx.now)?;
        let row: Option<(i64, i32)> = task
            .bind(
                w.bind(sqlx::query_as(ENQUEUE_PG))
                    .bind(&job.id)
                    .bind(new.idempotency_key)
                    .bind(new.kit.as_str())
                    .bind(new.upload_key)
                    .bind(new.spec)
                    .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
                    .bind(&job.task_id),
            )
            .fetch_optional(&mut *c)
            .await?;
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
            LedgerError::Corrupt(format!("job for key {:?} vanished", new.idempotency_key))
        })?;
    if job.kit != new.kit || job.upload_key != new.upload_key || job.spec != new.spec {
        return Err(LedgerError::IdempotencyConflict {
            key: new.idempotency_key.to_owned(),
            existing: format!("{} job {} for another design or spec", job.kit, job.id),
        });
    }
    Ok(Enqueued {
        job,
        replayed: true,
    })
}

impl KitJob {
    /// What `enqueue` writes for `new` on `reservation`, with new job and task ids.
    fn queued(ctx: &Ctx<'_>, new: &NewJob<'_>, reservation: &crate::Reservation) -> KitJob {
        KitJob {
            id: ulid::Ulid::generate().to_string(),
            account_id: new.account,
            idempotency_key: new.idempotency_key.to_owned(),
            kit: new.kit,
            status: JobStatus::Queued,
            reservation_id: reservation.id,
            reservation_state: reservation.state,
            exempt: reservation.exempt,
            upload_key: new.upload_key.to_owned(),
            spec: new.spec.to_owned(),
            cost: reservation.list_price,
            attempts: 0,
            max_attempts: new.max_attempts.max(1),
            fence: 0,
            worker: None,
            task_id: ulid::Ulid::generate().to_string(),
            progress: Progress {
                step: None,
                done: 0,
                total: 0,
            },
            run_at: ctx.now,
            created_at: ctx.now,
            started_at: None,
            finished_at: None,
            updated_at: ctx.now,
            error: None,
            manifest_key: None,
        }
    }
}

/// How many times apalis may deliver one task (crash recoveries). kiln's own attempt count on
/// the job is the real bound (claims past `max_attempts` fail the job); this is a backstop, and
/// a task apalis gives up on is repaired by the reconciler.
pub const TASK_DELIVERIES: usize = 10;

/// Pushes the apalis task that runs `job` at `run_at` (whole seconds, as apalis stores them),
/// and on PostgreSQL wakes listening workers when the transaction commits.
pub async fn push_task(
    tx: &mut Tx,
    kit: Kit,
    task: &str,
    job: &str,
    run_at: Timestamp,
) -> Result<()> {
    let t = TaskRow::new(kit, task, job, run_at)?;
    match tx {
        Tx::Postgres(c) => {
            let _: (i64,) = t
                .bind(sqlx::query_as(PUSH_TASK_PG).bind(&t.id))
                .fetch_one(&mut **c)
                .await?;
        }
        Tx::Sqlite(c) => {
            use apalis_core::task::builder::TaskBuilder;
            let id: apalis_core::task::task_id::TaskId =
                t.id.parse()
                    .map_err(|_| LedgerError::Corrupt(format!("task id {task:?} is not a ULID")))?;
            let task = TaskBuilder::new(t.payload)
                .task_id(id)
                .run_at_timestamp(u64::try_from(t.run_at_secs).unwrap_or(0))
                .max_attempts(TASK_DELIVERIES)
                .build();
            apalis_sqlite::queries::push_tasks(&mut **c, t.queue, &[task])
                .await
                .map_err(|e| LedgerError::Queue(e.to_string()))?;
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

/// What a worker may do with a delivered task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Run the job; finish it with this fencing token.
    Run { job: KitJob, fence: i64 },
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
    id: &str,
    task: &str,
    worker: &str,
    lease_ms: i64,
) -> Result<Claim> {
    let Some(current) = job(tx, id).await? else {
        return Ok(Claim::Finished(JobStatus::Failed));
    };
    if current.status.is_terminal() || current.task_id != task {
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
    .bind(id)
    .bind(worker)
    .bind(ctx.now.millis())
    .bind(current.fence)
    .fetch_optional(&mut **c)
    .await?);
    let Some(fence) = fence else {
        // Someone else claimed it between our read and write: they own it now.
        return Ok(Claim::Finished(JobStatus::Running));
    };
    let job = job(tx, id).await?.ok_or_else(|| vanished(id))?;
    Ok(Claim::Run { job, fence })
}

fn vanished(id: &str) -> LedgerError {
    LedgerError::Corrupt(format!("job {id} vanished"))
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
    id: &str,
    fence: i64,
    p: &Progress,
) -> Result<bool> {
    relaxed(tx).await?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE kit_jobs SET step = $3, steps_done = $4, steps_total = $5, updated_at_ms = $6 \
         WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(fence)
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
pub async fn touch(tx: &mut Tx, now: Timestamp, id: &str, fence: i64) -> Result<bool> {
    relaxed(tx).await?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE kit_jobs SET updated_at_ms = $3 WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(fence)
    .bind(now.millis())
    .execute(&mut **c)
    .await?
    .rows_affected());
    Ok(n == 1)
}

/// Whether `fence` still owns the running job (checked before each write to storage, so a
/// superseded attempt stops publishing as soon as it can tell).
pub async fn owns(tx: &mut Tx, id: &str, fence: i64) -> Result<bool> {
    let n: i64 = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT COUNT(*) FROM kit_jobs WHERE id = $1 AND fence = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(fence)
    .fetch_one(&mut **c)
    .await?);
    Ok(n == 1)
}

/// Job succeeded + reservation committed. `false` (and nothing written) if `fence` is stale.
pub async fn succeed(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: &str,
    fence: i64,
    manifest_key: &str,
) -> Result<bool> {
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'succeeded', finished_at_ms = $3, updated_at_ms = $3, \
         manifest_key = $4, step = NULL, steps_done = steps_total, error_code = NULL, error_message = NULL \
         WHERE id = $1 AND fence = $2 AND status = 'running' RETURNING reservation_id",
    )
    .bind(id)
    .bind(fence)
    .bind(ctx.now.millis())
    .bind(manifest_key)
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Ok(false);
    };
    ops::commit(tx, ctx, ReservationId(r)).await?;
    Ok(true)
}

/// Job failed + reservation released. `false` if `fence` is stale or the job already ended.
pub async fn fail(
    tx: &mut Tx,
    ctx: &Ctx<'_>,
    id: &str,
    fence: i64,
    code: &str,
    message: &str,
) -> Result<bool> {
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'failed', finished_at_ms = $3, updated_at_ms = $3, \
         error_code = $4, error_message = $5 \
         WHERE id = $1 AND fence = $2 AND status IN ('queued', 'running') RETURNING reservation_id",
    )
    .bind(id)
    .bind(fence)
    .bind(ctx.now.millis())
    .bind(code)
    .bind(message)
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Ok(false);
    };
    ops::release(tx, ctx, ReservationId(r)).await?;
    Ok(true)
}

/// Hands the job back to the queue to run again at `run_at` on a new task (kiln's own backoff:
/// apalis would retry at once), recording why. `false` if `fence` is stale.
pub async fn retry_later(
    tx: &mut Tx,
    now: Timestamp,
    id: &str,
    fence: i64,
    run_at: Timestamp,
    code: &str,
    message: &str,
) -> Result<bool> {
    requeue(tx, id, fence, now, run_at, Some((code, message))).await
}

/// Cancels a queued job of `account`'s and releases its credits. Any other status is
/// `JobNotCancellable`; another account's job is `JobNotFound`.
pub async fn cancel(tx: &mut Tx, ctx: &Ctx<'_>, account: AccountId, id: &str) -> Result<KitJob> {
    let found = job(tx, id)
        .await?
        .filter(|j| j.account_id == account)
        .ok_or_else(|| LedgerError::JobNotFound(id.to_owned()))?;
    let reservation: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'cancelled', finished_at_ms = $2, updated_at_ms = $2 \
         WHERE id = $1 AND status = 'queued' RETURNING reservation_id",
    )
    .bind(id)
    .bind(ctx.now.millis())
    .fetch_optional(&mut **c)
    .await?);
    let Some(r) = reservation else {
        return Err(LedgerError::JobNotCancellable {
            id: id.to_owned(),
            status: found.status,
        });
    };
    ops::release(tx, ctx, ReservationId(r)).await?;
    job(tx, id).await?.ok_or_else(|| vanished(id))
}

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

/// What one reconciler pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reconciled {
    /// Held reservations of ended jobs, committed or released to match.
    pub charges_resolved: u32,
    /// Open jobs whose task had ended or vanished, given a new task.
    pub requeued: u32,
    /// Open jobs whose task had ended or vanished with no attempts left, failed and released.
    pub failed: u32,
}

/// Repairs what a crash can leave: a reservation still held for an ended job, and an open job
/// whose apalis task is gone or finished (pruned, killed, or marked done by a stale attempt)
/// and that nobody has touched for `stale_ms`.
pub async fn reconcile(tx: &mut Tx, ctx: &Ctx<'_>, stale_ms: i64) -> Result<Reconciled> {
    let mut out = Reconciled::default();
    let held: Vec<(i64, String)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT r.id, j.status FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id \
         WHERE r.state = 'held' AND j.status IN ('succeeded', 'failed', 'cancelled')",
    )
    .fetch_all(&mut **c)
    .await?);
    for (r, status) in held {
        if status == "succeeded" {
            ops::commit(tx, ctx, ReservationId(r)).await?;
        } else {
            ops::release(tx, ctx, ReservationId(r)).await?;
        }
        out.charges_resolved += 1;
    }
    let live = match tx {
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
    let orphans: Vec<(String, i64, i32, i32)> = on_tx!(tx, c => sqlx::query_as(live)
        .bind(ctx.now.millis() - stale_ms)
        .fetch_all(&mut **c)
        .await?);
    for (id, fence, attempts, max) in orphans {
        if attempts >= max {
            if fail(
                tx,
                ctx,
                &id,
                fence,
                "attempts_exhausted",
                "the job's worker stopped and no attempts are left",
            )
            .await?
            {
                out.failed += 1;
            }
            continue;
        }
        if requeue(tx, &id, fence, ctx.now, ctx.now, None).await? {
            out.requeued += 1;
        }
    }
    Ok(out)
}

/// Back to queued on a fresh task due at `run_at`, with a new fencing token that shuts out any
/// straggler; `error` (code, message) is recorded when given. `false` if `fence` is stale or the
/// job has ended.
async fn requeue(
    tx: &mut Tx,
    id: &str,
    fence: i64,
    now: Timestamp,
    run_at: Timestamp,
    error: Option<(&str, &str)>,
) -> Result<bool> {
    let task = ulid::Ulid::generate().to_string();
    let kit: Option<String> = on_tx!(tx, c => sqlx::query_scalar(
        "UPDATE kit_jobs SET status = 'queued', task_id = $3, fence = fence + 1, worker = NULL, \
         run_at_ms = $4, updated_at_ms = $5, error_code = COALESCE($6, error_code), \
         error_message = COALESCE($7, error_message) \
         WHERE id = $1 AND fence = $2 AND status IN ('queued', 'running') RETURNING kit",
    )
    .bind(id)
    .bind(fence)
    .bind(&task)
    .bind(run_at.millis())
    .bind(now.millis())
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
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
/// another worker takes them without waiting for their leases to run out. Returns how many.
pub async fn hand_back(tx: &mut Tx, now: Timestamp, worker_prefix: &str) -> Result<u32> {
    let held: Vec<(String, i64)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT id, fence FROM kit_jobs WHERE status = 'running' AND worker LIKE $1",
    )
    .bind(format!("{worker_prefix}%"))
    .fetch_all(&mut **c)
    .await?);
    let mut n = 0;
    for (id, fence) in held {
        if requeue(tx, &id, fence, now, now, None).await? {
            n += 1;
        }
    }
    Ok(n)
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

/// Every job's status against its charge: ended jobs must have resolved charges that match
/// (succeeded = committed; failed or cancelled = released), open jobs must still hold theirs,
/// and every kit reservation must belong to a job. Part of `audit`.
pub async fn check_charges(tx: &mut Tx) -> Result<Vec<crate::Breach>> {
    let rows: Vec<(String, String, String, String)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT j.account_id, j.id, j.status, r.state FROM kit_jobs j \
         JOIN reservations r ON r.id = j.reservation_id \
         WHERE NOT ((j.status = 'succeeded' AND r.state = 'committed') \
           OR (j.status IN ('failed', 'cancelled') AND r.state = 'released') \
           OR (j.status IN ('queued', 'running') AND r.state = 'held'))",
    )
    .fetch_all(&mut **c)
    .await?);
    let mut out: Vec<crate::Breach> = rows
        .into_iter()
        .map(|(account_id, id, status, state)| crate::Breach {
            account_id,
            what: format!("job {id} is {status} but its charge is {state}"),
        })
        .collect();
    let lonely: Vec<(String, i64)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT r.account_id, r.id FROM reservations r LEFT JOIN kit_jobs j ON j.reservation_id = r.id \
         WHERE r.idempotency_key LIKE 'kit:%' AND j.id IS NULL",
    )
    .fetch_all(&mut **c)
    .await?);
    out.extend(lonely.into_iter().map(|(account_id, r)| crate::Breach {
        account_id,
        what: format!("kit reservation {r} has no job"),
    }));
    Ok(out)
}
