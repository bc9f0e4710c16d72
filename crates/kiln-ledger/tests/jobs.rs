//! Kit jobs and their charges, one suite run unchanged against PostgreSQL and SQLite: enqueue is
//! atomic and idempotent, only the current fencing token can finish a job, success commits and
//! failure releases exactly once, cancel and the reconciler keep job and charge in agreement.

mod common;

use kiln_ledger::backends;

use common::{DAY, Harness};
use kiln_core::Kit;
use kiln_ledger::jobs::{self, Charge, Claim, JobStatus, KitTask, NewJob, Progress};
use kiln_ledger::{AccountId, Backend, Db, LedgerError, NewAccount, PlanId, Tx};

backends!(
    enqueue_reserves_and_pushes_one_task_atomically,
    only_the_current_fence_finishes_a_job,
    failure_releases_and_retries_use_new_tasks,
    cancel_only_queued_jobs_of_their_owner,
    reconciler_requeues_orphans_and_resolves_charges,
);

async fn account(h: &Harness) -> AccountId {
    h.ledger
        .create_account(NewAccount {
            plan: PlanId::Discover,
            is_admin: false,
            email: None,
            monthly_allowance: None,
        })
        .await
        .expect("create account")
        .account
        .id
}

fn new_job<'a>(account: AccountId, kit: Kit, key: &'a str, upload: &'a str) -> NewJob<'a> {
    NewJob {
        account,
        kit,
        idempotency_key: key,
        upload_key: upload,
        spec: r#"{"style_number":"A-1","name":"Band","category":"ring"}"#,
        max_attempts: 3,
    }
}

/// Runs `f` in one transaction at the harness clock's time and commits it.
macro_rules! in_tx {
    ($h:expr, |$tx:ident, $ctx:ident| $body:expr) => {{
        let mut $tx = $h.ledger.db().begin().await.expect("begin");
        let $ctx = $h.ledger.ctx();
        let out = $body;
        $tx.commit().await.expect("commit");
        out
    }};
}

async fn enqueue(
    h: &Harness,
    acct: AccountId,
    kit: Kit,
    key: &str,
    upload: &str,
) -> jobs::Enqueued {
    in_tx!(h, |tx, ctx| jobs::enqueue(
        &mut tx,
        &ctx,
        &new_job(acct, kit, key, upload)
    )
    .await
    .expect("enqueue"))
}

async fn available(h: &Harness, id: AccountId) -> u64 {
    h.ledger.balance(id).await.expect("balance").available.get()
}

/// The apalis tasks of `queue`: (id, payload).
async fn tasks(db: &Db, queue: &str) -> Vec<(String, KitTask)> {
    let rows: Vec<(String, Vec<u8>)> = match db {
        Db::Postgres(p) => {
            sqlx::query_as("SELECT id, job FROM apalis.jobs WHERE job_type = $1 ORDER BY id")
                .bind(queue)
                .fetch_all(p)
                .await
                .expect("tasks")
        }
        Db::Sqlite(p) => sqlx::query_as("SELECT id, job FROM Jobs WHERE job_type = $1 ORDER BY id")
            .bind(queue)
            .fetch_all(p)
            .await
            .expect("tasks"),
    };
    rows.into_iter()
        .map(|(id, job)| (id, serde_json::from_slice(&job).expect("task payload")))
        .collect()
}

async fn delete_task(db: &Db, id: &str) {
    match db {
        Db::Postgres(p) => sqlx::query("DELETE FROM apalis.jobs WHERE id = $1")
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()),
        Db::Sqlite(p) => sqlx::query("DELETE FROM Jobs WHERE id = $1")
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()),
    }
    .expect("delete task");
}

async fn assert_agree(h: &Harness) {
    let breaches = h.ledger.audit().await.expect("audit");
    assert!(breaches.is_empty(), "ledger: {breaches:#?}");
    let mut tx = h.ledger.db().begin_read().await.expect("begin");
    let bad = jobs::check_charges(&mut tx).await.expect("check");
    assert!(bad.is_empty(), "jobs vs charges: {bad:#?}");
}

/// How long a running attempt's lease lasts in these tests.
const LEASE: i64 = 60_000;

/// A later delivery after the running attempt went silent for longer than its lease.
async fn claim_after_lease(h: &Harness, id: &str, task: &str, worker: &str) -> Claim {
    h.clock.advance_millis(LEASE + 1);
    claim(h, id, task, worker).await
}

async fn claim(h: &Harness, id: &str, task: &str, worker: &str) -> Claim {
    in_tx!(h, |tx, ctx| jobs::claim(
        &mut tx, &ctx, id, task, worker, LEASE
    )
    .await
    .expect("claim"))
}

fn fence_of(c: &Claim) -> i64 {
    match c {
        Claim::Run { fence, .. } => *fence,
        other => panic!("expected to run, got {other:?}"),
    }
}

async fn get(h: &Harness, id: &str) -> jobs::KitJob {
    let mut tx: Tx = h.ledger.db().begin_read().await.expect("begin");
    jobs::job(&mut tx, id).await.expect("job").expect("exists")
}

async fn enqueue_reserves_and_pushes_one_task_atomically(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = account(&h).await;
    let before = available(&h, acct).await;
    let first = enqueue(&h, acct, Kit::Essentials, "k1", "uploads/a.jpg").await;
    assert!(!first.replayed);
    let job = first.job;
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.charge(), Charge::Held);
    assert_eq!(job.cost.get(), 10);
    assert_eq!(available(&h, acct).await, before - 10);
    let queued = tasks(h.ledger.db(), "kits.essentials").await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].0, job.task_id);
    assert_eq!(queued[0].1.job, job.id);

    // The same key again: the same job, nothing more reserved or queued.
    let again = enqueue(&h, acct, Kit::Essentials, "k1", "uploads/a.jpg").await;
    assert!(again.replayed);
    assert_eq!(again.job.id, job.id);
    assert_eq!(available(&h, acct).await, before - 10);
    assert_eq!(tasks(h.ledger.db(), "kits.essentials").await.len(), 1);

    // The same key for another design is a conflict.
    let mut tx = h.ledger.db().begin().await.expect("begin");
    let ctx = h.ledger.ctx();
    let e = jobs::enqueue(
        &mut tx,
        &ctx,
        &new_job(acct, Kit::Essentials, "k1", "uploads/b.jpg"),
    )
    .await
    .expect_err("conflict");
    assert!(matches!(e, LedgerError::IdempotencyConflict { .. }), "{e}");
    drop(tx);

    // Not enough credits for a second Caratzon: refused, and no job, task or hold is left.
    enqueue(&h, acct, Kit::Caratzon, "c1", "uploads/a.jpg").await;
    let left = available(&h, acct).await;
    let mut tx = h.ledger.db().begin().await.expect("begin");
    let e = jobs::enqueue(
        &mut tx,
        &ctx,
        &new_job(acct, Kit::Caratzon, "c2", "uploads/a.jpg"),
    )
    .await
    .expect_err("insufficient");
    assert!(matches!(e, LedgerError::InsufficientCredits { .. }), "{e}");
    drop(tx);
    assert_eq!(available(&h, acct).await, left);
    assert_eq!(tasks(h.ledger.db(), "kits.caratzon").await.len(), 1);

    // A transaction rolled back after enqueue leaves nothing behind either.
    let mut tx = h.ledger.db().begin().await.expect("begin");
    jobs::enqueue(
        &mut tx,
        &ctx,
        &new_job(acct, Kit::Essentials, "rolled-back", "uploads/a.jpg"),
    )
    .await
    .expect("enqueue");
    drop(tx);
    assert_eq!(available(&h, acct).await, left);
    assert_eq!(tasks(h.ledger.db(), "kits.essentials").await.len(), 1);
    assert_agree(&h).await;
}

async fn only_the_current_fence_finishes_a_job(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = account(&h).await;
    let job = enqueue(&h, acct, Kit::Essentials, "k", "u").await.job;
    // The same task delivered to two workers: while the first renews its lease, the second
    // leaves the job alone; once the first goes silent, the next claim supersedes it.
    let stale = fence_of(&claim(&h, &job.id, &job.task_id, "worker-a").await);
    assert_eq!(
        claim(&h, &job.id, &job.task_id, "worker-b").await,
        Claim::Busy
    );
    h.clock.advance_millis(LEASE / 2);
    let renewed = in_tx!(h, |tx, ctx| jobs::touch(&mut tx, ctx.now, &job.id, stale)
        .await
        .expect("touch"));
    assert!(renewed);
    h.clock.advance_millis(LEASE / 2 + 1);
    assert_eq!(
        claim(&h, &job.id, &job.task_id, "worker-b").await,
        Claim::Busy,
        "the renewed lease holds"
    );
    let current = fence_of(&claim_after_lease(&h, &job.id, &job.task_id, "worker-b").await);
    assert!(current > stale);
    let renewed = in_tx!(h, |tx, ctx| jobs::touch(&mut tx, ctx.now, &job.id, stale)
        .await
        .expect("touch"));
    assert!(!renewed, "a superseded attempt cannot renew the lease");
    let p = Progress {
        step: Some("copy".into()),
        done: 6,
        total: 7,
    };
    let wrote = in_tx!(h, |tx, ctx| jobs::progress(
        &mut tx, ctx.now, &job.id, stale, &p
    )
    .await
    .expect("progress"));
    assert!(!wrote, "a stale attempt must not report progress");
    let won = in_tx!(h, |tx, ctx| jobs::succeed(
        &mut tx,
        &ctx,
        &job.id,
        stale,
        "kits/x/manifest.json"
    )
    .await
    .expect("succeed"));
    assert!(!won, "a stale attempt must not finish the job");
    let failed = in_tx!(h, |tx, ctx| jobs::fail(
        &mut tx, &ctx, &job.id, stale, "x", "y"
    )
    .await
    .expect("fail"));
    assert!(!failed, "a stale attempt must not fail the job");
    assert_eq!(get(&h, &job.id).await.charge(), Charge::Held);

    let won = in_tx!(h, |tx, ctx| jobs::succeed(
        &mut tx,
        &ctx,
        &job.id,
        current,
        "kits/x/manifest.json"
    )
    .await
    .expect("succeed"));
    assert!(won);
    let done = get(&h, &job.id).await;
    assert_eq!(
        (done.status, done.charge(), done.attempts),
        (JobStatus::Succeeded, Charge::Committed, 2)
    );
    assert_eq!(done.manifest_key.as_deref(), Some("kits/x/manifest.json"));
    // Succeeding twice commits once; a late delivery finds the job finished.
    let again = in_tx!(h, |tx, ctx| jobs::succeed(
        &mut tx, &ctx, &job.id, current, "m"
    )
    .await
    .expect("succeed"));
    assert!(!again);
    assert_eq!(
        claim(&h, &job.id, &job.task_id, "worker-c").await,
        Claim::Finished(JobStatus::Succeeded)
    );
    let b = h.ledger.balance(acct).await.expect("balance");
    assert_eq!((b.committed.get(), b.held.get()), (10, 0));
    assert_agree(&h).await;
}

async fn failure_releases_and_retries_use_new_tasks(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = account(&h).await;
    let before = available(&h, acct).await;
    let job = enqueue(&h, acct, Kit::Caratzon, "k", "u").await.job;
    let fence = fence_of(&claim(&h, &job.id, &job.task_id, "w").await);
    let run_at = h.ledger.ctx().now.plus_millis(30_000);
    let handed_back = in_tx!(h, |tx, ctx| jobs::retry_later(
        &mut tx,
        ctx.now,
        &job.id,
        fence,
        run_at,
        "storage_unavailable",
        "S3 timed out"
    )
    .await
    .expect("retry"));
    assert!(handed_back);
    let queued = get(&h, &job.id).await;
    assert_eq!(queued.status, JobStatus::Queued);
    assert_ne!(queued.task_id, job.task_id, "a retry runs on a new task");
    assert_eq!(queued.run_at, run_at);
    assert_eq!(
        queued.error.as_ref().map(|e| e.code.as_str()),
        Some("storage_unavailable")
    );
    assert_eq!(tasks(h.ledger.db(), "kits.caratzon").await.len(), 2);
    // The old task, delivered again, does nothing.
    assert_eq!(
        claim(&h, &job.id, &job.task_id, "w").await,
        Claim::Finished(JobStatus::Queued)
    );
    // Attempts 2 and 3 on the new task, then the job gives up and releases.
    let f2 = fence_of(&claim(&h, &job.id, &queued.task_id, "w").await);
    let f3 = fence_of(&claim_after_lease(&h, &job.id, &queued.task_id, "w").await);
    assert!(f3 > f2);
    match claim_after_lease(&h, &job.id, &queued.task_id, "w").await {
        Claim::GaveUp(j) => {
            assert_eq!(
                (j.status, j.charge()),
                (JobStatus::Failed, Charge::Released)
            );
            assert_eq!(j.error.map(|e| e.code), Some("attempts_exhausted".into()));
        }
        other => panic!("expected to give up, got {other:?}"),
    }
    assert_eq!(available(&h, acct).await, before);

    // A permanent failure releases at once.
    let job = enqueue(&h, acct, Kit::Essentials, "k2", "u").await.job;
    let fence = fence_of(&claim(&h, &job.id, &job.task_id, "w").await);
    let failed = in_tx!(h, |tx, ctx| jobs::fail(
        &mut tx,
        &ctx,
        &job.id,
        fence,
        "undecodable_image",
        "truncated"
    )
    .await
    .expect("fail"));
    assert!(failed);
    let j = get(&h, &job.id).await;
    assert_eq!(
        (j.status, j.charge()),
        (JobStatus::Failed, Charge::Released)
    );
    assert_eq!(available(&h, acct).await, before);
    assert_agree(&h).await;
}

async fn cancel_only_queued_jobs_of_their_owner(backend: Backend) {
    let h = Harness::new(backend).await;
    let (acct, other) = (account(&h).await, account(&h).await);
    let before = available(&h, acct).await;
    let queued = enqueue(&h, acct, Kit::Essentials, "a", "u").await.job;
    let running = enqueue(&h, acct, Kit::Essentials, "b", "u").await.job;
    fence_of(&claim(&h, &running.id, &running.task_id, "w").await);

    let mut tx = h.ledger.db().begin().await.expect("begin");
    let ctx = h.ledger.ctx();
    let e = jobs::cancel(&mut tx, &ctx, other, &queued.id)
        .await
        .expect_err("not theirs");
    assert!(matches!(e, LedgerError::JobNotFound(_)), "{e}");
    let e = jobs::cancel(&mut tx, &ctx, acct, &running.id)
        .await
        .expect_err("running");
    assert!(
        matches!(
            e,
            LedgerError::JobNotCancellable {
                status: JobStatus::Running,
                ..
            }
        ),
        "{e}"
    );
    let cancelled = jobs::cancel(&mut tx, &ctx, acct, &queued.id)
        .await
        .expect("cancel");
    tx.commit().await.expect("commit");
    assert_eq!(
        (cancelled.status, cancelled.charge()),
        (JobStatus::Cancelled, Charge::Released)
    );
    assert_eq!(available(&h, acct).await, before - 10);
    // Its task, delivered later, does nothing.
    assert_eq!(
        claim(&h, &queued.id, &queued.task_id, "w").await,
        Claim::Finished(JobStatus::Cancelled)
    );
    assert_agree(&h).await;
}

async fn reconciler_requeues_orphans_and_resolves_charges(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = account(&h).await;
    let job = enqueue(&h, acct, Kit::Essentials, "k", "u").await.job;
    let stale = fence_of(&claim(&h, &job.id, &job.task_id, "dead-worker").await);
    // Its task vanishes (pruned, or marked done by a stale attempt) while the job is open.
    delete_task(h.ledger.db(), &job.task_id).await;
    let fresh = in_tx!(h, |tx, ctx| jobs::reconcile(&mut tx, &ctx, 60_000)
        .await
        .expect("reconcile"));
    assert_eq!(
        fresh.requeued, 0,
        "a job touched within the window is left alone"
    );
    h.clock.advance_millis(2 * 60_000);
    let r = in_tx!(h, |tx, ctx| jobs::reconcile(&mut tx, &ctx, 60_000)
        .await
        .expect("reconcile"));
    assert_eq!(r.requeued, 1);
    let requeued = get(&h, &job.id).await;
    assert_eq!(requeued.status, JobStatus::Queued);
    assert!(
        requeued.fence > stale,
        "the dead worker's token is shut out"
    );
    let on_queue = tasks(h.ledger.db(), "kits.essentials").await;
    assert_eq!(on_queue.len(), 1);
    assert_eq!(on_queue[0].0, requeued.task_id);
    let won = in_tx!(h, |tx, ctx| jobs::succeed(
        &mut tx, &ctx, &job.id, stale, "m"
    )
    .await
    .expect("succeed"));
    assert!(!won);

    // Out of attempts: the reconciler fails the job and releases.
    for _ in 0..2 {
        fence_of(&claim_after_lease(&h, &job.id, &requeued.task_id, "w").await);
    }
    delete_task(h.ledger.db(), &requeued.task_id).await;
    h.clock.advance_millis(DAY);
    let r = in_tx!(h, |tx, ctx| jobs::reconcile(&mut tx, &ctx, 60_000)
        .await
        .expect("reconcile"));
    assert_eq!((r.requeued, r.failed), (0, 1));
    let j = get(&h, &job.id).await;
    assert_eq!(
        (j.status, j.charge()),
        (JobStatus::Failed, Charge::Released)
    );

    // A held charge under an ended job (as after tampering or a bug) is resolved to match.
    let job2 = enqueue(&h, acct, Kit::Essentials, "k2", "u").await.job;
    match h.ledger.db() {
        Db::Postgres(p) => sqlx::query("UPDATE kit_jobs SET status = 'succeeded' WHERE id = $1")
            .bind(&job2.id)
            .execute(p)
            .await
            .map(|_| ()),
        Db::Sqlite(p) => sqlx::query("UPDATE kit_jobs SET status = 'succeeded' WHERE id = $1")
            .bind(&job2.id)
            .execute(p)
            .await
            .map(|_| ()),
    }
    .expect("tamper");
    let mut tx = h.ledger.db().begin_read().await.expect("begin");
    let bad = jobs::check_charges(&mut tx).await.expect("check");
    drop(tx);
    assert_eq!(bad.len(), 1, "{bad:?}");
    let r = in_tx!(h, |tx, ctx| jobs::reconcile(&mut tx, &ctx, 60_000)
        .await
        .expect("reconcile"));
    assert_eq!(r.charges_resolved, 1);
    assert_eq!(get(&h, &job2.id).await.charge(), Charge::Committed);
    assert_agree(&h).await;
}
