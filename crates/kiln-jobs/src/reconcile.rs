//! Repairs and checks: the reconciler resolves the held charges of ended jobs and gives orphaned
//! open jobs a new task (or fails them when out of attempts); the audit ties every job to its
//! charge on top of the ledger's own invariants.

use kiln_core::AccountId;
use kiln_ledger::{Breach, Ctx, Db, ReservationId, Tx, on_tx};
use serde::Serialize;

use crate::lifecycle::{Attempt, fail, requeue};
use crate::{Result, apalis};

/// What one reconciler pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reconciled {
    /// Held reservations of ended jobs, committed or released to match.
    pub charges_resolved: u32,
    /// Open jobs whose task had ended or vanished, given a new task.
    pub requeued: u32,
    /// Open jobs whose task had ended or vanished with no attempts left, failed and released.
    pub failed: u32,
}

/// Repairs what a crash can leave: a reservation still held for an ended job, and an open job
/// whose apalis task is gone or finished (pruned, killed, or marked done by a stale attempt)
/// and that nobody has touched for `stale_ms`.
///
/// Each repair is its own transaction, locking in the order every job path locks — the job, then
/// its reservation, then the account — and re-checking under those locks what it read before.
/// One transaction for all of them held the first job's account while it waited for the next
/// job, which a worker finishing that job (job, then reservation, then account) could hold:
/// PostgreSQL found the cycle and aborted one of them.
pub async fn reconcile(db: &Db, ctx: &Ctx<'_>, stale_ms: i64) -> Result<Reconciled> {
    let mut out = Reconciled::default();
    let mut read = db.begin_read().await?;
    let held: Vec<i64> = on_tx!(&mut read, c => sqlx::query_scalar(
        "SELECT r.id FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id \
         WHERE r.state = 'held' AND j.status IN ('succeeded', 'failed', 'cancelled')",
    )
    .fetch_all(&mut **c)
    .await?);
    let orphans = apalis::orphans(&mut read, ctx.now.millis() - stale_ms).await?;
    drop(read);
    for r in held {
        let mut tx = db.begin().await?;
        // The job first (locked on PostgreSQL; SQLite's writer lock covers it), then what
        // commit or release locks: the reservation, then the account.
        let sql = match &tx {
            Tx::Postgres(_) => {
                "SELECT j.status FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id \
                 WHERE r.id = $1 AND r.state = 'held' \
                 AND j.status IN ('succeeded', 'failed', 'cancelled') FOR UPDATE OF j"
            }
            Tx::Sqlite(_) => {
                "SELECT j.status FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id \
                 WHERE r.id = $1 AND r.state = 'held' \
                 AND j.status IN ('succeeded', 'failed', 'cancelled')"
            }
        };
        let status: Option<String> = on_tx!(&mut tx, c => sqlx::query_scalar(sql)
            .bind(r)
            .fetch_optional(&mut **c)
            .await?);
        match status.as_deref() {
            Some("succeeded") => {
                kiln_ledger::commit(&mut tx, ctx, ReservationId(r)).await?;
            }
            Some(_) => {
                kiln_ledger::release(&mut tx, ctx, ReservationId(r)).await?;
            }
            None => continue,
        }
        tx.commit().await?;
        out.charges_resolved += 1;
    }
    for (id, fence, attempts, max) in orphans {
        // `fail` and `requeue` are guarded by the fence the orphan was read with: a worker
        // that touched the job since has moved it on, and the repair does nothing.
        let mut tx = db.begin().await?;
        if attempts >= max {
            if fail(
                &mut tx,
                ctx,
                &id,
                fence,
                "attempts_exhausted",
                "the job's worker stopped and no attempts are left",
            )
            .await?
            {
                out.failed += 1;
            }
        } else if requeue(&mut tx, &id, fence, ctx.now, ctx.now, None, Attempt::Counts).await? {
            out.requeued += 1;
        }
        tx.commit().await?;
    }
    Ok(out)
}

/// Every job's status against its charge: ended jobs must have resolved charges that match
/// (succeeded = committed; failed or cancelled = released), open jobs must still hold theirs,
/// and every kit reservation must belong to a job. Part of [`audit`].
pub async fn check_charges(tx: &mut Tx) -> Result<Vec<Breach>> {
    let rows: Vec<(String, String, String, String)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT j.account_id, j.id, j.status, r.state FROM kit_jobs j \
         JOIN reservations r ON r.id = j.reservation_id \
         WHERE NOT ((j.status = 'succeeded' AND r.state = 'committed') \
           OR (j.status IN ('failed', 'cancelled') AND r.state = 'released') \
           OR (j.status IN ('queued', 'running') AND r.state = 'held'))",
    )
    .fetch_all(&mut **c)
    .await?);
    let mut out: Vec<Breach> = rows
        .into_iter()
        .map(|(account_id, id, status, state)| Breach {
            account_id,
            what: format!("job {id} is {status} but its charge is {state}"),
        })
        .collect();
    let lonely: Vec<(String, i64)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT r.account_id, r.id FROM reservations r LEFT JOIN kit_jobs j ON j.reservation_id = r.id \
         WHERE r.idempotency_key LIKE 'kit:%' AND j.id IS NULL",
    )
    .fetch_all(&mut **c)
    .await?);
    out.extend(lonely.into_iter().map(|(account_id, r)| Breach {
        account_id,
        what: format!("kit reservation {r} has no job"),
    }));
    Ok(out)
}

/// A job beside its reservation, as [`check_kits`] reads them.
#[derive(sqlx::FromRow)]
struct KitRow {
    id: String,
    account_id: String,
    idempotency_key: String,
    kit: String,
    status: String,
    cost: i64,
    manifest_key: Option<String>,
    r_account: String,
    r_key: String,
    r_action: String,
    r_list_price: i64,
}

/// Every job against what it was billed as: the kit's action, at the job's cost, on the job's
/// account under the job's key (kit ↔ action ↔ cost ↔ account); and a succeeded job names its
/// manifest, in its own directory. Part of [`audit`].
pub async fn check_kits(tx: &mut Tx) -> Result<Vec<Breach>> {
    let rows: Vec<KitRow> = on_tx!(tx, c => sqlx::query_as(
        "SELECT j.id, j.account_id, j.idempotency_key, j.kit, j.status, j.cost, j.manifest_key, \
         r.account_id AS r_account, r.idempotency_key AS r_key, r.action AS r_action, \
         r.list_price AS r_list_price \
         FROM kit_jobs j JOIN reservations r ON r.id = j.reservation_id ORDER BY j.id",
    )
    .fetch_all(&mut **c)
    .await?);
    let mut out = Vec::new();
    for j in rows {
        let mut breach = |what: String| {
            out.push(Breach {
                account_id: j.account_id.clone(),
                what: format!("job {}: {what}", j.id),
            })
        };
        match j.kit.parse::<kiln_core::Kit>() {
            Ok(kit) if kit.action().as_str() == j.r_action => {}
            _ => breach(format!("a kit of {} billed as {}", j.kit, j.r_action)),
        }
        if j.cost != j.r_list_price {
            breach(format!(
                "costs {} but its reservation's list price is {}",
                j.cost, j.r_list_price
            ));
        }
        if j.r_account != j.account_id {
            breach(format!("billed to account {}", j.r_account));
        }
        if j.r_key != crate::enqueue::reservation_key(&j.idempotency_key) {
            breach(format!(
                "its key {:?} but its reservation's {:?}",
                j.idempotency_key, j.r_key
            ));
        }
        let dir = format!("kits/{}/", j.id.to_lowercase());
        match (j.status.as_str(), &j.manifest_key) {
            ("succeeded", None) => breach("succeeded with no manifest".into()),
            (_, Some(m)) if !m.starts_with(&dir) => {
                breach(format!("its manifest {m} is outside {dir}"))
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The whole audit of a live database: the ledger's invariants (DESIGN.md §3) and every job
/// against its charge, for every account or for one. Empty means clean.
pub async fn audit(tx: &mut Tx, account: Option<AccountId>) -> Result<Vec<Breach>> {
    let mut out = kiln_ledger::audit(tx, account).await?;
    let mut jobs = check_charges(tx).await?;
    jobs.extend(check_kits(tx).await?);
    out.extend(
        jobs.into_iter()
            .filter(|b| account.is_none_or(|a| b.account_id == a.to_string())),
    );
    Ok(out)
}
