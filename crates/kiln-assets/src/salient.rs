//! The learned salient-object mask: U²-Net-p (`models/u2netp.onnx`, see `models/PROVENANCE.md`)
//! run in pure Rust by tract. It says where the product is at 320x320 — coarse, but it keeps
//! pale stones, pearls and polished silver that colour alone reads as backdrop. The cut-out
//! (`photo::cut_out`) combines it with colour at full resolution.
//!
//! The model is loaded and checked once per process (`Salient::load`), before any kit runs: a
//! missing or corrupt file is an error at start-up naming its path, never a failed paid kit.

use std::path::Path;
use std::sync::Arc;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage, RgbaImage};
use sha2::Digest;
use tract_onnx::prelude::*;

use crate::AssetError;

mod conv;
mod upsample;

/// The model the kits of this process use, installed at start-up (`install`).
static ACTIVE: std::sync::OnceLock<Salient> = std::sync::OnceLock::new();

/// Makes `model` the one every kit of this process uses; `false` if one was installed already.
pub fn install(model: Salient) -> bool {
    ACTIVE.set(model).is_ok()
}

/// The installed model, else the embedded one.
pub fn active() -> Result<Salient, AssetError> {
    match ACTIVE.get() {
        Some(m) => Ok(m.clone()),
        None => Salient::embedded(),
    }
}

/// How many recent masks a process keeps (100 KB each).
const RECENT_MASKS: usize = 16;
type Recent = std::collections::VecDeque<([u8; 32], GrayImage)>;
static RECENT: std::sync::Mutex<Recent> = std::sync::Mutex::new(std::collections::VecDeque::new());

/// Forgets the masks kept so far: benchmarks time the model, not the memory.
pub fn forget_recent() {
    if let Ok(mut recent) = RECENT.lock() {
        recent.clear();
    }
}

/// The model's input side.
pub const SIDE: u32 = 320;

/// The model kiln ships, embedded in the binary.
static EMBEDDED: &[u8] = include_bytes!("../models/u2netp.onnx");
/// Its sha256 (models/PROVENANCE.md).
pub const EMBEDDED_SHA256: &str =
    "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8";

/// ImageNet's channel means and deviations, as U²-Net was trained.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A loaded, optimised U²-Net-p, cheap to clone and safe to share between kits.
#[derive(Clone)]
pub struct Salient {
    plan: Arc<TypedSimplePlan>,
    convolutions: Convolutions,
    /// Where the model came from ("embedded u2netp" or a path) and its sha256: the manifest
    /// names it.
    pub source: String,
    pub sha256: String,
}

impl std::fmt::Debug for Salient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Salient")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl Salient {
    /// The embedded model, loaded once per process.
    pub fn embedded() -> Result<Salient, AssetError> {
        static LOADED: std::sync::OnceLock<Result<Salient, String>> = std::sync::OnceLock::new();
        LOADED
            .get_or_init(|| {
                Salient::from_bytes(EMBEDDED, "embedded u2netp", Convolutions::Direct)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(AssetError::Model)
    }

    /// The embedded model with its convolutions run as `convolutions` says, loaded afresh: to
    /// compare the two.
    pub fn embedded_with(convolutions: Convolutions) -> Result<Salient, AssetError> {
        Salient::from_bytes(EMBEDDED, "embedded u2netp", convolutions)
    }

    /// The model at `path` (an operator's own copy): read, parsed, optimised and run once on a
    /// blank frame, so a missing, truncated or wrong file is reported here, with its path.
    pub fn load(path: &Path) -> Result<Salient, AssetError> {
        let bytes = std::fs::read(path)
            .map_err(|e| AssetError::Model(format!("cut-out model {}: {e}", path.display())))?;
        Salient::from_bytes(&bytes, &path.display().to_string(), Convolutions::Direct)
            .map_err(|e| AssetError::Model(format!("cut-out model {}: {e}", path.display())))
    }

    fn from_bytes(
        bytes: &[u8],
        source: &str,
        convolutions: Convolutions,
    ) -> Result<Salient, AssetError> {
        let plan = plan_with(bytes, SIDE as usize, convolutions)
            .map_err(|e| AssetError::Model(format!("not a usable U²-Net model: {e:#}")))?;
        let s = Salient {
            plan,
            convolutions,
            source: source.to_owned(),
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
        };
        // One run on a blank frame: a model with the wrong output shape fails here.
        s.run(&RgbImage::from_pixel(
            SIDE,
            SIDE,
            image::Rgb([200, 200, 200]),
        ))?;
        Ok(s)
    }

    /// The saliency of an RGBA image at 320x320, 0 (backdrop) to 255 (object), min-max
    /// normalised and read on its colour channels alone, as rembg does.
    pub fn predict_rgba(&self, img: &RgbaImage) -> Result<GrayImage, AssetError> {
        let rgb = RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let [r, g, b, _] = img.get_pixel(x, y).0;
            image::Rgb([r, g, b])
        });
        self.predict_small(&resize_to_side(&rgb)?)
    }

    fn predict_small(&self, small: &RgbImage) -> Result<GrayImage, AssetError> {
        // The same input gives the same mask: a retried attempt, or another kit of the same
        // upload, reuses it (keyed by the model's exact input, the model's sha256 and how its
        // convolutions run).
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.sha256.as_bytes());
        hasher.update([u8::from(self.convolutions == Convolutions::Direct)]);
        hasher.update(small.as_raw());
        let key: [u8; 32] = hasher.finalize().into();
        if let Some(hit) = RECENT
            .lock()
            .ok()
            .and_then(|r| r.iter().find(|(k, _)| *k == key).map(|(_, m)| m.clone()))
        {
            return Ok(hit);
        }
        let mask = self.run(small)?;
        if let Ok(mut recent) = RECENT.lock() {
            if recent.len() >= RECENT_MASKS {
                recent.pop_front();
            }
            recent.push_back((key, mask.clone()));
        }
        Ok(mask)
    }

    fn run(&self, small: &RgbImage) -> Result<GrayImage, AssetError> {
        let n = (SIDE * SIDE) as usize;
        let max = f32::from(small.as_raw().iter().copied().max().unwrap_or(1).max(1));
        let mut input = vec![0f32; 3 * n];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                input[c * n + i] = (f32::from(p[c]) / max - MEAN[c]) / STD[c];
            }
        }
        let failed = |e: TractError| AssetError::Model(format!("cut-out model run: {e:#}"));
        let tensor =
            Tensor::from_shape(&[1, 3, SIDE as usize, SIDE as usize], &input).map_err(failed)?;
        let out = self.plan.run(tvec!(tensor.into())).map_err(failed)?;
        let first = out
            .first()
            .ok_or_else(|| AssetError::Model("cut-out model gave no output".into()))?;
        let view = first.to_plain_array_view::<f32>().map_err(failed)?;
        if view.len() != n {
            return Err(AssetError::Model(format!(
                "cut-out model gave {} values, expected {n}",
                view.len()
            )));
        }
        let (lo, hi) = view
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let range = (hi - lo).max(1e-6);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let pixels: Vec<u8> = view
            .iter()
            .map(|&v| (((v - lo) / range) * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        GrayImage::from_raw(SIDE, SIDE, pixels)
            .ok_or_else(|| AssetError::Model("cut-out model output".into()))
    }
}

/// How the model's convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convolutions {
    /// `conv::Conv3x3`, directly in SIMD registers (where the machine has AVX2 or AVX-512).
    Direct,
    /// tract's own: im2col and a matrix product.
    Tract,
}

/// U²-Net-p from `bytes`, optimised for a `side` x `side` input, with `upsample::Upsample` in
/// place of its bilinear `Resize`s and `conv::Conv3x3` in place of its convolutions.
pub fn plan(bytes: &[u8], side: usize) -> TractResult<Arc<TypedSimplePlan>> {
    plan_with(bytes, side, Convolutions::Direct)
}

/// `plan`, with the convolutions run as `convolutions` says.
pub fn plan_with(
    bytes: &[u8],
    side: usize,
    convolutions: Convolutions,
) -> TractResult<Arc<TypedSimplePlan>> {
    // Where tract's convolution stays: its direct spatial convolution is slower here than
    // im2col and a matrix product (the model: 1.6 s against 2.1 s on one core, measured with
    // the knob on and off).
    let scope =
        tract_onnx::tract_core::knobs::KnobScope::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")])?;
    scope.enter(|| {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])?
            .with_input_fact(0, f32::fact([1, 3, side, side]).into())?
            .into_typed()?
            .into_decluttered()?;
        upsample::swap_in(&mut model)?;
        if convolutions == Convolutions::Direct {
            conv::swap_in(&mut model)?;
        }
        model.into_optimized()?.into_runnable()
    })
}

/// `img` squeezed to 320x320 (aspect not kept, as the model was trained).
fn resize_to_side(img: &RgbImage) -> Result<RgbImage, AssetError> {
    let mut dst = RgbImage::new(SIDE, SIDE);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(img, &mut dst, &opts)
        .map_err(|e| AssetError::Render(format!("resize: {e}")))?;
    Ok(dst)
}

/// The 320x320 mask read at full resolution, bilinear: `at(x, y)` for a `w`x`h` image.
#[derive(Debug)]
pub struct Upsampled<'a> {
    mask: &'a GrayImage,
    sx: f32,
    sy: f32,
}

impl<'a> Upsampled<'a> {
    pub fn new(mask: &'a GrayImage, w: u32, h: u32) -> Upsampled<'a> {
        #[allow(clippy::cast_precision_loss)]
        let (sx, sy) = (
            mask.width() as f32 / w.max(1) as f32,
            mask.height() as f32 / h.max(1) as f32,
        );
        Upsampled { mask, sx, sy }
    }

    #[inline]
    pub fn at(&self, x: u32, y: u32) -> u8 {
        #[allow(clippy::cast_precision_loss)]
        let (fx, fy) = (
            ((x as f32 + 0.5) * self.sx - 0.5).max(0.0),
            ((y as f32 + 0.5) * self.sy - 0.5).max(0.0),
        );
        let (mw, mh) = (self.mask.width() - 1, self.mask.height() - 1);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let (x0, y0) = ((fx as u32).min(mw), (fy as u32).min(mh));
        let (x1, y1) = ((x0 + 1).min(mw), (y0 + 1).min(mh));
        #[allow(clippy::cast_precision_loss)]
        let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
        let p = |x, y| f32::from(self.mask.get_pixel(x, y)[0]);
        let top = p(x0, y0) * (1.0 - tx) + p(x1, y0) * tx;
        let bottom = p(x0, y1) * (1.0 - tx) + p(x1, y1) * tx;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let v = (top * (1.0 - ty) + bottom * ty).round() as u8;
        v
    }
}
