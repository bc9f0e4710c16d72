//! The application as production runs it: [`App::build`] turns [`Settings`] into a connected
//! ledger, job queue, object store and generator, and [`App::work`] runs what `kiln work` runs
//! (the apalis workers and the maintenance loop). Tests start exactly this, in-process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_assets::Generator;
use kiln_assets::provider::{Provider, ProviderConfig};
use kiln_core::Kit;
use kiln_jobs::Queue;
use kiln_ledger::{Db, DbOptions, Ledger, Schema, SystemClock};
use kiln_storage::{LocalStore, S3Config, S3Store, Storage};
use kit_worker::{Deps, WorkerConfig, WorkerMetrics};

use crate::settings::{GeneratorKind, Settings};

/// Whether opening the database may change its schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migrate {
    /// Refuse a database that is unmigrated, behind or newer than this binary.
    No,
    /// Create the database if needed and apply every migration (`kiln migrate`, `kiln demo`,
    /// `kiln work --migrate`).
    Yes,
}

/// Opens the database named by the settings. With `Migrate::No` nothing is written: a missing
/// SQLite file is not created, and a schema that is not this binary's is refused with one line
/// saying what to do.
pub async fn open_ledger(settings: &Settings, migrate: Migrate) -> anyhow::Result<Ledger> {
    let opts = DbOptions {
        create: migrate == Migrate::Yes,
        ..DbOptions::default()
    };
    let shown = settings.database_display();
    let db = Db::connect_with(settings.database.expose(), &opts)
        .await
        .with_context(|| format!("cannot open the database at {shown}"))?;
    match migrate {
        Migrate::Yes => kiln_jobs::migrate(&db)
            .await
            .with_context(|| format!("cannot migrate the database at {shown}"))?,
        Migrate::No => match kiln_jobs::schema(&db).await? {
            Schema::Current => {}
            Schema::Unmigrated | Schema::Behind { .. } => {
                bail!(
                    "the database at {shown} is not migrated to this kiln's schema: run `kiln migrate`"
                )
            }
            Schema::Newer { applied, known } => bail!(
                "the database at {shown} was migrated by a newer kiln (migration {applied}; this one knows up to {known}): upgrade kiln, then run `kiln migrate`"
            ),
        },
    }
    Ok(Ledger::new(
        db,
        Arc::new(settings.pricing.clone()),
        Arc::new(SystemClock),
    ))
}

/// Opens the object store named by the settings. A local store signs URLs with the signing
/// secret, or with a key kept beside its objects (made on first use).
pub async fn open_storage(settings: &Settings) -> anyhow::Result<Storage> {
    let Some(dir) = settings.local_dir() else {
        let bucket = settings
            .storage
            .trim_start_matches("s3://")
            .trim_end_matches('/');
        let s3 = &settings.s3;
        let cfg = S3Config {
            bucket: bucket.to_owned(),
            endpoint: s3.endpoint.clone(),
            region: s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
            path_style: s3.path_style.unwrap_or(s3.endpoint.is_some()),
            credentials: s3
                .access_key_id
                .clone()
                .zip(s3.secret_access_key.as_ref().map(|s| s.expose().to_owned())),
            max_attempts: 5,
            timeout: s3
                .timeout_secs
                .map_or(kiln_storage::S3_DEFAULT_TIMEOUT, Duration::from_secs),
        };
        let store = S3Store::connect(cfg)
            .await
            .with_context(|| format!("cannot open storage {}", settings.storage))?;
        return Ok(Storage::S3(store));
    };
    let secret = match &settings.signing_secret {
        Some(s) => s.expose().as_bytes().to_vec(),
        None => local_secret(&dir)?,
    };
    let store = LocalStore::new(&dir, secret, &settings.public_url)
        .with_context(|| format!("cannot open storage {}", settings.storage))?;
    Ok(Storage::Local(store))
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

/// The generator named by the settings.
pub fn generator(settings: &Settings) -> anyhow::Result<Generator> {
    let g = &settings.generator;
    match g.kind {
        GeneratorKind::Studio => Ok(Generator::Studio),
        GeneratorKind::Ai => {
            let cfg = ProviderConfig {
                base_url: g.provider_url.clone().unwrap_or_default(),
                api_key: g
                    .provider_key
                    .as_ref()
                    .map(|k| k.expose().to_owned())
                    .unwrap_or_default(),
                image_model: g.image_model.clone(),
                text_model: g.text_model.clone(),
                timeout: Duration::from_secs(g.timeout_secs),
            };
            Ok(Generator::Ai(
                Provider::new(cfg).map_err(|e| anyhow::anyhow!("AI provider: {e}"))?,
            ))
        }
    }
}

/// What `kiln work` runs, and how.
#[derive(Clone, Debug)]
pub struct WorkOptions {
    pub queues: Vec<Kit>,
    /// Kits run at once per queue.
    pub concurrency: usize,
    /// How long running kits may take to finish after shutdown is asked for.
    pub grace: Duration,
}

/// A connected kiln: the ledger and job queue on the database, the object store, the generator.
#[derive(Clone, Debug)]
pub struct App {
    pub settings: Settings,
    queue: Queue,
    storage: Storage,
    generator: Generator,
    /// What this process's workers and maintenance loop have done (`/metrics`).
    metrics: Arc<WorkerMetrics>,
    /// When the maintenance loop last ran the audit.
    audited_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// Finished apalis tasks are deleted after a day (kit_jobs keeps the history).
const PRUNE_AFTER_MS: i64 = 24 * 3_600_000;

impl App {
    /// Connects everything the settings name. The database must already be migrated
    /// (`Migrate::Yes` migrates it first).
    pub async fn build(settings: Settings, migrate: Migrate) -> anyhow::Result<App> {
        let ledger = open_ledger(&settings, migrate).await?;
        let storage = open_storage(&settings).await?;
        let generator = generator(&settings)?;
        Ok(App {
            queue: Queue::new(ledger),
            storage,
            generator,
            settings,
            metrics: Arc::default(),
            audited_at: Arc::default(),
        })
    }

    pub fn ledger(&self) -> &Ledger {
        self.queue.ledger()
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// What a worker needs to run jobs.
    pub fn deps(&self) -> Deps {
        Deps {
            ledger: self.ledger().clone(),
            storage: self.storage.clone(),
            generator: self.generator.clone(),
            retry: self.settings.jobs.retry(),
            lease: self.settings.jobs.lease(),
            deadlines: self.settings.jobs.deadlines(),
            metrics: self.metrics.clone(),
            faults: kit_worker::Faults {
                generator_failures: self.settings.generator.fault_generator_failures,
            },
        }
    }

    /// The worker configuration the settings give for `opts`.
    pub fn worker_config(&self, opts: &WorkOptions) -> WorkerConfig {
        let j = &self.settings.jobs;
        let mut cfg = WorkerConfig::new(opts.queues.clone(), opts.concurrency);
        cfg.grace = opts.grace;
        cfg.heartbeat = Duration::from_millis(j.heartbeat_ms);
        cfg.missed_heartbeats = j.missed_heartbeats;
        cfg
    }

    /// One maintenance pass: renew due billing cycles (booking expiries), expire holds nobody
    /// resolved, reconcile jobs whose lease ran out, prune finished tasks. Safe with many workers doing the same: every step
    /// is idempotent and fenced.
    pub async fn maintain(&self) -> anyhow::Result<()> {
        let ledger = self.ledger();
        let renewed = ledger.renew_due(500).await?;
        let holds_expired = ledger.expire_holds(500).await?;
        let stale_ms = i64::try_from(self.settings.jobs.lease_ms).unwrap_or(i64::MAX);
        let ctx = ledger.ctx();
        let r = kiln_jobs::reconcile(ledger.db(), &ctx, stale_ms).await?;
        let mut tx = ledger.db().begin().await?;
        let pruned = kiln_jobs::prune_tasks(&mut tx, ctx.now, PRUNE_AFTER_MS).await?;
        tx.commit().await?;
        let m = &self.metrics;
        m.maintained("requeued", r.requeued.into());
        m.maintained("failed", r.failed.into());
        m.maintained("charges_resolved", r.charges_resolved.into());
        m.maintained("holds_expired", holds_expired.into());
        tracing::info!(?renewed, holds_expired, ?r, pruned, "maintenance");
        let every = self.settings.jobs.audit_every_secs;
        let due = {
            let mut at = self
                .audited_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = every > 0 && at.is_none_or(|t| t.elapsed().as_secs() >= every);
            if due {
                *at = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            let mut read = ledger.db().begin_read().await?;
            let breaches = kiln_jobs::audit(&mut read, None).await?;
            drop(read);
            m.audited(breaches.len());
            for b in &breaches {
                tracing::error!(account = %b.account_id, "audit breach: {}", b.what);
            }
        }
        Ok(())
    }

    /// This process's worker and maintenance metrics, as a writer of Prometheus text.
    pub fn metrics_writer(&self) -> kiln_api::ExtraMetrics {
        let m = self.metrics.clone();
        kiln_api::ExtraMetrics(Arc::new(move |out: &mut String| m.render(out)))
    }

    /// `GET /metrics` on `listen` with this process's worker metrics (for `kiln work`, which
    /// serves no API), until aborted. Returns the bound address and the server task.
    pub async fn serve_metrics(
        &self,
        listen: &str,
    ) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} for metrics"))?;
        let addr = listener.local_addr()?;
        let writer = self.metrics_writer();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let writer = writer.clone();
                async move {
                    let mut out = String::new();
                    (writer.0)(&mut out);
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        out,
                    )
                }
            }),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("the metrics server stopped: {e}");
            }
        });
        Ok((addr, task))
    }

    /// The maintenance loop ([`App::maintain`] every `maintenance_ms`), until aborted. Both
    /// `kiln work` and `kiln serve` run it: every step is safe with many running at once.
    fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        let every = Duration::from_millis(self.settings.jobs.maintenance_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = app.maintain().await {
                    tracing::warn!("maintenance failed (will retry): {e:#}");
                }
            }
        })
    }

    /// Binds the HTTP API (DESIGN.md §6) on `listen` (`127.0.0.1:0` picks a free port) and
    /// returns the address it is bound to and the server, which runs until `shutdown`
    /// completes and then finishes the requests in flight.
    pub async fn serve(
        &self,
        listen: &str,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<(
        std::net::SocketAddr,
        impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    )> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let cfg = kiln_api::ApiConfig {
            max_attempts: self.settings.jobs.max_attempts,
            submit_burst: self.settings.api.submit_burst,
            submit_per_minute: self.settings.api.submit_per_minute,
        };
        let router = kiln_api::router(
            kiln_api::Api::new(self.queue.clone(), self.storage.clone(), &cfg)
                .with_metrics(self.metrics_writer()),
        );
        // Long-polls hear of job changes made by workers in other processes.
        let listener_task = kiln_jobs::events::listen(self.ledger().db())
            .await
            .context("cannot listen for job changes")?;
        let maintenance = self.spawn_maintenance();
        let server = async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
                .context("the HTTP server stopped");
            if let Some(t) = listener_task {
                t.abort();
            }
            maintenance.abort();
            served
        };
        Ok((addr, server))
    }

    /// The cut-out model the kits of this process use, loaded, checked and installed: the one
    /// at `[generator] cutout_model` when set, else the built-in one. A missing or broken file
    /// is an error naming its path, before any kit runs.
    pub fn cutout_model(&self) -> anyhow::Result<kiln_assets::salient::Salient> {
        use kiln_assets::salient::{self, Salient};
        let model = match &self.settings.generator.cutout_model {
            Some(path) => Salient::load(std::path::Path::new(path))?,
            None => Salient::embedded()?,
        };
        if !salient::install(model.clone()) {
            let active = salient::active()?;
            if active.sha256 != model.sha256 {
                anyhow::bail!(
                    "the cut-out model {} cannot replace {} already in use in this process",
                    model.source,
                    active.source
                );
            }
        }
        Ok(model)
    }

    /// Runs the workers of `opts` and the maintenance loop until `shutdown` completes, then
    /// lets running kits finish within the grace period. Wrong storage settings stop it at
    /// once; a storage outage does not (kits retry until it ends).
    pub async fn work(
        &self,
        opts: WorkOptions,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        match self.storage.check().await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                tracing::warn!("storage is unreachable for now; kits will retry: {e}");
            }
            Err(e) => return Err(e).context("storage refused the worker's settings"),
        }
        let model = self.cutout_model()?;
        tracing::info!(model = %model.source, sha256 = %model.sha256, "cut-out model loaded");
        let cfg = self.worker_config(&opts);
        tracing::info!(
            worker = %cfg.name,
            queues = ?cfg.queues.iter().map(|k| k.queue()).collect::<Vec<_>>(),
            concurrency = cfg.concurrency,
            "kiln work started"
        );
        let maintenance = self.spawn_maintenance();
        let result = kit_worker::run(self.deps(), cfg, shutdown).await;
        maintenance.abort();
        result.context("the worker stopped")
    }
}
