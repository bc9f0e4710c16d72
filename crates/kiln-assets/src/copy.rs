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

/// How much of each stone a phrase names: titles and alt texts step down these levels until
/// they fit, dropping whole parts rather than cutting one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Detail {
    /// Count, cut, kind and carat: "0.75 ct round brilliant diamond", "24 polki diamonds".
    Full,
    /// Count and kind: "a diamond", "24 diamonds".
    Counts,
    /// Kind only: "diamonds", "a ruby".
    Kinds,
}

/// English plural of a stone name's last word: "pearl" → "pearls", "ruby" → "rubies",
/// "topaz" → "topazes".
fn plural(kind: &str) -> String {
    let (head, last) = kind.rsplit_once(' ').map_or(("", kind), |(h, l)| (h, l));
    let lower = last.to_lowercase();
    let vowel_y = ["ay", "ey", "oy", "uy"].iter().any(|e| lower.ends_with(e));
    let word = if lower.ends_with('y') && !vowel_y {
        format!("{}ies", &last[..last.len() - 1])
    } else if ["s", "x", "z", "ch", "sh"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        format!("{last}es")
    } else {
        format!("{last}s")
    };
    if head.is_empty() {
        word
    } else {
        format!("{head} {word}")
    }
}

/// One stone entry at a level of detail.
fn stone_entry(s: &kiln_core::Stone, detail: Detail) -> String {
    let count = s.count.unwrap_or(1);
    let kind = if count > 1 {
        plural(&s.kind)
    } else {
        s.kind.clone()
    };
    let cut = s.cut.as_deref().filter(|_| detail == Detail::Full);
    let carat = s.carat.filter(|_| detail == Detail::Full);
    match (count > 1, detail) {
        (true, Detail::Kinds) => kind,
        (true, _) => {
            let mut p = format!(
                "{count} {}{kind}",
                cut.map(|c| format!("{c} ")).unwrap_or_default()
            );
            if let Some(c) = carat {
                p.push_str(&format!(" ({c} ct total)"));
            }
            p
        }
        (false, _) => {
            let described = [
                carat.map(|c| format!("{c} ct")),
                cut.map(str::to_owned),
                Some(kind),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
            format!("{} {described}", article(&described))
        }
    }
}

/// "a", "a and b", "a, b and c".
fn english_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Every stone of the spec at a level of detail: "a 0.75 ct round brilliant diamond",
/// "40 pearls and 24 polki diamonds", or "" without stones.
pub fn stones(spec: &ProductSpec, detail: Detail) -> String {
    let entries: Vec<String> = spec.stones.iter().map(|s| stone_entry(s, detail)).collect();
    english_list(&entries)
}

/// Every stone in full ("a 0.75 ct round brilliant diamond", "40 pearls and 24 polki
/// diamonds"), or "".
pub fn stone_phrase(spec: &ProductSpec) -> String {
    stones(spec, Detail::Full)
}

/// What the piece is made of, richest first: each entry drops a whole part of the one before
/// ("18k yellow gold ring with 40 pearls and 24 polki diamonds", "… with pearls and polki
/// diamonds", "18k yellow gold ring", "gold ring", "ring"). Titles and alt texts take the
/// first that fits.
pub fn materials(spec: &ProductSpec) -> Vec<String> {
    let noun = spec.category.noun();
    let metal = metal_phrase(spec);
    let bare_metal = spec
        .metal
        .as_ref()
        .map(|m| m.kind.clone())
        .unwrap_or_default();
    let made = |metal: &str| {
        if metal.is_empty() {
            noun.to_owned()
        } else {
            format!("{metal} {noun}")
        }
    };
    let mut out: Vec<String> = [Detail::Full, Detail::Counts, Detail::Kinds]
        .into_iter()
        .map(|d| stones(spec, d))
        .filter(|s| !s.is_empty())
        .map(|s| format!("{} with {s}", made(&metal)))
        .collect();
    out.extend([made(&metal), made(&bare_metal), noun.to_owned()]);
    out.dedup();
    out
}

/// The first of `candidates` that fits in `max` characters, or the last one cut to fit.
fn first_fitting(candidates: impl IntoIterator<Item = String>, max: usize) -> String {
    let mut last = String::new();
    for c in candidates {
        if c.chars().count() <= max {
            return c;
        }
        last = c;
    }
    fit(&last, max)
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

    let materials = materials(spec);
    let material = materials[0].clone();
    // Whole parts are dropped until the title fits: stone details, then stones, then the
    // metal's purity and colour, then the brand; only a name too long on its own is cut.
    let heads = [format!("{brand}{}", spec.name), spec.name.clone()];
    let title = first_fitting(
        heads
            .iter()
            .flat_map(|h| materials.iter().map(move |m| format!("{h} – {}", cap(m))))
            .chain([spec.name.clone()]),
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

/// Alt text for an image of the product: what it shows, never "image of". Whole parts are
/// dropped until it fits (as in titles), and the view is always said.
pub fn alt_text(spec: &ProductSpec, view: &str) -> String {
    let suffix = format!(", {view}");
    let room = ALT_MAX.saturating_sub(suffix.chars().count());
    let what = first_fitting(
        materials(spec)
            .into_iter()
            .map(|m| format!("{} {m}", spec.name)),
        room,
    );
    fit(&format!("{what}{suffix}"), ALT_MAX)
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

    fn spec_with(name: &str, stones: &str) -> ProductSpec {
        ProductSpec::from_json(
            format!(
                r#"{{"style_number": "KN-7", "name": "{name}", "category": "earrings",
                "brand": "Meher", "metal": {{"type": "gold", "purity": "22k", "color": "yellow"}},
                "stones": [{stones}]}}"#
            )
            .as_bytes(),
        )
        .expect("spec")
    }

    #[test]
    fn two_and_three_stone_kinds_are_all_named() {
        let two = spec_with(
            "Rani Jhumka",
            r#"{"type": "pearl", "count": 40}, {"type": "polki diamond", "count": 24}"#,
        );
        assert_eq!(stone_phrase(&two), "40 pearls and 24 polki diamonds");
        let three = spec_with(
            "Rani Jhumka",
            r#"{"type": "pearl", "count": 40}, {"type": "polki diamond", "count": 24},
               {"type": "ruby", "count": 2}"#,
        );
        assert_eq!(
            stone_phrase(&three),
            "40 pearls, 24 polki diamonds and 2 rubies"
        );
        for spec in [&two, &three] {
            let c = write(spec);
            let alt = alt_text(spec, "on a white background");
            for text in [&c.title, &alt, &c.long_description, &c.bullets[1]] {
                assert!(!text.contains("more stones"), "{text}");
            }
            assert!(
                alt.contains("pearls") && alt.contains("polki diamonds"),
                "{alt}"
            );
            assert!(alt.ends_with(", on a white background"), "{alt}");
            assert!(alt.chars().count() <= ALT_MAX);
        }
        assert!(write(&three).long_description.contains("2 rubies"));
    }

    #[test]
    fn plurals_and_singles() {
        assert_eq!(plural("topaz"), "topazes");
        assert_eq!(plural("ruby"), "rubies");
        assert_eq!(plural("turquoise"), "turquoises");
        assert_eq!(plural("old mine cut ruby"), "old mine cut rubies");
        let one = spec_with(
            "Solo",
            r#"{"type": "emerald", "carat": "1.2", "cut": "oval"}"#,
        );
        assert_eq!(stone_phrase(&one), "a 1.2 ct oval emerald");
        assert_eq!(stones(&one, Detail::Counts), "an emerald");
    }

    /// Titles at and over the limit end on a whole phrase: each candidate is a whole part
    /// dropped from the one before, never a part cut in the middle.
    #[test]
    fn a_title_at_the_limit_drops_whole_parts() {
        let stones = r#"{"type": "diamond", "carat": "0.75", "cut": "round"}"#;
        let full_for = |name: &str| {
            let spec = spec_with(name, stones);
            format!("Meher {name} – {}", cap(&materials(&spec)[0]))
        };
        // A name that makes the full title exactly TITLE_MAX characters keeps it whole.
        let base = full_for("N").chars().count();
        let exact = "N".repeat(TITLE_MAX - base + 1);
        let spec = spec_with(&exact, stones);
        let title = write(&spec).title;
        assert_eq!(title.chars().count(), TITLE_MAX, "{title}");
        assert_eq!(title, full_for(&exact));
        // One character more drops the stones' details, not half a phrase.
        let over = format!("{exact}N");
        let spec = spec_with(&over, stones);
        let title = write(&spec).title;
        assert!(title.chars().count() <= TITLE_MAX, "{title}");
        let ok = materials(&spec)
            .iter()
            .any(|m| title == format!("Meher {over} – {}", cap(m)));
        assert!(ok, "{title} is not a whole candidate");
        assert!(!title.contains("0.75"), "{title}");
        assert!(title.ends_with("with a diamond"), "{title}");
        // Every name length from 1 to 120: the title is always a whole candidate or the name.
        for n in 1..=120 {
            let name = "N".repeat(n);
            let spec = spec_with(&name, stones);
            let title = write(&spec).title;
            assert!(title.chars().count() <= TITLE_MAX);
            let whole = materials(&spec).iter().any(|m| {
                title == format!("Meher {name} – {}", cap(m))
                    || title == format!("{name} – {}", cap(m))
            }) || title == fit(&name, TITLE_MAX);
            assert!(whole, "name of {n}: {title}");
        }
    }
}
