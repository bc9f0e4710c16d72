//! Configuration: defaults, then an optional TOML file (`KILN_CONFIG` or `--config`), then the
//! environment. Checked once at start-up; a bad value stops the program with a clear message.

use std::path::Path;

use anyhow::{Context, bail};
use kiln_core::Pricing;

/// Where the embedded default keeps its database and its objects.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://kiln-data/kiln.db";
pub const DEFAULT_STORAGE: &str = "kiln-data/objects";

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub pricing: Pricing,
    /// `KILN_STORAGE`: a local directory, or `s3://bucket` (settings from `KILN_S3_*`).
    pub storage: String,
    /// `KILN_PUBLIC_URL`: the base of signed URLs the local store hands out.
    pub public_url: String,
}

impl Config {
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            table = text
                .parse()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
        }
        let mut database_url = match table.remove("database_url") {
            Some(toml::Value::String(s)) => s,
            Some(other) => bail!("database_url must be a string, got {other:?}"),
            None => DEFAULT_DATABASE_URL.to_owned(),
        };
        let mut storage = match table.remove("storage") {
            Some(toml::Value::String(s)) => s,
            Some(other) => bail!("storage must be a string, got {other:?}"),
            None => DEFAULT_STORAGE.to_owned(),
        };
        let pricing = match table.remove("pricing") {
            Some(toml::Value::Table(t)) => Pricing::from_table(t).context("invalid [pricing]")?,
            Some(_) => bail!("[pricing] must be a table"),
            None => Pricing::default(),
        };
        if let Some(key) = table.keys().next() {
            bail!(
                "unknown setting {key:?} in the config file (known: database_url, storage, [pricing])"
            );
        }
        if let Ok(url) = std::env::var("KILN_DATABASE_URL") {
            database_url = url;
        }
        if let Ok(s) = std::env::var("KILN_STORAGE") {
            storage = s;
        }
        if storage.trim().is_empty() {
            bail!("KILN_STORAGE is empty: give a directory or s3://bucket");
        }
        let public_url =
            std::env::var("KILN_PUBLIC_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
        kiln_ledger::Backend::of_url(&database_url)?;
        Ok(Config {
            database_url,
            pricing,
            storage,
            public_url,
        })
    }
}
