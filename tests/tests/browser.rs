//! The web page as a jeweler uses it, in headless Chromium (Debian's, through chromedriver)
//! against a real `kiln serve` on the embedded default (SQLite, local store, workers in the
//! process): sign in, see the balance, pick Caratzon and see its 100 credits before
//! confirming, upload a design, watch the progress reach 100%, see the gallery. Then an account
//! that cannot afford it gets the top-up prompt with the packs, and a top-up lifts the balance.
//! Screenshots of each step are kept (the path is printed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_e2e::webdriver::{Driver, Session};
use kiln_e2e::{Scratch, ServeProcess, create_account, kiln_cmd, migrate};
use serde_json::json;

fn artefacts() -> PathBuf {
    let dir = std::env::var_os("KILN_ARTIFACTS").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("artefacts dir");
    dir
}

async fn sign_in(s: &Session, base: &str, key: &str) {
    // Forget the last key on a page of the same origin that runs no script: on the web page
    // itself, a sign-in still in flight from its load stores the key again after the clear, and
    // the page then comes back signed in (seen in CI as "element not interactable").
    s.goto(&format!("{base}/healthz")).await;
    s.script("sessionStorage.clear(); return true;", json!([]))
        .await;
    s.goto(&format!("{base}/")).await;
    s.type_into("#api-key", key).await;
    s.click("#signin-button").await;
    s.wait_until(
        "the balance",
        20,
        "return /^\\d+$/.test(document.getElementById('available').innerText);",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jeweler_orders_a_caratzon_kit_in_the_browser() {
    kiln_e2e::init_test_log();
    let dir = Scratch::new();
    let db = format!("sqlite://{}/kiln.db", dir.0.display());
    let storage = dir.0.join("objects");
    migrate(&db, &storage);
    let serve = ServeProcess::start(&mut kiln_cmd(&db, &storage), &dir.0.join("serve.log"), &[]);
    let base = serve.base.clone();
    let shots = artefacts();
    eprintln!("browser test screenshots: {}", shots.display());
    let design = dir.0.join("aurora-ring.jpg");
    let jpeg = kiln_assets::encode_jpeg(&kiln_assets::sample::ring(1200), 90).expect("jpeg");
    std::fs::write(&design, jpeg).expect("design");

    let driver = Driver::start();
    let s = driver.session(1280, 1700).await;
    s.goto(&format!("{base}/")).await;
    s.find("#api-key").await;
    s.screenshot(&shots.join("01-sign-in.png")).await;

    let (_, key) = create_account(&db, &storage);
    sign_in(&s, &base, &key).await;
    assert_eq!(s.text("#available").await, "200");
    assert!(
        s.text("#kinds").await.contains("Welcome credits: 200"),
        "{}",
        s.text("#kinds").await
    );
    s.screenshot(&shots.join("02-balance.png")).await;

    s.click(".kit[data-kit=caratzon]").await;
    s.wait_until(
        "the Caratzon quote",
        20,
        "return document.getElementById('quote').innerText.includes('Caratzon kit: 100 credits');",
    )
    .await;
    assert!(
        s.text("#order-button").await.contains("100 credits"),
        "{}",
        s.text("#order-button").await
    );
    s.type_into("#design", design.to_str().expect("path")).await;
    s.type_into("#style_number", "R-1042").await;
    s.type_into("#name", "Aurora Solitaire Ring").await;
    s.type_into("#metal_type", "gold").await;
    s.type_into("#metal_purity", "18k").await;
    s.type_into("#stone_type", "diamond").await;
    s.type_into("#stone_count", "1").await;
    s.type_into("#stone_carat", "0.75").await;
    s.screenshot(&shots.join("03-confirm-caratzon.png")).await;
    s.click("#order-button").await;

    // Progress: seen while running, then 100% with the gallery.
    s.wait_until(
        "the kit to start",
        30,
        "return !document.getElementById('progress-card').classList.contains('hidden');",
    )
    .await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pct = s.text("#progress-percent").await;
        if seen.last() != Some(&pct) {
            seen.push(pct.clone());
            if seen.len() == 3 {
                s.screenshot(&shots.join("04-progress.png")).await;
            }
        }
        if pct == "100%" && s.text("#progress-status").await == "succeeded" {
            break;
        }
        assert_ne!(s.text("#progress-status").await, "failed", "the kit failed");
        assert!(
            Instant::now() < deadline,
            "the kit did not finish: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.len() >= 3, "progress moved in steps: {seen:?}");
    s.wait_until(
        "the kit's files",
        30,
        "return !document.getElementById('result').classList.contains('hidden');",
    )
    .await;
    s.wait_until(
        "the gallery's images to load",
        30,
        "const imgs = [...document.querySelectorAll('#gallery img')]; \
         return imgs.length >= 8 && imgs.every(i => i.complete && i.naturalWidth > 0);",
    )
    .await;
    assert!(
        s.text("#files").await.contains(".pdf"),
        "PDF links: {}",
        s.text("#files").await
    );
    let files = s
        .script(
            "return [...document.querySelectorAll('#files a')].map(a => a.innerText).join(' ');",
            json!([]),
        )
        .await;
    assert!(
        s.text("#copy").await.contains("Aurora"),
        "copy: {} (files: {files})",
        s.text("#copy").await
    );
    s.script(
        "document.getElementById('progress-card').scrollIntoView(); return true;",
        json!([]),
    )
    .await;
    s.screenshot(&shots.join("05-gallery.png")).await;
    assert_eq!(
        s.text("#available").await,
        "100",
        "charged 100 once delivered"
    );
    assert!(
        s.text("#history").await.contains("succeeded"),
        "{}",
        s.text("#history").await
    );

    // An account that cannot afford it: the top-up prompt, nothing charged; a top-up helps.
    let (_, poor) = create_account(&db, &storage);
    let http = reqwest::Client::new();
    for i in 0..5 {
        let r = http
            .post(format!("{base}/v1/charges"))
            .bearer_auth(&poor)
            .json(&json!({ "action": "video", "idempotency_key": format!("v{i}") }))
            .send()
            .await
            .expect("charge");
        assert_eq!(r.status().as_u16(), 201);
    }
    sign_in(&s, &base, &poor).await;
    let before = s.text("#available").await;
    s.click(".kit[data-kit=caratzon]").await;
    s.wait_until(
        "the short quote",
        20,
        "return document.getElementById('quote').innerText.includes('short');",
    )
    .await;
    s.type_into("#design", design.to_str().expect("path")).await;
    s.type_into("#style_number", "N-7").await;
    s.type_into("#name", "Filigree Necklace").await;
    s.click("#order-button").await;
    s.wait_until(
        "the top-up prompt",
        20,
        "return !document.getElementById('topup').classList.contains('hidden');",
    )
    .await;
    assert!(
        s.text("#topup-message").await.contains("needs 100 credits"),
        "{}",
        s.text("#topup-message").await
    );
    let packs: u64 = s
        .script(
            "return document.querySelectorAll('#packs .pack').length;",
            json!([]),
        )
        .await
        .as_u64()
        .unwrap_or(0);
    assert_eq!(packs, 3, "three packs offered");
    assert_eq!(s.text("#available").await, before, "nothing charged");
    s.screenshot(&shots.join("06-top-up.png")).await;
    s.click("#packs .pack button").await;
    s.wait_until(
        "the balance after the top-up",
        20,
        &format!("return document.getElementById('available').innerText !== '{before}';"),
    )
    .await;
    let after: u64 = s.text("#available").await.parse().expect("number");
    assert!(
        after > before.parse::<u64>().expect("number"),
        "{before} -> {after}"
    );
}
