//! A test set of product photographs with ground truth: jewelry the colour cut-out gets wrong
//! (pale stones and pearls on light backdrops, silver on grey, filigree with real holes, a
//! hoop, a U-shaped necklace), rendered with a known mask, cast on a studio sweep with a soft
//! cast shadow, grain and JPEG compression, at phone resolutions. The cut-out tests and the
//! cut-out bench (beside rembg) both use it. Deterministic: a name and size give the same bytes.

use image::{Rgb, RgbImage};

pub mod metrics;

/// One rendered photograph: the JPEG a user would upload and which pixels are the product.
#[derive(Clone, Debug)]
pub struct Photo {
    pub name: &'static str,
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// Row-major, `true` for product.
    pub truth: Vec<bool>,
}

impl Photo {
    pub fn is_product(&self, x: u32, y: u32) -> bool {
        self.truth[(y as usize) * (self.width as usize) + x as usize]
    }
}

type Color = [f32; 3];

const GOLD_DARK: Color = [150.0, 104.0, 38.0];
const GOLD_LIGHT: Color = [246.0, 214.0, 140.0];
const SILVER_DARK: Color = [96.0, 99.0, 106.0];
const SILVER_LIGHT: Color = [244.0, 245.0, 248.0];
/// Kundan: flat glass over gold foil, a pale warm white.
const KUNDAN: Color = [252.0, 246.0, 226.0];
const RUBY: Color = [158.0, 18.0, 36.0];

fn mix(a: Color, b: Color, t: f32) -> Color {
    let t = t.clamp(0.0, 1.0);
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// A deterministic noise source (xorshift64*).
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        #[allow(clippy::cast_precision_loss)]
        let v = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
        v
    }

    /// Roughly Gaussian, mean 0, deviation `sigma` (a sum of three uniforms).
    fn grain(&mut self, sigma: f32) -> f32 {
        (self.unit() + self.unit() + self.unit() - 1.5) * 2.0 * sigma
    }
}

/// Metal shaded by the angle it faces (light from the upper left) and across its width.
fn metal(dark: Color, light: Color, angle: f32, across: f32) -> Color {
    let lit = 0.5 + 0.5 * (angle + 2.2).cos();
    mix(dark, light, lit * (1.0 - 0.5 * across.abs()) + 0.15)
}

/// A pearl at unit-disc offset (`u`, `v`): diffuse shading, a highlight, a rosy rim.
fn pearl(u: f32, v: f32) -> Color {
    let nz = (1.0 - u * u - v * v).max(0.0).sqrt();
    let (lx, ly, lz) = (-0.42, -0.52, 0.74);
    let diffuse = (u * lx + v * ly + nz * lz).max(0.0);
    let spec = (u * -0.24 + v * -0.3 + nz * 0.92).max(0.0).powi(40);
    let body = mix([176.0, 166.0, 160.0], [246.0, 241.0, 232.0], diffuse);
    let rim = mix(body, [226.0, 196.0, 196.0], (1.0 - nz) * 0.35);
    mix(rim, [255.0, 255.0, 255.0], spec)
}

/// A faceted stone at unit offset (`u`, `v`): wedge facets lit differently, pale or coloured.
fn faceted(u: f32, v: f32, dark: Color, light: Color) -> Color {
    let angle = v.atan2(u);
    let wedge = ((angle + std::f32::consts::PI) / (std::f32::consts::PI / 8.0)).floor();
    let ring = ((u * u + v * v).sqrt() * 3.0).floor();
    let lit = 0.5 + 0.5 * ((wedge * 1.7 + ring * 2.3).sin() * 0.8 + (wedge * 0.9).cos() * 0.2);
    mix(dark, light, lit)
}

/// What the scene has at a point: the product's colour there, or nothing (backdrop).
type Product = dyn Fn(f32, f32) -> Option<Color> + Sync;

/// Polar offset of (`x`, `y`) from a centre, with radii normalised by (`rx`, `ry`).
fn polar(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> (f32, f32) {
    let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
    ((dx * dx + dy * dy).sqrt(), dy.atan2(dx))
}

fn disc(x: f32, y: f32, cx: f32, cy: f32, r: f32) -> Option<(f32, f32)> {
    let (u, v) = ((x - cx) / r, (y - cy) / r);
    (u * u + v * v <= 1.0).then_some((u, v))
}

/// A gold jhumka-style earring: a stud set with a kundan stone, a crescent of gold set with a
/// row of kundan stones, and pearls hanging from its rim. Units are the image's short side.
fn kundan_earring(x: f32, y: f32) -> Option<Color> {
    let (cx, top) = (0.5, 0.26);
    // Pearls along the crescent's lower rim.
    for i in 0..9 {
        #[allow(clippy::cast_precision_loss)]
        let a = std::f32::consts::PI * (0.1 + 0.8 * i as f32 / 8.0);
        let (px, py) = (cx + 0.29 * a.cos(), top + 0.17 + 0.29 * a.sin());
        if let Some((u, v)) = disc(x, y, px, py, 0.032) {
            return Some(pearl(u, v));
        }
    }
    // The stud: a gold bezel with a kundan stone.
    if let Some((u, v)) = disc(x, y, cx, top - 0.1, 0.075) {
        let r = (u * u + v * v).sqrt();
        return Some(if r < 0.72 {
            mix(KUNDAN, [244.0, 236.0, 212.0], v * 0.5 + 0.5)
        } else {
            metal(GOLD_DARK, GOLD_LIGHT, v.atan2(u), (r - 0.86) / 0.14)
        });
    }
    // A link from the stud to the crescent.
    if (x - cx).abs() < 0.012 && (top - 0.03..top + 0.03).contains(&y) {
        return Some(mix(GOLD_DARK, GOLD_LIGHT, 0.6));
    }
    // The crescent: a half annulus below `top`, with kundan stones set along it.
    let (r, a) = polar(x, y, cx, top + 0.02, 0.25, 0.25);
    if (0.55..=1.0).contains(&r) && (0.0..=std::f32::consts::PI).contains(&a) {
        for i in 0..7 {
            #[allow(clippy::cast_precision_loss)]
            let sa = std::f32::consts::PI * (0.12 + 0.76 * i as f32 / 6.0);
            let (sx, sy) = (
                cx + 0.25 * 0.775 * sa.cos(),
                top + 0.02 + 0.25 * 0.775 * sa.sin(),
            );
            if let Some((u, v)) = disc(x, y, sx, sy, 0.034) {
                return Some(mix(KUNDAN, [244.0, 236.0, 212.0], (u + v) * 0.25 + 0.5));
            }
        }
        return Some(metal(GOLD_DARK, GOLD_LIGHT, a, (r - 0.775) / 0.225));
    }
    None
}

/// A U-shaped strand of pearls with a small gold pendant set with pale stones at the bottom:
/// the middle of the frame is empty.
fn pearl_necklace(x: f32, y: f32) -> Option<Color> {
    let (cx, cy, rx, ry) = (0.5, 0.22, 0.36, 0.48);
    // The pendant.
    if let Some((u, v)) = disc(x, y, cx, cy + ry + 0.07, 0.06) {
        let r = (u * u + v * v).sqrt();
        return Some(if r < 0.6 {
            faceted(
                u / 0.6,
                v / 0.6,
                [196.0, 200.0, 210.0],
                [255.0, 255.0, 255.0],
            )
        } else {
            metal(GOLD_DARK, GOLD_LIGHT, v.atan2(u), (r - 0.8) / 0.2)
        });
    }
    // Pearls along the lower half of an ellipse.
    let n = 31;
    for i in 0..n {
        #[allow(clippy::cast_precision_loss)]
        let a = std::f32::consts::PI * (i as f32 / (n - 1) as f32);
        let (px, py) = (cx + rx * a.cos(), cy + ry * a.sin());
        if let Some((u, v)) = disc(x, y, px, py, 0.024) {
            return Some(pearl(u, v));
        }
    }
    None
}

/// A polished silver band with a white faceted stone, on a grey sweep.
fn silver_ring(x: f32, y: f32) -> Option<Color> {
    let (cx, cy) = (0.5, 0.58);
    if let Some((u, v)) = disc(x, y, cx, cy - 0.19, 0.085) {
        return Some(faceted(u, v, [150.0, 156.0, 168.0], [255.0, 255.0, 255.0]));
    }
    let (r, a) = polar(x, y, cx, cy, 0.3, 0.13);
    let inner = 1.0 - 0.05 / 0.3;
    (inner..=1.0).contains(&r).then(|| {
        let across = (r - inner) / (1.0 - inner) * 2.0 - 1.0;
        let c = metal(SILVER_DARK, SILVER_LIGHT, a, across);
        if a < 0.0 { mix(c, SILVER_DARK, 0.2) } else { c }
    })
}

/// A gold filigree disc: open lattice holes in rings around a centre stone, and a bail.
fn filigree_pendant(x: f32, y: f32) -> Option<Color> {
    let (cx, cy, big) = (0.5, 0.55, 0.3);
    if (x - cx).abs() < 0.03 && (cy - big - 0.08..cy - big + 0.01).contains(&y) {
        return Some(metal(GOLD_DARK, GOLD_LIGHT, 1.0, (x - cx) / 0.03));
    }
    let (r, a) = polar(x, y, cx, cy, big, big);
    if r > 1.0 {
        return None;
    }
    if r < 0.16 {
        let (u, v) = ((x - cx) / (0.16 * big), (y - cy) / (0.16 * big));
        return Some(faceted(u, v, [90.0, 10.0, 30.0], [200.0, 40.0, 70.0]));
    }
    // Two rings of round holes, and a ring of petal slots.
    for (ring_r, count, hole_r) in [(0.38_f32, 10, 0.085), (0.7, 16, 0.075)] {
        for i in 0..count {
            #[allow(clippy::cast_precision_loss)]
            let ha =
                std::f32::consts::TAU * (i as f32 + 0.5 * (ring_r * 2.0).floor()) / count as f32;
            let (hx, hy) = (cx + big * ring_r * ha.cos(), cy + big * ring_r * ha.sin());
            if disc(x, y, hx, hy, big * hole_r).is_some() {
                return None;
            }
        }
    }
    Some(metal(GOLD_DARK, GOLD_LIGHT, a, (r * 14.0).sin()))
}

/// A plain gold hoop: a thin band around a large open middle.
fn gold_hoop(x: f32, y: f32) -> Option<Color> {
    let (r, a) = polar(x, y, 0.5, 0.52, 0.36, 0.36);
    let inner = 1.0 - 0.05 / 0.36;
    (inner..=1.0).contains(&r).then(|| {
        metal(
            GOLD_DARK,
            GOLD_LIGHT,
            a,
            (r - inner) / (1.0 - inner) * 2.0 - 1.0,
        )
    })
}

/// A nose ring: an open gold ring set with pale stones and rubies, a pearl drop.
fn nose_ring(x: f32, y: f32) -> Option<Color> {
    let (cx, cy, rr) = (0.5, 0.47, 0.27);
    if let Some((u, v)) = disc(x, y, cx, cy + rr + 0.07, 0.045) {
        return Some(pearl(u, v));
    }
    let (r, a) = polar(x, y, cx, cy, rr, rr);
    // Open at the top left.
    if (-2.3..-1.7).contains(&a) {
        return None;
    }
    for i in 0..9 {
        #[allow(clippy::cast_precision_loss)]
        let sa = -1.4 + 0.46 * i as f32;
        let (sx, sy) = (cx + rr * 0.92 * sa.cos(), cy + rr * 0.92 * sa.sin());
        if let Some((u, v)) = disc(x, y, sx, sy, 0.034) {
            return Some(if i % 2 == 0 {
                faceted(u, v, [214.0, 214.0, 220.0], [255.0, 255.0, 255.0])
            } else {
                faceted(u, v, RUBY, [226.0, 70.0, 90.0])
            });
        }
    }
    (0.84..=1.0)
        .contains(&r)
        .then(|| metal(GOLD_DARK, GOLD_LIGHT, a, (r - 0.92) / 0.08))
}

/// How each product is photographed: its name, drawing, the sweep's colour and the photo's
/// size. Its place in the list seeds its grain.
const SET: [(&str, &Product, Color, (u32, u32)); 6] = [
    ("kundan-earring", &kundan_earring, OFF_WHITE, (3024, 4032)),
    (
        "pearl-necklace",
        &pearl_necklace,
        [242.0, 241.0, 238.0],
        (3024, 4032),
    ),
    (
        "silver-ring-on-grey",
        &silver_ring,
        [201.0, 203.0, 206.0],
        (3024, 4032),
    ),
    (
        "filigree-pendant",
        &filigree_pendant,
        OFF_WHITE,
        (3024, 4032),
    ),
    ("gold-hoop", &gold_hoop, [228.0, 226.0, 222.0], (2268, 3024)),
    ("nose-ring", &nose_ring, OFF_WHITE, (2268, 3024)),
];

const OFF_WHITE: Color = [238.0, 235.0, 230.0];

/// The products of the set, by name.
pub const NAMES: [&str; 6] = [SET[0].0, SET[1].0, SET[2].0, SET[3].0, SET[4].0, SET[5].0];

/// The photograph `name` (one of `NAMES`), portrait at its phone resolution divided by
/// `downscale` (1 for the full size).
pub fn photo(name: &str, downscale: u32) -> Option<Photo> {
    let (index, &(name, product, backdrop, size)) =
        SET.iter().enumerate().find(|(_, s)| s.0 == name)?;
    let seed = index as u64 + 1;
    let (w, h) = (size.0 / downscale.max(1), size.1 / downscale.max(1));
    #[allow(clippy::cast_precision_loss)]
    let (fw, fh) = (w as f32, h as f32);
    let unit = fw.min(fh);
    // The product is drawn in a unit square centred in the frame.
    let (ox, oy) = ((fw - unit) / 2.0, (fh - unit) / 2.0);
    let at = |x: f32, y: f32| product((x - ox) / unit, (y - oy) / unit);

    // The cast shadow: the silhouette shifted down and right, blurred, at 1/400 of the
    // product's scale, read back bilinear.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let step = ((unit / 400.0) as u32).max(1);
    let (sw, sh) = (w.div_ceil(step), h.div_ceil(step));
    #[allow(clippy::cast_precision_loss)]
    let (shift_x, shift_y) = (0.012 * unit, 0.03 * unit);
    let mut shadow = vec![0f32; (sw * sh) as usize];
    for sy in 0..sh {
        for sx in 0..sw {
            #[allow(clippy::cast_precision_loss)]
            let (x, y) = ((sx * step) as f32 - shift_x, (sy * step) as f32 - shift_y);
            shadow[(sy * sw + sx) as usize] = f32::from(u8::from(at(x, y).is_some()));
        }
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let radius = (((0.02 * unit) as u32) / step).max(1) as usize;
    let shadow = box_blur(
        &box_blur(&shadow, sw as usize, sh as usize, radius),
        sw as usize,
        sh as usize,
        radius,
    );

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut truth = vec![false; (w as usize) * (h as usize)];
    let img = RgbImage::from_fn(w, h, |x, y| {
        #[allow(clippy::cast_precision_loss)]
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let c = if let Some(c) = at(fx, fy) {
            truth[(y as usize) * (w as usize) + x as usize] = true;
            c
        } else {
            // The sweep: lighter at the top, a soft vignette, the cast shadow.
            let (dx, dy) = (fx / fw - 0.5, fy / fh - 0.45);
            let fall = 1.0 - 0.05 * (fy / fh) - 0.07 * (dx * dx + dy * dy);
            let s = bilinear(
                &shadow,
                sw,
                sh,
                fx / step as f32 - 0.5,
                fy / step as f32 - 0.5,
            );
            let k = fall * (1.0 - 0.32 * s);
            backdrop.map(|v| v * k)
        };
        let g = rng.grain(2.5);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Rgb(c.map(|v| (v + g).round().clamp(0.0, 255.0) as u8))
    });
    let jpeg = crate::encode_jpeg(&img, 88).ok()?;
    Some(Photo {
        name,
        jpeg,
        width: w,
        height: h,
        truth,
    })
}

/// `map` (`w` x `h`) read between its samples.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn bilinear(map: &[f32], w: u32, h: u32, x: f32, y: f32) -> f32 {
    let (x, y) = (x.clamp(0.0, (w - 1) as f32), y.clamp(0.0, (h - 1) as f32));
    let (x0, y0) = (x as u32, y as u32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (tx, ty) = (x - x0 as f32, y - y0 as f32);
    let at = |x: u32, y: u32| map[(y * w + x) as usize];
    let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
    let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
    top * (1.0 - ty) + bottom * ty
}

/// A box blur of radius `r` (horizontal then vertical).
fn box_blur(src: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut tmp = vec![0f32; src.len()];
    let mut out = vec![0f32; src.len()];
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (x.saturating_sub(r), (x + r).min(w - 1));
            let sum: f32 = src[y * w + a..=y * w + b].iter().sum();
            #[allow(clippy::cast_precision_loss)]
            let n = (b - a + 1) as f32;
            tmp[y * w + x] = sum / n;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (y.saturating_sub(r), (y + r).min(h - 1));
            let sum: f32 = (a..=b).map(|yy| tmp[yy * w + x]).sum();
            #[allow(clippy::cast_precision_loss)]
            let n = (b - a + 1) as f32;
            out[y * w + x] = sum / n;
        }
    }
    out
}
