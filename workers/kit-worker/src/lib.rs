//! The kit worker: apalis workers on the queues `kits.essentials` and `kits.caratzon`, with the
//! mitigations of DESIGN.md §5 — a unique worker name per process start, batch size 1, a short
//! heartbeat (rescue of a dead worker's task in seconds), LISTEN/NOTIFY pickup on PostgreSQL and
//! a short poll on SQLite, kiln's own backoff (apalis only redelivers after a crash), fencing on
//! `kit_jobs`, and a grace period on shutdown. A backend failure ends `run` with an error, so
//! `kiln work` exits non-zero and its supervisor restarts it.

pub mod job;
mod metrics;

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use kiln_core::Kit;
use kiln_jobs::{KitTask, WorkerName};
use kiln_ledger::Db;
use tracing::Instrument;

pub use job::{Deadlines, Deps, Faults, Outcome, Retry};
pub use metrics::WorkerMetrics;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique per process start: `kiln-<host>-<pid>-<random>`.
    pub name: String,
    pub queues: Vec<Kit>,
    /// Jobs run at once per queue.
    pub concurrency: usize,
    pub heartbeat: Duration,
    /// Missed heartbeats before another worker takes this one's tasks.
    pub missed_heartbeats: usize,
    /// On shutdown, how long running kits may take to finish before the process stops.
    pub grace: Duration,
    /// How often an idle SQLite worker looks for new tasks (PostgreSQL is notified).
    pub poll: Duration,
}

impl WorkerConfig {
    pub fn new(queues: Vec<Kit>, concurrency: usize) -> WorkerConfig {
        WorkerConfig {
            name: unique_name(),
            queues,
            concurrency: concurrency.max(1),
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 3,
            grace: Duration::from_secs(60),
            poll: Duration::from_millis(100),
        }
    }
}

/// `kiln-<host>-<pid>-<random>`: a restarted process never takes over a dead one's name (apalis
/// would not recover that name's running tasks).
pub fn unique_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!(
        "kiln-{host}-{}-{:08x}",
        std::process::id(),
        u32::from_le_bytes(r)
    )
}

/// Wakes an idle SQLite worker every `interval` to look for tasks. (apalis's own
/// `IntervalStrategy` re-arms its timer without polling it, so after the first tick nothing wakes
/// the worker until its heartbeat: a job queued behind another waited ~5 s.)
/// Once the process is stopping it fires no more: no new fetch starts.
#[derive(Debug)]
struct Tick {
    interval: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    draining: Arc<Draining>,
}

impl Tick {
    fn new(interval: Duration, draining: Arc<Draining>) -> Tick {
        Tick {
            interval,
            sleep: Box::pin(tokio::time::sleep(interval)),
            draining,
        }
    }
}

/// Whether the process is stopping, and how many kits run in it. On SQLite apalis is told to
/// stop only once no kit runs: apalis-sqlite fetches inside a transaction, and a fetch caught
/// mid-transaction when apalis stops polling keeps the database's one write lock until apalis
/// lets go of it — after the running kits, which need that lock for every progress, lease and
/// finishing write: a deadlock until the grace period ran out (1 shutdown in 5 in the worker
/// suite). So on SQLite, stopping first stops new fetches (`Tick`), waits for the running kits,
/// then stops apalis.
#[derive(Debug, Default)]
struct Draining {
    stopping: std::sync::atomic::AtomicBool,
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// A kit running: counted until dropped.
struct Running<'a>(&'a Draining);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Draining {
    fn enter(&self) -> Running<'_> {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Running(self)
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Until no kit runs.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl apalis_core::backend::ext::poll_strategy::PollStrategy for Tick {
    fn poll_drive(
        &mut self,
        cx: &mut std::task::Context<'_>,
        _: &apalis_core::backend::ext::poll_strategy::PollSnapshot,
    ) -> std::task::Poll<Option<()>> {
        use std::future::Future;
        if self.draining.is_stopping() {
            return std::task::Poll::Pending;
        }
        let mut fired = false;
        // Re-arm and poll again until the timer is pending, so a waker is always registered.
        while self.sleep.as_mut().poll(cx).is_ready() {
            fired = true;
            let next = tokio::time::Instant::now() + self.interval;
            self.sleep.as_mut().reset(next);
        }
        if fired {
            std::task::Poll::Ready(Some(()))
        } else {
            std::task::Poll::Pending
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {name} stopped: {message}")]
    Stopped { name: String, message: String },
}

/// The kit of the queue a worker serves (its tasks carry only the job id).
#[derive(Clone, Copy, Debug)]
struct QueueKit(Kit);

async fn handle(
    task: KitTask,
    id: TaskId,
    deps: Data<Arc<Deps>>,
    draining: Data<Arc<Draining>>,
    kit: Data<QueueKit>,
    worker: WorkerContext,
) -> Result<(), BoxDynError> {
    let QueueKit(kit) = *kit;
    let _running = draining.enter();
    let _in_flight = deps.metrics.enter(kit);
    let started = std::time::Instant::now();
    let task_id = id.to_string().parse()?;
    let span = tracing::info_span!(
        "kit",
        job = %task.job,
        kit = %kit,
        account = tracing::field::Empty,
        attempt = tracing::field::Empty,
        fence = tracing::field::Empty,
    );
    let ran = job::run(&deps, &task.job, &task_id, &WorkerName::new(worker.name()))
        .instrument(span)
        .await;
    let seconds = started.elapsed().as_secs_f64();
    match ran {
        Ok(outcome) => {
            deps.metrics.attempt(kit, Some(&outcome), seconds);
            tracing::debug!(job = %task.job, ?outcome, "delivery done");
            Ok(())
        }
        // The database is unreachable: let apalis redeliver (a bounded number of times); the
        // job's own state is untouched, and the reconciler picks up what is left.
        Err(e) => {
            deps.metrics.attempt(kit, None, seconds);
            Err(e.into())
        }
    }
}

/// Waits for every queue's worker task to end. The first that ends with an error or dies (a
/// panic: its `JoinError`) is recorded and stops the others, so the process exits non-zero and
/// its supervisor restarts it, instead of living on with one queue dead (issue 12, defect 5).
async fn supervise(
    set: &mut tokio::task::JoinSet<Result<(), WorkerError>>,
    stop: &tokio::sync::watch::Sender<bool>,
    name: &str,
    first_error: &mut Option<WorkerError>,
) {
    while let Some(r) = set.join_next().await {
        let e = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => WorkerError::Stopped {
                name: name.to_owned(),
                message: if e.is_panic() {
                    format!("a queue's worker task panicked: {e}")
                } else {
                    format!("a queue's worker task ended: {e}")
                },
            },
        };
        tracing::error!("{e}; stopping the other queues");
        first_error.get_or_insert(e);
        let _ = stop.send(true);
    }
}

/// Runs workers for every configured queue until `shutdown` completes, then lets running kits
/// finish within the grace period.
pub async fn run(
    deps: Deps,
    cfg: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let deps = Arc::new(deps);
    let draining = Arc::new(Draining::default());
    let sqlite = matches!(deps.ledger.db(), Db::Sqlite(_));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    let mut set = tokio::task::JoinSet::new();
    for kit in &cfg.queues {
        let name = format!("{}-{}", cfg.name, kit.as_str());
        let signal = {
            let mut rx = stop_rx.clone();
            let draining = draining.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
                draining
                    .stopping
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                // See `Draining`: on SQLite, apalis stops after the running kits.
                if sqlite {
                    draining.idle().await;
                }
                Ok::<(), std::io::Error>(())
            }
        };
        let deps = deps.clone();
        let draining = draining.clone();
        let cfg = cfg.clone();
        let kit = *kit;
        set.spawn(async move {
            // The same worker on either backend (their types differ).
            macro_rules! work {
                ($backend:expr) => {
                    WorkerBuilder::new(name.as_str())
                        .backend($backend)
                        .data(deps.clone())
                        .data(draining.clone())
                        .data(QueueKit(kit))
                        .concurrency(cfg.concurrency)
                        .build(handle)
                        .run_until(signal)
                        .await
                };
            }
            let result = match deps.ledger.db() {
                Db::Postgres(pool) => {
                    let config = apalis_postgres::Config::default()
                        .queue(kit.queue())
                        .batch_size(1)
                        .heartbeat_interval(cfg.heartbeat)
                        .missed_heartbeats(cfg.missed_heartbeats);
                    let backend = apalis_postgres::PostgresStorage::<KitTask>::new(pool)
                        .with_config(config)
                        .with_pubsub();
                    work!(backend)
                }
                Db::Sqlite(pool) => {
                    let config = apalis_sqlite::Config::default()
                        .queue(kit.queue())
                        .batch_size(1)
                        .heartbeat_interval(cfg.heartbeat)
                        .missed_heartbeats(cfg.missed_heartbeats);
                    let backend = apalis_core::backend::ext::poll_strategy::PollWith::new(
                        apalis_sqlite::SqliteStorage::<KitTask>::new(pool).with_config(config),
                        Tick::new(cfg.poll, draining.clone()),
                    );
                    work!(backend)
                }
            };
            result.map_err(|e| WorkerError::Stopped {
                name,
                message: e.to_string(),
            })
        });
    }
    let grace = cfg.grace;
    let mut stopping = stop_rx.clone();
    let mut first_error = None;
    let drain = supervise(&mut set, &stop_tx, &cfg.name, &mut first_error);
    tokio::select! {
        () = drain => {}
        () = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            let handed = async {
                let mut tx = deps.ledger.db().begin().await?;
                let n = kiln_jobs::hand_back(&mut tx, deps.ledger.ctx().now, &cfg.name).await?;
                tx.commit().await?;
                Ok::<u32, kiln_jobs::JobsError>(n)
            }
            .await;
            match handed {
                Ok(n) => {
                    deps.metrics.handed_back(n);
                    tracing::warn!(grace_s = grace.as_secs(), handed_back = n, "grace period over; kits still running were handed back");
                }
                Err(e) => tracing::error!("grace period over; handing kits back failed (their leases will run out): {e}"),
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One queue's task panics while another waits for the stop signal: the supervisor records
    /// the panic as the process's error and stops the other queue, so `run` returns an error
    /// (and `kiln work` exits non-zero) instead of living on with one queue dead.
    #[tokio::test]
    async fn a_queue_task_that_panics_stops_the_others_and_is_the_error() {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut set = tokio::task::JoinSet::new();
        let mut rx = stop_rx.clone();
        set.spawn(async move {
            // The healthy queue: runs until told to stop.
            let _ = rx.wait_for(|s| *s).await;
            Ok(())
        });
        set.spawn(async { panic!("a bug in a kit") });
        let mut first_error = None;
        // The bound only turns a hang (the healthy queue never told to stop) into a failure.
        tokio::time::timeout(
            Duration::from_secs(30),
            supervise(&mut set, &stop_tx, "w1", &mut first_error),
        )
        .await
        .expect("the supervisor stopped the healthy queue");
        assert!(*stop_rx.borrow(), "the stop signal was sent");
        let e = first_error.expect("the panic is the error").to_string();
        assert!(e.contains("panicked") && e.contains("w1"), "{e}");
    }
}
