//! Holds for tool calls (DESIGN.md §6): `POST /v1/holds` checks and holds the credits before an
//! image or video tool runs, `capture` charges them when it has run, `void` gives them back; a
//! hold nobody resolves is expired by the maintenance loop. Each resolves once; the same
//! resolution again is a no-op.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_core::Action;
use kiln_ledger::{Hold, HoldId, HoldStatus};
use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::{Api, ApiError, Body, Caller, with_top_up_packs};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoldBody {
    action: Action,
    #[schema(min_length = 1, max_length = 200)]
    idempotency_key: String,
    /// Seconds until an unresolved hold is voided: 1 to 86400, default 900.
    expires_in_s: Option<i64>,
}

/// The hold JSON.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct HoldView {
    id: HoldId,
    action: Action,
    /// Credits held (charged once captured).
    amount: kiln_core::Credits,
    status: HoldStatus,
    idempotency_key: String,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    expires_at: String,
    #[schema(format = DateTime)]
    resolved_at: Option<String>,
}

impl From<Hold> for HoldView {
    fn from(h: Hold) -> HoldView {
        HoldView {
            id: h.id,
            action: h.action,
            amount: h.amount,
            status: h.status,
            idempotency_key: h.idempotency_key,
            created_at: h.created_at.rfc3339(),
            expires_at: h.expires_at.rfc3339(),
            resolved_at: h.resolved_at.map(|t| t.rfc3339()),
        }
    }
}

fn hold_id(s: &str) -> Result<HoldId, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("hold"))
}

/// 201 with a new hold, 200 with the one this key already made; 402 if the account is short.
#[utoipa::path(
    post,
    path = "/v1/holds",
    operation_id = "create_hold",
    tag = "holds",
    security(("api_key" = [])),
    request_body = HoldBody,
    responses(
        (status = 201, description = "held", body = HoldView),
        (status = 200, description = "the hold this key already made", body = HoldView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`: `needed`, `available`, `shortfall` and the `top_up_packs` that would cover it", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the key was used for another request", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
        (status = 429, description = "too many submissions: `Retry-After` says when to try again", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(api): State<Api>,
    Caller(a): Caller,
    Body(b): Body<HoldBody>,
) -> Result<(StatusCode, Json<HoldView>), ApiError> {
    api.limit(a.id)?;
    let ttl_ms = b.expires_in_s.map(|s| s.saturating_mul(1000));
    let (hold, new) = api
        .queue
        .ledger()
        .create_hold(a.id, b.action, &b.idempotency_key, ttl_ms)
        .await
        .map_err(|e| with_top_up_packs(&api, e))?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(hold.into())))
}

#[utoipa::path(
    get,
    path = "/v1/holds/{id}",
    operation_id = "get_hold",
    tag = "holds",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the hold's id (a ULID)")),
    responses(
        (status = 200, description = "the hold", body = HoldView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such hold of the caller's", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(api): State<Api>,
    Caller(a): Caller,
    Path(id): Path<String>,
) -> Result<Json<HoldView>, ApiError> {
    let h = api.queue.ledger().hold(Some(a.id), hold_id(&id)?).await?;
    Ok(Json(h.into()))
}

async fn resolve(
    api: &Api,
    caller: &Caller,
    id: &str,
    to: HoldStatus,
) -> Result<Json<HoldView>, ApiError> {
    let h = api
        .queue
        .ledger()
        .resolve_hold(caller.0.id, hold_id(id)?, to)
        .await?;
    Ok(Json(h.into()))
}

#[utoipa::path(
    post,
    path = "/v1/holds/{id}/capture",
    operation_id = "capture_hold",
    tag = "holds",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the hold's id (a ULID)")),
    responses(
        (status = 200, description = "captured: the credits are charged (again: a no-op)", body = HoldView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such hold of the caller's", body = ErrorBody),
        (status = 409, description = "`hold_resolved` (voided or expired; `status` says which) or `hold_expired`", body = ErrorBody),
    )
)]
pub(crate) async fn capture(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HoldView>, ApiError> {
    resolve(&api, &caller, &id, HoldStatus::Captured).await
}

#[utoipa::path(
    post,
    path = "/v1/holds/{id}/void",
    operation_id = "void_hold",
    tag = "holds",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the hold's id (a ULID)")),
    responses(
        (status = 200, description = "voided: the credits are back (again: a no-op)", body = HoldView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such hold of the caller's", body = ErrorBody),
        (status = 409, description = "`hold_resolved`: it was captured or expired; `status` says which", body = ErrorBody),
    )
)]
pub(crate) async fn void(
    State(api): State<Api>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HoldView>, ApiError> {
    resolve(&api, &caller, &id, HoldStatus::Voided).await
}
