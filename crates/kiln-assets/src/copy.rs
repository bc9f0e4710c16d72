//! SEO and marketplace copy written from the product spec: a title, a meta description of at
//! most 160 characters, a long description, five bullets, tags, and alt text of at most 125
//! characters for each image. Templates, not a model: every sentence states a fact from the spec.

use kiln_core::{Category, ProductSpec};
use serde::Serialize;

pub const TITLE_MAX: usize = 70;
pub const META_MAX: usize = 160;
pub const ALT_MAX: usize = 125;
pub const TAG_MAX: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub title: String,
    pub meta_description: String,
    pub long_description: String,
    pub bullets: Vec<String>,
    pub tags: Vec<String>,
}

/// Cuts `s` to at most `max` characters at a word boundary, without a dangling comma or dash.
pub fn fit(s: &str, max: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= max {
        return s;
    }
    let mut out = String::new();
    for word in s.split(' ') {
        let next = if out.is_empty() {
            word.to_owned()
        } else {
            format!("{out} {word}")
        };
        if next.chars().count() > max {
            break;
        }
        out = next;
    }
    if out.is_empty() {
        out = s.chars().take(max).collect();
    }
    out.trim_end_matches([',', ';', ':', '-', '–', ' '])
        .to_owned()
}

/// "a" or "an", by how the next word sounds ("an 18k", "an emerald", "a ring").
fn article(next: &str) -> &'static str {
    let w = next.trim_start().to_lowercase();
    let vowel =
        w.starts_with(['a', 'e', 'i', 'o']) || (w.starts_with('u') && !w.starts_with("uni"));
    let spoken_vowel = w.starts_with('8') || w.starts_with("11") || w.starts_with("18");
    if vowel || spoken_vowel { "an" } else { "a" }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// "18k yellow gold", "sterling silver", or "".
pub fn metal_phrase(spec: &ProductSpec) -> String {
    spec.metal
        .as_ref()
        .map(|m| {
            [
                m.purity.as_deref(),
                m.color.as_deref(),
                Some(m.kind.as_str()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ")
        })
        .unwrap_or_default()
}

/// "0.75 ct round brilliant diamond", "3 sapphires", or "".
pub fn stone_phrase(spec: &ProductSpec) -> String {
    let Some(s) = spec.stones.first() else {
        return String::new();
    };
    let count = s.count.unwrap_or(1);
    let mut parts = Vec::new();
    if let Some(c) = s.carat {
        parts.push(format!("{c} ct"));
    }
    if let Some(cut) = &s.cut {
        parts.push(cut.clone());
    }
    parts.push(if count > 1 {
        format!("{} {}s", count, s.kind)
    } else {
        s.kind.clone()
    });
    let first = parts.join(" ");
    if spec.stones.len() > 1 {
        format!("{first} and {} more stones", spec.stones.len() - 1)
    } else {
        first
    }
}

pub fn write(spec: &ProductSpec) -> Copy {
    let noun = spec.category.noun();
    let metal = metal_phrase(spec);
    let stone = stone_phrase(spec);
    let brand = spec
        .brand
        .as_deref()
        .map(|b| format!("{b} "))
        .unwrap_or_default();

    let material = match (metal.is_empty(), stone.is_empty()) {
        (false, false) => format!("{metal} {noun} with {stone}"),
        (false, true) => format!("{metal} {noun}"),
        (true, false) => format!("{noun} with {stone}"),
        (true, true) => noun.to_owned(),
    };
    let title = fit(
        &format!("{brand}{} – {}", spec.name, cap(&material)),
        TITLE_MAX,
    );

    let collection = spec
        .collection
        .as_deref()
        .map(|c| format!(" from the {c} collection"))
        .unwrap_or_default();
    let meta = fit(
        format!(
            "{} {}{collection}: {}. Style {}.{}",
            brand.trim(),
            spec.name,
            material,
            spec.style_number,
            spec.msrp
                .as_ref()
                .map(|m| format!(" {}.", m.display()))
                .unwrap_or_default()
        )
        .trim_start(),
        META_MAX,
    );

    let mut long = format!(
        "The {}{collection} is {} {material}.",
        spec.name,
        article(&material)
    );
    if let Some(d) = &spec.dimensions_mm {
        let dims: Vec<String> = [
            ("length", d.length),
            ("width", d.width),
            ("height", d.height),
            ("diameter", d.diameter),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| format!("{v} mm {n}")))
        .collect();
        if !dims.is_empty() {
            long.push_str(&format!(" It measures {}.", dims.join(", ")));
        }
    }
    if let Some(s) = spec.stones.first().and_then(|s| s.setting.as_deref()) {
        long.push_str(&format!(" The stone sits in a {s} setting."));
    }
    if !spec.sizes.is_empty() {
        long.push_str(&format!(" Available in sizes {}.", spec.sizes.join(", ")));
    }
    if let Some(n) = &spec.notes {
        long.push(' ');
        long.push_str(n.trim());
    }

    let mut bullets = vec![
        if metal.is_empty() {
            format!("Style {} – {}", spec.style_number, cap(noun))
        } else {
            format!("{} – {}", cap(&metal), spec.style_number)
        },
        if stone.is_empty() {
            "Clean, stone-free design".to_owned()
        } else {
            cap(&stone)
        },
        match (&spec.dimensions_mm, spec.sizes.is_empty()) {
            (_, false) => format!("Sizes {}", spec.sizes.join(", ")),
            (Some(_), true) => "Dimensions listed in the description".to_owned(),
            (None, true) => format!("One size {noun}"),
        },
        spec.lead_time_days
            .map_or("Made to order".to_owned(), |d| format!("Ships in {d} days")),
        spec.collection
            .as_deref()
            .map_or(format!("Gift-ready {noun}"), |c| {
                format!("Part of the {c} collection")
            }),
    ];
    bullets.iter_mut().for_each(|b| *b = fit(b, 200));

    let mut tags: Vec<String> = [
        Some(noun.to_owned()),
        spec.metal.as_ref().map(|m| m.kind.to_lowercase()),
        spec.metal
            .as_ref()
            .and_then(|m| m.purity.clone())
            .map(|p| format!("{} {}", p.to_lowercase(), noun)),
        spec.stones.first().map(|s| s.kind.to_lowercase()),
        spec.stones
            .first()
            .map(|s| format!("{} {}", s.kind.to_lowercase(), noun)),
        spec.collection.as_ref().map(|c| c.to_lowercase()),
        spec.brand.as_ref().map(|b| b.to_lowercase()),
        Some(
            match spec.category {
                Category::Ring => "engagement ring",
                Category::Earrings => "statement earrings",
                Category::Necklace | Category::Pendant => "layering necklace",
                Category::Bracelet => "stacking bracelet",
                Category::Brooch => "vintage brooch",
                Category::Other => "fine jewelry",
            }
            .to_owned(),
        ),
        Some("fine jewelry".to_owned()),
        Some("gift for her".to_owned()),
    ]
    .into_iter()
    .flatten()
    .map(|t| fit(&t, TAG_MAX))
    .filter(|t| !t.is_empty())
    .collect();
    let mut seen = std::collections::HashSet::new();
    tags.retain(|t| seen.insert(t.clone()));
    tags.truncate(13);

    Copy {
        title,
        meta_description: meta,
        long_description: long,
        bullets,
        tags,
    }
}

/// Alt text for an image of the product: what it shows, never "image of".
pub fn alt_text(spec: &ProductSpec, view: &str) -> String {
    let metal = metal_phrase(spec);
    let stone = stone_phrase(spec);
    let what = [
        spec.name.as_str(),
        if metal.is_empty() { "" } else { &metal },
        spec.category.noun(),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join(" ");
    let with = if stone.is_empty() {
        String::new()
    } else {
        format!(" with {stone}")
    };
    fit(&format!("{what}{with}, {view}"), ALT_MAX)
}

impl Copy {
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# {}\n\n{}\n\n{}\n\n",
            self.title, self.meta_description, self.long_description
        );
        for b in &self.bullets {
            md.push_str(&format!("- {b}\n"));
        }
        md.push_str(&format!("\nTags: {}\n", self.tags.join(", ")));
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn articles_and_limits() {
        assert_eq!(article("18k yellow gold ring"), "an");
        assert_eq!(article("emerald pendant"), "an");
        assert_eq!(article("14k gold ring"), "a");
        assert_eq!(article("ring"), "a");
        assert_eq!(fit("one two three", 9), "one two");
        assert_eq!(fit("a, b", 2), "a");
        let spec =
            kiln_core::ProductSpec::from_json(crate::sample::SPEC_JSON.as_bytes()).expect("spec");
        let c = write(&spec);
        assert!(
            c.title.chars().count() <= TITLE_MAX && c.meta_description.chars().count() <= META_MAX
        );
        assert_eq!(c.bullets.len(), 5);
        assert!(
            c.long_description.contains("is an 18k yellow gold ring"),
            "{}",
            c.long_description
        );
        assert!(c.tags.iter().all(|t| t.chars().count() <= TAG_MAX) && !c.tags.is_empty());
    }
}
