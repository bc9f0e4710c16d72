//! Which generator makes a kit, behind one call: the local studio renderer (default, no network,
//! deterministic), or the studio with an AI provider (OpenAI-compatible) writing the SEO copy
//! and, for Caratzon, adding a provider-made lifestyle scene. The catalog photos always come from
//! the studio: marketplaces want the actual product on white, not a rendering of it.
//!
//! Studio rendering is CPU-bound and runs on a blocking thread; provider calls are async.

use std::sync::Arc;

use kiln_core::{Kit, ProductSpec};
use serde_json::json;

use crate::asset::{Asset, Role, image_asset};
use crate::copy::{self, ALT_MAX, Copy, META_MAX, TAG_MAX, TITLE_MAX};
use crate::kit::{Step, copy_assets};
use crate::provider::{Provider, ProviderError, tag_ai_generated};
use crate::{AssetError, Limits};

/// The studio renderer's name in manifests.
pub const STUDIO: &str = "kiln-studio/1";

/// Progress callback shared with the blocking render thread.
pub type Progress = Arc<dyn Fn(Step) + Send + Sync>;

#[derive(Debug, Clone)]
pub enum Generator {
    Studio,
    Ai(Provider),
}

/// Why a kit could not be made, and whether trying again later can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

impl KitError {
    /// Only provider outages are worth a retry; the same upload renders the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, KitError::Provider(e) if e.is_retryable())
    }

    pub fn code(&self) -> &'static str {
        match self {
            KitError::Asset(e) => e.code(),
            KitError::Provider(ProviderError::Retryable(_)) => "provider_unavailable",
            KitError::Provider(_) => "provider_refused",
        }
    }
}

/// Steps the AI generator adds after the studio's: the copy, and for Caratzon a scene.
fn ai_steps(kit: Kit) -> &'static [&'static str] {
    match kit {
        Kit::Essentials => &["ai copy"],
        Kit::Caratzon => &["ai copy", "ai scene"],
    }
}

impl Generator {
    /// Recorded in the manifest.
    pub fn name(&self) -> String {
        match self {
            Generator::Studio => STUDIO.to_owned(),
            Generator::Ai(p) => format!(
                "{STUDIO}+ai:{}/{}",
                p.config().text_model,
                p.config().image_model
            ),
        }
    }

    /// Makes every asset of `kit`. `progress` is called before each step with the step count
    /// of this generator.
    pub async fn generate(
        &self,
        upload: Arc<[u8]>,
        spec: &ProductSpec,
        kit: Kit,
        progress: Progress,
    ) -> Result<Vec<Asset>, KitError> {
        let extra = match self {
            Generator::Studio => 0,
            Generator::Ai(_) => u32::try_from(ai_steps(kit).len()).unwrap_or(0),
        };
        let studio_progress = progress.clone();
        let owned_spec = spec.clone();
        let mut assets = tokio::task::spawn_blocking(move || {
            crate::kit::generate(&upload, &owned_spec, kit, &mut |s: Step| {
                studio_progress(Step {
                    total: s.total + extra,
                    ..s
                });
            })
        })
        .await
        .map_err(|e| AssetError::Render(format!("the renderer stopped: {e}")))??;
        let Generator::Ai(provider) = self else {
            return Ok(assets);
        };
        let studio_total = u32::try_from(crate::kit::steps(kit).len()).unwrap_or(0);
        let total = studio_total + extra;
        let mut steps = (studio_total..).zip(ai_steps(kit));
        let mut next_step = || {
            if let Some((done, name)) = steps.next() {
                progress(Step { name, done, total });
            }
        };
        next_step();
        let written = ai_copy(provider, spec, &copy::write(spec)).await?;
        if kit == Kit::Caratzon {
            next_step();
            let scene = ai_scene(provider, spec, &assets).await?;
            assets.push(scene);
        }
        // Once every image is in, so the copy files carry the scene's alt text too.
        replace_copy(&mut assets, &written)?;
        Ok(assets)
    }
}

fn copy_schema() -> serde_json::Value {
    let text = json!({"type": "string"});
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["title", "meta_description", "long_description", "bullets", "tags"],
        "properties": {
            "title": text,
            "meta_description": text,
            "long_description": text,
            "bullets": {"type": "array", "items": text},
            "tags": {"type": "array", "items": text}
        }
    })
}

/// SEO copy from the provider, held to the same limits as the studio's: titles, descriptions
/// and tags are cut at word boundaries, exactly five bullets (the studio's fill any gap), and
/// a title that does not name the product is replaced by the studio's.
async fn ai_copy(
    provider: &Provider,
    spec: &ProductSpec,
    fallback: &Copy,
) -> Result<Copy, ProviderError> {
    let facts = serde_json::to_string(spec)
        .map_err(|e| ProviderError::Permanent(format!("spec as JSON: {e}")))?;
    let system = format!(
        "You write e-commerce copy for fine jewelry. Use only facts from the product spec; never \
         invent materials, stones or prices. Title at most {TITLE_MAX} characters, meta description \
         at most {META_MAX}, exactly 5 bullets, up to 12 tags of at most {TAG_MAX} characters."
    );
    let v = provider
        .chat_json(
            &system,
            &format!("Product spec (JSON): {facts}"),
            "seo_copy",
            copy_schema(),
        )
        .await?;
    let text = |k: &str| v[k].as_str().unwrap_or_default().trim().to_owned();
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str())
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let title = copy::fit(&text("title"), TITLE_MAX);
    let mut bullets: Vec<String> = list("bullets").into_iter().take(5).collect();
    bullets.extend(fallback.bullets.iter().skip(bullets.len()).cloned());
    let tags: Vec<String> = list("tags")
        .iter()
        .map(|t| copy::fit(t, TAG_MAX))
        .filter(|t| !t.is_empty())
        .take(12)
        .collect();
    let or = |s: String, f: &str| if s.is_empty() { f.to_owned() } else { s };
    Ok(Copy {
        title: if title.to_lowercase().contains(&spec.name.to_lowercase()) {
            title
        } else {
            fallback.title.clone()
        },
        meta_description: or(
            copy::fit(&text("meta_description"), META_MAX),
            &fallback.meta_description,
        ),
        long_description: or(text("long_description"), &fallback.long_description),
        bullets,
        tags: if tags.is_empty() {
            fallback.tags.clone()
        } else {
            tags
        },
    })
}

/// Rewrites `copy/seo.json` and `copy/seo.md` in place with `copy` and every image's alt text.
fn replace_copy(assets: &mut [Asset], copy: &Copy) -> Result<(), AssetError> {
    let [json, md] = copy_assets(copy, assets)?;
    for new in [json, md] {
        if let Some(old) = assets.iter_mut().find(|a| a.path == new.path) {
            *old = new;
        }
    }
    Ok(())
}

/// A lifestyle scene made by the provider from the main image, tagged as AI-generated.
async fn ai_scene(
    provider: &Provider,
    spec: &ProductSpec,
    assets: &[Asset],
) -> Result<Asset, KitError> {
    let main = assets
        .iter()
        .find(|a| a.role == Role::MainImage)
        .ok_or_else(|| AssetError::Render("the kit has no main image".into()))?;
    let (_, master) = crate::decode(&main.bytes, &Limits::default())?;
    let small = crate::photo::resize_rgba(&master.to_rgba(), 1024, 1024)?;
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba8(small)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| AssetError::Render(format!("PNG: {e}")))?;
    let prompt = format!(
        "Place this exact {} unchanged on a warm marble surface in soft window light, as an \
         editorial jewelry photograph. Keep its shape, metal and stones exactly as they are. \
         No text, no people, no other jewelry.",
        spec.category.noun()
    );
    let bytes = provider.edit_image(png, &prompt, "1024x1024").await?;
    // The provider's bytes are untrusted input like any upload.
    let limits = Limits {
        min_side: 256,
        ..Limits::default()
    };
    let (probe, pixels) = crate::decode(&bytes, &limits)
        .map_err(|e| ProviderError::Permanent(format!("the provider's image is unusable: {e}")))?;
    let rgb = match pixels {
        crate::Decoded::Rgb(i) => i,
        other => image::DynamicImage::ImageRgba8(other.to_rgba()).into_rgb8(),
    };
    let alt = copy::fit(
        &copy::alt_text(spec, "in an AI-generated marble scene"),
        ALT_MAX,
    );
    let mut asset = image_asset(
        "lifestyle/ai-marble.jpg",
        Role::LifestyleImage,
        &rgb,
        90,
        alt,
        false,
    )?;
    // Keep the provider's JPEG as it came (already tagged); re-encoded images get the tag here.
    asset.bytes = if probe.format == image::ImageFormat::Jpeg {
        bytes
    } else {
        tag_ai_generated(&asset.bytes)
    };
    Ok(asset)
}
