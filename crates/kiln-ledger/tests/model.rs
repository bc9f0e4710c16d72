//! Model-based test: random sequences of ledger operations (with duplicated calls and clock
//! jumps) run against the real database and against a small in-memory model of DESIGN.md §3.
//! After every step the touched account's grants must equal the model's and its invariants
//! must hold; every few hundred steps the whole database is audited and every journal is
//! checked to have only grown.
//!
//! Replay a failure with `KILN_MODEL_SEED=<seed>`; `KILN_MODEL_STEPS` sets the length.

mod common;

use kiln_ledger::backends;

use std::collections::HashMap;

use common::{DAY, HOUR, Harness};
use kiln_core::{CreditsError, billing_cycle};
use kiln_ledger::{
    AccountId, Action, Backend, CreditKind, Credits, JournalEntry, LedgerError, NewAccount,
    Operation, PlanId, Pricing, ReservationId, ReservationState, Timestamp,
};

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

async fn random_operations_match_the_model(backend: Backend) {
    let seed: u64 = std::env::var("KILN_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps: usize = std::env::var("KILN_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    println!(
        "model test on {backend:?}: seed {seed}, {steps} steps (replay with KILN_MODEL_SEED={seed})"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let pricing = Pricing::default();
    let h = Harness::with(backend, pricing.clone(), 4).await;
    let mut m = Model::default();
    let mut last: Option<Step> = None;
    let mut journals: HashMap<AccountId, Vec<JournalEntry>> = HashMap::new();
    let packs = ["small", "medium", "large", "nope"];

    let started = std::time::Instant::now();
    for i in 0..steps {
        if i % 1_000 == 0 {
            println!("{backend:?}: step {i}, {:.1?} elapsed", started.elapsed());
        }
        let now = h.clock_now();
        let n = m.accounts.len();
        let step = if rng.u8(..100) < 5 && last.is_some() {
            last.clone().unwrap_or(Step::RenewDue)
        } else if n == 0 || (n < 5 && rng.u8(..100) < 2) {
            let plan = PlanId::ALL[rng.usize(..4)];
            let allowance = (plan == PlanId::Enterprise).then(|| {
                if rng.u8(..10) == 0 {
                    Credits::MAX.get() - rng.u64(0..300)
                } else {
                    rng.u64(1..3_000)
                }
            });
            Step::Create {
                plan,
                admin: rng.u8(..10) == 0,
                allowance,
            }
        } else {
            let a = rng.usize(..n);
            match rng.u8(..100) {
                0..=9 => Step::TopUp {
                    a,
                    pack: packs[rng.usize(..packs.len())].to_owned(),
                    payref: format!("pay-{}", rng.u32(..40)),
                },
                10..=44 => Step::Hold {
                    a,
                    action: Action::ALL[rng.usize(..Action::ALL.len())],
                    key: format!("k{}", rng.u32(..(i as u32 / 4 + 8))),
                    op: if rng.bool() {
                        Operation::Reserve
                    } else {
                        Operation::Charge
                    },
                },
                45..=69 => Step::Resolve {
                    r: (!m.reservations.is_empty() && rng.u8(..20) > 0)
                        .then(|| rng.usize(..m.reservations.len())),
                    commit: rng.bool(),
                },
                70..=74 => Step::Renew { a },
                75..=77 => Step::RenewDue,
                78..=87 => Step::Balance { a },
                _ => Step::Advance {
                    ms: match rng.u8(..20) {
                        0 => rng.i64(20 * DAY..40 * DAY),
                        1..=5 => rng.i64(DAY..10 * DAY),
                        _ => rng.i64(1..6 * HOUR),
                    },
                },
            }
        };
        last = Some(step.clone());
        let ctx = format!("seed {seed}, step {i}: {step:?}");
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
