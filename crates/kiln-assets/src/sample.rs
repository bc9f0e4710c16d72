//! The bundled sample design: a solitaire ring photographed on a warm grey studio backdrop,
//! rendered procedurally (so the repository ships no photo and the demo needs no download).
//! Deterministic for a given size.

use image::{Rgb, RgbImage};

/// A small deterministic noise source (xorshift), for the backdrop's grain.
struct Grain(u64);

impl Grain {
    fn next(&mut self) -> i32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        i32::try_from(self.0 % 7).unwrap_or(0) - 3
    }
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn hash2(a: f32, b: f32) -> f32 {
    let v = (a * 12.9898 + b * 78.233).sin() * 43_758.547;
    v - v.floor()
}

/// The metal of a sample ring: its shadow and highlight colours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleMetal {
    pub dark: [f32; 3],
    pub light: [f32; 3],
}

pub const GOLD: SampleMetal = SampleMetal {
    dark: [150.0, 104.0, 38.0],
    light: [246.0, 214.0, 140.0],
};

/// Polished silver: its highlights are as light as the grey backdrop, the hard case for a
/// cut-out that separates product from background by colour.
pub const SILVER: SampleMetal = SampleMetal {
    dark: [96.0, 99.0, 106.0],
    light: [244.0, 245.0, 248.0],
};

/// A gold ring on a backdrop, `size` x `size` pixels. The ring spans about 60% of the width.
pub fn ring(size: u32) -> RgbImage {
    ring_in(size, GOLD).0
}

/// A ring in `metal` on the backdrop, and which pixels are the ring (row-major, `true` for
/// product): the ground truth for cut-out tests.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub fn ring_in(size: u32, metal: SampleMetal) -> (RgbImage, Vec<bool>) {
    let s = size as f32;
    let mut grain = Grain(0x9E37_79B9_7F4A_7C15);
    let (cx, cy) = (0.5 * s, 0.60 * s);
    let (rx, ry, thick) = (0.29 * s, 0.12 * s, 0.035 * s);
    let (gold_dark, gold_light) = (metal.dark, metal.light);
    let mut truth = vec![false; (size as usize) * (size as usize)];
    let img = RgbImage::from_fn(size, size, |x, y| {
        let mut product = false;
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        // Backdrop: warm grey, a touch lighter at the top, with fine grain.
        let base = 238.0 - 8.0 * (fy / s);
        let mut c = [base, base - 3.0, base - 7.0];
        // Soft contact shadow on the backdrop under the band.
        let sd = ((fx - cx) / (rx * 1.05)).powi(2) + ((fy - (cy + ry * 0.9)) / (ry * 0.55)).powi(2);
        if sd < 1.6 {
            c = mix(c, [150.0, 146.0, 140.0], (1.0 - sd / 1.6).powi(2) * 0.55);
        }
        // The band: an ellipse ring, shaded by angle, the back half darker.
        let (dx, dy) = ((fx - cx) / rx, (fy - cy) / ry);
        let r = (dx * dx + dy * dy).sqrt();
        let inner = 1.0 - thick / rx;
        if r <= 1.0 && r >= inner {
            product = true;
            let angle = dy.atan2(dx);
            let light = 0.5 + 0.5 * (angle + 2.2).cos();
            let across = ((r - inner) / (1.0 - inner) - 0.5).abs() * 2.0;
            let t = (light * (1.0 - 0.55 * across)).clamp(0.0, 1.0);
            c = mix(gold_dark, gold_light, if dy < 0.0 { t * 0.75 } else { t });
        }
        // The stone: a brilliant seen from the side, crown above the band.
        let (sx, sy, sw) = (cx, cy - ry - 0.075 * s, 0.085 * s);
        let (ux, uy) = ((fx - sx) / sw, (fy - sy) / sw);
        let crown = (-0.55..=0.0).contains(&uy) && ux.abs() <= 1.0 - 0.45 * (-uy / 0.55);
        let pavilion = uy > 0.0 && uy <= 1.05 && ux.abs() <= 1.0 - uy / 1.05;
        if crown || pavilion {
            product = true;
            // Facets: wedges fanning from the table's centre on the crown and from the culet on
            // the pavilion, each lit by how it faces the light (upper left), with a few sparks.
            let (angle, band) = if crown {
                ((uy + 0.8).atan2(ux), ((-uy / 0.55) * 2.0).floor())
            } else {
                ((uy - 1.05).atan2(ux), 0.0)
            };
            let wedge = ((angle + std::f32::consts::PI) / (std::f32::consts::PI / 7.0)).floor();
            let lit =
                0.5 + 0.5 * ((wedge * 1.7 + band * 2.3).sin() * 0.8 + (wedge * 0.9).cos() * 0.2);
            let lit = if pavilion { lit * 0.85 } else { lit };
            let spark = hash2(wedge, band) > 0.86;
            c = if spark {
                [255.0, 255.0, 255.0]
            } else {
                mix([112.0, 124.0, 146.0], [246.0, 249.0, 255.0], lit)
            };
        }
        // Prongs.
        for px in [-0.7_f32, 0.7] {
            let (qx, qy) = (
                (fx - (sx + px * sw)) / (0.06 * sw),
                (fy - (sy + 0.5 * sw)) / (0.55 * sw),
            );
            if qx * qx + qy * qy <= 1.0 {
                product = true;
                c = mix(gold_dark, gold_light, 0.6);
            }
        }
        truth[(y as usize) * (size as usize) + x as usize] = product;
        let g = grain.next() as f32;
        Rgb(c.map(|v| (v + g).round().clamp(0.0, 255.0) as u8))
    });
    (img, truth)
}

/// The sample's product spec.
pub const SPEC_JSON: &str = r#"{
  "style_number": "KL-R-1042",
  "name": "Aurora Solitaire",
  "category": "ring",
  "brand": "Maison Vela",
  "collection": "Northern Light",
  "metal": {"type": "gold", "purity": "18k", "color": "yellow", "weight_g": 3.2},
  "stones": [{"type": "diamond", "carat": 0.75, "cut": "round brilliant", "setting": "four-prong", "count": 1}],
  "dimensions_mm": {"width": 2.1, "height": 7.5},
  "sizes": ["5", "6", "7", "8"],
  "wholesale_price": {"amount": 1250, "currency": "USD"},
  "msrp": {"amount": 2900, "currency": "USD"},
  "min_order": 2,
  "lead_time_days": 21,
  "notes": "Cast in recycled gold and set by hand."
}"#;
