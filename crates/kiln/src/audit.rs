//! `kiln audit --storage`: every succeeded kit checked against the objects it names. The
//! manifest the job records must exist and be this job's kit, and every file it lists must exist
//! with the size and sha256 the manifest gives. (The database audit, `kiln_jobs::audit`, checks
//! that each succeeded job names a manifest; this checks the manifest is really there.)

use std::sync::Arc;

use kiln_ledger::{Breach, Db, on_tx};
use kiln_storage::{ObjectKey, Storage, StorageError};

/// Objects read at once.
const PARALLEL: usize = 8;

#[derive(sqlx::FromRow)]
struct Succeeded {
    id: String,
    account_id: String,
    kit: String,
    manifest_key: Option<String>,
}

/// Checks every succeeded kit's objects; an empty list means every kit is whole. Fails only
/// when the database or the storage cannot be read at all (a missing object is a breach).
pub async fn audit_storage(db: &Db, storage: &Storage) -> anyhow::Result<Vec<Breach>> {
    let mut read = db.begin_read().await?;
    let jobs: Vec<Succeeded> = on_tx!(&mut read, c => sqlx::query_as(
        "SELECT id, account_id, kit, manifest_key FROM kit_jobs WHERE status = 'succeeded' ORDER BY id",
    )
    .fetch_all(&mut **c)
    .await?);
    drop(read);
    let storage = Arc::new(storage.clone());
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut set = tokio::task::JoinSet::new();
    for (i, job) in jobs.into_iter().enumerate() {
        let (storage, limit) = (storage.clone(), limit.clone());
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, check_kit(&storage, &job).await)
        });
    }
    let mut found = Vec::new();
    while let Some(done) = set.join_next().await {
        found.push(done?);
    }
    // In the jobs' order, whatever order the checks finished in.
    found.sort_by_key(|(i, _)| *i);
    let mut out = Vec::new();
    for (_, r) in found {
        out.extend(r?);
    }
    Ok(out)
}

/// One kit: its manifest, then each file it lists.
async fn check_kit(storage: &Storage, job: &Succeeded) -> anyhow::Result<Vec<Breach>> {
    let mut out = Vec::new();
    let mut breach = |what: String| {
        out.push(Breach {
            account_id: job.account_id.clone(),
            what: format!("job {}: {what}", job.id),
        })
    };
    // A succeeded job without a manifest key is the database audit's breach.
    let Some(key) = &job.manifest_key else {
        return Ok(out);
    };
    let Some(bytes) = read(storage, key, &mut breach).await? else {
        return Ok(out);
    };
    let manifest: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            breach(format!("its manifest {key} is not JSON: {e}"));
            return Ok(out);
        }
    };
    if manifest["job"].as_str() != Some(job.id.as_str())
        || manifest["kit"].as_str() != Some(job.kit.as_str())
    {
        breach(format!(
            "its manifest {key} is job {} kit {}, not this job's {} kit",
            manifest["job"], manifest["kit"], job.kit
        ));
    }
    let assets = manifest["assets"].as_array().cloned().unwrap_or_default();
    if assets.is_empty() {
        breach(format!("its manifest {key} lists no files"));
    }
    for a in assets {
        let (Some(file), Some(sha), Some(size)) =
            (a["key"].as_str(), a["sha256"].as_str(), a["bytes"].as_u64())
        else {
            breach(format!(
                "its manifest {key} has an entry without key, sha256 or bytes: {a}"
            ));
            continue;
        };
        let Some(body) = read(storage, file, &mut breach).await? else {
            continue;
        };
        let actual = kiln_assets::sha256_hex(&body);
        if actual != sha || body.len() as u64 != size {
            breach(format!(
                "{file} is {} bytes with sha256 {actual}; the manifest says {size} bytes, {sha}",
                body.len()
            ));
        }
    }
    Ok(out)
}

/// An object's bytes; a missing object or an invalid key is a breach (`None`), storage that
/// cannot be reached is an error.
async fn read(
    storage: &Storage,
    key: &str,
    breach: &mut impl FnMut(String),
) -> anyhow::Result<Option<bytes::Bytes>> {
    let parsed = match ObjectKey::parse(key) {
        Ok(k) => k,
        Err(e) => {
            breach(format!("names an invalid key {key:?}: {e}"));
            return Ok(None);
        }
    };
    match storage.get(&parsed).await {
        Ok(b) => Ok(Some(b)),
        Err(StorageError::NotFound(_)) => {
            breach(format!("{key} is missing from storage"));
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!("reading {key}: {e}")),
    }
}
