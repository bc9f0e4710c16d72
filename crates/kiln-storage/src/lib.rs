//! Object storage for kiln: uploads and kit assets, on S3 (or any S3-compatible server) or in a
//! local directory. Keys are typed (`uploads/<account>/<sha256>.<ext>`, `kits/<job>/<path>`),
//! errors say whether a retry can help, and both backends hand out signed, expiring GET URLs.

mod key;
mod local;
mod s3;

use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use key::{KeyError, ObjectKey};
pub use local::LocalStore;
pub use s3::{DEFAULT_TIMEOUT as S3_DEFAULT_TIMEOUT, S3Config, S3Store};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("storage refused the credentials: {0}")]
    Auth(String),
    #[error("storage is unavailable (retry later): {0}")]
    Unavailable(String),
    #[error("the signed URL has expired")]
    Expired,
    #[error("the signed URL is not valid")]
    BadSignature,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("storage configuration: {0}")]
    Config(String),
    #[error("storage error: {0}")]
    Other(String),
}

impl StorageError {
    /// Whether the same call may succeed later (network trouble, throttling, server errors).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// What is known about a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub content_type: Option<String>,
}

/// One object store, either backend.
#[derive(Clone, Debug)]
pub enum Storage {
    S3(S3Store),
    Local(LocalStore),
}

impl Storage {
    /// Writes an object; an existing one under the same key is replaced atomically.
    pub async fn put(&self, key: &ObjectKey, body: Bytes, content_type: &str) -> Result<()> {
        match self {
            Storage::S3(s) => s.put(key, body, content_type).await,
            Storage::Local(l) => l.put(key, body, content_type).await,
        }
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        match self {
            Storage::S3(s) => s.get(key).await,
            Storage::Local(l) => l.get(key).await,
        }
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>> {
        match self {
            Storage::S3(s) => s.head(key).await,
            Storage::Local(l) => l.head(key).await,
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        match self {
            Storage::S3(s) => s.delete(key).await,
            Storage::Local(l) => l.delete(key).await,
        }
    }

    /// A URL that fetches the object with a plain GET until `expires_in` after `start`.
    pub async fn presign_get(
        &self,
        key: &ObjectKey,
        start: SystemTime,
        expires_in: Duration,
    ) -> Result<String> {
        match self {
            Storage::S3(s) => s.presign_get(key, start, expires_in).await,
            Storage::Local(l) => l.presign_get(key, start, expires_in),
        }
    }

    /// Readiness: the bucket or directory is reachable and usable.
    pub async fn check(&self) -> Result<()> {
        match self {
            Storage::S3(s) => s.check().await,
            Storage::Local(l) => l.check().await,
        }
    }
}
