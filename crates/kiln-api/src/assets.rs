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
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ErrorBody;
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

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/assets",
    operation_id = "job_assets",
    tag = "kits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the job's id (a ULID)")),
    responses(
        (status = 200, description = "the manifest, each asset with a URL valid for an hour", body = AssetsView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such job of the caller's", body = ErrorBody),
        (status = 409, description = "`not_ready`: the job has not succeeded; `status` says where it is", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: try again", body = ErrorBody),
    )
)]
pub(crate) async fn assets(
    State(api): State<Api>,
    Caller(a): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<AssetsView>, ApiError> {
    let id: JobId = id.parse().map_err(|_| ApiError::not_found("job"))?;
    observe::record("job_id", &id);
    let job = kiln_jobs::read_job(&api.reads, &id)
        .await?
        .filter(|j| j.account_id == a.id)
        .ok_or_else(|| ApiError::not_found(format_args!("job {id}")))?;
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
    let mut manifest: AssetsView =
        serde_json::from_slice(&raw).map_err(|e| ApiError::internal(&e))?;
    let now = SystemTime::now();
    let base = request_base(&headers);
    let sign = async |key: &str| {
        let k = ObjectKey::parse(key).map_err(|e| ApiError::internal(&e))?;
        let url = api
            .storage
            .presign_get(&k, now, URL_TTL)
            .await
            .map_err(storage_error)?;
        Ok::<_, ApiError>(if url.starts_with('/') {
            format!("{base}{url}")
        } else {
            url
        })
    };
    for asset in &mut manifest.assets {
        asset.url = sign(&asset.key).await?;
    }
    let expires = kiln_core::Timestamp::from_millis(
        kiln_core::Timestamp::now().millis() + i64::try_from(URL_TTL.as_millis()).unwrap_or(0),
    );
    manifest.manifest_url = sign(&manifest_key).await?;
    manifest.urls_expire_at = expires.rfc3339();
    Ok(Json(manifest))
}

/// A finished kit's manifest (`manifest.json`) with a signed URL for each file.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct AssetsView {
    job: String,
    kit: kiln_core::Kit,
    /// Which generator made the kit: `kiln-studio/1`, or `kiln-studio/1+ai:<models>`.
    generator: String,
    assets: Vec<SignedAsset>,
    /// The manifest itself.
    #[serde(default)]
    manifest_url: String,
    /// When the URLs stop working (RFC 3339).
    #[serde(default)]
    #[schema(format = DateTime)]
    urls_expire_at: String,
}

/// One file of a kit.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct SignedAsset {
    key: String,
    /// What the file is for: `main_image`, `line_sheet`, `listing_copy` ...
    role: String,
    content_type: String,
    bytes: u64,
    width: Option<u32>,
    height: Option<u32>,
    sha256: String,
    alt: Option<String>,
    /// The image checks it passed (sizes, background, fill), as measured.
    #[schema(value_type = Option<Object>)]
    quality: Option<Value>,
    /// On the cut-out (`cutout_image`): which cut-out made it — `method` (`colour` or
    /// `learned_and_colour`), `model` and `model_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    cutout: Option<Value>,
    /// Valid until `urls_expire_at`.
    #[serde(default)]
    url: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Signed {
    expires: Option<u64>,
    signature: Option<String>,
}

/// The local store's signed URLs. No API key: the signature is the permission.
#[utoipa::path(
    get,
    path = "/v1/objects/{key}",
    operation_id = "get_object",
    tag = "kits",
    params(("key" = String, Path, description = "the object's key"), Signed),
    responses(
        (status = 200, description = "the file", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 403, description = "`url_expired` or `bad_signature`", body = ErrorBody),
        (status = 404, description = "no such object, or not the local store", body = ErrorBody),
    )
)]
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
