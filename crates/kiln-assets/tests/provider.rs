//! The AI provider client against a local fake that speaks the OpenAI-compatible protocol
//! (multipart image edits, chat completions with a JSON schema, `{error: {...}}` bodies).

use std::time::Duration;

use axum::Router;
use axum::extract::Multipart;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use kiln_assets::provider::{Provider, ProviderConfig, ProviderError, TRAINED_ALGORITHMIC_MEDIA};
use serde_json::{Value, json};

const KEY: &str = "sk-test-kiln";

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}})))
        .into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {KEY}"))
}

async fn edits(headers: HeaderMap, mut form: Multipart) -> Response {
    if !authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    let (mut prompt, mut image_len, mut size) = (String::new(), 0, String::from("1024x1024"));
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("prompt") => prompt = field.text().await.unwrap_or_default(),
            Some("size") => size = field.text().await.unwrap_or_default(),
            Some("image") => image_len = field.bytes().await.map(|b| b.len()).unwrap_or(0),
            _ => {}
        }
    }
    if image_len == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_image",
            "image is required",
        );
    }
    if prompt.contains("[429]") {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Rate limit reached",
        );
    }
    if prompt.contains("[500]") {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error",
        );
    }
    if prompt.contains("[refuse]") {
        return error(
            StatusCode::BAD_REQUEST,
            "content_policy_violation",
            "Your request was rejected by the safety system",
        );
    }
    let Some((w, h)) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
    else {
        return error(StatusCode::BAD_REQUEST, "invalid_size", "size must be WxH");
    };
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            200,
            u8::try_from(x % 256).unwrap_or(0),
            u8::try_from(y % 256).unwrap_or(0),
        ])
    });
    let jpeg = kiln_assets::encode_jpeg(&img, 90).expect("encode");
    let b64 = base64::engine::general_purpose::STANDARD.encode(jpeg);
    axum::Json(json!({"created": 1_764_000_000, "data": [{"b64_json": b64}], "usage": {"total_tokens": 100}})).into_response()
}

async fn chat(headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if !authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect API key provided",
        );
    }
    if body["response_format"]["type"] != "json_schema"
        || body["response_format"]["json_schema"]["strict"] != true
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_response_format",
            "json_schema expected",
        );
    }
    let user = body["messages"][1]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if user.contains("[slow]") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if user.contains("[429]") {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Rate limit reached",
        );
    }
    let message = if user.contains("[refuse]") {
        json!({"role": "assistant", "content": null, "refusal": "I can't help with that."})
    } else if body["response_format"]["json_schema"]["name"] == "seo_copy" {
        // Copy as a model writes it: over-long, too few bullets, one tag too long.
        let spec: Value = user
            .split_once(": ")
            .and_then(|(_, j)| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let name = spec["name"].as_str().unwrap_or("Unnamed");
        let copy = json!({
            "title": format!("{name} — a luminous heirloom ring, hand-finished in the studio for every day and every occasion"),
            "meta_description": "Hand-finished luminous heirloom jewelry. ".repeat(6),
            "long_description": format!("The {name} catches the light from every side."),
            "bullets": ["Hand-finished", "Conflict-free diamond", "Gift box included"],
            "tags": ["heirloom", "solitaire", "an-extremely-long-tag-that-overflows"]
        });
        json!({"role": "assistant", "content": copy.to_string()})
    } else {
        json!({"role": "assistant", "content": "{\"title\":\"Aurora Solitaire\",\"tags\":[\"ring\"]}"})
    };
    axum::Json(json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": {"total_tokens": 42}}))
        .into_response()
}

async fn fake_provider() -> String {
    let app = Router::new()
        .route("/v1/images/edits", post(edits))
        .route("/v1/chat/completions", post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn provider(base_url: String, key: &str) -> Provider {
    Provider::new(ProviderConfig {
        base_url,
        api_key: key.into(),
        image_model: "gpt-image-1".into(),
        text_model: "gpt-4.1-mini".into(),
        timeout: Duration::from_millis(800),
    })
    .expect("client")
}

fn png() -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]))
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

#[tokio::test]
async fn image_edits_come_back_tagged_as_ai_generated() {
    let p = provider(fake_provider().await, KEY);
    let jpeg = p
        .edit_image(png(), "the ring on marble", "1024x1024")
        .await
        .expect("edit");
    assert!(
        jpeg.windows(TRAINED_ALGORITHMIC_MEDIA.len())
            .any(|w| w == TRAINED_ALGORITHMIC_MEDIA.as_bytes())
    );
    let img = image::load_from_memory(&jpeg).expect("still a valid JPEG");
    assert_eq!((img.width(), img.height()), (1024, 1024));
}

#[tokio::test]
async fn errors_say_whether_to_retry() {
    let base = fake_provider().await;
    let p = provider(base.clone(), KEY);
    let cases = [("[429]", true), ("[500]", true), ("[refuse]", false)];
    for (marker, retryable) in cases {
        let e = p
            .edit_image(png(), &format!("scene {marker}"), "1024x1024")
            .await
            .expect_err(marker);
        assert_eq!(e.is_retryable(), retryable, "{marker}: {e}");
    }
    let e = provider(base.clone(), "sk-wrong")
        .edit_image(png(), "x", "1024x1024")
        .await
        .expect_err("bad key");
    assert!(
        matches!(e, ProviderError::Permanent(ref m) if m.contains("401")),
        "{e}"
    );
    let schema = json!({"type": "object"});
    let e = p
        .chat_json("sys", "copy [refuse]", "copy", schema.clone())
        .await
        .expect_err("refusal");
    assert!(
        matches!(e, ProviderError::Permanent(ref m) if m.contains("refused")),
        "{e}"
    );
    let e = p
        .chat_json("sys", "copy [slow]", "copy", schema.clone())
        .await
        .expect_err("timeout");
    assert!(e.is_retryable(), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let e = provider(format!("http://{closed}"), KEY)
        .chat_json("s", "u", "n", schema)
        .await
        .expect_err("down");
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test]
async fn chat_returns_the_schema_json() {
    let p = provider(fake_provider().await, KEY);
    let v = p
        .chat_json(
            "You write jewelry copy.",
            "Aurora Solitaire",
            "copy",
            json!({"type": "object"}),
        )
        .await
        .expect("chat");
    assert_eq!(v["title"], "Aurora Solitaire");
}

fn sample_spec(notes: &str) -> kiln_core::ProductSpec {
    let mut v: Value = serde_json::from_str(kiln_assets::sample::SPEC_JSON).expect("sample spec");
    v["notes"] = json!(notes);
    kiln_core::ProductSpec::from_json(v.to_string().as_bytes()).expect("spec")
}

fn sample_upload() -> std::sync::Arc<[u8]> {
    kiln_assets::encode_jpeg(&kiln_assets::sample::ring(1200), 90)
        .expect("upload")
        .into()
}

#[tokio::test]
async fn the_ai_generator_writes_copy_within_limits_and_adds_a_tagged_scene() {
    use kiln_assets::{Generator, Role, Step};
    let generator = Generator::Ai(provider(fake_provider().await, KEY));
    let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Step>::new()));
    let seen = steps.clone();
    let assets = generator
        .generate(
            sample_upload(),
            &sample_spec("Cast in recycled gold."),
            kiln_core::Kit::Caratzon,
            std::sync::Arc::new(move |s| seen.lock().expect("lock").push(s)),
        )
        .await
        .expect("kit");

    // Progress counts the studio's 11 steps and the provider's 2, in order.
    let steps = steps.lock().expect("lock");
    let done: Vec<u32> = steps.iter().map(|s| s.done).collect();
    assert_eq!(done, (0..13).collect::<Vec<_>>());
    assert!(steps.iter().all(|s| s.total == 13));
    assert_eq!(steps[11].name, "ai copy");

    let scene = assets
        .iter()
        .find(|a| a.path == "lifestyle/ai-marble.jpg")
        .expect("AI scene");
    assert_eq!(scene.role, Role::LifestyleImage);
    assert!(
        scene
            .bytes
            .windows(TRAINED_ALGORITHMIC_MEDIA.len())
            .any(|w| w == TRAINED_ALGORITHMIC_MEDIA.as_bytes()),
        "the scene must declare trainedAlgorithmicMedia"
    );
    let img = image::load_from_memory(&scene.bytes).expect("scene decodes");
    assert_eq!((img.width(), img.height()), (1024, 1024));
    assert_eq!((scene.width, scene.height), (Some(1024), Some(1024)));
    // Catalog photos stay the studio's: no AI tag on the main image.
    let main = assets
        .iter()
        .find(|a| a.role == Role::MainImage)
        .expect("main");
    assert!(
        !main
            .bytes
            .windows(TRAINED_ALGORITHMIC_MEDIA.len())
            .any(|w| w == TRAINED_ALGORITHMIC_MEDIA.as_bytes())
    );

    let seo: Value = serde_json::from_slice(
        &assets
            .iter()
            .find(|a| a.path == "copy/seo.json")
            .expect("seo.json")
            .bytes,
    )
    .expect("seo.json parses");
    let title = seo["title"].as_str().expect("title");
    assert!(
        title.starts_with("Aurora Solitaire — a luminous"),
        "{title}"
    );
    assert!(
        title.chars().count() <= kiln_assets::copy::TITLE_MAX,
        "{title}"
    );
    let meta = seo["meta_description"].as_str().expect("meta");
    assert!(
        meta.chars().count() <= 160 && meta.starts_with("Hand-finished"),
        "{meta}"
    );
    let bullets = seo["bullets"].as_array().expect("bullets");
    assert_eq!(bullets.len(), 5);
    assert_eq!(bullets[0], "Hand-finished");
    assert!(
        seo["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 20))
    );
    let alts = seo["alt_text"].as_array().expect("alt text");
    assert!(
        alts.iter().any(|a| a["path"] == "lifestyle/ai-marble.jpg"
            && a["alt"].as_str().is_some_and(|t| t.chars().count() <= 125)),
        "{alts:?}"
    );
    let md = String::from_utf8(
        assets
            .iter()
            .find(|a| a.path == "copy/seo.md")
            .expect("seo.md")
            .bytes
            .clone(),
    )
    .expect("utf-8");
    assert!(md.contains(title) && md.contains("lifestyle/ai-marble.jpg"));
    assert!(generator.name().contains("+ai:gpt-4.1-mini/gpt-image-1"));
}

#[tokio::test]
async fn the_ai_generator_says_whether_a_failed_kit_can_be_retried() {
    use kiln_assets::Generator;
    let base = fake_provider().await;
    let generate = |key: &'static str, notes: &'static str| {
        let generator = Generator::Ai(provider(base.clone(), key));
        async move {
            generator
                .generate(
                    sample_upload(),
                    &sample_spec(notes),
                    kiln_core::Kit::Essentials,
                    std::sync::Arc::new(|_| {}),
                )
                .await
                .expect_err(notes)
        }
    };
    let e = generate(KEY, "[429]").await;
    assert!(e.is_retryable(), "{e}");
    assert_eq!(e.code(), "provider_unavailable");
    let e = generate(KEY, "[refuse]").await;
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(e.code(), "provider_refused");
    let e = generate("sk-wrong", "fine").await;
    assert!(!e.is_retryable(), "{e}");
}
