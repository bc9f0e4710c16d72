//! Kit commands: `work` (workers + periodic maintenance), `kits create|status`, `status`, and
//! the end-to-end `demo` on the embedded default.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use kiln::app::{App, WorkOptions};
use kiln_core::{AccountId, Kit};
use kiln_jobs::{JobId, JobStatus, KitJob};
use kiln_ledger::{Ledger, NewAccount, PlanId};
use kiln_storage::{ObjectKey, Storage};

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

/// `kiln work`: the workers and maintenance of `opts` until SIGTERM or Ctrl-C.
pub async fn work(app: &App, opts: WorkOptions) -> anyhow::Result<()> {
    let cfg = app.worker_config(&opts);
    eprintln!(
        "kiln work: {} on {} (concurrency {} per queue); SIGTERM or Ctrl-C stops after running kits finish (grace {} s)",
        cfg.name,
        cfg.queues
            .iter()
            .map(|k| k.queue())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.concurrency,
        opts.grace.as_secs()
    );
    app.work(opts, shutdown_signal()).await
}

/// `kiln serve`: the HTTP API, and on SQLite (one machine) kit workers beside it, until
/// SIGTERM or Ctrl-C.
pub async fn serve(app: &App, listen: &str, work: bool) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stopped_for = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (addr, server) = app.serve(listen, stopped_for(stopped.clone())).await?;
    let in_process = work && app.ledger().db().backend() == kiln_ledger::Backend::Sqlite;
    eprintln!(
        "kiln serve: listening on http://{addr}{}; SIGTERM or Ctrl-C stops",
        if in_process {
            ", with kit workers in this process"
        } else {
            " (kits are made by `kiln work` processes)"
        }
    );
    let worker = in_process.then(|| {
        let app = app.clone();
        let opts = WorkOptions {
            queues: vec![Kit::Essentials, Kit::Caratzon],
            concurrency: 1,
            grace: Duration::from_secs(60),
        };
        let stopped = stopped_for(stopped.clone());
        tokio::spawn(async move { app.work(opts, stopped).await })
    });
    let server = tokio::spawn(server);
    shutdown_signal().await;
    let _ = stop.send(true);
    server.await.context("server task")??;
    if let Some(w) = worker {
        w.await.context("worker task")??;
    }
    Ok(())
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
    eprintln!("kiln: stopping; running kits may finish");
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
    app: &App,
    account: AccountId,
    kit: Kit,
    design: Bytes,
    spec: &[u8],
    key: &str,
) -> anyhow::Result<kiln_producer::Accepted> {
    kiln_producer::intake(
        app.queue(),
        app.storage(),
        kiln_producer::Order {
            account,
            kit,
            design,
            spec_json: spec,
            idempotency_key: key,
            max_attempts: app.settings.jobs.max_attempts,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))
}

/// A day: how long a derived idempotency key dedupes.
const DERIVED_KEY_WINDOW_MS: i64 = 24 * 3_600_000;

/// The keys an order without `--idempotency-key` may have: derived from the design, spec and
/// kit, one per 24-hour window — `[this window's, the previous window's]`. The previous
/// window's counts while its job is under 24 hours old, so the same order again within a day
/// is the same job, and after a day a new one.
pub fn derived_keys(
    design: &[u8],
    spec: &[u8],
    kit: Kit,
    now: kiln_core::Timestamp,
) -> [String; 2] {
    let mut all = design.to_vec();
    all.extend_from_slice(spec);
    all.extend_from_slice(kit.as_str().as_bytes());
    let hash = &kiln_assets::sha256_hex(&all)[..32];
    let window = now.millis().div_euclid(DERIVED_KEY_WINDOW_MS);
    [
        format!("cli-{hash}-{window}"),
        format!("cli-{hash}-{}", window - 1),
    ]
}

fn within_window(created: kiln_core::Timestamp, now: kiln_core::Timestamp) -> bool {
    now.millis() - created.millis() < DERIVED_KEY_WINDOW_MS
}

fn say_replayed(id: &str, created: &str) {
    eprintln!(
        "already ordered as job {id} (at {created}): the same design, spec and kit within 24 hours is one order; pass --idempotency-key to order it again"
    );
}

pub async fn create(app: &App, k: NewKit<'_>) -> anyhow::Result<KitJob> {
    let design = read(k.design, "design")?;
    let spec = read(k.spec, "spec")?;
    let key = match k.key {
        Some(key) => key,
        None => {
            let now = app.ledger().ctx().now;
            let [current, previous] = derived_keys(&design, &spec, k.kit, now);
            let mut tx = app.ledger().db().begin_read().await?;
            let earlier = kiln_jobs::job_by_key(&mut tx, k.account, &previous).await?;
            drop(tx);
            match earlier {
                Some(j) if within_window(j.created_at, now) => previous,
                _ => current,
            }
        }
    };
    let accepted = order(app, k.account, k.kit, Bytes::from(design), &spec, &key).await?;
    if accepted.replayed {
        say_replayed(accepted.job.id.as_str(), &accepted.job.created_at.rfc3339());
    }
    Ok(accepted.job)
}

/// [`create`] through the HTTP API.
pub async fn create_remote(
    client: &kiln::client::Client,
    design_path: &Path,
    spec_path: &Path,
    kit: Kit,
    key: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let design = read(design_path, "design")?;
    let spec = read(spec_path, "spec")?;
    let key = match key {
        Some(key) => key,
        None => {
            let now = kiln_core::Timestamp::now();
            let [current, previous] = derived_keys(&design, &spec, kit, now);
            let earlier = client.job_by_key(&previous).await?;
            let recent = earlier.as_ref().is_some_and(|j| {
                j["created_at"]
                    .as_str()
                    .and_then(kiln_core::Timestamp::parse_rfc3339)
                    .is_some_and(|t| within_window(t, now))
            });
            if recent { previous } else { current }
        }
    };
    let file_name = design_path
        .file_name()
        .map_or_else(|| "design".to_owned(), |n| n.to_string_lossy().into_owned());
    let (job, replayed) = client
        .create_kit(design, file_name, spec, kit, &key)
        .await?;
    if replayed {
        say_replayed(
            job["id"].as_str().unwrap_or_default(),
            job["created_at"].as_str().unwrap_or_default(),
        );
    }
    Ok(job)
}

pub async fn job(ledger: &Ledger, id: &JobId) -> anyhow::Result<KitJob> {
    kiln_jobs::read_job(&kiln_ledger::ReadDb::Pool(ledger.db().clone()), id)
        .await?
        .with_context(|| format!("job {id} not found"))
}

/// Waits for the job to end, drawing a progress bar on stderr (one line per step when stderr is
/// not a terminal).
pub async fn wait(ledger: &Ledger, id: &JobId, label: &str) -> anyhow::Result<KitJob> {
    follow(
        label,
        || async {
            let j = job(ledger, id).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(j)
        },
        |j: &KitJob| (j.status, j.progress.clone()),
    )
    .await
}

/// Follows a job to its end through `fetch` (each call returns it when it may have changed),
/// drawing the progress bar.
pub async fn follow<T, F, Fut>(
    label: &str,
    mut fetch: F,
    progress_of: impl Fn(&T) -> (JobStatus, kiln_jobs::Progress),
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    // indicatif draws only on a terminal; elsewhere (logs, CI) one plain line per step.
    let pb = indicatif::ProgressBar::new(0).with_prefix(label.to_owned());
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:<11} [{bar:24}] {pos:>2}/{len:<2} {msg} {elapsed_precise}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>-"),
    );
    let mut last_step = None;
    loop {
        let j = fetch().await?;
        let (status, progress) = progress_of(&j);
        let step = (status, progress.done);
        let what = progress.step.as_deref().unwrap_or(status.as_str());
        if tty {
            pb.set_length(u64::from(progress.total.max(1)));
            let done = if status == JobStatus::Succeeded {
                progress.total.max(1)
            } else {
                progress.done
            };
            pb.set_position(u64::from(done));
            pb.set_message(format!("{:<9} {what:<12}", status.as_str()));
        } else if last_step != Some(step) {
            eprintln!("{}", line(label, status, &progress, started.elapsed()));
        }
        last_step = Some(step);
        if status.is_terminal() {
            pb.finish();
            return Ok(j);
        }
    }
}

/// One progress line for a log: `essentials  [########----] 6/13 running  line sheet  1.2s`.
fn line(label: &str, status: JobStatus, p: &kiln_jobs::Progress, elapsed: Duration) -> String {
    const WIDTH: u32 = 24;
    let (done, total) = (p.done, p.total.max(1));
    let filled = if status == JobStatus::Succeeded {
        WIDTH
    } else {
        done.min(total) * WIDTH / total
    };
    let fill: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    let step = p.step.as_deref().unwrap_or(status.as_str());
    let total = match p.total {
        0 => "?".to_owned(),
        n => n.to_string(),
    };
    format!(
        "{label:<11} [{fill}] {done:>2}/{total:<2} {:<9} {step:<12} {:>5.1}s",
        status.as_str(),
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
    let queues = kiln_jobs::queue_stats(&mut tx, ledger.ctx().now).await?;
    let workers = kiln_jobs::live_workers(&mut tx, 60).await?;
    let running: serde_json::Map<String, serde_json::Value> =
        kiln_jobs::apalis::running_tasks(&mut tx)
            .await?
            .into_iter()
            .map(|(q, n)| (q, n.into()))
            .collect();
    Ok(serde_json::json!({
        "queues": queues,
        "workers": workers,
        "engine_running_tasks": running,
    }))
}

/// `kiln demo`: a new account on the embedded default, the chosen kits made by an in-process
/// worker on the bundled sample design (or the given one), with progress, where every asset
/// landed, and the balance before and after.
pub async fn demo(
    app: &App,
    design: Option<&Path>,
    spec: Option<&Path>,
    kits: &[Kit],
) -> anyhow::Result<()> {
    let (ledger, storage) = (app.ledger(), app.storage());
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
    let worker = {
        let app = app.clone();
        let opts = WorkOptions {
            queues: kits.to_vec(),
            concurrency: 1,
            grace: Duration::from_secs(30),
        };
        tokio::spawn(async move {
            app.work(opts, async move {
                let _ = stopped.await;
            })
            .await
        })
    };
    let run_id = ulid::Ulid::generate();
    let mut finished = Vec::new();
    for &kit in kits {
        let job = order(
            app,
            account,
            kit,
            design.clone(),
            &spec,
            &format!("demo-{run_id}-{kit}"),
        )
        .await?
        .job;
        println!(
            "{kit} kit: job {} queued, {} credits held",
            job.id, job.cost
        );
        finished.push(wait(ledger, &job.id, kit.as_str()).await?);
    }
    let _ = stop.send(());
    worker.await.context("worker task")?.context("worker")?;

    let root = match storage {
        Storage::Local(_) => app.settings.local_dir(),
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
            let place = root
                .as_ref()
                .map_or_else(|| key.to_owned(), |r| r.join(key).display().to_string());
            println!(
                "  {:<16} {:>9}  {:>8} B  {place}",
                a["role"].as_str().unwrap_or_default(),
                size,
                a["bytes"].as_u64().unwrap_or(0)
            );
        }
        let place = root
            .as_ref()
            .map_or_else(|| m.clone(), |r| r.join(m).display().to_string());
        println!("  {:<16} {:>9}  {:>8}    {place}", "manifest", "", "");
    }
    let after = ledger.balance(account).await?;
    println!(
        "\nbalance: {} available before, {} after ({} committed, {} held)",
        before.available, after.available, after.committed, after.held
    );
    let mut tx = ledger.db().begin_read().await?;
    let breaches = kiln_jobs::audit(&mut tx, Some(account)).await?;
    drop(tx);
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
