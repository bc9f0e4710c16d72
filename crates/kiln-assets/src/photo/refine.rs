//! The learned cut-out's edge at full resolution. The decision (object or backdrop) is taken
//! on the upload shrunk `k` times (`matte`); here each full-resolution pixel takes it over,
//! and only the pixels near its edge are looked at again. There, where the product's colour
//! nearby is steady and clearly apart from the backdrop's (gold on a white sweep), a pixel's
//! alpha is how far its colour has moved from the backdrop towards the product: the edge
//! lands where it is, not on the shrunk grid. Where it is not (pearls and pale stones on white,
//! silver on grey: shading that spans the backdrop's colour), colour cannot place the edge and
//! the decision's edge is kept, sharpened to about one pixel of the shrunk image. Edge pixels
//! take the product's colour (the backdrop unmixed), so no old backdrop rims the product.

use image::RgbaImage;

use super::{Masked, Pixels, estimate_background, matte::Region};

/// Window (in shrunk pixels, each way) over which the product's and the backdrop's colour
/// near an edge pixel are read.
const WINDOW: usize = 2;

/// Per shrunk pixel: the mean colour of the sure product and of the sure backdrop in its
/// window, and whether the product's colour there is steady enough, against its distance
/// from the backdrop, for colour to place the edge.
#[derive(Clone, Copy, Default)]
struct Near {
    product: Option<[f32; 3]>,
    backdrop: Option<[f32; 3]>,
    steady: bool,
}

/// Summed-area table over `w` x `h` of values with `N` channels.
struct Sums<const N: usize> {
    sums: Vec<[f64; N]>,
    w: usize,
}

impl<const N: usize> Sums<N> {
    fn new(w: usize, h: usize, value: impl Fn(usize, usize) -> [f64; N]) -> Sums<N> {
        let mut sums = vec![[0.0; N]; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = [0.0; N];
            for x in 0..w {
                let v = value(x, y);
                for c in 0..N {
                    row[c] += v[c];
                    sums[(y + 1) * (w + 1) + x + 1][c] = sums[y * (w + 1) + x + 1][c] + row[c];
                }
            }
        }
        Sums { sums, w }
    }

    fn window(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> [f64; N] {
        let s = |x: usize, y: usize| self.sums[y * (self.w + 1) + x];
        let (a, b, c, d) = (s(x1, y1), s(x0, y0), s(x1, y0), s(x0, y1));
        std::array::from_fn(|i| a[i] + b[i] - c[i] - d[i])
    }
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

#[allow(clippy::too_many_lines)]
pub(super) fn refine(img: &impl Pixels, small: &RgbaImage, low: &Masked, k: u32) -> Masked {
    let (w, h) = img.dimensions();
    let r = low.region;
    let (lw, lh) = (r.w as usize, r.h as usize);
    let cell = |x: usize, y: usize| {
        #[allow(clippy::cast_possible_truncation)]
        let p = small.get_pixel(r.x0 + x as u32, r.y0 + y as u32).0;
        [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]
    };
    let sure = |x: usize, y: usize, a: u8| low.alpha[y * lw + x] == a;
    let table = |a: u8| {
        Sums::<7>::new(lw, lh, |x, y| {
            if sure(x, y, a) {
                let c = cell(x, y);
                [c[0], c[1], c[2], c[0] * c[0], c[1] * c[1], c[2] * c[2], 1.0]
            } else {
                [0.0; 7]
            }
        })
    };
    let (product, backdrop) = (table(255), table(0));
    // The full-resolution grain: the colour steps a backdrop pixel may take by itself.
    let grain = estimate_background(img).spread;
    let floor = 2.0 * grain + 3.0;
    #[allow(clippy::cast_possible_truncation)]
    let near: Vec<Near> = (0..lw * lh)
        .map(|i| {
            let (x, y) = (i % lw, i / lw);
            let (x0, y0) = (x.saturating_sub(WINDOW), y.saturating_sub(WINDOW));
            let (x1, y1) = ((x + WINDOW + 1).min(lw), (y + WINDOW + 1).min(lh));
            let mean = |s: [f64; 7]| (s[6] > 0.0).then(|| [0, 1, 2].map(|c| (s[c] / s[6]) as f32));
            let p = product.window(x0, y0, x1, y1);
            let b = backdrop.window(x0, y0, x1, y1);
            let (pm, bm) = (mean(p), mean(b));
            let spread = pm.map_or(0.0, |m| {
                (0..3)
                    .map(|c| (p[3 + c] / p[6] - f64::from(m[c]).powi(2)).max(0.0))
                    .sum::<f64>()
                    .sqrt() as f32
            });
            let steady = match (pm, bm) {
                (Some(pm), Some(bm)) => {
                    let gap = dist(pm, bm);
                    gap >= 3.0 * floor && spread * 2.0 <= gap
                }
                _ => false,
            };
            Near {
                product: pm,
                backdrop: bm,
                steady,
            }
        })
        .collect();

    let (fx0, fy0) = (r.x0 * k, r.y0 * k);
    let (fx1, fy1) = (((r.x0 + r.w) * k).min(w), ((r.y0 + r.h) * k).min(h));
    let (fw, fh) = ((fx1 - fx0) as usize, (fy1 - fy0) as usize);
    let mut alpha = vec![0u8; fw * fh];
    let mut colour = vec![[0u8; 3]; fw * fh];
    let low_colour = low.colour.as_ref();
    #[allow(clippy::cast_precision_loss)]
    let kf = k as f32;
    let at = |x: usize, y: usize| f32::from(low.alpha[y * lw + x]) / 255.0;
    // A full-resolution coordinate on a shrunk axis of `n` pixels: the two shrunk pixels it
    // lies between and how far it is from the first (bilinear).
    let between = |v: usize, n: usize| {
        #[allow(clippy::cast_precision_loss)]
        let s = ((v as f32 + 0.5) / kf - 0.5).clamp(0.0, (n - 1) as f32);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let first = s as usize;
        (first, (first + 1).min(n - 1), s.fract())
    };
    // Worked out once per column, not once per pixel.
    let columns: Vec<(usize, usize, f32)> = (0..fw).map(|x| between(x, lw)).collect();
    for y in 0..fh {
        let (y0, y1, ty) = between(y, lh);
        for (x, &(x0, x1, tx)) in columns.iter().enumerate() {
            let (a00, a10, a01, a11) = (at(x0, y0), at(x1, y0), at(x0, y1), at(x1, y1));
            if a00.max(a10).max(a01).max(a11) <= 0.0 {
                continue;
            }
            let i = y * fw + x;
            #[allow(clippy::cast_possible_truncation)]
            let p = img.rgba(fx0 + x as u32, fy0 + y as u32);
            if a00.min(a10).min(a01).min(a11) >= 1.0 {
                alpha[i] = p[3];
                colour[i] = [p[0], p[1], p[2]];
                continue;
            }
            let u = (a00 * (1.0 - tx) + a10 * tx) * (1.0 - ty) + (a01 * (1.0 - tx) + a11 * tx) * ty;
            // The shrunk pixel this one lies in.
            let c = (y / k as usize).min(lh - 1) * lw + (x / k as usize).min(lw - 1);
            let n = near[c];
            let pf = [p[0], p[1], p[2]].map(f32::from);
            let a = match (n.product, n.backdrop) {
                (Some(f), Some(b)) if n.steady => {
                    ((dist(pf, b) - floor) / (dist(f, b) - floor)).clamp(0.0, 1.0)
                }
                _ => ((u - 0.5) * 6.0 + 0.5).clamp(0.0, 1.0),
            };
            let straight = if a >= 0.95 {
                pf
            } else if let (true, Some(b)) = (a >= 0.5 && n.steady, n.backdrop) {
                [0, 1, 2].map(|c| (b[c] + (pf[c] - b[c]) / a).clamp(0.0, 255.0))
            } else if let Some(f) = n.product {
                f
            } else {
                low_colour.map_or(pf, |lc| lc[c].map(f32::from))
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            {
                alpha[i] = (a * f32::from(p[3])).round() as u8;
                colour[i] = straight.map(|v| v.round() as u8);
            }
        }
    }
    #[allow(clippy::cast_possible_truncation)]
    Masked {
        region: Region {
            x0: fx0,
            y0: fy0,
            w: fw as u32,
            h: fh as u32,
        },
        alpha,
        colour: Some(colour),
        background: low.background,
    }
}
