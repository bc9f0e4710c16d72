//! `make chaos` (ignored by `make test`: it runs for minutes): three `kiln work` processes on
//! PostgreSQL and a real S3-protocol server, on loopback only, make ~1,000 kits for 20 accounts
//! with mixed balances while top-ups race the orders, and meanwhile random workers are SIGKILLed
//! (and replaced, as a supervisor would), PostgreSQL restarts once, the S3 server is down for a
//! while, and a share of generations fail on purpose (`KILN_FAULT_GENERATOR_FAILURES`). It stops
//! by itself. At the end: `kiln audit --storage` clean, no kit lost, none charged twice, no
//! success without its commit, no failure without its release, and every account's charges are
//! exactly its succeeded kits. It reports the time from each SIGKILL to the rescue of the kits
//! that worker was running (p50, p99) and the attempts per kit.
//!
//! `CHAOS_SEED` replays a run's choices; `CHAOS_KITS` (1000) and `CHAOS_FAULTS` (0.05) size it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_e2e::{
    PgDb, S3_ACCESS_KEY, S3_SECRET_KEY, S3Server, Scratch, env_or, kiln_cmd, ok, open_jobs,
    percentile, psql_on,
};

const ACCOUNTS: usize = 20;
const WORKERS: usize = 3;
/// The whole run's bound: past it the run fails, whatever is left.
const RUN_BOUND: Duration = Duration::from_secs(45 * 60);

/// Everything a `kiln` command of this run needs: the database, the bucket, the fast timings of
/// the tests, and the faults.
#[derive(Clone)]
struct Rig {
    db: String,
    endpoint: String,
    faults: String,
    dir: PathBuf,
}

impl Rig {
    fn cmd(&self) -> Command {
        let mut c = kiln_cmd(&self.db, Path::new("s3://kiln-test"));
        c.env("KILN_S3_ENDPOINT", &self.endpoint)
            .env("KILN_S3_REGION", "us-east-1")
            .env("KILN_S3_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("KILN_S3_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env("KILN_FAULT_GENERATOR_FAILURES", &self.faults)
            .env("KILN_AUDIT_EVERY_SECS", "0");
        c
    }

    fn worker(&self, n: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("worker-{n}.log")))
            .expect("worker log");
        self.cmd()
            .args(["work", "--concurrency", "2", "--grace-secs", "5"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kiln work")
    }
}

/// One SIGKILL: when, and the kits its worker was running then (id, attempts).
struct Kill {
    at: Instant,
    running: Vec<(String, i64)>,
}

fn pg_version() -> Option<String> {
    std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
}

#[test]
#[ignore = "minutes long: run by `make chaos`"]
fn chaos() {
    let seed: u64 = env_or("CHAOS_SEED", fastrand::u64(..));
    let kits: usize = env_or("CHAOS_KITS", 1000);
    let faults: f64 = env_or("CHAOS_FAULTS", 0.05);
    println!(
        "chaos seed {seed} (replay with CHAOS_SEED={seed}), {kits} kits, {faults} generator failures"
    );
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let pg = PgDb::new();
    let dir = Scratch::new();
    let s3 = Arc::new(Mutex::new(S3Server::start()));
    let endpoint = s3.lock().expect("s3").endpoint.clone();
    let rig = Rig {
        db: pg.url.clone(),
        endpoint,
        faults: faults.to_string(),
        dir: dir.0.clone(),
    };
    ok(&rig.cmd().arg("migrate").output().expect("migrate"));

    // 20 accounts: every one has its 200 welcome credits; a third get a top-up pack now.
    let mut accounts = Vec::new();
    for i in 0..ACCOUNTS {
        let out = ok(&rig
            .cmd()
            .args(["--json", "accounts", "create", "--plan", "discover"])
            .output()
            .expect("create account"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("account");
        let id = v["id"].as_str().expect("id").to_owned();
        if i % 3 == 0 {
            let pack = ["small", "medium", "large"][rng.usize(..3)];
            ok(&rig
                .cmd()
                .args([
                    "topup",
                    &id,
                    "--pack",
                    pack,
                    "--payment-ref",
                    &format!("start-{i}"),
                ])
                .output()
                .expect("topup"));
        }
        accounts.push(id);
    }
    let (design, spec) = kiln_e2e::sample_order_files(&dir.0, 900, 90);

    let workers: Arc<Mutex<Vec<Child>>> =
        Arc::new(Mutex::new((0..WORKERS).map(|n| rig.worker(n)).collect()));
    let spawned = Arc::new(AtomicUsize::new(WORKERS));

    // The orders: fixed up front from the seed (account, kit, key); 5% repeat an earlier key.
    let mut orders: Vec<(String, &'static str, String)> = Vec::new();
    for i in 0..kits {
        if i > 10 && rng.f64() < 0.05 {
            let again = orders[rng.usize(..orders.len())].clone();
            orders.push(again);
            continue;
        }
        let account = accounts[rng.usize(..ACCOUNTS)].clone();
        let kit = if rng.f64() < 0.1 {
            "caratzon"
        } else {
            "essentials"
        };
        orders.push((account, kit, format!("chaos-{i}")));
    }
    let orders = Arc::new(orders);
    let next = Arc::new(AtomicUsize::new(0));
    // Per order key: the job id every acceptance returned (all must be one), or refused.
    let accepted: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let submit_errors = Arc::new(AtomicUsize::new(0));
    let submitters: Vec<_> = (0..4)
        .map(|_| {
            let (rig, orders, next, accepted, refused, errors) = (
                rig.clone(),
                orders.clone(),
                next.clone(),
                accepted.clone(),
                refused.clone(),
                submit_errors.clone(),
            );
            let (design, spec) = (design.clone(), spec.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((account, kit, key)) = orders.get(i) else {
                        return;
                    };
                    // An outage refuses the order: the customer tries again with the same key.
                    for _ in 0..120 {
                        let out = rig
                            .cmd()
                            .args(["kits", "create", "--account", account, "--kit", kit])
                            .args(["--idempotency-key", key, "--design"])
                            .arg(&design)
                            .arg("--spec")
                            .arg(&spec)
                            .output()
                            .expect("kits create");
                        if out.status.success() {
                            let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                            accepted
                                .lock()
                                .expect("accepted")
                                .entry(key.clone())
                                .or_default()
                                .push(id);
                            break;
                        }
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        if stderr.contains("insufficient") {
                            refused.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        errors.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            })
        })
        .collect();

    // Top-ups racing the orders.
    let submitting = Arc::new(AtomicBool::new(true));
    let topups = {
        let (rig, accounts, submitting) = (rig.clone(), accounts.clone(), submitting.clone());
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x7075);
        std::thread::spawn(move || {
            let mut n = 0;
            while submitting.load(Ordering::SeqCst) {
                let account = &accounts[rng.usize(..accounts.len())];
                let out = rig
                    .cmd()
                    .args(["topup", account, "--pack", "small"])
                    .args(["--payment-ref", &format!("race-{n}")])
                    .output()
                    .expect("topup");
                n += u32::from(out.status.success());
                std::thread::sleep(Duration::from_millis(300 + rng.u64(..700)));
            }
            n
        })
    };

    // The faults, until every order is in and every kit has ended.
    let mut kills: Vec<Kill> = Vec::new();
    let mut pg_restarted = false;
    let mut s3_down: Option<Instant> = None;
    let mut s3_outage = Duration::ZERO;
    let mut next_kill = Instant::now() + Duration::from_secs(2 + rng.u64(..5));
    let mut restarts_after_exit = 0;
    let pg_at = kits / 4;
    let s3_at = kits / 2;
    let deadline = started + RUN_BOUND;
    let mut submitters = Some(submitters);
    loop {
        assert!(
            Instant::now() < deadline,
            "chaos did not finish within {RUN_BOUND:?}"
        );
        let done_orders = next.load(Ordering::SeqCst) >= orders.len();
        if done_orders && let Some(s) = submitters.take() {
            for t in s {
                t.join().expect("submitter");
            }
            submitting.store(false, Ordering::SeqCst);
        }
        // A supervisor: a worker that exited (the database went away under it) is replaced.
        for w in workers.lock().expect("workers").iter_mut() {
            if let Ok(Some(_)) = w.try_wait() {
                *w = rig.worker(spawned.fetch_add(1, Ordering::SeqCst));
                restarts_after_exit += 1;
            }
        }
        let submitted = next.load(Ordering::SeqCst);
        if !pg_restarted && submitted >= pg_at {
            if let Some(v) = pg_version() {
                let out = Command::new("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &v, "main", "restart"])
                    .output()
                    .expect("pg_ctlcluster");
                assert!(out.status.success(), "PostgreSQL restart: {out:?}");
                println!("PostgreSQL {v} restarted at {:.0?}", started.elapsed());
            } else {
                println!("no pg_ctlcluster cluster found: PostgreSQL not restarted");
            }
            pg_restarted = true;
        }
        if s3_down.is_none() && s3_outage.is_zero() && submitted >= s3_at {
            s3.lock().expect("s3").stop();
            s3_down = Some(Instant::now());
            println!("S3 stopped at {:.0?}", started.elapsed());
        }
        if let Some(t) = s3_down
            && t.elapsed() >= Duration::from_secs(15)
        {
            s3.lock().expect("s3").start_again();
            s3_outage = t.elapsed();
            s3_down = None;
            println!("S3 back after {s3_outage:.1?}");
        }
        if Instant::now() >= next_kill {
            let mut ws = workers.lock().expect("workers");
            let i = rng.usize(..ws.len());
            let pid = ws[i].id();
            let running: Vec<(String, i64)> = psql_on(
                &rig.db,
                &format!(
                    "SELECT id || ' ' || attempts FROM kit_jobs WHERE status = 'running' \
                     AND worker LIKE '%-{pid}-%'"
                ),
            )
            .lines()
            .filter_map(|l| {
                let (id, a) = l.split_once(' ')?;
                Some((id.to_owned(), a.parse().ok()?))
            })
            .collect();
            let _ = ws[i].kill();
            let at = Instant::now();
            let _ = ws[i].wait();
            ws[i] = rig.worker(spawned.fetch_add(1, Ordering::SeqCst));
            kills.push(Kill { at, running });
            next_kill = Instant::now() + Duration::from_secs(3 + rng.u64(..6));
        }
        if done_orders && submitters.is_none() && s3_down.is_none() && open_jobs(&rig.db) == 0 {
            break;
        }
        // Track rescues while running: a killed worker's kit is rescued once another attempt
        // has claimed it (its attempts went up) or it ended.
        std::thread::sleep(Duration::from_millis(250));
        track_rescues(&rig.db, &mut kills);
    }
    track_rescues(&rig.db, &mut kills);
    let topped_up = topups.join().expect("topups");
    let wall = started.elapsed();
    for mut w in workers.lock().expect("workers").drain(..) {
        let _ = w.kill();
        let _ = w.wait();
    }

    // The books.
    let audit = rig
        .cmd()
        .args(["audit", "--storage"])
        .output()
        .expect("audit");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(audit.status.success(), "kiln audit --storage: {said}");
    let accepted = accepted.lock().expect("accepted").clone();
    for (key, ids) in &accepted {
        assert!(
            ids.iter().all(|id| id == &ids[0]),
            "one order key, one job: {key} got {ids:?}"
        );
    }
    let jobs: BTreeMap<String, (String, i64, i64, String)> = psql_on(
        &rig.db,
        "SELECT j.id || ' ' || j.status || ' ' || j.attempts || ' ' || \
         (SELECT COUNT(*) FROM journal e WHERE e.reservation_id = j.reservation_id \
            AND e.entry = 'commit') || ' ' || r.state \
         FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id",
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (
            f[0].to_owned(),
            (
                f[1].to_owned(),
                f[2].parse().expect("attempts"),
                f[3].parse().expect("commits"),
                f[4].to_owned(),
            ),
        )
    })
    .collect();
    for ids in accepted.values() {
        assert!(jobs.contains_key(&ids[0]), "kit {} lost", ids[0]);
    }
    assert_eq!(jobs.len(), accepted.len(), "one job per accepted order key");
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for (id, (status, _, commits, state)) in &jobs {
        *by_status.entry(status.clone()).or_default() += 1;
        match status.as_str() {
            "succeeded" => assert_eq!(
                (*commits, state.as_str()),
                (1, "committed"),
                "{id}: a success is charged exactly once"
            ),
            "failed" | "cancelled" => assert_eq!(
                (*commits, state.as_str()),
                (0, "released"),
                "{id}: a failure is released, never charged"
            ),
            other => panic!("{id} is still {other}"),
        }
    }
    // Every account's charges are exactly its succeeded kits.
    let mismatched = psql_on(
        &rig.db,
        "SELECT COUNT(*) FROM accounts a WHERE a.committed <> COALESCE((SELECT SUM(j.cost) \
         FROM kit_jobs j WHERE j.account_id = a.id AND j.status = 'succeeded'), 0)",
    );
    assert_eq!(mismatched, "0", "an account's charges differ from its kits");

    // The report.
    let unrescued = kills
        .iter()
        .flat_map(|k| &k.running)
        .filter(|r| r.1 >= 0)
        .count();
    let mut rescue: Vec<f64> = RESCUES.with(|r| r.borrow().clone());
    rescue.sort_by(f64::total_cmp);
    let mut attempts: Vec<f64> = jobs.values().map(|j| j.1 as f64).collect();
    attempts.sort_by(f64::total_cmp);
    let injected: usize = (0..spawned.load(Ordering::SeqCst))
        .map(|n| {
            std::fs::read_to_string(dir.0.join(format!("worker-{n}.log")))
                .unwrap_or_default()
                .matches("injected_fault")
                .count()
        })
        .sum();
    let report = serde_json::json!({
        "seed": seed,
        "wall_s": wall.as_secs_f64().round(),
        "orders": orders.len(),
        "accepted_keys": accepted.len(),
        "refused_insufficient": refused.load(Ordering::SeqCst),
        "submit_errors_retried": submit_errors.load(Ordering::SeqCst),
        "topups_racing": topped_up,
        "jobs_by_status": by_status,
        "faults": {
            "sigkills": kills.len(),
            "kits_running_at_kills": kills.iter().map(|k| k.running.len()).sum::<usize>(),
            "workers_restarted_after_exit": restarts_after_exit,
            "postgres_restarts": u8::from(pg_version().is_some()),
            "s3_outage_s": s3_outage.as_secs_f64().round(),
            "generator_failures_injected": injected,
        },
        "rescue_after_sigkill_s": {
            "n": rescue.len(),
            "p50": percentile(&rescue, 0.5),
            "p99": percentile(&rescue, 0.99),
            "max": rescue.last(),
            "not_seen": unrescued,
        },
        "attempts_per_kit": {
            "mean": attempts.iter().sum::<f64>() / attempts.len().max(1) as f64,
            "p50": percentile(&attempts, 0.5),
            "p99": percentile(&attempts, 0.99),
            "max": attempts.last(),
        },
    });
    println!(
        "chaos report\n{}",
        serde_json::to_string_pretty(&report).expect("report")
    );
    assert!(
        percentile(&rescue, 0.99).is_nan() || percentile(&rescue, 0.99) < 30.0,
        "time-to-rescue p99 must be under 30 s: {report}"
    );
}

thread_local! {
    /// Seconds from each SIGKILL to the rescue of each kit its worker was running.
    static RESCUES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks the killed workers' kits that have been rescued since: requeued, claimed by another
/// attempt (its attempts went up: a claim counts one) or ended. A rescued kit's count becomes -1;
/// one never seen rescued keeps its count (reported as not seen).
fn track_rescues(db: &str, kills: &mut [Kill]) {
    let pending: Vec<String> = kills
        .iter()
        .flat_map(|k| {
            k.running
                .iter()
                .filter(|r| r.1 >= 0)
                .map(|r| format!("'{}'", r.0))
        })
        .collect();
    if pending.is_empty() {
        return;
    }
    let now: HashMap<String, (i64, String)> = psql_on(
        db,
        &format!(
            "SELECT id || ' ' || attempts || ' ' || status FROM kit_jobs WHERE id IN ({})",
            pending.join(",")
        ),
    )
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        Some((f[0].to_owned(), (f[1].parse().ok()?, f[2].to_owned())))
    })
    .collect();
    for k in kills.iter_mut() {
        for r in k.running.iter_mut().filter(|r| r.1 >= 0) {
            let Some((attempts, status)) = now.get(&r.0) else {
                continue;
            };
            // Back in the queue (requeued by the reconciler), claimed by another worker, or
            // ended: no longer waiting on the dead one. How long it then waits for a free
            // worker is queueing, which `kiln_queue_oldest_age_seconds` shows.
            if *attempts > r.1 || status != "running" {
                let s = k.at.elapsed().as_secs_f64();
                RESCUES.with(|v| v.borrow_mut().push(s));
                r.1 = -1;
            }
        }
    }
}
