//! Kit jobs and their charges, one suite run unchanged against PostgreSQL and SQLite: enqueue is
//! atomic and idempotent, only the current fencing token can finish a job, success commits and
//! failure releases exactly once, cancel and the reconciler keep job and charge in agreement.

mod common;

use kiln_ledger::backends;

use common::{DAY, Harness, tasks};
use kiln_core::Kit;
use kiln_jobs::{
    self as jobs, Charge, Claim, Fence, JobId, JobStatus, JobsError, NewJob, Progress, Queue,
    TaskId, WorkerName,
};
use kiln_ledger::{AccountId, Backend, Db, LedgerError, NewAccount, PlanId, Tx};

backends!(
    enqueue_reserves_and_pushes_one_task_atomically,
    submit_writes_what_enqueue_writes_and_locks_when_due,
    only_the_current_fence_finishes_a_job,
    failure_releases_and_retries_use_new_tasks,
    cancel_only_queued_jobs_of_their_owner,
    reconciler_requeues_orphans_and_resolves_charges,
    a_hand_back_gives_the_attempt_back,
    caller_keys_stay_out_of_the_kit_and_hold_key_space,
);

async fn account(ledger: &kiln_ledger::Ledger) -> AccountId {
    ledger
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

async fn delete_task(db: &Db, id: &TaskId) {
    kiln_jobs::apalis::delete_task(db, id)
        .await
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
async fn claim_after_lease(h: &Harness, id: &JobId, task: &TaskId, worker: &str) -> Claim {
    h.clock.advance_millis(LEASE + 1);
    claim(h, id, task, worker).await
}

async fn claim(h: &Harness, id: &JobId, task: &TaskId, worker: &str) -> Claim {
    let worker = WorkerName::new(worker);
    in_tx!(h, |tx, ctx| jobs::claim(
        &mut tx, &ctx, id, task, &worker, LEASE
    )
    .await
    .expect("claim"))
}

fn fence_of(c: &Claim) -> Fence {
    match c {
        Claim::Run { fence, .. } => *fence,
        other => panic!("expected to run, got {other:?}"),
    }
}

async fn get(h: &Harness, id: &JobId) -> jobs::KitJob {
    let mut tx: Tx = h.ledger.db().begin_read().await.expect("begin");
    jobs::job(&mut tx, id).await.expect("job").expect("exists")
}

async fn enqueue_reserves_and_pushes_one_task_atomically(backend: Backend) {
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
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
    assert!(
        matches!(
            e,
            JobsError::Ledger(LedgerError::IdempotencyConflict { .. })
        ),
        "{e}"
    );
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
    assert!(
        matches!(
            e,
            JobsError::Ledger(LedgerError::InsufficientCredits { .. })
        ),
        "{e}"
    );
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

/// `submit` (one statement in autocommit on PostgreSQL) returns exactly the row it wrote,
/// replays and conflicts like `enqueue`, and takes the locking path when a renewal is due.
async fn submit_writes_what_enqueue_writes_and_locks_when_due(backend: Backend) {
    let h = common::harness(backend).await;
    let acct = h
        .ledger
        .create_account(NewAccount {
            plan: PlanId::Atelier,
            is_admin: false,
            email: None,
            monthly_allowance: None,
        })
        .await
        .expect("create")
        .account
        .id;
    let submit = |key: &'static str, upload: &'static str| {
        let queue = Queue::new(h.ledger.clone());
        async move { jobs::submit(&queue, &new_job(acct, Kit::Caratzon, key, upload)).await }
    };
    let before = available(&h, acct).await;
    let first = submit("s1", "uploads/a.jpg").await.expect("submit");
    assert!(!first.replayed);
    assert_eq!(first.job, get(&h, &first.job.id).await, "returned = stored");
    assert_eq!(first.job.charge(), Charge::Held);
    assert_eq!(available(&h, acct).await, before - 100);
    let queued = tasks(h.ledger.db(), "kits.caratzon").await;
    assert_eq!(queued.len(), 1);
    assert_eq!(
        (&queued[0].0, &queued[0].1.job),
        (&first.job.task_id, &first.job.id)
    );

    let again = submit("s1", "uploads/a.jpg").await.expect("replay");
    assert!(again.replayed);
    assert_eq!(again.job, first.job);
    let e = submit("s1", "uploads/b.jpg").await.expect_err("conflict");
    assert!(
        matches!(
            e,
            JobsError::Ledger(LedgerError::IdempotencyConflict { .. })
        ),
        "{e}"
    );
    assert_eq!(available(&h, acct).await, before - 100);

    // Three months on, the renewal is due: the optimistic path stands aside for the locking one,
    // which renews first (the old cycle's grant has expired).
    h.clock.advance_millis(90 * DAY);
    let late = submit("s2", "uploads/a.jpg")
        .await
        .expect("submit after renewal");
    assert!(!late.replayed);
    assert_eq!(late.job, get(&h, &late.job.id).await);
    let b = h.ledger.balance(acct).await.expect("balance");
    assert_eq!(b.held.get(), 200, "both kits held");
    assert_eq!(b.available.get(), b.granted.get() - b.expired.get() - 200);
    assert_eq!(tasks(h.ledger.db(), "kits.caratzon").await.len(), 2);
    assert_agree(&h).await;
}

/// On PostgreSQL each due task wakes the listening workers exactly once, after its commit, and
/// a delayed retry wakes nobody (polling finds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wakes_listeners_once_per_due_task() {
    let test_db = kiln_jobs::testing::test_db(Backend::Postgres, 16).await;
    let Db::Postgres(pool) = &test_db.db else {
        unreachable!("a PostgreSQL test database")
    };
    let ledger = kiln_ledger::Ledger::new(
        test_db.db.clone(),
        std::sync::Arc::new(kiln_ledger::Pricing::default()),
        std::sync::Arc::new(kiln_ledger::SystemClock),
    );
    let queue = Queue::new(ledger.clone());
    let acct = account(&ledger).await;
    let mut accounts = Vec::new();
    for _ in 0..8 {
        accounts.push(account(&ledger).await);
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .expect("listen");
    listener
        .listen(kiln_jobs::apalis::WAKE_CHANNEL)
        .await
        .expect("listen");
    let next_task = async |l: &mut sqlx::postgres::PgListener| {
        // A bound on a wait for something that must come, so a lost wake-up fails, not hangs.
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), l.recv())
            .await
            .expect("a wake-up within 20 s")
            .expect("notification");
        let v: serde_json::Value = serde_json::from_str(n.payload()).expect("json payload");
        assert_eq!(v["job_type"], "kits.essentials");
        v["id"].as_str().expect("task id").to_owned()
    };
    let submit = async |key: &str| {
        jobs::submit(
            &queue,
            &new_job(acct, Kit::Essentials, key, "uploads/a.jpg"),
        )
        .await
        .expect("submit")
        .job
    };
    let (j1, j2) = (submit("w1").await, submit("w2").await);
    // In commit order; a second wake-up for the first task would come before the second's.
    assert_eq!(next_task(&mut listener).await, j1.task_id);
    assert_eq!(next_task(&mut listener).await, j2.task_id);

    // The first job fails transiently and is handed back for an hour from now.
    let mut tx = ledger.db().begin().await.expect("begin");
    let ctx = ledger.ctx();
    let fence = match jobs::claim(
        &mut tx,
        &ctx,
        &j1.id,
        &j1.task_id,
        &WorkerName::new("w"),
        60_000,
    )
    .await
    .expect("claim")
    {
        Claim::Run { fence, .. } => fence,
        other => panic!("expected to run, got {other:?}"),
    };
    let later = ctx.now.plus_millis(3_600_000);
    assert!(
        jobs::retry_later(
            &mut tx,
            ctx.now,
            &j1.id,
            fence,
            later,
            "storage_unavailable",
            "down"
        )
        .await
        .expect("retry later")
    );
    tx.commit().await.expect("commit");
    let retried = {
        let mut tx = ledger.db().begin_read().await.expect("begin");
        jobs::job(&mut tx, &j1.id)
            .await
            .expect("job")
            .expect("exists")
    };
    assert_ne!(retried.task_id, j1.task_id, "a new task");
    let j3 = submit("w3").await;
    assert_eq!(
        next_task(&mut listener).await,
        j3.task_id,
        "the delayed retry woke nobody"
    );

    // enqueue in a caller's transaction wakes workers when it commits, never on rollback.
    let in_tx = async |key: &str, commit: bool| {
        let mut tx = ledger.db().begin().await.expect("begin");
        let e = jobs::enqueue(
            &mut tx,
            &ledger.ctx(),
            &new_job(acct, Kit::Essentials, key, "uploads/a.jpg"),
        )
        .await
        .expect("enqueue");
        if commit {
            tx.commit().await.expect("commit");
        }
        e.job
    };
    in_tx("w4", false).await;
    let j5 = in_tx("w5", true).await;
    assert_eq!(next_task(&mut listener).await, j5.task_id);

    // Concurrent submits share wake-up rounds, and every task still gets its one wake-up
    // (those queued while a round is out go in the next round, not astray).
    let mut set = tokio::task::JoinSet::new();
    for i in 0..48 {
        let queue = queue.clone();
        let acct = accounts[i % accounts.len()];
        set.spawn(async move {
            let key = format!("burst-{i}");
            jobs::submit(
                &queue,
                &new_job(acct, Kit::Essentials, &key, "uploads/a.jpg"),
            )
            .await
            .expect("submit")
            .job
            .task_id
        });
    }
    let mut submitted = set.join_all().await;
    let mut woken = Vec::new();
    for _ in 0..submitted.len() {
        woken.push(next_task(&mut listener).await);
    }
    submitted.sort();
    woken.sort();
    assert_eq!(woken, submitted);
    // Nothing more: the next wake-up is for the next task.
    let last = submit("after-burst").await;
    assert_eq!(next_task(&mut listener).await, last.task_id);
}

async fn only_the_current_fence_finishes_a_job(backend: Backend) {
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
    let job = enqueue(&h, acct, Kit::Essentials, "k", "u").await.job;
    // The same task delivered to two workers: while the first renews its lease, the second
    // leaves the job alone; once the first goes silent, the next claim supersedes it.
    let stale = fence_of(&claim(&h, &job.id, &job.task_id, "worker-a").await);
    assert_eq!(
        claim(&h, &job.id, &job.task_id, "worker-b").await,
        Claim::Busy
    );
    h.clock.advance_millis(LEASE / 2);
    let renewed = in_tx!(h, |tx, ctx| jobs::renew_lease(
        &mut tx, ctx.now, &job.id, stale
    )
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
    let renewed = in_tx!(h, |tx, ctx| jobs::renew_lease(
        &mut tx, ctx.now, &job.id, stale
    )
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
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
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
    let h = common::harness(backend).await;
    let (acct, other) = (account(&h.ledger).await, account(&h.ledger).await);
    let before = available(&h, acct).await;
    let queued = enqueue(&h, acct, Kit::Essentials, "a", "u").await.job;
    let running = enqueue(&h, acct, Kit::Essentials, "b", "u").await.job;
    fence_of(&claim(&h, &running.id, &running.task_id, "w").await);

    let mut tx = h.ledger.db().begin().await.expect("begin");
    let ctx = h.ledger.ctx();
    let e = jobs::cancel(&mut tx, &ctx, other, &queued.id)
        .await
        .expect_err("not theirs");
    assert!(matches!(e, JobsError::JobNotFound(_)), "{e}");
    let e = jobs::cancel(&mut tx, &ctx, acct, &running.id)
        .await
        .expect_err("running");
    assert!(
        matches!(
            e,
            JobsError::JobNotCancellable {
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
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
    let job = enqueue(&h, acct, Kit::Essentials, "k", "u").await.job;
    let stale = fence_of(&claim(&h, &job.id, &job.task_id, "dead-worker").await);
    // Its task vanishes (pruned, or marked done by a stale attempt) while the job is open.
    delete_task(h.ledger.db(), &job.task_id).await;
    let fresh = jobs::reconcile(h.ledger.db(), &h.ledger.ctx(), 60_000)
        .await
        .expect("reconcile");
    assert_eq!(
        fresh.requeued, 0,
        "a job touched within the window is left alone"
    );
    h.clock.advance_millis(2 * 60_000);
    let r = jobs::reconcile(h.ledger.db(), &h.ledger.ctx(), 60_000)
        .await
        .expect("reconcile");
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
    let r = jobs::reconcile(h.ledger.db(), &h.ledger.ctx(), 60_000)
        .await
        .expect("reconcile");
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
            .bind(job2.id.as_str())
            .execute(p)
            .await
            .map(|_| ()),
        Db::Sqlite(p) => sqlx::query("UPDATE kit_jobs SET status = 'succeeded' WHERE id = $1")
            .bind(job2.id.as_str())
            .execute(p)
            .await
            .map(|_| ()),
    }
    .expect("tamper");
    let mut tx = h.ledger.db().begin_read().await.expect("begin");
    let bad = jobs::check_charges(&mut tx).await.expect("check");
    drop(tx);
    assert_eq!(bad.len(), 1, "{bad:?}");
    let r = jobs::reconcile(h.ledger.db(), &h.ledger.ctx(), 60_000)
        .await
        .expect("reconcile");
    assert_eq!(r.charges_resolved, 1);
    assert_eq!(get(&h, &job2.id).await.charge(), Charge::Committed);
    assert_agree(&h).await;
}

/// A deploy hands back the kits still running when its grace period ends. That is not the
/// kit's failure: the attempt is given back, so a kit on its last attempt runs again after
/// the restart instead of failing as `attempts_exhausted` (issue 12, defect 4).
async fn a_hand_back_gives_the_attempt_back(backend: Backend) {
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
    let job = enqueue(&h, acct, Kit::Essentials, "deploy", "u").await.job;
    let mut task = job.task_id.clone();
    // Four deploys in a row, each during the kit's run: more hand-backs than it has attempts.
    for deploy in 1..=4 {
        fence_of(&claim(&h, &job.id, &task, &format!("old-{deploy}/essentials-0")).await);
        assert_eq!(get(&h, &job.id).await.attempts, 1, "deploy {deploy}");
        let n = in_tx!(h, |tx, ctx| jobs::hand_back(
            &mut tx,
            ctx.now,
            &format!("old-{deploy}/")
        )
        .await
        .expect("hand back"));
        assert_eq!(n, 1);
        let queued = get(&h, &job.id).await;
        assert_eq!(queued.status, JobStatus::Queued);
        assert_eq!(queued.attempts, 0, "the handed-back attempt does not count");
        task = queued.task_id;
    }
    // The kit still has all its attempts: it runs, and succeeds.
    let fence = fence_of(&claim(&h, &job.id, &task, "new/essentials-0").await);
    let done = in_tx!(h, |tx, ctx| jobs::succeed(
        &mut tx,
        &ctx,
        &job.id,
        fence,
        "kits/deploy/manifest.json"
    )
    .await
    .expect("succeed"));
    assert!(done);
    let j = get(&h, &job.id).await;
    assert_eq!(
        (j.status, j.charge()),
        (JobStatus::Succeeded, Charge::Committed)
    );
    assert_agree(&h).await;
}

/// A caller's own charge or reserve key cannot take a kit order's or a hold's key: `kit:promo`
/// used to be accepted, made the audit report "kit reservation has no job", and made a later
/// kit order with key `promo` fail as a conflict (issue 12, defect 3).
async fn caller_keys_stay_out_of_the_kit_and_hold_key_space(backend: Backend) {
    let h = common::harness(backend).await;
    let acct = account(&h.ledger).await;
    let before = available(&h, acct).await;
    for key in ["kit:promo", "hold:promo"] {
        for result in [
            h.ledger.charge(acct, kiln_core::Action::Video, key).await,
            h.ledger.reserve(acct, kiln_core::Action::Video, key).await,
        ] {
            match result {
                Err(e @ LedgerError::ReservedKey(_)) => {
                    assert!(e.to_string().contains(key), "{e}");
                }
                other => panic!("{key}: expected a refused key, got {other:?}"),
            }
        }
    }
    assert_eq!(available(&h, acct).await, before, "nothing was charged");
    assert_agree(&h).await;
    // The kit order with key `promo` is a new order, not a conflict.
    let order = enqueue(&h, acct, Kit::Essentials, "promo", "u").await;
    assert!(!order.replayed);
    // A caller's key that only contains the prefix further in is theirs to use.
    h.ledger
        .charge(acct, kiln_core::Action::Video, "promo-kit:1")
        .await
        .expect("an ordinary key");
    assert_agree(&h).await;
}

/// The reconciler and a worker finishing another job of the same account, at once on
/// PostgreSQL (issue 12, defect 1). The reconciler used to repair everything in one
/// transaction: it resolved job A's held charge (locking A's reservation and the account) and
/// then waited for job B, which the worker had locked and whose commit then waited for the
/// account — a deadlock, and PostgreSQL aborted one side. Each repair now has its own
/// transaction in the job → reservation → account order, so both finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_and_a_finishing_worker_do_not_deadlock() {
    let h = common::harness(Backend::Postgres).await;
    let Db::Postgres(pool) = h.ledger.db().clone() else {
        unreachable!("a PostgreSQL harness")
    };
    let acct = account(&h.ledger).await;
    // Job A ended with its charge still held (the reconciler will commit it) ...
    let a = enqueue(&h, acct, Kit::Essentials, "a", "u").await.job;
    sqlx::query("UPDATE kit_jobs SET status = 'succeeded' WHERE id = $1")
        .bind(a.id.as_str())
        .execute(&pool)
        .await
        .expect("end job A");
    // ... and job B is running, its task gone and untouched for longer than the window (the
    // reconciler will requeue it) while its slow worker is about to finish it.
    let b = enqueue(&h, acct, Kit::Essentials, "b", "u").await.job;
    let fence = fence_of(&claim(&h, &b.id, &b.task_id, "slow-worker").await);
    delete_task(h.ledger.db(), &b.task_id).await;
    h.clock.advance_millis(2 * 60_000);

    // The worker's transaction takes job B first, as `succeed` does.
    let mut worker = h.ledger.db().begin().await.expect("begin");
    let Tx::Postgres(c) = &mut worker else {
        unreachable!()
    };
    sqlx::query("SELECT id FROM kit_jobs WHERE id = $1 FOR UPDATE")
        .bind(b.id.as_str())
        .execute(&mut **c)
        .await
        .expect("lock job B");
    let reconciler = {
        let ledger = h.ledger.clone();
        tokio::spawn(async move { jobs::reconcile(ledger.db(), &ledger.ctx(), 60_000).await })
    };
    // Wait until the reconciler is blocked on job B's lock.
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(waiting)
            .fetch_one(&pool)
            .await
            .expect("pg_stat_activity");
        if n > 0 {
            break;
        }
        assert!(
            !reconciler.is_finished(),
            "the reconciler did not wait for job B"
        );
        assert!(std::time::Instant::now() < deadline, "no lock wait seen");
        tokio::task::yield_now().await;
    }
    // The worker finishes job B: its reservation, then the account.
    let ctx = h.ledger.ctx();
    let won = jobs::succeed(&mut worker, &ctx, &b.id, fence, "kits/b/manifest.json").await;
    let won = won.expect("the worker's commit of job B");
    worker
        .commit()
        .await
        .expect("the worker's transaction commits");
    assert!(won);
    let r = reconciler
        .await
        .expect("reconciler task")
        .expect("the reconciler's pass");
    assert_eq!((r.charges_resolved, r.requeued), (1, 0), "{r:?}");
    assert_eq!(get(&h, &a.id).await.charge(), Charge::Committed);
    let jb = get(&h, &b.id).await;
    assert_eq!(
        (jb.status, jb.charge()),
        (JobStatus::Succeeded, Charge::Committed)
    );
    assert_agree(&h).await;
}
