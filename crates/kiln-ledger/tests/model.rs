//! Model-based test: random sequences of ledger operations (with duplicated calls and clock
//! jumps) run against the real database and against a small in-memory model of DESIGN.md §3.
//! After every step the touched account's grants must equal the model's and its invariants
//! must hold; every few hundred steps the whole database is audited and every journal is
//! checked to have only grown.
//!
//! The sequences come from proptest, which shrinks a failing one to the few steps that matter.
//! Replay a failure with `KILN_MODEL_SEED=<seed>`; `KILN_MODEL_STEPS` sets the total length and
//! `KILN_MODEL_CASE_STEPS` the longest sequence.

mod common;

use kiln_ledger::backends;

use std::collections::HashMap;

use common::{DAY, HOUR, Harness};
use kiln_core::{CreditsError, billing_cycle};
use kiln_ledger::{
    AccountId, Action, Backend, CreditKind, Credits, JournalEntry, LedgerError, NewAccount,
    Operation, PlanId, Pricing, ReservationId, ReservationState, Timestamp,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestError, TestRunner};

backends!(random_operations_match_the_model);

#[derive(Clone, Debug, PartialEq, Eq)]
struct MGrant {
    kind: CreditKind,
    amount: u64,
    remaining: u64,
    expired: u64,
    expires_at: Option<Timestamp>,
}

#[derive(Clone, Debug)]
struct MAccount {
    id: AccountId,
    plan: PlanId,
    admin: bool,
    allowance: Option<u64>,
    anchor: Timestamp,
    renewed: Option<Timestamp>,
    /// Indexes into `Model::grants`, in creation order.
    grants: Vec<usize>,
}

#[derive(Clone, Debug)]
struct MRes {
    db_id: ReservationId,
    op: Operation,
    action: Action,
    amount: u64,
    state: ReservationState,
    parts: Vec<(usize, u64)>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    accounts: Vec<MAccount>,
    grants: Vec<MGrant>,
    reservations: Vec<MRes>,
    keys: HashMap<(usize, String), usize>,
    payrefs: HashMap<String, (usize, String, usize)>,
}

/// The outcomes the model predicts, compared with what the ledger returned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Reservation(usize),
    Insufficient { needed: u64, available: u64 },
    Conflict,
    PaymentRefConflict,
    AlreadyResolved,
    NotFound,
    UnknownPack,
    Overflow,
    Balance { available: u64, held: u64 },
}

fn outcome_of(e: &LedgerError) -> Outcome {
    match e {
        LedgerError::InsufficientCredits {
            needed, available, ..
        } => Outcome::Insufficient {
            needed: needed.get(),
            available: available.get(),
        },
        LedgerError::IdempotencyConflict { .. } => Outcome::Conflict,
        LedgerError::PaymentRefConflict(_) => Outcome::PaymentRefConflict,
        LedgerError::AlreadyResolved { .. } => Outcome::AlreadyResolved,
        LedgerError::AccountNotFound(_) | LedgerError::ReservationNotFound(_) => Outcome::NotFound,
        LedgerError::UnknownPack { .. } => Outcome::UnknownPack,
        LedgerError::InvalidAmount(CreditsError::Overflow) => Outcome::Overflow,
        other => panic!("the model never expects {other:?}"),
    }
}

impl Model {
    fn allowance(&self, pricing: &Pricing, a: usize) -> Option<u64> {
        let acct = &self.accounts[a];
        match acct.plan {
            PlanId::Enterprise => acct.allowance,
            p => pricing.plan(p).monthly_credits.map(Credits::get),
        }
    }

    fn add_grant(
        &mut self,
        a: usize,
        kind: CreditKind,
        amount: u64,
        expires_at: Option<Timestamp>,
    ) -> usize {
        self.grants.push(MGrant {
            kind,
            amount,
            remaining: amount,
            expired: 0,
            expires_at,
        });
        self.accounts[a].grants.push(self.grants.len() - 1);
        self.grants.len() - 1
    }

    fn granted(&self, a: usize) -> u64 {
        self.accounts[a]
            .grants
            .iter()
            .map(|&g| self.grants[g].amount)
            .sum()
    }

    /// Expiries and renewal on access. A renewal that would push the account's lifetime total
    /// past `Credits::MAX` is refused, and with it the whole call.
    fn touch(&mut self, pricing: &Pricing, a: usize, now: Timestamp) -> Result<(), Outcome> {
        for &g in &self.accounts[a].grants {
            let g = &mut self.grants[g];
            if g.expires_at.is_some_and(|e| e <= now) && g.remaining > 0 {
                g.expired += g.remaining;
                g.remaining = 0;
            }
        }
        if let Some(allowance) = self.allowance(pricing, a) {
            let cycle = billing_cycle(self.accounts[a].anchor, now);
            if self.accounts[a].renewed.is_none_or(|r| r < cycle.start) {
                if self.granted(a) + allowance > Credits::MAX.get() {
                    return Err(Outcome::Overflow);
                }
                self.add_grant(a, CreditKind::Subscription, allowance, Some(cycle.end));
                self.accounts[a].renewed = Some(cycle.start);
            }
        }
        Ok(())
    }

    fn live(&self, a: usize, now: Timestamp) -> Vec<usize> {
        let mut live: Vec<usize> = self.accounts[a]
            .grants
            .iter()
            .copied()
            .filter(|&g| {
                self.grants[g].remaining > 0 && self.grants[g].expires_at.is_none_or(|e| e > now)
            })
            .collect();
        // Soonest expiry first (never last), cheaper kind, then creation order (= id order).
        live.sort_by_key(|&g| {
            (
                self.grants[g].expires_at.is_none(),
                self.grants[g].expires_at,
                self.grants[g].kind,
                g,
            )
        });
        live
    }

    fn available(&self, a: usize, now: Timestamp) -> u64 {
        self.live(a, now)
            .iter()
            .map(|&g| self.grants[g].remaining)
            .sum()
    }

    fn held(&self, a: usize) -> u64 {
        let rs = self
            .keys
            .iter()
            .filter(|((acct, _), _)| *acct == a)
            .map(|(_, &r)| &self.reservations[r]);
        rs.filter(|r| r.state == ReservationState::Held)
            .map(|r| r.amount)
            .sum()
    }

    fn hold(
        &mut self,
        pricing: &Pricing,
        a: usize,
        action: Action,
        key: &str,
        op: Operation,
        now: Timestamp,
    ) -> Outcome {
        if let Some(&r) = self.keys.get(&(a, key.to_owned())) {
            let res = &self.reservations[r];
            return if res.op == op && res.action == action {
                Outcome::Reservation(r)
            } else {
                Outcome::Conflict
            };
        }
        if let Err(o) = self.touch(pricing, a, now) {
            return o;
        }
        let amount = if self.accounts[a].admin {
            0
        } else {
            pricing.cost(action).get()
        };
        let available = self.available(a, now);
        if amount > available {
            return Outcome::Insufficient {
                needed: amount,
                available,
            };
        }
        let mut left = amount;
        let mut parts = Vec::new();
        for g in self.live(a, now) {
            if left == 0 {
                break;
            }
            let take = self.grants[g].remaining.min(left);
            self.grants[g].remaining -= take;
            left -= take;
            parts.push((g, take));
        }
        let state = if op == Operation::Charge {
            ReservationState::Committed
        } else {
            ReservationState::Held
        };
        self.reservations.push(MRes {
            db_id: ReservationId(-1),
            op,
            action,
            amount,
            state,
            parts,
        });
        let r = self.reservations.len() - 1;
        self.keys.insert((a, key.to_owned()), r);
        Outcome::Reservation(r)
    }

    fn resolve(&mut self, r: usize, commit: bool, now: Timestamp) -> Outcome {
        let res = &mut self.reservations[r];
        match (res.state, commit) {
            (ReservationState::Committed, true) | (ReservationState::Released, false) => {
                Outcome::Ok
            }
            (ReservationState::Committed, false) | (ReservationState::Released, true) => {
                Outcome::AlreadyResolved
            }
            (ReservationState::Held, true) => {
                res.state = ReservationState::Committed;
                Outcome::Ok
            }
            (ReservationState::Held, false) => {
                res.state = ReservationState::Released;
                for &(g, amount) in res.parts.clone().iter().rev() {
                    let g = &mut self.grants[g];
                    if g.expires_at.is_some_and(|e| e <= now) {
                        g.expired += amount;
                    } else {
                        g.remaining += amount;
                    }
                }
                Outcome::Ok
            }
        }
    }

    fn topup(
        &mut self,
        pricing: &Pricing,
        a: usize,
        pack: &str,
        payref: &str,
        now: Timestamp,
    ) -> Outcome {
        let Some(p) = pricing.pack(pack) else {
            return Outcome::UnknownPack;
        };
        if let Some((acct, pk, _)) = self.payrefs.get(payref) {
            return if *acct == a && pk == pack {
                Outcome::Ok
            } else {
                Outcome::PaymentRefConflict
            };
        }
        if let Err(o) = self.touch(pricing, a, now) {
            return o;
        }
        if self.granted(a) + p.credits.get() > Credits::MAX.get() {
            return Outcome::Overflow;
        }
        let g = self.add_grant(a, CreditKind::TopUp, p.credits.get(), None);
        self.payrefs
            .insert(payref.to_owned(), (a, pack.to_owned(), g));
        Outcome::Ok
    }
}

/// One randomly chosen call, kept so it can be issued again verbatim (a duplicated delivery).
#[derive(Clone, Debug)]
enum Step {
    Create {
        plan: PlanId,
        admin: bool,
        allowance: Option<u64>,
    },
    TopUp {
        a: usize,
        pack: String,
        payref: String,
    },
    Hold {
        a: usize,
        action: Action,
        key: String,
        op: Operation,
    },
    Resolve {
        r: Option<usize>,
        commit: bool,
    },
    Renew {
        a: usize,
    },
    RenewDue,
    Balance {
        a: usize,
    },
    Advance {
        ms: i64,
    },
}

/// One generated call before it meets the model's state: `Index`es pick among the accounts
/// and reservations that exist when it runs, so a shrunk sequence still means something.
#[derive(Clone, Debug)]
enum Gen {
    /// Issue the previous call again, verbatim (a duplicated delivery).
    Repeat,
    Create {
        plan: Index,
        admin: bool,
        allowance: Option<u64>,
    },
    TopUp {
        a: Index,
        pack: Index,
        payref: u32,
    },
    Hold {
        a: Index,
        action: Index,
        key: u32,
        charge: bool,
    },
    Resolve {
        r: Option<Index>,
        commit: bool,
    },
    Renew {
        a: Index,
    },
    RenewDue,
    Balance {
        a: Index,
    },
    Advance {
        ms: i64,
    },
}

/// The mix of calls: the weights of the hand-written generator this replaced.
fn gen_step() -> impl Strategy<Value = Gen> {
    let allowance = prop_oneof![
        9 => (1u64..3_000).prop_map(Some),
        1 => (0u64..300).prop_map(|d| Some(Credits::MAX.get() - d)),
    ];
    prop_oneof![
        5 => Just(Gen::Repeat),
        2 => (any::<Index>(), any::<bool>(), allowance)
            .prop_map(|(plan, admin, allowance)| Gen::Create { plan, admin, allowance }),
        10 => (any::<Index>(), any::<Index>(), 0u32..40)
            .prop_map(|(a, pack, payref)| Gen::TopUp { a, pack, payref }),
        35 => (any::<Index>(), any::<Index>(), any::<u32>(), any::<bool>())
            .prop_map(|(a, action, key, charge)| Gen::Hold { a, action, key, charge }),
        25 => (proptest::option::weighted(0.95, any::<Index>()), any::<bool>())
            .prop_map(|(r, commit)| Gen::Resolve { r, commit }),
        5 => any::<Index>().prop_map(|a| Gen::Renew { a }),
        3 => Just(Gen::RenewDue),
        10 => any::<Index>().prop_map(|a| Gen::Balance { a }),
        12 => prop_oneof![
            1 => 20 * DAY..40 * DAY,
            5 => DAY..10 * DAY,
            14 => 1..6 * HOUR,
        ]
        .prop_map(|ms| Gen::Advance { ms }),
    ]
}

/// proptest generates the sequences and, on a failure, shrinks the failing one to the few
/// steps that matter. `KILN_MODEL_STEPS` steps in all (default 10,000), in sequences of
/// `KILN_MODEL_CASE_STEPS` (default 200), each on a fresh database.
async fn random_operations_match_the_model(backend: Backend) {
    let seed: u64 = std::env::var("KILN_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps: usize = std::env::var("KILN_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let case_steps: usize = std::env::var("KILN_MODEL_CASE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .clamp(1, steps.max(1));
    // Sequence lengths are uniform in 1..=case_steps: this many make `steps` on average.
    let cases = u32::try_from((2 * steps).div_ceil(case_steps + 1)).unwrap_or(u32::MAX);
    println!(
        "model test on {backend:?}: seed {seed}, {cases} sequences of 1-{case_steps} steps (replay with KILN_MODEL_SEED={seed})"
    );
    let ran = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // Each try is a fresh database: a few minutes of shrinking at most.
        max_shrink_iters: 1_000,
        ..ProptestConfig::default()
    });
    let handle = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let result = runner.run(
        &proptest::collection::vec(gen_step(), 1..=case_steps),
        |case| {
            tokio::task::block_in_place(|| handle.block_on(run_case(backend, seed, &case, false)));
            // Passing sequences only (not the tries of a shrink).
            ran.fetch_add(case.len(), std::sync::atomic::Ordering::Relaxed);
            Ok(())
        },
    );
    println!(
        "{backend:?}: {} steps in {cases} sequences, {:.1?}",
        ran.into_inner(),
        started.elapsed()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            // Once more, printing each call as it is made: the shrunk failure, readable.
            println!(
                "the shrunk sequence ({} generated steps), replayed:",
                case.len()
            );
            let replay =
                tokio::task::spawn(async move { run_case(backend, seed, &case, true).await });
            let _ = replay.await;
            panic!("model test failed (seed {seed}): {reason}");
        }
        Err(e) => panic!("model test failed (seed {seed}): {e}"),
    }
}

/// Runs one generated sequence on a fresh database and its model; `trace` prints each call.
async fn run_case(backend: Backend, seed: u64, case: &[Gen], trace: bool) {
    let pricing = Pricing::default();
    let h = Harness::with(backend, pricing.clone(), 4).await;
    let mut m = Model::default();
    let mut last: Option<Step> = None;
    let mut journals: HashMap<AccountId, Vec<JournalEntry>> = HashMap::new();
    let packs = ["small", "medium", "large", "nope"];
    let steps = case.len();

    for (i, g) in case.iter().enumerate() {
        let now = h.clock_now();
        let n = m.accounts.len();
        let step = match g {
            Gen::Repeat => match &last {
                Some(s) => s.clone(),
                None => continue,
            },
            Gen::Create {
                plan,
                admin,
                allowance,
            } => {
                if n >= 5 {
                    continue;
                }
                let plan = *plan.get(PlanId::ALL);
                Step::Create {
                    plan,
                    admin: *admin,
                    allowance: allowance.filter(|_| plan == PlanId::Enterprise),
                }
            }
            _ if n == 0 => continue,
            Gen::TopUp { a, pack, payref } => Step::TopUp {
                a: a.index(n),
                pack: (*pack.get(&packs)).to_owned(),
                payref: format!("pay-{payref}"),
            },
            Gen::Hold {
                a,
                action,
                key,
                charge,
            } => Step::Hold {
                a: a.index(n),
                action: *action.get(Action::ALL),
                // A small key space: keys come back (replays, conflicts) as often as new ones
                // appear, whatever the position (so a shrink that drops a step keeps the rest).
                key: format!("k{}", key % 48),
                op: if *charge {
                    Operation::Charge
                } else {
                    Operation::Reserve
                },
            },
            Gen::Resolve { r, commit } => Step::Resolve {
                r: r.filter(|_| !m.reservations.is_empty())
                    .map(|r| r.index(m.reservations.len())),
                commit: *commit,
            },
            Gen::Renew { a } => Step::Renew { a: a.index(n) },
            Gen::RenewDue => Step::RenewDue,
            Gen::Balance { a } => Step::Balance { a: a.index(n) },
            Gen::Advance { ms } => Step::Advance { ms: *ms },
        };
        last = Some(step.clone());
        let ctx = format!("seed {seed}, step {i}: {step:?}");
        if trace {
            println!("  step {i}: {step:?}");
        }
        let before = m.clone();
        let (expected, actual, touched): (Outcome, Outcome, Option<usize>) = match &step {
            Step::Create {
                plan,
                admin,
                allowance,
            } => {
                let new = NewAccount {
                    plan: *plan,
                    is_admin: *admin,
                    email: None,
                    monthly_allowance: allowance.map(Credits::new_const),
                };
                let created = h
                    .ledger
                    .create_account(new)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                m.accounts.push(MAccount {
                    id: created.account.id,
                    plan: *plan,
                    admin: *admin,
                    allowance: *allowance,
                    anchor: now,
                    renewed: None,
                    grants: Vec::new(),
                });
                let a = m.accounts.len() - 1;
                let welcome = pricing.plan(*plan).welcome_credits.get();
                if welcome > 0 {
                    m.add_grant(a, CreditKind::Welcome, welcome, None);
                }
                m.touch(&pricing, a, now)
                    .unwrap_or_else(|o| panic!("{ctx}: {o:?}"));
                (Outcome::Ok, Outcome::Ok, Some(a))
            }
            Step::TopUp { a, pack, payref } => {
                let exp = m.topup(&pricing, *a, pack, payref, now);
                let got = h.ledger.topup(m.accounts[*a].id, pack, payref).await;
                (
                    exp,
                    got.map_or_else(|e| outcome_of(&e), |_| Outcome::Ok),
                    Some(*a),
                )
            }
            Step::Hold { a, action, key, op } => {
                let exp = m.hold(&pricing, *a, *action, key, *op, now);
                let id = m.accounts[*a].id;
                let got = match op {
                    Operation::Reserve => h.ledger.reserve(id, *action, key).await,
                    Operation::Charge => h.ledger.charge(id, *action, key).await,
                };
                let got = match got {
                    Ok(res) => {
                        let Outcome::Reservation(r) = exp else {
                            panic!("{ctx}: ledger said ok, model {exp:?}")
                        };
                        let mr = &mut m.reservations[r];
                        if mr.db_id.0 < 0 {
                            mr.db_id = res.id;
                        }
                        assert_eq!(
                            (res.id, res.amount.get(), res.state),
                            (mr.db_id, mr.amount, mr.state),
                            "{ctx}"
                        );
                        Outcome::Reservation(r)
                    }
                    Err(e) => outcome_of(&e),
                };
                (exp, got, Some(*a))
            }
            Step::Resolve { r, commit } => match r {
                None => {
                    let got = h.ledger.commit(ReservationId(i64::MAX)).await;
                    (
                        Outcome::NotFound,
                        got.map_or_else(|e| outcome_of(&e), |_| Outcome::Ok),
                        None,
                    )
                }
                Some(r) => {
                    let exp = m.resolve(*r, *commit, now);
                    let id = m.reservations[*r].db_id;
                    let got = if *commit {
                        h.ledger.commit(id).await
                    } else {
                        h.ledger.release(id).await
                    };
                    let got = got.map_or_else(
                        |e| outcome_of(&e),
                        |res| {
                            assert_eq!(res.state, m.reservations[*r].state, "{ctx}");
                            Outcome::Ok
                        },
                    );
                    let a = m.keys.iter().find(|(_, v)| **v == *r).map(|((a, _), _)| *a);
                    (exp, got, a)
                }
            },
            Step::Renew { a } => {
                let exp = m.touch(&pricing, *a, now).err().unwrap_or(Outcome::Ok);
                let got = h.ledger.renew(m.accounts[*a].id).await;
                (
                    exp,
                    got.map_or_else(|e| outcome_of(&e), |_| Outcome::Ok),
                    Some(*a),
                )
            }
            Step::RenewDue => {
                let mut failed = 0;
                for a in 0..m.accounts.len() {
                    let snapshot = m.clone();
                    if m.touch(&pricing, a, now).is_err() {
                        m = snapshot;
                        failed += 1;
                    }
                }
                let report = h
                    .ledger
                    .renew_due(1_000)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(report.failed.len(), failed, "{ctx}: {report:?}");
                (Outcome::Ok, Outcome::Ok, None)
            }
            Step::Balance { a } => {
                let exp = match m.touch(&pricing, *a, now) {
                    Ok(()) => Outcome::Balance {
                        available: m.available(*a, now),
                        held: m.held(*a),
                    },
                    Err(o) => o,
                };
                let got = h.ledger.balance(m.accounts[*a].id).await.map_or_else(
                    |e| outcome_of(&e),
                    |b| Outcome::Balance {
                        available: b.available.get(),
                        held: b.held.get(),
                    },
                );
                (exp, got, Some(*a))
            }
            Step::Advance { ms } => {
                h.clock.advance_millis(*ms);
                (Outcome::Ok, Outcome::Ok, None)
            }
        };
        assert_eq!(actual, expected, "{ctx}");
        if !matches!(
            expected,
            Outcome::Ok | Outcome::Reservation(_) | Outcome::Balance { .. }
        ) {
            // A refused call changes nothing.
            m = before;
        }

        let check: Vec<usize> = if matches!(step, Step::RenewDue) {
            (0..m.accounts.len()).collect()
        } else {
            touched.into_iter().collect()
        };
        for a in check {
            compare_grants(&h, &m, a, &ctx).await;
            compare_totals(&h, &m, a, &ctx).await;
            if i % 50 == 0 {
                let breaches = h
                    .ledger
                    .audit_account(m.accounts[a].id)
                    .await
                    .expect("audit");
                assert!(breaches.is_empty(), "{ctx}: {breaches:#?}");
            }
        }
        if i % 500 == 499 || i + 1 == steps {
            let breaches = h.ledger.audit().await.expect("audit");
            assert!(breaches.is_empty(), "{ctx}: {breaches:#?}");
            for a in 0..m.accounts.len() {
                compare_grants(&h, &m, a, &ctx).await;
                let id = m.accounts[a].id;
                let now = h
                    .ledger
                    .journal(id, None, 1_000)
                    .await
                    .expect("journal")
                    .entries;
                let mut all = now;
                while all.len() % 1_000 == 0 && !all.is_empty() {
                    let more = h
                        .ledger
                        .journal(id, all.last().map(|e| e.seq), 1_000)
                        .await
                        .expect("journal")
                        .entries;
                    if more.is_empty() {
                        break;
                    }
                    all.extend(more);
                }
                if let Some(prev) = journals.get(&id) {
                    assert_eq!(
                        &all[..prev.len()],
                        &prev[..],
                        "{ctx}: the journal of {id} was rewritten"
                    );
                }
                journals.insert(id, all);
            }
        }
    }
}

async fn compare_grants(h: &Harness, m: &Model, a: usize, ctx: &str) {
    let db: Vec<MGrant> = h
        .ledger
        .grants(m.accounts[a].id)
        .await
        .expect("grants")
        .into_iter()
        .map(|g| MGrant {
            kind: g.kind,
            amount: g.amount.get(),
            remaining: g.remaining.get(),
            expired: g.expired.get(),
            expires_at: g.expires_at,
        })
        .collect();
    let model: Vec<MGrant> = m.accounts[a]
        .grants
        .iter()
        .map(|&g| m.grants[g].clone())
        .collect();
    assert_eq!(db, model, "{ctx}: grants of account {a}");
}

/// Invariant 1 on both sides: the stored totals equal the model's, and each side conserves.
async fn compare_totals(h: &Harness, m: &Model, a: usize, ctx: &str) {
    let t = h.ledger.totals(m.accounts[a].id).await.expect("totals");
    let grants = m.accounts[a].grants.iter().map(|&g| &m.grants[g]);
    let (granted, remaining, expired) = grants.fold((0, 0, 0), |(x, y, z), g| {
        (x + g.amount, y + g.remaining, z + g.expired)
    });
    let in_state = |s| {
        let rs = m
            .keys
            .iter()
            .filter(|((acct, _), _)| *acct == a)
            .map(|(_, &r)| &m.reservations[r]);
        rs.filter(|r| r.state == s).map(|r| r.amount).sum::<u64>()
    };
    let (held, committed) = (
        in_state(ReservationState::Held),
        in_state(ReservationState::Committed),
    );
    assert_eq!(
        granted,
        remaining + held + committed + expired,
        "{ctx}: the model does not conserve"
    );
    let db = (
        t.granted.get(),
        t.held.get(),
        t.committed.get(),
        t.expired.get(),
        t.available().get(),
    );
    assert_eq!(
        db,
        (granted, held, committed, expired, remaining),
        "{ctx}: totals of account {a}"
    );
}

trait ClockNow {
    fn clock_now(&self) -> Timestamp;
}

impl ClockNow for Harness {
    fn clock_now(&self) -> Timestamp {
        use kiln_ledger::Clock;
        self.clock.now()
    }
}
