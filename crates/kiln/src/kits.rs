//! Kit commands: `work` (workers + periodic maintenance), `kits create|status`, `status`, and
//! the end-to-end `demo` on the embedded default.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use kiln_assets::Generator;
use kiln_core::{AccountId, Kit};
use kiln_ledger::jobs::{self, JobStatus, KitJob};
use kiln_ledger::{Ledger, NewAccount, PlanId};
use kiln_storage::{ObjectKey, Storage};
use kit_worker::{Deps, WorkerConfig};

use crate::config::Config;

/// Opens the object store named by the configuration. A local store signs URLs with
/// `KILN_SIGNING_SECRET`, or with a key kept beside its objects (made on first use).
pub async fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    let secret = match std::env::var("KILN_SIGNING_SECRET") {
        Ok(s) if s.len() >= 16 => s.into_bytes(),
        Ok(_) => bail!("KILN_SIGNING_SECRET must be at least 16 characters"),
        Err(_) if config.storage.starts_with("s3://") => b"unused-for-s3-presigning".to_vec(),
        Err(_) => local_secret(Path::new(
            config
                .storage
                .strip_prefix("file://")
                .unwrap_or(&config.storage),
        ))?,
    };
    Storage::from_location(&config.storage, &secret, &config.public_url)
        .await
        .with_context(|| format!("cannot open storage {}", config.storage))
}

fn local_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(".signing-key");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().as_bytes().to_vec());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = hex::encode(raw);
    std::fs::write(&path, &key).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key.into_bytes())
}

pub fn deps(ledger: &Ledger, storage: Storage) -> anyhow::Result<Deps> {
    let generator = Generator::from_env().map_err(anyhow::Error::msg)?;
    let retry_base = Duration::from_millis(env_number("KILN_RETRY_BASE_MS", 5_000)?);
    Ok(Deps {
        ledger: ledger.clone(),
        storage,
        generator,
        retry_base,
        lease: Duration::from_millis(env_number("KILN_LEASE_MS", 20_000)?.max(100)),
    })
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name} must be a number, not {v:?}")),
        Err(_) => Ok(default),
    }
}

/// `KILN_MAX_ATTEMPTS`: deliveries of a job before it fails and releases (default 4).
fn max_attempts() -> anyhow::Result<u32> {
    env_number("KILN_MAX_ATTEMPTS", kiln_producer::MAX_ATTEMPTS)
}

pub fn parse_queues(s: &str) -> anyhow::Result<Vec<Kit>> {
    s.split(',')
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(|q| {
            let name = q.strip_prefix("kits.").unwrap_or(q);
            name.parse::<Kit>().map_err(|_| {
                anyhow::anyhow!("unknown queue {q:?}: use kits.essentials and/or kits.caratzon")
            })
        })
        .collect()
}

/// Finished apalis tasks are deleted after a day (kit_jobs keeps the history).
const PRUNE_AFTER_MS: i64 = 24 * 3_600_000;

/// One maintenance pass: renew due billing cycles (booking expiries), reconcile jobs untouched
/// for `stale_ms`, prune. Safe with many workers doing the same: every step is idempotent and
/// fenced.
pub async fn maintain(ledger: &Ledger, stale_ms: i64) -> anyhow::Result<()> {
    let renewed = ledger.renew_due(500).await?;
    let mut tx = ledger.db().begin().await?;
    let ctx = ledger.ctx();
    let r = jobs::reconcile(&mut tx, &ctx, stale_ms).await?;
    let pruned = jobs::prune_tasks(&mut tx, ctx.now, PRUNE_AFTER_MS).await?;
    tx.commit().await?;
    tracing::info!(?renewed, ?r, pruned, "maintenance");
    Ok(())
}

pub async fn work(
    ledger: &Ledger,
    config: &Config,
    queues: Vec<Kit>,
    concurrency: usize,
    grace: Duration,
) -> anyhow::Result<()> {
    let storage = open_storage(config).await?;
    // Wrong settings stop the worker at once; an outage does not (jobs retry until it ends).
    match storage.check().await {
        Ok(()) => {}
        Err(e) if e.is_retryable() => {
            tracing::warn!("storage is unreachable for now; kits will retry: {e}");
        }
        Err(e) => return Err(e).context("storage refused the worker's settings"),
    }
    let deps = deps(ledger, storage)?;
    let mut cfg = WorkerConfig::new(queues, concurrency);
    cfg.grace = grace;
    // Tuning, mostly for tests: apalis heartbeat, missed beats before a dead worker's task is
    // rescued, and the maintenance period. A job whose lease (KILN_LEASE_MS) ran out is
    // repaired by the reconciler.
    cfg.heartbeat = Duration::from_millis(env_number("KILN_HEARTBEAT_MS", 5_000)?);
    cfg.missed_heartbeats = env_number("KILN_MISSED_HEARTBEATS", 3)?;
    let every = Duration::from_millis(env_number("KILN_MAINTENANCE_MS", 10_000)?);
    let stale_ms = deps.lease_ms();
    eprintln!(
        "kiln work: {} on {} (concurrency {} per queue); SIGTERM or Ctrl-C stops after running kits finish (grace {} s)",
        cfg.name,
        cfg.queues
            .iter()
            .map(|k| k.queue())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.concurrency,
        grace.as_secs()
    );
    let maintenance = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = maintain(&ledger, stale_ms).await {
                    tracing::warn!("maintenance failed (will retry): {e:#}");
                }
            }
        })
    };
    let result = kit_worker::run(deps, cfg, shutdown_signal()).await;
    maintenance.abort();
    result.context("the worker stopped")
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    eprintln!("kiln work: stopping; running kits may finish");
}

pub struct NewKit<'a> {
    pub account: AccountId,
    pub design: &'a Path,
    pub spec: &'a Path,
    pub kit: Kit,
    pub key: Option<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Orders one kit through the producer (reserve + enqueue), with the configured attempts.
async fn order(
    ledger: &Ledger,
    storage: &Storage,
    account: AccountId,
    kit: Kit,
    design: Bytes,
    spec: &[u8],
    key: &str,
) -> anyhow::Result<KitJob> {
    let accepted = kiln_producer::intake(
        ledger,
        storage,
        kiln_producer::Order {
            account,
            kit,
            design,
            spec_json: spec,
            idempotency_key: key,
            max_attempts: max_attempts()?,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
    Ok(accepted.job)
}

pub async fn create(ledger: &Ledger, config: &Config, k: NewKit<'_>) -> anyhow::Result<KitJob> {
    let design = read(k.design, "design")?;
    let spec = read(k.spec, "spec")?;
    let storage = open_storage(config).await?;
    // Without a key, one derived from the inputs: running the same command twice is one order.
    let key = k.key.unwrap_or_else(|| {
        let mut all = design.clone();
        all.extend_from_slice(&spec);
        all.extend_from_slice(k.kit.as_str().as_bytes());
        format!("cli-{}", &kiln_assets::sha256_hex(&all)[..32])
    });
    order(
        ledger,
        &storage,
        k.account,
        k.kit,
        Bytes::from(design),
        &spec,
        &key,
    )
    .await
}

pub async fn job(ledger: &Ledger, id: &str) -> anyhow::Result<KitJob> {
    let mut tx = ledger.db().begin_read().await?;
    jobs::job(&mut tx, id)
        .await?
        .with_context(|| format!("job {id} not found"))
}

/// Waits for the job to end, drawing a progress bar on stderr (one line per step when stderr is
/// not a terminal).
pub async fn wait(ledger: &Ledger, id: &str, label: &str) -> anyhow::Result<KitJob> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_step = None;
    loop {
        let j = job(ledger, id).await?;
        let step = (j.status, j.progress.done);
        if tty {
            eprint!("\r{:<100}", bar(label, &j, started.elapsed()));
            let _ = std::io::stderr().flush();
        } else if last_step != Some(step) {
            eprintln!("{}", bar(label, &j, started.elapsed()));
        }
        last_step = Some(step);
        if j.status.is_terminal() {
            if tty {
                eprintln!();
            }
            return Ok(j);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bar(label: &str, j: &KitJob, elapsed: Duration) -> String {
    const WIDTH: u32 = 24;
    let (done, total) = (j.progress.done, j.progress.total.max(1));
    let filled = if j.status == JobStatus::Succeeded {
        WIDTH
    } else {
        done.min(total) * WIDTH / total
    };
    let fill: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    let step = j.progress.step.as_deref().unwrap_or(j.status.as_str());
    let total = match j.progress.total {
        0 => "?".to_owned(),
        n => n.to_string(),
    };
    format!(
        "{label:<11} [{fill}] {done:>2}/{total:<2} {:<9} {step:<12} {:>5.1}s",
        j.status.as_str(),
        elapsed.as_secs_f32()
    )
}

pub fn print_job(j: &KitJob) {
    println!("job       {}", j.id);
    println!("kit       {}", j.kit);
    println!("status    {}", j.status);
    println!(
        "progress  {}/{}{}",
        j.progress.done,
        j.progress.total,
        j.progress
            .step
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default()
    );
    println!("attempts  {}", j.attempts);
    println!("cost      {} credits, charge {:?}", j.cost, j.charge());
    println!("created   {}", j.created_at);
    if let Some(t) = j.finished_at {
        println!("finished  {t}");
    }
    if let Some(e) = &j.error {
        println!("error     {}: {}", e.code, e.message);
    }
    if let Some(m) = &j.manifest_key {
        println!("manifest  {m}");
    }
}

pub async fn status(ledger: &Ledger) -> anyhow::Result<serde_json::Value> {
    let mut tx = ledger.db().begin_read().await?;
    let queues = jobs::queue_stats(&mut tx, ledger.ctx().now).await?;
    let workers = jobs::live_workers(&mut tx, 60).await?;
    Ok(serde_json::json!({ "queues": queues, "workers": workers }))
}

/// `kiln demo`: a new account on the embedded default, the chosen kits made by an in-process
/// worker on the bundled sample design (or the given one), with progress, where every asset
/// landed, and the balance before and after.
pub async fn demo(
    ledger: &Ledger,
    config: &Config,
    design: Option<&Path>,
    spec: Option<&Path>,
    kits: &[Kit],
) -> anyhow::Result<()> {
    let storage = open_storage(config).await?;
    let design = Bytes::from(match design {
        Some(p) => read(p, "design")?,
        None => kiln_assets::encode_jpeg(&kiln_assets::sample::ring(2400), 92)?,
    });
    let spec = match spec {
        Some(p) => read(p, "spec")?,
        None => kiln_assets::sample::SPEC_JSON.as_bytes().to_vec(),
    };
    let account = ledger
        .create_account(NewAccount {
            plan: PlanId::Discover,
            is_admin: false,
            email: Some("demo@kiln.local".into()),
            monthly_allowance: None,
        })
        .await?
        .account
        .id;
    let before = ledger.balance(account).await?;
    println!(
        "demo account {account} (Discover plan): {} credits available",
        before.available
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut cfg = WorkerConfig::new(kits.to_vec(), 1);
    cfg.grace = Duration::from_secs(30);
    let worker = tokio::spawn(kit_worker::run(
        deps(ledger, storage.clone())?,
        cfg,
        async move {
            let _ = stopped.await;
        },
    ));
    let run_id = ulid::Ulid::generate();
    let mut finished = Vec::new();
    for &kit in kits {
        let job = order(
            ledger,
            &storage,
            account,
            kit,
            design.clone(),
            &spec,
            &format!("demo-{run_id}-{kit}"),
        )
        .await?;
        println!(
            "{kit} kit: job {} queued, {} credits held",
            job.id, job.cost
        );
        finished.push(wait(ledger, &job.id, kit.as_str()).await?);
    }
    let _ = stop.send(());
    worker.await.context("worker task")?.context("worker")?;

    let root = match &storage {
        Storage::Local(_) => Some(Path::new(
            config
                .storage
                .strip_prefix("file://")
                .unwrap_or(&config.storage),
        )),
        Storage::S3(_) => None,
    };
    for j in &finished {
        println!("\n{} kit, job {}: {}", j.kit, j.id, j.status);
        if let Some(e) = &j.error {
            println!("  failed: {}: {}", e.code, e.message);
            continue;
        }
        let Some(m) = &j.manifest_key else { continue };
        let manifest: serde_json::Value =
            serde_json::from_slice(&storage.get(&ObjectKey::parse(m)?).await?)?;
        for a in manifest["assets"].as_array().into_iter().flatten() {
            let key = a["key"].as_str().unwrap_or_default();
            let size = match (a["width"].as_u64(), a["height"].as_u64()) {
                (Some(w), Some(h)) => format!("{w}x{h}"),
                _ => String::new(),
            };
            let place = root.map_or_else(|| key.to_owned(), |r| r.join(key).display().to_string());
            println!(
                "  {:<16} {:>9}  {:>8} B  {place}",
                a["role"].as_str().unwrap_or_default(),
                size,
                a["bytes"].as_u64().unwrap_or(0)
            );
        }
        let place = root.map_or_else(|| m.clone(), |r| r.join(m).display().to_string());
        println!("  {:<16} {:>9}  {:>8}    {place}", "manifest", "", "");
    }
    let after = ledger.balance(account).await?;
    println!(
        "\nbalance: {} available before, {} after ({} committed, {} held)",
        before.available, after.available, after.committed, after.held
    );
    let breaches = ledger.audit_account(account).await?;
    anyhow::ensure!(
        breaches.is_empty(),
        "ledger invariants broken: {breaches:?}"
    );
    anyhow::ensure!(
        finished.iter().all(|j| j.status == JobStatus::Succeeded),
        "a kit did not succeed"
    );
    println!("audit: every invariant holds; each kit was charged exactly once.");
    Ok(())
}
