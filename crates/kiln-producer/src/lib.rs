//! Intake of a kit order. Everything that can be checked is checked before any credit is
//! touched: size, format (sniffed from the bytes), the header's dimensions, the product spec, and
//! the whole image decoded.
//! Then the upload is stored (content-addressed, so a retried request writes the same key) and
//! ONE transaction reserves the credits, inserts the `kit_jobs` row and pushes the apalis task.
//! A replayed idempotency key returns the same job and reserves nothing more.

use bytes::Bytes;
use kiln_assets::{AssetError, Limits};
use kiln_core::{AccountId, Kit, ProductSpec};
use kiln_jobs::{JobsError, KitJob, NewJob, Queue};
use kiln_ledger::LedgerError;
use kiln_storage::{ObjectKey, Storage, StorageError};

/// Deliveries of one job before it is failed and its credits released.
pub const MAX_ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntakeError {
    /// The upload itself is refused (too large, not an image, undecodable header, too small).
    #[error(transparent)]
    Upload(AssetError),
    #[error("invalid product spec: {0}")]
    Spec(#[from] kiln_core::SpecError),
    #[error("idempotency key must be 1-196 printable characters")]
    BadKey,
    #[error(transparent)]
    Jobs(#[from] JobsError),
    #[error("could not store the upload: {0}")]
    Storage(#[from] StorageError),
}

impl IntakeError {
    /// A stable code for clients; the API maps these to HTTP statuses.
    pub fn code(&self) -> &'static str {
        match self {
            IntakeError::Upload(e) => e.code(),
            IntakeError::Spec(_) => "invalid_spec",
            IntakeError::BadKey => "invalid_idempotency_key",
            IntakeError::Jobs(JobsError::Ledger(e)) => match e {
                LedgerError::InsufficientCredits { .. } => "insufficient_credits",
                LedgerError::IdempotencyConflict { .. } => "idempotency_conflict",
                LedgerError::AccountNotFound(_) => "account_not_found",
                _ => "internal",
            },
            IntakeError::Jobs(_) => "internal",
            IntakeError::Storage(e) if e.is_retryable() => "storage_unavailable",
            IntakeError::Storage(_) => "storage_error",
        }
    }
}

/// One kit order.
#[derive(Clone, Debug)]
pub struct Order<'a> {
    pub account: AccountId,
    pub kit: Kit,
    pub design: Bytes,
    pub spec_json: &'a [u8],
    pub idempotency_key: &'a str,
    /// Deliveries before the job is failed and released; `MAX_ATTEMPTS` unless configured.
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct Accepted {
    pub job: KitJob,
    /// The idempotency key had been used for this same order: the existing job is returned.
    pub replayed: bool,
}

/// Takes an order: cheap checks, store the upload, then reserve + enqueue in one transaction.
pub async fn intake(
    queue: &Queue,
    storage: &Storage,
    order: Order<'_>,
) -> Result<Accepted, IntakeError> {
    let key = order.idempotency_key;
    kiln_jobs::check_order_key(key).map_err(|_| IntakeError::BadKey)?;
    // The whole image, decoded once here (its header checks first): a truncated or garbled file
    // is refused now, before a credit is held, instead of failing in the worker. Off the async
    // threads: a 16 MP JPEG takes about 100 ms.
    let design = order.design.clone();
    let probe = tokio::task::spawn_blocking(move || {
        kiln_assets::decode(&design, &Limits::default()).map(|(probe, _)| probe)
    })
    .await
    .map_err(|e| IntakeError::Jobs(JobsError::Corrupt(format!("decode task: {e}"))))?
    .map_err(IntakeError::Upload)?;
    let spec = ProductSpec::from_json(order.spec_json)?;
    // Stored normalized, so a replay with the same spec compares equal however it was spaced.
    let spec_text = serde_json::to_string(&spec)
        .map_err(|e| IntakeError::Jobs(JobsError::Corrupt(format!("spec as JSON: {e}"))))?;
    let sha = kiln_assets::sha256_hex(&order.design);
    let upload =
        ObjectKey::upload(order.account, &sha, probe.extension()).map_err(StorageError::from)?;
    // The account must exist before anything is written for it.
    queue
        .ledger()
        .account(order.account)
        .await
        .map_err(JobsError::from)?;
    if storage.head(&upload).await?.is_none() {
        storage
            .put(&upload, order.design.clone(), probe.content_type())
            .await?;
    }
    let enqueued = kiln_jobs::submit(
        queue,
        &NewJob {
            account: order.account,
            kit: order.kit,
            idempotency_key: key,
            upload_key: upload.as_str(),
            spec: &spec_text,
            max_attempts: order.max_attempts.max(1),
        },
    )
    .await?;
    tracing::info!(job = %enqueued.job.id, kit = %order.kit, replayed = enqueued.replayed, "kit job accepted");
    Ok(Accepted {
        job: enqueued.job,
        replayed: enqueued.replayed,
    })
}
