//! The closed vocabularies of the product: what can be charged (actions), what can be ordered
//! (kits), the plans, and the kinds of credit grants. Each has one stable string id used in
//! JSON, the CLI and the database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of: {expected}")]
pub struct ParseError {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// Declares a fieldless enum whose variants have one stable string id each, with `as_str`,
/// `ALL`, `FromStr`, `Display` and string serde.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($variant:ident => $id:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($id),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $id),+ }
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim() {
                    $($id => Ok($name::$variant),)+
                    other => Err(ParseError {
                        what: $what,
                        value: other.to_owned(),
                        expected: [$($id),+].join(", "),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Something that costs credits.
    Action, "action" {
        TextMessage => "text_message",
        Image => "image",
        Video => "video",
        EssentialsKit => "essentials_kit",
        CaratzonKit => "caratzon_kit",
    }
);

string_enum!(
    /// An asset kit a customer can order.
    Kit, "kit" {
        Essentials => "essentials",
        Caratzon => "caratzon",
    }
);

string_enum!(
    /// A subscription plan.
    PlanId, "plan" {
        Discover => "discover",
        Source => "source",
        Atelier => "atelier",
        Enterprise => "enterprise",
    }
);

string_enum!(
    /// The kind of a credit grant. The declaration order is the burn-down preference among
    /// grants that expire at the same time: cheaper kinds are spent first.
    CreditKind, "credit kind" {
        Welcome => "welcome",
        Subscription => "subscription",
        TopUp => "topup",
    }
);

impl Kit {
    /// The action a kit is billed as.
    pub const fn action(self) -> Action {
        match self {
            Kit::Essentials => Action::EssentialsKit,
            Kit::Caratzon => Action::CaratzonKit,
        }
    }

    /// The apalis queue its jobs run on: explicit names, so renaming a Rust type never orphans
    /// queued work, and separate queues, so heavy kits never starve light ones.
    pub const fn queue(self) -> &'static str {
        match self {
            Kit::Essentials => "kits.essentials",
            Kit::Caratzon => "kits.caratzon",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_is_an_error() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(*a));
        }
        let e = "gold".parse::<PlanId>().expect_err("gold is no plan");
        assert_eq!(e.what, "plan");
        assert!(
            e.to_string()
                .contains("discover, source, atelier, enterprise")
        );
        let json = serde_json::to_string(&CreditKind::TopUp).expect("serialize");
        assert_eq!(json, "\"topup\"", "serde uses the same id as as_str");
        assert_eq!(
            serde_json::from_str::<Action>("\"caratzon_kit\"").expect("parse"),
            Action::CaratzonKit
        );
        assert!(serde_json::from_str::<Kit>("\"deluxe\"").is_err());
        assert!(CreditKind::Welcome < CreditKind::Subscription);
        assert!(CreditKind::Subscription < CreditKind::TopUp);
    }
}
