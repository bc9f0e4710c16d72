//! Reading an upload safely: the format is sniffed from the bytes, the header's dimensions are
//! checked against the limits before anything is decoded, and the decoder itself runs under an
//! allocation cap, so truncated, corrupt or bomb-like files end as typed errors, never a panic,
//! a hang or an out-of-memory kill.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage, RgbaImage};

use crate::AssetError;

/// What an upload may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_side: u32,
    pub max_pixels: u64,
    pub min_side: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 40 * 1024 * 1024,
            max_side: 12_000,
            max_pixels: 64_000_000,
            min_side: 300,
        }
    }
}

/// A sniffed, size-checked upload, not yet decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl Probe {
    pub fn extension(&self) -> &'static str {
        match self.format {
            ImageFormat::Png => "png",
            ImageFormat::WebP => "webp",
            _ => "jpg",
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self.format {
            ImageFormat::Png => "image/png",
            ImageFormat::WebP => "image/webp",
            _ => "image/jpeg",
        }
    }
}

/// The cheap checks: size in bytes, format from the magic bytes, dimensions from the header.
pub fn probe(bytes: &[u8], limits: &Limits) -> Result<Probe, AssetError> {
    if bytes.len() > limits.max_bytes {
        return Err(AssetError::TooLarge(format!(
            "{} bytes; the limit is {}",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| AssetError::Unsupported("not a JPEG, PNG or WebP image".into()))?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    ) {
        return Err(AssetError::Unsupported(format!(
            "{format:?} images are not accepted; use JPEG, PNG or WebP"
        )));
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| AssetError::Corrupt(format!("cannot read the image header: {e}")))?;
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(AssetError::TooLarge(format!(
            "{width}x{height} pixels; the limit is {} px a side and {} megapixels",
            limits.max_side,
            limits.max_pixels / 1_000_000
        )));
    }
    if width.min(height) < limits.min_side {
        return Err(AssetError::TooSmall(format!(
            "{width}x{height} pixels; catalog images need at least {} px on the short side",
            limits.min_side
        )));
    }
    Ok(Probe {
        format,
        width,
        height,
    })
}

/// A JPEG cut short still decodes (the decoder pads the missing rows with grey), so check the
/// structure: after the last start-of-scan marker there must be an end-of-image marker. Inside
/// scan data 0xFF is always stuffed, so neither marker can appear there by accident.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), AssetError> {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let eoi_after = last_sos.is_some_and(|sos| bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9]));
    if eoi_after {
        Ok(())
    } else {
        Err(AssetError::Corrupt(
            "the JPEG is truncated (no end-of-image marker)".into(),
        ))
    }
}

/// Decoded upload pixels: RGB when the file has no alpha channel (every JPEG), so a 16-megapixel
/// photo is not widened to RGBA (a 64 MB copy) before it is cut out.
#[derive(Clone, Debug)]
pub enum Decoded {
    Rgb(RgbImage),
    Rgba(RgbaImage),
}

impl Decoded {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Self::Rgb(i) => i.dimensions(),
            Self::Rgba(i) => i.dimensions(),
        }
    }

    pub fn to_rgba(&self) -> RgbaImage {
        match self {
            Self::Rgb(i) => DynamicImage::ImageRgb8(i.clone()).into_rgba8(),
            Self::Rgba(i) => i.clone(),
        }
    }
}

/// Probes, then decodes under an allocation cap derived from the checked dimensions.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<(Probe, Decoded), AssetError> {
    let p = probe(bytes, limits)?;
    if p.format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), p.format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    // Room for the decoded image plus the decoder's own buffers, no more.
    l.max_alloc = Some(u64::from(p.width) * u64::from(p.height) * 8 + 64 * 1024 * 1024);
    reader.limits(l);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => AssetError::TooLarge(e.to_string()),
        image::ImageError::Unsupported(e) => AssetError::Unsupported(e.to_string()),
        other => AssetError::Corrupt(format!(
            "the image could not be decoded (truncated or corrupt?): {other}"
        )),
    })?;
    if (img.width(), img.height()) != (p.width, p.height) {
        return Err(AssetError::Corrupt(
            "decoded size differs from the header".into(),
        ));
    }
    let pixels = match img {
        DynamicImage::ImageRgb8(i) => Decoded::Rgb(i),
        DynamicImage::ImageRgba8(i) => Decoded::Rgba(i),
        other if other.color().has_alpha() => Decoded::Rgba(other.into_rgba8()),
        other => Decoded::Rgb(other.into_rgb8()),
    };
    Ok((p, pixels))
}
