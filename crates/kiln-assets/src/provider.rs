//! The AI provider behind the studio: OpenAI-compatible image edits and chat completions with a
//! JSON schema, over reqwest. Errors say whether a retry can help (timeouts, 429, 5xx) or not
//! (other 4xx, content refusals). Images it makes are tagged in their XMP metadata with the IPTC
//! DigitalSourceType `trainedAlgorithmicMedia`, which Google Merchant Center requires.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct ProviderConfig {
    /// e.g. `https://api.openai.com` (the `/v1/...` paths are appended).
    pub base_url: String,
    pub api_key: String,
    pub image_model: String,
    pub text_model: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"***")
            .field("image_model", &self.image_model)
            .field("text_model", &self.text_model)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// Worth retrying later: timeouts, connection failures, 429, 5xx.
    #[error("AI provider temporarily unavailable: {0}")]
    Retryable(String),
    /// Retrying the same request will not help: bad request, refused content, bad key.
    #[error("AI provider refused the request: {0}")]
    Permanent(String),
}

impl ProviderError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable(_))
    }
}

#[derive(Debug, Clone)]
pub struct Provider {
    client: reqwest::Client,
    cfg: ProviderConfig,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    code: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Sorts an HTTP failure by status and the provider's error code.
fn classify(status: u16, body: &str) -> ProviderError {
    let detail = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let code = detail
        .as_ref()
        .and_then(|d| d.code.clone().or(d.kind.clone()))
        .unwrap_or_default();
    let message = detail
        .and_then(|d| d.message)
        .unwrap_or_else(|| body.chars().take(200).collect());
    let text = format!("HTTP {status} {code}: {message}");
    match status {
        429 | 500..=599 | 408 => ProviderError::Retryable(text),
        _ => ProviderError::Permanent(text),
    }
}

fn transport(e: &reqwest::Error) -> ProviderError {
    if e.is_timeout() || e.is_connect() || e.is_request() {
        ProviderError::Retryable(format!("{e}"))
    } else {
        ProviderError::Permanent(format!("{e}"))
    }
}

impl Provider {
    pub fn new(cfg: ProviderConfig) -> Result<Provider, ProviderError> {
        // reqwest is built without a crypto provider of its own: rustls on ring, process-wide
        // (an error only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| ProviderError::Permanent(format!("HTTP client: {e}")))?;
        Ok(Provider { client, cfg })
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.base_url.trim_end_matches('/'))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        let resp = req
            .bearer_auth(&self.cfg.api_key)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(|e| transport(&e))?;
        if !(200..300).contains(&status) {
            return Err(classify(status, &body));
        }
        serde_json::from_str(&body)
            .map_err(|e| ProviderError::Permanent(format!("unreadable response: {e}")))
    }

    /// `POST /v1/images/edits`: the product photo (PNG) and a prompt; returns the first image,
    /// decoded from `b64_json`, tagged as AI-generated if it is a JPEG.
    pub async fn edit_image(
        &self,
        png: Vec<u8>,
        prompt: &str,
        size: &str,
    ) -> Result<Vec<u8>, ProviderError> {
        let part = reqwest::multipart::Part::bytes(png)
            .file_name("product.png")
            .mime_str("image/png")
            .map_err(|e| ProviderError::Permanent(e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("prompt", prompt.to_owned())
            .text("model", self.cfg.image_model.clone())
            .text("n", "1")
            .text("size", size.to_owned())
            .text("output_format", "jpeg");
        let v = self
            .send(
                self.client
                    .post(self.url("/v1/images/edits"))
                    .multipart(form),
            )
            .await?;
        let b64 = v["data"][0]["b64_json"]
            .as_str()
            .ok_or_else(|| ProviderError::Permanent("the response holds no image".into()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ProviderError::Permanent(format!("image is not base64: {e}")))?;
        Ok(if bytes.starts_with(&[0xFF, 0xD8]) {
            tag_ai_generated(&bytes)
        } else {
            bytes
        })
    }

    /// `POST /v1/chat/completions` with a strict JSON schema; returns the parsed JSON content.
    pub async fn chat_json(
        &self,
        system: &str,
        user: &str,
        name: &str,
        schema: Value,
    ) -> Result<Value, ProviderError> {
        let body = json!({
            "model": self.cfg.text_model,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "text", "text": user}]}
            ],
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "strict": true, "schema": schema}}
        });
        let v = self
            .send(
                self.client
                    .post(self.url("/v1/chat/completions"))
                    .json(&body),
            )
            .await?;
        let choice = &v["choices"][0];
        if choice["finish_reason"] == "content_filter" || choice["message"]["refusal"].is_string() {
            return Err(ProviderError::Permanent(format!(
                "content refused: {}",
                choice["message"]["refusal"]
                    .as_str()
                    .unwrap_or("content filter")
            )));
        }
        let content = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| ProviderError::Permanent("the response holds no content".into()))?;
        serde_json::from_str(content).map_err(|e| {
            ProviderError::Permanent(format!("content is not the requested JSON: {e}"))
        })
    }
}

/// The IPTC DigitalSourceType for content made by a trained model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// Inserts an XMP packet (APP1) right after the JPEG's SOI marker, declaring the image
/// `trainedAlgorithmicMedia`. Anything that is not a JPEG is returned unchanged.
pub fn tag_ai_generated(jpeg: &[u8]) -> Vec<u8> {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return jpeg.to_vec();
    }
    let xmp = format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\
<rdf:Description rdf:about=\"\" xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\" \
Iptc4xmpExt:DigitalSourceType=\"{TRAINED_ALGORITHMIC_MEDIA}\"/></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
    );
    let mut payload = b"http://ns.adobe.com/xap/1.0/\0".to_vec();
    payload.extend_from_slice(xmp.as_bytes());
    let len = u16::try_from(payload.len() + 2).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(jpeg.len() + payload.len() + 4);
    out.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}
