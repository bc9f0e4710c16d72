//! A finished kit's files: `GET /v1/jobs/{id}/assets` answers the manifest with a signed,
//! expiring URL per asset (S3: presigned GETs; the local store: HMAC-signed URLs that kiln
//! serves itself at `GET /v1/objects/{key}`).

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_jobs::{JobId, JobStatus};
use kiln_storage::{ObjectKey, Storage, StorageError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Api, ApiError, Caller, observe};

/// How long an asset URL works.
pub const URL_TTL: Duration = Duration::from_secs(3600);

fn storage_error(e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound(_) => ApiError::not_found("object"),
        StorageError::Expired => ApiError::new(
            StatusCode::FORBIDDEN,
            "url_expired",
            "this link has expired: ask for the assets again for a fresh one",
        ),
        StorageError::BadSignature | StorageError::Key(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "this link is not valid",
        ),
        e if e.is_retryable() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            "storage is unavailable; try again",
        ),
        other => ApiError::internal(&other),
    }
}

/// `scheme://host` the request came to, for the local store's relative URLs.
fn request_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{proto}://{host}")
}

pub(crate) async fn assets(
    State(api): State<Api>,
    Caller(a): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let id: JobId = id.parse().map_err(|_| ApiError::not_found("job"))?;
    observe::record("job_id", &id);
    let mut tx = api.queue.ledger().db().begin_read().await?;
    let job = kiln_jobs::job(&mut tx, &id)
        .await?
        .filter(|j| j.account_id == a.id)
        .ok_or_else(|| ApiError::not_found(format_args!("job {id}")))?;
    drop(tx);
    let manifest_key = match (&job.status, &job.manifest_key) {
        (JobStatus::Succeeded, Some(k)) => k.clone(),
        (status, _) => {
            let mut e = ApiError::new(
                StatusCode::CONFLICT,
                "not_ready",
                format!("job {id} is {status}: its assets exist once it has succeeded"),
            );
            e.extra.insert("status".into(), json!(status));
            return Err(e);
        }
    };
    let key = ObjectKey::parse(&manifest_key).map_err(|e| ApiError::internal(&e))?;
    let raw = api.storage.get(&key).await.map_err(storage_error)?;
    let mut manifest: Value = serde_json::from_slice(&raw).map_err(|e| ApiError::internal(&e))?;
    let now = SystemTime::now();
    let base = request_base(&headers);
    let sign = |key: &str| {
        let storage = api.storage.clone();
        let key = key.to_owned();
        let base = base.clone();
        async move {
            let k = ObjectKey::parse(&key).map_err(|e| ApiError::internal(&e))?;
            let url = storage
                .presign_get(&k, now, URL_TTL)
                .await
                .map_err(storage_error)?;
            Ok::<_, ApiError>(if url.starts_with('/') {
                format!("{base}{url}")
            } else {
                url
            })
        }
    };
    if let Some(list) = manifest.get_mut("assets").and_then(Value::as_array_mut) {
        for asset in list.iter_mut() {
            let Some(k) = asset.get("key").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let url = sign(&k).await?;
            asset["url"] = url.into();
        }
    }
    let expires = kiln_core::Timestamp::from_millis(
        kiln_core::Timestamp::now().millis() + i64::try_from(URL_TTL.as_millis()).unwrap_or(0),
    );
    manifest["manifest_url"] = sign(&manifest_key).await?.into();
    manifest["urls_expire_at"] = expires.rfc3339().into();
    Ok(Json(manifest))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Signed {
    expires: Option<u64>,
    signature: Option<String>,
}

/// The local store's signed URLs. No API key: the signature is the permission.
pub(crate) async fn object(
    State(api): State<Api>,
    Path(key): Path<String>,
    query: Result<Query<Signed>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Storage::Local(store) = &api.storage else {
        return Err(ApiError::not_found("route"));
    };
    let bad = || storage_error(StorageError::BadSignature);
    let Ok(Query(q)) = query else {
        return Err(bad());
    };
    let (Some(expires), Some(sig)) = (q.expires, q.signature) else {
        return Err(bad());
    };
    let key = store
        .verify(&key, expires, &sig, SystemTime::now())
        .map_err(storage_error)?;
    let bytes = store.get(&key).await.map_err(storage_error)?;
    let content_type = content_type(key.as_str());
    Ok((
        StatusCode::OK,
        [
            ("content-type", content_type),
            ("cache-control", "private, max-age=3600"),
            ("x-content-type-options", "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

fn content_type(key: &str) -> &'static str {
    match key.rsplit('.').next().unwrap_or_default() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "md" => "text/markdown; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        _ => "application/octet-stream",
    }
}
