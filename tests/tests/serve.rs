//! Two `kiln serve` processes on one PostgreSQL database, as production runs them behind a load
//! balancer: both run maintenance, yet every hold nobody resolved is expired exactly once
//! (one release each in the journal, one "hold expired" between the two logs); and a long-poll
//! on one process answers when the job is cancelled through the other (LISTEN/NOTIFY).

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_e2e::{
    PgDb, Scratch, ServeProcess, create_account, kiln_cmd, migrate, ok, wait_for_in_flight,
};
use serde_json::{Value, json};

fn start_serve(db: &str, storage: &Path, log: &Path) -> ServeProcess {
    ServeProcess::start(
        kiln_cmd(db, storage)
            .env("KILN_MAINTENANCE_MS", "200")
            .env("RUST_LOG", "warn,kiln_ledger=info"),
        log,
        &["--no-work"],
    )
}

async fn call(method: reqwest::Method, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut req = reqwest::Client::new().request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("HTTP");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_expire_each_hold_once_and_share_job_changes() {
    kiln_e2e::init_test_log();
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    migrate(&pg.url, &storage);
    let (_, key) = create_account(&pg.url, &storage);
    let logs = [dir.0.join("a.log"), dir.0.join("b.log")];
    let a = start_serve(&pg.url, &storage, &logs[0]);
    let b = start_serve(&pg.url, &storage, &logs[1]);

    // Twelve holds that expire in a second, made through both processes.
    let n = 12;
    let mut holds = Vec::new();
    for i in 0..n {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let body = json!({ "action": "text_message", "idempotency_key": format!("t{i}"), "expires_in_s": 1 });
        let (status, h) = call(
            reqwest::Method::POST,
            &format!("{base}/v1/holds"),
            &key,
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{h}");
        holds.push((
            h["id"].as_str().expect("id").to_owned(),
            h["amount"].as_i64().expect("amount"),
        ));
    }

    // A queued kit (no workers here): a long-poll on A hears of its cancellation through B.
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(300), 85).expect("jpeg");
    let form = reqwest::multipart::Form::new()
        .part(
            "design",
            reqwest::multipart::Part::bytes(jpeg).file_name("d.jpg"),
        )
        .text("spec", kiln_assets::sample::SPEC_JSON)
        .text("kit", "essentials");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/kits", a.base))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .expect("order");
    assert_eq!(resp.status().as_u16(), 202);
    let job: Value = resp.json().await.expect("json");
    let id = job["job"]["id"].as_str().expect("id").to_owned();
    let waiter = {
        let url = format!("{}/v1/jobs/{id}?wait=50", a.base);
        let key = key.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (status, body) = call(reqwest::Method::GET, &url, &key, None).await;
            (started.elapsed(), status, body)
        })
    };
    // Until A is serving the long-poll (the scrape itself is the other request in flight).
    wait_for_in_flight(&a.base, 1).await;
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{}/v1/jobs/{id}/cancel", b.base),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (took, status, seen) = waiter.await.expect("waiter");
    assert_eq!(
        (status, &seen["status"]),
        (200, &"cancelled".into()),
        "{seen}"
    );
    assert!(
        took < Duration::from_secs(40),
        "answered on the change, not at the deadline ({took:?})"
    );

    // Both processes run maintenance every 200 ms: wait until every hold has expired.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (hold, _) in &holds {
        loop {
            let (_, h) = call(
                reqwest::Method::GET,
                &format!("{}/v1/holds/{hold}", b.base),
                &key,
                None,
            )
            .await;
            if h["status"] == "expired" {
                break;
            }
            assert_eq!(h["status"], "held", "{h}");
            assert!(Instant::now() < deadline, "hold {hold} never expired: {h}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, journal) = call(
        reqwest::Method::GET,
        &format!("{}/v1/ledger?limit=1000", a.base),
        &key,
        None,
    )
    .await;
    let entries = journal["entries"].as_array().expect("entries");
    let releases = entries.iter().filter(|e| e["entry"] == "release").count();
    assert_eq!(
        releases,
        n + 1,
        "one release per hold and one for the cancelled kit: {journal}"
    );
    let (_, balance) = call(
        reqwest::Method::GET,
        &format!("{}/v1/balance", a.base),
        &key,
        None,
    )
    .await;
    assert_eq!(
        (&balance["available"], &balance["held"]),
        (&200.into(), &0.into()),
        "{balance}"
    );
    drop((a, b));
    let expired_lines: usize = logs
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .expect("log")
                .matches("hold expired")
                .count()
        })
        .sum();
    assert_eq!(expired_lines, n, "each hold expired by exactly one process");
    ok(&kiln_cmd(&pg.url, &storage)
        .arg("audit")
        .output()
        .expect("kiln audit"));
}

/// The CLI as an API client against a `kiln serve` on the embedded default: an order with
/// `--wait` follows the kit to its end; the same order again is said to be a replay of that job
/// (a derived key dedupes for a day) and charges nothing more; `kits status` and `balance` over
/// HTTP; an explicit new key is a new order. On the database, a repeated `kits create` says
/// the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_orders_through_the_api_and_says_when_it_is_a_replay() {
    kiln_e2e::init_test_log();
    let dir = Scratch::new();
    let db = format!("sqlite://{}/kiln.db", dir.0.display());
    let storage = dir.0.join("objects");
    migrate(&db, &storage);
    let (account, key) = create_account(&db, &storage);
    let serve = ServeProcess::start(&mut kiln_cmd(&db, &storage), &dir.0.join("serve.log"), &[]);
    let api = serve.base.clone();
    let design = dir.0.join("ring.jpg");
    std::fs::write(
        &design,
        kiln_assets::encode_jpeg(&kiln_assets::sample::ring(500), 85).expect("jpeg"),
    )
    .expect("design");
    let spec = dir.0.join("spec.json");
    std::fs::write(&spec, kiln_assets::sample::SPEC_JSON).expect("spec");
    let order = |extra: &[&str]| {
        let mut c = kiln_cmd(&db, &storage);
        c.args([
            "kits",
            "create",
            "--api",
            &api,
            "--key",
            &key,
            "--kit",
            "essentials",
        ])
        .arg("--design")
        .arg(&design)
        .arg("--spec")
        .arg(&spec)
        .args(extra);
        c.output().expect("kits create")
    };
    let first = order(&["--wait"]);
    let job: Value = serde_json::from_str(&ok(&first)).expect("job json");
    assert_eq!(job["status"], "succeeded", "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("essentials") && stderr.contains("100.0%") || stderr.contains("succeeded"),
        "progress: {stderr}"
    );
    assert!(!stderr.contains("already ordered"), "{stderr}");

    let again = order(&[]);
    assert_eq!(ok(&again).trim(), id, "the same job");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(&format!("already ordered as job {id}")),
        "{stderr}"
    );

    let status: Value = serde_json::from_str(&ok(&kiln_cmd(&db, &storage)
        .args(["kits", "status", &id, "--api", &api, "--key", &key])
        .output()
        .expect("status")))
    .expect("json");
    assert_eq!(
        (&status["id"], &status["status"]),
        (&id.as_str().into(), &"succeeded".into())
    );
    let balance = |_: ()| -> Value {
        serde_json::from_str(&ok(&kiln_cmd(&db, &storage)
            .args(["balance", "--api", &api, "--key", &key])
            .output()
            .expect("balance")))
        .expect("json")
    };
    assert_eq!(balance(())["available"], 190, "charged once");

    let fresh = order(&["--idempotency-key", "second-batch"]);
    let other = ok(&fresh).trim().to_owned();
    assert_ne!(other, id, "an explicit new key is a new order");
    assert!(!String::from_utf8_lossy(&fresh.stderr).contains("already ordered"));

    // A wrong key: a clear refusal, exit non-zero.
    let bad = kiln_cmd(&db, &storage)
        .args(["balance", "--api", &api, "--key", "kiln_wrong"])
        .output()
        .expect("balance");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // On the database: the same replay notice.
    let on_db = |_: ()| {
        let mut c = kiln_cmd(&db, &storage);
        c.args(["kits", "create", "--account", &account, "--kit", "caratzon"])
            .arg("--design")
            .arg(&design)
            .arg("--spec")
            .arg(&spec);
        c.output().expect("kits create")
    };
    let a = ok(&on_db(())).trim().to_owned();
    let second = on_db(());
    assert_eq!(ok(&second).trim(), a);
    assert!(
        String::from_utf8_lossy(&second.stderr).contains(&format!("already ordered as job {a}"))
    );
}
