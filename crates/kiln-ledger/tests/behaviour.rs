//! The ledger's behaviour, one suite run unchanged against PostgreSQL and SQLite.

mod common;

use kiln_ledger::backends;

use common::{DAY, Harness, new_account, tamper};
use kiln_ledger::{
    AccountId, Action, Backend, CreditKind, Credits, EntryType, LedgerError, NewAccount, PlanId,
    Pricing, ReservationState,
};

fn c(n: u64) -> Credits {
    Credits::new_const(n)
}

async fn assert_clean(h: &Harness) {
    let breaches = h.ledger.audit().await.expect("audit runs");
    assert!(breaches.is_empty(), "invariants broken: {breaches:#?}");
}

/// Credits left per grant, oldest grant first.
async fn remaining(h: &Harness, id: AccountId) -> Vec<(CreditKind, u64)> {
    let grants = h.ledger.grants(id).await.expect("grants");
    grants.iter().map(|g| (g.kind, g.remaining.get())).collect()
}

backends!(
    burn_down_spends_subscription_then_welcome_then_oldest_topup,
    idempotent_reserve_and_charge,
    commit_and_release_resolve_once,
    topups_are_idempotent_by_payment_ref,
    renewal_twice_in_one_cycle_grants_once,
    late_renewal_happens_on_access,
    expiry_across_the_boundary_with_reservations_open,
    insufficient_credits_changes_nothing,
    admins_are_exempt_but_journaled,
    quotes_show_cost_and_shortfall,
    journal_is_paged_append_only_and_never_rewritten,
    bad_input_is_a_typed_error_and_changes_nothing,
    overflow_is_refused,
    audit_finds_tampering,
);

async fn burn_down_spends_subscription_then_welcome_then_oldest_topup(backend: Backend) {
    // A Discover plan that also has a monthly allowance, so one account holds all three kinds.
    let pricing = Pricing::from_toml("[plans.discover]\nmonthly_credits = 100\n").expect("pricing");
    let h = Harness::with(backend, pricing, 5).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    h.clock.advance_millis(1_000);
    h.ledger
        .topup(acct.id, "small", "pay-older")
        .await
        .expect("topup 1");
    h.clock.advance_millis(1_000);
    h.ledger
        .topup(acct.id, "small", "pay-newer")
        .await
        .expect("topup 2");
    use CreditKind::*;
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![
            (Welcome, 200),
            (Subscription, 100),
            (TopUp, 500),
            (TopUp, 500)
        ]
    );

    h.ledger
        .reserve(acct.id, Action::Video, "k1")
        .await
        .expect("25 from subscription");
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![
            (Welcome, 200),
            (Subscription, 75),
            (TopUp, 500),
            (TopUp, 500)
        ]
    );
    h.ledger
        .reserve(acct.id, Action::CaratzonKit, "k2")
        .await
        .expect("75 sub + 25 welcome");
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![
            (Welcome, 175),
            (Subscription, 0),
            (TopUp, 500),
            (TopUp, 500)
        ]
    );
    for i in 0..2 {
        h.ledger
            .reserve(acct.id, Action::CaratzonKit, &format!("k3-{i}"))
            .await
            .expect("welcome then topup");
    }
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![(Welcome, 0), (Subscription, 0), (TopUp, 475), (TopUp, 500)]
    );
    for i in 0..5 {
        h.ledger
            .charge(acct.id, Action::CaratzonKit, &format!("k4-{i}"))
            .await
            .expect("older topup first");
    }
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![(Welcome, 0), (Subscription, 0), (TopUp, 0), (TopUp, 475)]
    );

    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!(b.available, c(475));
    assert_eq!(b.by_kind.len(), 1);
    assert_eq!(
        (
            b.by_kind[0].kind,
            b.by_kind[0].remaining,
            b.by_kind[0].expires_at
        ),
        (TopUp, c(475), None)
    );
    assert_clean(&h).await;
}

async fn idempotent_reserve_and_charge(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let r1 = h
        .ledger
        .reserve(acct.id, Action::EssentialsKit, "job-1")
        .await
        .expect("reserve");
    let journal_len = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal")
        .entries
        .len();
    let r2 = h
        .ledger
        .reserve(acct.id, Action::EssentialsKit, "job-1")
        .await
        .expect("replay");
    assert_eq!(r1, r2, "same key, same request: same reservation");
    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!((b.available, b.held), (c(190), c(10)), "one effect");
    assert_eq!(
        h.ledger
            .journal(acct.id, None, 1000)
            .await
            .expect("journal")
            .entries
            .len(),
        journal_len
    );

    let e = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "job-1")
        .await
        .expect_err("different action");
    assert!(
        matches!(e, LedgerError::IdempotencyConflict { ref key, .. } if key == "job-1"),
        "{e:?}"
    );
    let e = h
        .ledger
        .charge(acct.id, Action::EssentialsKit, "job-1")
        .await
        .expect_err("different operation");
    assert!(
        matches!(e, LedgerError::IdempotencyConflict { .. }),
        "{e:?}"
    );

    let c1 = h
        .ledger
        .charge(acct.id, Action::TextMessage, "msg-1")
        .await
        .expect("charge");
    assert_eq!(c1.state, ReservationState::Committed);
    let c2 = h
        .ledger
        .charge(acct.id, Action::TextMessage, "msg-1")
        .await
        .expect("charge replay");
    assert_eq!(c1, c2);
    // A replay after the reservation was resolved still returns it and changes nothing.
    h.ledger.commit(r1.id).await.expect("commit");
    let r3 = h
        .ledger
        .reserve(acct.id, Action::EssentialsKit, "job-1")
        .await
        .expect("replay after commit");
    assert_eq!((r3.id, r3.state), (r1.id, ReservationState::Committed));
    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!((b.available, b.held, b.committed), (c(185), c(0), c(15)));
    // Keys belong to an account: another account may use the same key.
    let other = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let r4 = h
        .ledger
        .reserve(other.id, Action::EssentialsKit, "job-1")
        .await
        .expect("other account");
    assert_ne!(r4.id, r1.id);
    assert_clean(&h).await;
}

async fn commit_and_release_resolve_once(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let a = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "a")
        .await
        .expect("a");
    let b = h
        .ledger
        .reserve(acct.id, Action::EssentialsKit, "b")
        .await
        .expect("b");

    let ca = h.ledger.commit(a.id).await.expect("commit");
    assert_eq!(ca.state, ReservationState::Committed);
    let again = h
        .ledger
        .commit(a.id)
        .await
        .expect("second commit is a no-op");
    assert_eq!(again, ca);
    let e = h
        .ledger
        .release(a.id)
        .await
        .expect_err("release after commit");
    assert!(
        matches!(
            e,
            LedgerError::AlreadyResolved {
                state: ReservationState::Committed,
                ..
            }
        ),
        "{e:?}"
    );

    let rb = h.ledger.release(b.id).await.expect("release");
    assert_eq!(rb.state, ReservationState::Released);
    assert_eq!(
        h.ledger
            .release(b.id)
            .await
            .expect("second release is a no-op"),
        rb
    );
    let e = h
        .ledger
        .commit(b.id)
        .await
        .expect_err("commit after release");
    assert!(
        matches!(
            e,
            LedgerError::AlreadyResolved {
                state: ReservationState::Released,
                ..
            }
        ),
        "{e:?}"
    );

    let bal = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!(
        (bal.available, bal.held, bal.committed, bal.expired),
        (c(100), c(0), c(100), c(0))
    );
    assert_eq!(
        remaining(&h, acct.id).await,
        vec![(CreditKind::Welcome, 100)],
        "released credits went back"
    );
    let e = h
        .ledger
        .commit(kiln_ledger::ReservationId(999_999))
        .await
        .expect_err("unknown");
    assert!(matches!(e, LedgerError::ReservationNotFound(_)), "{e:?}");
    assert_clean(&h).await;
}

async fn topups_are_idempotent_by_payment_ref(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let g1 = h
        .ledger
        .topup(acct.id, "medium", "stripe_pi_1")
        .await
        .expect("topup");
    let g2 = h
        .ledger
        .topup(acct.id, "medium", "stripe_pi_1")
        .await
        .expect("replay");
    assert_eq!(g1, g2);
    assert_eq!(
        (g1.kind, g1.amount, g1.expires_at),
        (CreditKind::TopUp, c(1_500), None)
    );
    assert_eq!(
        h.ledger.balance(acct.id).await.expect("balance").available,
        c(1_700)
    );

    let e = h
        .ledger
        .topup(acct.id, "large", "stripe_pi_1")
        .await
        .expect_err("same ref, other pack");
    assert!(
        matches!(e, LedgerError::PaymentRefConflict(ref r) if r == "stripe_pi_1"),
        "{e:?}"
    );
    let other = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let e = h
        .ledger
        .topup(other.id, "medium", "stripe_pi_1")
        .await
        .expect_err("same ref, other account");
    assert!(matches!(e, LedgerError::PaymentRefConflict(_)), "{e:?}");
    assert_eq!(
        h.ledger.balance(other.id).await.expect("balance").available,
        c(200)
    );
    assert_clean(&h).await;
}

async fn renewal_twice_in_one_cycle_grants_once(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Source))
        .await
        .expect("create")
        .account;
    let subs = |gs: &[kiln_ledger::Grant]| {
        gs.iter()
            .filter(|g| g.kind == CreditKind::Subscription)
            .count()
    };
    assert_eq!(
        subs(&h.ledger.grants(acct.id).await.expect("grants")),
        1,
        "first cycle granted at creation"
    );
    assert!(h.ledger.renew(acct.id).await.expect("renew").is_empty());
    h.clock.advance_millis(10 * DAY);
    assert!(
        h.ledger
            .renew(acct.id)
            .await
            .expect("renew mid-cycle")
            .is_empty()
    );
    assert_eq!(
        h.ledger.renew_due(100).await.expect("scheduler").renewed,
        0,
        "nothing due mid-cycle"
    );

    // Jan 31 + 1 month = Feb 28: the next cycle starts then.
    h.clock.advance_millis(18 * DAY);
    assert_eq!(h.ledger.renew_due(100).await.expect("scheduler").renewed, 1);
    assert!(
        h.ledger
            .renew(acct.id)
            .await
            .expect("renew again")
            .is_empty(),
        "second renewal: nothing"
    );
    assert_eq!(
        h.ledger
            .renew_due(100)
            .await
            .expect("scheduler again")
            .renewed,
        0
    );
    let grants = h.ledger.grants(acct.id).await.expect("grants");
    assert_eq!(subs(&grants), 2);
    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!(
        (b.available, b.expired),
        (c(1_500), c(1_500)),
        "no roll-over"
    );
    assert_clean(&h).await;
}

async fn late_renewal_happens_on_access(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Atelier))
        .await
        .expect("create")
        .account;
    h.ledger
        .charge(acct.id, Action::CaratzonKit, "spend")
        .await
        .expect("charge");
    // The scheduler never ran for three months.
    h.clock.advance_millis(90 * DAY);
    let r = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "late")
        .await
        .expect("reserve renews first");
    assert_eq!(r.amount, c(100));
    let b = h.ledger.balance(acct.id).await.expect("balance");
    // Only the current cycle is granted; the missed ones would have expired unspent anyway.
    assert_eq!(
        (b.granted, b.available, b.held, b.committed, b.expired),
        (c(10_000), c(4_900), c(100), c(100), c(4_900))
    );
    assert_eq!(b.by_kind.len(), 1);
    // 90 days after Jan 31 is May 1, inside the cycle Apr 30 - May 31.
    let expected_end = common::start_time().plus_months(4);
    assert_eq!(b.by_kind[0].expires_at, Some(expected_end));
    assert_clean(&h).await;
}

async fn expiry_across_the_boundary_with_reservations_open(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Source))
        .await
        .expect("create")
        .account;
    h.ledger.topup(acct.id, "small", "p1").await.expect("topup");
    let to_commit = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "commit-me")
        .await
        .expect("r1");
    let to_release = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "release-me")
        .await
        .expect("r2");
    // Cross the cycle end with both reservations held.
    h.clock.advance_millis(29 * DAY);
    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!(
        (b.available, b.held, b.expired),
        (c(2_000), c(200), c(1_300)),
        "unspent subscription expired"
    );

    let done = h
        .ledger
        .commit(to_commit.id)
        .await
        .expect("commit after expiry");
    assert_eq!(done.state, ReservationState::Committed);
    let rel = h
        .ledger
        .release(to_release.id)
        .await
        .expect("release after expiry");
    assert_eq!(rel.state, ReservationState::Released);
    let b = h.ledger.balance(acct.id).await.expect("balance");
    assert_eq!(
        (b.available, b.held, b.committed, b.expired, b.granted),
        (c(2_000), c(0), c(100), c(1_400), c(3_500)),
        "released credits of the expired grant expired at once; the new cycle and the top-up are untouched"
    );
    let page = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal");
    let tail: Vec<(EntryType, u64)> = page
        .entries
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|e| (e.entry, e.amount.get()))
        .collect();
    assert_eq!(
        tail,
        vec![(EntryType::Release, 100), (EntryType::Expire, 100)]
    );
    assert_clean(&h).await;
}

async fn insufficient_credits_changes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    h.ledger
        .reserve(acct.id, Action::CaratzonKit, "a")
        .await
        .expect("a");
    h.ledger
        .reserve(acct.id, Action::Video, "b")
        .await
        .expect("b");
    let before = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal");
    let e = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "c")
        .await
        .expect_err("only 75 left");
    match e {
        LedgerError::InsufficientCredits {
            needed,
            available,
            shortfall,
        } => {
            assert_eq!((needed, available, shortfall), (c(100), c(75), c(25)));
        }
        other => panic!("expected InsufficientCredits, got {other:?}"),
    }
    let e = h
        .ledger
        .charge(acct.id, Action::CaratzonKit, "d")
        .await
        .expect_err("charge too");
    assert!(
        matches!(e, LedgerError::InsufficientCredits { .. }),
        "{e:?}"
    );
    assert_eq!(
        h.ledger
            .journal(acct.id, None, 1000)
            .await
            .expect("journal"),
        before
    );
    // The key of a refused request is not burned: it works once credits arrive.
    h.ledger.topup(acct.id, "small", "p").await.expect("topup");
    h.ledger
        .reserve(acct.id, Action::CaratzonKit, "c")
        .await
        .expect("now affordable");
    assert_clean(&h).await;
}

async fn admins_are_exempt_but_journaled(backend: Backend) {
    let h = Harness::new(backend).await;
    let new = NewAccount {
        is_admin: true,
        ..new_account(PlanId::Discover)
    };
    let admin = h.ledger.create_account(new).await.expect("create").account;
    assert!(admin.is_admin);
    for i in 0..5 {
        let r = h
            .ledger
            .reserve(admin.id, Action::CaratzonKit, &format!("k{i}"))
            .await
            .expect("exempt");
        assert!(r.exempt);
        assert_eq!((r.amount, r.list_price), (c(0), c(100)));
        h.ledger.commit(r.id).await.expect("commit");
    }
    let q = h
        .ledger
        .quote(admin.id, Action::Video)
        .await
        .expect("quote");
    assert_eq!((q.cost, q.list_price, q.affordable), (c(0), c(25), true));
    let b = h.ledger.balance(admin.id).await.expect("balance");
    assert_eq!((b.available, b.committed), (c(200), c(0)));
    let page = h
        .ledger
        .journal(admin.id, None, 100)
        .await
        .expect("journal");
    let reserves: Vec<_> = page
        .entries
        .iter()
        .filter(|e| e.entry == EntryType::Reserve)
        .collect();
    assert_eq!(reserves.len(), 5);
    assert!(
        reserves
            .iter()
            .all(|e| e.amount == c(0) && e.list_price == Some(c(100)))
    );
    assert_clean(&h).await;
}

async fn quotes_show_cost_and_shortfall(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    h.ledger
        .charge(acct.id, Action::CaratzonKit, "x")
        .await
        .expect("charge");
    h.ledger
        .charge(acct.id, Action::Video, "y")
        .await
        .expect("charge");
    let q = h
        .ledger
        .quote(acct.id, Action::CaratzonKit)
        .await
        .expect("quote");
    assert_eq!(
        (q.cost, q.available, q.affordable, q.shortfall),
        (c(100), c(75), false, c(25))
    );
    let q = h
        .ledger
        .quote(acct.id, Action::EssentialsKit)
        .await
        .expect("quote");
    assert_eq!((q.cost, q.affordable, q.shortfall), (c(10), true, c(0)));
    let e = h
        .ledger
        .quote(AccountId::new(), Action::Image)
        .await
        .expect_err("unknown account");
    assert!(matches!(e, LedgerError::AccountNotFound(_)), "{e:?}");
}

async fn journal_is_paged_append_only_and_never_rewritten(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Source))
        .await
        .expect("create")
        .account;
    for i in 0..6 {
        let r = h
            .ledger
            .reserve(acct.id, Action::Image, &format!("r{i}"))
            .await
            .expect("reserve");
        if i % 2 == 0 {
            h.ledger.commit(r.id).await.expect("commit");
        } else {
            h.ledger.release(r.id).await.expect("release");
        }
    }
    let first = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal")
        .entries;
    // Read in pages of 4 and stitch: every entry once, in order.
    let mut stitched = Vec::new();
    let mut after = None;
    loop {
        let page = h.ledger.journal(acct.id, after, 4).await.expect("page");
        assert!(page.entries.len() <= 4);
        stitched.extend(page.entries);
        match page.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(stitched, first);
    assert_eq!(
        first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..).take(first.len()).collect::<Vec<i64>>()
    );

    // More activity, a month later: what was written before is unchanged.
    h.clock.advance_millis(40 * DAY);
    h.ledger
        .charge(acct.id, Action::Video, "later")
        .await
        .expect("charge");
    let now = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal")
        .entries;
    assert_eq!(&now[..first.len()], &first[..]);
    assert!(now.len() > first.len());

    // The database itself refuses to rewrite history.
    let update = "UPDATE journal SET amount = 0";
    let refused = match h.ledger.db() {
        kiln_ledger::Db::Postgres(p) => sqlx::query(update).execute(p).await.is_err(),
        kiln_ledger::Db::Sqlite(p) => sqlx::query(update).execute(p).await.is_err(),
    };
    assert!(refused, "journal rows must not be updatable");
    assert_clean(&h).await;
}

async fn bad_input_is_a_typed_error_and_changes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Discover))
        .await
        .expect("create")
        .account;
    let before = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal");
    let ghost = AccountId::new();

    assert!(
        matches!(h.ledger.reserve(ghost, Action::Image, "k").await, Err(LedgerError::AccountNotFound(id)) if id == ghost)
    );
    assert!(matches!(
        h.ledger.topup(ghost, "small", "p").await,
        Err(LedgerError::AccountNotFound(_))
    ));
    assert!(matches!(
        h.ledger.balance(ghost).await,
        Err(LedgerError::AccountNotFound(_))
    ));
    assert!(matches!(
        h.ledger.journal(ghost, None, 10).await,
        Err(LedgerError::AccountNotFound(_))
    ));
    let e = h
        .ledger
        .topup(acct.id, "gigantic", "p")
        .await
        .expect_err("unknown pack");
    assert!(
        matches!(e, LedgerError::UnknownPack { ref expected, .. } if expected.contains("small")),
        "{e:?}"
    );
    assert!(matches!(
        h.ledger.reserve(acct.id, Action::Image, "").await,
        Err(LedgerError::BadKey { .. })
    ));
    assert!(matches!(
        h.ledger
            .reserve(acct.id, Action::Image, &"k".repeat(201))
            .await,
        Err(LedgerError::BadKey { .. })
    ));
    assert!(matches!(
        h.ledger.topup(acct.id, "small", "bad\nref").await,
        Err(LedgerError::BadKey { .. })
    ));
    // Unknown plans and actions never reach the ledger: they do not parse.
    assert!("gold".parse::<PlanId>().is_err());
    assert!("photo".parse::<Action>().is_err());
    // Amounts: zero, negative and absurd numbers are refused where they are parsed.
    assert!("-10".parse::<Credits>().is_err());
    assert!("99999999999999999999999999".parse::<Credits>().is_err());
    let zero = NewAccount {
        monthly_allowance: Some(c(0)),
        ..new_account(PlanId::Enterprise)
    };
    assert!(matches!(
        h.ledger.create_account(zero).await,
        Err(LedgerError::InvalidAmount(_))
    ));
    let none = new_account(PlanId::Enterprise);
    assert!(matches!(
        h.ledger.create_account(none).await,
        Err(LedgerError::AllowanceRequired(_))
    ));
    let wrong = NewAccount {
        monthly_allowance: Some(c(10)),
        ..new_account(PlanId::Source)
    };
    assert!(matches!(
        h.ledger.create_account(wrong).await,
        Err(LedgerError::AllowanceNotAllowed(_))
    ));

    assert_eq!(
        h.ledger
            .journal(acct.id, None, 1000)
            .await
            .expect("journal"),
        before,
        "no state change"
    );
    assert_eq!(
        h.ledger.balance(acct.id).await.expect("balance").available,
        c(200)
    );
    assert_clean(&h).await;
}

async fn overflow_is_refused(backend: Backend) {
    let h = Harness::new(backend).await;
    let new = NewAccount {
        monthly_allowance: Some(Credits::MAX),
        ..new_account(PlanId::Enterprise)
    };
    let acct = h
        .ledger
        .create_account(new)
        .await
        .expect("an allowance of MAX is representable")
        .account;
    let before = h
        .ledger
        .journal(acct.id, None, 1000)
        .await
        .expect("journal");
    let e = h
        .ledger
        .topup(acct.id, "small", "one-too-many")
        .await
        .expect_err("would overflow");
    assert!(
        matches!(
            e,
            LedgerError::InvalidAmount(kiln_core::CreditsError::Overflow)
        ),
        "{e:?}"
    );
    assert_eq!(
        h.ledger
            .journal(acct.id, None, 1000)
            .await
            .expect("journal"),
        before
    );
    assert!(
        h.ledger
            .grants(acct.id)
            .await
            .expect("grants")
            .iter()
            .all(|g| g.kind == CreditKind::Subscription)
    );
    // Spending still works at the ceiling.
    h.ledger
        .charge(acct.id, Action::CaratzonKit, "spend")
        .await
        .expect("charge");
    assert_clean(&h).await;
}

async fn audit_finds_tampering(backend: Backend) {
    let h = Harness::new(backend).await;
    let acct = h
        .ledger
        .create_account(new_account(PlanId::Source))
        .await
        .expect("create")
        .account;
    let r = h
        .ledger
        .reserve(acct.id, Action::CaratzonKit, "k")
        .await
        .expect("reserve");
    h.ledger
        .charge(acct.id, Action::Image, "k2")
        .await
        .expect("charge");
    assert_clean(&h).await;
    // Each statement breaks one invariant behind the ledger's back; the audit must name it.
    let tampering = [
        (
            "UPDATE grants SET remaining = remaining + 5",
            "conservation",
        ),
        ("UPDATE accounts SET held = held - 1", "held total"),
        (
            "UPDATE reservations SET state = 'released' WHERE state = 'held'",
            "drawn by live reservations",
        ),
        (
            "UPDATE reservation_parts SET amount = amount + 1",
            "parts sum",
        ),
    ];
    for (sql, expect) in tampering {
        let mut tx = h.ledger.db().begin().await.expect("begin");
        tamper(&mut tx, sql).await;
        let breaches = kiln_ledger::audit(&mut tx, None).await.expect("audit");
        assert!(
            breaches.iter().any(|b| b.what.contains(expect)),
            "{sql}: expected {expect:?} in {breaches:#?}"
        );
        assert!(breaches.iter().all(|b| b.account_id == acct.id.to_string()));
        drop(tx); // rolled back
    }
    assert_clean(&h).await;
    assert_eq!(
        h.ledger.reservation(r.id).await.expect("reservation").state,
        ReservationState::Held
    );
}
