//! Concurrent kit orders on one account: no overselling, one job per key, every caller of a key
//! given the same job. Run against PostgreSQL and SQLite with several connections.

mod common;

use kiln_ledger::backends;

use std::collections::HashMap;
use std::sync::Arc;

use common::Harness;
use kiln_core::Kit;
use kiln_jobs::{self as jobs, JobId, JobsError, NewJob, Queue};
use kiln_ledger::{Backend, LedgerError, NewAccount, PlanId, Pricing};
use tokio::task::JoinSet;

backends!(kit_submits_race_for_twenty_slots_with_replays);

async fn harness(backend: Backend) -> (Harness, kiln_ledger::AccountId) {
    let h = kiln_jobs::testing::harness(backend, Pricing::default(), 16).await;
    let new = NewAccount {
        plan: PlanId::Discover,
        is_admin: false,
        email: None,
        monthly_allowance: None,
    };
    let id = h
        .ledger
        .create_account(new)
        .await
        .expect("create")
        .account
        .id;
    (h, id)
}

/// Sixty kit orders at once, each of thirty keys sent twice, for twenty Essentials' worth of
/// credits: exactly twenty jobs, one per key at most, each with its one task and its hold, and
/// every caller of a key that got a job is given that same job.
async fn kit_submits_race_for_twenty_slots_with_replays(backend: Backend) {
    let (h, id) = harness(backend).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(60));
    let mut set = JoinSet::new();
    for i in 0..60 {
        let (queue, barrier) = (Queue::new(h.ledger.clone()), barrier.clone());
        set.spawn(async move {
            let key = format!("order-{}", i % 30);
            barrier.wait().await;
            let new = NewJob {
                account: id,
                kit: Kit::Essentials,
                idempotency_key: &key,
                upload_key: "uploads/a.jpg",
                spec: "{}",
                max_attempts: 2,
            };
            let got = jobs::submit(&queue, &new).await;
            (key, got)
        });
    }
    let mut by_key: HashMap<String, Vec<jobs::Enqueued>> = HashMap::new();
    let mut short = 0;
    while let Some(res) = set.join_next().await {
        match res.expect("task") {
            (key, Ok(e)) => by_key.entry(key).or_default().push(e),
            (_, Err(JobsError::Ledger(LedgerError::InsufficientCredits { .. }))) => short += 1,
            (_, Err(e)) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(by_key.len(), 20, "twenty keys got a job");
    assert_eq!(
        by_key.values().flatten().filter(|e| !e.replayed).count(),
        20,
        "one new job per key"
    );
    assert_eq!(by_key.values().map(Vec::len).sum::<usize>() + short, 60);
    let mut tx = h.ledger.db().begin_read().await.expect("begin");
    let stored = jobs::jobs(&mut tx, id, None, None, 100)
        .await
        .expect("jobs");
    drop(tx);
    assert_eq!(stored.len(), 20);
    for job in &stored {
        for e in &by_key[&job.idempotency_key] {
            assert_eq!(&e.job, job, "every caller of the key sees the stored job");
        }
    }
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!((b.available.get(), b.held.get()), (0, 200));
    let mut queued: Vec<JobId> = common::tasks(h.ledger.db(), "kits.essentials")
        .await
        .into_iter()
        .map(|(_, t)| t.job)
        .collect();
    let mut ids: Vec<JobId> = stored.iter().map(|j| j.id.clone()).collect();
    queued.sort();
    ids.sort();
    assert_eq!(queued, ids, "one task per job");
    assert!(h.ledger.audit().await.expect("audit").is_empty());
    let mut tx = h.ledger.db().begin_read().await.expect("begin");
    assert!(
        jobs::check_charges(&mut tx)
            .await
            .expect("check")
            .is_empty()
    );
}
