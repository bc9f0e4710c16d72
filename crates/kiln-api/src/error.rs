//! The one error shape at the HTTP edge: `{"error": {"code", "message", ...}}` with a stable
//! `code`. Internal failures are logged with a request id and answered with that id only.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_jobs::JobsError;
use kiln_ledger::LedgerError;
use serde_json::{Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, for programs: `unauthorized`, `forbidden`, `not_found`, `bad_request`,
    /// `insufficient_credits`, `internal` ...
    pub code: &'static str,
    pub message: String,
    /// More fields of the error object (e.g. `needed`, `available`, `shortfall`).
    pub extra: serde_json::Map<String, Value>,
    /// Seconds, sent as `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: serde_json::Map::new(),
            retry_after: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send your API key as `Authorization: Bearer <key>`",
        )
    }

    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Something on our side failed: logged in full under a request id, the client gets the id.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        let request_id =
            crate::observe::request_id().unwrap_or_else(|| ulid::Ulid::generate().to_string());
        tracing::error!(request_id, "internal error: {cause}");
        let mut e = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("something went wrong on our side (request {request_id})"),
        );
        e.extra.insert("request_id".into(), request_id.into());
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.extra;
        body.insert("code".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        let mut resp = (self.status, Json(json!({ "error": body }))).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> ApiError {
        match e {
            LedgerError::AccountNotFound(_)
            | LedgerError::ReservationNotFound(_)
            | LedgerError::HoldNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            LedgerError::InsufficientCredits {
                needed,
                available,
                shortfall,
            } => {
                let mut err = ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_credits",
                    format!("{needed} credits needed, {available} available"),
                );
                err.extra.insert("needed".into(), json!(needed));
                err.extra.insert("available".into(), json!(available));
                err.extra.insert("shortfall".into(), json!(shortfall));
                err
            }
            LedgerError::IdempotencyConflict { .. } | LedgerError::PaymentRefConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", e.to_string())
            }
            LedgerError::AlreadyResolved { .. } => {
                ApiError::new(StatusCode::CONFLICT, "already_resolved", e.to_string())
            }
            LedgerError::HoldResolved { status, .. } => {
                let mut err = ApiError::new(StatusCode::CONFLICT, "hold_resolved", e.to_string());
                err.extra.insert("status".into(), json!(status));
                err
            }
            LedgerError::HoldExpired(_) => {
                ApiError::new(StatusCode::CONFLICT, "hold_expired", e.to_string())
            }
            LedgerError::UnknownPack { .. }
            | LedgerError::BadKey { .. }
            | LedgerError::ReservedKey(_)
            | LedgerError::BadHoldExpiry { .. }
            | LedgerError::InvalidAmount(_)
            | LedgerError::AllowanceRequired(_)
            | LedgerError::AllowanceNotAllowed(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.to_string(),
            ),
            other => ApiError::internal(&other),
        }
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> ApiError {
        match e {
            JobsError::Ledger(l) => l.into(),
            JobsError::JobNotFound(id) => ApiError::not_found(format_args!("job {id}")),
            JobsError::JobNotCancellable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_cancellable", e.to_string())
            }
            JobsError::BadId { .. } => ApiError::bad_request(e.to_string()),
            other => ApiError::internal(&other),
        }
    }
}

/// The one error shape, as the OpenAPI document describes it: what `into_response` writes.
#[allow(dead_code)]
#[derive(Debug, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorObject,
}

/// `code` and `message` always; the other fields where the code has them.
#[allow(dead_code)]
#[derive(Debug, utoipa::ToSchema)]
pub(crate) struct ErrorObject {
    /// Stable, for programs: `unauthorized`, `forbidden`, `not_found`, `bad_request`,
    /// `invalid_request`, `insufficient_credits`, `idempotency_conflict`, `rate_limited`,
    /// `upload_too_large`, `unsupported_media_type`, `not_cancellable`, `not_ready`,
    /// `hold_resolved`, `hold_expired`, `url_expired`, `bad_signature`, `storage_unavailable`,
    /// `internal` ...
    code: String,
    /// For people.
    message: String,
    /// 402: credits the action costs.
    needed: Option<kiln_core::Credits>,
    /// 402: credits the account has.
    available: Option<kiln_core::Credits>,
    /// 402: `needed - available`.
    shortfall: Option<kiln_core::Credits>,
    /// 402: the packs on sale.
    top_up_packs: Option<Vec<kiln_core::TopUpPack>>,
    /// 422: the request field at fault.
    field: Option<String>,
    /// 409: where the job or hold stands.
    status: Option<String>,
    /// 500: quote it to support; the cause is logged under it.
    request_id: Option<String>,
    /// 503 (`/readyz`): whether each dependency answered.
    database: Option<bool>,
    storage: Option<bool>,
}
