//! Concurrent callers on one account: no overselling, one effect per key, one resolution per
//! reservation. Run against PostgreSQL and SQLite with several connections.

mod common;

use kiln_ledger::backends;

use std::sync::Arc;

use common::{Harness, discover_account};
use kiln_ledger::{Action, Backend, Credits, LedgerError, Pricing, ReservationState};
use tokio::task::JoinSet;

backends!(
    two_hundred_reserves_race_for_twenty_slots,
    same_key_from_many_callers_reserves_once,
    commit_and_release_race
);

async fn harness(backend: Backend) -> (Harness, kiln_ledger::AccountId) {
    let h = Harness::with(backend, Pricing::default(), 16).await;
    let id = discover_account(&h).await;
    (h, id)
}

async fn two_hundred_reserves_race_for_twenty_slots(backend: Backend) {
    let (h, id) = harness(backend).await;
    assert_eq!(
        h.ledger.balance(id).await.expect("balance").available,
        Credits::new_const(200)
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let mut set = JoinSet::new();
    for i in 0..200 {
        let (ledger, barrier) = (h.ledger.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            ledger
                .reserve(id, Action::EssentialsKit, &format!("job-{i}"))
                .await
        });
    }
    let (mut ok, mut short) = (0, 0);
    while let Some(res) = set.join_next().await {
        match res.expect("task") {
            Ok(r) => {
                assert_eq!(r.amount, Credits::new_const(10));
                ok += 1;
            }
            Err(LedgerError::InsufficientCredits { needed, .. }) => {
                assert_eq!(needed, Credits::new_const(10));
                short += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, short), (20, 180));
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!(
        (b.available, b.held),
        (Credits::ZERO, Credits::new_const(200))
    );
    assert_eq!(
        b.granted,
        Credits::new_const(200),
        "conservation: granted = available + held"
    );
    let breaches = h.ledger.audit().await.expect("audit");
    assert!(breaches.is_empty(), "{breaches:#?}");
}

async fn same_key_from_many_callers_reserves_once(backend: Backend) {
    let (h, id) = harness(backend).await;
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let ledger = h.ledger.clone();
        set.spawn(async move { ledger.reserve(id, Action::Image, "the-one-key").await });
    }
    let mut ids = Vec::new();
    while let Some(res) = set.join_next().await {
        ids.push(
            res.expect("task")
                .expect("every caller gets the reservation")
                .id,
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one reservation for one key");
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!(b.held, Credits::new_const(15));
    assert!(h.ledger.audit().await.expect("audit").is_empty());
}

async fn commit_and_release_race(backend: Backend) {
    let (h, id) = harness(backend).await;
    for round in 0..10 {
        let r = h
            .ledger
            .reserve(id, Action::EssentialsKit, &format!("race-{round}"))
            .await
            .expect("reserve");
        let (l1, l2) = (h.ledger.clone(), h.ledger.clone());
        let (c, rel) = tokio::join!(l1.commit(r.id), l2.release(r.id));
        // Exactly one resolution wins; the loser is told the reservation is already resolved.
        let final_state = h.ledger.reservation(r.id).await.expect("reservation").state;
        match (c, rel) {
            (Ok(c), Err(LedgerError::AlreadyResolved { .. })) => {
                assert_eq!(
                    (c.state, final_state),
                    (ReservationState::Committed, ReservationState::Committed)
                );
            }
            (Err(LedgerError::AlreadyResolved { .. }), Ok(r)) => {
                assert_eq!(
                    (r.state, final_state),
                    (ReservationState::Released, ReservationState::Released)
                );
            }
            other => panic!("round {round}: both or neither resolved: {other:?}"),
        }
    }
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!(b.held, Credits::ZERO);
    assert_eq!(b.available.get() + b.committed.get(), 200);
    assert!(h.ledger.audit().await.expect("audit").is_empty());
}
