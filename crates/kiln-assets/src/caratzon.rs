//! What Caratzon adds to Essentials: lifestyle images (the product on marble and on linen),
//! an editorial image with typography, social sizes, and a multi-page lookbook PDF.

use image::RgbImage;
use kiln_core::ProductSpec;

use crate::asset::{Asset, Role, image_asset};
use crate::pdf::{self, A4, Fonts, GOLD, INK, MUTED, Pen};
use crate::photo::Cutout;
use crate::scene::{self, Align, Face, Surface};
use crate::{AssetError, copy};

const IVORY: [u8; 3] = [246, 240, 228];
const GOLD_PX: [u8; 3] = [201, 163, 92];
const INK_PX: [u8; 3] = [34, 31, 28];
const MUTED_PX: [u8; 3] = [120, 112, 104];

/// The social formats: Instagram square, portrait and story, Pinterest pin, link card.
pub const SOCIAL: [(u32, u32); 5] = [
    (1080, 1080),
    (1080, 1350),
    (1080, 1920),
    (1000, 1500),
    (1200, 630),
];

fn brand(spec: &ProductSpec) -> &str {
    spec.brand.as_deref().unwrap_or("")
}

#[allow(clippy::cast_precision_loss)]
fn social(cut: &Cutout, spec: &ProductSpec, w: u32, h: u32) -> Result<RgbImage, AssetError> {
    let (wf, hf) = (w as f32, h as f32);
    let img = match (w, h) {
        (1200, 630) => {
            let mut c = scene::backdrop(Surface::Studio, w, h);
            scene::place(&mut c, cut, 0.72, 0.28, 0.5, false)?;
            let x = wf * 0.56;
            scene::text(
                &mut c,
                Face::Light,
                22.0,
                MUTED_PX,
                x,
                hf * 0.36,
                Align::Left,
                &brand(spec).to_uppercase(),
            );
            scene::text(
                &mut c,
                Face::Display,
                58.0,
                INK_PX,
                x,
                hf * 0.52,
                Align::Left,
                &copy::fit(&spec.name, 22),
            );
            if let Some(m) = &spec.msrp {
                scene::text(
                    &mut c,
                    Face::Display,
                    34.0,
                    GOLD_PX,
                    x,
                    hf * 0.68,
                    Align::Left,
                    &m.display(),
                );
            }
            c
        }
        (1080, 1920) => {
            let mut c = scene::backdrop(Surface::Velvet, w, h);
            scene::place(&mut c, cut, 0.62, 0.5, 0.47, false)?;
            scene::text(
                &mut c,
                Face::Light,
                30.0,
                GOLD_PX,
                wf / 2.0,
                hf * 0.1,
                Align::Center,
                &brand(spec).to_uppercase(),
            );
            scene::text(
                &mut c,
                Face::Display,
                84.0,
                IVORY,
                wf / 2.0,
                hf * 0.8,
                Align::Center,
                &copy::fit(&spec.name, 20),
            );
            if let Some(col) = &spec.collection {
                scene::text(
                    &mut c,
                    Face::Light,
                    30.0,
                    GOLD_PX,
                    wf / 2.0,
                    hf * 0.85,
                    Align::Center,
                    &col.to_uppercase(),
                );
            }
            c
        }
        (1000, 1500) => {
            let mut c = scene::backdrop(Surface::Marble, w, h);
            scene::place(&mut c, cut, 0.66, 0.5, 0.55, true)?;
            scene::text(
                &mut c,
                Face::Display,
                72.0,
                INK_PX,
                wf / 2.0,
                hf * 0.14,
                Align::Center,
                &copy::fit(&spec.name, 20),
            );
            scene::text(
                &mut c,
                Face::Light,
                26.0,
                MUTED_PX,
                wf / 2.0,
                hf * 0.19,
                Align::Center,
                &brand(spec).to_uppercase(),
            );
            c
        }
        (1080, 1350) => {
            let mut c = scene::backdrop(Surface::Studio, w, h);
            scene::place(&mut c, cut, 0.66, 0.5, 0.44, false)?;
            scene::text(
                &mut c,
                Face::Display,
                64.0,
                INK_PX,
                wf / 2.0,
                hf * 0.84,
                Align::Center,
                &copy::fit(&spec.name, 22),
            );
            scene::text(
                &mut c,
                Face::Light,
                24.0,
                MUTED_PX,
                wf / 2.0,
                hf * 0.89,
                Align::Center,
                &brand(spec).to_uppercase(),
            );
            c
        }
        _ => {
            let mut c = scene::backdrop(Surface::Studio, w, h);
            scene::place(&mut c, cut, 0.7, 0.5, 0.5, false)?;
            c
        }
    };
    Ok(img)
}

/// Appends Caratzon's assets; `step` is called before each of its four steps.
pub(crate) fn add(
    assets: &mut Vec<Asset>,
    cut: &Cutout,
    spec: &ProductSpec,
    step: &mut dyn FnMut(),
) -> Result<(), AssetError> {
    step();
    let mut marble = scene::backdrop(Surface::Marble, 2000, 1500);
    scene::place(&mut marble, cut, 0.56, 0.5, 0.52, true)?;
    assets.push(image_asset(
        "lifestyle/marble.jpg",
        Role::LifestyleImage,
        &marble,
        90,
        copy::alt_text(spec, "on white marble"),
        false,
    )?);
    let mut linen = scene::backdrop(Surface::Linen, 2000, 1500);
    scene::place(&mut linen, cut, 0.5, 0.6, 0.56, false)?;
    assets.push(image_asset(
        "lifestyle/linen.jpg",
        Role::LifestyleImage,
        &linen,
        90,
        copy::alt_text(spec, "resting on natural linen"),
        false,
    )?);

    step();
    let (w, h) = (1600u32, 2000u32);
    let mut editorial = scene::backdrop(Surface::Velvet, w, h);
    scene::place(&mut editorial, cut, 0.62, 0.5, 0.5, false)?;
    scene::text(
        &mut editorial,
        Face::Light,
        40.0,
        GOLD_PX,
        800.0,
        160.0,
        Align::Center,
        &brand(spec).to_uppercase(),
    );
    scene::text(
        &mut editorial,
        Face::Display,
        118.0,
        IVORY,
        800.0,
        1720.0,
        Align::Center,
        &copy::fit(&spec.name, 22),
    );
    if let Some(col) = &spec.collection {
        scene::text(
            &mut editorial,
            Face::Light,
            36.0,
            GOLD_PX,
            800.0,
            1800.0,
            Align::Center,
            &col.to_uppercase(),
        );
    }
    assets.push(image_asset(
        "editorial/cover.jpg",
        Role::EditorialImage,
        &editorial,
        90,
        copy::alt_text(spec, "editorial portrait on dark velvet"),
        false,
    )?);

    step();
    for (sw, sh) in SOCIAL {
        let img = social(cut, spec, sw, sh)?;
        let path = format!("social/{sw}x{sh}.jpg");
        assets.push(image_asset(
            &path,
            Role::SocialImage,
            &img,
            88,
            copy::alt_text(spec, "styled for social media"),
            false,
        )?);
    }

    step();
    let find = |path: &str| {
        assets
            .iter()
            .find(|a| a.path == path)
            .map(|a| a.bytes.clone())
            .unwrap_or_default()
    };
    let book = lookbook(
        spec,
        &find("editorial/cover.jpg"),
        &find("lifestyle/marble.jpg"),
        &find("lifestyle/linen.jpg"),
        &find("photos/main.jpg"),
        &find("photos/detail.jpg"),
    )?;
    assets.push(Asset::file(
        "lookbook/lookbook.pdf",
        Role::Lookbook,
        "application/pdf",
        book,
    ));
    Ok(())
}

/// Four landscape A4 pages: cover, marble spread, linen spread with the story, details.
fn lookbook(
    spec: &ProductSpec,
    cover: &[u8],
    marble: &[u8],
    linen: &[u8],
    main: &[u8],
    detail: &[u8],
) -> Result<Vec<u8>, AssetError> {
    let f = Fonts::load()?;
    let (w, h) = (A4.1, A4.0);
    let brand = spec.brand.as_deref().unwrap_or("Lookbook");
    let collection = spec.collection.as_deref().unwrap_or("");
    let mut doc = pdf::document(&format!("{brand} – {} lookbook", spec.name));
    let copy = copy::write(spec);

    // Cover: the editorial image on the left half, the title on the right.
    {
        let mut page = doc.start_page_with(pdf::page_settings(w, h)?);
        let mut surface = page.surface();
        let mut pen = Pen { s: &mut surface };
        pen.rect(0.0, 0.0, w, h, (250, 246, 238));
        pen.jpeg(cover, 0.0, 0.0, h * 0.8, h)?;
        let x = h * 0.8 + 48.0;
        pen.text(&f.light, 10.0, MUTED, x, 120.0, &brand.to_uppercase());
        let mut y = 200.0;
        for line in pdf::wrap(&f.display, 40.0, w - x - 40.0, &spec.name) {
            pen.text(&f.display, 40.0, INK, x, y, &line);
            y += 44.0;
        }
        pen.rule(x, x + 60.0, y, GOLD, 1.0);
        if !collection.is_empty() {
            pen.text(&f.display_italic, 16.0, MUTED, x, y + 30.0, collection);
        }
        pen.text(
            &f.light,
            9.0,
            MUTED,
            x,
            h - 48.0,
            &format!("STYLE {}", spec.style_number),
        );
        surface.finish();
        page.finish();
    }
    // Marble: full bleed with a caption band.
    {
        let mut page = doc.start_page_with(pdf::page_settings(w, h)?);
        let mut surface = page.surface();
        let mut pen = Pen { s: &mut surface };
        pen.jpeg(marble, 0.0, 0.0, w, h)?;
        pen.text(
            &f.display_italic,
            14.0,
            INK,
            40.0,
            h - 36.0,
            &copy::fit(&copy.title, 80),
        );
        surface.finish();
        page.finish();
    }
    // Linen with the story.
    {
        let mut page = doc.start_page_with(pdf::page_settings(w, h)?);
        let mut surface = page.surface();
        let mut pen = Pen { s: &mut surface };
        pen.rect(0.0, 0.0, w, h, (250, 246, 238));
        pen.jpeg(linen, w * 0.42, 0.0, w * 0.58, w * 0.58 * 0.75)?;
        pen.text(&f.light, 9.0, GOLD, 40.0, 90.0, "THE PIECE");
        let y = pen.paragraph(
            &f.display,
            15.0,
            INK,
            40.0,
            120.0,
            w * 0.42 - 80.0,
            21.0,
            14,
            &copy.long_description,
        );
        let mut by = y + 18.0;
        for b in &copy.bullets {
            by = pen.paragraph(
                &f.text,
                9.5,
                INK,
                40.0,
                by,
                w * 0.42 - 80.0,
                13.0,
                2,
                &format!("– {b}"),
            ) + 4.0;
        }
        surface.finish();
        page.finish();
    }
    // Details: main image, detail, facts and prices.
    {
        let mut page = doc.start_page_with(pdf::page_settings(w, h)?);
        let mut surface = page.surface();
        let mut pen = Pen { s: &mut surface };
        let side = h - 120.0;
        pen.jpeg(main, 40.0, 60.0, side, side)?;
        pen.jpeg(detail, 40.0 + side + 20.0, 60.0, 180.0, 180.0)?;
        let x = 40.0 + side + 20.0;
        let mut y = 280.0;
        pen.text(
            &f.bold,
            8.0,
            GOLD,
            x,
            y,
            &format!("STYLE {}", spec.style_number),
        );
        y += 22.0;
        for line in [copy::metal_phrase(spec), copy::stone_phrase(spec)]
            .into_iter()
            .filter(|l| !l.is_empty())
        {
            y = pen.paragraph(&f.text, 10.0, INK, x, y, w - x - 40.0, 13.0, 3, &line) + 4.0;
        }
        y += 10.0;
        if let Some(m) = &spec.wholesale_price {
            pen.text(&f.light, 7.5, MUTED, x, y, "WHOLESALE");
            pen.text(&f.display, 16.0, INK, x, y + 20.0, &m.display());
        }
        if let Some(m) = &spec.msrp {
            pen.text(&f.light, 7.5, MUTED, x + 110.0, y, "MSRP");
            pen.text(&f.display, 16.0, INK, x + 110.0, y + 20.0, &m.display());
        }
        pen.text(
            &f.light,
            7.5,
            MUTED,
            x,
            h - 40.0,
            &format!("{brand} · {collection}"),
        );
        surface.finish();
        page.finish();
    }
    pdf::finish(doc)
}
