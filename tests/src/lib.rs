//! Helpers for kiln's end-to-end tests: find the built `kiln` binary, give each test its own
//! database (a SQLite file, or a fresh PostgreSQL database), and run commands against it.

pub mod webdriver;

use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

pub use kiln_ledger::testing::init_test_log;

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
        if std::thread::panicking() {
            // A failing test keeps its logs and files to be read.
            eprintln!("kept the failed test's scratch dir: {}", self.0.display());
            return;
        }
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

/// A PostgreSQL database for one test, dropped with it: the workspace's one test-database
/// helper (`kiln_ledger::testing::TestDb`), empty, for tests that drive the `kiln` binary.
#[derive(Debug)]
pub struct PgDb {
    pub name: String,
    pub url: String,
    _db: kiln_ledger::testing::TestDb,
}

impl PgDb {
    pub fn new() -> PgDb {
        // On a thread of its own: callers may or may not be inside a runtime already.
        let db = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let t = kiln_ledger::testing::TestDb::unmigrated(kiln_ledger::Backend::Postgres, 1)
                    .await;
                t.db.close().await;
                t
            })
        })
        .join()
        .expect("create the test database");
        PgDb {
            name: db.url.rsplit('/').next().unwrap_or_default().to_owned(),
            url: db.url.clone(),
            _db: db,
        }
    }
}

impl Default for PgDb {
    fn default() -> Self {
        PgDb::new()
    }
}

/// Runs `kiln` with the given database and arguments, from `cwd`.
pub fn kiln(database_url: Option<&str>, cwd: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(kiln_bin());
    cmd.current_dir(cwd)
        .args(args)
        .env_remove("KILN_CONFIG")
        .env("RUST_LOG", test_log_filter());
    match database_url {
        Some(url) => cmd.env("KILN_DATABASE_URL", url),
        None => cmd.env_remove("KILN_DATABASE_URL"),
    };
    cmd.output().expect("kiln runs")
}

/// The log filter for spawned `kiln` processes: `TEST_LOG`'s, else warnings.
fn test_log_filter() -> String {
    kiln_ledger::testing::test_log_filter().unwrap_or_else(|| "warn".to_owned())
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

/// `kiln` against a test's database and storage, tuned for fast failure detection: 300 ms
/// heartbeats, a 1.5 s lease, maintenance every 500 ms, 100 ms first retry (at most 2 s), 12 attempts.
pub fn kiln_cmd(db: &str, storage: &Path) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.env_remove("KILN_CONFIG")
        .env("KILN_DATABASE_URL", db)
        .env("KILN_STORAGE", storage)
        .env("KILN_SIGNING_SECRET", "crash-test-signing-secret")
        .env("KILN_HEARTBEAT_MS", "300")
        // 3 s (whole seconds) before a silent worker loses its kits: a loaded machine can stall a
        // heartbeat for a second, and a live worker must not count as dead.
        .env("KILN_MISSED_HEARTBEATS", "10")
        .env("KILN_MAINTENANCE_MS", "500")
        .env("KILN_LEASE_MS", "1500")
        .env("KILN_RETRY_BASE_MS", "100")
        .env("KILN_RETRY_MAX_MS", "2000")
        .env("KILN_MAX_ATTEMPTS", "12")
        .env("RUST_LOG", test_log_filter());
    cmd
}

/// `kiln migrate` on a test's database: every other command refuses an unmigrated one.
pub fn migrate(db: &str, storage: &Path) {
    ok(&kiln_cmd(db, storage)
        .arg("migrate")
        .output()
        .expect("kiln migrate"));
}

/// `kiln work --concurrency 2 --grace-secs 5`, stderr appended to `log`.
pub fn start_worker(db: &str, storage: &Path, log: &Path) -> Child {
    start_worker_with(
        db,
        storage,
        log,
        &["--concurrency", "2", "--grace-secs", "5"],
    )
}

/// `kiln work <args>`, stderr appended to `log`.
pub fn start_worker_with(db: &str, storage: &Path, log: &Path, args: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("worker log");
    kiln_cmd(db, storage)
        .arg("work")
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kiln work")
}

pub fn psql_on(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(db)
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql");
    ok(&out).trim().to_owned()
}

/// Jobs matching `filter`.
pub fn count(db: &str, filter: &str) -> u32 {
    psql_on(db, &format!("SELECT COUNT(*) FROM kit_jobs WHERE {filter}"))
        .parse()
        .expect("count")
}

/// How many `commit` entries the journal holds for each job's reservation.
pub fn commits_per_job(db: &str) -> std::collections::HashMap<String, u32> {
    psql_on(
        db,
        "SELECT j.id || ' ' || COUNT(e.seq) FROM kit_jobs j LEFT JOIN journal e \
         ON e.reservation_id = j.reservation_id AND e.entry = 'commit' GROUP BY j.id",
    )
    .lines()
    .map(|l| {
        let (id, n) = l.split_once(' ').expect("row");
        (id.to_owned(), n.parse().expect("count"))
    })
    .collect()
}

pub fn open_jobs(db: &str) -> u32 {
    count(db, "status IN ('queued', 'running')")
}

/// Credentials of the S3 test servers.
pub const S3_ACCESS_KEY: &str = "kiln-test-access";
pub const S3_SECRET_KEY: &str = "kiln-test-secret-key-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KILN_S3S_FS") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/s3s-fs");
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join("s3s-fs"))
        .find(|p| p.exists());
    let bin = on_path.unwrap_or(home);
    assert!(
        bin.exists(),
        "s3s-fs is not installed: run `make test` (scripts/ensure-s3s.sh installs it)"
    );
    bin
}

/// An s3s-fs process (a real S3-protocol server that checks SigV4) serving a scratch directory
/// with a `kiln-test` bucket, behind a port this process holds for the server's whole life;
/// killed on drop. `stop` and `start_again` simulate an outage: while it is down, every
/// connection is cut (open ones at once, new ones as they arrive), and none reaches s3s-fs.
///
/// The outage used to stop s3s-fs itself and start it again on the same port. While it was
/// down the port was free, and anything else on the machine could take it — another test's
/// server, or the local end of an outgoing connection, which also made the new s3s-fs fail to
/// bind — and the wait for the port then found the wrong listener: the worker kept talking to
/// something that was not its S3, and the storage-outage test timed out. Holding the port
/// closes that gap.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub dir: Scratch,
    gate: std::sync::Arc<Gate>,
    port: u16,
}

/// What the front port does with connections: forward them to s3s-fs, or cut them.
#[derive(Debug, Default)]
struct Gate {
    down: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    /// Both ends of every forwarded connection still open, by connection.
    open: std::sync::Mutex<std::collections::HashMap<u64, [std::net::TcpStream; 2]>>,
}

impl Gate {
    fn cut_all(&self) {
        for (_, ends) in self.open.lock().expect("open").drain() {
            for e in ends {
                let _ = e.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Accepts on `front` until the gate closes, forwarding each connection to `backend` while
/// the gate is up and dropping it at once while it is down.
fn serve_front(front: &TcpListener, backend: u16, gate: &std::sync::Arc<Gate>) {
    use std::sync::atomic::Ordering;
    for (n, conn) in (0u64..).zip(front.incoming()) {
        if gate.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if gate.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", backend)) else {
            continue;
        };
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        gate.open.lock().expect("open").insert(n, [c3, s3]);
        for (mut from, mut to) in [(client, server), (s2, c2)] {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
                let _ = from.shutdown(std::net::Shutdown::Read);
                gate.open.lock().expect("open").remove(&n);
            });
        }
    }
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = Scratch::new();
        std::fs::create_dir_all(dir.0.join("kiln-test")).expect("bucket dir");
        let (child, backend) = start_s3s_fs(&dir.0);
        let front = TcpListener::bind("127.0.0.1:0").expect("front port");
        let port = front.local_addr().expect("front address").port();
        let gate = std::sync::Arc::new(Gate::default());
        let g = gate.clone();
        std::thread::spawn(move || serve_front(&front, backend, &g));
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            dir,
            gate,
            port,
        }
    }

    /// Ends the outage: connections reach s3s-fs again.
    pub fn start_again(&mut self) {
        self.gate
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts an outage: open connections are cut, new ones are dropped as they arrive.
    pub fn stop(&mut self) {
        self.gate
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.gate.cut_all();
    }

    /// The front port, held by this process for the server's whole life.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// s3s-fs serving `dir` on a free port, listening when returned. A port taken between
/// choosing it and s3s-fs binding it makes s3s-fs exit: then another port is tried.
fn start_s3s_fs(dir: &Path) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().expect("s3s-fs status").is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Listening, and it is ours: it did not exit for want of the port.
                if child.try_wait().expect("s3s-fs status").is_none() {
                    return (child, port);
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {port} within 10 s"
            );
            std::thread::yield_now();
        }
    }
    panic!("s3s-fs exited at start five times (is its port taken, or the binary broken?)");
}

impl Drop for S3Server {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.gate.closed.store(true, Ordering::SeqCst);
        self.gate.cut_all();
        // Wakes the accept loop so that it sees the gate closed and lets go of the port.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Until something listens on 127.0.0.1:`port` (at most 20 s).
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kiln serve <args>` on a free port of 127.0.0.1, stderr to `log`, listening when returned;
/// killed on drop.
#[derive(Debug)]
pub struct ServeProcess {
    child: Child,
    pub base: String,
}

impl ServeProcess {
    pub fn start(cmd: &mut Command, log: &Path, args: &[&str]) -> ServeProcess {
        let port = free_port();
        let log = std::fs::File::create(log).expect("serve log");
        let child = cmd
            .arg("serve")
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("kiln serve");
        wait_for_port(port, "kiln serve");
        ServeProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kiln --json accounts create --plan discover`: (account id, API key).
pub fn create_account(db: &str, storage: &Path) -> (String, String) {
    let out = ok(&kiln_cmd(db, storage)
        .args(["--json", "accounts", "create", "--plan", "discover"])
        .output()
        .expect("kiln accounts create"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("account JSON");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["api_key"].as_str().expect("api key").to_owned(),
    )
}

/// Until a `kiln serve` at `base` is serving more than `n` requests besides the scrape itself
/// (e.g. a long-poll waiting), read from its `/metrics`.
pub async fn wait_for_in_flight(base: &str, n: u64) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        let in_flight: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("kiln_http_requests_in_flight "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the in-flight gauge");
        if in_flight > n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} requests never in flight");
        tokio::task::yield_now().await;
    }
}

/// `GET /metrics` at `addr` (`127.0.0.1:port`), as a Prometheus server scrapes it: each sample
/// line (`name{labels}`) and its value. Plain HTTP/1.0 over a socket, so sync tests can scrape.
pub fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The environment variable `name` parsed, or `default` when unset or unparsable (the long
/// runs' knobs: `CHAOS_*`, `SOAK_*`).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The nearest-rank percentile `p` (0 to 1) of `sorted`: the smallest value with at least `p` of
/// the samples at or below it; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = sorted
        .iter()
        .enumerate()
        .position(|(i, _)| (i + 1) as f64 >= p * sorted.len() as f64)
        .unwrap_or(sorted.len() - 1);
    sorted[rank]
}

/// The bundled sample ring as a JPEG design (`side` px, JPEG `quality`) and its spec, written
/// into `dir` as a customer would have them: (design path, spec path).
pub fn sample_order_files(dir: &Path, side: u32, quality: u8) -> (PathBuf, PathBuf) {
    let design = dir.join("design.jpg");
    let spec = dir.join("spec.json");
    std::fs::write(
        &design,
        kiln_assets::encode_jpeg(&kiln_assets::sample::ring(side), quality).expect("jpeg"),
    )
    .expect("write design");
    std::fs::write(&spec, kiln_assets::sample::SPEC_JSON).expect("write spec");
    (design, spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// What a bare request to the server gets back: its status line, or "" when cut.
    fn status_line(port: u16) -> String {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let req = format!(
            "GET /kiln-test HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        );
        let _ = c.write_all(req.as_bytes());
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn an_s3_outage_holds_its_port_until_the_server_is_back() {
        let mut s3 = S3Server::start();
        let port = s3.port();
        // Unsigned, so s3s-fs refuses it: but it is s3s-fs answering.
        assert!(status_line(port).starts_with("HTTP/1.1 "), "up");
        s3.stop();
        assert_eq!(status_line(port), "", "down: the connection is cut");
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_err(),
            "nothing else can take the port while the server is down"
        );
        s3.start_again();
        assert!(status_line(port).starts_with("HTTP/1.1 "), "back up");
    }
}
