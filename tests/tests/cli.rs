//! The `kiln` binary driven from a shell, as an operator would, on SQLite and PostgreSQL.

use kiln_e2e::{PgDb, Scratch, kiln, ok};
use serde_json::Value;

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).expect("JSON output")
}

/// Open an account, top it up twice with the same payment reference, read balance and ledger.
fn ledger_from_the_shell(url: Option<&str>, cwd: &std::path::Path) {
    ok(&kiln(url, cwd, &["migrate"]));
    let created = json(&kiln(
        url,
        cwd,
        &[
            "--json", "accounts", "create", "--plan", "discover", "--email", "a@b.co",
        ],
    ));
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(
        created["api_key"]
            .as_str()
            .expect("api key")
            .starts_with("kiln_")
    );

    let text = ok(&kiln(url, cwd, &["accounts", "balance", &id]));
    assert!(text.contains("available  200"), "{text}");
    for _ in 0..2 {
        ok(&kiln(
            url,
            cwd,
            &["topup", &id, "--pack", "small", "--payment-ref", "inv-42"],
        ));
    }
    let bal = json(&kiln(url, cwd, &["--json", "accounts", "balance", &id]));
    assert_eq!(
        bal["available"], 700,
        "one top-up for one payment reference: {bal}"
    );
    assert_eq!(bal["by_kind"][0]["kind"], "welcome");
    assert_eq!(bal["by_kind"][1]["kind"], "topup");

    let journal = json(&kiln(url, cwd, &["--json", "accounts", "ledger", &id]));
    let entries = journal["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{journal}");
    assert_eq!(entries[1]["reference"], "topup:inv-42");

    let show = ok(&kiln(url, cwd, &["accounts", "show", &id]));
    assert!(
        show.contains("discover") && show.contains("a@b.co"),
        "{show}"
    );
    assert!(ok(&kiln(url, cwd, &["audit"])).contains("clean"));
}

/// Bad input: a clear message on stderr, a failing exit code, and nothing changed.
fn refusals(url: Option<&str>, cwd: &std::path::Path) {
    let created = json(&kiln(
        url,
        cwd,
        &["--json", "accounts", "create", "--plan", "source"],
    ));
    let id = created["id"].as_str().expect("id").to_owned();
    let cases: &[(&[&str], &str)] = &[
        (&["accounts", "create", "--plan", "gold"], "unknown plan"),
        (
            &["accounts", "create", "--plan", "enterprise"],
            "needs a monthly allowance",
        ),
        (
            &[
                "accounts",
                "create",
                "--plan",
                "enterprise",
                "--allowance",
                "-5",
            ],
            "negative",
        ),
        (
            &[
                "accounts",
                "create",
                "--plan",
                "enterprise",
                "--allowance",
                "0",
            ],
            "positive",
        ),
        (
            &[
                "accounts",
                "create",
                "--plan",
                "enterprise",
                "--allowance",
                "99999999999999999999999",
            ],
            "exceeds",
        ),
        (
            &["topup", &id, "--pack", "jumbo", "--payment-ref", "x"],
            "unknown top-up pack",
        ),
        (
            &[
                "topup",
                "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                "--pack",
                "small",
                "--payment-ref",
                "x",
            ],
            "not found",
        ),
        (
            &["accounts", "balance", "not-an-id"],
            "not a valid account id",
        ),
    ];
    for (args, expect) in cases {
        let out = kiln(url, cwd, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in {stderr}"
        );
    }
    let bal = json(&kiln(url, cwd, &["--json", "accounts", "balance", &id]));
    assert_eq!(bal["available"], 1500);
    assert!(ok(&kiln(url, cwd, &["audit"])).contains("clean"));
}

#[test]
fn sqlite_default_database_under_kiln_data() {
    let dir = Scratch::new();
    ledger_from_the_shell(None, &dir.0);
    assert!(
        dir.0.join("kiln-data/kiln.db").exists(),
        "the embedded default lives in ./kiln-data"
    );
    refusals(None, &dir.0);
}

#[test]
fn postgres_database() {
    let dir = Scratch::new();
    let db = PgDb::new();
    ledger_from_the_shell(Some(&db.url), &dir.0);
    refusals(Some(&db.url), &dir.0);
}

#[test]
fn bad_configuration_is_refused_at_start() {
    let dir = Scratch::new();
    let out = kiln(Some("mysql://nope"), &dir.0, &["migrate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database URL must start with"));
    let cfg = dir.0.join("kiln.toml");
    std::fs::write(
        &cfg,
        "[[pricing.packs]]\nid = \"cheap\"\ncredits = 10000\nprice_cents = 100\n",
    )
    .expect("write");
    let out = kiln(
        None,
        &dir.0,
        &["--config", cfg.to_str().expect("utf-8 path"), "migrate"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("subscribing must always be the best deal"),
        "{stderr}"
    );
}

/// Every command but `migrate` and `demo` refuses a database nobody migrated, with one line
/// saying what to do, and leaves it as it was: no table, no file.
#[test]
fn commands_refuse_an_unmigrated_database_and_change_nothing() {
    let dir = Scratch::new();
    let pg = PgDb::new();
    let sqlite = format!("sqlite://{}/fresh/kiln.db", dir.0.display());
    for url in [pg.url.as_str(), sqlite.as_str()] {
        for args in [
            &["status"][..],
            &["audit"],
            &["accounts", "show", "01J0000000000000000000000A"],
        ] {
            let out = kiln(Some(url), &dir.0, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} on {url}: {stderr}");
            assert!(
                stderr.contains("run `kiln migrate`"),
                "{args:?} on {url}: {stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        }
    }
    let tables = kiln_e2e::psql_on(
        &pg.url,
        "SELECT COUNT(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')",
    );
    assert_eq!(tables, "0", "no table, index or sequence was created");
    let extensions = kiln_e2e::psql_on(
        &pg.url,
        "SELECT COUNT(*) FROM pg_extension WHERE extname = 'hstore'",
    );
    assert_eq!(extensions, "0");
    assert!(
        !dir.0.join("fresh").exists(),
        "no SQLite file (or its directory) was created"
    );
    // After `kiln migrate` the same commands work.
    for url in [pg.url.as_str(), sqlite.as_str()] {
        ok(&kiln(Some(url), &dir.0, &["migrate"]));
        assert!(ok(&kiln(Some(url), &dir.0, &["audit"])).contains("clean"));
        ok(&kiln(Some(url), &dir.0, &["status"]));
    }
}

/// A cut-out model file that is missing or broken stops `kiln work` at start-up, naming its
/// path, before any paid kit could fail on it.
#[test]
fn a_bad_cutout_model_stops_the_worker_at_start_naming_its_path() {
    let dir = Scratch::new();
    let db = format!("sqlite://{}", dir.0.join("kiln.db").display());
    let storage = dir.0.join("objects");
    kiln_e2e::migrate(&db, &storage);
    let broken = dir.0.join("broken-u2netp.onnx");
    std::fs::write(&broken, b"not an onnx model").expect("write");
    for path in [dir.0.join("missing-u2netp.onnx"), broken] {
        let out = kiln_e2e::kiln_cmd(&db, &storage)
            .env("KILN_CUTOUT_MODEL", &path)
            .args(["work", "--queues", "essentials"])
            .output()
            .expect("kiln runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {}", path.display());
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("cut-out model"),
            "{stderr}"
        );
    }
}
