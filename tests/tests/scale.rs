//! Scale on PostgreSQL: 3 `kiln work` processes x concurrency 4 run 300 jobs, each succeeding
//! exactly once; with the Caratzon queue saturated (twice as many Caratzon kits as slots, queued
//! first), Essentials kits keep finishing.

use std::process::Child;
use std::time::{Duration, Instant};

use kiln_e2e::{PgDb, Scratch, commits_per_job, count, kiln_cmd, ok, open_jobs, psql_on};

const WORKERS: usize = 3;
const CONCURRENCY: usize = 4;
const CARATZON: usize = 2 * WORKERS * CONCURRENCY;
const JOBS: usize = 300;

#[test]
fn three_workers_run_300_jobs_once_each_and_essentials_flow_past_a_full_caratzon_queue() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    kiln_e2e::migrate(&pg.url, &storage);
    let created = ok(&kiln_cmd(&pg.url, &storage)
        .args([
            "accounts",
            "create",
            "--plan",
            "enterprise",
            "--allowance",
            "100000",
            "--json",
        ])
        .output()
        .expect("create account"));
    let account: serde_json::Value = serde_json::from_str(&created).expect("account JSON");
    let account = account["id"].as_str().expect("id").to_owned();
    let (design, spec) = kiln_e2e::sample_order_files(&dir.0, 800, 88);

    // Caratzon first, so its queue is full before any Essentials kit is ordered.
    let mut jobs: Vec<(String, &str)> = Vec::new();
    for i in 0..JOBS {
        let kit = if i < CARATZON {
            "caratzon"
        } else {
            "essentials"
        };
        let id = ok(&kiln_cmd(&pg.url, &storage)
            .args(["kits", "create", "--account", &account, "--kit", kit])
            .args(["--idempotency-key", &format!("scale-{i}"), "--design"])
            .arg(&design)
            .arg("--spec")
            .arg(&spec)
            .output()
            .expect("kits create"));
        jobs.push((id.trim().to_owned(), kit));
    }

    let log = dir.0.join("workers.log");
    let concurrency = CONCURRENCY.to_string();
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|_| {
            kiln_e2e::start_worker_with(&pg.url, &storage, &log, &["--concurrency", &concurrency])
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(900);
    let mut flowed = false;
    while open_jobs(&pg.url) > 0 {
        // Essentials kits finishing while Caratzon kits are still waiting for a slot.
        if !flowed
            && count(&pg.url, "kit = 'essentials' AND status = 'succeeded'") >= 20
            && count(&pg.url, "kit = 'caratzon' AND status = 'queued'") > 0
        {
            flowed = true;
        }
        assert!(
            Instant::now() < deadline,
            "{} jobs still open; worker log:\n{}",
            open_jobs(&pg.url),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(
        flowed,
        "Essentials kits did not finish while the Caratzon queue was saturated"
    );

    assert_eq!(count(&pg.url, "status = 'succeeded'") as usize, JOBS);
    let commits = commits_per_job(&pg.url);
    for (id, kit) in &jobs {
        assert_eq!(commits.get(id), Some(&1), "{kit} job {id}");
    }
    // Work was spread over the three processes.
    // Names are kiln-<host>-<pid>-<random>-<queue>: count the pids.
    let workers_used = psql_on(
        &pg.url,
        "SELECT COUNT(DISTINCT substring(worker from '-([0-9]+)-[0-9a-f]{8}-')) FROM kit_jobs",
    );
    println!("jobs ran on {workers_used} worker processes");
    assert_eq!(workers_used, WORKERS.to_string());
    let audit = kiln_cmd(&pg.url, &storage)
        .arg("audit")
        .output()
        .expect("audit");
    assert!(ok(&audit).contains("clean"));
}
