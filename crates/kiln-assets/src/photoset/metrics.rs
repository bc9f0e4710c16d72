//! How a cut-out compares with the truth of a test photo.

use super::Photo;
use crate::photo::Cutout;

/// Per-photo figures, each over the whole frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Intersection over union of the cut-out (alpha ≥ 128) and the true product.
    pub iou: f64,
    /// Share of the true product that came out transparent (alpha < 128).
    pub transparent: f64,
    /// Old backdrop carried along the edge, as it shows on a black scene: the brightness
    /// (alpha x luma, 0..1) of the cut-out's pixels outside the true product, per pixel of the
    /// product's edge. A one-pixel rim of a white sweep is about 1; a clean edge is near 0.
    pub fringe: f64,
}

/// The cut-out's RGBA at upload pixel (`x`, `y`), transparent outside its bounds.
pub fn rgba_at(cut: &Cutout, x: u32, y: u32) -> [u8; 4] {
    let b = cut.bounds;
    if x < b.x0 || y < b.y0 || x >= b.x1 || y >= b.y1 {
        [0; 4]
    } else {
        cut.image.get_pixel(x - b.x0, y - b.y0).0
    }
}

/// The scores of a cut-out of `photo` read by `rgba(x, y)` in upload pixels (kiln's cut-out,
/// or another tool's).
pub fn score(photo: &Photo, rgba: impl Fn(u32, u32) -> [u8; 4]) -> Scores {
    let (w, h) = (photo.width, photo.height);
    let (mut inter, mut union, mut product, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let (mut edge_len, mut fringe) = (0u64, 0f64);
    for y in 0..h {
        for x in 0..w {
            let truth = photo.is_product(x, y);
            let [r, g, b, a] = rgba(x, y);
            let cut = a >= 128;
            inter += u64::from(truth && cut);
            union += u64::from(truth || cut);
            product += u64::from(truth);
            lost += u64::from(truth && !cut);
            if truth
                && !(x.saturating_sub(1)..=(x + 1).min(w - 1)).all(|nx| photo.is_product(nx, y))
            {
                edge_len += 1;
            }
            if !truth && a > 0 {
                let luma = (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b)) / 1000;
                fringe += f64::from(a) / 255.0 * f64::from(luma) / 255.0;
            }
        }
    }
    #[allow(clippy::cast_precision_loss)]
    Scores {
        iou: inter as f64 / union.max(1) as f64,
        transparent: lost as f64 / product.max(1) as f64,
        fringe: fringe / edge_len.max(1) as f64,
    }
}
