//! Kit jobs as stored and as users see them (the job JSON of DESIGN.md §6), and reading them.

use kiln_core::{AccountId, Credits, Kit, Timestamp};
use kiln_ledger::{Ctx, Reservation, ReservationId, ReservationState, Tx, on_tx};
use serde::{Deserialize, Serialize};

use crate::{Fence, JobId, JobsError, NewJob, Result, TaskId, WorkerName};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    Held,
    Committed,
    Released,
    Exempt,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub step: Option<String>,
    pub done: u32,
    pub total: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// A kit job as stored. `view()` gives the JSON of the interface contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KitJob {
    pub id: JobId,
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
    pub fence: Fence,
    pub worker: Option<WorkerName>,
    pub task_id: TaskId,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: JobId,
    pub kit: Kit,
    pub status: JobStatus,
    pub progress: Progress,
    pub attempts: u32,
    pub cost: Credits,
    pub charge: Charge,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
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

pub(crate) fn corrupt(what: &str, v: &str) -> JobsError {
    JobsError::Corrupt(format!("kit_jobs.{what} holds {v:?}"))
}

pub(crate) fn count(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl TryFrom<JobRow> for KitJob {
    type Error = JobsError;

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
            fence: Fence(r.fence),
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
            id: r.id.parse().map_err(|_| corrupt("id", &r.id))?,
            idempotency_key: r.idempotency_key,
            upload_key: r.upload_key,
            spec: r.spec,
            worker: r.worker.map(WorkerName::new),
            task_id: r
                .task_id
                .parse()
                .map_err(|_| corrupt("task_id", &r.task_id))?,
            manifest_key: r.manifest_key,
        })
    }
}

/// A job row with its charge's state, then `$rest` of the statement.
macro_rules! select_job {
    ($rest:literal) => {
        concat!(
            "SELECT j.*, r.state AS charge_state, r.exempt FROM kit_jobs j \
             JOIN reservations r ON r.id = j.reservation_id ",
            $rest
        )
    };
}

const JOB_BY_ID: &str = select_job!("WHERE j.id = $1");

pub async fn job(tx: &mut Tx, id: &JobId) -> Result<Option<KitJob>> {
    let row: Option<JobRow> = on_tx!(tx, c => sqlx::query_as(JOB_BY_ID)
        .bind(id.as_str())
        .fetch_optional(&mut **c)
        .await?);
    row.map(KitJob::try_from).transpose()
}

/// The same read as `job`, as one statement outside any transaction: what a status poll needs
/// (on a held connection where `reads` has them).
pub async fn read_job(reads: &kiln_ledger::ReadDb, id: &JobId) -> Result<Option<KitJob>> {
    let row: Option<JobRow> = kiln_ledger::on_read!(reads, c => sqlx::query_as(JOB_BY_ID)
        .bind(id.as_str())
        .fetch_optional(c)
        .await)?;
    row.map(KitJob::try_from).transpose()
}

pub async fn job_by_key(tx: &mut Tx, account: AccountId, key: &str) -> Result<Option<KitJob>> {
    let sql = select_job!("WHERE j.account_id = $1 AND j.idempotency_key = $2");
    let row: Option<JobRow> = on_tx!(tx, c => sqlx::query_as(sql)
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
    before: Option<&JobId>,
    limit: u32,
) -> Result<Vec<KitJob>> {
    let sql = select_job!(
        "WHERE j.account_id = $1 AND ($2 IS NULL OR j.status = $2) \
         AND ($3 IS NULL OR j.id < $3) ORDER BY j.id DESC LIMIT $4"
    );
    let rows: Vec<JobRow> = on_tx!(tx, c => sqlx::query_as(sql)
        .bind(account.to_string())
        .bind(status.map(JobStatus::as_str))
        .bind(before.map(JobId::as_str))
        .bind(i64::from(limit.min(500)))
        .fetch_all(&mut **c)
        .await?);
    rows.into_iter().map(KitJob::try_from).collect()
}

impl KitJob {
    /// What `enqueue` writes for `new` on `reservation`, with new job and task ids.
    pub(crate) fn queued(ctx: &Ctx<'_>, new: &NewJob<'_>, reservation: &Reservation) -> KitJob {
        KitJob {
            id: JobId::generate(),
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
            fence: Fence(0),
            worker: None,
            task_id: TaskId::generate(),
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

pub(crate) fn vanished(id: &JobId) -> JobsError {
    JobsError::Corrupt(format!("job {id} vanished"))
}
