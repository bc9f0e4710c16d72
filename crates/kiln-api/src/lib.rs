//! kiln's HTTP API (DESIGN.md §6), on axum: the router over a job queue and an object store.
//! Every answer that is not a success has the one error shape (`error`). `Authorization: Bearer
//! <api key>` names the caller; anything owned by another account is 404, as if it did not
//! exist.
//!
//! - `lib`: the router, the caller extractors, accounts, balances, quotes, charges, kits, jobs
//! - `holds`: holds for tool calls
//! - `assets`: a kit's files behind signed URLs
//! - `admin`: operator actions
//! - `limit`: the per-account submission rate limit
//! - `observe`: request ids, spans, `/metrics`
//! - `openapi`: `/v1/openapi.json`, derived from the handlers and their types

mod admin;
mod assets;
mod error;
mod holds;
mod keys;
mod limit;
pub mod observe;
pub mod openapi;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use kiln_core::{Action, Credits, Kit, PlanId};
use kiln_jobs::{JobId, JobStatus, JobView, Queue};
use kiln_ledger::{Account, NewAccount};
use kiln_storage::Storage;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use error::ApiError;
use error::ErrorBody;

/// What the API is built from.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Deliveries of a kit job before it fails and releases.
    pub max_attempts: u32,
    /// Submissions (kit orders, holds) an account may send at once, then per minute.
    pub submit_burst: u32,
    pub submit_per_minute: u32,
}

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct Api {
    pub queue: Queue,
    pub storage: Storage,
    pub max_attempts: u32,
    limiter: std::sync::Arc<limit::RateLimiter>,
    metrics: std::sync::Arc<observe::Metrics>,
    /// `/v1/openapi.json`, with this server's price list in it.
    openapi: std::sync::Arc<str>,
    keys: std::sync::Arc<keys::KeyCache>,
    /// Status reads (polls, asset listings) on held connections.
    reads: kiln_ledger::ReadDb,
    /// More of `/metrics`: the in-process workers' own, when this server runs workers.
    extra_metrics: Option<ExtraMetrics>,
}

/// A writer of more Prometheus text, appended to `/metrics`.
#[derive(Clone)]
pub struct ExtraMetrics(pub std::sync::Arc<dyn Fn(&mut String) + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

/// Connections held for status reads: as many as a busy server polls at once on two cores.
const HELD_READERS: usize = 8;

impl Api {
    pub fn new(queue: Queue, storage: Storage, cfg: &ApiConfig) -> Api {
        Api {
            reads: kiln_ledger::ReadDb::new(queue.ledger().db(), HELD_READERS),
            openapi: openapi::document(queue.ledger().pricing()).into(),
            queue,
            storage,
            max_attempts: cfg.max_attempts,
            limiter: std::sync::Arc::new(limit::RateLimiter::new(
                cfg.submit_burst,
                cfg.submit_per_minute,
            )),
            metrics: std::sync::Arc::default(),
            keys: std::sync::Arc::default(),
            extra_metrics: None,
        }
    }

    /// Appends `extra`'s text to `/metrics`.
    #[must_use]
    pub fn with_metrics(mut self, extra: ExtraMetrics) -> Api {
        self.extra_metrics = Some(extra);
        self
    }

    /// One submission by `account`, or 429 with `Retry-After`.
    fn limit(&self, account: kiln_core::AccountId) -> Result<(), ApiError> {
        self.limiter.take(account).map_err(|wait| {
            self.metrics.rate_limited();
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many submissions: try again in {secs} s"),
            );
            e.retry_after = Some(secs);
            e
        })
    }
}

/// Every route, over `api`.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(web_page))
        .route("/metrics", get(observe::metrics))
        .route("/v1/openapi.json", get(openapi::openapi_json))
        .route("/v1/holds", post(holds::create))
        .route("/v1/holds/{id}", get(holds::get))
        .route("/v1/holds/{id}/capture", post(holds::capture))
        .route("/v1/holds/{id}/void", post(holds::void))
        .route("/v1/jobs/{id}/assets", get(assets::assets))
        .route("/v1/objects/{*key}", get(assets::object))
        .route("/v1/admin/accounts/{id}/plan", put(admin::set_plan))
        .route("/v1/admin/accounts/{id}/grants", post(admin::grant))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/prices", get(prices))
        .route("/v1/accounts", post(create_account))
        .route("/v1/account", get(account))
        .route("/v1/balance", get(balance))
        .route("/v1/ledger", get(ledger))
        .route("/v1/quotes", post(quote))
        .route("/v1/charges", post(charge))
        .route("/v1/topups", post(topup))
        .route(
            KITS_ROUTE,
            // Each field's limit is enforced while reading it (`read_field`); the whole form's
            // here, so a `Content-Length` over it is a 413 before anything is read.
            post(create_kit).layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT)),
        )
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            observe::layer,
        ))
        .with_state(api)
}

/// The account an API key belongs to.
#[derive(Clone, Debug)]
pub struct Caller(pub Account);

impl FromRequestParts<Api> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Caller, ApiError> {
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        let now = std::time::Instant::now();
        let found = match api.keys.get(key, now) {
            Some(a) => Some(a),
            None => {
                // On a task of its own: a lookup dropped mid-query when the client hangs up
                // could leave its pooled connection out of step with the server.
                let (ledger, owned) = (api.queue.ledger().clone(), key.to_owned());
                let found =
                    observe::detached(async move { ledger.account_by_api_key(&owned).await })
                        .await??;
                if let Some(a) = &found {
                    api.keys.put(key, a, now);
                }
                found
            }
        };
        match found {
            Some(a) => {
                observe::record("account_id", &a.id);
                Ok(Caller(a))
            }
            None => Err(ApiError::unauthorized()),
        }
    }
}

/// A JSON request body; anything that does not parse (or names unknown fields) is a 422 naming
/// the problem, in the one error shape.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<Api> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, api: &Api) -> Result<Body<T>, ApiError> {
        match Json::<T>::from_request(req, api).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.body_text(),
            )),
        }
    }
}

/// The caller, who must be an admin (403 otherwise).
#[derive(Debug)]
pub struct Admin(pub Account);

impl FromRequestParts<Api> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Admin, ApiError> {
        let Caller(a) = Caller::from_request_parts(parts, api).await?;
        if a.is_admin {
            Ok(Admin(a))
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this needs an admin account",
            ))
        }
    }
}

/// The web page: plain HTML, CSS and JS in one file, built into the binary; it talks to this
/// API with the key the user signs in with (kept in the tab's session storage only).
async fn web_page() -> impl axum::response::IntoResponse {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            (
                "content-security-policy",
                "default-src 'self'; img-src 'self' data: blob: https: http:; script-src 'unsafe-inline'; \
                 style-src 'unsafe-inline'; connect-src 'self' https: http:; frame-ancestors 'none'",
            ),
            ("x-content-type-options", "nosniff"),
        ],
        include_str!("web/index.html"),
    )
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses(
        (status = 200, description = "alive", body = Status),
    )
)]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// `{"status": "ok"}` (alive) or `{"status": "ready"}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Status {
    status: &'static str,
}

/// Ready when the database answers and the object store takes requests.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "the database and the object store answer", body = Status),
        (status = 503, description = "`not_ready`: `database` and `storage` say which is down", body = ErrorBody),
    )
)]
async fn readyz(State(api): State<Api>) -> Result<Json<Status>, ApiError> {
    let db = async {
        let mut tx = api.queue.ledger().db().begin_read().await?;
        kiln_jobs::queue_stats(&mut tx, api.queue.ledger().ctx().now).await?;
        Ok::<(), kiln_jobs::JobsError>(())
    }
    .await;
    let storage = api.storage.check().await;
    match (db, storage) {
        (Ok(()), Ok(())) => Ok(Json(Status { status: "ready" })),
        (db, storage) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "a dependency is not answering",
            );
            e.extra.insert("database".into(), json!(db.is_ok()));
            e.extra.insert("storage".into(), json!(storage.is_ok()));
            Err(e)
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/prices",
    tag = "credits",
    responses(
        (status = 200, description = "action prices, plans and top-up packs", body = kiln_core::Pricing),
    )
)]
async fn prices(State(api): State<Api>) -> Json<kiln_core::Pricing> {
    Json(api.queue.ledger().pricing().clone())
}

/// The caller's account, read afresh (the key lookup may be a few seconds old).
#[utoipa::path(
    get,
    path = "/v1/account",
    tag = "credits",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "the caller's account", body = kiln_ledger::Account),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
    )
)]
async fn account(State(api): State<Api>, Caller(a): Caller) -> Result<Json<Account>, ApiError> {
    Ok(Json(api.queue.ledger().account(a.id).await?))
}

#[utoipa::path(
    get,
    path = "/v1/balance",
    tag = "credits",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "spendable credits, by kind and expiry", body = kiln_ledger::Balance),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
    )
)]
async fn balance(
    State(api): State<Api>,
    Caller(a): Caller,
) -> Result<Json<kiln_ledger::Balance>, ApiError> {
    Ok(Json(api.queue.ledger().balance(a.id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct JobQuery {
    /// Seconds to wait for the job to change (at most 60); answered at once without it.
    #[param(maximum = 60)]
    wait: Option<u64>,
}

/// The longest long-poll.
const MAX_WAIT_S: u64 = 60;

/// The caller's job; with `?wait=S`, answered as soon as the job changes (or after S seconds,
/// unchanged). A finished job answers at once.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "get_job",
    tag = "kits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the job's id (a ULID)"), JobQuery),
    responses(
        (status = 200, description = "the job (with `wait`: once it changed, or when the wait is over)", body = kiln_jobs::JobView),
        (status = 400, description = "a query parameter that does not parse", body = ErrorBody),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such job of the caller's", body = ErrorBody),
    )
)]
async fn job(
    State(api): State<Api>,
    Caller(a): Caller,
    Path(id): Path<String>,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    // An id that is not a ULID names no job at all.
    let id: JobId = id.parse().map_err(|_| ApiError::not_found("job"))?;
    observe::record("job_id", &id);
    // Subscribed before the first read, so a change just after it is not missed.
    let mut changes = kiln_jobs::events::subscribe();
    let read = |api: &Api| {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let found = kiln_jobs::read_job(&api.reads, &id).await?;
            match found.filter(|j| j.account_id == a.id) {
                Some(j) => Ok(j.view()),
                None => Err(ApiError::not_found(format_args!("job {id}"))),
            }
        }
    };
    let first = read(&api).await?;
    let wait = q.wait.unwrap_or(0).min(MAX_WAIT_S);
    if wait == 0 || first.status.is_terminal() {
        return Ok(Json(first));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    // SQLite has no cross-process notifications: a worker in another process (or the
    // reconciler) changes jobs unannounced, so look again now and then as well.
    let recheck = match api.queue.ledger().db().backend() {
        kiln_ledger::Backend::Sqlite => std::time::Duration::from_secs(2),
        kiln_ledger::Backend::Postgres => std::time::Duration::from_secs(MAX_WAIT_S),
    };
    loop {
        let woke = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + recheck),
            changes.recv(),
        )
        .await;
        let relevant = match woke {
            Ok(Ok(changed)) => &*changed == id.as_str() || &*changed == kiln_jobs::events::ANY,
            // Lagged: some announcements were lost, ours may be among them.
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => true,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => false,
            Err(_) => true,
        };
        if relevant {
            let now = read(&api).await?;
            if now != first || tokio::time::Instant::now() >= deadline {
                return Ok(Json(now));
            }
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct JobsQuery {
    status: Option<JobStatus>,
    /// A job id: the page after it (jobs come newest first).
    before: Option<JobId>,
    limit: Option<u32>,
    /// Only the job ordered under this Idempotency-Key (none or one).
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct JobsPage {
    jobs: Vec<JobView>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<JobId>,
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "list_jobs",
    tag = "kits",
    security(("api_key" = [])),
    params(JobsQuery),
    responses(
        (status = 200, description = "the caller's jobs, newest first", body = JobsPage),
        (status = 400, description = "a query parameter that does not parse", body = ErrorBody),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
    )
)]
async fn jobs(
    State(api): State<Api>,
    Caller(a): Caller,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobsPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let mut tx = api.queue.ledger().db().begin_read().await?;
    if let Some(key) = &q.idempotency_key {
        // A key no order could have been given (empty, too long, control characters) names no
        // job; PostgreSQL would refuse a NUL in it outright.
        kiln_jobs::check_order_key(key)
            .map_err(|_| ApiError::bad_request("idempotency_key is not a key an order can have"))?;
        let found = kiln_jobs::job_by_key(&mut tx, a.id, key).await?;
        let jobs = found
            .filter(|j| q.status.is_none_or(|s| s == j.status))
            .map(|j| j.view());
        return Ok(Json(JobsPage {
            jobs: jobs.into_iter().collect(),
            next_before: None,
        }));
    }
    let mut found = kiln_jobs::jobs(&mut tx, a.id, q.status, q.before.as_ref(), limit + 1).await?;
    let more = found.len() > limit as usize;
    found.truncate(limit as usize);
    Ok(Json(JobsPage {
        next_before: more.then(|| found.last().map(|j| j.id.clone())).flatten(),
        jobs: found.iter().map(kiln_jobs::KitJob::view).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewAccountBody {
    email: Option<String>,
    plan: PlanId,
    /// `admin` or `member` (default).
    role: Option<String>,
    /// Enterprise accounts' monthly credits.
    monthly_allowance: Option<Credits>,
}

/// Admin: opens an account; its API key is in this answer only.
#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "admin",
    security(("api_key" = [])),
    request_body = NewAccountBody,
    responses(
        (status = 201, description = "the account and its API key, shown this once", body = kiln_ledger::CreatedAccount),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 403, description = "`forbidden`: the API key is not an admin's", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
async fn create_account(
    State(api): State<Api>,
    Admin(_): Admin,
    Body(b): Body<NewAccountBody>,
) -> Result<(StatusCode, Json<kiln_ledger::CreatedAccount>), ApiError> {
    let is_admin = match b.role.as_deref() {
        None | Some("member") => false,
        Some("admin") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("role must be admin or member, not {other:?}"),
            ));
        }
    };
    let created = api
        .queue
        .ledger()
        .create_account(NewAccount {
            plan: b.plan,
            is_admin,
            email: b.email,
            monthly_allowance: b.monthly_allowance,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LedgerQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

/// The caller's journal, oldest first, paged by sequence number.
#[utoipa::path(
    get,
    path = "/v1/ledger",
    operation_id = "journal",
    tag = "credits",
    security(("api_key" = [])),
    params(LedgerQuery),
    responses(
        (status = 200, description = "journal entries, oldest first", body = kiln_ledger::JournalPage),
        (status = 400, description = "a query parameter that does not parse", body = ErrorBody),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
    )
)]
async fn ledger(
    State(api): State<Api>,
    Caller(a): Caller,
    query: Result<Query<LedgerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<kiln_ledger::JournalPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let page = api
        .queue
        .ledger()
        .journal(a.id, q.after, q.limit.unwrap_or(100))
        .await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct QuoteBody {
    action: Action,
}

/// What an action would cost the caller now, before anything runs.
#[utoipa::path(
    post,
    path = "/v1/quotes",
    tag = "credits",
    security(("api_key" = [])),
    request_body = QuoteBody,
    responses(
        (status = 200, description = "the cost now, and whether the balance covers it", body = kiln_ledger::Quote),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
async fn quote(
    State(api): State<Api>,
    Caller(a): Caller,
    Body(b): Body<QuoteBody>,
) -> Result<Json<kiln_ledger::Quote>, ApiError> {
    Ok(Json(api.queue.ledger().quote(a.id, b.action).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    action: Action,
    #[schema(min_length = 1, max_length = 200)]
    idempotency_key: String,
}

/// Charges an action at once (Cara metering: charged on send), idempotent by key; 402 if short.
#[utoipa::path(
    post,
    path = "/v1/charges",
    tag = "credits",
    security(("api_key" = [])),
    request_body = ChargeBody,
    responses(
        (status = 201, description = "charged (or the charge this key already made)", body = kiln_ledger::Reservation),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`: `needed`, `available`, `shortfall` and the `top_up_packs` that would cover it", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the key was used for another request", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
async fn charge(
    State(api): State<Api>,
    Caller(a): Caller,
    Body(b): Body<ChargeBody>,
) -> Result<(StatusCode, Json<kiln_ledger::Reservation>), ApiError> {
    let r = api
        .queue
        .ledger()
        .charge(a.id, b.action, &b.idempotency_key)
        .await
        .map_err(|e| with_top_up_packs(&api, e))?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    /// A pack id from `/v1/prices` (the document lists the packs this server sells).
    pack: String,
    /// The payment's reference: the same one again returns the same grant.
    #[schema(min_length = 1, max_length = 200)]
    payment_ref: String,
}

/// Buys a top-up pack for the caller; idempotent by payment reference.
#[utoipa::path(
    post,
    path = "/v1/topups",
    tag = "credits",
    security(("api_key" = [])),
    request_body = TopUpBody,
    responses(
        (status = 201, description = "the pack's grant (or the one this payment reference already made)", body = kiln_ledger::Grant),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the payment reference was used for another pack or account", body = ErrorBody),
        (status = 422, description = "a body that does not parse, names unknown fields or breaks a rule; `field` names the culprit", body = ErrorBody),
    )
)]
async fn topup(
    State(api): State<Api>,
    Caller(a): Caller,
    Body(b): Body<TopUpBody>,
) -> Result<(StatusCode, Json<kiln_ledger::Grant>), ApiError> {
    let g = api
        .queue
        .ledger()
        .topup(a.id, &b.pack, &b.payment_ref)
        .await?;
    Ok((StatusCode::CREATED, Json(g)))
}

/// Cancels the caller's queued job and releases its credits; 409 once it has started.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancel_job",
    tag = "kits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the job's id (a ULID)")),
    responses(
        (status = 200, description = "cancelled, credits released", body = kiln_jobs::JobView),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 404, description = "no such job of the caller's", body = ErrorBody),
        (status = 409, description = "`not_cancellable`: the job has started or finished", body = ErrorBody),
    )
)]
async fn cancel(
    State(api): State<Api>,
    Caller(a): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id: JobId = id.parse().map_err(|_| ApiError::not_found("job"))?;
    let ledger = api.queue.ledger();
    let mut tx = ledger.db().begin().await?;
    let j = kiln_jobs::cancel(&mut tx, &ledger.ctx(), a.id, &id).await?;
    tx.commit().await?;
    kiln_jobs::events::changed(&id);
    Ok(Json(j.view()))
}

/// A 402 carries the packs that would cover it.
pub(crate) fn with_top_up_packs(api: &Api, e: kiln_ledger::LedgerError) -> ApiError {
    let mut err = ApiError::from(e);
    if err.code == "insufficient_credits" {
        err.extra.insert(
            "top_up_packs".into(),
            json!(api.queue.ledger().pricing().packs()),
        );
    }
    err
}

/// Where kits are ordered (`POST`, a multipart form).
pub(crate) const KITS_ROUTE: &str = "/v1/kits";

/// The largest design accepted: the decoder's own limit.
pub const MAX_DESIGN_BYTES: usize = 40 * 1024 * 1024;
/// The largest spec accepted.
const MAX_SPEC_BYTES: usize = 64 * 1024;
/// The largest kit order form: the design, the spec, the kit and the form's own framing.
const FORM_LIMIT: usize = MAX_DESIGN_BYTES + MAX_SPEC_BYTES + 64 * 1024;

/// Reads one multipart field, refusing it as soon as it passes `limit` bytes (413): the body is
/// never read further than the limit plus the chunk that crossed it.
async fn read_field(
    field: &mut axum::extract::multipart::Field<'_>,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        if out.len() + chunk.len() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload_too_large",
                format!("{what} is larger than {limit} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A multipart body that cannot be read: 413 when it is over the whole form's limit (a
/// `Content-Length` over it is refused before a byte is read), else 400.
fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!("the upload is larger than {FORM_LIMIT} bytes"),
        )
    } else {
        ApiError::bad_request(format!("the upload broke off: {}", e.body_text()))
    }
}

fn field_missing(name: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        format!("the form needs a `{name}` field"),
    );
    e.extra.insert("field".into(), name.into());
    e
}

/// Orders a kit: multipart `design` (the image), `spec` (JSON) and `kit` (essentials or
/// caratzon). Everything is checked before a credit is touched — size (413), format sniffed from
/// the bytes (415), the spec (422, naming the field), the whole image decoded (422) — and
/// nothing is charged for a refused request. `Idempotency-Key`: the same key for the same order
/// returns its job (200), for another order 409; without one, every request is a new order.
#[utoipa::path(
    post,
    path = "/v1/kits",
    operation_id = "order_kit",
    tag = "kits",
    security(("api_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key for the same order returns its job; without one every request is a new order")),
    request_body(content = KitForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, description = "queued: credits held until the kit is done", body = KitAccepted),
        (status = 200, description = "a replay: the job this key already ordered", body = KitAccepted),
        (status = 400, description = "a multipart body that does not parse", body = ErrorBody),
        (status = 401, description = "no API key, or one kiln does not know", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`: `needed`, `available`, `shortfall` and the `top_up_packs` that would cover it", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the key was used for another order", body = ErrorBody),
        (status = 413, description = "`upload_too_large`: the design is over 40 MB (or the spec over 64 KB)", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not multipart, or the design is not a JPEG, PNG or WebP", body = ErrorBody),
        (status = 422, description = "a bad spec or kit (`field` names it) or an image that does not decode", body = ErrorBody),
        (status = 429, description = "too many submissions: `Retry-After` says when to try again", body = ErrorBody),
        (status = 503, description = "`storage_unavailable`: try again", body = ErrorBody),
    )
)]
async fn create_kit(
    State(api): State<Api>,
    Caller(a): Caller,
    headers: axum::http::HeaderMap,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<KitAccepted>), ApiError> {
    api.limit(a.id)?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send multipart/form-data: {}", e.body_text()),
        )
    })?;
    let (mut design, mut spec, mut kit) = (None, None, None);
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or_default() {
            "design" => {
                design = Some(read_field(&mut field, MAX_DESIGN_BYTES, "the design").await?)
            }
            "spec" => spec = Some(read_field(&mut field, MAX_SPEC_BYTES, "the spec").await?),
            "kit" => kit = Some(read_field(&mut field, 64, "kit").await?),
            other => {
                let mut e = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!("unknown form field `{other}` (send design, spec and kit)"),
                );
                e.extra.insert("field".into(), other.to_owned().into());
                return Err(e);
            }
        }
    }
    let design = design.ok_or_else(|| field_missing("design"))?;
    let spec = spec.ok_or_else(|| field_missing("spec"))?;
    let kit = kit.ok_or_else(|| field_missing("kit"))?;
    let kit: Kit = std::str::from_utf8(&kit)
        .ok()
        .and_then(|k| k.trim().parse().ok())
        .ok_or_else(|| {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "kit must be essentials or caratzon",
            );
            e.extra.insert("field".into(), "kit".into());
            e
        })?;
    let key = match headers.get("idempotency-key") {
        None => format!("http-{}", ulid::Ulid::generate()),
        Some(v) => v.to_str().map(str::to_owned).map_err(|_| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_idempotency_key",
                "Idempotency-Key must be printable text",
            )
        })?,
    };
    // The order is stored and charged to its end even when the client hangs up now.
    let ordering = api.clone();
    let accepted = observe::detached(async move {
        kiln_producer::intake(
            &ordering.queue,
            &ordering.storage,
            kiln_producer::Order {
                account: a.id,
                kit,
                design: bytes::Bytes::from(design),
                spec_json: &spec,
                idempotency_key: &key,
                max_attempts: ordering.max_attempts,
            },
        )
        .await
    })
    .await?
    .map_err(|e| intake_error(&api, e))?;
    let status = if accepted.replayed {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(KitAccepted {
            job: accepted.job.view(),
            replayed: accepted.replayed,
        }),
    ))
}

/// A kit order's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct KitAccepted {
    job: JobView,
    /// True when the Idempotency-Key had already ordered this kit: nothing new was charged.
    replayed: bool,
}

/// The kit order form (what `POST /v1/kits` reads, field by field).
#[allow(dead_code)]
#[derive(Debug, utoipa::ToSchema)]
struct KitForm {
    /// The design photograph: JPEG, PNG or WebP, at most 40 MB.
    #[schema(value_type = String, format = Binary)]
    design: Vec<u8>,
    /// The product spec, JSON (DESIGN.md §6: `style_number`, `name`, `category` required).
    spec: String,
    kit: kiln_core::Kit,
}

fn intake_error(api: &Api, e: kiln_producer::IntakeError) -> ApiError {
    use kiln_producer::IntakeError;
    let code = e.code();
    let status = match code {
        "upload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unsupported_media_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "storage_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    match e {
        IntakeError::Upload(_) | IntakeError::Spec(_) | IntakeError::BadKey => {
            ApiError::new(status, code, e.to_string())
        }
        IntakeError::Jobs(kiln_jobs::JobsError::Ledger(l)) => with_top_up_packs(api, l),
        IntakeError::Jobs(j) => j.into(),
        IntakeError::Storage(s) if s.is_retryable() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            "storage is unavailable; try again",
        ),
        other => ApiError::internal(&other),
    }
}
