//! Judging an image by its pixels against the marketplace rules of NOTES.md: pure white
//! background, the product's share of the frame, size limits. The report lands in the manifest
//! beside each image.

use image::RgbImage;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Quality {
    pub width: u32,
    pub height: u32,
    /// The four corners are exactly RGB 255,255,255.
    pub corners_white: bool,
    /// Every pixel of a border band (1% of the short side) is exactly white.
    pub white_background: bool,
    /// The product's long side over the frame's long side (product = pixels below 250).
    pub fill: f32,
    /// Rules this image meets: `white_background`, `amazon_main`, `amazon_jewelry`, `etsy`,
    /// `google_merchant`, `shopify`, `zoom`.
    pub meets: Vec<&'static str>,
    pub warnings: Vec<String>,
}

/// The bounding box of non-white pixels, if any.
pub fn product_box(img: &RgbImage) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0.iter().any(|&c| c < 250) {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    (x1 > 0).then_some((x0, y0, x1, y1))
}

pub fn judge(img: &RgbImage, main: bool) -> Quality {
    let (w, h) = img.dimensions();
    let white = |x: u32, y: u32| img.get_pixel(x, y).0 == [255, 255, 255];
    let corners_white =
        w > 0 && h > 0 && white(0, 0) && white(w - 1, 0) && white(0, h - 1) && white(w - 1, h - 1);
    let band = (w.min(h) / 100).max(1);
    let white_background = corners_white
        && img.enumerate_pixels().all(|(x, y, p)| {
            let edge = x < band || y < band || x >= w - band || y >= h - band;
            !edge || p.0 == [255, 255, 255]
        });
    let long = w.max(h);
    #[allow(clippy::cast_precision_loss)]
    let fill = product_box(img).map_or(0.0, |(x0, y0, x1, y1)| {
        ((x1 - x0).max(y1 - y0)) as f32 / long as f32
    });
    let fill = (fill * 1000.0).round() / 1000.0;
    let mut meets = Vec::new();
    let mut warnings = Vec::new();
    if white_background {
        meets.push("white_background");
    }
    if main {
        if white_background && fill >= 0.85 && (1000..=10_000).contains(&long) {
            meets.push("amazon_main");
        }
        if white_background && fill >= 0.85 && (500..=2100).contains(&long) {
            meets.push("amazon_jewelry");
        }
        if !white_background {
            warnings.push(
                "background is not pure white: not usable as a marketplace main image".into(),
            );
        }
        if fill < 0.85 {
            warnings.push(format!(
                "product fills {:.0}% of the frame; marketplaces want 85% or more",
                fill * 100.0
            ));
        }
    }
    if w >= 2000 && h >= 2000 {
        meets.push("etsy");
    }
    if long >= 800 && u64::from(w) * u64::from(h) <= 64_000_000 {
        meets.push("google_merchant");
    }
    if long <= 5000 && w.min(h) >= 800 {
        meets.push("shopify");
    }
    if long >= 1600 {
        meets.push("zoom");
    }
    Quality {
        width: w,
        height: h,
        corners_white,
        white_background,
        fill,
        meets,
        warnings,
    }
}
