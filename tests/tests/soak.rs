//! `make soak` (ignored by `make test`: it runs for 20 minutes): steady kit orders at a fixed rate
//! into two `kiln work` processes on PostgreSQL, sampled every minute: kit latency (order to
//! end) of the kits that ended in that minute, each worker's resident memory, dead tuples in the
//! queue and ledger tables (after a VACUUM when the server runs without autovacuum), and the
//! queue's depth. It fails when latency, memory or dead tuples
//! grow instead of staying flat, and prints the table for docs/RELIABILITY.md.
//!
//! `SOAK_SECS` (1200) and `SOAK_RATE` (orders per second, 0.4) size it; `SOAK_SEED` is printed.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use kiln_e2e::{PgDb, Scratch, env_or, kiln_cmd, ok, percentile, psql_on};

/// Resident memory of a process, in MiB (Linux).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One minute of the run.
#[derive(Debug)]
struct Sample {
    minute: u64,
    ended: usize,
    p50_s: f64,
    p99_s: f64,
    queued: i64,
    rss_mib: Vec<f64>,
    dead_tuples: i64,
}

fn worker(db: &str, storage: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    kiln_cmd(db, storage)
        // The production timings, not the tests' fast ones: a soak is about steady state.
        .env("KILN_HEARTBEAT_MS", "5000")
        .env("KILN_MAINTENANCE_MS", "10000")
        .env("KILN_LEASE_MS", "20000")
        .args(["work", "--concurrency", "1", "--grace-secs", "5"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("kiln work")
}

#[test]
#[ignore = "20 minutes long: run by `make soak`"]
fn soak() {
    let secs: u64 = env_or("SOAK_SECS", 1200);
    let rate: f64 = env_or("SOAK_RATE", 0.4);
    let seed: u64 = env_or("SOAK_SEED", fastrand::u64(..));
    println!("soak: {secs} s at {rate} orders/s, seed {seed} (replay with SOAK_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    kiln_e2e::migrate(&pg.url, &storage);
    let mut accounts = Vec::new();
    for i in 0..5 {
        let out = ok(&kiln_cmd(&pg.url, &storage)
            .args(["--json", "accounts", "create", "--plan", "discover"])
            .output()
            .expect("account"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("account JSON");
        let id = v["id"].as_str().expect("id").to_owned();
        for p in 0..4 {
            ok(&kiln_cmd(&pg.url, &storage)
                .args(["topup", &id, "--pack", "large"])
                .args(["--payment-ref", &format!("soak-{i}-{p}")])
                .output()
                .expect("topup"));
        }
        accounts.push(id);
    }
    let (design, spec) = kiln_e2e::sample_order_files(&dir.0, 1200, 90);
    let autovacuum = psql_on(&pg.url, "SHOW autovacuum") == "on";
    println!(
        "autovacuum is {}",
        if autovacuum {
            "on"
        } else {
            "off on this server: the sampler vacuums before counting dead tuples"
        }
    );
    let log = dir.0.join("workers.log");
    let mut workers: Vec<Child> = (0..2).map(|_| worker(&pg.url, &storage, &log)).collect();

    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut next_order = started;
    let mut next_sample = started + Duration::from_secs(60);
    let mut n = 0u64;
    let mut samples: Vec<Sample> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        for w in &mut workers {
            assert!(
                w.try_wait().expect("worker").is_none(),
                "a worker exited during the soak (see {})",
                log.display()
            );
        }
        if Instant::now() >= next_order {
            let account = &accounts[rng.usize(..accounts.len())];
            ok(&kiln_cmd(&pg.url, &storage)
                .args([
                    "kits",
                    "create",
                    "--account",
                    account,
                    "--kit",
                    "essentials",
                ])
                .args(["--idempotency-key", &format!("soak-{n}"), "--design"])
                .arg(&design)
                .arg("--spec")
                .arg(&spec)
                .output()
                .expect("kits create"));
            n += 1;
            next_order += every;
        }
        if Instant::now() >= next_sample {
            let since = now_ms() - 60_000;
            let mut latencies: Vec<f64> = psql_on(
                &pg.url,
                &format!(
                    "SELECT (finished_at_ms - created_at_ms) / 1000.0 FROM kit_jobs \
                     WHERE finished_at_ms >= {since}"
                ),
            )
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
            latencies.sort_by(f64::total_cmp);
            let queued: i64 = psql_on(
                &pg.url,
                "SELECT COUNT(*) FROM kit_jobs WHERE status IN ('queued', 'running')",
            )
            .parse()
            .expect("queued");
            // A server with autovacuum off (this machine's CI configuration) never reclaims
            // dead tuples by itself: vacuum here as autovacuum would, so what is measured is
            // what vacuum cannot remove (rows held back by a transaction that never ends).
            if !autovacuum {
                psql_on(
                    &pg.url,
                    "VACUUM apalis.jobs, apalis.workers, kit_jobs, reservations, accounts, grants",
                );
            }
            let dead_tuples: i64 = psql_on(
                &pg.url,
                "SELECT COALESCE(SUM(n_dead_tup), 0) FROM pg_stat_user_tables \
                 WHERE relname IN ('jobs', 'workers', 'kit_jobs', 'reservations', 'accounts', 'grants')",
            )
            .parse()
            .expect("dead tuples");
            let s = Sample {
                minute: started.elapsed().as_secs() / 60,
                ended: latencies.len(),
                p50_s: percentile(&latencies, 0.5),
                p99_s: percentile(&latencies, 0.99),
                queued,
                rss_mib: workers.iter().map(|w| rss_mib(w.id())).collect(),
                dead_tuples,
            };
            println!("{s:?}");
            samples.push(s);
            next_sample += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    println!(
        "| minute | kits ended | latency p50 | latency p99 | open kits | worker RSS (MiB) | dead tuples |"
    );
    println!("|---|---|---|---|---|---|---|");
    for s in &samples {
        println!(
            "| {} | {} | {:.1} s | {:.1} s | {} | {} | {} |",
            s.minute,
            s.ended,
            s.p50_s,
            s.p99_s,
            s.queued,
            s.rss_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.dead_tuples
        );
    }
    let audit = kiln_cmd(&pg.url, &storage)
        .args(["audit", "--storage"])
        .output()
        .expect("audit");
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );

    // Flat: the second half against the first (after a minute of warm-up).
    assert!(
        samples.len() >= 4,
        "too short to judge: {} samples",
        samples.len()
    );
    let half = samples.len() / 2;
    let (early, late) = (&samples[1..half], &samples[half..]);
    let mean =
        |xs: &[Sample], f: &dyn Fn(&Sample) -> f64| xs.iter().map(f).sum::<f64>() / xs.len() as f64;
    let p50 = |s: &Sample| s.p50_s;
    let rss = |s: &Sample| s.rss_mib.iter().copied().fold(0.0, f64::max);
    let dead = |s: &Sample| s.dead_tuples as f64;
    let open = |s: &Sample| s.queued as f64;
    assert!(
        mean(late, &p50) <= 1.5 * mean(early, &p50) + 1.0,
        "latency grew: {:.1} s then {:.1} s",
        mean(early, &p50),
        mean(late, &p50)
    );
    assert!(
        mean(late, &rss) <= 1.25 * mean(early, &rss) + 32.0,
        "worker memory grew: {:.0} MiB then {:.0} MiB",
        mean(early, &rss),
        mean(late, &rss)
    );
    assert!(
        mean(late, &dead) <= 1.5 * mean(early, &dead) + 200.0,
        "dead tuples grew: {:.0} then {:.0}",
        mean(early, &dead),
        mean(late, &dead)
    );
    assert!(
        mean(late, &open) <= 2.0 * mean(early, &open) + 5.0,
        "the queue grew (the rate is above what the workers make): {:.0} then {:.0}",
        mean(early, &open),
        mean(late, &open)
    );
}

/// Now, in milliseconds since the epoch (what kit_jobs stores).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
