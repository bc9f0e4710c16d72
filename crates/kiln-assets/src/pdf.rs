//! PDFs with krilla: the wholesale line sheet (and, for Caratzon, the lookbook). Fonts ship in
//! the repository under the SIL Open Font License (fonts/): EB Garamond for display, Lato for
//! text; krilla embeds and subsets them. JPEGs pass into the PDF unchanged. Text is laid out
//! here, a line at a time, with widths measured from the fonts' own advance widths.

use kiln_core::ProductSpec;
use krilla::Document;
use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point, Size, Transform};
use krilla::image::Image;
use krilla::metadata::Metadata;
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::surface::Surface;
use krilla::text::{Font, TextDirection};

use crate::{AssetError, copy};

static GARAMOND: &[u8] = include_bytes!("../fonts/EBGaramond12-Regular.otf");
static GARAMOND_ITALIC: &[u8] = include_bytes!("../fonts/EBGaramond12-Italic.otf");
static LATO: &[u8] = include_bytes!("../fonts/Lato-Regular.ttf");
static LATO_BOLD: &[u8] = include_bytes!("../fonts/Lato-Bold.ttf");
static LATO_LIGHT: &[u8] = include_bytes!("../fonts/Lato-Light.ttf");

/// A font for drawing (krilla) and measuring (ttf-parser).
#[derive(Clone)]
pub struct Face {
    font: Font,
    data: &'static [u8],
}

impl Face {
    fn load(data: &'static [u8]) -> Result<Face, AssetError> {
        let font = Font::new(data.to_vec().into(), 0)
            .ok_or_else(|| AssetError::Render("a bundled font does not load".into()))?;
        Ok(Face { font, data })
    }

    /// Width of `text` at `size` points (advance widths, no kerning).
    pub fn width(&self, text: &str, size: f32) -> f32 {
        let Ok(face) = ttf_parser::Face::parse(self.data, 0) else {
            return 0.0;
        };
        let upem = f32::from(face.units_per_em());
        let units: f32 = text
            .chars()
            .map(|c| {
                face.glyph_index(c)
                    .and_then(|g| face.glyph_hor_advance(g))
                    .map_or(upem / 2.0, f32::from)
            })
            .sum();
        units / upem * size
    }
}

impl std::fmt::Debug for Face {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Face")
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// The type families of a kiln document.
#[derive(Debug)]
pub struct Fonts {
    pub display: Face,
    pub display_italic: Face,
    pub text: Face,
    pub bold: Face,
    pub light: Face,
}

impl Fonts {
    pub fn load() -> Result<Fonts, AssetError> {
        Ok(Fonts {
            display: Face::load(GARAMOND)?,
            display_italic: Face::load(GARAMOND_ITALIC)?,
            text: Face::load(LATO)?,
            bold: Face::load(LATO_BOLD)?,
            light: Face::load(LATO_LIGHT)?,
        })
    }
}

pub const INK: (u8, u8, u8) = (34, 31, 28);
pub const MUTED: (u8, u8, u8) = (120, 112, 104);
pub const GOLD: (u8, u8, u8) = (168, 132, 70);

/// Drawing helpers over a krilla surface, in points from the top-left.
pub struct Pen<'s, 'a> {
    pub s: &'s mut Surface<'a>,
}

impl std::fmt::Debug for Pen<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pen")
    }
}

impl Pen<'_, '_> {
    fn fill(&mut self, (r, g, b): (u8, u8, u8)) {
        self.s.set_fill(Some(Fill {
            paint: rgb::Color::new(r, g, b).into(),
            opacity: NormalizedF32::ONE,
            rule: Default::default(),
        }));
    }

    /// Text with its baseline at `y`, starting at `x`.
    pub fn text(
        &mut self,
        face: &Face,
        size: f32,
        color: (u8, u8, u8),
        x: f32,
        y: f32,
        text: &str,
    ) {
        self.fill(color);
        self.s.draw_text(
            Point::from_xy(x, y),
            face.font.clone(),
            size,
            text,
            false,
            TextDirection::Auto,
        );
    }

    /// Text ending at `right`.
    pub fn text_right(
        &mut self,
        face: &Face,
        size: f32,
        color: (u8, u8, u8),
        right: f32,
        y: f32,
        text: &str,
    ) {
        let w = face.width(text, size);
        self.text(face, size, color, right - w, y, text);
    }

    /// Wraps `text` to `width`, drawing up to `max_lines` lines `leading` apart; returns the
    /// baseline after the last line.
    #[allow(clippy::too_many_arguments)]
    pub fn paragraph(
        &mut self,
        face: &Face,
        size: f32,
        color: (u8, u8, u8),
        x: f32,
        y: f32,
        width: f32,
        leading: f32,
        max_lines: usize,
        text: &str,
    ) -> f32 {
        let mut y = y;
        for line in wrap(face, size, width, text).into_iter().take(max_lines) {
            self.text(face, size, color, x, y, &line);
            y += leading;
        }
        y
    }

    pub fn rule(&mut self, x0: f32, x1: f32, y: f32, color: (u8, u8, u8), width: f32) {
        let mut pb = PathBuilder::new();
        pb.move_to(x0, y);
        pb.line_to(x1, y);
        if let Some(path) = pb.finish() {
            self.s.set_fill(None);
            self.s.set_stroke(Some(Stroke {
                paint: rgb::Color::new(color.0, color.1, color.2).into(),
                width,
                ..Default::default()
            }));
            self.s.draw_path(&path);
            self.s.set_stroke(None);
        }
    }

    pub fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, color: (u8, u8, u8)) {
        let mut pb = PathBuilder::new();
        if let Some(r) = krilla::geom::Rect::from_xywh(x, y, w, h) {
            pb.push_rect(r);
        }
        if let Some(path) = pb.finish() {
            self.fill(color);
            self.s.draw_path(&path);
        }
    }

    /// A JPEG placed in the box (`x`, `y`, `w`, `h`), passed into the PDF unchanged.
    pub fn jpeg(&mut self, jpeg: &[u8], x: f32, y: f32, w: f32, h: f32) -> Result<(), AssetError> {
        let img = Image::from_jpeg(jpeg.to_vec().into(), true)
            .map_err(|e| AssetError::Render(format!("PDF image: {e}")))?;
        let size =
            Size::from_wh(w, h).ok_or_else(|| AssetError::Render("empty image box".into()))?;
        self.s.push_transform(&Transform::from_translate(x, y));
        self.s.draw_image(img, size);
        self.s.pop();
        Ok(())
    }
}

/// Greedy word wrap by measured width.
pub fn wrap(face: &Face, size: f32, width: f32, text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_owned()
        } else {
            format!("{line} {word}")
        };
        if face.width(&candidate, size) > width && !line.is_empty() {
            lines.push(std::mem::take(&mut line));
            line = word.to_owned();
        } else {
            line = candidate;
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A new document with its metadata (no creation date: the same input gives the same bytes).
pub fn document(title: &str) -> Document {
    let mut doc = Document::new();
    doc.set_metadata(
        Metadata::new()
            .title(title.to_owned())
            .creator("kiln".to_owned())
            .producer("kiln (krilla)".to_owned()),
    );
    doc
}

pub fn finish(doc: Document) -> Result<Vec<u8>, AssetError> {
    doc.finish()
        .map_err(|e| AssetError::Render(format!("PDF: {e:?}")))
}

pub const A4: (f32, f32) = (595.0, 842.0);

pub fn page_settings(w: f32, h: f32) -> Result<PageSettings, AssetError> {
    PageSettings::from_wh(w, h).ok_or_else(|| AssetError::Render("bad page size".into()))
}

/// The wholesale line sheet: one A4 page for the style, with its photos, the facts a buyer
/// orders from, and the terms.
pub fn line_sheet(
    spec: &ProductSpec,
    main_jpeg: &[u8],
    detail_jpeg: &[u8],
    shadow_jpeg: &[u8],
) -> Result<Vec<u8>, AssetError> {
    let f = Fonts::load()?;
    let (w, h) = A4;
    let margin = 48.0;
    let mut doc = document(&format!("{} – line sheet", spec.name));
    let mut page = doc.start_page_with(page_settings(w, h)?);
    let mut surface = page.surface();
    let mut pen = Pen { s: &mut surface };

    // Header: brand, collection, a gold rule.
    let brand = spec.brand.as_deref().unwrap_or("Line Sheet");
    pen.text(&f.display, 28.0, INK, margin, margin + 22.0, brand);
    let header = match &spec.collection {
        Some(c) => format!("{}  ·  WHOLESALE LINE SHEET", c.to_uppercase()),
        None => "WHOLESALE LINE SHEET".to_owned(),
    };
    pen.text_right(&f.light, 8.5, MUTED, w - margin, margin + 20.0, &header);
    pen.rule(margin, w - margin, margin + 36.0, GOLD, 0.8);

    // Photos: the main image large, detail and shadow beneath it.
    let top = margin + 56.0;
    let big = 300.0;
    pen.jpeg(main_jpeg, margin, top, big, big)?;
    let small = (big - 12.0) / 2.0;
    pen.jpeg(detail_jpeg, margin, top + big + 12.0, small, small)?;
    pen.jpeg(
        shadow_jpeg,
        margin + small + 12.0,
        top + big + 12.0,
        small,
        small,
    )?;

    // The facts, right of the photos.
    let x = margin + big + 28.0;
    let right = w - margin;
    let col = right - x;
    let mut y = top + 14.0;
    pen.text(
        &f.bold,
        8.0,
        GOLD,
        x,
        y,
        &format!("STYLE {}", spec.style_number),
    );
    y += 26.0;
    for line in wrap(&f.display, 22.0, col, &spec.name).into_iter().take(2) {
        pen.text(&f.display, 22.0, INK, x, y, &line);
        y += 24.0;
    }
    y += 4.0;
    let metal = copy::metal_phrase(spec);
    let stone = copy::stone_phrase(spec);
    let mut facts: Vec<(&str, String)> = Vec::new();
    facts.push(("Category", spec.category.noun().to_owned()));
    if !metal.is_empty() {
        let weight = spec
            .metal
            .as_ref()
            .and_then(|m| m.weight_g)
            .map(|g| format!(", {g} g"))
            .unwrap_or_default();
        facts.push(("Metal", format!("{metal}{weight}")));
    }
    for s in &spec.stones {
        let mut parts = vec![s.kind.clone()];
        if let Some(c) = s.carat {
            parts.push(format!("{c} ct"));
        }
        parts.extend(s.cut.clone());
        parts.extend(s.setting.as_ref().map(|v| format!("{v} setting")));
        if let Some(n) = s.count.filter(|n| *n > 1) {
            parts.push(format!("x{n}"));
        }
        facts.push(("Stone", parts.join(", ")));
    }
    if stone.is_empty() && spec.stones.is_empty() {
        facts.push(("Stones", "none".to_owned()));
    }
    if let Some(d) = &spec.dimensions_mm {
        let dims: Vec<String> = [
            ("L", d.length),
            ("W", d.width),
            ("H", d.height),
            ("Ø", d.diameter),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n} {v} mm")))
        .collect();
        if !dims.is_empty() {
            facts.push(("Dimensions", dims.join(" · ")));
        }
    }
    if !spec.sizes.is_empty() {
        facts.push(("Sizes", spec.sizes.join(", ")));
    }
    for (label, value) in &facts {
        pen.text(&f.light, 7.5, MUTED, x, y, &label.to_uppercase());
        y = pen.paragraph(&f.text, 10.0, INK, x, y + 13.0, col, 13.0, 3, value) + 6.0;
    }

    // Prices, boxed.
    y += 6.0;
    pen.rect(x, y, col, 58.0, (247, 244, 238));
    let half = col / 2.0;
    let price = |m: &Option<kiln_core::Money>| {
        m.as_ref()
            .map_or("on request".to_owned(), kiln_core::Money::display)
    };
    pen.text(&f.light, 7.5, MUTED, x + 12.0, y + 18.0, "WHOLESALE");
    pen.text(
        &f.display,
        18.0,
        INK,
        x + 12.0,
        y + 42.0,
        &price(&spec.wholesale_price),
    );
    pen.text(&f.light, 7.5, MUTED, x + half + 6.0, y + 18.0, "MSRP");
    pen.text(
        &f.display,
        18.0,
        INK,
        x + half + 6.0,
        y + 42.0,
        &price(&spec.msrp),
    );
    y += 80.0;

    // Ordering terms.
    let mut terms = Vec::new();
    if let Some(n) = spec.min_order {
        terms.push(("Minimum order", format!("{n} units per style")));
    }
    if let Some(d) = spec.lead_time_days {
        terms.push(("Lead time", format!("{d} days from order")));
    }
    terms.push(("Payment", "Net 30 on approved accounts".to_owned()));
    for (label, value) in &terms {
        pen.text(&f.light, 7.5, MUTED, x, y, &label.to_uppercase());
        pen.text(&f.text, 10.0, INK, x, y + 13.0, value);
        y += 30.0;
    }

    // Notes across the foot of the photo column.
    if let Some(n) = &spec.notes {
        pen.paragraph(
            &f.display_italic,
            12.0,
            INK,
            margin,
            top + big + small + 40.0,
            w - 2.0 * margin,
            16.0,
            4,
            n,
        );
    }
    pen.rule(margin, w - margin, h - margin - 18.0, GOLD, 0.5);
    pen.text(
        &f.light,
        7.5,
        MUTED,
        margin,
        h - margin,
        &format!("{} · Style {}", brand, spec.style_number),
    );
    pen.text_right(
        &f.light,
        7.5,
        MUTED,
        w - margin,
        h - margin,
        "Prices exclude shipping and taxes · Made with kiln",
    );

    surface.finish();
    page.finish();
    finish(doc)
}
