//! Timing for `make bench`: the 2000x2000 master and whole kits from a 4000x4000 JPEG upload.
//! `kit_bench OUT_DIR [runs]` writes the upload to OUT_DIR/upload.jpg (so scripts/bench.sh can
//! time vipsthumbnail on the same file) and prints `name median_ms` lines. Single-threaded.
//! Every run runs the cut-out model afresh (the masks a process keeps are forgotten first);
//! `model` is the model alone, on the upload shrunk for it.

/// As in the kiln binary: the model's large tensors are reused, not faulted in afresh.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use kiln_assets::photo::{self, MASTER_FILL, MASTER_SIDE};
use kiln_assets::{Limits, encode_jpeg, generate, salient, sample};
use kiln_core::{Kit, ProductSpec};

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "target/kit-bench".into()));
    let runs: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    let upload = encode_jpeg(&sample::ring(4000), 92)?;
    std::fs::write(out.join("upload.jpg"), &upload)?;
    let spec = ProductSpec::from_json(sample::SPEC_JSON.as_bytes())?;

    let model = salient::active()?;
    let master = median_ms(runs, || {
        salient::forget_recent();
        let (_, img) = kiln_assets::decode(&upload, &Limits::default()).expect("decode");
        let cut = photo::cut_out_decoded(&img, Some(&model)).expect("cut out");
        let (m, _) = photo::place_on_white(&cut, MASTER_SIDE, MASTER_FILL, 0.0).expect("place");
        std::hint::black_box(encode_jpeg(&m, 92).expect("encode"));
    });
    println!("master {master:.1}");
    let decode = median_ms(runs, || {
        std::hint::black_box(kiln_assets::decode(&upload, &Limits::default()).expect("decode"));
    });
    println!("decode {decode:.1}");
    let small = image::RgbaImage::from_pixel(1000, 1000, image::Rgba([200, 200, 200, 255]));
    let alone = median_ms(runs, || {
        salient::forget_recent();
        std::hint::black_box(model.predict_rgba(&small).expect("model"));
    });
    println!("model {alone:.1}");
    for kit in [Kit::Essentials, Kit::Caratzon] {
        // Each step's time, from one progress report to the next.
        let mut steps: Vec<(&str, Vec<f64>)> = Vec::new();
        let ms = median_ms(runs, || {
            salient::forget_recent();
            let mut last: Option<(&str, Instant)> = None;
            let mut lap = |name: &'static str| {
                let now = Instant::now();
                if let Some((prev, t)) = last.replace((name, now)) {
                    let ms = (now - t).as_secs_f64() * 1000.0;
                    match steps.iter_mut().find(|(n, _)| *n == prev) {
                        Some((_, v)) => v.push(ms),
                        None => steps.push((prev, vec![ms])),
                    }
                }
            };
            let assets = generate(&upload, &spec, kit, &mut |s| lap(s.name)).expect("kit");
            lap("end");
            std::hint::black_box(assets);
        });
        println!("{kit} {ms:.1}");
        for (name, mut v) in steps {
            v.sort_by(f64::total_cmp);
            println!("{kit}.{} {:.1}", name.replace(' ', "_"), v[v.len() / 2]);
        }
    }
    Ok(())
}
