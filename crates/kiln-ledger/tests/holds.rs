//! Holds for tool calls: created once per key, captured or voided once, expired once by
//! maintenance however many run it; racing resolutions have exactly one winner. On PostgreSQL
//! and SQLite.

mod common;

use std::sync::Arc;

use common::{Harness, discover_account, tamper};
use kiln_ledger::{
    AccountId, Action, Backend, Credits, EntryType, HoldStatus, LedgerError, Pricing,
    ReservationState, backends,
};
use tokio::task::JoinSet;

backends!(
    a_hold_resolves_once,
    a_hold_expires_once_and_cannot_be_captured_late,
    capture_racing_void_has_one_winner,
    concurrent_expiry_passes_expire_each_hold_once,
    one_key_from_many_callers_holds_once,
    audit_finds_a_hold_that_disagrees,
);

const MIN: i64 = 60_000;

async fn setup(backend: Backend, connections: u32) -> (Harness, AccountId) {
    let h = Harness::with(backend, Pricing::default(), connections).await;
    let id = discover_account(&h).await;
    (h, id)
}

async fn assert_clean(h: &Harness) {
    let breaches = h.ledger.audit().await.expect("audit runs");
    assert!(breaches.is_empty(), "invariants broken: {breaches:#?}");
}

/// What an image, a video and a text message cost on the price list.
fn costs(h: &Harness) -> (u64, u64, u64) {
    let p = h.ledger.pricing();
    let cost = |a| p.cost(a).get();
    (
        cost(Action::Image),
        cost(Action::Video),
        cost(Action::TextMessage),
    )
}

fn c(n: u64) -> Credits {
    Credits::new_const(n)
}

async fn a_hold_resolves_once(backend: Backend) {
    let (h, id) = setup(backend, 5).await;
    let l = &h.ledger;
    let (img, vid, txt) = costs(&h);
    let (hold, new) = l
        .create_hold(id, Action::Image, "tool-1", None)
        .await
        .expect("hold");
    assert!(new);
    assert_eq!((hold.status, hold.amount), (HoldStatus::Held, c(img)));
    assert_eq!(
        hold.expires_at.millis() - hold.created_at.millis(),
        kiln_ledger::DEFAULT_HOLD_MS
    );
    let b = l.balance(id).await.expect("balance");
    assert_eq!((b.available, b.held), (c(200 - img), c(img)));

    // The same key: the same hold, nothing more held; another action: a conflict.
    let (again, new) = l
        .create_hold(id, Action::Image, "tool-1", Some(MIN))
        .await
        .expect("replay");
    assert!(!new);
    assert_eq!(again, hold);
    let conflict = l.create_hold(id, Action::Video, "tool-1", None).await;
    assert!(
        matches!(conflict, Err(LedgerError::IdempotencyConflict { .. })),
        "{conflict:?}"
    );
    // Its key space is its own: a charge under the same key is a different request.
    l.charge(id, Action::TextMessage, "tool-1")
        .await
        .expect("charge, own key space");

    let captured = l
        .resolve_hold(id, hold.id, HoldStatus::Captured)
        .await
        .expect("capture");
    assert_eq!(captured.status, HoldStatus::Captured);
    assert!(captured.resolved_at.is_some());
    let again = l
        .resolve_hold(id, hold.id, HoldStatus::Captured)
        .await
        .expect("no-op");
    assert_eq!(again, captured, "a second capture changes nothing");
    let void = l.resolve_hold(id, hold.id, HoldStatus::Voided).await;
    assert!(
        matches!(
            void,
            Err(LedgerError::HoldResolved {
                status: HoldStatus::Captured,
                ..
            })
        ),
        "{void:?}"
    );
    let r = l
        .reservation(hold.reservation_id)
        .await
        .expect("reservation");
    assert_eq!(r.state, ReservationState::Committed);

    let (second, _) = l
        .create_hold(id, Action::Video, "tool-2", Some(MIN))
        .await
        .expect("hold");
    let voided = l
        .resolve_hold(id, second.id, HoldStatus::Voided)
        .await
        .expect("void");
    assert_eq!(voided.status, HoldStatus::Voided);
    l.resolve_hold(id, second.id, HoldStatus::Voided)
        .await
        .expect("void again is a no-op");
    let capture = l.resolve_hold(id, second.id, HoldStatus::Captured).await;
    assert!(
        matches!(capture, Err(LedgerError::HoldResolved { .. })),
        "{capture:?}"
    );

    let b = l.balance(id).await.expect("balance");
    // The captured image and the text message are charged; the video went back.
    let spent = img + txt;
    assert_eq!(
        (b.available, b.held, b.committed),
        (c(200 - spent), c(0), c(spent))
    );
    let _ = vid;

    // Another account cannot see or touch it.
    let other = discover_account(&h).await;
    assert!(matches!(
        l.hold(Some(other), hold.id).await,
        Err(LedgerError::HoldNotFound(_))
    ));
    assert!(matches!(
        l.resolve_hold(other, second.id, HoldStatus::Captured).await,
        Err(LedgerError::HoldNotFound(_))
    ));

    // Bad input changes nothing.
    for ttl in [0, 999, 24 * 60 * MIN + 1, -5] {
        let e = l.create_hold(id, Action::Image, "tool-3", Some(ttl)).await;
        assert!(
            matches!(e, Err(LedgerError::BadHoldExpiry { .. })),
            "{ttl}: {e:?}"
        );
    }
    let e = l.create_hold(id, Action::Image, "", None).await;
    assert!(matches!(e, Err(LedgerError::BadKey { .. })), "{e:?}");
    for key in ["big-1", "big-2"] {
        l.create_hold(other, Action::CaratzonKit, key, None)
            .await
            .expect("hold 100 of 200");
    }
    let short = l
        .create_hold(other, Action::CaratzonKit, "big-3", None)
        .await;
    assert!(
        matches!(short, Err(LedgerError::InsufficientCredits { .. })),
        "{short:?}"
    );
    assert_eq!(
        l.balance(id).await.expect("balance").available,
        c(200 - spent)
    );
    assert_clean(&h).await;
}

async fn a_hold_expires_once_and_cannot_be_captured_late(backend: Backend) {
    let (h, id) = setup(backend, 5).await;
    let l = &h.ledger;
    let (img, vid, _) = costs(&h);
    let (early, _) = l
        .create_hold(id, Action::Video, "short", Some(MIN))
        .await
        .expect("hold");
    let (late, _) = l
        .create_hold(id, Action::Image, "long", Some(10 * MIN))
        .await
        .expect("hold");
    assert_eq!(
        l.expire_holds(100).await.expect("expire"),
        0,
        "nothing is due yet"
    );

    h.clock.advance_millis(MIN);
    // Due but not yet swept: it can no longer be captured; voiding it is still fine later.
    let capture = l.resolve_hold(id, early.id, HoldStatus::Captured).await;
    assert!(
        matches!(capture, Err(LedgerError::HoldExpired(_))),
        "{capture:?}"
    );
    assert_eq!(l.expire_holds(100).await.expect("expire"), 1);
    assert_eq!(
        l.expire_holds(100).await.expect("expire"),
        0,
        "expired once"
    );
    let e = l.hold(Some(id), early.id).await.expect("hold");
    assert_eq!(e.status, HoldStatus::Expired);
    assert_eq!(
        l.hold(Some(id), late.id).await.expect("hold").status,
        HoldStatus::Held
    );
    let void = l.resolve_hold(id, early.id, HoldStatus::Voided).await;
    assert!(
        matches!(
            void,
            Err(LedgerError::HoldResolved {
                status: HoldStatus::Expired,
                ..
            })
        ),
        "{void:?}"
    );

    // Journaled: one release for the expired hold's reservation.
    let journal = l.journal(id, None, 100).await.expect("journal").entries;
    let releases: Vec<_> = journal
        .iter()
        .filter(|e| e.entry == EntryType::Release && e.reservation_id == Some(early.reservation_id))
        .collect();
    assert_eq!(releases.len(), 1, "{journal:#?}");
    assert_eq!(releases[0].amount, c(vid));
    let b = l.balance(id).await.expect("balance");
    assert_eq!((b.available, b.held), (c(200 - img), c(img)));
    assert_clean(&h).await;
}

async fn capture_racing_void_has_one_winner(backend: Backend) {
    let (h, id) = setup(backend, 16).await;
    let (img, _, _) = costs(&h);
    let n = usize::try_from(200 / img).expect("fits");
    let mut holds = Vec::new();
    for i in 0..n {
        let (hold, _) = h
            .ledger
            .create_hold(id, Action::Image, &format!("race-{i}"), None)
            .await
            .expect("hold");
        holds.push(hold.id);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(2 * n));
    let mut set = JoinSet::new();
    for &hold in &holds {
        for to in [HoldStatus::Captured, HoldStatus::Voided] {
            let (ledger, barrier) = (h.ledger.clone(), barrier.clone());
            set.spawn(async move {
                barrier.wait().await;
                (hold, to, ledger.resolve_hold(id, hold, to).await)
            });
        }
    }
    let mut winners = std::collections::HashMap::new();
    while let Some(res) = set.join_next().await {
        let (hold, to, res) = res.expect("task");
        match res {
            Ok(held) => {
                assert_eq!(held.status, to);
                assert!(winners.insert(hold, to).is_none(), "two winners for {hold}");
            }
            Err(LedgerError::HoldResolved { status, .. }) => assert_ne!(status, to),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(winners.len(), n, "every hold has exactly one winner");
    let captured = winners
        .values()
        .filter(|s| **s == HoldStatus::Captured)
        .count() as u64;
    for (hold, to) in &winners {
        assert_eq!(
            h.ledger.hold(Some(id), *hold).await.expect("hold").status,
            *to
        );
    }
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!((b.held, b.committed), (c(0), c(img * captured)));
    assert_eq!(b.available, c(200 - img * captured));
    assert_clean(&h).await;
}

async fn concurrent_expiry_passes_expire_each_hold_once(backend: Backend) {
    let (h, id) = setup(backend, 16).await;
    let n = 30;
    for i in 0..n {
        h.ledger
            .create_hold(id, Action::TextMessage, &format!("exp-{i}"), Some(MIN))
            .await
            .expect("hold");
    }
    h.clock.advance_millis(2 * MIN);
    // Eight maintenance passes at once, as from eight serve processes.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut set = JoinSet::new();
    for _ in 0..8 {
        let (ledger, barrier) = (h.ledger.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            ledger.expire_holds(1000).await
        });
    }
    let mut total = 0;
    while let Some(res) = set.join_next().await {
        total += res.expect("task").expect("expire");
    }
    assert_eq!(total, n, "each hold expired by exactly one pass");
    let releases = h
        .ledger
        .journal(id, None, 1000)
        .await
        .expect("journal")
        .entries
        .iter()
        .filter(|e| e.entry == EntryType::Release)
        .count();
    assert_eq!(releases, n as usize);
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!((b.available, b.held), (c(200), c(0)));
    assert_clean(&h).await;
}

async fn one_key_from_many_callers_holds_once(backend: Backend) {
    let (h, id) = setup(backend, 16).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let (ledger, barrier) = (h.ledger.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            ledger.create_hold(id, Action::Video, "same", None).await
        });
    }
    let mut ids = std::collections::HashSet::new();
    let mut new = 0;
    while let Some(res) = set.join_next().await {
        let (hold, is_new) = res.expect("task").expect("hold");
        ids.insert(hold.id);
        new += usize::from(is_new);
    }
    assert_eq!((ids.len(), new), (1, 1), "one hold, created once");
    let b = h.ledger.balance(id).await.expect("balance");
    assert_eq!(b.held, c(costs(&h).1));
    assert_clean(&h).await;
}

async fn audit_finds_a_hold_that_disagrees(backend: Backend) {
    let (h, id) = setup(backend, 5).await;
    let (hold, _) = h
        .ledger
        .create_hold(id, Action::Image, "t", None)
        .await
        .expect("hold");
    assert_clean(&h).await;
    let mut tx = h.ledger.db().begin().await.expect("begin");
    tamper(&mut tx, "UPDATE holds SET status = 'captured'").await;
    tx.commit().await.expect("commit");
    let breaches = h.ledger.audit().await.expect("audit");
    assert!(
        breaches
            .iter()
            .any(|b| b.what.contains(&format!("hold {}", hold.id))),
        "{breaches:#?}"
    );
}
