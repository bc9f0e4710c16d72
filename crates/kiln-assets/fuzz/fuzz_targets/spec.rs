//! Any bytes as a product spec; whatever parses is written up as copy and laid out as a line
//! sheet (wrapping, fitting and shaping arbitrary text must not panic or loop).
#![no_main]

use std::sync::OnceLock;

use kiln_assets::{copy, encode_jpeg, pdf};
use kiln_core::ProductSpec;
use libfuzzer_sys::fuzz_target;

fn photo() -> &'static [u8] {
    static JPEG: OnceLock<Vec<u8>> = OnceLock::new();
    JPEG.get_or_init(|| {
        let white = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
        encode_jpeg(&white, 80).expect("encode a 32x32 JPEG")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = ProductSpec::from_json(data) else {
        return;
    };
    let c = copy::write(&spec);
    assert!(c.meta_description.chars().count() <= 160, "meta description too long");
    let _ = c.markdown();
    assert!(copy::alt_text(&spec, "front view").chars().count() <= 125, "alt text too long");
    pdf::line_sheet(&spec, photo(), photo(), photo()).expect("a parsed spec makes a line sheet");
});
