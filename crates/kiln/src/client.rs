//! `kiln ... --api URL --key KEY`: the CLI as a client of the HTTP API, for users who have an
//! API key and no database access.

use anyhow::{Context, bail};
use kiln_core::Kit;
use kiln_jobs::{JobStatus, Progress};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    pub fn new(base: &str, key: &str) -> anyhow::Result<Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("HTTP client")?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
        })
    }

    /// The JSON answer of a 2xx, else an error carrying the API's code and message.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the kiln API at {}", self.base))?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok((status, body));
        }
        let e = &body["error"];
        let mut msg = format!(
            "{} ({}, HTTP {status})",
            e["message"]
                .as_str()
                .unwrap_or("the API refused the request"),
            e["code"].as_str().unwrap_or("error")
        );
        if let Some(packs) = e["top_up_packs"].as_array() {
            let list: Vec<String> = packs
                .iter()
                .map(|p| {
                    format!(
                        "{} ({} credits)",
                        p["id"].as_str().unwrap_or("?"),
                        p["credits"]
                    )
                })
                .collect();
            msg.push_str(&format!("; top up with one of: {}", list.join(", ")));
        }
        bail!(msg)
    }

    /// Orders a kit; `(job, replayed)`.
    pub async fn create_kit(
        &self,
        design: Vec<u8>,
        file_name: String,
        spec: Vec<u8>,
        kit: Kit,
        key: &str,
    ) -> anyhow::Result<(Value, bool)> {
        let form = reqwest::multipart::Form::new()
            .part(
                "design",
                reqwest::multipart::Part::bytes(design).file_name(file_name),
            )
            .part("spec", reqwest::multipart::Part::bytes(spec))
            .text("kit", kit.as_str().to_owned());
        let req = self
            .http
            .post(format!("{}/v1/kits", self.base))
            .header("Idempotency-Key", key)
            .multipart(form);
        let (status, body) = self.send(req).await?;
        Ok((body["job"].clone(), status == 200))
    }

    /// The job; with `wait`, once it changes (long-poll) or after that many seconds.
    pub async fn job(&self, id: &str, wait: Option<u64>) -> anyhow::Result<Value> {
        let mut url = format!("{}/v1/jobs/{id}", self.base);
        if let Some(w) = wait {
            url.push_str(&format!("?wait={w}"));
        }
        Ok(self.send(self.http.get(url)).await?.1)
    }

    /// The job ordered under `key`, if any.
    pub async fn job_by_key(&self, key: &str) -> anyhow::Result<Option<Value>> {
        let encoded: String = key
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let req = self
            .http
            .get(format!("{}/v1/jobs?idempotency_key={encoded}", self.base));
        let (_, page) = self.send(req).await?;
        Ok(page["jobs"].as_array().and_then(|j| j.first()).cloned())
    }

    pub async fn balance(&self) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(format!("{}/v1/balance", self.base)))
            .await?
            .1)
    }
}

/// The status and progress in a job's JSON.
pub fn progress_of(j: &Value) -> (JobStatus, Progress) {
    let status = serde_json::from_value(j["status"].clone()).unwrap_or(JobStatus::Queued);
    let p = &j["progress"];
    let n = |v: &Value| u32::try_from(v.as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
    let progress = Progress {
        step: p["step"].as_str().map(str::to_owned),
        done: n(&p["done"]),
        total: n(&p["total"]),
    };
    (status, progress)
}
