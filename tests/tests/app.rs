//! The application in-process, started exactly as `kiln work` starts it (`App::build` from
//! settings, then `App::work`): a kit ordered through the producer runs end to end on the
//! embedded default (SQLite + a local directory) and on PostgreSQL, charged once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln::settings::Settings;
use kiln::{App, Migrate, WorkOptions};
use kiln_core::{Kit, PlanId};
use kiln_jobs::{Charge, JobStatus};
use kiln_ledger::NewAccount;
use kiln_producer::{Order, intake};
use kiln_storage::ObjectKey;

async fn a_kit_runs_end_to_end(database_url: &str) {
    kiln_e2e::init_test_log();
    let dir = kiln_e2e::Scratch::new();
    let storage = dir.0.join("objects");
    let storage = storage.to_str().expect("utf-8 path");
    let settings = Settings::load_from(
        None,
        &[
            ("KILN_DATABASE_URL", database_url),
            ("KILN_STORAGE", storage),
            ("KILN_HEARTBEAT_MS", "300"),
            ("KILN_MISSED_HEARTBEATS", "10"),
            ("KILN_MAINTENANCE_MS", "500"),
        ],
    )
    .expect("settings");
    let app = App::build(settings, Migrate::Yes).await.expect("build");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let app = app.clone();
        let opts = WorkOptions {
            queues: vec![Kit::Essentials, Kit::Caratzon],
            concurrency: 1,
            grace: Duration::from_secs(30),
        };
        tokio::spawn(async move {
            app.work(opts, async move {
                let _ = stopped.await;
            })
            .await
        })
    };

    let account = app
        .ledger()
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
    let design = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(900), 90).expect("jpeg");
    let accepted = intake(
        app.queue(),
        app.storage(),
        Order {
            account,
            kit: Kit::Essentials,
            design: Bytes::from(design),
            spec_json: kiln_assets::sample::SPEC_JSON.as_bytes(),
            idempotency_key: "in-process",
            max_attempts: app.settings.jobs.max_attempts,
        },
    )
    .await
    .expect("intake");

    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let mut tx = app.ledger().db().begin_read().await.expect("begin");
        let j = kiln_jobs::job(&mut tx, &accepted.job.id)
            .await
            .expect("read")
            .expect("job");
        drop(tx);
        if j.status.is_terminal() {
            break j;
        }
        assert!(Instant::now() < deadline, "kit stuck: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (job.status, job.charge()),
        (JobStatus::Succeeded, Charge::Committed),
        "{job:?}"
    );
    let manifest = job.manifest_key.as_deref().expect("manifest key");
    let manifest: serde_json::Value = serde_json::from_slice(
        &app.storage()
            .get(&ObjectKey::parse(manifest).expect("key"))
            .await
            .expect("manifest stored"),
    )
    .expect("manifest JSON");
    assert!(
        manifest["assets"].as_array().is_some_and(|a| !a.is_empty()),
        "{manifest}"
    );
    let b = app.ledger().balance(account).await.expect("balance");
    assert_eq!((b.committed.get(), b.held.get()), (10, 0));

    let _ = stop.send(());
    worker
        .await
        .expect("join")
        .expect("the worker stops cleanly");
    let mut tx = app.ledger().db().begin_read().await.expect("begin");
    let breaches = kiln_jobs::audit(&mut tx, None).await.expect("audit");
    assert!(breaches.is_empty(), "{breaches:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_on_the_embedded_default() {
    let dir = kiln_e2e::Scratch::new();
    a_kit_runs_end_to_end(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_on_postgres() {
    let pg = kiln_e2e::PgDb::new();
    a_kit_runs_end_to_end(&pg.url).await;
}
