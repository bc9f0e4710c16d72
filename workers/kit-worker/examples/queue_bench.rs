//! Queue figures for `make bench` (scripts/bench.sh), on PostgreSQL:
//!
//! `queue_bench <database-url> enqueue [clients] [seconds]` — reserve + enqueue transactions per
//! second (`jobs::submit`; 8 clients, one connection and one enterprise account each), printed
//! as one number.
//! `queue_bench <database-url> pickup [jobs]` — with an idle `kit_worker::run` in this process,
//! enqueue one job at a time and time enqueue (its start) -> claim (the job's start), over
//! `jobs` sequential jobs whose upload is missing, so each ends at once; prints `p50_ms p99_ms`.
//! `queue_bench <database-url> overhead [kits]` — Essentials kits end to end through the queue
//! (enqueue -> succeeded seen by a poller), each less the time the worker itself spent
//! rendering and writing that kit (from its "kit job succeeded" event): the queue + ledger
//! overhead, per kit. The same kit rendered and published directly, alternating with the queued
//! ones, is the reference. Prints `median_e2e_ms median_generate_ms median_publish_ms
//! median_overhead_ms overhead_share` (stderr: where the pickup goes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_assets::{Generator, Manifest};
use kiln_core::Kit;
use kiln_jobs::{self as jobs, JobId, JobStatus, NewJob, Queue};
use kiln_ledger::{Credits, Db, DbOptions, Ledger, NewAccount, PlanId, Pricing, SystemClock};
use kiln_storage::{LocalStore, ObjectKey, Storage};
use kit_worker::{Deps, WorkerConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn account(ledger: &Ledger) -> Result<kiln_core::AccountId, Error> {
    Ok(ledger
        .create_account(NewAccount {
            plan: PlanId::Enterprise,
            is_admin: false,
            email: None,
            monthly_allowance: Some(Credits::new_const(1_000_000_000_000)),
        })
        .await?
        .account
        .id)
}

async fn enqueue(
    queue: &Queue,
    account: kiln_core::AccountId,
    key: &str,
    upload: &str,
) -> Result<JobId, Error> {
    let e = jobs::submit(
        queue,
        &NewJob {
            account,
            kit: Kit::Essentials,
            idempotency_key: key,
            upload_key: upload,
            spec: kiln_assets::sample::SPEC_JSON,
            max_attempts: 1,
        },
    )
    .await?;
    Ok(e.job.id)
}

fn deps(ledger: &Ledger, dir: &std::path::Path) -> Result<Deps, Error> {
    Ok(Deps {
        ledger: ledger.clone(),
        storage: Storage::Local(LocalStore::new(
            dir,
            b"queue-bench-signing-secret".to_vec(),
            "http://127.0.0.1:0",
        )?),
        generator: Generator::Studio,
        retry: kit_worker::Retry::default(),
        lease: Duration::from_secs(20),
        deadlines: kit_worker::Deadlines::default(),
        metrics: Default::default(),
        faults: kit_worker::Faults::default(),
    })
}

/// Waits until `until` holds: nothing for `quiet` (a kit's expected render time, so polling
/// does not compete with the renderer for the two cores), then polls every millisecond.
async fn wait(
    ledger: &Ledger,
    id: &JobId,
    quiet: Duration,
    until: impl Fn(&jobs::KitJob) -> bool,
) -> Result<jobs::KitJob, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    tokio::time::sleep(quiet).await;
    loop {
        let mut tx = ledger.db().begin_read().await?;
        let j = jobs::job(&mut tx, id).await?.ok_or("job vanished")?;
        drop(tx);
        if until(&j) {
            return Ok(j);
        }
        if Instant::now() > deadline {
            return Err(format!("job {id} stuck: {j:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The kit without queue or ledger: the upload read from the store, the spec parsed and the
/// kit rendered (first figure, ms), then every file and the manifest written under `job`
/// (second figure, ms).
async fn direct_kit(d: &Deps, upload: &ObjectKey, job: &str) -> Result<(f64, f64), Error> {
    let t = Instant::now();
    let bytes = d.storage.get(upload).await?;
    let spec = kiln_core::ProductSpec::from_json(kiln_assets::sample::SPEC_JSON.as_bytes())?;
    let assets = Generator::Studio
        .generate(
            Arc::from(bytes.as_ref()),
            &spec,
            Kit::Essentials,
            Arc::new(|_| {}),
        )
        .await?;
    let generate = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let manifest = Manifest::new(job, Kit::Essentials, "studio".into(), &assets);
    let files = assets
        .iter()
        .map(|a| (a.path.as_str(), a.bytes.clone(), a.content_type))
        .chain([("manifest.json", manifest.to_json(), "application/json")]);
    for (path, bytes, content_type) in files {
        let k = ObjectKey::kit(job, path)?;
        d.storage.put(&k, bytes.into(), content_type).await?;
    }
    Ok((generate, t.elapsed().as_secs_f64() * 1000.0))
}

/// What the worker says of each kit it finished: job id -> (generate ms, publish ms), from the
/// fields of its "kit job succeeded" event.
#[derive(Clone, Default)]
struct WorkerTimings(Arc<std::sync::Mutex<std::collections::HashMap<String, (f64, f64)>>>);

#[derive(Default)]
struct Fields {
    job: Option<String>,
    generate_ms: Option<f64>,
    publish_ms: Option<f64>,
}

impl tracing::field::Visit for Fields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        match field.name() {
            "generate_ms" => self.generate_ms = Some(value),
            "publish_ms" => self.publish_ms = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "job" {
            self.job = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WorkerTimings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if let (Some(job), Some(g), Some(p)) = (f.job, f.generate_ms, f.publish_ms)
            && let Ok(mut m) = self.0.lock()
        {
            m.insert(job, (g, p));
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let timings = WorkerTimings::default();
    {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(timings.clone()),
        )?;
    }
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: queue_bench <database-url> enqueue|pickup|overhead [n] [seconds]";
    let url = args.get(1).ok_or(usage)?;
    let mode = args.get(2).ok_or(usage)?.as_str();
    let n: usize = args.get(3).map_or(Ok(0), |s| s.parse())?;
    let db = Db::connect_with(
        url,
        &DbOptions {
            // One connection per client, as pgbench has; a few for one kit at a time.
            max_connections: match mode {
                "enqueue" => u32::try_from(if n == 0 { 8 } else { n })?,
                _ => 8,
            },
            ..DbOptions::default()
        },
    )
    .await?;
    kiln_jobs::migrate(&db).await?;
    let ledger = Ledger::new(db, Arc::new(Pricing::default()), Arc::new(SystemClock));
    let queue = Queue::new(ledger.clone());
    let dir = std::env::temp_dir().join(format!("kiln-queue-bench-{}", std::process::id()));

    match mode {
        "enqueue" => {
            let clients = if n == 0 { 8 } else { n };
            let seconds: u64 = args.get(4).map_or(Ok(5), |s| s.parse())?;
            let mut accounts = Vec::new();
            for _ in 0..clients {
                accounts.push(account(&ledger).await?);
            }
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for (c, a) in accounts.into_iter().enumerate() {
                let queue = queue.clone();
                tasks.push(tokio::spawn(async move {
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        enqueue(&queue, a, &format!("bench-{c}-{done}"), "uploads/bench.jpg")
                            .await?;
                        done += 1;
                    }
                    Ok::<u64, Error>(done)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            #[allow(clippy::cast_precision_loss)]
            let rate = total as f64 / started.elapsed().as_secs_f64();
            println!("{rate:.0}");
        }
        "pickup" => {
            let jobs_n = if n == 0 { 1000 } else { n };
            let a = account(&ledger).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut cfg = WorkerConfig::new(vec![Kit::Essentials], 1);
            cfg.grace = Duration::from_secs(5);
            let worker = tokio::spawn(kit_worker::run(deps(&ledger, &dir)?, cfg, async move {
                let _ = stopped.await;
            }));
            // Let the worker start listening before the first job.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut lat = Vec::with_capacity(jobs_n);
            for i in 0..jobs_n {
                // A missing upload: the worker claims the job, finds nothing and fails it.
                let id = enqueue(&queue, a, &format!("pickup-{i}"), "uploads/missing.jpg").await?;
                let j = wait(&ledger, &id, Duration::ZERO, |j| j.status.is_terminal()).await?;
                let started = j.started_at.ok_or("never started")?;
                #[allow(clippy::cast_precision_loss)]
                lat.push((started.millis() - j.created_at.millis()) as f64);
            }
            let _ = stop.send(());
            worker.await??;
            println!(
                "{:.1} {:.1}",
                percentile(&mut lat, 0.5),
                percentile(&mut lat, 0.99)
            );
        }
        "overhead" => {
            let kits = if n == 0 { 21 } else { n };
            let a = account(&ledger).await?;
            let d = deps(&ledger, &dir)?;
            let upload = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(2400), 92)?;
            let key = ObjectKey::upload(a, &kiln_assets::sha256_hex(&upload), "jpg")?;
            d.storage
                .put(&key, upload.clone().into(), "image/jpeg")
                .await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let worker = tokio::spawn(kit_worker::run(
                d.clone(),
                WorkerConfig::new(vec![Kit::Essentials], 1),
                async move {
                    let _ = stopped.await;
                },
            ));
            // Warm up, as a running service is: the renderer, and the connections' prepared
            // statements on both sides (a few kits through the queue, not measured).
            direct_kit(&d, &key, "warmup").await?;
            for i in 0..3 {
                let id = enqueue(&queue, a, &format!("warmup-{i}"), key.as_str()).await?;
                wait(&ledger, &id, Duration::ZERO, |j| j.status.is_terminal()).await?;
            }
            // Direct and queued kits alternate, so drift in the machine's speed hits both alike;
            // each pair gives one overhead figure.
            let (mut direct, mut publish, mut e2e, mut overhead) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut pickup, mut run, mut submits) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..kits {
                let (generate, published) = direct_kit(&d, &key, &format!("direct{i}")).await?;
                // The waiting side stays quiet for 80% of this pair's direct render, then polls
                // each millisecond.
                let quiet = Duration::from_secs_f64(generate * 0.8 / 1000.0);
                let t = Instant::now();
                let id = enqueue(&queue, a, &format!("overhead-{i}"), key.as_str()).await?;
                submits.push(t.elapsed().as_secs_f64() * 1000.0);
                let j = wait(&ledger, &id, quiet, |j| j.status.is_terminal()).await?;
                if j.status != JobStatus::Succeeded {
                    return Err(format!("kit failed: {j:?}").into());
                }
                let queued = t.elapsed().as_secs_f64() * 1000.0;
                direct.push(generate);
                publish.push(published);
                e2e.push(queued);
                // Queue + ledger: end to end less what the worker itself spent rendering and
                // writing this very kit (so the render's run-to-run noise cancels).
                let (w_gen, w_pub) = timings
                    .0
                    .lock()
                    .map_err(|_| "timings lock")?
                    .get(id.as_str())
                    .copied()
                    .ok_or("the worker reported no timings")?;
                overhead.push(queued - w_gen - w_pub);
                let (created, started, finished) = (
                    j.created_at.millis(),
                    j.started_at.ok_or("never started")?.millis(),
                    j.finished_at.ok_or("never finished")?.millis(),
                );
                #[allow(clippy::cast_precision_loss)]
                {
                    pickup.push((started - created) as f64);
                    run.push((finished - started) as f64);
                }
            }
            let _ = stop.send(());
            worker.await??;
            {
                // Where the pickup goes: enqueue -> apalis's fetch (lock_at) -> kiln's claim.
                let mut rows = Vec::new();
                for (id, fetched) in kiln_jobs::apalis::fetched_at(ledger.db()).await? {
                    let mut tx = ledger.db().begin_read().await?;
                    if let Some(j) = jobs::job(&mut tx, &id).await? {
                        let started = j.started_at.map_or(fetched, |t| t.millis() as f64);
                        rows.push((fetched - j.created_at.millis() as f64, started - fetched));
                    }
                }
                let (mut fetch, mut claim): (Vec<f64>, Vec<f64>) = rows.into_iter().unzip();
                if !fetch.is_empty() {
                    eprintln!(
                        "overhead: median submit {:.1} ms; enqueue -> apalis fetch {:.1} ms, fetch -> claim {:.1} ms",
                        median(&mut submits),
                        median(&mut fetch),
                        median(&mut claim)
                    );
                }
            }
            let m_over = median(&mut overhead);
            eprintln!(
                "overhead: median enqueue->claim {:.0} ms, claim->finished {:.0} ms; per-pair overhead min {:.1} / median {m_over:.1} / max {:.1} ms",
                median(&mut pickup),
                median(&mut run),
                overhead[0],
                overhead[overhead.len() - 1],
            );
            let (m_e2e, m_gen, m_pub) =
                (median(&mut e2e), median(&mut direct), median(&mut publish));
            println!(
                "{m_e2e:.1} {m_gen:.1} {m_pub:.1} {m_over:.1} {:.3}",
                m_over / m_e2e
            );
        }
        _ => return Err(usage.into()),
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
