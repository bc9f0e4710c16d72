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
    let (mut prompt, mut image_len) = (String::new(), 0);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("prompt") => prompt = field.text().await.unwrap_or_default(),
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
    let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 180, 120]));
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
    let message = if user.contains("[refuse]") {
        json!({"role": "assistant", "content": null, "refusal": "I can't help with that."})
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
    assert_eq!((img.width(), img.height()), (64, 64));
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
