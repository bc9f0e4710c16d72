//! Kit generation: from an upload, its product spec and the kit ordered, every asset of
//! DESIGN.md §4 as bytes plus metadata, deterministically (the same input gives the same
//! bytes, so a retried job overwrites identical keys).
//!
//! `decode` reads uploads safely, `photo` makes catalog photography, `quality` judges images by
//! their pixels against marketplace rules, `copy` writes SEO copy, `kit` assembles a kit and
//! its manifest, `sample` renders the bundled sample design.

pub mod asset;
pub mod caratzon;
pub mod copy;
pub mod decode;
pub mod generator;
pub mod kit;
pub mod pdf;
pub mod photo;
pub mod photoset;
pub mod provider;
pub mod quality;
pub mod salient;
pub mod sample;
pub mod scene;

pub use asset::{Asset, CutoutNote, Role};
pub use decode::{Decoded, Limits, Probe, decode, probe};
pub use generator::{Generator, KitError, Progress};
pub use kit::{Manifest, ManifestEntry, Step, generate};
pub use quality::Quality;

/// Why an asset could not be made. All of these are permanent for the same input: retrying
/// will not help, so the job fails and its credits are released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssetError {
    #[error("upload too large: {0}")]
    TooLarge(String),
    #[error("upload too small: {0}")]
    TooSmall(String),
    #[error("unsupported file: {0}")]
    Unsupported(String),
    #[error("unreadable image: {0}")]
    Corrupt(String),
    #[error("{0}")]
    NoProduct(String),
    #[error(transparent)]
    Spec(#[from] kiln_core::SpecError),
    #[error("rendering failed: {0}")]
    Render(String),
    /// The learned cut-out model is missing, corrupt or failed to run.
    #[error("{0}")]
    Model(String),
}

impl AssetError {
    /// A stable code for clients (the API maps these to 413, 415 and 422).
    pub fn code(&self) -> &'static str {
        match self {
            AssetError::TooLarge(_) => "upload_too_large",
            AssetError::TooSmall(_) => "upload_too_small",
            AssetError::Unsupported(_) => "unsupported_media_type",
            AssetError::Corrupt(_) => "undecodable_image",
            AssetError::NoProduct(_) => "no_product_found",
            AssetError::Spec(_) => "invalid_spec",
            AssetError::Render(_) => "render_failed",
            AssetError::Model(_) => "cutout_model_failed",
        }
    }
}

/// A SHA-256 as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Encodes an RGB image as a baseline sRGB JPEG (4:2:0) with jpeg-encoder, which is faster than
/// image's encoder (encoding is the largest cost after decoding). Its scalar path only, so every
/// machine writes the same bytes.
pub fn encode_jpeg(img: &image::RgbImage, quality: u8) -> Result<Vec<u8>, AssetError> {
    let (w, h) = (
        u16::try_from(img.width())
            .map_err(|_| AssetError::Render("image too wide for JPEG".into()))?,
        u16::try_from(img.height())
            .map_err(|_| AssetError::Render("image too tall for JPEG".into()))?,
    );
    let mut out = Vec::with_capacity(img.as_raw().len() / 8);
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    encoder
        .encode(img.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| AssetError::Render(format!("JPEG encoding: {e}")))?;
    Ok(out)
}
