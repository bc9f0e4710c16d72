//! `kiln work` processes on PostgreSQL: SIGTERM lets a running kit finish and exits 0; storage
//! going down mid-flight makes jobs retry with growing delays, charging nothing until a kit
//! succeeds, and releasing after the last attempt.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::{
    PgDb, S3_ACCESS_KEY, S3_SECRET_KEY, S3Server, Scratch, count, kiln_cmd, ok, psql_on,
    start_worker, start_worker_with,
};

struct Order {
    account: String,
    design: std::path::PathBuf,
    spec: std::path::PathBuf,
}

fn setup(db: &str, dir: &Path, env: &[(&str, &str)], storage: &Path) -> Order {
    kiln_e2e::migrate(db, storage);
    let mut cmd = kiln_cmd(db, storage);
    cmd.envs(env.iter().copied());
    let created = ok(&cmd
        .args(["accounts", "create", "--plan", "discover", "--json"])
        .output()
        .expect("create account"));
    let account: serde_json::Value = serde_json::from_str(&created).expect("account JSON");
    let (design, spec) = kiln_e2e::sample_order_files(dir, 1000, 90);
    Order {
        account: account["id"].as_str().expect("id").to_owned(),
        design,
        spec,
    }
}

/// Stops `child` as a deploy does: SIGTERM (the caller waits for it).
fn terminate(child: &std::process::Child) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success(), "kill -TERM {}", child.id());
}

fn create(cmd: &mut Command, o: &Order, kit: &str, key: &str) -> String {
    ok(&cmd
        .args(["kits", "create", "--account", &o.account, "--kit", kit])
        .args(["--idempotency-key", key, "--design"])
        .arg(&o.design)
        .arg("--spec")
        .arg(&o.spec)
        .output()
        .expect("kits create"))
    .trim()
    .to_owned()
}

fn field(db: &str, id: &str, expr: &str) -> String {
    psql_on(
        db,
        &format!("SELECT {expr} FROM kit_jobs WHERE id = '{id}'"),
    )
}

/// `kiln status --json`.
fn status_json(db: &str, storage: &std::path::Path) -> serde_json::Value {
    let out = kiln_cmd(db, storage)
        .args(["--json", "status"])
        .output()
        .expect("kiln status");
    serde_json::from_str(&ok(&out)).expect("status JSON")
}

/// Tasks apalis holds as running, over every queue (`kiln status`).
fn engine_running_tasks(db: &str, storage: &std::path::Path) -> u64 {
    status_json(db, storage)["engine_running_tasks"]
        .as_object()
        .expect("engine_running_tasks")
        .values()
        .map(|n| n.as_u64().expect("count"))
        .sum()
}

fn wait_for(what: &str, deadline: Instant, done: impl FnMut() -> bool) {
    wait_or_explain(what, deadline, done, String::new);
}

/// [`wait_for`], with `explain()` (the job's row, the worker's log ...) in the timeout's message.
fn wait_or_explain(
    what: &str,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
    explain: impl FnOnce() -> String,
) {
    while !done() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}\n{}", explain());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The job's row and the last `lines` lines of `log`, for a timeout's message.
fn job_and_log(db: &str, id: &str, log: &Path, lines: usize) -> String {
    let row = field(
        db,
        id,
        "status || ' attempts=' || attempts || ' fence=' || fence || ' error=' || \
         COALESCE(error_code, '-') || ' run_at-now=' || (run_at_ms - \
         (extract(epoch from clock_timestamp()) * 1000)::bigint)",
    );
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    // Its apalis task: never fetched (Pending, past its run_at) or taken and stuck (Running).
    let task = psql_on(
        db,
        &format!(
            "SELECT COALESCE(string_agg(t.status || ' run_at=' || t.run_at || ' lock_by=' || \
             COALESCE(t.lock_by, '-') || ' deliveries=' || t.attempts, '; '), 'none') \
             FROM apalis.jobs t JOIN kit_jobs k ON t.id = k.task_id WHERE k.id = '{id}'"
        ),
    );
    // Who holds what on the database: a kit stuck behind a lock shows here.
    let sessions = psql_on(
        db,
        "SELECT pid || ' ' || COALESCE(state, '-') || ' wait=' || \
         COALESCE(wait_event_type || ':' || wait_event, '-') || ' xact_age_ms=' || \
         COALESCE((extract(epoch from clock_timestamp() - xact_start) * 1000)::bigint::text, '-') \
         || ' blocked_by=' || pg_blocking_pids(pid)::text || ' last: ' || left(query, 160) \
         FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    format!(
        "job {id}: {row}\napalis task: {task}\nsessions on its database:\n{sessions}\nworker log (last {lines} lines):\n{}",
        tail.join("\n")
    )
}

#[test]
fn sigterm_lets_the_running_kit_finish_and_exits_zero() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    let o = setup(&pg.url, &dir.0, &[], &storage);
    let log = dir.0.join("worker.log");
    // A grace period the kit fits in even on a loaded machine (a debug Caratzon kit took over
    // 5 s while the rest of the suite ran): the test is that it finishes, not how fast.
    let mut worker = start_worker_with(
        &pg.url,
        &storage,
        &log,
        &["--concurrency", "2", "--grace-secs", "120"],
    );
    let id = create(&mut kiln_cmd(&pg.url, &storage), &o, "caratzon", "term-1");
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_for("the kit to be mid-flight", deadline, || {
        field(&pg.url, &id, "steps_done") != "0"
    });
    terminate(&worker);
    let status = worker.wait().expect("worker exits");
    assert!(
        status.success(),
        "kiln work exited with {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(field(&pg.url, &id, "status"), "succeeded");
    assert_eq!(
        field(
            &pg.url,
            &id,
            "(SELECT state FROM reservations r WHERE r.id = reservation_id)"
        ),
        "committed"
    );
    // Nothing is left held by the worker that stopped.
    assert_eq!(
        engine_running_tasks(&pg.url, &storage),
        0,
        "no task left running in apalis"
    );
    assert_eq!(count(&pg.url, "status = 'running'"), 0);
}

#[test]
fn storage_outage_retries_with_growing_delays_and_charges_only_on_success() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let mut s3 = S3Server::start();
    let endpoint = s3.endpoint.clone();
    let env = [
        ("KILN_S3_ENDPOINT", endpoint.as_str()),
        ("KILN_S3_REGION", "us-east-1"),
        ("KILN_S3_ACCESS_KEY_ID", S3_ACCESS_KEY),
        ("KILN_S3_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        // Small, so two retries are seen early and the next one, after S3 is back, comes soon:
        // at 200 ms a loaded machine saw attempts 3 and 4 (3.2 and 12.8 s) and the one after
        // could be 51 s away, past the deadline.
        ("KILN_RETRY_BASE_MS", "50"),
        // The tests' usual 2 s cap would flatten the delays from the fourth attempt on (a
        // loaded machine first saw attempts 4 and 5, both 2 s); 15 s lets five of them grow.
        ("KILN_RETRY_MAX_MS", "15000"),
    ];
    let storage = Path::new("s3://kiln-test");
    let cmd = |max_attempts: &str| {
        let mut c = kiln_cmd(&pg.url, storage);
        c.envs(env.iter().copied())
            .env("KILN_MAX_ATTEMPTS", max_attempts);
        c
    };
    let o = setup(&pg.url, &dir.0, &env, storage);
    // Both uploads are stored while S3 is up; then it goes down.
    let patient = create(&mut cmd("12"), &o, "essentials", "patient");
    let hasty = create(&mut cmd("2"), &o, "essentials", "hasty");
    s3.stop();

    let log = dir.0.join("worker.log");
    let mut worker = cmd("12")
        .args(["work", "--concurrency", "2", "--grace-secs", "5"])
        // Each delivery's end and apalis's fetch and heartbeat steps are in the log, so a
        // timeout's tail shows where a queue stopped (a fetch or heartbeat that never returned,
        // or a delivery that never ended).
        .env(
            "RUST_LOG",
            "warn,kiln=info,kit_worker=debug,apalis_core::backend::persistence=debug",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("kiln work");
    let deadline = Instant::now() + Duration::from_secs(120);

    // The job with two attempts fails after its second and releases its credits.
    wait_or_explain(
        "the hasty job to fail",
        deadline,
        || field(&pg.url, &hasty, "status") == "failed",
        || job_and_log(&pg.url, &hasty, &log, 150),
    );
    assert_eq!(field(&pg.url, &hasty, "attempts"), "2");
    assert_eq!(field(&pg.url, &hasty, "error_code"), "storage_unavailable");
    assert_eq!(
        field(
            &pg.url,
            &hasty,
            "(SELECT state FROM reservations r WHERE r.id = reservation_id)"
        ),
        "released"
    );

    // The patient one is handed back with a longer delay each time, its credits still held.
    // Shared with the timeout's message, which lists the retries seen so far.
    let delays = std::cell::RefCell::new(Vec::<(u32, i64)>::new());
    wait_or_explain(
        "two retries of the patient job",
        deadline,
        || {
            let row = field(
                &pg.url,
                &patient,
                "attempts || ' ' || status || ' ' || (run_at_ms - updated_at_ms)",
            );
            let parts: Vec<&str> = row.split(' ').collect();
            let mut delays = delays.borrow_mut();
            if parts[1] == "queued" {
                let attempt: u32 = parts[0].parse().expect("attempts");
                let delay: i64 = parts[2].parse().expect("delay");
                if attempt > 0 && delays.last().map(|d| d.0) != Some(attempt) {
                    delays.push((attempt, delay));
                }
            }
            delays.len() >= 2
        },
        || {
            format!(
                "retries seen: {:?}\n{}",
                delays.borrow(),
                job_and_log(&pg.url, &patient, &log, 150)
            )
        },
    );
    let delays = delays.into_inner();
    println!("retry delays by attempt: {delays:?}");
    // Four-fold per attempt from 50 ms, capped at 15 s: 50, 200, 800, 3200, 12800, 15000, ...
    for &(attempt, delay) in &delays {
        let grown = 50 * 4i64.saturating_pow(attempt - 1);
        assert_eq!(
            delay,
            grown.min(15_000),
            "delay after attempt {attempt}: {delays:?}"
        );
    }
    for pair in delays.windows(2) {
        assert!(
            pair[1].1 > pair[0].1 || pair[0].1 == 15_000,
            "delays must grow up to their cap: {delays:?}"
        );
    }
    assert_eq!(
        field(
            &pg.url,
            &patient,
            "(SELECT state FROM reservations r WHERE r.id = reservation_id)"
        ),
        "held"
    );

    s3.start_again();
    // Its own deadline: the next attempt is one backoff away from the last one seen.
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_or_explain(
        "the patient job to succeed",
        deadline,
        || field(&pg.url, &patient, "status") == "succeeded",
        || job_and_log(&pg.url, &patient, &log, 150),
    );
    assert_eq!(
        field(
            &pg.url,
            &patient,
            "(SELECT state FROM reservations r WHERE r.id = reservation_id)"
        ),
        "committed"
    );
    let commits = psql_on(
        &pg.url,
        &format!(
            "SELECT COUNT(*) FROM journal WHERE entry = 'commit' AND reservation_id = \
             (SELECT reservation_id FROM kit_jobs WHERE id = '{patient}')"
        ),
    );
    assert_eq!(commits, "1");
    let _ = worker.kill();
    let _ = worker.wait();
    let audit = cmd("12")
        .args(["audit", "--storage"])
        .output()
        .expect("audit");
    assert!(ok(&audit).contains("clean"));
}

#[test]
fn losing_the_database_makes_kiln_work_exit_non_zero() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    ok(&kiln_cmd(&pg.url, &storage)
        .arg("migrate")
        .output()
        .expect("migrate"));
    let log = dir.0.join("worker.log");
    let mut worker = start_worker(&pg.url, &storage, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    wait_for("the workers to register", deadline, || {
        status_json(&pg.url, &storage)["workers"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });
    // The database goes away under the running process (its connections are terminated).
    let dropped = kiln_e2e::psql(&format!("DROP DATABASE {} WITH (FORCE)", pg.name));
    assert!(
        dropped.status.success(),
        "{}",
        String::from_utf8_lossy(&dropped.stderr)
    );
    let status = loop {
        if let Some(s) = worker.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "kiln work kept running without its database"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "kiln work must exit non-zero so its supervisor restarts it; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn a_kit_still_running_when_the_grace_period_ends_is_handed_back() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    let o = setup(&pg.url, &dir.0, &[], &storage);
    let log = dir.0.join("worker.log");
    let spawn = |grace: &str| {
        kiln_e2e::start_worker_with(
            &pg.url,
            &storage,
            &log,
            &["--concurrency", "1", "--grace-secs", grace],
        )
    };
    let mut impatient = spawn("0");
    let id = create(&mut kiln_cmd(&pg.url, &storage), &o, "caratzon", "grace-0");
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_for("the kit to be mid-flight", deadline, || {
        field(&pg.url, &id, "steps_done") != "0"
    });
    let fence = field(&pg.url, &id, "fence");
    terminate(&impatient);
    assert!(impatient.wait().expect("exit").success());
    // Handed back at once: queued on a new task with a new fence, credits still held, and the
    // attempt given back.
    assert_eq!(field(&pg.url, &id, "status"), "queued");
    assert_eq!(field(&pg.url, &id, "attempts"), "0");
    assert!(
        field(&pg.url, &id, "fence").parse::<i64>().expect("fence") > fence.parse().expect("fence")
    );
    assert_eq!(
        field(
            &pg.url,
            &id,
            "(SELECT state FROM reservations r WHERE r.id = reservation_id)"
        ),
        "held"
    );
    let mut patient = spawn("30");
    wait_for("the kit to succeed on the next worker", deadline, || {
        field(&pg.url, &id, "status") == "succeeded"
    });
    // The handed-back attempt was given back: the run that finished is the kit's first.
    assert_eq!(field(&pg.url, &id, "attempts"), "1");
    assert_eq!(kiln_e2e::commits_per_job(&pg.url).get(&id), Some(&1));
    let _ = patient.kill();
    let _ = patient.wait();
}

/// `/metrics` of the workers and of the API, scraped during a run, against what happened: two
/// kits whose every attempt fails (an injected generator fault, two attempts each) and three
/// that succeed. Each worker counts its own attempts by kit and outcome and its retries by
/// cause; the API reads the credits moved from the journal, the same for every process.
#[test]
fn metrics_scraped_during_a_run_match_what_happened() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    let o = setup(&pg.url, &dir.0, &[], &storage);
    let worker = |faults: &str, port: u16| {
        let log = std::fs::File::create(dir.0.join(format!("worker-{port}.log"))).expect("log");
        kiln_cmd(&pg.url, &storage)
            // JSON lines, kit events included: checked below for the span's fields.
            .env("RUST_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,kit_worker=info")
            .env("KILN_FAULT_GENERATOR_FAILURES", faults)
            .env("KILN_MAX_ATTEMPTS", "2")
            .env("KILN_RETRY_BASE_MS", "50")
            .env("KILN_AUDIT_EVERY_SECS", "1")
            .args(["work", "--concurrency", "2", "--grace-secs", "5"])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kiln work")
    };
    let order = |kit: &str, key: &str| {
        create(
            kiln_cmd(&pg.url, &storage).env("KILN_MAX_ATTEMPTS", "2"),
            &o,
            kit,
            key,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    let ended = |ids: &[String]| {
        ids.iter().all(|id| {
            matches!(
                field(&pg.url, id, "status").as_str(),
                "succeeded" | "failed"
            )
        })
    };

    // Every generation fails: both kits fail after their two attempts.
    let faulty_port = kiln_e2e::free_port();
    let mut faulty = worker("1", faulty_port);
    kiln_e2e::wait_for_port(faulty_port, "the faulty worker's metrics");
    let doomed = vec![
        order("essentials", "doomed-1"),
        order("essentials", "doomed-2"),
    ];
    wait_for("the doomed kits to fail", deadline, || ended(&doomed));
    let m = kiln_e2e::scrape(&format!("127.0.0.1:{faulty_port}"));
    let get = |m: &std::collections::BTreeMap<String, f64>, k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:#?}"))
    };
    let attempts = |m: &std::collections::BTreeMap<String, f64>, kit: &str, outcome: &str| {
        m.get(&format!(
            "kiln_kit_attempt_duration_seconds_count{{kit=\"{kit}\",outcome=\"{outcome}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(attempts(&m, "essentials", "retried"), 2.0, "{m:#?}");
    assert_eq!(attempts(&m, "essentials", "failed"), 2.0, "{m:#?}");
    assert_eq!(attempts(&m, "essentials", "succeeded"), 0.0, "{m:#?}");
    assert_eq!(
        get(
            &m,
            "kiln_kit_retries_total{kit=\"essentials\",code=\"injected_fault\"}"
        ),
        2.0
    );
    assert_eq!(
        get(&m, "kiln_worker_kits_in_flight{kit=\"essentials\"}"),
        0.0
    );
    // Stopped as a deploy stops it (SIGTERM): apalis records its last deliveries' ends on the
    // way out. (Killed, a delivery it had not yet recorded stays taken by a dead worker, and the
    // healthy worker rightly delivers it again once that worker's heartbeats have lapsed: a
    // skipped delivery of an ended job, which the check below is not about.)
    terminate(&faulty);
    let stopped = faulty.wait().expect("the faulty worker exits");
    assert!(stopped.success(), "the faulty worker exited with {stopped}");

    // A healthy worker: three kits succeed.
    let port = kiln_e2e::free_port();
    let mut healthy = worker("0", port);
    kiln_e2e::wait_for_port(port, "the worker's metrics");
    let made = vec![
        order("essentials", "made-1"),
        order("essentials", "made-2"),
        order("caratzon", "made-3"),
    ];
    wait_for("the kits to succeed", deadline, || ended(&made));
    for id in &made {
        assert_eq!(field(&pg.url, id, "status"), "succeeded");
    }
    // Its maintenance loop audits every second: wait for one audit after the kits.
    let audits = get(
        &kiln_e2e::scrape(&format!("127.0.0.1:{port}")),
        "kiln_audits_total",
    );
    wait_for("an audit after the kits", deadline, || {
        get(
            &kiln_e2e::scrape(&format!("127.0.0.1:{port}")),
            "kiln_audits_total",
        ) > audits
    });
    let m = kiln_e2e::scrape(&format!("127.0.0.1:{port}"));
    assert_eq!(attempts(&m, "essentials", "succeeded"), 2.0, "{m:#?}");
    assert_eq!(attempts(&m, "caratzon", "succeeded"), 1.0, "{m:#?}");
    // One live worker: every kit delivered once. (apalis counts a worker dead after whole
    // seconds of missed heartbeats; the tests' 300 ms x 3 came to 0 s, and every heartbeat
    // handed the running kits out again, a duplicate delivery of each.)
    for kit in ["essentials", "caratzon"] {
        assert_eq!(attempts(&m, kit, "skipped"), 0.0, "{m:#?}");
    }
    assert_eq!(
        attempts(&m, "essentials", "failed"),
        0.0,
        "a new process: {m:#?}"
    );
    assert_eq!(get(&m, "kiln_audit_breaches"), 0.0);
    // Its log: JSON lines, and every kit line carries the job, the account and the attempt.
    let log = std::fs::read_to_string(dir.0.join(format!("worker-{port}.log"))).expect("log");
    let succeeded: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "kit job succeeded; charge committed")
        .collect();
    assert_eq!(succeeded.len(), 3, "{log}");
    for line in &succeeded {
        let span = &line["span"];
        assert_eq!(span["name"], "kit", "{line}");
        assert_eq!(span["account"], o.account.as_str(), "{line}");
        assert_eq!(span["attempt"], 1, "{line}");
        assert!(made.iter().any(|id| span["job"] == id.as_str()), "{line}");
    }

    // The API's view: credits moved, from the journal; nothing left in the queues.
    let serve = kiln_e2e::ServeProcess::start(
        &mut kiln_cmd(&pg.url, &storage),
        &dir.0.join("serve.log"),
        &["--no-work"],
    );
    let api = kiln_e2e::scrape(serve.base.trim_start_matches("http://"));
    let credits = |entry: &str| get(&api, &format!("kiln_credits_total{{entry=\"{entry}\"}}"));
    // Welcome 200; reserved 10 + 10 (released) + 10 + 10 + 100 (committed).
    assert_eq!(credits("grant"), 200.0);
    assert_eq!(credits("reserve"), 140.0);
    assert_eq!(credits("commit"), 120.0);
    assert_eq!(credits("release"), 20.0);
    assert_eq!(credits("expire"), 0.0);
    // ... and the journal agrees, entry by entry.
    for entry in ["grant", "reserve", "commit", "release"] {
        let sum: f64 = psql_on(
            &pg.url,
            &format!("SELECT COALESCE(SUM(amount), 0) FROM journal WHERE entry = '{entry}'"),
        )
        .parse()
        .expect("sum");
        assert_eq!(credits(entry), sum, "{entry}");
    }
    for queue in ["kits.essentials", "kits.caratzon"] {
        for status in ["queued", "running"] {
            assert_eq!(
                get(
                    &api,
                    &format!("kiln_queue_depth{{queue=\"{queue}\",status=\"{status}\"}}")
                ),
                0.0
            );
        }
    }
    let _ = healthy.kill();
    let _ = healthy.wait();
}
