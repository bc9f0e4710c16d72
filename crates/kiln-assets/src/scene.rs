//! Rendered scenes for Caratzon's lifestyle, editorial and social images: procedural surfaces
//! (marble, linen, velvet, a warm studio sweep), the product composed onto them with a contact
//! shadow or a reflection, and typography set with the bundled fonts. Deterministic: noise is
//! hashed from pixel coordinates, never drawn from a random source.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont, point};
use image::{Rgb, RgbImage, RgbaImage};

use crate::AssetError;
use crate::photo::{Cutout, composite, resize_rgba};

static GARAMOND: &[u8] = include_bytes!("../fonts/EBGaramond12-Regular.otf");
static LATO_LIGHT: &[u8] = include_bytes!("../fonts/Lato-Light.ttf");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// White Carrara-like marble, glossy: the product is reflected.
    Marble,
    /// Natural linen, matte.
    Linen,
    /// Deep green velvet, for evening pieces and editorial pages.
    Velvet,
    /// A warm paper-white studio sweep.
    Studio,
}

/// Integer hash noise in 0..1 for a lattice point.
fn hash(x: i64, y: i64, seed: u64) -> f32 {
    let mut h = x.cast_unsigned().wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ y.cast_unsigned().wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ seed;
    h ^= h >> 31;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 29;
    #[allow(clippy::cast_precision_loss)]
    let v = (h >> 40) as f32 / (1u64 << 24) as f32;
    v
}

/// Smooth value noise at (x, y) in lattice units.
fn noise(x: f32, y: f32, seed: u64) -> f32 {
    #[allow(clippy::cast_possible_truncation)]
    let (xi, yi) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x.floor(), y - y.floor());
    let s = |t: f32| t * t * (3.0 - 2.0 * t);
    let (sx, sy) = (s(fx), s(fy));
    let a = hash(xi, yi, seed) + (hash(xi + 1, yi, seed) - hash(xi, yi, seed)) * sx;
    let b = hash(xi, yi + 1, seed) + (hash(xi + 1, yi + 1, seed) - hash(xi, yi + 1, seed)) * sx;
    a + (b - a) * sy
}

fn fbm(x: f32, y: f32, seed: u64) -> f32 {
    (0..5)
        .fold((0.0, 1.0, 0.5), |(sum, freq, amp), i| {
            (
                sum + amp * noise(x * freq, y * freq, seed + i),
                freq * 2.0,
                amp * 0.5,
            )
        })
        .0
}

fn to_px(c: [f32; 3]) -> Rgb<u8> {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Rgb(c.map(|v| v.round().clamp(0.0, 255.0) as u8))
}

/// The surface, `w` x `h`, with light falling from the upper left.
#[allow(clippy::cast_precision_loss)]
pub fn backdrop(surface: Surface, w: u32, h: u32) -> RgbImage {
    let (wf, hf) = (w as f32, h as f32);
    let scale = 6.0 / wf.max(hf);
    RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f32 * scale, y as f32 * scale);
        let light =
            1.0 - 0.18 * ((x as f32 / wf - 0.25).powi(2) + (y as f32 / hf - 0.1).powi(2)).sqrt();
        let c = match surface {
            Surface::Marble => {
                let vein = ((u * 1.3 + v * 0.7 + 4.0 * fbm(u, v, 11)) * 2.2)
                    .sin()
                    .abs()
                    .powf(0.18);
                let base = 244.0 - 10.0 * fbm(u * 2.0, v * 2.0, 3);
                let g = base * (0.86 + 0.14 * vein);
                [g, g - 1.0, g - 3.0]
            }
            Surface::Linen => {
                let weave = ((x % 4) as f32 - 1.5).abs() * 1.2 + ((y % 4) as f32 - 1.5).abs() * 1.2;
                let slub = 8.0 * fbm(u * 8.0, v * 0.8, 7);
                let g = 222.0 - weave - slub;
                [g + 4.0, g, g - 12.0]
            }
            Surface::Velvet => {
                let nap = 14.0 * fbm(u * 3.0, v * 3.0, 5);
                [18.0 + nap * 0.4, 46.0 + nap, 38.0 + nap * 0.8]
            }
            Surface::Studio => {
                let sweep = 1.0 - 0.1 * (y as f32 / hf);
                [250.0 * sweep, 244.0 * sweep, 236.0 * sweep]
            }
        };
        to_px(c.map(|v| v * light))
    })
}

/// Places the product on `canvas` with its long side `frac` of the canvas's short side, centred
/// on (`cx`, `cy`) as fractions of the canvas, over a contact shadow, with a faded mirror image
/// beneath on glossy surfaces.
pub fn place(
    canvas: &mut RgbImage,
    cut: &Cutout,
    frac: f32,
    cx: f32,
    cy: f32,
    reflect: bool,
) -> Result<(), AssetError> {
    let (w, h) = canvas.dimensions();
    let (bw, bh) = (cut.image.width(), cut.image.height());
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let target = (w.min(h) as f32 * frac).round().max(1.0) as u32;
    let long = bw.max(bh).max(1);
    let pw = u32::try_from(u64::from(bw) * u64::from(target) / u64::from(long))
        .unwrap_or(target)
        .max(1);
    let ph = u32::try_from(u64::from(bh) * u64::from(target) / u64::from(long))
        .unwrap_or(target)
        .max(1);
    let product = resize_rgba(&cut.image, pw, ph)?;
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let left = (w as f32 * cx) as i64 - i64::from(pw / 2);
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let top = (h as f32 * cy) as i64 - i64::from(ph / 2);
    let bottom = top + i64::from(ph);
    // Contact shadow: a soft ellipse at the foot of the product.
    #[allow(clippy::cast_precision_loss)]
    let (scx, scy, rx, ry) = (
        (left + i64::from(pw / 2)) as f32,
        bottom as f32,
        pw as f32 * 0.45,
        (ph as f32 * 0.06).max(4.0),
    );
    for y in 0..h {
        for x in 0..w {
            #[allow(clippy::cast_precision_loss)]
            let (dx, dy) = ((x as f32 - scx) / rx, (y as f32 - scy) / ry);
            let d = dx * dx + dy * dy;
            if d < 6.0 {
                let k = (-d * 1.4).exp() * 0.45;
                let p = canvas.get_pixel_mut(x, y);
                *p = to_px([0, 1, 2].map(|c| f32::from(p[c]) * (1.0 - k)));
            }
        }
    }
    if reflect {
        // The product flipped below its foot, fading out as it leaves the surface line.
        #[allow(clippy::cast_precision_loss)]
        let reach = ph as f32 * 0.45;
        let mirror = RgbaImage::from_fn(pw, ph, |x, ry| {
            let mut q = *product.get_pixel(x, ph - 1 - ry);
            #[allow(clippy::cast_precision_loss)]
            let fade = (1.0 - ry as f32 / reach).max(0.0);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let a = (f32::from(q[3]) * 0.3 * fade) as u8;
            q[3] = a;
            q
        });
        composite(canvas, &mirror, left, bottom);
    }
    composite(canvas, &product, left, top);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    Display,
    Light,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Center,
    Right,
}

/// Width in pixels of `text` at `px`.
pub fn text_width(face: Face, px: f32, text: &str) -> f32 {
    let Ok(font) = FontRef::try_from_slice(font_bytes(face)) else {
        return 0.0;
    };
    let scaled = font.as_scaled(PxScale::from(px));
    let mut prev = None;
    text.chars().fold(0.0, |w, c| {
        let id = scaled.glyph_id(c);
        let k = prev.map_or(0.0, |p| scaled.kern(p, id));
        prev = Some(id);
        w + k + scaled.h_advance(id)
    })
}

fn font_bytes(face: Face) -> &'static [u8] {
    match face {
        Face::Display => GARAMOND,
        Face::Light => LATO_LIGHT,
    }
}

/// Sets one line of text with its baseline at `y`, anti-aliased over the canvas.
#[allow(clippy::too_many_arguments)]
pub fn text(
    canvas: &mut RgbImage,
    face: Face,
    px: f32,
    color: [u8; 3],
    x: f32,
    y: f32,
    align: Align,
    text: &str,
) {
    let Ok(font) = FontRef::try_from_slice(font_bytes(face)) else {
        return;
    };
    let scale = PxScale::from(px);
    let scaled = font.as_scaled(scale);
    let width = text_width(face, px, text);
    let mut caret = match align {
        Align::Left => x,
        Align::Center => x - width / 2.0,
        Align::Right => x - width,
    };
    let mut prev = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, point(caret, y));
        caret += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            #[allow(clippy::cast_possible_truncation)]
            let (px_x, px_y) = (
                b.min.x as i64 + i64::from(gx),
                b.min.y as i64 + i64::from(gy),
            );
            let (Ok(px_x), Ok(px_y)) = (u32::try_from(px_x), u32::try_from(px_y)) else {
                return;
            };
            if px_x < canvas.width() && px_y < canvas.height() {
                let p = canvas.get_pixel_mut(px_x, px_y);
                *p = to_px(
                    [0, 1, 2].map(|i| f32::from(p[i]) * (1.0 - cov) + f32::from(color[i]) * cov),
                );
            }
        });
    }
}
