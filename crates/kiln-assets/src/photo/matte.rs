//! The learned mask and colour, combined at full resolution. The mask (U²-Net-p, 320x320)
//! decides object or backdrop where colour cannot: a pale stone, a pearl or polished silver
//! can be as light as the sweep. Colour decides what the coarse mask cannot: the true holes
//! (filigree, the inside of a hoop), which show the backdrop itself — its colour at that
//! place, flat, over an area wider than a sliver — and the exact edge. Edge pixels take the
//! colour of the product just inside them, so no old backdrop rims the product on a new scene.

use super::{Background, Pixels};
use crate::salient::Upsampled;

/// Saliency at or above this is the product's core (out of 255).
pub const SURE: u8 = 128;
/// Below this the learned mask says backdrop, and colour alone decides (thin chains and hooks
/// the coarse mask misses).
const LOW: u8 = 40;
/// Saliency below this is no trace of the product at all.
const TRACE: u8 = 16;

/// The part of the upload the product is in.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub x0: u32,
    pub y0: u32,
    pub w: u32,
    pub h: u32,
}

/// Alpha and straight colour for every pixel of the region, row-major.
#[derive(Debug)]
pub struct Matte {
    pub alpha: Vec<u8>,
    pub colour: Vec<[u8; 3]>,
}

/// The backdrop as a smooth surface (a quadratic in x and y per channel), fitted to the
/// border of the upload: a sweep is lighter at the top and falls off to the corners, so one
/// colour for the whole frame is too coarse to tell a hole from a pale stone.
#[derive(Debug)]
struct Surface {
    coef: [[f64; 6]; 3],
    w: f64,
    h: f64,
    /// Mean absolute residual of the border samples: the backdrop's grain.
    grain: f64,
}

fn terms(x: f64, y: f64) -> [f64; 6] {
    [1.0, x, y, x * x, y * y, x * y]
}

impl Surface {
    fn fit(img: &impl Pixels, fallback: [u8; 3]) -> Surface {
        let (w, h) = img.dimensions();
        let band = (w.min(h) / 50).max(2);
        let step = ((w + h) / 400).max(1);
        let mut samples = Vec::new();
        let mut take = |x: u32, y: u32| {
            let p = img.rgba(x, y);
            samples.push((x, y, [p[0], p[1], p[2]]));
        };
        for y in (0..h).step_by(step as usize) {
            for x in (0..w).step_by(step as usize) {
                if x < band || y < band || x + band >= w || y + band >= h {
                    take(x, y);
                }
            }
        }
        let (fw, fh) = (f64::from(w.max(1)), f64::from(h.max(1)));
        let mut coef = [[0.0; 6]; 3];
        for (c, out) in coef.iter_mut().enumerate() {
            let mut ata = [[0.0f64; 6]; 6];
            let mut atb = [0.0f64; 6];
            for &(x, y, p) in &samples {
                let t = terms(f64::from(x) / fw, f64::from(y) / fh);
                for i in 0..6 {
                    for j in 0..6 {
                        ata[i][j] += t[i] * t[j];
                    }
                    atb[i] += t[i] * f64::from(p[c]);
                }
            }
            *out = solve(ata, atb).unwrap_or([f64::from(fallback[c]), 0.0, 0.0, 0.0, 0.0, 0.0]);
        }
        let mut s = Surface {
            coef,
            w: fw,
            h: fh,
            grain: 0.0,
        };
        let total: f64 = samples
            .iter()
            .map(|&(x, y, p)| {
                let b = s.at(x, y);
                (0..3)
                    .map(|c| (f64::from(p[c]) - f64::from(b[c])).abs())
                    .sum::<f64>()
                    / 3.0
            })
            .sum();
        #[allow(clippy::cast_precision_loss)]
        let n = samples.len().max(1) as f64;
        s.grain = total / n;
        s
    }

    fn at(&self, x: u32, y: u32) -> [f32; 3] {
        let t = terms(f64::from(x) / self.w, f64::from(y) / self.h);
        #[allow(clippy::cast_possible_truncation)]
        self.coef.map(|k| {
            k.iter()
                .zip(t)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                .clamp(0.0, 255.0) as f32
        })
    }
}

/// Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut a: [[f64; 6]; 6], mut b: [f64; 6]) -> Option<[f64; 6]> {
    for col in 0..6 {
        let pivot = (col..6).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..6 {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 6];
    for row in (0..6).rev() {
        let rest: f64 = (row + 1..6).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    Some(x)
}

/// Counts over boxes in O(1): the summed-area table of a 0/1 map.
struct Integral {
    sums: Vec<u32>,
    w: usize,
}

impl Integral {
    fn new(map: &[bool], w: usize, h: usize) -> Integral {
        let mut sums = vec![0u32; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = 0u32;
            for x in 0..w {
                row += u32::from(map[y * w + x]);
                sums[(y + 1) * (w + 1) + x + 1] = sums[y * (w + 1) + x + 1] + row;
            }
        }
        Integral { sums, w }
    }

    /// How many are set in `x0..x1` x `y0..y1`.
    fn count(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> u32 {
        let s = |x: usize, y: usize| self.sums[y * (self.w + 1) + x];
        s(x1, y1) + s(x0, y0) - s(x1, y0) - s(x0, y1)
    }
}

/// The 4-neighbours of pixel `i` in a `w` x `h` grid.
fn neighbours(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < w).then(|| i + 1),
        (y > 0).then(|| i - w),
        (y + 1 < h).then(|| i + w),
    ]
    .into_iter()
    .flatten()
}

/// `map` eroded (`keep_all`) or dilated by a square of radius `r`.
fn morph(map: &[bool], w: usize, h: usize, r: usize, keep_all: bool) -> Vec<bool> {
    let sums = Integral::new(map, w, h);
    let mut out = vec![false; map.len()];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
            let n = sums.count(x0, y0, x1, y1);
            #[allow(clippy::cast_possible_truncation)]
            let full = ((x1 - x0) * (y1 - y0)) as u32;
            out[y * w + x] = if keep_all { n == full } else { n > 0 };
        }
    }
    out
}

/// The combined cut-out of `region`. `colour_alpha` is the colour-only alpha there (used
/// where the learned mask says backdrop); `shrunk` when `img` is the upload shrunk (its
/// pixels are block means).
#[allow(clippy::too_many_lines)]
pub fn matte(
    img: &impl Pixels,
    bg: &Background,
    learned: &Upsampled<'_>,
    region: Region,
    colour_alpha: &[u8],
    shrunk: bool,
) -> Matte {
    let (w, h) = (region.w as usize, region.h as usize);
    let (iw, ih) = img.dimensions();
    let surface = Surface::fit(img, bg.color);
    // Within this of the backdrop surface a pixel may be backdrop: a few times its grain.
    #[allow(clippy::cast_possible_truncation)]
    let tight = (surface.grain * 3.5).clamp(6.0, 24.0) as f32;
    let pixel = |x: usize, y: usize| {
        #[allow(clippy::cast_possible_truncation)]
        let p = img.rgba(region.x0 + x as u32, region.y0 + y as u32);
        [p[0], p[1], p[2]]
    };
    let back = |x: usize, y: usize| {
        #[allow(clippy::cast_possible_truncation)]
        surface.at(region.x0 + x as u32, region.y0 + y as u32)
    };
    // Flatness at the scale of the frame: luma averaged over a box, its change over a span.
    // A cast shadow is soft and changes slowly; the shading of a pearl, of silver or of a
    // stone changes over the piece's own width, several times faster.
    let long = iw.max(ih) as usize;
    let (q, span) = ((long / 600).max(1), (long / 300).max(2));
    let mut luma_sum = vec![0i64; (w + 1) * (h + 1)];
    for y in 0..h {
        let mut row = 0i64;
        for x in 0..w {
            let p = pixel(x, y).map(i64::from);
            row += (299 * p[0] + 587 * p[1] + 114 * p[2]) / 1000;
            luma_sum[(y + 1) * (w + 1) + x + 1] = luma_sum[y * (w + 1) + x + 1] + row;
        }
    }
    let mean_luma = |x: usize, y: usize| -> i32 {
        let (x0, y0, x1, y1) = (
            x.saturating_sub(q),
            y.saturating_sub(q),
            (x + q + 1).min(w),
            (y + q + 1).min(h),
        );
        let s = |x: usize, y: usize| luma_sum[y * (w + 1) + x];
        #[allow(clippy::cast_possible_wrap)]
        let n = ((x1 - x0) * (y1 - y0)) as i64;
        i32::try_from((s(x1, y1) + s(x0, y0) - s(x1, y0) - s(x0, y1)) / n.max(1)).unwrap_or(0)
    };
    #[allow(clippy::cast_possible_truncation)]
    let flat_below = 8 + (surface.grain * 2.0) as i32;
    let slope: Vec<i32> = (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let (xa, xb) = (x.saturating_sub(span), (x + span).min(w - 1));
            let (ya, yb) = (y.saturating_sub(span), (y + span).min(h - 1));
            // Each side on its own: across a ridge (the middle of a rounded band) the two
            // sides rise alike and a difference across it would read flat.
            let here = mean_luma(x, y);
            (mean_luma(xb, y) - here).abs()
                + (here - mean_luma(xa, y)).abs()
                + (mean_luma(x, yb) - here).abs()
                + (here - mean_luma(x, ya)).abs()
        })
        .collect();
    let flat: Vec<bool> = slope.iter().map(|&s| s < flat_below).collect();
    // The unshadowed sweep itself: within its grain of the surface, and flat.
    let backdrop_like = |x: usize, y: usize| -> bool {
        let p = pixel(x, y);
        let b = back(x, y);
        let d = (0..3)
            .map(|c| (f32::from(p[c]) - b[c]).abs())
            .fold(0.0, f32::max);
        d <= tight && flat[y * w + x]
    };

    let saliency: Vec<u8> = (0..w * h)
        .map(|i| {
            #[allow(clippy::cast_possible_truncation)]
            learned.at(region.x0 + (i % w) as u32, region.y0 + (i / w) as u32)
        })
        .collect();
    // Colour with the grain averaged out: over 3x3 at full resolution; a shrunk image's pixels
    // are averages already, and averaging again would mix a piece's rim with its shadow.
    let radius = usize::from(!shrunk);
    let smooth: Vec<[i32; 3]> = (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            let mut sum = [0i32; 3];
            let mut n = 0;
            for yy in y.saturating_sub(radius)..=(y + radius).min(h - 1) {
                for xx in x.saturating_sub(radius)..=(x + radius).min(w - 1) {
                    let p = pixel(xx, yy);
                    for c in 0..3 {
                        sum[c] += i32::from(p[c]);
                    }
                    n += 1;
                }
            }
            sum.map(|v| v / n)
        })
        .collect();
    #[allow(clippy::cast_possible_truncation)]
    let step_max = (surface.grain * 2.0).clamp(4.0, 12.0) as i32;
    #[allow(clippy::cast_possible_truncation)]
    let above = (surface.grain * 2.5).max(4.0) as f32;
    // A pixel as a darkening of the sweep: no brighter than it by more than its grain; how
    // dark (the mean ratio of its channels to the sweep's) and how unevenly its channels are
    // darkened (the spread of those ratios: a tint).
    let darkening = |i: usize| -> Option<(f32, f32)> {
        let (x, y) = (i % w, i / w);
        let p = smooth[i];
        let b = back(x, y);
        #[allow(clippy::cast_precision_loss)]
        let r = [0, 1, 2].map(|c| p[c] as f32 / b[c].max(1.0));
        let (lo, hi) = r
            .iter()
            .fold((f32::MAX, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        #[allow(clippy::cast_precision_loss)]
        let brighter = (0..3).any(|c| p[c] as f32 > b[c] + above);
        (!brighter).then_some(((r[0] + r[1] + r[2]) / 3.0, hi - lo))
    };
    // A shadow on a neutral sweep darkens every channel alike; cream pearls and tinted metal
    // differ by more than this allowance.
    #[allow(clippy::cast_possible_truncation)]
    let mut neutral = 0.025 + (surface.grain / 200.0) as f32;
    // Neutral metal (silver, platinum, white gold) on a grey sweep: its dark side is tinted
    // less than that, as faintly as a cool reflection, and was taken for shadow (holes cut in
    // the band, its dark rim eaten). Such a piece shows itself in its core (where the mask is
    // sure): many of its darker tones lie between the allowance and the tint of its own cast
    // shadow (read around it, where the mask says backdrop). Then only that tint is neutral.
    // (On the test set: silver 28% of its core there, every other piece 2% at most. For them
    // the allowance stays: the last pixels before a gold edge take a tint from the metal.)
    // The cast shadow around the piece (where the mask says backdrop and colour agrees), each
    // pixel as a darkening: its tint sets `neutral` here, its depth `darkest` below.
    let shadow: Vec<(f32, f32)> = (0..w * h)
        .filter(|&i| saliency[i] < LOW && colour_alpha[i] < 128)
        .filter_map(|i| darkening(i).filter(|&(mean, _)| mean < 0.97))
        .collect();
    let core: Vec<f32> = (0..w * h)
        .filter(|&i| saliency[i] >= SURE)
        .filter_map(|i| {
            darkening(i)
                .filter(|&(mean, _)| mean < 0.97)
                .map(|(_, t)| t)
        })
        .collect();
    if shadow.len() >= 64 && core.len() >= 64 {
        let mut tints: Vec<f32> = shadow.iter().map(|&(_, t)| t).collect();
        let k = tints.len() * 49 / 50;
        let (_, &mut p98, _) = tints.select_nth_unstable_by(k, f32::total_cmp);
        let tight = (p98 + 0.001).max(0.004);
        let between = core.iter().filter(|&&t| t > tight && t <= neutral).count();
        if between * 10 >= core.len() {
            neutral = tight;
        }
    }
    // A neutral shade of the sweep: a darkening no more tinted than `neutral`; how dark.
    let shade = |i: usize| -> Option<f32> {
        darkening(i)
            .filter(|&(_, tint)| tint <= neutral)
            .map(|(mean, _)| mean)
    };
    // How dark the piece's cast shadow gets, read where it is certainly shadow (around the
    // piece, where the mask says backdrop): a shadow seen through a hole is no darker, and the
    // dark side of a silver band on grey usually is.
    let mut shadows: Vec<f32> = shadow
        .iter()
        .filter(|&&(_, tint)| tint <= neutral)
        .map(|&(mean, _)| mean)
        .collect();
    shadows.sort_by(f32::total_cmp);
    let darkest = if shadows.len() >= 64 {
        shadows[shadows.len() / 50] - 0.04
    } else {
        0.85
    };
    let shade_of_sweep = |i: usize| shade(i).is_some_and(|mean| mean >= darkest);
    // (Below:) from the seeds, the backdrop floods into neighbours that continue it: a step no larger
    // than its grain (a cast shadow darkens the sweep gradually; the edge of a piece, even
    // silver on grey, is a step), and always a shade of the sweep (never brighter than it by
    // more than its grain, never tinted), so it stops at pale stones, pearls and metal.
    // Seeds of backdrop: where the mask says backdrop and colour agrees, and inside the mask
    // the sweep's own colour, flat, over an area wider than a sliver (an opening removes the
    // bands where a pearl's shading crosses the sweep's shade) and larger than a speck.
    let r = (long / 800).max(1);
    let near: Vec<bool> = (0..w * h).map(|i| backdrop_like(i % w, i / w)).collect();
    // A hole may be in the piece's own shadow (filigree over the sweep): flat shade of the
    // sweep counts too, when the patch is compact (a hole), not a ribbon (the dark side of a
    // silver band is as flat and as neutral as a shadow, but follows the band).
    let shaded: Vec<bool> = (0..w * h)
        .map(|i| near[i] || (flat[i] && shade_of_sweep(i)))
        .collect();
    let opened = morph(&morph(&shaded, w, h, r, true), w, h, r, false);
    let min_area = ((long / 200).max(4)).pow(2);
    // Where the mask says backdrop and colour agrees. On the mask's fringe (saliency above a
    // trace) colour must say the sweep or a shade of it: a pearl's rosy rim beside its own
    // shadow is close to the sweep in colour distance, but tinted.
    let mut backdrop: Vec<bool> = (0..w * h)
        .map(|i| {
            saliency[i] < LOW
                && colour_alpha[i] < 128
                && (saliency[i] < TRACE || near[i] || shade_of_sweep(i))
        })
        .collect();
    let mut stage: Vec<u8> = backdrop.iter().map(|&b| u8::from(b)).collect();
    // Backdrop reached from a hole (not from around the piece).
    let mut hole = vec![false; w * h];
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut members = Vec::new();
    for start in 0..w * h {
        if !opened[start] || seen[start] || backdrop[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        members.clear();
        let mut rim = 0usize;
        while let Some(i) = stack.pop() {
            members.push(i);
            let mut inside = 0;
            for j in neighbours(i, w, h) {
                if opened[j] {
                    inside += 1;
                    if !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
            rim += usize::from(inside < 4);
        }
        let unshaded = members.iter().filter(|&&i| near[i]).count();
        #[allow(clippy::cast_precision_loss)]
        let compact =
            4.0 * std::f64::consts::PI * members.len() as f64 / (rim.max(1) as f64).powi(2);
        if members.len() >= min_area && (unshaded * 2 >= members.len() || compact >= 0.35) {
            for &i in &members {
                backdrop[i] = true;
                hole[i] = true;
                stage[i] = 2;
            }
        }
    }
    // Flatness is measured over a span, so the last span before an edge is never flat, nor is
    // the small cast shadow of a pearl: the backdrop finishes its way to the edge by colour
    // and step alone, a few spans at most (the reach, below).
    let reach = u16::try_from(4 * span + q + 2).unwrap_or(u16::MAX);
    // Each reached pixel carries the backdrop colour it was reached from, following slowly
    // (a moving average over a span): a soft shadow's slow change is followed, the shading
    // of a piece — silver on grey is neutral too — changes faster and is left behind.
    #[allow(clippy::cast_possible_truncation)]
    let tol = (surface.grain * 3.0).clamp(6.0, 16.0) as f32;
    #[allow(clippy::cast_precision_loss)]
    let follow = 1.0 / span as f32;
    let mut dist = vec![u16::MAX; w * h];
    #[allow(clippy::cast_precision_loss)]
    let mut origin: Vec<[f32; 3]> = smooth.iter().map(|p| p.map(|v| v as f32)).collect();
    let mut queue = std::collections::VecDeque::new();
    // The flood and the reach take turns: past a ramp the reach crossed (the shadow a band
    // casts into the ring it closes is steeper than flat) the backdrop may be flat again, and
    // the flood goes on from there; the reach then starts afresh only from what it added.
    let mut seeds: Vec<usize> = (0..w * h).filter(|&i| backdrop[i]).collect();
    for round in 0..4 {
        // From around the piece, the flood enters where the mask is sure only as the sweep's
        // own colour: a piece's dark side beside its own shadow (silver on grey) is a shade of
        // the sweep too. Shadows inside holes are reached from the holes.
        let mut flooded = Vec::new();
        stack.extend(seeds.iter().copied());
        while let Some(i) = stack.pop() {
            for j in neighbours(i, w, h) {
                if backdrop[j] || saliency[j] < LOW {
                    continue;
                }
                let step = (0..3)
                    .map(|c| (smooth[i][c] - smooth[j][c]).abs())
                    .max()
                    .unwrap_or(0);
                let allowed = hole[i] || saliency[j] < SURE || near[j];
                if allowed && step <= step_max && flat[j] && shade_of_sweep(j) {
                    backdrop[j] = true;
                    hole[j] = hole[i];
                    stage[j] = if hole[i] { 3 } else { 4 };
                    stack.push(j);
                    flooded.push(j);
                }
            }
        }
        // The reach starts from all the backdrop at first, then only from what the flood added.
        let starts = if round == 0 { &seeds[..] } else { &[][..] };
        for &i in starts.iter().chain(&flooded) {
            dist[i] = 0;
            queue.push_back(i);
        }
        let mut reached = Vec::new();
        while let Some(i) = queue.pop_front() {
            if dist[i] >= reach {
                continue;
            }
            for j in neighbours(i, w, h) {
                if backdrop[j] || saliency[j] < LOW {
                    continue;
                }
                #[allow(clippy::cast_precision_loss)]
                let p = smooth[j].map(|v| v as f32);
                let off = (0..3)
                    .map(|c| (p[c] - origin[i][c]).abs())
                    .fold(0.0, f32::max);
                if off <= tol && shade_of_sweep(j) {
                    backdrop[j] = true;
                    hole[j] = hole[i];
                    stage[j] = if hole[i] { 6 } else { 5 };
                    dist[j] = dist[i] + 1;
                    origin[j] = [0, 1, 2].map(|c| origin[i][c] + (p[c] - origin[i][c]) * follow);
                    queue.push_back(j);
                    reached.push(j);
                }
            }
        }
        if reached.is_empty() {
            break;
        }
        seeds = reached;
    }
    // When colour alone finds nearly all of what the matte keeps (gold, coloured stones: the
    // piece is nowhere a shade of the sweep), colour's shadow model can be trusted inside the
    // holes too: from a hole, the backdrop takes every neutral shade the colour cut-out calls
    // backdrop, however dark or steep (the shadow a hoop casts inside its own opening). Where
    // colour misses much of the piece (silver on grey, pearls) this would eat the piece, and
    // it does not run.
    let kept = backdrop.iter().filter(|&&b| !b).count();
    let by_colour = (0..w * h)
        .filter(|&i| !backdrop[i] && colour_alpha[i] >= 128)
        .count();
    if kept > 0 && by_colour * 10 >= kept * 9 {
        let neutral_shade = |i: usize| colour_alpha[i] < 128 && shade(i).is_some();
        stack.extend((0..w * h).filter(|&i| hole[i]));
        while let Some(i) = stack.pop() {
            for j in neighbours(i, w, h) {
                if !backdrop[j] && neutral_shade(j) {
                    backdrop[j] = true;
                    hole[j] = true;
                    stage[j] = 7;
                    stack.push(j);
                }
            }
        }
    }
    // A developer's view of the decision (red: backdrop, green: flat, blue: saliency) and of
    // which step took each backdrop pixel (grey: around the piece, red: a hole or open
    // backdrop, orange: flooded from a hole, green: flooded from around, blue and light blue:
    // the reach towards the edge, from around and from a hole, purple: colour's shadow in a
    // hole), for tuning on the test set: `KILN_MATTE_DEBUG=DIR cutout_eval OUT`.
    if let Ok(dir) = std::env::var("KILN_MATTE_DEBUG") {
        #[allow(clippy::cast_possible_truncation)]
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb([
                if backdrop[i] { 255 } else { 0 },
                if flat[i] { 255 } else { 0 },
                saliency[i],
            ])
        });
        let _ = img.save(format!("{dir}/matte-{w}x{h}.png"));
        let pal = [
            [255u8, 255, 255],
            [200, 200, 200],
            [255, 0, 0],
            [255, 150, 0],
            [0, 160, 0],
            [0, 0, 255],
            [0, 200, 255],
            [200, 0, 200],
        ];
        let st = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb(if backdrop[i] {
                pal[stage[i] as usize]
            } else {
                [60, 60, 60]
            })
        });
        let _ = st.save(format!("{dir}/stage-{w}x{h}.png"));
    }
    let object: Vec<bool> = backdrop.iter().map(|b| !b).collect();

    // A one-pixel soft edge: the 3x3 mean of the hard mask.
    let sums = Integral::new(&object, w, h);
    let mut alpha = vec![0u8; w * h];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(1), (y + 2).min(h));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(1), (x + 2).min(w));
            let n = sums.count(x0, y0, x1, y1);
            #[allow(clippy::cast_possible_truncation)]
            let full = ((x1 - x0) * (y1 - y0)) as u32;
            alpha[y * w + x] = u8::try_from(n * 255 / full).unwrap_or(255);
        }
    }
    // Edge colours: pixels on or next to the edge mix product and backdrop; they take the
    // mean colour of the product a few pixels inside them.
    let inner = morph(&object, w, h, 2, true);
    let mut colour: Vec<[u8; 3]> = (0..w * h).map(|i| pixel(i % w, i / w)).collect();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            if alpha[i] == 0 || inner[i] {
                continue;
            }
            let (mut sum, mut n) = ([0u32; 3], 0u32);
            for yy in y.saturating_sub(3)..(y + 4).min(h) {
                for xx in x.saturating_sub(3)..(x + 4).min(w) {
                    if inner[yy * w + xx] {
                        let p = pixel(xx, yy);
                        for c in 0..3 {
                            sum[c] += u32::from(p[c]);
                        }
                        n += 1;
                    }
                }
            }
            if n > 0 {
                colour[i] = sum.map(|s| u8::try_from(s / n).unwrap_or(255));
            } else {
                // A thin part with no inside: take the backdrop out of the mix.
                let a = f32::from(alpha[i]) / 255.0;
                let (p, b) = (pixel(x, y), back(x, y));
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let un = |c: usize| {
                    ((f32::from(p[c]) - (1.0 - a) * b[c]) / a.max(0.2)).clamp(0.0, 255.0) as u8
                };
                colour[i] = [un(0), un(1), un(2)];
            }
        }
    }
    Matte { alpha, colour }
}
