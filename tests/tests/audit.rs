//! The audit as a mutation test (issue 12, defect 2): a real database and bucket with real kits,
//! then each tampering an outside review found the audit blind to. Every one must make
//! `kiln audit` (or `kiln audit --storage`) exit 1 and name the breach; the untouched state
//! must be clean. Each database tampering is made to pass the checks the audit had before (the
//! counts, the last journal entry, the sums), so only the new checks can catch it.

use std::path::Path;

use kiln_e2e::{PgDb, Scratch, kiln_cmd, ok, psql, psql_on};

/// `kiln audit [args]` against `db`: (exit code, stdout).
fn audit(db: &str, storage: &Path, args: &[&str]) -> (i32, String) {
    let out = kiln_cmd(db, storage)
        .arg("audit")
        .args(args)
        .output()
        .expect("kiln audit");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// A copy of the base database, tampered with by `sql` in one transaction; dropped after.
struct Tampered {
    name: String,
    url: String,
}

impl Tampered {
    fn new(base: &PgDb, tag: &str, sql: &str) -> Tampered {
        let name = format!("{}_{tag}", base.name);
        ok(&psql(&format!(
            "CREATE DATABASE {name} TEMPLATE {}",
            base.name
        )));
        let url = base.url.replace(&base.name, &name);
        psql_on(&url, &format!("BEGIN; {sql}; COMMIT"));
        Tampered { name, url }
    }
}

impl Drop for Tampered {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

#[test]
fn every_tampering_makes_the_audit_fail_naming_the_breach() {
    let pg = PgDb::new();
    let dir = Scratch::new();
    let storage = dir.0.join("objects");
    kiln_e2e::migrate(&pg.url, &storage);
    // Real kits: one of each, made by the demo's worker on this database and bucket.
    ok(&kiln_cmd(&pg.url, &storage)
        .arg("demo")
        .output()
        .expect("kiln demo"));
    // A subscriber: its first cycle's grant is made when the account opens.
    ok(&kiln_cmd(&pg.url, &storage)
        .args(["accounts", "create", "--plan", "source"])
        .output()
        .expect("create a subscriber"));
    let (code, said) = audit(&pg.url, &storage, &["--storage"]);
    assert_eq!(code, 0, "the untouched state is clean: {said}");
    assert!(said.contains("clean"), "{said}");

    let essentials = psql_on(
        &pg.url,
        "SELECT id || ' ' || account_id || ' ' || reservation_id || ' ' || manifest_key \
         FROM kit_jobs WHERE kit = 'essentials' AND status = 'succeeded'",
    );
    let [job, account, reservation, manifest]: [&str; 4] = essentials
        .split(' ')
        .collect::<Vec<_>>()
        .try_into()
        .expect("one succeeded Essentials kit");
    let subscriber = psql_on(
        &pg.url,
        "SELECT account_id FROM grants WHERE kind = 'subscription'",
    );
    assert!(
        !subscriber.is_empty(),
        "the subscriber has its cycle's grant"
    );

    // Each: a name, the tampering (SQL on a copy of the database), what the audit must say.
    let cases: [(&str, String, &str); 5] = [
        (
            // The last commit of the kit's reservation again, at the next sequence number,
            // with the balances the account already shows: the count and the last entry agree.
            "resolved_twice",
            format!(
                "INSERT INTO journal (account_id, seq, at_ms, entry, amount, reservation_id, action, \
                 list_price, available_after, held_after) \
                 SELECT j.account_id, a.journal_seq + 1, j.at_ms, j.entry, j.amount, j.reservation_id, \
                 j.action, j.list_price, a.granted - a.held - a.committed - a.expired, a.held \
                 FROM journal j JOIN accounts a ON a.id = j.account_id \
                 WHERE j.reservation_id = {reservation} AND j.entry = 'commit'; \
                 UPDATE accounts SET journal_seq = journal_seq + 1 WHERE id = '{account}'"
            ),
            "which was not held then",
        ),
        (
            "succeeded_without_manifest",
            format!("UPDATE kit_jobs SET manifest_key = NULL WHERE id = '{job}'"),
            "succeeded with no manifest",
        ),
        (
            "essentials_billed_as_caratzon",
            format!("UPDATE reservations SET action = 'caratzon_kit' WHERE id = {reservation}"),
            "a kit of essentials billed as caratzon_kit",
        ),
        (
            "cost_disagrees",
            format!("UPDATE kit_jobs SET cost = 100 WHERE id = '{job}'"),
            "costs 100 but its reservation's list price is 10",
        ),
        (
            // A second grant for the same cycle under another source, booked consistently:
            // the account's totals, the grant sums and the journal all agree with it.
            "two_grants_for_one_cycle",
            format!(
                "INSERT INTO grants (account_id, kind, amount, remaining, granted_at_ms, \
                 expires_at_ms, source, fingerprint) \
                 SELECT account_id, kind, amount, amount, granted_at_ms, expires_at_ms, \
                 source || ':again', fingerprint || ':again' FROM grants \
                 WHERE account_id = '{subscriber}' AND kind = 'subscription'; \
                 UPDATE accounts a SET granted = a.granted + g.amount, journal_seq = a.journal_seq + 1 \
                 FROM grants g WHERE g.source LIKE '%:again' AND a.id = g.account_id; \
                 INSERT INTO journal (account_id, seq, at_ms, entry, amount, kind, grant_id, reference, \
                 available_after, held_after) \
                 SELECT a.id, a.journal_seq, g.granted_at_ms, 'grant', g.amount, g.kind, g.id, g.source, \
                 a.granted - a.held - a.committed - a.expired, a.held \
                 FROM accounts a JOIN grants g ON g.account_id = a.id AND g.source LIKE '%:again'"
            ),
            "2 subscription grants for the one cycle",
        ),
    ];
    for (name, sql, says) in &cases {
        let t = Tampered::new(&pg, name, sql);
        let (code, said) = audit(&t.url, &storage, &[]);
        println!("{name}: exit {code}\n{said}");
        assert_eq!(code, 1, "{name}: the audit must fail: {said}");
        assert!(said.contains(says), "{name}: must say {says:?}: {said}");
    }

    // Storage tamperings, each undone before the next: a file of the kit changed, a file gone,
    // the manifest gone.
    let manifest_path = storage.join(manifest);
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("JSON");
    let first = listed["assets"][0]["key"]
        .as_str()
        .expect("a file in the kit");
    let file = storage.join(first);
    let name = first.to_owned();
    let kept = std::fs::read(&file).expect("read");
    let mut changed = kept.clone();
    let last = changed.len() - 3;
    changed[last] ^= 0x5a;
    let kept_manifest = std::fs::read(&manifest_path).expect("read manifest");
    type Tamper<'a> = Box<dyn Fn() + 'a>;
    let storage_cases: [(&str, Tamper, &str); 3] = [
        (
            "a_file_changed",
            Box::new(|| std::fs::write(&file, &changed).expect("write")),
            "the manifest says",
        ),
        (
            "a_file_gone",
            Box::new(|| std::fs::remove_file(&file).expect("remove")),
            "is missing from storage",
        ),
        (
            "the_manifest_gone",
            Box::new(|| std::fs::remove_file(&manifest_path).expect("remove")),
            "manifest.json is missing from storage",
        ),
    ];
    for (case, tamper, says) in &storage_cases {
        tamper();
        let (code, said) = audit(&pg.url, &storage, &["--storage"]);
        println!("{case}: exit {code}\n{said}");
        assert_eq!(code, 1, "{case}: the storage audit must fail: {said}");
        assert!(said.contains(says), "{case}: must say {says:?}: {said}");
        if *case != "the_manifest_gone" {
            assert!(said.contains(&name), "{case}: must name {name}: {said}");
        }
        // Without --storage the database alone is clean: the objects are not its business.
        assert_eq!(audit(&pg.url, &storage, &[]).0, 0, "{case}");
        std::fs::write(&file, &kept).expect("restore");
        std::fs::write(&manifest_path, &kept_manifest).expect("restore manifest");
    }
    assert_eq!(audit(&pg.url, &storage, &["--storage"]).0, 0, "restored");
}
