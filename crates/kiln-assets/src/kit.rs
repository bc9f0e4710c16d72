//! Assembling a kit: which assets each kit holds, in which order they are made, and the
//! manifest that lists them (written last by the worker).

use kiln_core::{Kit, ProductSpec};
use serde::Serialize;

use crate::asset::{Asset, CutoutNote, Role, image_asset};
use crate::photo::{self, MASTER_FILL, MASTER_SIDE};
use crate::{AssetError, Limits, Quality, copy, sha256_hex};

/// Progress through a kit, reported before each step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub done: u32,
    pub total: u32,
}

fn json_asset<T: Serialize>(path: &str, role: Role, value: &T) -> Result<Asset, AssetError> {
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| AssetError::Render(format!("JSON: {e}")))?;
    Ok(Asset::file(path, role, "application/json", bytes))
}

/// The studio's steps for `kit`, in order.
pub fn steps(kit: Kit) -> &'static [&'static str] {
    const CARATZON: &[&str] = &[
        "decode",
        "cut out",
        "main image",
        "alternates",
        "spec sheet",
        "line sheet",
        "copy",
        "lifestyle",
        "editorial",
        "social",
        "lookbook",
    ];
    match kit {
        Kit::Caratzon => CARATZON,
        // Essentials is Caratzon's first seven steps.
        Kit::Essentials => &CARATZON[..7],
    }
}

/// Makes every asset of `kit` from the upload and its spec. `progress` is called before each
/// step. Deterministic: the same input gives byte-identical assets.
pub fn generate(
    upload: &[u8],
    spec: &ProductSpec,
    kit: Kit,
    progress: &mut dyn FnMut(Step),
) -> Result<Vec<Asset>, AssetError> {
    let steps = steps(kit);
    let total = u32::try_from(steps.len()).unwrap_or(u32::MAX);
    let mut step = 0u32;
    let mut next = |progress: &mut dyn FnMut(Step)| {
        progress(Step {
            name: steps.get(step as usize).copied().unwrap_or("finishing"),
            done: step,
            total,
        });
        step += 1;
    };

    next(progress);
    let (_, img) = crate::decode(upload, &Limits::default())?;
    next(progress);
    let model = crate::salient::active()?;
    let cut = photo::cut_out_decoded(&img, Some(&model))?;
    let mut warnings = Vec::new();
    if !cut.background.is_uniform() {
        warnings.push(format!(
            "background not uniform (spread {:.1}): check the cut-out's edges",
            cut.background.spread
        ));
    }
    if !cut.background.is_light() {
        warnings.push(
            "background is dark: photograph on a plain light backdrop for the cleanest cut-out"
                .to_owned(),
        );
    }
    if cut.touches_edge() {
        warnings.push("the product touches the edge of the upload and may be cropped".to_owned());
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let needed = (MASTER_SIDE as f32 * MASTER_FILL) as u32;
    if cut.bounds.long_side() < needed {
        warnings.push(format!(
            "the product is {} px long in the upload and is enlarged to {needed} px; a sharper upload gives a sharper main image",
            cut.bounds.long_side()
        ));
    }

    next(progress);
    let mut assets = Vec::new();
    let (master, _) = photo::place_on_white(&cut, MASTER_SIDE, MASTER_FILL, 0.0)?;
    let mut main = image_asset(
        "photos/main.jpg",
        Role::MainImage,
        &master,
        92,
        copy::alt_text(spec, "on a white background"),
        true,
    )?;
    if let Some(q) = main.quality.as_mut() {
        q.warnings.extend(warnings);
    }
    assets.push(main);

    next(progress);
    let shadowed = photo::with_shadow(&cut, MASTER_SIDE)?;
    assets.push(image_asset(
        "photos/shadow.jpg",
        Role::ShadowImage,
        &shadowed,
        90,
        copy::alt_text(spec, "with a soft shadow on white"),
        false,
    )?);
    let detail = photo::detail_crop(&cut, 1600)?;
    assets.push(image_asset(
        "photos/detail.jpg",
        Role::DetailImage,
        &detail,
        90,
        copy::alt_text(spec, "close-up detail"),
        false,
    )?);
    for side in [1000, 600] {
        let web = photo::resize_rgb(&master, side, side)?;
        let path = format!("photos/web-{side}.jpg");
        assets.push(image_asset(
            &path,
            Role::WebImage,
            &web,
            85,
            copy::alt_text(spec, "on a white background"),
            true,
        )?);
    }

    assets.push(crate::asset::cutout_asset(
        &cut.image,
        copy::alt_text(spec, "cut out on a transparent background"),
        CutoutNote {
            method: cut.method,
            model: Some(model.source.clone()),
            model_sha256: Some(model.sha256.clone()),
        },
    )?);

    next(progress);
    assets.push(json_asset(
        "spec/spec-sheet.json",
        Role::SpecSheet,
        &SpecSheet::new(spec),
    )?);

    next(progress);
    let find = |role: Role| {
        assets
            .iter()
            .find(|a| a.role == role)
            .map(|a| a.bytes.as_slice())
            .unwrap_or_default()
    };
    let sheet = crate::pdf::line_sheet(
        spec,
        find(Role::MainImage),
        find(Role::DetailImage),
        find(Role::ShadowImage),
    )?;
    assets.push(Asset::file(
        "sheets/line-sheet.pdf",
        Role::LineSheet,
        "application/pdf",
        sheet,
    ));

    next(progress);
    let copy_files = copy_assets(&copy::write(spec), &assets)?;
    assets.extend(copy_files);
    if kit == Kit::Caratzon {
        crate::caratzon::add(&mut assets, &cut, spec, &mut || next(progress))?;
    }
    Ok(assets)
}

/// `copy/seo.json` and `copy/seo.md`: the copy plus the alt text of every image in `assets`.
pub(crate) fn copy_assets(copy: &copy::Copy, assets: &[Asset]) -> Result<[Asset; 2], AssetError> {
    let alts: Vec<AltText> = assets
        .iter()
        .filter_map(|a| {
            a.alt.clone().map(|alt| AltText {
                path: a.path.clone(),
                alt,
            })
        })
        .collect();
    let json = json_asset(
        "copy/seo.json",
        Role::SeoCopy,
        &SeoDocument {
            copy,
            alt_text: &alts,
        },
    )?;
    let mut md = copy.markdown();
    md.push_str("\n## Alt text\n\n");
    for a in &alts {
        md.push_str(&format!("- `{}`: {}\n", a.path, a.alt));
    }
    let md = Asset::file(
        "copy/seo.md",
        Role::SeoCopy,
        "text/markdown; charset=utf-8",
        md.into_bytes(),
    );
    Ok([json, md])
}

#[derive(Serialize)]
struct AltText {
    path: String,
    alt: String,
}

#[derive(Serialize)]
struct SeoDocument<'a> {
    #[serde(flatten)]
    copy: &'a copy::Copy,
    alt_text: &'a [AltText],
}

/// The spec sheet: the spec as given plus the phrases the line sheet prints.
#[derive(Serialize)]
struct SpecSheet<'a> {
    spec: &'a ProductSpec,
    materials: String,
    stones: String,
    wholesale_price: Option<String>,
    msrp: Option<String>,
}

impl<'a> SpecSheet<'a> {
    fn new(spec: &'a ProductSpec) -> Self {
        SpecSheet {
            spec,
            materials: copy::metal_phrase(spec),
            stones: copy::stone_phrase(spec),
            wholesale_price: spec.wholesale_price.as_ref().map(kiln_core::Money::display),
            msrp: spec.msrp.as_ref().map(kiln_core::Money::display),
        }
    }
}

/// One line of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ManifestEntry {
    pub key: String,
    pub role: Role,
    pub content_type: String,
    pub bytes: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub sha256: String,
    pub alt: Option<String>,
    pub quality: Option<Quality>,
    /// On the cut-out's line: which cut-out ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutout: Option<CutoutNote>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Manifest {
    pub job: String,
    pub kit: Kit,
    /// Which generator made the kit: `kiln-studio/1`, or `kiln-studio/1+ai:<models>`.
    pub generator: String,
    pub assets: Vec<ManifestEntry>,
}

impl Manifest {
    /// Lists `assets` under `kits/<job>/`.
    pub fn new(job: &str, kit: Kit, generator: String, assets: &[Asset]) -> Manifest {
        Manifest::in_dir(
            &format!("kits/{}", job.to_lowercase()),
            job,
            kit,
            generator,
            assets,
        )
    }

    /// Lists `assets` under `dir` (a worker's attempt writes under its own directory).
    pub fn in_dir(dir: &str, job: &str, kit: Kit, generator: String, assets: &[Asset]) -> Manifest {
        let entries = assets
            .iter()
            .map(|a| ManifestEntry {
                key: format!("{dir}/{}", a.path),
                role: a.role,
                content_type: a.content_type.to_owned(),
                bytes: a.bytes.len() as u64,
                width: a.width,
                height: a.height,
                sha256: sha256_hex(&a.bytes),
                alt: a.alt.clone(),
                quality: a.quality.clone(),
                cutout: a.cutout.clone(),
            })
            .collect();
        Manifest {
            job: job.to_owned(),
            kit,
            generator,
            assets: entries,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
