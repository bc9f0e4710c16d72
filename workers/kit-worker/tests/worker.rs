//! The kit worker against real databases (PostgreSQL and SQLite, one suite) and a real local
//! store: kits run end to end through apalis and finish exactly once; a permanent failure
//! releases at once; duplicate deliveries commit once; shutdown lets a running kit finish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_assets::Generator;
use kiln_core::Kit;
use kiln_jobs::testing::{TestDb, test_db};
use kiln_jobs::{self as jobs, Charge, JobId, JobStatus, KitJob, Queue, WorkerName};
use kiln_ledger::backends;
use kiln_ledger::{AccountId, Backend, Ledger, NewAccount, PlanId, Pricing, SystemClock};
use kiln_producer::{Order, intake};
use kiln_storage::{LocalStore, ObjectKey, Storage};
use kit_worker::{Deps, Outcome, WorkerConfig};

backends!(
    kits_run_end_to_end_and_commit_once,
    a_permanent_failure_releases_at_once,
    duplicate_deliveries_commit_once,
    shutdown_lets_a_running_kit_finish,
    a_bad_idempotency_key_is_refused_before_anything_is_stored,
    a_stale_attempt_cannot_change_the_kit_that_won,
    a_hung_attempt_is_abandoned_at_its_deadline_and_its_credits_released,
);

struct Rig {
    _db: TestDb,
    dir: std::path::PathBuf,
    deps: Deps,
    queue: Queue,
    account: AccountId,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn rig(backend: Backend) -> Rig {
    let db = test_db(backend, 10).await;
    let ledger = Ledger::new(
        db.db.clone(),
        Arc::new(Pricing::default()),
        Arc::new(SystemClock),
    );
    let dir = std::env::temp_dir().join(format!("kiln-worker-test-{}", ulid::Ulid::generate()));
    let storage = Storage::Local(
        LocalStore::new(&dir, b"0123456789abcdef0123".to_vec(), "http://127.0.0.1:0")
            .expect("local store"),
    );
    let account = ledger
        .create_account(NewAccount {
            plan: PlanId::Discover,
            is_admin: false,
            email: None,
            monthly_allowance: None,
        })
        .await
        .expect("account")
        .account
        .id;
    Rig {
        _db: db,
        dir,
        queue: Queue::new(ledger.clone()),
        deps: Deps {
            ledger,
            storage,
            generator: Generator::Studio,
            retry: kit_worker::Retry {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
            lease: Duration::from_secs(10),
            deadlines: kit_worker::Deadlines::default(),
            metrics: Default::default(),
            faults: kit_worker::Faults::default(),
        },
        account,
    }
}

fn design() -> Bytes {
    Bytes::from(kiln_assets::encode_jpeg(&kiln_assets::sample::ring(900), 90).expect("jpeg"))
}

/// An order through the producer, as the API and CLI send it.
async fn submit(
    rig: &Rig,
    kit: Kit,
    design: Bytes,
    key: &str,
    max_attempts: u32,
) -> Result<kiln_producer::Accepted, kiln_producer::IntakeError> {
    intake(
        &rig.queue,
        &rig.deps.storage,
        Order {
            account: rig.account,
            kit,
            design,
            spec_json: kiln_assets::sample::SPEC_JSON.as_bytes(),
            idempotency_key: key,
            max_attempts,
        },
    )
    .await
}

async fn order(rig: &Rig, kit: Kit, design: Bytes, key: &str) -> KitJob {
    submit(rig, kit, design, key, kiln_producer::MAX_ATTEMPTS)
        .await
        .expect("intake")
        .job
}

async fn job(rig: &Rig, id: &JobId) -> KitJob {
    let mut tx = rig.deps.ledger.db().begin_read().await.expect("begin");
    jobs::job(&mut tx, id).await.expect("read").expect("exists")
}

/// Polls the job (it lives in another task's hands) until `done` holds; 60 s at most.
async fn wait_until(rig: &Rig, id: &JobId, done: impl Fn(&KitJob) -> bool) -> KitJob {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(rig, id).await;
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} stuck: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start_worker(
    rig: &Rig,
    concurrency: usize,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), kit_worker::WorkerError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = WorkerConfig::new(vec![Kit::Essentials, Kit::Caratzon], concurrency);
    cfg.poll = Duration::from_millis(20);
    let handle = tokio::spawn(kit_worker::run(rig.deps.clone(), cfg, async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

async fn assert_clean(rig: &Rig) {
    let mut tx = rig.deps.ledger.db().begin_read().await.expect("begin");
    let breaches = jobs::audit(&mut tx, None).await.expect("audit");
    assert!(breaches.is_empty(), "audit: {breaches:#?}");
}

/// The manifest lists every asset, each stored with the bytes its sha256 names.
async fn assert_complete(rig: &Rig, j: &KitJob) {
    let key = ObjectKey::parse(j.manifest_key.as_deref().expect("manifest key")).expect("key");
    let manifest: serde_json::Value =
        serde_json::from_slice(&rig.deps.storage.get(&key).await.expect("manifest")).expect("json");
    let assets = manifest["assets"].as_array().expect("assets");
    assert!(assets.len() >= 9, "{} assets", assets.len());
    for a in assets {
        let k = ObjectKey::parse(a["key"].as_str().expect("key")).expect("asset key");
        let bytes = rig.deps.storage.get(&k).await.expect("asset stored");
        assert_eq!(
            kiln_assets::sha256_hex(&bytes),
            a["sha256"].as_str().expect("sha")
        );
    }
}

async fn kits_run_end_to_end_and_commit_once(backend: Backend) {
    let rig = rig(backend).await;
    let before = rig.deps.ledger.balance(rig.account).await.expect("balance");
    let (stop, worker) = start_worker(&rig, 2);
    let e = order(&rig, Kit::Essentials, design(), "e1").await;
    let c = order(&rig, Kit::Caratzon, design(), "c1").await;
    for id in [&e.id, &c.id] {
        let j = wait_until(&rig, id, |j| j.status.is_terminal()).await;
        assert_eq!(
            (j.status, j.charge(), j.attempts),
            (JobStatus::Succeeded, Charge::Committed, 1),
            "{j:?}"
        );
        assert_eq!(j.progress.done, j.progress.total);
        assert_complete(&rig, &j).await;
    }
    let _ = stop.send(());
    worker.await.expect("join").expect("worker stops cleanly");
    let after = rig.deps.ledger.balance(rig.account).await.expect("balance");
    assert_eq!(after.committed.get() - before.committed.get(), 110);
    assert_eq!(after.held.get(), 0);
    assert_clean(&rig).await;
}

async fn a_permanent_failure_releases_at_once(backend: Backend) {
    let rig = rig(backend).await;
    let before = rig.deps.ledger.balance(rig.account).await.expect("balance");
    let (stop, worker) = start_worker(&rig, 1);
    // A blank frame: a valid image with no product in it.
    let blank = image::RgbImage::from_pixel(800, 800, image::Rgb([240, 240, 240]));
    let blank = Bytes::from(kiln_assets::encode_jpeg(&blank, 90).expect("jpeg"));
    let j = order(&rig, Kit::Essentials, blank, "blank").await;
    let j = wait_until(&rig, &j.id, |j| j.status.is_terminal()).await;
    assert_eq!(
        (j.status, j.charge(), j.attempts),
        (JobStatus::Failed, Charge::Released, 1)
    );
    assert_eq!(j.error.map(|e| e.code), Some("no_product_found".into()));
    let _ = stop.send(());
    worker.await.expect("join").expect("worker stops cleanly");
    let after = rig.deps.ledger.balance(rig.account).await.expect("balance");
    assert_eq!(after.available, before.available);
    assert_clean(&rig).await;
}

async fn duplicate_deliveries_commit_once(backend: Backend) {
    let rig = rig(backend).await;
    let j = order(&rig, Kit::Essentials, design(), "dup").await;
    // The same task delivered to two workers at once (no apalis worker running here).
    let (wa, wb) = (WorkerName::new("worker-a"), WorkerName::new("worker-b"));
    let (a, b) = tokio::join!(
        kit_worker::job::run(&rig.deps, &j.id, &j.task_id, &wa),
        kit_worker::job::run(&rig.deps, &j.id, &j.task_id, &wb),
    );
    let outcomes = [a.expect("run a"), b.expect("run b")];
    let wins = outcomes
        .iter()
        .filter(|o| **o == Outcome::Succeeded)
        .count();
    assert_eq!(wins, 1, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Skipped), "{outcomes:?}");
    let done = job(&rig, &j.id).await;
    assert_eq!(
        (done.status, done.charge()),
        (JobStatus::Succeeded, Charge::Committed)
    );
    assert_complete(&rig, &done).await;
    // A third, late delivery changes nothing.
    let late = kit_worker::job::run(&rig.deps, &j.id, &j.task_id, &WorkerName::new("worker-c"))
        .await
        .expect("run");
    assert_eq!(late, Outcome::Skipped);
    let b = rig.deps.ledger.balance(rig.account).await.expect("balance");
    assert_eq!((b.committed.get(), b.held.get()), (10, 0));
    assert_clean(&rig).await;
}

async fn shutdown_lets_a_running_kit_finish(backend: Backend) {
    let rig = rig(backend).await;
    let (stop, worker) = start_worker(&rig, 1);
    let j = order(&rig, Kit::Caratzon, design(), "shutdown").await;
    wait_until(&rig, &j.id, |j| j.status == JobStatus::Running).await;
    let _ = stop.send(());
    worker.await.expect("join").expect("worker stops cleanly");
    let done = job(&rig, &j.id).await;
    assert_eq!(
        (done.status, done.charge()),
        (JobStatus::Succeeded, Charge::Committed),
        "{done:?}"
    );
    assert_clean(&rig).await;
}

async fn a_bad_idempotency_key_is_refused_before_anything_is_stored(backend: Backend) {
    let rig = rig(backend).await;
    // 197 characters: within 200, but not once the reservation's `kit:` prefix is added.
    for key in [String::new(), "k".repeat(197), "tab\tkey".to_owned()] {
        let e = submit(
            &rig,
            Kit::Essentials,
            design(),
            &key,
            kiln_producer::MAX_ATTEMPTS,
        )
        .await
        .expect_err("bad key");
        assert_eq!(e.code(), "invalid_idempotency_key", "{key:?}: {e}");
    }
    assert!(
        !rig.dir.join("uploads").exists(),
        "nothing may be stored for a refused order"
    );
    let b = rig.deps.ledger.balance(rig.account).await.expect("balance");
    assert_eq!(b.held.get(), 0);
    // 196 characters is accepted.
    order(&rig, Kit::Essentials, design(), &"k".repeat(196)).await;
}

/// An attempt that lost the job while it was still writing (its lease ran out, a newer attempt
/// took over and won) writes what it has left after its last ownership check. Those writes
/// never touch a file the winner's manifest names: every attempt writes under its own fence
/// (issue 12, defect 6; with the AI generator a stale attempt's bytes differ, and the
/// manifest's sha256 stopped matching the stored file).
async fn a_stale_attempt_cannot_change_the_kit_that_won(backend: Backend) {
    let rig = rig(backend).await;
    let (stop, worker) = start_worker(&rig, 1);
    let e = order(&rig, Kit::Essentials, design(), "stale").await;
    let won = wait_until(&rig, &e.id, |j| j.status.is_terminal()).await;
    let _ = stop.send(());
    worker.await.expect("join").expect("worker stops cleanly");
    assert_eq!(won.status, JobStatus::Succeeded, "{won:?}");
    assert_complete(&rig, &won).await;
    // The attempt before the winner (an older fence), past its checks, writes its own bytes
    // for every file of the kit, manifest last.
    let stale = kiln_jobs::Fence(won.fence.0 - 1);
    let key = ObjectKey::parse(won.manifest_key.as_deref().expect("manifest key")).expect("key");
    let manifest: serde_json::Value =
        serde_json::from_slice(&rig.deps.storage.get(&key).await.expect("manifest")).expect("json");
    let prefix = format!("kits/{}/", won.id.as_str().to_lowercase());
    let mut paths: Vec<String> = manifest["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| {
            let k = a["key"]
                .as_str()
                .expect("key")
                .strip_prefix(&prefix)
                .expect("in the kit");
            // Past the attempt's own directory, if any.
            k.split_once('/')
                .filter(|(dir, _)| dir.starts_with("fence-"))
                .map_or(k, |(_, rest)| rest)
                .to_owned()
        })
        .collect();
    paths.push("manifest.json".into());
    for path in &paths {
        let k = kit_worker::job::kit_key(&won.id, stale, path).expect("key");
        rig.deps
            .storage
            .put(
                &k,
                bytes::Bytes::from_static(b"another attempt's bytes"),
                "application/octet-stream",
            )
            .await
            .expect("stale write");
    }
    // The job still names the winner's manifest, and every file it lists is the winner's.
    let after = job(&rig, &e.id).await;
    assert_eq!(after.manifest_key, won.manifest_key);
    assert_complete(&rig, &after).await;
}

/// An attempt stuck in a call that never answers (here the AI provider: a server that accepts
/// the connection and says nothing, well inside the provider's own 120 s timeout) is abandoned
/// at its kit's deadline and retried; with no attempts left the kit fails and its credits are
/// released. Before, its lease was renewed for as long as the call hung, and its credits stayed
/// held (issue 12, defect 5).
async fn a_hung_attempt_is_abandoned_at_its_deadline_and_its_credits_released(backend: Backend) {
    let mut rig = rig(backend).await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = silent.local_addr().expect("addr");
    // Accepts every connection and keeps it open without a word.
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in silent.incoming().take(8) {
            open.push(stream);
        }
        open.len()
    });
    rig.deps.generator = Generator::Ai(
        kiln_assets::provider::Provider::new(kiln_assets::provider::ProviderConfig {
            base_url: format!("http://{addr}"),
            api_key: "test-key".into(),
            image_model: "gpt-image-1".into(),
            text_model: "gpt-4o-mini".into(),
            timeout: Duration::from_secs(120),
        })
        .expect("provider"),
    );
    rig.deps.deadlines = kit_worker::Deadlines {
        essentials: Duration::from_millis(800),
        caratzon: Duration::from_millis(800),
    };
    let before = rig.deps.ledger.balance(rig.account).await.expect("balance");
    let (stop, worker) = start_worker(&rig, 1);
    let e = submit(&rig, Kit::Essentials, design(), "hung", 2)
        .await
        .expect("intake")
        .job;
    let j = wait_until(&rig, &e.id, |j| j.status.is_terminal()).await;
    let _ = stop.send(());
    worker.await.expect("join").expect("worker stops cleanly");
    assert_eq!(
        (j.status, j.charge(), j.attempts),
        (JobStatus::Failed, Charge::Released, 2),
        "{j:?}"
    );
    assert_eq!(
        j.error.as_ref().map(|e| e.code.as_str()),
        Some("deadline_exceeded"),
        "{j:?}"
    );
    let after = rig.deps.ledger.balance(rig.account).await.expect("balance");
    assert_eq!(after.available, before.available, "the credits came back");
    assert_clean(&rig).await;
    drop(held);
}
