//! Operator actions (admin API keys only): moving an account to another plan, granting credits.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_core::{AccountId, Credits, PlanId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Admin, Api, ApiError, Body};

fn account_id(s: &str) -> Result<AccountId, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("account"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlanBody {
    plan: PlanId,
    /// Enterprise only: the negotiated monthly credits.
    monthly_allowance: Option<Credits>,
}

/// `PUT /v1/admin/accounts/{id}/plan`: the account on its new plan.
pub(crate) async fn set_plan(
    State(api): State<Api>,
    Admin(_): Admin,
    Path(id): Path<String>,
    Body(b): Body<PlanBody>,
) -> Result<Json<Value>, ApiError> {
    let a = api
        .queue
        .ledger()
        .set_plan(account_id(&id)?, b.plan, b.monthly_allowance)
        .await?;
    Ok(Json(json!(a)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantBody {
    credits: Credits,
    /// Why, unique: the same reference again returns the same grant.
    reference: String,
}

/// `POST /v1/admin/accounts/{id}/grants`: credits that never expire, idempotent by reference.
pub(crate) async fn grant(
    State(api): State<Api>,
    Admin(_): Admin,
    Path(id): Path<String>,
    Body(b): Body<GrantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let g = api
        .queue
        .ledger()
        .admin_grant(account_id(&id)?, b.credits, &b.reference)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(g))))
}
