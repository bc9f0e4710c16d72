//! The local-directory backend (the embedded default). Writes go to a temporary file in the same
//! directory tree and are renamed into place, so a reader sees the old object or the new one,
//! never half of one. Signed URLs are HMAC-SHA256 over the key and the expiry time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{ObjectKey, ObjectMeta, Result, StorageError};

#[derive(Clone)]
pub struct LocalStore {
    root: PathBuf,
    secret: Vec<u8>,
    public_base: String,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .field("public_base", &self.public_base)
            .finish()
    }
}

fn io(e: std::io::Error, what: &str, path: &Path) -> StorageError {
    match e.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound(path.display().to_string()),
        _ => StorageError::Other(format!("{what} {}: {e}", path.display())),
    }
}

/// The content type implied by a key's extension.
pub(crate) fn content_type_of(key: &str) -> &'static str {
    match key.rsplit('.').next() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("json") => "application/json",
        Some("md") => "text/markdown; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

impl LocalStore {
    /// `public_base` is where the HTTP API serves `/v1/objects/...` for signed URLs.
    pub fn new(root: impl Into<PathBuf>, secret: Vec<u8>, public_base: &str) -> Result<LocalStore> {
        let root = root.into();
        if secret.len() < 16 {
            return Err(StorageError::Config(
                "the URL signing secret must be at least 16 bytes".into(),
            ));
        }
        std::fs::create_dir_all(root.join(".tmp")).map_err(|e| io(e, "cannot create", &root))?;
        Ok(LocalStore {
            root,
            secret,
            public_base: public_base.trim_end_matches('/').to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a key lives. Keys are validated on construction; this re-checks that the path
    /// stays under the root.
    pub fn path_of(&self, key: &ObjectKey) -> Result<PathBuf> {
        let path = self.root.join(key.as_str());
        if !path.starts_with(&self.root)
            || key.as_str().split('/').any(|s| s == ".." || s.is_empty())
        {
            return Err(StorageError::Other(format!(
                "key {key} escapes the storage root"
            )));
        }
        Ok(path)
    }

    pub async fn put(&self, key: &ObjectKey, body: Bytes, _content_type: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let tmp = self
            .root
            .join(".tmp")
            .join(ulid::Ulid::generate().to_string());
        tokio::task::spawn_blocking(move || {
            let parent = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(|e| io(e, "cannot create", parent))?;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, "cannot create", &tmp))?;
            f.write_all(&body)
                .map_err(|e| io(e, "cannot write", &tmp))?;
            f.sync_all().map_err(|e| io(e, "cannot sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(e, "cannot rename into", &path)
            })
        })
        .await
        .map_err(|e| StorageError::Other(format!("write task failed: {e}")))?
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(key.to_string()))
            }
            Err(e) => Err(io(e, "cannot read", &path)),
        }
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                size: m.len(),
                content_type: Some(content_type_of(key.as_str()).to_owned()),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e, "cannot stat", &path)),
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e, "cannot delete", &path)),
        }
    }

    fn signature(&self, key: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(b"GET\n");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// `<public_base>/v1/objects/<key>?expires=<unix seconds>&signature=<hex>`.
    pub fn presign_get(
        &self,
        key: &ObjectKey,
        start: SystemTime,
        expires_in: Duration,
    ) -> Result<String> {
        let expires = (start + expires_in)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sig = hex::encode(
            self.signature(key.as_str(), expires)
                .finalize()
                .into_bytes(),
        );
        Ok(format!(
            "{}/v1/objects/{key}?expires={expires}&signature={sig}",
            self.public_base
        ))
    }

    /// Checks a signed URL's key, expiry and signature (constant-time) at `now`.
    pub fn verify(
        &self,
        key: &str,
        expires: u64,
        signature_hex: &str,
        now: SystemTime,
    ) -> Result<ObjectKey> {
        let key = ObjectKey::parse(key)?;
        let sig = hex::decode(signature_hex).map_err(|_| StorageError::BadSignature)?;
        self.signature(key.as_str(), expires)
            .verify_slice(&sig)
            .map_err(|_| StorageError::BadSignature)?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now >= expires {
            return Err(StorageError::Expired);
        }
        Ok(key)
    }

    /// Fetches what a signed URL points at, as the HTTP API does for `GET /v1/objects/...`.
    pub async fn open_signed(&self, url: &str, now: SystemTime) -> Result<Bytes> {
        let rest = url
            .strip_prefix(&self.public_base)
            .ok_or(StorageError::BadSignature)?;
        let rest = rest
            .strip_prefix("/v1/objects/")
            .ok_or(StorageError::BadSignature)?;
        let (key, query) = rest.split_once('?').ok_or(StorageError::BadSignature)?;
        let (mut expires, mut sig) = (None, None);
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("expires", v)) => expires = v.parse::<u64>().ok(),
                Some(("signature", v)) => sig = Some(v),
                _ => {}
            }
        }
        let (Some(expires), Some(sig)) = (expires, sig) else {
            return Err(StorageError::BadSignature);
        };
        let key = self.verify(key, expires, sig, now)?;
        self.get(&key).await
    }

    pub async fn check(&self) -> Result<()> {
        let probe = ObjectKey::kit("healthcheck", "probe.txt")?;
        self.put(&probe, Bytes::from_static(b"ok"), "text/plain")
            .await?;
        self.delete(&probe).await
    }
}
