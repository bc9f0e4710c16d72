//! `/v1/openapi.json` against the server it describes. schemathesis (PyPI, installed by
//! `scripts/ensure-schemathesis.sh`) generates requests from the document — examples, boundary
//! values, random data, chains of calls — and sends them to a real `kiln serve`, on SQLite and
//! on PostgreSQL, as a member and as an admin: no answer may be a 5xx, carry a status the
//! document does not list for it, or have a body that breaks the schema it declares.
//!
//! Bounded: `KILN_ST_EXAMPLES` examples per operation and phase (default 25). The seed is random
//! unless `KILN_ST_SEED` fixes it, and printed; a failure prints schemathesis's report with a
//! `curl` line per failing request.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_e2e::{PgDb, Scratch, ServeProcess, kiln_cmd, migrate, ok};

/// schemathesis's `st`, installed when missing (the script prints its path).
fn schemathesis() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-schemathesis.sh");
    let out = Command::new(&script)
        .output()
        .expect("run ensure-schemathesis.sh");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("path").trim())
}

fn account(db: &str, storage: &Path, args: &[&str]) -> String {
    let out = ok(&kiln_cmd(db, storage)
        .args(["--json", "accounts", "create"])
        .args(args)
        .output()
        .expect("kiln accounts create"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("account JSON");
    v["api_key"].as_str().expect("api key").to_owned()
}

fn seed() -> u64 {
    std::env::var("KILN_ST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(1..1_000_000))
}

async fn document(base: &str) -> serde_json::Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::get(format!("{base}/v1/openapi.json"))
        .await
        .expect("GET /v1/openapi.json")
        .json()
        .await
        .expect("the document is JSON")
}

/// Every row of DESIGN.md §6 is in the document, with the methods the contract names.
fn assert_contract_rows(doc: &serde_json::Value) {
    let rows = [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/v1/prices", "get"),
        ("/v1/accounts", "post"),
        ("/v1/account", "get"),
        ("/v1/balance", "get"),
        ("/v1/ledger", "get"),
        ("/v1/quotes", "post"),
        ("/v1/charges", "post"),
        ("/v1/topups", "post"),
        ("/v1/holds", "post"),
        ("/v1/holds/{id}", "get"),
        ("/v1/holds/{id}/capture", "post"),
        ("/v1/holds/{id}/void", "post"),
        ("/v1/kits", "post"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/jobs/{id}/assets", "get"),
        ("/v1/admin/accounts/{id}/plan", "put"),
        ("/v1/admin/accounts/{id}/grants", "post"),
    ];
    for (path, method) in rows {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} documents no responses"
        );
    }
    let kits = &doc["paths"]["/v1/kits"]["post"]["responses"];
    for status in ["202", "402", "413", "415", "422", "429"] {
        assert!(kits[status].is_object(), "POST /v1/kits lacks {status}");
    }
}

fn run(st: &Path, base: &str, key: &str, seed: u64, reports: &Path) {
    let examples = std::env::var("KILN_ST_EXAMPLES").unwrap_or_else(|_| "25".into());
    let out = Command::new(st)
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", &examples])
        .args(["--seed", &seed.to_string()])
        .args(["--workers", "1", "--request-timeout", "30"])
        .args(["--report", "junit", "--report-dir"])
        .arg(reports)
        .env("NO_COLOR", "1")
        // Its cache (`.schemathesis/`) goes to the scratch directory, not the checkout.
        .current_dir(reports.parent().expect("the reports' parent"))
        .output()
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("passed") || l.contains("Seed"))
        .collect();
    eprintln!("schemathesis on {base}: {}", summary.join(" | "));
    // The report's failures section onwards: a curl line per failing request.
    let report = text
        .find("FAILURES")
        .or_else(|| text.find("ERRORS"))
        .unwrap_or(0);
    let report: String = text[report..].chars().take(20_000).collect();
    assert!(
        out.status.success(),
        "schemathesis found problems (seed {seed}; replay with KILN_ST_SEED={seed}):\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn fuzz(db: &str, storage: &Path, dir: &Path, label: &str) {
    migrate(db, storage);
    let member = account(db, storage, &["--plan", "atelier"]);
    let admin = account(db, storage, &["--plan", "atelier", "--admin"]);
    let serve = ServeProcess::start(
        &mut kiln_cmd(db, storage),
        &dir.join(format!("serve-{label}.log")),
        &["--no-work"],
    );
    assert_contract_rows(&document(&serve.base).await);
    let st = schemathesis();
    let seed = seed();
    eprintln!("schemathesis seed ({label}): {seed}");
    for (who, key) in [("member", &member), ("admin", &admin)] {
        run(
            &st,
            &serve.base,
            key,
            seed,
            &dir.join(format!("{label}-{who}")),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_holds_for_generated_requests_on_sqlite() {
    kiln_e2e::init_test_log();
    let dir = Scratch::new();
    let db = format!("sqlite://{}/kiln.db", dir.0.display());
    fuzz(&db, &dir.0.join("objects"), &dir.0, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_holds_for_generated_requests_on_postgres() {
    kiln_e2e::init_test_log();
    let pg = PgDb::new();
    let dir = Scratch::new();
    fuzz(&pg.url, &dir.0.join("objects"), &dir.0, "postgres").await;
}
