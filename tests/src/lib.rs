//! Helpers for kiln's end-to-end tests: find the built `kiln` binary, give each test its own
//! database (a SQLite file, or a fresh PostgreSQL database), and run commands against it.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `kiln` binary built by the same `cargo test` / `cargo nextest` run (`KILN_BIN` overrides).
pub fn kiln_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kiln
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = profile_dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (make test does)",
        bin.display()
    );
    bin
}

/// The PostgreSQL server the tests use (`make test` starts it).
pub fn pg_admin_url() -> String {
    std::env::var("KILN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "kiln-e2e-{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `psql` against the admin database (for creating and dropping test databases).
pub fn psql(sql: &str) -> Output {
    Command::new("psql")
        .arg(pg_admin_url())
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql runs (make test installs the PostgreSQL client)")
}

/// A PostgreSQL database for one test, dropped with it.
#[derive(Debug)]
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
    pub fn new() -> PgDb {
        let name = format!(
            "kiln_e2e_{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        );
        let out = psql(&format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let admin = pg_admin_url();
        let root = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(r, _)| r)
            .to_owned();
        PgDb {
            url: format!("{root}/{name}"),
            name,
        }
    }
}

impl Default for PgDb {
    fn default() -> Self {
        PgDb::new()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `kiln` with the given database and arguments, from `cwd`.
pub fn kiln(database_url: Option<&str>, cwd: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(kiln_bin());
    cmd.current_dir(cwd)
        .args(args)
        .env_remove("KILN_CONFIG")
        .env("RUST_LOG", "warn");
    match database_url {
        Some(url) => cmd.env("KILN_DATABASE_URL", url),
        None => cmd.env_remove("KILN_DATABASE_URL"),
    };
    cmd.output().expect("kiln runs")
}

/// stdout of a command that must succeed.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
