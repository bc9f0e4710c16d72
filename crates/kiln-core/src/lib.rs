//! kiln's domain types. Everything here parses instead of validating later: a `Credits`, an
//! `AccountId`, an `Action` or a `Pricing` cannot hold an invalid value. No I/O lives here.

mod catalog;
mod credits;
mod ids;
mod pricing;
pub mod prom;
mod spec;
mod time;

pub use catalog::{Action, CreditKind, Kit, ParseError, PlanId};
pub use credits::{Credits, CreditsError};
pub use ids::{AccountId, IdError};
pub use pricing::{ConfigError, Plan, Pricing, TopUpPack};
pub use spec::{
    Category, Decimal, Dimensions, MAX_SPEC_BYTES, Metal, Money, ProductSpec, SpecError, Stone,
};
pub use time::{BillingCycle, Timestamp, billing_cycle};
