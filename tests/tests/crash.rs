//! Crash test across processes on PostgreSQL: `kiln work` processes are SIGKILLed in the middle
//! of kits, many times, at random moments (seeded: KILN_CRASH_SEED replays a run), and restarted.
//! Every job must still end succeeded exactly once — one commit per job in the journal — with a
//! complete manifest, and `kiln audit` must be clean.

use std::process::Child;
use std::time::{Duration, Instant};

use kiln_e2e::{
    PgDb, Scratch, commits_per_job, count, kiln_cmd, ok, open_jobs, psql_on as psql, start_worker,
};

fn seed() -> u64 {
    std::env::var("KILN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

#[test]
fn workers_killed_mid_kit_still_finish_every_job_exactly_once() {
    let seed = seed();
    println!("crash test seed {seed} (replay with KILN_CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    let log = dir.0.join("workers.log");

    kiln_e2e::migrate(&pg.url, &storage);
    let created = ok(&kiln_cmd(&pg.url, &storage)
        .args(["accounts", "create", "--plan", "discover", "--json"])
        .output()
        .expect("create account"));
    let account: serde_json::Value = serde_json::from_str(&created).expect("account JSON");
    let account = account["id"].as_str().expect("account id").to_owned();
    // Enough credits for every kit: a top-up on top of the welcome credits.
    ok(&kiln_cmd(&pg.url, &storage)
        .args([
            "topup",
            &account,
            "--pack",
            "medium",
            "--payment-ref",
            "crash-1",
        ])
        .output()
        .expect("topup"));

    // A design and spec on disk, as a customer would have them.
    let (design, spec) = kiln_e2e::sample_order_files(&dir.0, 1000, 90);

    let mut workers: Vec<Child> = (0..2)
        .map(|_| start_worker(&pg.url, &storage, &log))
        .collect();
    let mut jobs = Vec::new();
    for i in 0..24 {
        let kit = if i % 4 == 3 { "caratzon" } else { "essentials" };
        let id = ok(&kiln_cmd(&pg.url, &storage)
            .args([
                "kits",
                "create",
                "--account",
                &account,
                "--design",
                design.to_str().expect("path"),
                "--spec",
                spec.to_str().expect("path"),
                "--kit",
                kit,
                "--idempotency-key",
                &format!("crash-{i}"),
            ])
            .output()
            .expect("kits create"));
        jobs.push(id.trim().to_owned());
    }

    // Kill a random worker whenever a kit is mid-flight, then start a new one in its place.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    while kills < 10 && Instant::now() < deadline {
        let running = count(&pg.url, "status = 'running' AND steps_done > 0");
        if running == 0 {
            let open = open_jobs(&pg.url);
            if open == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..150)));
        let victim = rng.usize(..workers.len());
        workers[victim].kill().expect("SIGKILL");
        let _ = workers[victim].wait();
        workers[victim] = start_worker(&pg.url, &storage, &log);
        kills += 1;
    }
    println!("{kills} workers killed mid-kit");
    assert!(kills >= 5, "only {kills} kills landed mid-kit");

    // Everything ends.
    loop {
        let open = open_jobs(&pg.url);
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} jobs still open; worker log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in &mut workers {
        w.kill().expect("stop worker");
        let _ = w.wait();
    }

    let statuses = psql(
        &pg.url,
        "SELECT id || ' ' || status || ' ' || attempts || ' ' || kit || ' ' || COALESCE(error_code || ': ' || error_message, '') \
         FROM kit_jobs ORDER BY id",
    );
    println!("{statuses}");
    let mut retried = 0;
    for line in statuses.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts[1], "succeeded", "job {line}");
        if parts[2].parse::<u32>().expect("attempts") > 1 {
            retried += 1;
        }
    }
    assert_eq!(statuses.lines().count(), jobs.len());
    assert!(retried >= 1, "no kit was interrupted: the kills missed");
    println!("{retried} of {} jobs ran more than once", jobs.len());
    // Exactly one commit per job, in the append-only journal.
    let commits = commits_per_job(&pg.url);
    for id in &jobs {
        assert_eq!(
            commits.get(id),
            Some(&1),
            "job {id}: commits {:?}",
            commits.get(id)
        );
    }
    // Each manifest lists every asset, stored with the bytes its sha256 names.
    for id in &jobs {
        let status: serde_json::Value = serde_json::from_str(&ok(&kiln_cmd(&pg.url, &storage)
            .args(["kits", "status", id, "--json"])
            .output()
            .expect("status")))
        .expect("job JSON");
        assert_eq!(status["charge"], "committed");
        let key = psql(
            &pg.url,
            &format!("SELECT manifest_key FROM kit_jobs WHERE id = '{id}'"),
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(storage.join(&key)).expect("manifest"))
                .expect("manifest JSON");
        for a in manifest["assets"].as_array().expect("assets") {
            let bytes =
                std::fs::read(storage.join(a["key"].as_str().expect("key"))).expect("asset");
            assert_eq!(
                kiln_assets::sha256_hex(&bytes),
                a["sha256"].as_str().expect("sha256")
            );
        }
    }
    let audit = kiln_cmd(&pg.url, &storage)
        .args(["audit", "--storage"])
        .output()
        .expect("audit");
    assert!(ok(&audit).contains("clean"));
}
