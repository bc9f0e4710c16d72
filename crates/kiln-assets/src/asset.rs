//! One generated file and what it is for: the piece the kit assembly (`kit`) and the Caratzon
//! extras (`caratzon`) both make, so neither needs the other's types.

use image::RgbImage;
use serde::Serialize;

use crate::{AssetError, Quality, encode_jpeg, quality};

/// What an asset is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    MainImage,
    ShadowImage,
    /// The product alone on transparency (RGBA PNG), trimmed: what a designer composites with.
    CutoutImage,
    DetailImage,
    WebImage,
    SpecSheet,
    LineSheet,
    SeoCopy,
    LifestyleImage,
    EditorialImage,
    SocialImage,
    Lookbook,
}

/// One generated file: its path inside the kit, bytes and metadata.
#[derive(Clone, Debug)]
pub struct Asset {
    pub path: String,
    pub role: Role,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub alt: Option<String>,
    pub quality: Option<Quality>,
    /// For the cut-out: which cut-out made it.
    pub cutout: Option<CutoutNote>,
}

/// Which cut-out ran, as the manifest says it: the method and, when the learned mask guided
/// it, the model's source and sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CutoutNote {
    pub method: crate::photo::Method,
    pub model: Option<String>,
    pub model_sha256: Option<String>,
}

impl Asset {
    /// A file that is not an image (PDF, JSON, Markdown).
    pub fn file(path: &str, role: Role, content_type: &'static str, bytes: Vec<u8>) -> Asset {
        Asset {
            path: path.to_owned(),
            role,
            content_type,
            bytes,
            width: None,
            height: None,
            alt: None,
            quality: None,
            cutout: None,
        }
    }
}

pub(crate) fn image_asset(
    path: &str,
    role: Role,
    img: &RgbImage,
    q: u8,
    alt: String,
    main: bool,
) -> Result<Asset, AssetError> {
    Ok(Asset {
        path: path.to_owned(),
        role,
        content_type: "image/jpeg",
        bytes: encode_jpeg(img, q)?,
        width: Some(img.width()),
        height: Some(img.height()),
        alt: Some(alt),
        quality: Some(quality::judge(img, main)),
        cutout: None,
    })
}

/// `photos/cutout.png`: the cut-out as an RGBA PNG ([`cutout_png`]).
pub(crate) fn cutout_asset(
    img: &image::RgbaImage,
    alt: String,
    note: CutoutNote,
) -> Result<Asset, AssetError> {
    let bytes = cutout_png(img)?;
    Ok(Asset {
        path: "photos/cutout.png".to_owned(),
        role: Role::CutoutImage,
        content_type: "image/png",
        bytes,
        width: Some(img.width()),
        height: Some(img.height()),
        alt: Some(alt),
        quality: None,
        cutout: Some(note),
    })
}

/// A cut-out's PNG bytes, with fast compression: a phone photo's cut-out is megapixels of
/// alpha. (The cut-out bench times this, as a kit runs it.)
pub fn cutout_png(img: &image::RgbaImage) -> Result<Vec<u8>, AssetError> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut bytes,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgba8,
    )
    .map_err(|e| AssetError::Render(format!("PNG: {e}")))?;
    Ok(bytes)
}
