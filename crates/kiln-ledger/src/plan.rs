//! The burn-down planner: which grants a charge is drawn from. Pure, so both stores call the
//! same code and the order can be property-tested without a database.
//!
//! Order: soonest expiry first (never-expiring last), then the cheaper kind (welcome <
//! subscription < top-up), then the oldest grant, then the lowest id.

use kiln_core::{CreditKind, Credits, Timestamp};

use crate::GrantId;

/// A grant with credits left, as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenGrant {
    pub id: GrantId,
    pub kind: CreditKind,
    pub remaining: Credits,
    pub granted_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

impl OpenGrant {
    pub fn is_expired(&self, now: Timestamp) -> bool {
        is_expired(self.expires_at, now)
    }
}

/// A grant stops being spendable at the instant it expires.
pub fn is_expired(expires_at: Option<Timestamp>, now: Timestamp) -> bool {
    expires_at.is_some_and(|e| e <= now)
}

/// Credits to take from one grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    pub grant_id: GrantId,
    pub amount: Credits,
}

/// Not enough spendable credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub needed: Credits,
    pub available: Credits,
}

fn burn_down_key(g: &OpenGrant) -> (bool, Option<Timestamp>, CreditKind, Timestamp, GrantId) {
    (
        g.expires_at.is_none(),
        g.expires_at,
        g.kind,
        g.granted_at,
        g.id,
    )
}

/// Sorts grants into spending order.
pub fn sort_burn_down(grants: &mut [OpenGrant]) {
    grants.sort_by_key(burn_down_key);
}

/// Credits spendable at `now`.
pub fn available(grants: &[OpenGrant], now: Timestamp) -> Credits {
    grants
        .iter()
        .filter(|g| !g.is_expired(now))
        .map(|g| g.remaining)
        .sum()
}

/// Plans drawing `amount` from `grants` at `now`: the draws, in spending order, or the
/// shortfall. Expired grants are never drawn from. Zero draws nothing.
pub fn plan_draws(
    grants: &[OpenGrant],
    now: Timestamp,
    amount: Credits,
) -> Result<Vec<Draw>, Shortfall> {
    let mut live: Vec<&OpenGrant> = grants
        .iter()
        .filter(|g| !g.is_expired(now) && !g.remaining.is_zero())
        .collect();
    live.sort_by_key(|g| burn_down_key(g));
    let mut left = amount;
    let mut draws = Vec::new();
    for g in live {
        if left.is_zero() {
            break;
        }
        let take = g.remaining.min(left);
        draws.push(Draw {
            grant_id: g.id,
            amount: take,
        });
        left = left.saturating_sub(take);
    }
    if left.is_zero() {
        Ok(draws)
    } else {
        Err(Shortfall {
            needed: amount,
            available: available(grants, now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(
        id: i64,
        kind: CreditKind,
        remaining: u64,
        granted_at: i64,
        expires_at: Option<i64>,
    ) -> OpenGrant {
        OpenGrant {
            id: GrantId(id),
            kind,
            remaining: Credits::new_const(remaining),
            granted_at: Timestamp::from_millis(granted_at),
            expires_at: expires_at.map(Timestamp::from_millis),
        }
    }

    #[test]
    fn subscription_then_welcome_then_topups_oldest_first() {
        let grants = vec![
            grant(1, CreditKind::TopUp, 30, 10, None),
            grant(2, CreditKind::Welcome, 20, 5, None),
            grant(3, CreditKind::Subscription, 10, 50, Some(1_000)),
            grant(4, CreditKind::TopUp, 30, 8, None),
        ];
        let draws = plan_draws(&grants, Timestamp::from_millis(100), Credits::new_const(65))
            .expect("enough");
        let ids: Vec<(i64, u64)> = draws
            .iter()
            .map(|d| (d.grant_id.0, d.amount.get()))
            .collect();
        assert_eq!(ids, vec![(3, 10), (2, 20), (4, 30), (1, 5)]);
    }

    #[test]
    fn ties_go_to_the_lower_id() {
        let grants = vec![
            grant(9, CreditKind::TopUp, 30, 10, None),
            grant(4, CreditKind::TopUp, 30, 10, None),
        ];
        let draws = plan_draws(&grants, Timestamp::from_millis(100), Credits::new_const(40))
            .expect("enough");
        let ids: Vec<(i64, u64)> = draws
            .iter()
            .map(|d| (d.grant_id.0, d.amount.get()))
            .collect();
        assert_eq!(ids, vec![(4, 30), (9, 10)]);
    }

    #[test]
    fn expired_grants_are_skipped_and_shortfall_reports_what_is_spendable() {
        let grants = vec![
            grant(1, CreditKind::Subscription, 100, 0, Some(50)),
            grant(2, CreditKind::Welcome, 5, 0, None),
        ];
        let err = plan_draws(&grants, Timestamp::from_millis(50), Credits::new_const(10))
            .expect_err("short");
        assert_eq!(
            err,
            Shortfall {
                needed: Credits::new_const(10),
                available: Credits::new_const(5)
            }
        );
        let ok = plan_draws(&grants, Timestamp::from_millis(49), Credits::new_const(10))
            .expect("not yet expired");
        assert_eq!(
            ok,
            vec![Draw {
                grant_id: GrantId(1),
                amount: Credits::new_const(10)
            }]
        );
    }

    /// Random grant sets: draws sum to the amount, never exceed a grant, follow the order, and
    /// a grant is only touched once every grant before it is exhausted.
    #[test]
    fn random_plans_hold_their_properties() {
        let seed = fastrand::u64(..);
        println!("seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..5_000 {
            let grants: Vec<OpenGrant> = (0..rng.usize(0..8))
                .map(|i| {
                    let kind = CreditKind::ALL[rng.usize(..3)];
                    let exp = rng.bool().then(|| rng.i64(0..100));
                    grant(
                        i64::try_from(i).unwrap_or(0),
                        kind,
                        rng.u64(0..50),
                        rng.i64(0..100),
                        exp,
                    )
                })
                .collect();
            let now = Timestamp::from_millis(rng.i64(0..100));
            let amount = Credits::new_const(rng.u64(0..150));
            let avail = available(&grants, now);
            match plan_draws(&grants, now, amount) {
                Ok(draws) => {
                    assert!(amount <= avail, "seed {seed}");
                    assert_eq!(
                        draws.iter().map(|d| d.amount).sum::<Credits>(),
                        amount,
                        "seed {seed}"
                    );
                    let mut order = grants.clone();
                    sort_burn_down(&mut order);
                    let order: Vec<&OpenGrant> = order
                        .iter()
                        .filter(|g| !g.is_expired(now) && !g.remaining.is_zero())
                        .collect();
                    for (i, d) in draws.iter().enumerate() {
                        assert_eq!(
                            order[i].id, d.grant_id,
                            "seed {seed}: draws follow burn-down order"
                        );
                        assert!(
                            d.amount <= order[i].remaining && !d.amount.is_zero(),
                            "seed {seed}"
                        );
                        if i + 1 < draws.len() {
                            assert_eq!(
                                d.amount, order[i].remaining,
                                "seed {seed}: exhaust before moving on"
                            );
                        }
                    }
                }
                Err(s) => {
                    assert!(amount > avail, "seed {seed}");
                    assert_eq!(
                        s,
                        Shortfall {
                            needed: amount,
                            available: avail
                        },
                        "seed {seed}"
                    );
                }
            }
        }
    }
}
