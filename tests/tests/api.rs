//! The HTTP API over real HTTP, started in-process as `kiln serve` starts it (`App::serve`), on
//! the embedded default (SQLite + local store) and on PostgreSQL: who may see what, the error
//! shape, and the JSON of DESIGN.md §6 for what is served so far.

use std::time::Duration;

use kiln::settings::Settings;
use kiln::{App, Migrate};
use kiln_core::{Kit, PlanId};
use kiln_ledger::NewAccount;
use kiln_producer::{Order, intake};
use serde_json::Value;

struct Served {
    base: String,
    app: App,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: kiln_e2e::Scratch,
    _s3: Option<kiln_e2e::S3Server>,
}

/// `kiln serve` in-process on `database_url`: PostgreSQL with s3s-fs, SQLite with the local
/// store; with `work`, kit workers beside it.
async fn serve_with(database_url: &str, work: bool) -> Served {
    kiln_e2e::init_test_log();
    let dir = kiln_e2e::Scratch::new();
    let local = dir.0.join("objects");
    let s3 = database_url
        .starts_with("postgres")
        .then(kiln_e2e::S3Server::start);
    let mut env = vec![
        ("KILN_DATABASE_URL", database_url.to_owned()),
        ("KILN_SUBMIT_BURST", "1000".to_owned()),
        ("KILN_RETRY_BASE_MS", "200".to_owned()),
    ];
    match &s3 {
        Some(s3) => env.extend([
            ("KILN_STORAGE", "s3://kiln-test".to_owned()),
            ("KILN_S3_ENDPOINT", s3.endpoint.clone()),
            ("KILN_S3_REGION", "us-east-1".to_owned()),
            ("KILN_S3_ACCESS_KEY_ID", kiln_e2e::S3_ACCESS_KEY.to_owned()),
            (
                "KILN_S3_SECRET_ACCESS_KEY",
                kiln_e2e::S3_SECRET_KEY.to_owned(),
            ),
        ]),
        None => env.push((
            "KILN_STORAGE",
            local.to_str().expect("utf-8 path").to_owned(),
        )),
    }
    let settings = Settings::load_from(None, &MapEnv(env)).expect("settings");
    let app = App::build(settings, Migrate::Yes).await.expect("build");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (addr, server) = app
        .serve("127.0.0.1:0", until_stopped(stopped.clone()))
        .await
        .expect("bind");
    tokio::spawn(server);
    if work {
        let opts = kiln::WorkOptions {
            queues: vec![Kit::Essentials, Kit::Caratzon],
            concurrency: 1,
            grace: Duration::from_secs(30),
        };
        let (app, stopped) = (app.clone(), until_stopped(stopped.clone()));
        tokio::spawn(async move { app.work(opts, stopped).await });
    }
    Served {
        base: format!("http://{addr}"),
        app,
        _stop: stop,
        _dir: dir,
        _s3: s3,
    }
}

async fn serve(database_url: &str) -> Served {
    serve_with(database_url, false).await
}

struct MapEnv(Vec<(&'static str, String)>);

impl kiln::settings::Env for MapEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
}

async fn account(s: &Served, admin: bool) -> (kiln_core::AccountId, String) {
    let c = s
        .app
        .ledger()
        .create_account(NewAccount {
            plan: PlanId::Discover,
            is_admin: admin,
            email: None,
            monthly_allowance: None,
        })
        .await
        .expect("account");
    (c.account.id, c.api_key)
}

async fn get(s: &Served, path: &str, key: Option<&str>) -> (u16, Value) {
    send(s, reqwest::Method::GET, path, key, None).await
}

async fn post(s: &Served, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    send(s, reqwest::Method::POST, path, key, Some(body)).await
}

async fn send(
    s: &Served,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut req = client.request(method, format!("{}{path}", s.base));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("HTTP");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A 402 `insufficient_credits` with what is needed and the three default packs to cover it.
fn assert_short(status: u16, body: &Value, needed: u64, available: u64, shortfall: u64) {
    assert_eq!(status, 402, "{body}");
    assert_error(body, "insufficient_credits");
    let e = &body["error"];
    assert_eq!(
        (&e["needed"], &e["available"], &e["shortfall"]),
        (&needed.into(), &available.into(), &shortfall.into()),
        "{body}"
    );
    assert!(
        e["top_up_packs"].as_array().is_some_and(|p| p.len() == 3),
        "{body}"
    );
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

async fn contract(database_url: &str) {
    let s = serve(database_url).await;
    let (status, body) = get(&s, "/healthz", None).await;
    assert_eq!((status, &body["status"]), (200, &Value::from("ok")));
    let (status, body) = get(&s, "/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = get(&s, "/v1/prices", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["actions"]["essentials_kit"], 10, "{body}");
    assert_eq!(body["actions"]["caratzon_kit"], 100, "{body}");

    // No key, a malformed header, a wrong key: 401 with the error shape.
    for key in [None, Some(""), Some("kiln_not-a-key")] {
        let (status, body) = get(&s, "/v1/account", key).await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_error(&body, "unauthorized");
    }

    let (me, key) = account(&s, false).await;
    let (other, other_key) = account(&s, false).await;
    let (status, body) = get(&s, "/v1/account", Some(&key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], me.to_string());
    let (status, body) = get(&s, "/v1/balance", Some(&key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["available"], 200);
    assert_eq!(body["held"], 0);
    assert_eq!(body["by_kind"][0]["kind"], "welcome", "{body}");

    // A job of mine, seen by me; 404 for the other account, as for an id that names nothing.
    let design = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(700), 90).expect("jpeg");
    let job = intake(
        s.app.queue(),
        s.app.storage(),
        Order {
            account: me,
            kit: Kit::Essentials,
            design: bytes::Bytes::from(design),
            spec_json: kiln_assets::sample::SPEC_JSON.as_bytes(),
            idempotency_key: "api-1",
            max_attempts: 2,
        },
    )
    .await
    .expect("intake")
    .job;
    let path = format!("/v1/jobs/{}", job.id);
    let (status, body) = get(&s, &path, Some(&key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], job.id.to_string());
    assert_eq!(body["kit"], "essentials");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["cost"], 10);
    assert_eq!(body["charge"], "held");
    assert!(body["progress"]["total"].is_number(), "{body}");
    assert!(body["error"].is_null(), "{body}");
    let (status, body) = get(&s, &path, Some(&other_key)).await;
    assert_eq!(status, 404, "another account's job: {body}");
    assert_error(&body, "not_found");
    for missing in ["/v1/jobs/01J00000000000000000000000", "/v1/jobs/not-a-ulid"] {
        let (status, body) = get(&s, missing, Some(&key)).await;
        assert_eq!(status, 404, "{missing}: {body}");
        assert_error(&body, "not_found");
    }

    let (status, body) = get(&s, "/v1/jobs", Some(&key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jobs"].as_array().map(Vec::len), Some(1), "{body}");
    let (status, body) = get(&s, "/v1/jobs?status=succeeded", Some(&key)).await;
    assert_eq!(
        (status, body["jobs"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, body) = get(&s, "/v1/jobs", Some(&other_key)).await;
    assert_eq!(
        (status, body["jobs"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, body) = get(&s, "/v1/jobs?status=lost", Some(&key)).await;
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "bad_request");
    // Looked up by its idempotency key; a key no order could have (a NUL, which PostgreSQL
    // refuses in text: schemathesis found it as a 500) is a 400, not a query.
    let (status, body) = get(&s, "/v1/jobs?idempotency_key=api-1", Some(&key)).await;
    assert_eq!(
        (status, body["jobs"][0]["id"].as_str()),
        (200, Some(job.id.to_string().as_str())),
        "{body}"
    );
    for bad in ["%00", "a%00b", "%0A"] {
        let (status, body) = get(&s, &format!("/v1/jobs?idempotency_key={bad}"), Some(&key)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error(&body, "bad_request");
    }
    let _ = other;

    let (status, body) = get(&s, "/v1/nothing-here", Some(&key)).await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found");

    // Cancel: the other account cannot (404, nothing released); the owner can, once.
    let cancel = format!("/v1/jobs/{}/cancel", job.id);
    let (status, body) = post(&s, &cancel, Some(&other_key), Value::Null).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(&s, &cancel, Some(&key), Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["status"], &body["charge"]),
        (&"cancelled".into(), &"released".into())
    );
    let (status, body) = post(&s, &cancel, Some(&key), Value::Null).await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "not_cancellable");
    let (_, body) = get(&s, "/v1/balance", Some(&key)).await;
    assert_eq!(
        (&body["available"], &body["held"]),
        (&200.into(), &0.into())
    );

    money(&s, &key, &other_key).await;
    kits(&s).await;
}

async fn post_kit(
    s: &Served,
    key: &str,
    idempotency_key: Option<&str>,
    design: Vec<u8>,
    spec: &str,
    kit: &str,
) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let form = reqwest::multipart::Form::new()
        .part(
            "design",
            reqwest::multipart::Part::bytes(design)
                .file_name("design.jpg")
                .mime_str("image/jpeg")
                .expect("mime"),
        )
        .text("spec", spec.to_owned())
        .text("kit", kit.to_owned());
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/kits", s.base))
        .bearer_auth(key)
        .multipart(form);
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.expect("HTTP");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn held(s: &Served, key: &str) -> (i64, i64) {
    let (_, b) = get(s, "/v1/balance", Some(key)).await;
    (
        b["available"].as_i64().expect("available"),
        b["held"].as_i64().expect("held"),
    )
}

/// Ordering kits over HTTP: accepted, replayed, conflicting, refused before any charge.
async fn kits(s: &Served) {
    let (_, key) = account(s, false).await;
    let spec = kiln_assets::sample::SPEC_JSON;
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(700), 90).expect("jpeg");

    let (status, body) = post_kit(s, &key, Some("order-1"), jpeg.clone(), spec, "essentials").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (&body["job"]["status"], &body["job"]["cost"]),
        (&"queued".into(), &10.into())
    );
    let id = body["job"]["id"].clone();
    let (status, body) = post_kit(s, &key, Some("order-1"), jpeg.clone(), spec, "essentials").await;
    assert_eq!(
        (status, &body["job"]["id"]),
        (200, &id),
        "a replay is the same job: {body}"
    );
    let (status, body) = post_kit(s, &key, Some("order-1"), jpeg.clone(), spec, "caratzon").await;
    assert_eq!(status, 409, "same key, another order: {body}");
    assert_error(&body, "idempotency_conflict");
    assert_eq!(held(s, &key).await, (190, 10), "one order, one hold");

    // Without a key every request is a new order.
    for _ in 0..2 {
        let (status, body) = post_kit(s, &key, None, jpeg.clone(), spec, "essentials").await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(held(s, &key).await, (170, 30));

    // Refused before any charge: each leaves the balance as it was.
    let mut truncated = jpeg.clone();
    truncated.truncate(jpeg.len() * 2 / 3);
    // Garbled where a decoder cannot paper over it: the Huffman tables (scrambled entropy data
    // alone decodes, to noise).
    let mut garbled = jpeg.clone();
    let dht = garbled
        .windows(2)
        .position(|w| w == [0xFF, 0xC4])
        .expect("a DHT segment");
    for b in &mut garbled[dht + 5..dht + 40] {
        *b = 0xFF;
    }
    let html = b"<!doctype html><html><body>not a picture</body></html>".to_vec();
    let bad_spec = r#"{"style_number": "A-1", "name": "Ring", "category": "spaceship"}"#;
    let refusals: [(Vec<u8>, &str, &str, u16, &str); 6] = [
        (truncated, spec, "essentials", 422, "undecodable_image"),
        (garbled, spec, "essentials", 422, "undecodable_image"),
        (html, spec, "essentials", 415, "unsupported_media_type"),
        (jpeg.clone(), bad_spec, "essentials", 422, "invalid_spec"),
        (jpeg.clone(), "not json", "essentials", 422, "invalid_spec"),
        (jpeg.clone(), spec, "deluxe", 422, "invalid_request"),
    ];
    for (i, (design, spec, kit, want, code)) in refusals.into_iter().enumerate() {
        let (status, body) = post_kit(s, &key, Some(&format!("bad-{i}")), design, spec, kit).await;
        assert_eq!(status, want, "refusal {i}: {body}");
        assert_error(&body, code);
        assert_eq!(
            held(s, &key).await,
            (170, 30),
            "refusal {i} charged nothing"
        );
    }
    // A decompression bomb: a PNG of a few bytes that declares 40000 x 40000 pixels.
    let mut bomb = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 1))
        .write_to(
            &mut std::io::Cursor::new(&mut bomb),
            image::ImageFormat::Png,
        )
        .expect("png");
    bomb[16..20].copy_from_slice(&40_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&40_000u32.to_be_bytes());
    let (status, body) = post_kit(s, &key, Some("bomb"), bomb, spec, "essentials").await;
    assert!((400..500).contains(&status), "{status}: {body}");
    assert!(
        ["upload_too_large", "undecodable_image"]
            .contains(&body["error"]["code"].as_str().unwrap_or("")),
        "{body}"
    );
    assert_eq!(held(s, &key).await, (170, 30), "the bomb charged nothing");
    let mut too_big = jpeg.clone();
    too_big.resize(kiln_api::MAX_DESIGN_BYTES + 1, 0);
    let (status, body) = post_kit(s, &key, Some("big"), too_big, spec, "essentials").await;
    assert_eq!(status, 413, "{body}");
    assert_error(&body, "upload_too_large");

    // Short of credits: 402 with what is needed and the packs that cover it.
    let (status, _) = post_kit(s, &key, None, jpeg.clone(), spec, "caratzon").await;
    assert_eq!(status, 202);
    let (status, body) = post_kit(s, &key, None, jpeg.clone(), spec, "caratzon").await;
    assert_short(status, &body, 100, 70, 30);
    assert_eq!(held(s, &key).await, (70, 130));
}

/// Quotes, charges (402 with the packs), top-ups, the journal, and the admin route.
async fn money(s: &Served, key: &str, other_key: &str) {
    let (status, body) = post(
        s,
        "/v1/quotes",
        Some(key),
        serde_json::json!({"action": "caratzon_kit"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["cost"],
            &body["available"],
            &body["affordable"],
            &body["shortfall"]
        ),
        (&100.into(), &200.into(), &true.into(), &0.into()),
        "{body}"
    );
    let (status, body) = post(
        s,
        "/v1/quotes",
        Some(key),
        serde_json::json!({"action": "yacht"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_error(&body, "invalid_request");

    let charge = |k: &str| serde_json::json!({"action": "caratzon_kit", "idempotency_key": k});
    let (status, body) = post(s, "/v1/charges", Some(key), charge("c1")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (&body["amount"], &body["state"]),
        (&100.into(), &"committed".into())
    );
    let (status, again) = post(s, "/v1/charges", Some(key), charge("c1")).await;
    assert_eq!(
        (status, &again["id"]),
        (201, &body["id"]),
        "a replay is the same charge"
    );
    let (status, _) = post(s, "/v1/charges", Some(key), charge("c2")).await;
    assert_eq!(status, 201);
    let (status, body) = post(s, "/v1/charges", Some(key), charge("c3")).await;
    assert_short(status, &body, 100, 0, 100);

    let topup = serde_json::json!({"pack": "small", "payment_ref": "inv-9"});
    for _ in 0..2 {
        let (status, body) = post(s, "/v1/topups", Some(key), topup.clone()).await;
        assert_eq!(status, 201, "{body}");
    }
    let (_, body) = get(s, "/v1/balance", Some(key)).await;
    assert_eq!(
        body["available"], 500,
        "one top-up per payment reference: {body}"
    );
    let (status, body) = get(s, "/v1/ledger?limit=2", Some(key)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entries"].as_array().map(Vec::len), Some(2), "{body}");
    let after = body["next_after"].as_i64().expect("more entries");
    let (_, body) = get(s, &format!("/v1/ledger?after={after}&limit=100"), Some(key)).await;
    assert!(body["next_after"].is_null(), "{body}");

    // Accounts are opened by admins only.
    let new = serde_json::json!({"email": "new@shop.test", "plan": "source"});
    let (status, body) = post(s, "/v1/accounts", Some(other_key), new.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert_error(&body, "forbidden");
    let (_, admin_key) = account(s, true).await;
    let (status, body) = post(s, "/v1/accounts", Some(&admin_key), new).await;
    assert_eq!(status, 201, "{body}");
    let fresh = body["api_key"]
        .as_str()
        .expect("api key shown once")
        .to_owned();
    let (status, body) = get(s, "/v1/balance", Some(&fresh)).await;
    assert_eq!((status, &body["available"]), (200, &1500.into()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_on_the_embedded_default() {
    let dir = kiln_e2e::Scratch::new();
    contract(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_on_postgres() {
    let pg = kiln_e2e::PgDb::new();
    contract(&pg.url).await;
}

/// 100 identical orders at once under one Idempotency-Key: one job, one hold, every caller given
/// that job. Then 200 orders at once, each its own, for 20 kits' worth of credits: exactly 20
/// accepted, every other a 402 with a correct body, and the ledger clean.
async fn races(database_url: &str) {
    let s = std::sync::Arc::new(serve(database_url).await);
    let spec = kiln_assets::sample::SPEC_JSON;
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(400), 85).expect("jpeg");

    let (_, key) = account(&s, false).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (s, key, jpeg) = (s.clone(), key.clone(), jpeg.clone());
        set.spawn(async move { post_kit(&s, &key, Some("same"), jpeg, spec, "essentials").await });
    }
    let answers = set.join_all().await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert!([200, 202].contains(status), "{status}: {body}");
            body["job"]["id"].as_str().expect("job id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one job for one key: {ids:?}");
    assert_eq!(
        answers.iter().filter(|(status, _)| *status == 202).count(),
        1,
        "one new order, the rest replays"
    );
    assert_eq!(held(&s, &key).await, (190, 10), "one reservation");

    let (_, key) = account(&s, false).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (s, key, jpeg) = (s.clone(), key.clone(), jpeg.clone());
        set.spawn(async move { post_kit(&s, &key, None, jpeg, spec, "essentials").await });
    }
    let answers = set.join_all().await;
    let accepted = answers.iter().filter(|(status, _)| *status == 202).count();
    assert_eq!(accepted, 20, "exactly twenty kits' worth");
    for (status, body) in answers.iter().filter(|(status, _)| *status != 202) {
        assert_short(*status, body, 10, 0, 10);
    }
    assert_eq!(held(&s, &key).await, (0, 200));
    let (_, page) = get(&s, "/v1/jobs?limit=200", Some(&key)).await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(20), "{page}");
    let mut tx = s.app.ledger().db().begin_read().await.expect("begin");
    let breaches = kiln_jobs::audit(&mut tx, None).await.expect("audit");
    assert!(breaches.is_empty(), "{breaches:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_orders_on_the_embedded_default() {
    let dir = kiln_e2e::Scratch::new();
    races(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_orders_on_postgres() {
    let pg = kiln_e2e::PgDb::new();
    races(&pg.url).await;
}

async fn put(s: &Served, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    send(s, reqwest::Method::PUT, path, key, Some(body)).await
}

/// Holds for tool calls, and the operator routes: who may touch what, once-only resolution,
/// 402 when short, the balance and journal after each step.
async fn holds_and_admin(database_url: &str) {
    let s = serve(database_url).await;
    let (id, key) = account(&s, false).await;
    let (_, other_key) = account(&s, false).await;
    let image = s
        .app
        .ledger()
        .pricing()
        .cost(kiln_core::Action::Image)
        .as_i64();
    let hold = |k: &str, action: &str, extra: Value| {
        let mut body = serde_json::json!({ "action": action, "idempotency_key": k });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        body
    };
    let (status, h) = post(
        &s,
        "/v1/holds",
        Some(&key),
        hold("h1", "image", Value::Null),
    )
    .await;
    assert_eq!(status, 201, "{h}");
    assert_eq!(
        (&h["status"], &h["amount"]),
        (&"held".into(), &image.into()),
        "{h}"
    );
    let hid = h["id"].as_str().expect("hold id").to_owned();
    let (status, again) = post(
        &s,
        "/v1/holds",
        Some(&key),
        hold("h1", "image", Value::Null),
    )
    .await;
    assert_eq!((status, &again["id"]), (200, &h["id"]), "a replay: {again}");
    let (status, body) = post(
        &s,
        "/v1/holds",
        Some(&key),
        hold("h1", "video", Value::Null),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "idempotency_conflict");
    assert_eq!(held(&s, &key).await, (200 - image, image));

    // Another account's hold does not exist for them; nor does a made-up one.
    for path in [
        format!("/v1/holds/{hid}"),
        "/v1/holds/not-a-hold".to_owned(),
    ] {
        let (status, body) = get(&s, &path, Some(&other_key)).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (status, _) = post(
        &s,
        &format!("/v1/holds/{hid}/capture"),
        Some(&other_key),
        Value::Null,
    )
    .await;
    assert_eq!(status, 404);

    let (status, c) = post(
        &s,
        &format!("/v1/holds/{hid}/capture"),
        Some(&key),
        Value::Null,
    )
    .await;
    assert_eq!((status, &c["status"]), (200, &"captured".into()), "{c}");
    let (status, again) = post(
        &s,
        &format!("/v1/holds/{hid}/capture"),
        Some(&key),
        Value::Null,
    )
    .await;
    assert_eq!(
        (status, &again["status"]),
        (200, &"captured".into()),
        "a no-op: {again}"
    );
    let (status, body) = post(
        &s,
        &format!("/v1/holds/{hid}/void"),
        Some(&key),
        Value::Null,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "hold_resolved");
    assert_eq!(held(&s, &key).await, (200 - image, 0));

    // Bad input: 422 naming the problem; short: 402 with the packs. Nothing held.
    for (body, code) in [
        (
            hold("h2", "image", serde_json::json!({ "expires_in_s": 0 })),
            "invalid_request",
        ),
        (hold("h2", "teleport", Value::Null), "invalid_request"),
        (serde_json::json!({ "action": "image" }), "invalid_request"),
    ] {
        let (status, b) = post(&s, "/v1/holds", Some(&key), body).await;
        assert_eq!(status, 422, "{b}");
        assert_error(&b, code);
    }
    for i in 0..2 {
        let (status, b) = post(
            &s,
            "/v1/holds",
            Some(&other_key),
            hold(&format!("big{i}"), "caratzon_kit", Value::Null),
        )
        .await;
        assert_eq!(status, 201, "{b}");
    }
    let (status, b) = post(
        &s,
        "/v1/holds",
        Some(&other_key),
        hold("big2", "caratzon_kit", Value::Null),
    )
    .await;
    assert_short(status, &b, 100, 0, 100);

    // Operator routes: 403 for members, 404 for no such account, then they work.
    let (_, admin_key) = account(&s, true).await;
    let plan = serde_json::json!({ "plan": "source" });
    let grant = serde_json::json!({ "credits": 50, "reference": "goodwill-1" });
    let plan_path = format!("/v1/admin/accounts/{id}/plan");
    let grant_path = format!("/v1/admin/accounts/{id}/grants");
    let (status, body) = put(&s, &plan_path, Some(&key), plan.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert_error(&body, "forbidden");
    let (status, _) = post(&s, &grant_path, Some(&key), grant.clone()).await;
    assert_eq!(status, 403);
    let nobody = kiln_core::AccountId::new();
    let (status, _) = post(
        &s,
        &format!("/v1/admin/accounts/{nobody}/grants"),
        Some(&admin_key),
        grant.clone(),
    )
    .await;
    assert_eq!(status, 404);
    let before = held(&s, &key).await.0;
    let (status, g) = post(&s, &grant_path, Some(&admin_key), grant.clone()).await;
    assert_eq!((status, &g["amount"]), (201, &50.into()), "{g}");
    let (status, g2) = post(&s, &grant_path, Some(&admin_key), grant).await;
    assert_eq!(
        (status, &g2["id"]),
        (201, &g["id"]),
        "idempotent by reference: {g2}"
    );
    let (status, body) = post(
        &s,
        &grant_path,
        Some(&admin_key),
        serde_json::json!({ "credits": 60, "reference": "goodwill-1" }),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(held(&s, &key).await.0, before + 50, "granted once");
    let (status, a) = put(&s, &plan_path, Some(&admin_key), plan).await;
    assert_eq!((status, &a["plan"]), (200, &"source".into()), "{a}");
    let source = s
        .app
        .ledger()
        .pricing()
        .plan(PlanId::Source)
        .monthly_credits
        .map_or(0, |c| c.as_i64());
    assert_eq!(
        held(&s, &key).await.0,
        before + 50 + source,
        "the new plan's allowance for this cycle"
    );
    let (status, body) = put(
        &s,
        &plan_path,
        Some(&admin_key),
        serde_json::json!({ "plan": "source", "monthly_allowance": 5 }),
    )
    .await;
    assert_eq!(status, 422, "only enterprise sets an allowance: {body}");

    let mut tx = s.app.ledger().db().begin_read().await.expect("begin");
    let breaches = kiln_jobs::audit(&mut tx, None).await.expect("audit");
    assert!(breaches.is_empty(), "{breaches:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_admin_on_the_embedded_default() {
    let dir = kiln_e2e::Scratch::new();
    holds_and_admin(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_admin_on_postgres() {
    let pg = kiln_e2e::PgDb::new();
    holds_and_admin(&pg.url).await;
}

/// A kit from order to files: the long-poll answers on each change until it succeeds, the
/// assets come with signed URLs that fetch exactly the bytes the manifest names (local store:
/// served by kiln, a tampered link refused; S3: presigned from s3s-fs); another account sees
/// none of it. A queued job's long-poll answers when it is cancelled.
async fn kit_to_files(database_url: &str) {
    let s = serve_with(database_url, true).await;
    let (_, key) = account(&s, false).await;
    let (_, other_key) = account(&s, false).await;
    let spec = kiln_assets::sample::SPEC_JSON;
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(700), 90).expect("jpeg");
    let (status, body) = post_kit(&s, &key, None, jpeg, spec, "essentials").await;
    assert_eq!(status, 202, "{body}");
    let id = body["job"]["id"].as_str().expect("id").to_owned();
    let mut last = body["job"].clone();
    let mut seen = vec![last["status"].as_str().unwrap_or_default().to_owned()];
    let mut answers = 0;
    while last["status"] != "succeeded" {
        assert!(answers < 100, "no end in sight: {last}");
        let (status, now) = get(&s, &format!("/v1/jobs/{id}?wait=30"), Some(&key)).await;
        assert_eq!(status, 200, "{now}");
        assert_ne!(now, last, "a long-poll answers with a change");
        assert!(
            !["failed", "cancelled"].contains(&now["status"].as_str().unwrap_or_default()),
            "{now}"
        );
        seen.push(now["status"].as_str().unwrap_or_default().to_owned());
        last = now;
        answers += 1;
    }
    assert!(seen.contains(&"running".to_owned()), "saw it run: {seen:?}");
    assert_eq!(
        last["progress"]["done"], last["progress"]["total"],
        "{last}"
    );
    // A finished job answers at once, wait or not.
    let (_, again) = get(&s, &format!("/v1/jobs/{id}?wait=30"), Some(&key)).await;
    assert_eq!(again, last);

    let (status, body) = get(&s, &format!("/v1/jobs/{id}/assets"), Some(&other_key)).await;
    assert_eq!(status, 404, "{body}");
    let (status, manifest) = get(&s, &format!("/v1/jobs/{id}/assets"), Some(&key)).await;
    assert_eq!(status, 200, "{manifest}");
    let assets = manifest["assets"].as_array().expect("assets");
    assert!(assets.len() >= 5, "{manifest}");
    let client = reqwest::Client::new();
    for a in assets {
        let url = a["url"].as_str().expect("url");
        let resp = client.get(url).send().await.expect("GET asset");
        assert_eq!(resp.status().as_u16(), 200, "{url}");
        let bytes = resp.bytes().await.expect("body");
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(a["sha256"], sha.as_str(), "{url}");
    }
    let first = assets[0]["url"].as_str().expect("url");
    if first.starts_with(&s.base) {
        let tampered = first.replace("signature=", "signature=00");
        let resp = client.get(&tampered).send().await.expect("GET");
        assert_eq!(resp.status().as_u16(), 403, "{tampered}");
        let other_key_path = first.replace("photos", "copy");
        let resp = client.get(&other_key_path).send().await.expect("GET");
        assert_eq!(
            resp.status().as_u16(),
            403,
            "a signature covers one key only"
        );
    }

    // Cancelled while someone waits: the waiter hears at once. The worker may take the job
    // first; then the waiter hears of that instead.
    let (_, big_key) = account(&s, false).await;
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(400), 85).expect("jpeg");
    let mut queued = None;
    for _ in 0..3 {
        let (status, body) = post_kit(&s, &big_key, None, jpeg.clone(), spec, "essentials").await;
        assert_eq!(status, 202, "{body}");
        queued = Some(body["job"]["id"].as_str().expect("id").to_owned());
    }
    let last_id = queued.expect("an order");
    let waiter = {
        let (base, key, id) = (s.base.clone(), big_key.clone(), last_id.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = reqwest::Client::new()
                .get(format!("{base}/v1/jobs/{id}?wait=50"))
                .bearer_auth(key)
                .send()
                .await
                .expect("GET");
            (started.elapsed(), resp.json::<Value>().await.expect("json"))
        })
    };
    kiln_e2e::wait_for_in_flight(&s.base, 1).await;
    let (status, body) = post(
        &s,
        &format!("/v1/jobs/{last_id}/cancel"),
        Some(&big_key),
        Value::Null,
    )
    .await;
    let (took, seen) = waiter.await.expect("waiter");
    if status == 200 {
        assert_eq!(seen["status"], "cancelled", "{seen}");
    } else {
        // The worker took it first: the waiter heard of that instead.
        assert_eq!(status, 409, "{body}");
        assert_ne!(seen["status"], "queued", "{seen}");
    }
    assert!(
        took < Duration::from_secs(45),
        "answered on the change, not at the deadline ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_to_files_on_the_embedded_default() {
    let dir = kiln_e2e::Scratch::new();
    kit_to_files(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kit_to_files_on_postgres_and_s3() {
    let pg = kiln_e2e::PgDb::new();
    kit_to_files(&pg.url).await;
}

/// The request body as the handlers pull it: every byte counted, and the largest chunk.
struct Counted {
    inner: axum::body::BodyDataStream,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    biggest: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl futures_core::Stream for Counted {
    type Item = Result<bytes::Bytes, axum::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::sync::atomic::Ordering::Relaxed;
        let polled = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.read.fetch_add(chunk.len(), Relaxed);
            self.biggest.fetch_max(chunk.len(), Relaxed);
        }
        polled
    }
}

/// An upload over the limit is refused (413, nothing charged) once the server has read at most
/// the limit plus the chunk that crossed it: never the rest of the body. Measured by counting
/// what the router pulls from the request body, over real HTTP, while the client sends 16 MB
/// more: once with a `Content-Length` and once chunked, with no length to go by. (Without this
/// test's counting wrapper, which hides the length, a `Content-Length` over the form's limit is
/// refused before a byte is read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_upload_is_refused_after_the_limit_and_one_chunk() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = kiln_e2e::Scratch::new();
    let s = serve(&format!("sqlite://{}/kiln.db", dir.0.display())).await;
    let (_, key) = account(&s, false).await;
    let (read, biggest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let cfg = kiln_api::ApiConfig {
        max_attempts: 3,
        submit_burst: 10,
        submit_per_minute: 10,
    };
    let api = kiln_api::Api::new(s.app.queue().clone(), s.app.storage().clone(), &cfg);
    let (r, b) = (read.clone(), biggest.clone());
    let router = kiln_api::router(api).layer(axum::middleware::map_request(
        move |req: axum::extract::Request| {
            let (r, b) = (r.clone(), b.clone());
            async move {
                let (parts, body) = req.into_parts();
                let counted = Counted {
                    inner: body.into_data_stream(),
                    read: r,
                    biggest: b,
                };
                axum::extract::Request::from_parts(parts, axum::body::Body::from_stream(counted))
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });

    // spec and kit first, then a design 16 MB over the limit (a JPEG's first bytes, then zeros).
    let boundary = "kiln-limit-boundary";
    let spec = r#"{"style_number": "A-1", "name": "Ring", "category": "ring"}"#;
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n{spec}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"kit\"\r\n\r\nessentials\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"design\"; filename=\"d.jpg\"\r\n\
         Content-Type: image/jpeg\r\n\r\n"
    )
    .into_bytes();
    let preamble = body.len();
    let (limit, over) = (kiln_api::MAX_DESIGN_BYTES, 16 * 1024 * 1024);
    body.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    body.resize(preamble + limit + over, 0);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let sent = body.len();
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let check = |how: &str, status: u16, answer: &str| {
        let (read, chunk) = (read.swap(0, Relaxed), biggest.swap(0, Relaxed));
        eprintln!(
            "{how}: sent {sent} bytes; the server read {read} (design limit {limit} after a \
             {preamble}-byte preamble), largest chunk {chunk}"
        );
        assert_eq!(status, 413, "{how}: {answer}");
        assert!(answer.contains("upload_too_large"), "{how}: {answer}");
        assert!(
            read <= preamble + limit + chunk,
            "{how}: read {read} bytes, more than the limit plus one chunk of {chunk}"
        );
        assert!(read < sent - over / 2, "{how}: read {read} of {sent}");
    };

    // With a Content-Length over the form's limit.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/kits"))
        .bearer_auth(&key)
        .header("content-type", &content_type)
        .body(body.clone())
        .send()
        .await
        .expect("the 413 arrives while the body is still being sent");
    let status = resp.status().as_u16();
    check("content-length", status, &resp.text().await.expect("body"));

    // Chunked: no length, so the design's limit is met while reading it. The answer is read
    // while the body is still being written; writing stops once the server hangs up.
    let conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = conn.into_split();
    let answer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = rd.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    });
    let head = format!(
        "POST /v1/kits HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let write = async {
        wr.write_all(head.as_bytes()).await?;
        for piece in body.chunks(64 * 1024) {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            wr.write_all(&framed).await?;
        }
        wr.write_all(b"0\r\n\r\n").await
    };
    let _ = tokio::time::timeout(Duration::from_secs(120), write)
        .await
        .expect("the server neither read the body nor hung up");
    let answer = answer.await.expect("reader");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    check("chunked", status, &answer);

    let (status, balance) = get(&s, "/v1/balance", Some(&key)).await;
    assert_eq!(status, 200);
    assert_eq!(balance["held"], 0, "nothing held: {balance}");
}
