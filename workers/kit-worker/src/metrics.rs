//! What one worker process has done, for its `/metrics`: kits in flight, attempt durations by kit
//! and outcome, retries by cause, hand-backs, and the maintenance loop's repairs and audit.
//! Counters live in memory and start at zero with the process, as Prometheus counters do;
//! queue depths and credit totals are the database's and are read at scrape time by the API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use kiln_core::Kit;
use kiln_core::prom::{Histogram, family};

use crate::Outcome;

/// Upper bounds of the attempt-duration histogram, in seconds: kits take seconds to minutes.
const BOUNDS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0];

#[derive(Debug)]
pub struct WorkerMetrics {
    in_flight: [AtomicI64; 2],
    attempts: Mutex<BTreeMap<(Kit, &'static str), Histogram>>,
    retries: Mutex<BTreeMap<(Kit, String), u64>>,
    hand_backs: AtomicU64,
    maintenance: Mutex<BTreeMap<&'static str, u64>>,
    /// Breaches found by the last audit of the maintenance loop; -1 before the first.
    audit_breaches: AtomicI64,
    audits: AtomicU64,
}

fn slot(kit: Kit) -> usize {
    match kit {
        Kit::Essentials => 0,
        Kit::Caratzon => 1,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a kit in flight until dropped, however its attempt ends.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The one way to start: nothing counted, and no audit run yet (-1, not a clean 0).
impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            in_flight: Default::default(),
            attempts: Mutex::default(),
            retries: Mutex::default(),
            hand_backs: AtomicU64::new(0),
            maintenance: Mutex::default(),
            audit_breaches: AtomicI64::new(-1),
            audits: AtomicU64::new(0),
        }
    }
}

impl WorkerMetrics {
    pub fn enter(&self, kit: Kit) -> InFlight<'_> {
        let g = &self.in_flight[slot(kit)];
        g.fetch_add(1, Ordering::Relaxed);
        InFlight(g)
    }

    /// One delivery of a kit: how it ended and how long it took. `None`: the database failed
    /// under it (the delivery is redelivered).
    pub fn attempt(&self, kit: Kit, outcome: Option<&Outcome>, seconds: f64) {
        let label = match outcome {
            Some(Outcome::Succeeded) => "succeeded",
            Some(Outcome::Failed { .. }) => "failed",
            Some(Outcome::Retrying { .. }) => "retried",
            Some(Outcome::Skipped) => "skipped",
            Some(Outcome::GaveUp) => "gave_up",
            None => "error",
        };
        lock(&self.attempts)
            .entry((kit, label))
            .or_insert_with(|| Histogram::new(&BOUNDS))
            .observe(seconds);
        if let Some(Outcome::Retrying { code, .. }) = outcome {
            *lock(&self.retries).entry((kit, code.clone())).or_default() += 1;
        }
    }

    pub fn handed_back(&self, n: u32) {
        self.hand_backs.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    /// What a maintenance pass repaired, by kind (`requeued`, `failed`, `charges_resolved`,
    /// `holds_expired`).
    pub fn maintained(&self, kind: &'static str, n: u64) {
        *lock(&self.maintenance).entry(kind).or_default() += n;
    }

    pub fn audited(&self, breaches: usize) {
        self.audit_breaches.store(
            i64::try_from(breaches).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        self.audits.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of everything above.
    pub fn render(&self, out: &mut String) {
        family(
            out,
            "kiln_worker_kits_in_flight",
            "gauge",
            "Kits this process is running now, by kit.",
        );
        for kit in [Kit::Essentials, Kit::Caratzon] {
            let n = self.in_flight[slot(kit)].load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln_worker_kits_in_flight{{kit=\"{kit}\"}} {n}");
        }
        family(
            out,
            "kiln_kit_attempt_duration_seconds",
            "histogram",
            "Kit deliveries by kit and outcome (succeeded, failed, retried, skipped, gave_up, error), and how long each took.",
        );
        for ((kit, outcome), h) in lock(&self.attempts).iter() {
            let labels = format!("kit=\"{kit}\",outcome=\"{outcome}\"");
            h.render(out, "kiln_kit_attempt_duration_seconds", &labels);
        }
        family(
            out,
            "kiln_kit_retries_total",
            "counter",
            "Attempts that ended in a retry, by kit and cause.",
        );
        for ((kit, code), n) in lock(&self.retries).iter() {
            let _ = writeln!(
                out,
                "kiln_kit_retries_total{{kit=\"{kit}\",code=\"{code}\"}} {n}"
            );
        }
        single(
            out,
            ("kiln_kit_hand_backs_total", "counter"),
            "Kits still running at the end of a shutdown's grace period, handed back to the queue.",
            self.hand_backs.load(Ordering::Relaxed),
        );
        family(
            out,
            "kiln_maintenance_repairs_total",
            "counter",
            "What this process's maintenance passes repaired: jobs requeued or failed after their worker died (rescues), charges of ended jobs resolved, holds expired.",
        );
        let repairs = lock(&self.maintenance);
        for kind in ["requeued", "failed", "charges_resolved", "holds_expired"] {
            let n = repairs.get(kind).copied().unwrap_or_default();
            let _ = writeln!(out, "kiln_maintenance_repairs_total{{kind=\"{kind}\"}} {n}");
        }
        drop(repairs);
        single(
            out,
            ("kiln_audit_breaches", "gauge"),
            "Breaches the last periodic audit found (-1: none run yet). Anything above 0 pages.",
            self.audit_breaches.load(Ordering::Relaxed),
        );
        single(
            out,
            ("kiln_audits_total", "counter"),
            "Periodic audits this process ran.",
            self.audits.load(Ordering::Relaxed),
        );
    }
}

/// A family of one unlabelled sample.
fn single(out: &mut String, (name, kind): (&str, &str), help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}
