//! `GET /v1/openapi.json`: the OpenAPI 3.1 document, derived at build time from the handlers'
//! `#[utoipa::path]` annotations and the types they read and write (utoipa), never by hand.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, schema::Schema};

use crate::{Api, admin, assets, holds, observe};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln",
        description = "Asset kits for jewelry designs, billed in Studio Credits: accounts and \
                       balances, quotes, charges and top-ups, holds for tool calls, kit orders and \
                       their jobs and files. Errors are `{\"error\": {\"code\", \"message\", ...}}`; \
                       anything owned by another account is 404.",
    ),
    paths(
        crate::healthz,
        crate::readyz,
        observe::metrics,
        crate::prices,
        crate::create_account,
        crate::account,
        crate::balance,
        crate::ledger,
        crate::quote,
        crate::charge,
        crate::topup,
        holds::create,
        holds::get,
        holds::capture,
        holds::void,
        crate::create_kit,
        crate::jobs,
        crate::job,
        crate::cancel,
        assets::assets,
        assets::object,
        admin::set_plan,
        admin::grant,
    ),
    modifiers(&ApiKey),
    tags(
        (name = "service", description = "liveness, readiness, metrics"),
        (name = "credits", description = "prices, balances, the journal, quotes, charges, top-ups"),
        (name = "holds", description = "credits held for a tool call, then captured or voided"),
        (name = "kits", description = "kit orders, their jobs and their files"),
        (name = "admin", description = "operator actions (admin API keys)"),
    )
)]
struct Doc;

/// `Authorization: Bearer <api key>`.
struct ApiKey;

impl utoipa::Modify for ApiKey {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("an API key, shown once when the account is opened"))
                        .build(),
                ),
            );
    }
}

/// The document, as JSON, naming the top-up packs `pricing` sells (they are configuration, so
/// the one thing the types cannot say).
pub fn document(pricing: &kiln_core::Pricing) -> String {
    let mut doc = Doc::openapi();
    let packs: Vec<&str> = pricing.packs().iter().map(|p| p.id.as_str()).collect();
    let body = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("TopUpBody"));
    if let Some(RefOr::T(Schema::Object(body))) = body
        && let Some(RefOr::T(Schema::Object(pack))) = body.properties.get_mut("pack")
    {
        pack.enum_values = Some(packs.into_iter().map(Into::into).collect());
    }
    doc.to_pretty_json().expect("the document serialises")
}

pub(crate) async fn openapi_json(State(api): State<Api>) -> Response {
    (
        [("content-type", "application/json")],
        api.openapi.to_string(),
    )
        .into_response()
}
