//! Renders the bundled sample design's kit into a directory, to look at:
//! `cargo run -p kiln-assets --example render_sample -- OUT_DIR [essentials|caratzon]`.

use kiln_assets::{Manifest, generate, sample};
use kiln_core::{Kit, ProductSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "sample-kit".into()));
    let kit: Kit = args.next().unwrap_or_else(|| "essentials".into()).parse()?;
    let spec = ProductSpec::from_json(sample::SPEC_JSON.as_bytes())?;
    let upload = kiln_assets::encode_jpeg(&sample::ring(2400), 95)?;
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("upload.jpg"), &upload)?;
    let assets = generate(&upload, &spec, kit, &mut |s| {
        eprintln!("[{}/{}] {}", s.done + 1, s.total, s.name)
    })?;
    for a in &assets {
        let path = out.join(&a.path);
        std::fs::create_dir_all(path.parent().unwrap_or(&out))?;
        std::fs::write(&path, &a.bytes)?;
        println!("{:>9} bytes  {}", a.bytes.len(), path.display());
    }
    std::fs::write(
        out.join("manifest.json"),
        Manifest::new(
            "sample",
            kit,
            kiln_assets::generator::STUDIO.into(),
            &assets,
        )
        .to_json(),
    )?;
    Ok(())
}
