//! Operator actions (admin API keys only): moving an account to another plan, granting credits.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_core::{AccountId, Credits, PlanId};
use serde::Deserialize;

use crate::error::ErrorBody;
use crate::{Admin, Api, ApiError, Body};

fn account_id(s: &str) -> Result<AccountId, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("account"))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanBody {
    plan: PlanId,
    /// Enterprise only: the negotiated monthly credits.
    monthly_allowance: Option<Credits>,
}

/// `PUT /v1/admin/accounts/{id}/plan`: the account on its new plan.
#[utoipa::path(
    put,
    path = "/v1/admin/accounts/{id}/plan",
    operation_id = "set_plan",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the account's id (a ULID)")),
    request_body = PlanBody,
    responses(
        (status = 200, description = "the account on its new plan", body = kiln_ledger::Account),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 403, description = "`forbidden`: the API key is not an admin's", body = ErrorBody),
        (status = 404, description = "no such account", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
pub(crate) async fn set_plan(
    State(api): State<Api>,
    Admin(_): Admin,
    Path(id): Path<String>,
    Body(b): Body<PlanBody>,
) -> Result<Json<kiln_ledger::Account>, ApiError> {
    let a = api
        .queue
        .ledger()
        .set_plan(account_id(&id)?, b.plan, b.monthly_allowance)
        .await?;
    Ok(Json(a))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantBody {
    credits: Credits,
    /// Why, unique: the same reference again returns the same grant.
    reference: String,
}

/// `POST /v1/admin/accounts/{id}/grants`: credits that never expire, idempotent by reference.
#[utoipa::path(
    post,
    path = "/v1/admin/accounts/{id}/grants",
    operation_id = "grant_credits",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the account's id (a ULID)")),
    request_body = GrantBody,
    responses(
        (status = 201, description = "the grant (or the one this reference already made)", body = kiln_ledger::Grant),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 403, description = "`forbidden`: the API key is not an admin's", body = ErrorBody),
        (status = 404, description = "no such account", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the reference was used for another grant", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
pub(crate) async fn grant(
    State(api): State<Api>,
    Admin(_): Admin,
    Path(id): Path<String>,
    Body(b): Body<GrantBody>,
) -> Result<(StatusCode, Json<kiln_ledger::Grant>), ApiError> {
    let g = api
        .queue
        .ledger()
        .admin_grant(account_id(&id)?, b.credits, &b.reference)
        .await?;
    Ok((StatusCode::CREATED, Json(g)))
}
