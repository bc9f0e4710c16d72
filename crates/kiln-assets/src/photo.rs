//! Catalog photography from an upload: estimate the background from the image border, cut the
//! product out with a soft-edged mask, trim it, and place it on pure white at a fixed share of
//! the frame. Everything is integer arithmetic or deterministic resampling: the same upload
//! always gives the same pixels.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{Rgb, RgbImage, Rgba, RgbaImage};

use crate::{AssetError, Decoded};

pub mod matte;
mod refine;

/// Read access to upload pixels, RGB or RGBA, so cut-outs work on the decoder's own buffer.
pub trait Pixels {
    fn dimensions(&self) -> (u32, u32);
    /// RGBA at (`x`, `y`); opaque for RGB sources.
    fn rgba(&self, x: u32, y: u32) -> [u8; 4];
    /// The pixels row by row, and how many channels each has (3: RGB, 4: RGBA).
    fn raw(&self) -> (&[u8], usize);
}

impl Pixels for RgbImage {
    fn dimensions(&self) -> (u32, u32) {
        RgbImage::dimensions(self)
    }

    #[inline]
    fn rgba(&self, x: u32, y: u32) -> [u8; 4] {
        let [r, g, b] = self.get_pixel(x, y).0;
        [r, g, b, 255]
    }

    fn raw(&self) -> (&[u8], usize) {
        (self.as_raw(), 3)
    }
}

impl Pixels for RgbaImage {
    fn dimensions(&self) -> (u32, u32) {
        RgbaImage::dimensions(self)
    }

    #[inline]
    fn rgba(&self, x: u32, y: u32) -> [u8; 4] {
        self.get_pixel(x, y).0
    }

    fn raw(&self) -> (&[u8], usize) {
        (self.as_raw(), 4)
    }
}

/// The master image's side and the share of it the product's long side fills.
pub const MASTER_SIDE: u32 = 2000;
pub const MASTER_FILL: f32 = 0.86;

/// What the border of the upload says about its background.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Background {
    pub color: [u8; 3],
    /// Mean absolute deviation of border pixels from `color`, in 0..=255 units.
    pub spread: f32,
}

impl Background {
    /// A plain studio background: even enough that the cut-out will be clean.
    pub fn is_uniform(&self) -> bool {
        self.spread < 6.0
    }

    pub fn is_light(&self) -> bool {
        let [r, g, b] = self.color.map(u32::from);
        (299 * r + 587 * g + 114 * b) / 1000 >= 150
    }
}

/// Samples a band around the border (at most ~40k pixels) and takes the per-channel median.
pub fn estimate_background(img: &impl Pixels) -> Background {
    let (w, h) = img.dimensions();
    let band = (w.min(h) / 50).max(2);
    let perimeter = 2 * u64::from(w + h) * u64::from(band);
    let step = usize::try_from(perimeter / 40_000 + 1).unwrap_or(1);
    let mut samples: Vec<[u8; 3]> = Vec::new();
    let mut i = 0usize;
    for y in 0..h {
        let edge_row = y < band || y + band >= h;
        let xs: Box<dyn Iterator<Item = u32>> = if edge_row {
            Box::new(0..w)
        } else {
            Box::new((0..band.min(w)).chain(w.saturating_sub(band)..w))
        };
        for x in xs {
            if i.is_multiple_of(step) {
                let p = img.rgba(x, y);
                samples.push([p[0], p[1], p[2]]);
            }
            i += 1;
        }
    }
    let median = |c: usize| {
        let mut v: Vec<u8> = samples.iter().map(|s| s[c]).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(255)
    };
    let color = [median(0), median(1), median(2)];
    let total: u64 = samples.iter().map(|s| u64::from(distance(*s, color))).sum();
    #[allow(clippy::cast_precision_loss)]
    let spread = if samples.is_empty() {
        0.0
    } else {
        total as f32 / samples.len() as f32
    };
    Background { color, spread }
}

/// Largest per-channel difference: cheap and insensitive to hue shifts of a grey backdrop.
fn distance(p: [u8; 3], q: [u8; 3]) -> u8 {
    (0..3).map(|c| p[c].abs_diff(q[c])).max().unwrap_or(0)
}

/// Pixel bounds of the product: `x0..x1`, `y0..y1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl Bounds {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }

    pub fn long_side(&self) -> u32 {
        self.width().max(self.height())
    }
}

/// The product cut out of its upload: RGBA with a soft alpha, trimmed to its bounds.
#[derive(Clone, Debug)]
pub struct Cutout {
    pub image: RgbaImage,
    pub background: Background,
    /// Which cut-out ran.
    pub method: Method,
    /// Where the product sat in the upload.
    pub bounds: Bounds,
    pub upload_size: (u32, u32),
}

impl Cutout {
    /// The product reaches the edge of the upload: it may have been cropped when photographed.
    pub fn touches_edge(&self) -> bool {
        let (w, h) = self.upload_size;
        self.bounds.x0 == 0 || self.bounds.y0 == 0 || self.bounds.x1 == w || self.bounds.y1 == h
    }
}

/// How the product was told from its backdrop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Colour distance from the backdrop alone.
    Colour,
    /// The learned mask (U²-Net-p) decides object or backdrop, colour finds holes and edges.
    LearnedAndColour,
}

/// The cut-out of a decoded upload, on its own pixel layout: guided by `model` when given.
/// With the model, the decision (object or backdrop) is taken on the upload shrunk to at most
/// `WORK_SIDE` pixels, and only the pixels along the edge are looked at again at full
/// resolution (`refine`): the learned mask is 320 pixels across, so the decision gains
/// nothing from twelve megapixels, and the edge is where they matter.
pub fn cut_out_decoded(
    img: &Decoded,
    model: Option<&crate::salient::Salient>,
) -> Result<Cutout, AssetError> {
    match (img, model) {
        (Decoded::Rgb(i), None) => cut_out(i, None),
        (Decoded::Rgba(i), None) => cut_out(i, None),
        (Decoded::Rgb(i), Some(m)) => cut_out_learned(i, m),
        (Decoded::Rgba(i), Some(m)) => cut_out_learned(i, m),
    }
}

/// The long side of the image the learned cut-out decides on.
pub const WORK_SIDE: u32 = 1024;

fn cut_out_learned(
    img: &impl Pixels,
    model: &crate::salient::Salient,
) -> Result<Cutout, AssetError> {
    let (w, h) = img.dimensions();
    let k = w.max(h).div_ceil(WORK_SIDE).max(1);
    let small = shrink(img, k);
    let saliency = model.predict_rgba(&small)?;
    let low = mask(&small, Some(&saliency), k > 1)?;
    if k == 1 {
        return trim(img, low, Method::LearnedAndColour);
    }
    let full = refine::refine(img, &small, &low, k);
    trim(img, full, Method::LearnedAndColour)
}

/// `img` shrunk by `k` in each direction, each pixel the mean of its `k`x`k` block (read a row
/// at a time from the decoder's buffer: a 12-megapixel upload is read once).
fn shrink(img: &impl Pixels, k: u32) -> RgbaImage {
    let (w, h) = img.dimensions();
    let (raw, channels) = img.raw();
    let (sw, sh) = (w.div_ceil(k), h.div_ceil(k));
    let (k, stride) = (k as usize, w as usize * channels);
    let mut sums = vec![[0u32; 4]; sw as usize];
    let mut out = RgbaImage::new(sw, sh);
    for (sy, rows) in raw[..stride * h as usize].chunks(stride * k).enumerate() {
        sums.iter_mut().for_each(|s| *s = [0; 4]);
        let n_rows = rows.len() / stride;
        for row in rows.chunks_exact(stride) {
            for (s, block) in sums.iter_mut().zip(row.chunks(k * channels)) {
                for p in block.chunks_exact(channels) {
                    s[0] += u32::from(p[0]);
                    s[1] += u32::from(p[1]);
                    s[2] += u32::from(p[2]);
                    s[3] += p.get(3).map_or(255, |&a| u32::from(a));
                }
            }
        }
        for (sx, s) in sums.iter().enumerate() {
            let n = u32::try_from(n_rows * k.min(w as usize - sx * k))
                .unwrap_or(1)
                .max(1);
            #[allow(clippy::cast_possible_truncation)]
            out.put_pixel(
                sx as u32,
                sy as u32,
                Rgba(s.map(|v| u8::try_from((v + n / 2) / n).unwrap_or(255))),
            );
        }
    }
    out
}

/// Cuts the product out. Colour alone: alpha ramps from 0 (background colour) to 255 over a
/// band of colour distance that widens with the background's own noise. With a learned
/// `saliency` mask (320x320, see `salient`), the mask decides object or backdrop and colour
/// only finds the true holes and the edges (`matte`).
pub fn cut_out(
    img: &impl Pixels,
    saliency: Option<&image::GrayImage>,
) -> Result<Cutout, AssetError> {
    let method = if saliency.is_some() {
        Method::LearnedAndColour
    } else {
        Method::Colour
    };
    let m = mask(img, saliency, false)?;
    trim(img, m, method)
}

/// Alpha (and, when matted, straight colour) over the part of an image the product is in.
#[derive(Debug)]
pub(crate) struct Masked {
    pub region: matte::Region,
    pub alpha: Vec<u8>,
    pub colour: Option<Vec<[u8; 3]>>,
    pub background: Background,
}

fn no_product() -> AssetError {
    AssetError::NoProduct(
        "no product found: the design matches its background or the image is blank".into(),
    )
}

/// A row or column belongs to the product only with a few solid pixels in it (specks and
/// grain do not count).
fn span(counts: &[u32], min: u32) -> Option<(u32, u32)> {
    let first = counts.iter().position(|&c| c >= min)?;
    let last = counts.iter().rposition(|&c| c >= min)?;
    Some((u32::try_from(first).ok()?, u32::try_from(last).ok()? + 1))
}

fn mask(
    img: &impl Pixels,
    saliency: Option<&image::GrayImage>,
    shrunk: bool,
) -> Result<Masked, AssetError> {
    let bg = estimate_background(img);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let t0 = (bg.spread * 3.0).clamp(10.0, 60.0) as u32;
    let t1 = t0 + 28;
    let (w, h) = img.dimensions();
    let luma = |x: u32, y: u32| {
        let p = img.rgba(x.min(w - 1), y.min(h - 1));
        (299 * i32::from(p[0]) + 587 * i32::from(p[1]) + 114 * i32::from(p[2])) / 1000
    };
    let alpha_at = |x: u32, y: u32| -> u8 {
        let p = img.rgba(x, y);
        let d = u32::from(distance([p[0], p[1], p[2]], bg.color));
        if d <= t0 {
            return 0;
        }
        // A cast shadow is the backdrop, darker: every channel scaled by about the same factor,
        // and smooth. Such pixels are dropped (the renders add their own shadow); metal and
        // stones are either tinted, brighter than the backdrop, or textured.
        if bg.is_light() {
            let ratios = [0, 1, 2].map(|c| f32::from(p[c]) / f32::from(bg.color[c].max(1)));
            let lo = ratios.iter().copied().fold(f32::MAX, f32::min);
            let hi = ratios.iter().copied().fold(0.0, f32::max);
            let mean = (ratios[0] + ratios[1] + ratios[2]) / 3.0;
            let gradient = (luma(x + 2, y) - luma(x.saturating_sub(2), y)).abs()
                + (luma(x, y + 2) - luma(x, y.saturating_sub(2))).abs();
            // Tolerances widen with the backdrop's own grain.
            #[allow(clippy::cast_possible_truncation)]
            let smooth = gradient < 10 + (bg.spread * 4.0) as i32;
            if hi - lo <= 0.05 + bg.spread / 64.0 && (0.5..0.985).contains(&mean) && smooth {
                return 0;
            }
        }
        let a = if d >= t1 {
            255
        } else {
            (d - t0) * 255 / (t1 - t0)
        };
        u8::try_from(a * u32::from(p[3]) / 255).unwrap_or(255)
    };
    let learned = saliency.map(|m| crate::salient::Upsampled::new(m, w, h));
    let object_at = |x: u32, y: u32| {
        alpha_at(x, y) >= 128 || learned.as_ref().is_some_and(|l| l.at(x, y) >= matte::SURE)
    };
    // Coarse pass on every 4th pixel: where is the product at all?
    const STEP: u32 = 4;
    let (cw, ch) = (w.div_ceil(STEP), h.div_ceil(STEP));
    let (mut rows, mut cols) = (vec![0u32; ch as usize], vec![0u32; cw as usize]);
    for cy in 0..ch {
        for cx in 0..cw {
            if object_at(cx * STEP, cy * STEP) {
                rows[cy as usize] += 1;
                cols[cx as usize] += 1;
            }
        }
    }
    let (Some((cx0, cx1)), Some((cy0, cy1))) = (
        span(&cols, (ch / 400).max(2)),
        span(&rows, (cw / 400).max(2)),
    ) else {
        return Err(no_product());
    };
    // Fine pass over that region plus a margin (wider with the learned mask, whose edge is
    // soft over a few of its 320 pixels), at full resolution.
    let margin = if learned.is_some() {
        3 * STEP + w.max(h) / 64
    } else {
        3 * STEP
    };
    let (rx0, ry0) = (
        (cx0 * STEP).saturating_sub(margin),
        (cy0 * STEP).saturating_sub(margin),
    );
    let (rx1, ry1) = ((cx1 * STEP + margin).min(w), (cy1 * STEP + margin).min(h));
    let (rw, rh) = (rx1 - rx0, ry1 - ry0);
    let mut alpha = vec![0u8; (rw as usize) * (rh as usize)];
    for y in 0..rh {
        for x in 0..rw {
            alpha[(y as usize) * (rw as usize) + x as usize] = alpha_at(rx0 + x, ry0 + y);
        }
    }
    despeckle(&mut alpha, rw, rh);
    let region = matte::Region {
        x0: rx0,
        y0: ry0,
        w: rw,
        h: rh,
    };
    let mut colour: Option<Vec<[u8; 3]>> = None;
    if let Some(l) = &learned {
        let m = matte::matte(img, &bg, l, region, &alpha, shrunk);
        alpha = m.alpha;
        colour = Some(m.colour);
    }
    Ok(Masked {
        region,
        alpha,
        colour,
        background: bg,
    })
}

/// The product trimmed to its bounds, as RGBA.
fn trim(img: &impl Pixels, m: Masked, method: Method) -> Result<Cutout, AssetError> {
    let (w, h) = img.dimensions();
    let matte::Region {
        x0: rx0,
        y0: ry0,
        w: rw,
        h: rh,
    } = m.region;
    let (alpha, colour) = (m.alpha, m.colour);
    let (mut rows, mut cols) = (vec![0u32; rh as usize], vec![0u32; rw as usize]);
    for (i, &a) in alpha.iter().enumerate() {
        if a >= 128 {
            rows[i / rw as usize] += 1;
            cols[i % rw as usize] += 1;
        }
    }
    let (Some((x0, x1)), Some((y0, y1))) =
        (span(&cols, (h / 400).max(2)), span(&rows, (w / 400).max(2)))
    else {
        return Err(no_product());
    };
    let bounds = Bounds {
        x0: x0 + rx0,
        y0: y0 + ry0,
        x1: x1 + rx0,
        y1: y1 + ry0,
    };
    if bounds.long_side() < 16 {
        return Err(AssetError::NoProduct(
            "the product is only a few pixels in size".into(),
        ));
    }
    let image = RgbaImage::from_fn(bounds.width(), bounds.height(), |x, y| {
        let (lx, ly) = (x + x0, y + y0);
        let i = (ly as usize) * (rw as usize) + lx as usize;
        let [r, g, b] = match &colour {
            Some(c) => c[i],
            None => {
                let p = img.rgba(lx + rx0, ly + ry0);
                [p[0], p[1], p[2]]
            }
        };
        Rgba([r, g, b, alpha[i]])
    });
    Ok(Cutout {
        image,
        background: m.background,
        method,
        bounds,
        upload_size: (w, h),
    })
}

/// Clears mask pixels with at most two set neighbours: grain and shadow edges, not product.
fn despeckle(alpha: &mut [u8], w: u32, h: u32) {
    let (w, h) = (w as usize, h as usize);
    let src = alpha.to_vec();
    for y in 0..h {
        for x in 0..w {
            if src[y * w + x] == 0 {
                continue;
            }
            let mut n = 0;
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    if (nx, ny) != (x, y) && src[ny * w + nx] > 0 {
                        n += 1;
                    }
                }
            }
            if n <= 2 {
                alpha[y * w + x] = 0;
            }
        }
    }
}

/// Lanczos3 resampling with alpha handled (premultiplied) so edges do not pick up the
/// background's colour.
pub fn resize_rgba(src: &RgbaImage, width: u32, height: u32) -> Result<RgbaImage, AssetError> {
    let mut dst = RgbaImage::new(width.max(1), height.max(1));
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(src, &mut dst, &opts)
        .map_err(|e| AssetError::Render(format!("resize: {e}")))?;
    Ok(dst)
}

pub fn resize_rgb(src: &RgbImage, width: u32, height: u32) -> Result<RgbImage, AssetError> {
    let mut dst = RgbImage::new(width.max(1), height.max(1));
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(src, &mut dst, &opts)
        .map_err(|e| AssetError::Render(format!("resize: {e}")))?;
    Ok(dst)
}

/// `src` over `dst` at (`left`, `top`), straight alpha, rounded.
pub fn composite(dst: &mut RgbImage, src: &RgbaImage, left: i64, top: i64) {
    for (x, y, p) in src.enumerate_pixels() {
        let (dx, dy) = (left + i64::from(x), top + i64::from(y));
        let (Ok(dx), Ok(dy)) = (u32::try_from(dx), u32::try_from(dy)) else {
            continue;
        };
        if dx >= dst.width() || dy >= dst.height() || p[3] == 0 {
            continue;
        }
        let a = u32::from(p[3]);
        let q = dst.get_pixel_mut(dx, dy);
        for c in 0..3 {
            let v = (u32::from(p[c]) * a + u32::from(q[c]) * (255 - a) + 127) / 255;
            q[c] = u8::try_from(v).unwrap_or(255);
        }
    }
}

/// The product resized and positioned in a `side`-pixel square.
#[derive(Clone, Debug)]
pub struct Placement {
    pub product: RgbaImage,
    pub left: i64,
    pub top: i64,
    pub bounds: Bounds,
}

/// Scales the product so its long side is `fill` of a `side`-pixel square and centres it;
/// `lift` moves it up by that share of the frame (to leave room for a shadow).
pub fn placement(cut: &Cutout, side: u32, fill: f32, lift: f32) -> Result<Placement, AssetError> {
    let (bw, bh) = (cut.image.width(), cut.image.height());
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let target = (side as f32 * fill).round() as u32;
    let long = bw.max(bh);
    let scale = |v: u32| (u64::from(v) * u64::from(target) / u64::from(long)).max(1);
    let (w, h) = (
        u32::try_from(scale(bw)).unwrap_or(target),
        u32::try_from(scale(bh)).unwrap_or(target),
    );
    let product = resize_rgba(&cut.image, w, h)?;
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let shift = (side as f32 * lift).round() as i64;
    let left = i64::from((side - w) / 2);
    let top = (i64::from((side - h) / 2) - shift).max(0);
    let y0 = u32::try_from(top).unwrap_or(0);
    let x0 = (side - w) / 2;
    Ok(Placement {
        product,
        left,
        top,
        bounds: Bounds {
            x0,
            y0,
            x1: x0 + w,
            y1: y0 + h,
        },
    })
}

/// The product placed (see `placement`) on pure white.
pub fn place_on_white(
    cut: &Cutout,
    side: u32,
    fill: f32,
    lift: f32,
) -> Result<(RgbImage, Bounds), AssetError> {
    let p = placement(cut, side, fill, lift)?;
    let mut canvas = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    composite(&mut canvas, &p.product, p.left, p.top);
    Ok((canvas, p.bounds))
}

/// The product on white over a soft contact shadow.
pub fn with_shadow(cut: &Cutout, side: u32) -> Result<RgbImage, AssetError> {
    let p = placement(cut, side, 0.80, 0.03)?;
    let mut canvas = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    contact_shadow(&mut canvas, p.bounds, 0.35);
    composite(&mut canvas, &p.product, p.left, p.top);
    Ok(canvas)
}

/// A soft elliptical contact shadow under `under`, darkening the canvas by at most `depth`.
pub fn contact_shadow(canvas: &mut RgbImage, under: Bounds, depth: f32) {
    #[allow(clippy::cast_precision_loss)]
    let (cx, cy) = ((under.x0 + under.x1) as f32 / 2.0, under.y1 as f32);
    #[allow(clippy::cast_precision_loss)]
    let (rx, ry) = (
        under.width() as f32 * 0.46,
        (under.height() as f32 * 0.07).max(6.0),
    );
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (x0, x1) = (
        (cx - rx * 1.6).max(0.0) as u32,
        ((cx + rx * 1.6) as u32).min(canvas.width()),
    );
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (y0, y1) = (
        (cy - ry * 2.0).max(0.0) as u32,
        ((cy + ry * 2.5) as u32).min(canvas.height()),
    );
    for y in y0..y1 {
        for x in x0..x1 {
            #[allow(clippy::cast_precision_loss)]
            let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
            let k = (-(dx * dx + dy * dy) * 1.6).exp() * depth;
            let p = canvas.get_pixel_mut(x, y);
            for c in 0..3 {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let v = (f32::from(p[c]) * (1.0 - k)).round() as u8;
                p[c] = v;
            }
        }
    }
}

/// Where the detail crop sits on the trimmed product, and how much of it is product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetailSquare {
    /// Top-left corner in the trimmed cut-out's pixels (may be negative: the square can
    /// reach past the product's bounds, where it is white).
    pub left: i64,
    pub top: i64,
    pub side: u32,
    /// Share of the square the product covers (alpha-weighted), 0..1.
    pub coverage: f64,
}

/// A close-up is refused when it is more than this share background.
pub const DETAIL_MAX_BACKGROUND: f64 = 0.90;

/// Picks the detail crop's square (45% of the product's long side): where the product has
/// the most detail — its edges and facets, alpha-weighted — among the squares at least 10%
/// product. A U-shaped necklace's empty middle never wins; a ring's stone does.
pub fn detail_square(cut: &Cutout) -> DetailSquare {
    let (bw, bh) = (cut.image.width(), cut.image.height());
    let long = bw.max(bh).max(1);
    let s = (long * 45 / 100).max(1);
    // Scores on a grid of at most ~200 cells a side.
    let f = (long / 200).max(1);
    let (gw, gh) = (bw.div_ceil(f) as usize, bh.div_ceil(f) as usize);
    let (mut cover, mut detail) = (vec![0f64; gw * gh], vec![0f64; gw * gh]);
    let luma = |x: u32, y: u32| {
        let p = cut.image.get_pixel(x.min(bw - 1), y.min(bh - 1));
        (299 * i32::from(p[0]) + 587 * i32::from(p[1]) + 114 * i32::from(p[2])) / 1000
    };
    for gy in 0..gh {
        for gx in 0..gw {
            #[allow(clippy::cast_possible_truncation)]
            let (x, y) = (gx as u32 * f, gy as u32 * f);
            let a = f64::from(cut.image.get_pixel(x.min(bw - 1), y.min(bh - 1))[3]) / 255.0;
            let g = (luma(x + f, y) - luma(x.saturating_sub(f), y)).abs()
                + (luma(x, y + f) - luma(x, y.saturating_sub(f))).abs();
            cover[gy * gw + gx] = a;
            detail[gy * gw + gx] = a * f64::from(g);
        }
    }
    let sums = |v: &[f64]| {
        let mut t = vec![0f64; (gw + 1) * (gh + 1)];
        for y in 0..gh {
            let mut row = 0.0;
            for x in 0..gw {
                row += v[y * gw + x];
                t[(y + 1) * (gw + 1) + x + 1] = t[y * (gw + 1) + x + 1] + row;
            }
        }
        t
    };
    let (tc, td) = (sums(&cover), sums(&detail));
    let boxed = |t: &[f64], x0: i64, y0: i64, n: i64| {
        let clamp = |v: i64, hi: usize| {
            usize::try_from(v.clamp(0, i64::try_from(hi).unwrap_or(0))).unwrap_or(0)
        };
        let (x0c, x1c) = (clamp(x0, gw), clamp(x0 + n, gw));
        let (y0c, y1c) = (clamp(y0, gh), clamp(y0 + n, gh));
        let at = |x: usize, y: usize| t[y * (gw + 1) + x];
        at(x1c, y1c) + at(x0c, y0c) - at(x1c, y0c) - at(x0c, y1c)
    };
    let n = i64::from(s.div_ceil(f).max(1));
    let cells = (n * n) as f64;
    let (gw_i, gh_i) = (
        i64::try_from(gw).unwrap_or(0),
        i64::try_from(gh).unwrap_or(0),
    );
    let mut best: Option<(f64, i64, i64, f64)> = None;
    let mut densest: Option<(f64, i64, i64)> = None;
    // Squares whose centre lies on the product's bounds; top rows first, so on a tie the
    // crop goes to the top (where a ring's stone or a pendant's setting sits).
    for y in (-n / 2)..=(gh_i - n / 2).max(-n / 2) {
        for x in (-n / 2)..=(gw_i - n / 2).max(-n / 2) {
            let c = boxed(&tc, x, y, n) / cells;
            if densest.is_none_or(|(d, _, _)| c > d) {
                densest = Some((c, x, y));
            }
            if c < 1.0 - DETAIL_MAX_BACKGROUND {
                continue;
            }
            let score = boxed(&td, x, y, n) + 4.0 * boxed(&tc, x, y, n);
            if best.is_none_or(|(b, _, _, _)| score > b) {
                best = Some((score, x, y, c));
            }
        }
    }
    let (mut x, mut y, coverage) = match (best, densest) {
        (Some((_, x, y, c)), _) => (x, y, c),
        (None, Some((c, x, y))) => (x, y, c),
        (None, None) => (0, 0, 0.0),
    };
    // Centred on the detail it holds (the best square may hold its detail off to one side).
    let (mut wx, mut wy, mut wsum) = (0.0, 0.0, 0.0);
    for gy in y.max(0)..(y + n).min(gh_i) {
        for gx in x.max(0)..(x + n).min(gw_i) {
            let v =
                detail[usize::try_from(gy).unwrap_or(0) * gw + usize::try_from(gx).unwrap_or(0)];
            #[allow(clippy::cast_precision_loss)]
            {
                wx += v * gx as f64;
                wy += v * gy as f64;
            }
            wsum += v;
        }
    }
    if wsum > 0.0 {
        #[allow(clippy::cast_possible_truncation)]
        {
            x = (wx / wsum).round() as i64 - n / 2;
            y = (wy / wsum).round() as i64 - n / 2;
        }
    }
    // A margin of 12% of the square on each side, so the detail is framed, not cut at the
    // edge (a ring's stone sits at the product's very top).
    let margin = i64::from(s * 12 / 100);
    DetailSquare {
        left: x * i64::from(f) - margin,
        top: y * i64::from(f) - margin,
        side: s + 2 * u32::try_from(margin).unwrap_or(0),
        coverage,
    }
}

/// A square close-up of the product's most detailed part (`detail_square`), on white,
/// `side` pixels.
pub fn detail_crop(cut: &Cutout, side: u32) -> Result<RgbImage, AssetError> {
    let d = detail_square(cut);
    let mut square = RgbImage::from_pixel(d.side, d.side, Rgb([255, 255, 255]));
    composite(&mut square, &cut.image, -d.left, -d.top);
    resize_rgb(&square, side, side)
}
