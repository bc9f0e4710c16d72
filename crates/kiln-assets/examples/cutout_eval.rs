//! The cut-out on the test set (`kiln_assets::photoset`): `cutout_eval OUT_DIR [downscale]
//! [runs]` writes each photo (`NAME.jpg`) and its truth (`NAME-truth.png`) for other tools to be
//! scored on the same pixels (scripts/bench.sh runs rembg on them), then prints, per photo and
//! per cut-out (colour alone, learned + colour): IoU, the share of the product lost to
//! transparency, edge fringe and the median time of `runs` runs (decode, cut out, encode the
//! RGBA PNG: what a kit's `photos/cutout.png` costs), single-threaded. It also writes each cut-out over a
//! dark velvet green (`NAME-METHOD-velvet.png`), to be looked at. `CUTOUT_ONLY=NAME,...` limits
//! it to those photos, and `CUTOUT_METHODS=learned` to that cut-out, for quick turns when tuning.

/// As in the kiln binary: the model's large tensors are reused, not faulted in afresh.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use image::{GrayImage, Luma, Rgb, RgbImage};
use kiln_assets::photo::{self, Cutout};
use kiln_assets::photoset::{self, metrics};
use kiln_assets::{Limits, salient};

fn on_velvet(cut: &Cutout) -> RgbImage {
    let (w, h) = cut.image.dimensions();
    let mut velvet = RgbImage::from_pixel(w, h, Rgb([28, 64, 44]));
    photo::composite(&mut velvet, &cut.image, 0, 0);
    velvet
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "target/cutout-eval".into()));
    let downscale: u32 = args.next().map_or(Ok(1), |s| s.parse())?;
    let runs: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    let t = Instant::now();
    let model = salient::active()?;
    println!(
        "model load {:.1} ms ({})",
        t.elapsed().as_secs_f64() * 1000.0,
        model.source
    );
    println!("photo method iou transparent fringe ms");
    let only = std::env::var("CUTOUT_ONLY").unwrap_or_default();
    let methods = std::env::var("CUTOUT_METHODS").unwrap_or_default();
    let chosen = |list: &str, item: &str| list.is_empty() || list.split(',').any(|s| s == item);
    for name in photoset::NAMES
        .into_iter()
        .filter(|n| chosen(only.as_str(), n))
    {
        let p = photoset::photo(name, downscale).ok_or("unknown photo")?;
        std::fs::write(out.join(format!("{name}.jpg")), &p.jpeg)?;
        GrayImage::from_fn(p.width, p.height, |x, y| {
            Luma([if p.is_product(x, y) { 255 } else { 0 }])
        })
        .save(out.join(format!("{name}-truth.png")))?;
        for (method, m) in [("colour", None), ("learned", Some(&model))] {
            if !chosen(methods.as_str(), method) {
                continue;
            }
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..runs.max(1) {
                salient::forget_recent();
                let t = Instant::now();
                let (_, img) = kiln_assets::decode(&p.jpeg, &Limits::default())?;
                let cut = photo::cut_out_decoded(&img, m)?;
                // The PNG as a kit writes it (photos/cutout.png).
                std::hint::black_box(kiln_assets::asset::cutout_png(&cut.image)?);
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                last = Some(cut);
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let cut = last.ok_or("no run")?;
            let s = metrics::score(&p, |x, y| metrics::rgba_at(&cut, x, y));
            println!(
                "{name} {method} {:.4} {:.4} {:.3} {ms:.0}",
                s.iou, s.transparent, s.fringe
            );
            // Where it is wrong: red kept backdrop, blue lost product, grey right.
            let errors = RgbImage::from_fn(p.width, p.height, |x, y| {
                let (t, a) = (p.is_product(x, y), metrics::rgba_at(&cut, x, y)[3] >= 128);
                Rgb(match (t, a) {
                    (false, true) => [230, 30, 30],
                    (true, false) => [30, 60, 230],
                    (true, true) => [150, 150, 150],
                    (false, false) => [255, 255, 255],
                })
            });
            let k = downscale.max(1);
            photo::resize_rgb(&errors, p.width * k / 4, p.height * k / 4)?
                .save(out.join(format!("{name}-{method}-errors.png")))?;
            let v = on_velvet(&cut);
            let k = (4 / downscale).max(1);
            let small = photo::resize_rgb(&v, v.width() / k, v.height() / k)?;
            small.save(out.join(format!("{name}-{method}-velvet.png")))?;
        }
    }
    Ok(())
}
