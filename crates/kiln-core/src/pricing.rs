//! The price list: what each action costs, the plans, and the top-up packs. Defaults are the
//! product page's numbers; a TOML file may override them, and a configuration in which any
//! top-up pack is as cheap per credit as a paid plan is rejected ("subscribing is always the
//! best deal").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Action, Credits, PlanId};

/// A subscription plan as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Plan {
    pub id: PlanId,
    /// Credits granted at the start of every billing cycle. `None` on Enterprise means the
    /// allowance is set per account.
    pub monthly_credits: Option<Credits>,
    /// Credits granted once when the account is opened on this plan; they never expire.
    pub welcome_credits: Credits,
    /// Monthly price in US cents; `None` when free or negotiated per account.
    pub price_cents: Option<u64>,
}

/// A pack of top-up credits. Top-up credits never expire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpPack {
    pub id: String,
    pub credits: Credits,
    pub price_cents: u64,
}

/// The whole price list, valid by construction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Pricing {
    actions: BTreeMap<Action, Credits>,
    plans: BTreeMap<PlanId, Plan>,
    packs: Vec<TopUpPack>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("price configuration is not valid TOML: {0}")]
    Toml(String),
    #[error(
        "top-up pack {pack:?} costs {pack_price_cents} cents for {pack_credits} credits, which is not more per \
         credit than plan {plan} ({plan_price_cents} cents for {plan_credits} credits); subscribing must always \
         be the best deal"
    )]
    PackCheaperThanPlan {
        pack: String,
        pack_price_cents: u64,
        pack_credits: Credits,
        plan: PlanId,
        plan_price_cents: u64,
        plan_credits: Credits,
    },
    #[error("top-up pack {0:?} is listed twice")]
    DuplicatePack(String),
    #[error("top-up pack id {0:?} must be 1-32 characters of a-z, 0-9, '_' or '-'")]
    BadPackId(String),
    #[error("{0} must be positive")]
    NotPositive(String),
    #[error("no top-up packs configured")]
    NoPacks,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    actions: BTreeMap<Action, Credits>,
    #[serde(default)]
    plans: BTreeMap<PlanId, RawPlan>,
    packs: Option<Vec<TopUpPack>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    monthly_credits: Option<Credits>,
    welcome_credits: Option<Credits>,
    price_cents: Option<u64>,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing::from_parts(default_actions(), default_plans(), default_packs())
            .unwrap_or_else(|e| panic!("the built-in price list is invalid: {e}"))
    }
}

fn default_actions() -> BTreeMap<Action, Credits> {
    [
        (Action::TextMessage, 5),
        (Action::Image, 15),
        (Action::Video, 25),
        (Action::EssentialsKit, 10),
        (Action::CaratzonKit, 100),
    ]
    .into_iter()
    .map(|(a, c)| (a, Credits::new_const(c)))
    .collect()
}

fn default_plans() -> BTreeMap<PlanId, Plan> {
    let plan = |id, monthly: Option<u64>, welcome, price_cents| Plan {
        id,
        monthly_credits: monthly.map(Credits::new_const),
        welcome_credits: Credits::new_const(welcome),
        price_cents,
    };
    [
        plan(PlanId::Discover, None, 200, None),
        plan(PlanId::Source, Some(1_500), 0, Some(14_900)),
        plan(PlanId::Atelier, Some(5_000), 0, Some(39_900)),
        plan(PlanId::Enterprise, None, 0, None),
    ]
    .into_iter()
    .map(|p| (p.id, p))
    .collect()
}

/// Top-up packs: every one dearer per credit than Source's $0.0993 per credit.
fn default_packs() -> Vec<TopUpPack> {
    [
        ("small", 500, 5_900),
        ("medium", 1_500, 16_900),
        ("large", 5_000, 54_900),
    ]
    .into_iter()
    .map(|(id, credits, price_cents)| TopUpPack {
        id: id.to_owned(),
        credits: Credits::new_const(credits),
        price_cents,
    })
    .collect()
}

impl Pricing {
    /// Reads a TOML price configuration; anything it leaves out keeps its default.
    pub fn from_toml(text: &str) -> Result<Pricing, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        Pricing::from_raw(raw)
    }

    /// The same from an already parsed table (the `[pricing]` section of kiln's config file).
    pub fn from_table(table: toml::Table) -> Result<Pricing, ConfigError> {
        let raw: RawConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Toml(e.to_string()))?;
        Pricing::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Pricing, ConfigError> {
        let mut actions = default_actions();
        actions.extend(raw.actions);
        let mut plans = default_plans();
        for (id, p) in raw.plans {
            let plan = plans
                .get_mut(&id)
                .unwrap_or_else(|| unreachable!("every PlanId has a default"));
            plan.monthly_credits = p.monthly_credits.or(plan.monthly_credits);
            plan.welcome_credits = p.welcome_credits.unwrap_or(plan.welcome_credits);
            plan.price_cents = p.price_cents.or(plan.price_cents);
        }
        Pricing::from_parts(actions, plans, raw.packs.unwrap_or_else(default_packs))
    }

    fn from_parts(
        actions: BTreeMap<Action, Credits>,
        plans: BTreeMap<PlanId, Plan>,
        packs: Vec<TopUpPack>,
    ) -> Result<Pricing, ConfigError> {
        if packs.is_empty() {
            return Err(ConfigError::NoPacks);
        }
        for (i, pack) in packs.iter().enumerate() {
            let id_ok = (1..=32).contains(&pack.id.len())
                && pack.id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !id_ok {
                return Err(ConfigError::BadPackId(pack.id.clone()));
            }
            if packs[..i].iter().any(|p| p.id == pack.id) {
                return Err(ConfigError::DuplicatePack(pack.id.clone()));
            }
            if pack.credits.is_zero() {
                return Err(ConfigError::NotPositive(format!(
                    "credits of pack {:?}",
                    pack.id
                )));
            }
            if pack.price_cents == 0 {
                return Err(ConfigError::NotPositive(format!(
                    "price of pack {:?}",
                    pack.id
                )));
            }
        }
        for plan in plans.values() {
            if plan.monthly_credits.is_some_and(Credits::is_zero) {
                return Err(ConfigError::NotPositive(format!(
                    "monthly credits of plan {}",
                    plan.id
                )));
            }
            let (Some(plan_price), Some(plan_credits)) = (plan.price_cents, plan.monthly_credits)
            else {
                continue;
            };
            for pack in &packs {
                // pack_price / pack_credits > plan_price / plan_credits, without division.
                let pack_side = u128::from(pack.price_cents) * u128::from(plan_credits.get());
                let plan_side = u128::from(plan_price) * u128::from(pack.credits.get());
                if plan_price > 0 && pack_side <= plan_side {
                    return Err(ConfigError::PackCheaperThanPlan {
                        pack: pack.id.clone(),
                        pack_price_cents: pack.price_cents,
                        pack_credits: pack.credits,
                        plan: plan.id,
                        plan_price_cents: plan_price,
                        plan_credits,
                    });
                }
            }
        }
        Ok(Pricing {
            actions,
            plans,
            packs,
        })
    }

    /// The list price of an action.
    pub fn cost(&self, action: Action) -> Credits {
        self.actions
            .get(&action)
            .copied()
            .unwrap_or_else(|| unreachable!("every Action has a price"))
    }

    pub fn plan(&self, id: PlanId) -> &Plan {
        self.plans
            .get(&id)
            .unwrap_or_else(|| unreachable!("every PlanId has a plan"))
    }

    pub fn plans(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }

    pub fn pack(&self, id: &str) -> Option<&TopUpPack> {
        self.packs.iter().find(|p| p.id == id)
    }

    pub fn packs(&self) -> &[TopUpPack] {
        &self.packs
    }

    pub fn actions(&self) -> impl Iterator<Item = (Action, Credits)> + '_ {
        self.actions.iter().map(|(a, c)| (*a, *c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_product_page() {
        let p = Pricing::default();
        assert_eq!(p.cost(Action::TextMessage).get(), 5);
        assert_eq!(p.cost(Action::Image).get(), 15);
        assert_eq!(p.cost(Action::Video).get(), 25);
        assert_eq!(p.cost(Action::EssentialsKit).get(), 10);
        assert_eq!(p.cost(Action::CaratzonKit).get(), 100);
        assert_eq!(p.plan(PlanId::Discover).welcome_credits.get(), 200);
        assert_eq!(p.plan(PlanId::Discover).monthly_credits, None);
        assert_eq!(
            p.plan(PlanId::Source).monthly_credits.map(Credits::get),
            Some(1_500)
        );
        assert_eq!(
            p.plan(PlanId::Atelier).monthly_credits.map(Credits::get),
            Some(5_000)
        );
        assert_eq!(p.plan(PlanId::Atelier).price_cents, Some(39_900));
    }

    #[test]
    fn overrides_merge_with_defaults() {
        let p = Pricing::from_toml(
            "[actions]\nimage = 20\n[plans.enterprise]\nmonthly_credits = 20000\n",
        )
        .expect("valid override");
        assert_eq!(p.cost(Action::Image).get(), 20);
        assert_eq!(p.cost(Action::Video).get(), 25);
        assert_eq!(
            p.plan(PlanId::Enterprise).monthly_credits.map(Credits::get),
            Some(20_000)
        );
    }

    #[test]
    fn a_pack_as_cheap_as_a_plan_is_rejected() {
        // Source: 14900 cents / 1500 credits. A pack at exactly that rate is not "more".
        let cfg = "[[packs]]\nid = \"bulk\"\ncredits = 1500\nprice_cents = 14900\n";
        let e = Pricing::from_toml(cfg).expect_err("equal rate must be rejected");
        assert!(
            matches!(e, ConfigError::PackCheaperThanPlan { ref pack, plan: PlanId::Source, .. } if pack == "bulk")
        );
        let cfg = "[[packs]]\nid = \"bulk\"\ncredits = 1500\nprice_cents = 14901\n";
        assert!(Pricing::from_toml(cfg).is_ok());
        // Raising a plan's price can make an existing default pack the cheaper deal.
        let e = Pricing::from_toml("[plans.atelier]\nprice_cents = 60000\n")
            .expect_err("pack now cheaper");
        assert!(matches!(
            e,
            ConfigError::PackCheaperThanPlan {
                plan: PlanId::Atelier,
                ..
            }
        ));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        assert!(matches!(
            Pricing::from_toml("[actions]\ngold = 1\n"),
            Err(ConfigError::Toml(_))
        ));
        assert!(matches!(
            Pricing::from_toml("[actions]\nimage = -1\n"),
            Err(ConfigError::Toml(_))
        ));
        assert!(matches!(
            Pricing::from_toml("packs = []\n"),
            Err(ConfigError::NoPacks)
        ));
        let dup = "[[packs]]\nid = \"a\"\ncredits = 1\nprice_cents = 500\n[[packs]]\nid = \"a\"\ncredits = 1\nprice_cents = 500\n";
        assert!(matches!(
            Pricing::from_toml(dup),
            Err(ConfigError::DuplicatePack(_))
        ));
        let zero = "[[packs]]\nid = \"a\"\ncredits = 0\nprice_cents = 500\n";
        assert!(matches!(
            Pricing::from_toml(zero),
            Err(ConfigError::NotPositive(_))
        ));
        assert!(matches!(
            Pricing::from_toml("surprise = 1\n"),
            Err(ConfigError::Toml(_))
        ));
    }
}
