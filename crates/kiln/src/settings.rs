//! kiln's settings, typed and checked once at start-up: the defaults below, then the TOML file
//! (`--config` / `KILN_CONFIG`), then `KILN_*` environment variables. A bad value stops the
//! program with a message naming the setting. Secrets are [`Secret`]s: they print as
//! `[redacted]`, in `kiln config` and in any log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_core::Pricing;
use serde::{Deserialize, Serialize};

/// Where the embedded default keeps its database and its objects.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://kiln-data/kiln.db";
pub const DEFAULT_STORAGE: &str = "kiln-data/objects";

/// A value that must not be printed: its `Debug` and `Serialize` say `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Everything kiln can be told.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// `KILN_DATABASE_URL`: `sqlite://path` or `postgres://...` (its password is a secret).
    pub database: Secret,
    /// `KILN_STORAGE`: a local directory, or `s3://bucket` with the `[s3]` settings.
    pub storage: String,
    pub s3: S3Settings,
    /// `KILN_SIGNING_SECRET` (>= 16 characters): signs the local store's URLs. Default: a key
    /// made on first use beside the objects.
    pub signing_secret: Option<Secret>,
    /// `KILN_PUBLIC_URL`: the base of the URLs kiln hands out for the local store's objects.
    /// Default (empty): the scheme and host the request came to.
    pub public_url: String,
    pub generator: GeneratorSettings,
    pub jobs: JobSettings,
    pub api: ApiSettings,
    #[serde(skip)]
    pub pricing: Pricing,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// `KILN_S3_ENDPOINT`: for S3-compatible servers; unset means AWS.
    pub endpoint: Option<String>,
    /// `KILN_S3_REGION` (or `AWS_REGION`), default us-east-1.
    pub region: Option<String>,
    /// `KILN_S3_PATH_STYLE`: default on when an endpoint is set.
    pub path_style: Option<bool>,
    /// `KILN_S3_ACCESS_KEY_ID` + `KILN_S3_SECRET_ACCESS_KEY`; unset: the default AWS chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// `KILN_S3_TIMEOUT_SECS`: how long one try of a request waits for the server's first
    /// byte (sending included) before it is given up and retried; default 30.
    pub timeout_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorKind {
    Studio,
    Ai,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorSettings {
    /// `KILN_GENERATOR`: `studio` (default) or `ai`.
    pub kind: GeneratorKind,
    /// `KILN_PROVIDER_URL`, e.g. `https://api.openai.com`.
    pub provider_url: Option<String>,
    /// `KILN_PROVIDER_KEY`.
    pub provider_key: Option<Secret>,
    /// `KILN_PROVIDER_TEXT_MODEL`.
    pub text_model: String,
    /// `KILN_PROVIDER_IMAGE_MODEL`.
    pub image_model: String,
    /// `KILN_PROVIDER_TIMEOUT_SECS`.
    pub timeout_secs: u64,
    /// `KILN_CUTOUT_MODEL`: a U²-Net-p ONNX file for the learned cut-out. Default (unset): the
    /// model built into kiln. Loaded and checked when workers start: a missing or broken file
    /// stops them then, naming its path.
    pub cutout_model: Option<String>,
    /// `KILN_FAULT_GENERATOR_FAILURES`: the share of attempts (0 to 1) whose generation fails on
    /// purpose with a retryable `injected_fault`, for chaos testing. Default 0: never.
    pub fault_generator_failures: f64,
}

impl Default for GeneratorSettings {
    fn default() -> Self {
        GeneratorSettings {
            kind: GeneratorKind::Studio,
            provider_url: None,
            provider_key: None,
            text_model: "gpt-4o-mini".into(),
            image_model: "gpt-image-1".into(),
            timeout_secs: 120,
            cutout_model: None,
            fault_generator_failures: 0.0,
        }
    }
}

/// Jobs and workers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSettings {
    /// `KILN_MAX_ATTEMPTS`: deliveries of a job before it fails and releases.
    pub max_attempts: u32,
    /// `KILN_RETRY_BASE_MS`: the first retry's delay; x4 each time after.
    pub retry_base_ms: u64,
    /// `KILN_RETRY_MAX_MS`: ... but never more than this between two attempts.
    pub retry_max_ms: u64,
    /// `KILN_LEASE_MS`: a running attempt's lease (renewed every quarter of it).
    pub lease_ms: u64,
    /// `KILN_HEARTBEAT_MS`: the apalis worker heartbeat (and idle PostgreSQL re-fetch).
    pub heartbeat_ms: u64,
    /// `KILN_MISSED_HEARTBEATS`: missed beats before a dead worker's tasks are rescued.
    pub missed_heartbeats: usize,
    /// `KILN_MAINTENANCE_MS`: renewals, the reconciler and pruning run this often.
    pub maintenance_ms: u64,
    /// `KILN_ESSENTIALS_DEADLINE_SECS`: an Essentials attempt still running after this is
    /// abandoned and retried (its credits stay held for the retry, released if none is left).
    pub essentials_deadline_secs: u64,
    /// `KILN_CARATZON_DEADLINE_SECS`: the same for a Caratzon attempt.
    pub caratzon_deadline_secs: u64,
    /// `KILN_AUDIT_EVERY_SECS`: the maintenance loop runs the database audit this often and
    /// exports its breach count as `kiln_audit_breaches` (0: never).
    pub audit_every_secs: u64,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            max_attempts: kiln_producer::MAX_ATTEMPTS,
            retry_base_ms: 5_000,
            retry_max_ms: 600_000,
            lease_ms: 20_000,
            heartbeat_ms: 5_000,
            missed_heartbeats: 3,
            maintenance_ms: 10_000,
            essentials_deadline_secs: 300,
            caratzon_deadline_secs: 900,
            audit_every_secs: 300,
        }
    }
}

/// The HTTP API's limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// `KILN_SUBMIT_BURST`: kit orders and holds an account may send at once.
    pub submit_burst: u32,
    /// `KILN_SUBMIT_PER_MINUTE`: ... and then per minute (429 with Retry-After beyond).
    pub submit_per_minute: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            submit_burst: 120,
            submit_per_minute: 120,
        }
    }
}

impl JobSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// Delays between attempts.
    pub fn retry(&self) -> kit_worker::Retry {
        kit_worker::Retry {
            base: Duration::from_millis(self.retry_base_ms),
            max: Duration::from_millis(self.retry_max_ms),
        }
    }

    /// How long one attempt of each kit may run.
    pub fn deadlines(&self) -> kit_worker::Deadlines {
        kit_worker::Deadlines {
            essentials: Duration::from_secs(self.essentials_deadline_secs),
            caratzon: Duration::from_secs(self.caratzon_deadline_secs),
        }
    }
}

/// The TOML file's shape: every table optional, nothing unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    database_url: Option<Secret>,
    storage: Option<String>,
    signing_secret: Option<Secret>,
    public_url: Option<String>,
    #[serde(default)]
    s3: S3Settings,
    #[serde(default)]
    generator: GeneratorSettings,
    #[serde(default)]
    jobs: JobSettings,
    #[serde(default)]
    api: ApiSettings,
    pricing: Option<toml::Table>,
}

/// Where the environment comes from: the process's, or a map (tests).
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment; empty values count as unset.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

fn number<T: std::str::FromStr>(env: &dyn Env, name: &str, into: &mut T) -> anyhow::Result<()> {
    if let Some(v) = env.get(name) {
        *into = v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name} must be a number, not {v:?}"))?;
    }
    Ok(())
}

fn boolean(name: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => bail!("{name}={other:?} is not a boolean (true or false)"),
    }
}

impl Settings {
    /// Defaults, then `file` when given, then the process environment; validated.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        Settings::load_from(file, &ProcessEnv)
    }

    pub fn load_from(file: Option<&Path>, env: &dyn Env) -> anyhow::Result<Settings> {
        let f: File = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => File::default(),
        };
        let pricing = match f.pricing {
            Some(t) => Pricing::from_table(t).context("invalid [pricing]")?,
            None => Pricing::default(),
        };
        let mut s = Settings {
            database: f
                .database_url
                .unwrap_or_else(|| Secret::new(DEFAULT_DATABASE_URL)),
            storage: f.storage.unwrap_or_else(|| DEFAULT_STORAGE.to_owned()),
            s3: f.s3,
            signing_secret: f.signing_secret,
            public_url: f.public_url.unwrap_or_default(),
            generator: f.generator,
            jobs: f.jobs,
            api: f.api,
            pricing,
        };
        s.overlay(env)?;
        s.validate()?;
        Ok(s)
    }

    fn overlay(&mut self, env: &dyn Env) -> anyhow::Result<()> {
        if let Some(v) = env.get("KILN_DATABASE_URL") {
            self.database = Secret::new(v);
        }
        if let Some(v) = env.get("KILN_STORAGE") {
            self.storage = v;
        }
        if let Some(v) = env.get("KILN_SIGNING_SECRET") {
            self.signing_secret = Some(Secret::new(v));
        }
        if let Some(v) = env.get("KILN_PUBLIC_URL") {
            self.public_url = v;
        }
        let s3 = &mut self.s3;
        if let Some(v) = env.get("KILN_S3_ENDPOINT") {
            s3.endpoint = Some(v);
        }
        if let Some(v) = env.get("KILN_S3_REGION").or_else(|| env.get("AWS_REGION")) {
            s3.region = Some(v);
        }
        if let Some(v) = env.get("KILN_S3_PATH_STYLE") {
            s3.path_style = Some(boolean("KILN_S3_PATH_STYLE", &v)?);
        }
        if let Some(v) = env.get("KILN_S3_ACCESS_KEY_ID") {
            s3.access_key_id = Some(v);
        }
        if let Some(v) = env.get("KILN_S3_SECRET_ACCESS_KEY") {
            s3.secret_access_key = Some(Secret::new(v));
        }
        if env.get("KILN_S3_TIMEOUT_SECS").is_some() {
            let mut secs = 0;
            number(env, "KILN_S3_TIMEOUT_SECS", &mut secs)?;
            s3.timeout_secs = Some(secs);
        }
        let g = &mut self.generator;
        if let Some(v) = env.get("KILN_GENERATOR") {
            g.kind = match v.as_str() {
                "studio" => GeneratorKind::Studio,
                "ai" => GeneratorKind::Ai,
                other => bail!("KILN_GENERATOR must be studio or ai, not {other:?}"),
            };
        }
        if let Some(v) = env.get("KILN_PROVIDER_URL") {
            g.provider_url = Some(v);
        }
        if let Some(v) = env.get("KILN_PROVIDER_KEY") {
            g.provider_key = Some(Secret::new(v));
        }
        if let Some(v) = env.get("KILN_PROVIDER_TEXT_MODEL") {
            g.text_model = v;
        }
        if let Some(v) = env.get("KILN_PROVIDER_IMAGE_MODEL") {
            g.image_model = v;
        }
        number(env, "KILN_PROVIDER_TIMEOUT_SECS", &mut g.timeout_secs)?;
        if let Some(v) = env.get("KILN_CUTOUT_MODEL") {
            g.cutout_model = Some(v);
        }
        number(
            env,
            "KILN_FAULT_GENERATOR_FAILURES",
            &mut g.fault_generator_failures,
        )?;
        number(env, "KILN_SUBMIT_BURST", &mut self.api.submit_burst)?;
        number(
            env,
            "KILN_SUBMIT_PER_MINUTE",
            &mut self.api.submit_per_minute,
        )?;
        let j = &mut self.jobs;
        number(env, "KILN_MAX_ATTEMPTS", &mut j.max_attempts)?;
        number(env, "KILN_RETRY_BASE_MS", &mut j.retry_base_ms)?;
        number(env, "KILN_RETRY_MAX_MS", &mut j.retry_max_ms)?;
        number(env, "KILN_LEASE_MS", &mut j.lease_ms)?;
        number(env, "KILN_HEARTBEAT_MS", &mut j.heartbeat_ms)?;
        number(env, "KILN_MISSED_HEARTBEATS", &mut j.missed_heartbeats)?;
        number(env, "KILN_MAINTENANCE_MS", &mut j.maintenance_ms)?;
        number(
            env,
            "KILN_ESSENTIALS_DEADLINE_SECS",
            &mut j.essentials_deadline_secs,
        )?;
        number(
            env,
            "KILN_CARATZON_DEADLINE_SECS",
            &mut j.caratzon_deadline_secs,
        )?;
        number(env, "KILN_AUDIT_EVERY_SECS", &mut j.audit_every_secs)?;
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        kiln_ledger::Backend::of_url(self.database.expose())
            .map_err(|_| {
                anyhow::anyhow!(
                    "database URL must start with postgres://, postgresql:// or sqlite: (got {}; from database_url or KILN_DATABASE_URL)",
                    self.database_display()
                )
            })?;
        if self.storage.trim().is_empty() {
            bail!("storage / KILN_STORAGE is empty: give a directory or s3://bucket");
        }
        if self
            .storage
            .strip_prefix("s3://")
            .is_some_and(|b| b.trim_end_matches('/').is_empty())
        {
            bail!("storage / KILN_STORAGE: s3:// needs a bucket name");
        }
        if self.s3.access_key_id.is_some() != self.s3.secret_access_key.is_some() {
            bail!(
                "set both s3.access_key_id and s3.secret_access_key (KILN_S3_ACCESS_KEY_ID, KILN_S3_SECRET_ACCESS_KEY), or neither"
            );
        }
        if self.s3.timeout_secs == Some(0) {
            bail!("s3.timeout_secs / KILN_S3_TIMEOUT_SECS must be positive");
        }
        if let Some(s) = &self.signing_secret
            && s.expose().len() < 16
        {
            bail!("signing_secret / KILN_SIGNING_SECRET must be at least 16 characters");
        }
        if !self.public_url.is_empty()
            && !self.public_url.starts_with("http://")
            && !self.public_url.starts_with("https://")
        {
            bail!(
                "public_url / KILN_PUBLIC_URL must be an http(s) URL, not {:?}",
                self.public_url
            );
        }
        let g = &self.generator;
        if g.kind == GeneratorKind::Ai {
            let Some(url) = &g.provider_url else {
                bail!(
                    "generator ai needs generator.provider_url (KILN_PROVIDER_URL) and generator.provider_key (KILN_PROVIDER_KEY)"
                );
            };
            if !url.starts_with("http://") && !url.starts_with("https://") {
                bail!(
                    "generator.provider_url / KILN_PROVIDER_URL must be an http(s) URL, not {url:?}"
                );
            }
            if g.provider_key.is_none() {
                bail!(
                    "generator.provider_url is set but generator.provider_key (KILN_PROVIDER_KEY) is not"
                );
            }
        }
        if g.timeout_secs == 0 {
            bail!("generator.timeout_secs / KILN_PROVIDER_TIMEOUT_SECS must be positive");
        }
        if !(0.0..=1.0).contains(&g.fault_generator_failures) {
            bail!(
                "generator.fault_generator_failures / KILN_FAULT_GENERATOR_FAILURES must be between 0 and 1"
            );
        }
        let j = &self.jobs;
        if j.max_attempts == 0 {
            bail!("jobs.max_attempts / KILN_MAX_ATTEMPTS must be at least 1");
        }
        if j.lease_ms < 100 {
            bail!("jobs.lease_ms / KILN_LEASE_MS must be at least 100");
        }
        if j.essentials_deadline_secs == 0 || j.caratzon_deadline_secs == 0 {
            bail!(
                "jobs.essentials_deadline_secs and caratzon_deadline_secs (KILN_ESSENTIALS_DEADLINE_SECS, KILN_CARATZON_DEADLINE_SECS) must be positive"
            );
        }
        if j.heartbeat_ms == 0 || j.maintenance_ms == 0 || j.missed_heartbeats == 0 {
            bail!(
                "jobs.heartbeat_ms, jobs.missed_heartbeats and jobs.maintenance_ms (KILN_HEARTBEAT_MS, KILN_MISSED_HEARTBEATS, KILN_MAINTENANCE_MS) must be positive"
            );
        }
        // apalis counts a worker dead once it has missed heartbeats for this long, cut to
        // whole seconds: the window must still hold two heartbeats, or live workers count as
        // dead and every heartbeat hands their running kits out again (300 ms x 3 came to 0 s).
        let window_ms = j.heartbeat_ms.saturating_mul(j.missed_heartbeats as u64) / 1000 * 1000;
        if window_ms < j.heartbeat_ms.saturating_mul(2) {
            bail!(
                "jobs.heartbeat_ms x jobs.missed_heartbeats (KILN_HEARTBEAT_MS x KILN_MISSED_HEARTBEATS = {} ms x {}) is how long a worker may be silent before its kits go to another; counted in whole seconds ({} s), it must cover at least two heartbeats: raise KILN_MISSED_HEARTBEATS",
                j.heartbeat_ms,
                j.missed_heartbeats,
                window_ms / 1000
            );
        }
        Ok(())
    }

    /// The database URL without its password, for messages.
    pub fn database_display(&self) -> String {
        let url = self.database.expose();
        match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let creds = &url[s + 3..at];
                let user = creds.split(':').next().unwrap_or("");
                format!("{}{user}:***{}", &url[..s + 3], &url[at..])
            }
            _ => url.to_owned(),
        }
    }

    /// The local store's directory, when storage is local.
    pub fn local_dir(&self) -> Option<PathBuf> {
        if self.storage.starts_with("s3://") {
            None
        } else {
            Some(PathBuf::from(
                self.storage
                    .strip_prefix("file://")
                    .unwrap_or(&self.storage),
            ))
        }
    }

    /// What `kiln config` prints: every setting, secrets redacted, the database URL without
    /// its password.
    pub fn effective(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["database"] = serde_json::Value::String(self.database_display());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_the_file_and_names_the_bad_setting() {
        let dir = std::env::temp_dir().join(format!("kiln-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kiln.toml");
        std::fs::write(
            &file,
            "storage = \"/srv/objects\"\n[jobs]\nlease_ms = 9000\nmax_attempts = 2\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&file), &[("KILN_MAX_ATTEMPTS", "7")]).unwrap();
        assert_eq!(s.storage, "/srv/objects");
        assert_eq!(s.jobs.lease_ms, 9000);
        assert_eq!(s.jobs.max_attempts, 7, "the environment wins over the file");

        let e = Settings::load_from(Some(&file), &[("KILN_LEASE_MS", "soon")]).unwrap_err();
        assert!(e.to_string().contains("KILN_LEASE_MS"), "{e}");
        std::fs::write(&file, "[jobs]\nleese_ms = 1\n").unwrap();
        let e = format!("{:#}", Settings::load_from(Some(&file), &[]).unwrap_err());
        assert!(e.contains("leese_ms"), "{e}");
        // 300 ms x 3 is 0.9 s, 0 whole seconds: every live worker would count as dead.
        let e = Settings::load_from(
            None,
            &[
                ("KILN_HEARTBEAT_MS", "300"),
                ("KILN_MISSED_HEARTBEATS", "3"),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("KILN_MISSED_HEARTBEATS"), "{e}");
        Settings::load_from(
            None,
            &[
                ("KILN_HEARTBEAT_MS", "300"),
                ("KILN_MISSED_HEARTBEATS", "4"),
            ],
        )
        .expect("1.2 s is 1 whole second, over three heartbeats");
        let e = Settings::load_from(None, &[("KILN_S3_TIMEOUT_SECS", "0")]).unwrap_err();
        assert!(e.to_string().contains("KILN_S3_TIMEOUT_SECS"), "{e}");
        let e = Settings::load_from(None, &[("KILN_GENERATOR", "ai")]).unwrap_err();
        assert!(e.to_string().contains("KILN_PROVIDER_URL"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::load_from(
            None,
            &[
                (
                    "KILN_DATABASE_URL",
                    "postgres://kiln:hunter2hunter2@db/kiln",
                ),
                ("KILN_SIGNING_SECRET", "sixteen-chars-long-secret"),
                ("KILN_S3_ACCESS_KEY_ID", "AKIA"),
                ("KILN_S3_SECRET_ACCESS_KEY", "s3-secret-value"),
                ("KILN_GENERATOR", "ai"),
                ("KILN_PROVIDER_URL", "http://127.0.0.1:9"),
                ("KILN_PROVIDER_KEY", "sk-provider-key"),
            ],
        )
        .unwrap();
        let shown = format!("{s:?} {}", s.effective());
        for secret in [
            "hunter2hunter2",
            "sixteen-chars-long-secret",
            "s3-secret-value",
            "sk-provider-key",
        ] {
            assert!(!shown.contains(secret), "{secret} printed in {shown}");
        }
        assert!(shown.contains("[redacted]"));
        assert!(shown.contains("postgres://kiln:***@db/kiln"), "{shown}");
    }
}
