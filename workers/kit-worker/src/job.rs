//! One delivery of a kit job, independent of the queue engine: claim (new fencing token), load
//! the upload, generate, write every asset and then the manifest, and finish in one
//! transaction — succeeded + committed, or failed + released, or handed back with a delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kiln_assets::{Generator, KitError, Manifest, Step};
use kiln_core::{ProductSpec, Timestamp};
use kiln_jobs::{
    self as jobs, Claim, Fence, JobId, JobsError, KitJob, Progress, TaskId, WorkerName,
};
use kiln_ledger::Ledger;
use kiln_storage::{ObjectKey, Storage, StorageError};

/// What a worker needs to run jobs.
#[derive(Clone, Debug)]
pub struct Deps {
    pub ledger: Ledger,
    pub storage: Storage,
    pub generator: Generator,
    /// How long a kit waits before its next attempt after a retryable failure.
    pub retry: Retry,
    /// A running attempt renews its lease on the job every quarter of this; a delivery that
    /// finds the lease live leaves the job alone, and the reconciler repairs jobs whose lease
    /// ran out (their worker died).
    pub lease: Duration,
    /// How long one attempt may run, per kit: past it the attempt is abandoned and retried
    /// (a kit stuck in a storage or provider call would otherwise keep its lease alive, and
    /// its credits held, for ever).
    pub deadlines: Deadlines,
    /// What this process has done, for its `/metrics`.
    pub metrics: Arc<crate::WorkerMetrics>,
    /// Faults to inject (chaos testing; none by default).
    pub faults: Faults,
}

/// Faults injected on purpose, to prove retries and releases under failure (`make chaos`).
/// Off by default; `KILN_FAULT_GENERATOR_FAILURES` sets the share of attempts whose generation
/// fails (a retryable `injected_fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// The share of attempts, 0 to 1, that fail as the generator starts.
    pub generator_failures: f64,
}

/// How long one attempt of each kit may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    pub essentials: Duration,
    pub caratzon: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            essentials: Duration::from_secs(300),
            caratzon: Duration::from_secs(900),
        }
    }
}

impl Deadlines {
    pub fn for_kit(&self, kit: kiln_core::Kit) -> Duration {
        match kit {
            kiln_core::Kit::Essentials => self.essentials,
            kiln_core::Kit::Caratzon => self.caratzon,
        }
    }
}

impl Deps {
    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// How one delivery ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed {
        code: String,
    },
    /// Handed back to the queue to run again after a delay.
    Retrying {
        code: String,
        run_at: Timestamp,
    },
    /// Nothing done: the job had ended, the task was superseded, or a newer attempt owns it.
    Skipped,
    /// The job ran out of attempts at claim time and was failed.
    GaveUp,
}

/// A failure while running a job, sorted by what to do about it.
#[derive(Debug)]
enum RunError {
    Retry {
        code: &'static str,
        message: String,
    },
    Fail {
        code: &'static str,
        message: String,
    },
    /// A newer attempt owns the job: stop without writing anything more.
    Superseded,
}

impl From<StorageError> for RunError {
    fn from(e: StorageError) -> Self {
        if e.is_retryable() {
            RunError::Retry {
                code: "storage_unavailable",
                message: e.to_string(),
            }
        } else {
            RunError::Fail {
                code: "storage_error",
                message: e.to_string(),
            }
        }
    }
}

impl From<KitError> for RunError {
    fn from(e: KitError) -> Self {
        if e.is_retryable() {
            RunError::Retry {
                code: e.code(),
                message: e.to_string(),
            }
        } else {
            RunError::Fail {
                code: e.code(),
                message: e.to_string(),
            }
        }
    }
}

/// Database trouble while working: worth another attempt later.
impl From<JobsError> for RunError {
    fn from(e: JobsError) -> Self {
        RunError::Retry {
            code: "database_unavailable",
            message: e.to_string(),
        }
    }
}

/// Runs one delivery of `task` for job `id` as `worker`.
pub async fn run(
    deps: &Deps,
    id: &JobId,
    task: &TaskId,
    worker: &WorkerName,
) -> Result<Outcome, JobsError> {
    let claim = {
        let mut tx = deps.ledger.db().begin().await?;
        let c = jobs::claim(
            &mut tx,
            &deps.ledger.ctx(),
            id,
            task,
            worker,
            deps.lease_ms(),
        )
        .await?;
        tx.commit().await?;
        jobs::events::changed(id);
        c
    };
    let (job, fence) = match claim {
        Claim::Run { job, fence } => (job, fence),
        Claim::Finished(_) | Claim::Busy => return Ok(Outcome::Skipped),
        Claim::GaveUp(_) => return Ok(Outcome::GaveUp),
    };
    // Every line of this attempt from here on carries who and which attempt (in JSON logs
    // too, `RUST_LOG_FORMAT=json`): the span opened by the worker's handler.
    let span = tracing::Span::current();
    span.record("account", tracing::field::display(job.account_id));
    span.record("attempt", job.attempts);
    span.record("fence", fence.0);
    tracing::info!(job = %job.id, kit = %job.kit, attempt = job.attempts, fence = fence.0, "kit job started");
    let superseded = Arc::new(AtomicBool::new(false));
    // Stops with this attempt however it ends: returned, panicked or dropped (a renewer that
    // outlived its attempt would hold the job's lease, and its credits, forever).
    let lease = {
        let (deps, id, superseded) = (deps.clone(), job.id.clone(), superseded.clone());
        Renewer::start(deps.lease / 4, move || {
            renew_lease(deps.clone(), id.clone(), fence, superseded.clone())
        })
    };
    let deadline = deps.deadlines.for_kit(job.kit);
    let worked = tokio::time::timeout(deadline, work(deps, &job, fence, &superseded))
        .await
        .unwrap_or_else(|_| {
            Err(RunError::Retry {
                code: "deadline_exceeded",
                message: format!(
                    "the attempt was still running after its deadline ({} s); abandoned",
                    deadline.as_secs_f64()
                ),
            })
        });
    drop(lease);
    match worked {
        Ok(Published {
            manifest_key,
            generate,
            publish,
        }) => {
            let mut tx = deps.ledger.db().begin().await?;
            let won = jobs::succeed(&mut tx, &deps.ledger.ctx(), id, fence, &manifest_key).await?;
            tx.commit().await?;
            jobs::events::changed(id);
            if won {
                tracing::info!(
                    job = %job.id,
                    generate_ms = generate.as_secs_f64() * 1000.0,
                    publish_ms = publish.as_secs_f64() * 1000.0,
                    "kit job succeeded; charge committed"
                );
                Ok(Outcome::Succeeded)
            } else {
                tracing::warn!(job = %job.id, fence = fence.0, "a newer attempt owns the job; not finishing");
                Ok(Outcome::Skipped)
            }
        }
        Err(RunError::Superseded) => {
            tracing::warn!(job = %job.id, fence = fence.0, "superseded by a newer attempt; stopped");
            Ok(Outcome::Skipped)
        }
        Err(RunError::Retry { code, message }) if job.attempts < job.max_attempts => {
            let delay = deps.retry.delay(job.attempts);
            let now = deps.ledger.ctx().now;
            let run_at = now.plus_millis(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            let mut tx = deps.ledger.db().begin().await?;
            let handed = jobs::retry_later(&mut tx, now, id, fence, run_at, code, &message).await?;
            tx.commit().await?;
            jobs::events::changed(id);
            tracing::warn!(job = %job.id, code, %message, retry_in_ms = delay.as_millis(), "kit job will be retried");
            Ok(if handed {
                Outcome::Retrying {
                    code: code.to_owned(),
                    run_at,
                }
            } else {
                Outcome::Skipped
            })
        }
        Err(RunError::Retry { code, message } | RunError::Fail { code, message }) => {
            let mut tx = deps.ledger.db().begin().await?;
            let done = jobs::fail(&mut tx, &deps.ledger.ctx(), id, fence, code, &message).await?;
            tx.commit().await?;
            jobs::events::changed(id);
            tracing::warn!(job = %job.id, code, %message, "kit job failed; charge released");
            Ok(if done {
                Outcome::Failed {
                    code: code.to_owned(),
                }
            } else {
                Outcome::Skipped
            })
        }
    }
}

/// The directory an attempt writes its kit under: `kits/<job>/fence-<n>`, its fencing token's.
/// Two attempts never write the same key, so an attempt that lost the job (its lease ran out
/// while it was still writing) cannot overwrite a file the winner's manifest names — with the
/// AI generator, whose bytes differ from run to run, that made the manifest's sha256 stop
/// matching the stored file. The job records the winner's manifest key when it succeeds.
pub fn kit_dir(job: &JobId, fence: Fence) -> String {
    format!("kits/{}/fence-{}", job.as_str().to_lowercase(), fence.0)
}

/// The key of `path` in the kit an attempt writes ([`kit_dir`]).
pub fn kit_key(job: &JobId, fence: Fence, path: &str) -> Result<ObjectKey, kiln_storage::KeyError> {
    ObjectKey::kit(
        &job.as_str().to_lowercase(),
        &format!("fence-{}/{path}", fence.0),
    )
}

/// A task that runs `renew` every `every` until it returns `false` or this is dropped. A drop
/// stops it between two renewals and never in the middle of one: a database future cancelled
/// mid-flight can leave its pooled connection out of step with the server (a message half
/// written, a reply counted that never comes), and the next borrower — apalis's fetch, in the
/// storage-outage test — then waits for ever on a connection the server sees as idle. It was
/// aborted at the end of every attempt.
#[derive(Debug)]
pub struct Renewer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Renewer {
    pub fn start<F, Fut>(every: Duration, mut renew: F) -> Renewer
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send + 'static,
    {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return,
                    _ = tick.tick() => {}
                }
                // Not raced against the stop: a renewal once begun runs to its end.
                if !renew().await {
                    return;
                }
            }
        });
        Renewer { stop: Some(stop) }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Renews the lease once; `false` (stop renewing) when a newer attempt has taken the job, which
/// it flags in `superseded`.
async fn renew_lease(deps: Deps, id: JobId, fence: Fence, superseded: Arc<AtomicBool>) -> bool {
    let renewed = async {
        let mut tx = deps.ledger.db().begin().await?;
        let ok = jobs::renew_lease(&mut tx, deps.ledger.ctx().now, &id, fence).await?;
        tx.commit().await?;
        Ok::<bool, JobsError>(ok)
    }
    .await;
    match renewed {
        Ok(true) => true,
        Ok(false) => {
            superseded.store(true, Ordering::SeqCst);
            false
        }
        Err(e) => {
            tracing::warn!(job = %id, "lease not renewed: {e}");
            true
        }
    }
}

/// Delays between attempts: the first `base`, each later one four times the one before
/// (5 s, 20 s, 80 s ...), never more than `max`. Without the cap, a kit allowed many attempts
/// waited up to an hour between two (with 12 attempts and a 100 ms base, the eighth retry came
/// 27 minutes after the seventh failure), its credits held all that time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            base: Duration::from_secs(5),
            max: Duration::from_secs(600),
        }
    }
}

impl Retry {
    /// The wait after attempt number `attempt` (1 for the first) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 4u32.saturating_pow(attempt.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// A kit written to storage.
struct Published {
    manifest_key: String,
    /// Reading the upload, parsing the spec and rendering.
    generate: Duration,
    /// Writing the files and the manifest (the writes alone, without the ownership checks).
    publish: Duration,
}

/// Generates and publishes the kit.
async fn work(
    deps: &Deps,
    job: &KitJob,
    fence: Fence,
    superseded: &Arc<AtomicBool>,
) -> Result<Published, RunError> {
    let upload_key = ObjectKey::parse(&job.upload_key).map_err(|e| RunError::Fail {
        code: "upload_missing",
        message: e.to_string(),
    })?;
    let started = std::time::Instant::now();
    let upload: Bytes = match deps.storage.get(&upload_key).await {
        Err(StorageError::NotFound(_)) => {
            return Err(RunError::Fail {
                code: "upload_missing",
                message: format!("the upload {} is gone from storage", job.upload_key),
            });
        }
        other => other?,
    };
    let spec = ProductSpec::from_json(job.spec.as_bytes()).map_err(|e| RunError::Fail {
        code: "invalid_spec",
        message: e.to_string(),
    })?;

    if deps.faults.generator_failures > 0.0 && fastrand::f64() < deps.faults.generator_failures {
        return Err(RunError::Retry {
            code: "injected_fault",
            message:
                "the generator failed (a fault injected on purpose: KILN_FAULT_GENERATOR_FAILURES)"
                    .into(),
        });
    }

    // Progress goes to the database from an async task; the renderer only sends steps.
    let (steps, mut rx) = tokio::sync::mpsc::unbounded_channel::<Step>();
    let recorder = {
        let ledger = deps.ledger.clone();
        let (id, superseded) = (job.id.clone(), superseded.clone());
        tokio::spawn(async move {
            while let Some(step) = rx.recv().await {
                let p = Progress {
                    step: Some(step.name.to_owned()),
                    done: step.done,
                    total: step.total,
                };
                let written = async {
                    let mut tx = ledger.db().begin().await?;
                    let ok = jobs::progress(&mut tx, ledger.ctx().now, &id, fence, &p).await?;
                    tx.commit().await?;
                    jobs::events::changed(&id);
                    Ok::<bool, JobsError>(ok)
                }
                .await;
                match written {
                    Ok(false) => superseded.store(true, Ordering::SeqCst),
                    Ok(true) => {}
                    Err(e) => tracing::warn!(job = %id, "progress not recorded: {e}"),
                }
            }
        })
    };
    let generated = deps
        .generator
        .generate(
            Arc::from(upload.as_ref()),
            &spec,
            job.kit,
            Arc::new(move |s| {
                let _ = steps.send(s);
            }),
        )
        .await;
    let generate = started.elapsed();
    // All progress is written (or refused) before anything is published.
    let _ = recorder.await;
    let assets = generated?;
    if superseded.load(Ordering::SeqCst) {
        return Err(RunError::Superseded);
    }

    let building = std::time::Instant::now();
    let manifest = Manifest::in_dir(
        &kit_dir(&job.id, fence),
        job.id.as_str(),
        job.kit,
        deps.generator.name(),
        &assets,
    );
    let files = assets
        .iter()
        .map(|a| (a.path.as_str(), a.bytes.clone(), a.content_type))
        // The manifest last: its presence means the kit is complete.
        .chain([("manifest.json", manifest.to_json(), "application/json")]);
    let mut manifest_key = String::new();
    let mut publish = building.elapsed();
    for (path, bytes, content_type) in files {
        let key = kit_key(&job.id, fence, path).map_err(StorageError::from)?;
        // Before the first asset and before the manifest: is the job still ours? (Between
        // checks a superseded attempt may still write, but only under its own fence's
        // directory: never a file of the attempt that won, whose manifest the job names.)
        let check =
            manifest_key.is_empty() || path == "manifest.json" || superseded.load(Ordering::SeqCst);
        if check {
            let mut tx = deps
                .ledger
                .db()
                .begin_read()
                .await
                .map_err(JobsError::from)?;
            let still_ours = jobs::owns(&mut tx, &job.id, fence).await?;
            drop(tx);
            if !still_ours {
                return Err(RunError::Superseded);
            }
        }
        let writing = std::time::Instant::now();
        deps.storage
            .put(&key, Bytes::from(bytes), content_type)
            .await?;
        publish += writing.elapsed();
        manifest_key = key.as_str().to_owned();
    }
    Ok(Published {
        manifest_key,
        generate,
        publish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_four_fold_up_to_their_cap() {
        let r = Retry {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let delays: Vec<u128> = (1..=12).map(|a| r.delay(a).as_millis()).collect();
        assert_eq!(
            delays,
            [
                100, 400, 1600, 2000, 2000, 2000, 2000, 2000, 2000, 2000, 2000, 2000
            ]
        );
        // The production default: 5 s, 20 s, 80 s, 320 s, then 10 minutes at most.
        let d = Retry::default();
        assert_eq!(
            (1..=6).map(|a| d.delay(a).as_secs()).collect::<Vec<_>>(),
            [5, 20, 80, 320, 600, 600]
        );
        // No overflow however many attempts an operator allows.
        assert_eq!(d.delay(u32::MAX), Duration::from_secs(600));
    }

    /// The renewer of an attempt whose future is dropped (or unwinds from a panic) stops with
    /// it: before, it was aborted only after the attempt returned, and a dropped attempt left it
    /// renewing the lease forever. And it stops between renewals: one under way when the
    /// attempt ends runs to its end (an aborted one could leave its database connection out of
    /// step with the server, and the next query on it hung).
    #[tokio::test]
    async fn a_renewer_stops_with_its_owner_but_finishes_the_renewal_under_way() {
        let (started_tx, started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let gate = Arc::new(tokio::sync::Notify::new());
        let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let owner = {
            let (gate, finished) = (gate.clone(), finished.clone());
            async move {
                Renewer::start(Duration::from_millis(1), move || {
                    let (started_tx, gate, finished) =
                        (started_tx.clone(), gate.clone(), finished.clone());
                    async move {
                        let _ = started_tx.send(());
                        gate.notified().await;
                        finished.fetch_add(1, Ordering::SeqCst);
                        true
                    }
                })
            }
        };
        let renewer = owner.await;
        let mut started = started;
        started.recv().await.expect("a renewal began");
        // The owner ends while that renewal waits: the renewal is not cut short ...
        drop(renewer);
        gate.notify_one();
        // (The bound only turns a hang into a failure.)
        tokio::time::timeout(Duration::from_secs(30), async {
            while finished.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the renewal under way ran to its end");
        // ... and no other begins: the renewer has stopped.
        assert!(
            tokio::time::timeout(Duration::from_secs(30), started.recv())
                .await
                .expect("the renewer ended")
                .is_none(),
            "a renewal began after the owner was dropped"
        );
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }
}
