//! Typed object keys. A key can only be built from parts that cannot escape their prefix.

use std::fmt;

use kiln_core::AccountId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid object key {key:?}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: &'static str,
}

/// `uploads/<account>/<sha256>.<ext>` or `kits/<job>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

fn err(key: &str, reason: &'static str) -> KeyError {
    KeyError {
        key: key.to_owned(),
        reason,
    }
}

/// A relative path of lowercase segments: `a-z 0-9 . _ -`, no empty, `.` or `..` segments.
fn check_path(path: &str) -> Result<(), KeyError> {
    if path.is_empty() || path.len() > 512 {
        return Err(err(path, "empty or longer than 512 bytes"));
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(err(path, "empty, '.' or '..' path segment"));
        }
        if !seg.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(err(path, "only a-z, 0-9, '.', '_' and '-' are allowed"));
        }
    }
    Ok(())
}

impl ObjectKey {
    /// An uploaded design, content-addressed: the same bytes land on the same key.
    pub fn upload(account: AccountId, sha256_hex: &str, ext: &str) -> Result<ObjectKey, KeyError> {
        if sha256_hex.len() != 64
            || !sha256_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err(sha256_hex, "not a lowercase hex SHA-256"));
        }
        if ext.is_empty()
            || ext.len() > 8
            || !ext
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(err(ext, "bad extension"));
        }
        let account = account.to_string().to_lowercase();
        Ok(ObjectKey(format!("uploads/{account}/{sha256_hex}.{ext}")))
    }

    /// An asset of a kit job: `kits/<job>/<path>`.
    pub fn kit(job: &str, path: &str) -> Result<ObjectKey, KeyError> {
        let job_ok =
            !job.is_empty() && job.len() <= 64 && job.bytes().all(|b| b.is_ascii_alphanumeric());
        if !job_ok {
            return Err(err(job, "job id must be 1-64 ASCII letters and digits"));
        }
        check_path(path)?;
        Ok(ObjectKey(format!("kits/{}/{path}", job.to_lowercase())))
    }

    /// Reads a stored key back (from a manifest or a URL), accepting only the two shapes above.
    pub fn parse(s: &str) -> Result<ObjectKey, KeyError> {
        check_path(s)?;
        let mut parts = s.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("uploads" | "kits"), Some(_), Some(_)) => Ok(ObjectKey(s.to_owned())),
            _ => Err(err(s, "must start with uploads/<account>/ or kits/<job>/")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        assert!(ObjectKey::kit("01HZX", "photos/main.jpg").is_ok());
        for bad in [
            "../x",
            "a/../../b",
            "/abs",
            "a//b",
            "A.jpg",
            "a/./b",
            "a\\b",
            "",
            "x y",
        ] {
            assert!(ObjectKey::kit("01HZX", bad).is_err(), "{bad:?}");
        }
        assert!(ObjectKey::kit("../", "a").is_err());
        assert!(ObjectKey::parse("uploads/a/b.jpg").is_ok());
        assert!(ObjectKey::parse("etc/passwd/x").is_err());
        assert!(ObjectKey::parse("kits/../x").is_err());
        let k = ObjectKey::upload(AccountId::new(), &"ab".repeat(32), "jpg").expect("valid");
        assert!(k.as_str().starts_with("uploads/") && k.as_str().ends_with(".jpg"));
        assert!(ObjectKey::upload(AccountId::new(), "xyz", "jpg").is_err());
    }
}
