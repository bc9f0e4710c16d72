//! The product spec a designer uploads with a design (DESIGN.md §6). Parsing is validation:
//! unknown fields, missing required fields, negative or malformed amounts and absurd sizes are
//! errors with the field named, so nothing downstream re-checks.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Upper bound on the spec document, checked before parsing.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Ring,
    Necklace,
    Earrings,
    Bracelet,
    Pendant,
    Brooch,
    Other,
}

impl Category {
    pub const fn noun(self) -> &'static str {
        match self {
            Category::Ring => "ring",
            Category::Necklace => "necklace",
            Category::Earrings => "earrings",
            Category::Bracelet => "bracelet",
            Category::Pendant => "pendant",
            Category::Brooch => "brooch",
            Category::Other => "piece",
        }
    }
}

/// A non-negative decimal amount, kept exactly in ten-thousandths (no floating point).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal(u64);

impl Decimal {
    pub const SCALE: u64 = 10_000;

    pub fn parse(s: &str) -> Result<Decimal, String> {
        let s = s.trim();
        if s.starts_with('-') {
            return Err(format!("{s:?} is negative"));
        }
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (!frac.is_empty() && !digits(frac)) || frac.len() > 4 {
            return Err(format!("{s:?} is not a decimal with at most 4 places"));
        }
        let whole: u64 = whole.parse().map_err(|_| format!("{s:?} is too large"))?;
        let frac_val: u64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<4}").parse().unwrap_or(0)
        };
        whole
            .checked_mul(Self::SCALE)
            .and_then(|w| w.checked_add(frac_val))
            .filter(|v| *v <= 1_000_000_000_000 * Self::SCALE)
            .map(Decimal)
            .ok_or_else(|| format!("{s:?} is too large"))
    }

    pub const fn ten_thousandths(self) -> u64 {
        self.0
    }

    /// With exactly `places` decimals (rounded half up).
    pub fn format(self, places: u32) -> String {
        let div = 10u64.pow(4 - places.min(4));
        let v = (self.0 + div / 2) / div;
        let unit = 10u64.pow(places.min(4));
        if places == 0 {
            format!("{v}")
        } else {
            format!("{}.{:0width$}", v / unit, v % unit, width = places as usize)
        }
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.format(4);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        f.write_str(s)
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Decimal {
    /// Accepts a JSON number or a string; numbers go through their shortest decimal text, so
    /// 12.5 is exactly 12.5.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Neg(i64),
            Float(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string(),
            Raw::Neg(n) => n.to_string(),
            Raw::Float(f) if f.is_finite() => format!("{f}"),
            Raw::Float(_) => return Err(serde::de::Error::custom("not a finite number")),
            Raw::Text(s) => s,
        };
        Decimal::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Money {
    pub amount: Decimal,
    #[serde(deserialize_with = "currency")]
    pub currency: String,
}

fn currency<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "currency {s:?} must be a 3-letter ISO code such as USD"
        )))
    }
}

impl Money {
    /// `$1,250.00`-style text for line sheets and copy.
    pub fn display(&self) -> String {
        let s = self.amount.format(2);
        let (whole, frac) = s.split_once('.').unwrap_or((&s, "00"));
        let mut grouped = String::new();
        for (i, c) in whole.chars().enumerate() {
            if i > 0 && (whole.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        match self.currency.as_str() {
            "USD" => format!("${grouped}.{frac}"),
            "EUR" => format!("€{grouped}.{frac}"),
            "GBP" => format!("£{grouped}.{frac}"),
            other => format!("{grouped}.{frac} {other}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metal {
    #[serde(rename = "type")]
    pub kind: String,
    pub purity: Option<String>,
    pub color: Option<String>,
    pub weight_g: Option<Decimal>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stone {
    #[serde(rename = "type")]
    pub kind: String,
    pub carat: Option<Decimal>,
    pub cut: Option<String>,
    pub setting: Option<String>,
    pub count: Option<u32>,
}

/// Dimensions in millimetres, any of which may be given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimensions {
    pub length: Option<Decimal>,
    pub width: Option<Decimal>,
    pub height: Option<Decimal>,
    pub diameter: Option<Decimal>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSpec {
    pub style_number: String,
    pub name: String,
    pub category: Category,
    pub brand: Option<String>,
    pub collection: Option<String>,
    pub metal: Option<Metal>,
    #[serde(default)]
    pub stones: Vec<Stone>,
    pub dimensions_mm: Option<Dimensions>,
    #[serde(default)]
    pub sizes: Vec<String>,
    pub wholesale_price: Option<Money>,
    pub msrp: Option<Money>,
    pub min_order: Option<u32>,
    pub lead_time_days: Option<u32>,
    pub notes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid product spec: {0}")]
pub struct SpecError(pub String);

impl ProductSpec {
    /// Parses and checks a spec document.
    pub fn from_json(bytes: &[u8]) -> Result<ProductSpec, SpecError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(SpecError(format!("larger than {MAX_SPEC_BYTES} bytes")));
        }
        let spec: ProductSpec =
            serde_json::from_slice(bytes).map_err(|e| SpecError(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), SpecError> {
        let text = |field: &str, v: &str, max: usize| {
            if v.trim().is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
                Err(SpecError(format!(
                    "{field} must be 1-{max} printable characters"
                )))
            } else {
                Ok(())
            }
        };
        text("style_number", &self.style_number, 64)?;
        text("name", &self.name, 120)?;
        for (field, v) in [("brand", &self.brand), ("collection", &self.collection)] {
            if let Some(v) = v {
                text(field, v, 80)?;
            }
        }
        if let Some(notes) = &self.notes
            && notes.chars().count() > 2_000
        {
            return Err(SpecError("notes must be at most 2000 characters".into()));
        }
        if self.stones.len() > 20 || self.sizes.len() > 40 {
            return Err(SpecError("at most 20 stones and 40 sizes".into()));
        }
        if let Some(m) = &self.metal {
            text("metal.type", &m.kind, 40)?;
        }
        for s in &self.stones {
            text("stones[].type", &s.kind, 40)?;
        }
        for s in &self.sizes {
            text("sizes[]", s, 20)?;
        }
        if let (Some(w), Some(m)) = (&self.wholesale_price, &self.msrp)
            && w.currency != m.currency
        {
            return Err(SpecError(
                "wholesale_price and msrp must use the same currency".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        "style_number": "AR-1042", "name": "Aurora Solitaire", "category": "ring",
        "brand": "Maison Vela", "collection": "Northern Light",
        "metal": {"type": "gold", "purity": "18k", "color": "yellow", "weight_g": 3.2},
        "stones": [{"type": "diamond", "carat": "0.75", "cut": "round brilliant", "setting": "six-prong", "count": 1}],
        "dimensions_mm": {"width": 2.1, "height": 7.5},
        "sizes": ["5", "6", "7"],
        "wholesale_price": {"amount": 1250, "currency": "USD"},
        "msrp": {"amount": "2899.99", "currency": "USD"},
        "min_order": 2, "lead_time_days": 21, "notes": "Recycled gold."
    }"#;

    #[test]
    fn full_spec_parses_exactly() {
        let s = ProductSpec::from_json(FULL.as_bytes()).expect("valid");
        assert_eq!(s.category, Category::Ring);
        assert_eq!(
            s.stones[0].carat.map(|c| c.to_string()),
            Some("0.75".into())
        );
        assert_eq!(
            s.metal
                .as_ref()
                .and_then(|m| m.weight_g)
                .map(|w| w.ten_thousandths()),
            Some(32_000)
        );
        assert_eq!(
            s.msrp.as_ref().map(Money::display),
            Some("$2,899.99".into())
        );
        assert_eq!(
            s.wholesale_price.as_ref().map(Money::display),
            Some("$1,250.00".into())
        );
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases = [
            (r#"{"name": "x", "category": "ring"}"#, "style_number"),
            (
                r#"{"style_number": "A", "name": "x", "category": "tiara"}"#,
                "tiara",
            ),
            (
                r#"{"style_number": "A", "name": "x", "category": "ring", "colour": "red"}"#,
                "colour",
            ),
            (
                r#"{"style_number": "A", "name": "x", "category": "ring", "msrp": {"amount": -5, "currency": "USD"}}"#,
                "negative",
            ),
            (
                r#"{"style_number": "A", "name": "x", "category": "ring", "msrp": {"amount": "1.23456", "currency": "USD"}}"#,
                "4 places",
            ),
            (
                r#"{"style_number": "A", "name": "x", "category": "ring", "msrp": {"amount": 5, "currency": "dollars"}}"#,
                "ISO",
            ),
            (
                r#"{"style_number": "", "name": "x", "category": "ring"}"#,
                "style_number",
            ),
            (r#"[1, 2]"#, "invalid type"),
            (r#"{"style_number": "A""#, "EOF"),
        ];
        for (json, expect) in cases {
            let e = ProductSpec::from_json(json.as_bytes()).expect_err(json);
            assert!(e.to_string().contains(expect), "{json}: {e}");
        }
        let big = format!(
            r#"{{"style_number": "A", "name": "x", "category": "ring", "notes": "{}"}}"#,
            "n".repeat(70_000)
        );
        assert!(ProductSpec::from_json(big.as_bytes()).is_err());
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(
            Decimal::parse("0.1").map(Decimal::ten_thousandths),
            Ok(1_000)
        );
        assert_eq!(
            Decimal::parse("12").map(|d| d.format(2)),
            Ok("12.00".into())
        );
        assert_eq!(
            Decimal::parse("1.005").map(|d| d.format(2)),
            Ok("1.01".into())
        );
        assert!(Decimal::parse("1e5").is_err());
        assert!(Decimal::parse("99999999999999999999").is_err());
    }
}
