//! The S3 backend, for AWS or any S3-compatible server (path-style addressing, checksums only
//! where the protocol requires them, since third-party servers reject the SDK's newer defaults).
//! Large objects go up in parts; throttling and server errors are retried by the SDK, and what
//! still fails is reported as retryable.

use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use crate::{ObjectKey, ObjectMeta, Result, StorageError};

/// Objects above this size are uploaded in parts of this size.
pub const MULTIPART_PART_SIZE: usize = 8 * 1024 * 1024;

/// The SDK's own default for opening a connection (setting any timeout replaces its defaults).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);

/// [`S3Config::timeout`]'s default: a part ([`MULTIPART_PART_SIZE`]) sent and answered at
/// 0.3 MB/s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// For S3-compatible servers, e.g. `http://127.0.0.1:9000`; `None` means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    /// Static credentials; `None` uses the default chain (environment, profile, instance role).
    pub credentials: Option<(String, String)>,
    pub max_attempts: u32,
    /// The longest one try waits for the first byte of the server's answer (sending the
    /// request included). A server that takes the connection and never answers fails the try
    /// after this, and the call is retryable when the tries run out; without it such a call
    /// hung until the kit's deadline (minutes).
    pub timeout: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("max_attempts", &self.max_attempts)
            .field("timeout", &self.timeout)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(ak, _)| (ak, "***")),
            )
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
}

/// Sorts an SDK failure into what the caller can act on.
fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(e: &SdkError<E>, key: &str) -> StorageError {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e
        .as_service_error()
        .and_then(|s| s.code())
        .unwrap_or("")
        .to_owned();
    let message = e
        .as_service_error()
        .and_then(|s| s.message())
        .unwrap_or("")
        .to_owned();
    let detail = format!("{code} {message} (HTTP {status:?}): {e:?}");
    match (code.as_str(), status) {
        ("NoSuchKey" | "NotFound", _) | (_, Some(404)) => StorageError::NotFound(key.to_owned()),
        ("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" | "ExpiredToken", _)
        | (_, Some(401 | 403)) => StorageError::Auth(format!("{code} {message}")),
        ("SlowDown" | "Throttling" | "RequestTimeout", _) | (_, Some(429 | 500..=599)) => {
            StorageError::Unavailable(detail)
        }
        _ => match e {
            SdkError::DispatchFailure(_)
            | SdkError::TimeoutError(_)
            | SdkError::ResponseError(_) => StorageError::Unavailable(detail),
            _ => StorageError::Other(detail),
        },
    }
}

impl S3Store {
    pub async fn connect(cfg: S3Config) -> Result<S3Store> {
        // rustls on ring (the SDK's default HTTP client would build aws-lc).
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(cfg.region.clone()));
        if let Some((ak, sk)) = &cfg.credentials {
            loader = loader.credentials_provider(Credentials::new(ak, sk, None, None, "kiln"));
        }
        let sdk = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::standard().with_max_attempts(cfg.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT.min(cfg.timeout))
                    .read_timeout(cfg.timeout)
                    .build(),
            );
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub async fn put(&self, key: &ObjectKey, body: Bytes, content_type: &str) -> Result<()> {
        if body.len() <= MULTIPART_PART_SIZE {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .content_type(content_type)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| classify(&e, key.as_str()))?;
            return Ok(());
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| classify(&e, key.as_str()))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Other("no multipart upload id".into()))?;
        match self.upload_parts(key, upload_id, &body).await {
            Ok(parts) => {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key.as_str())
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| classify(&e, key.as_str()))?;
                Ok(())
            }
            Err(e) => {
                // Leave no orphaned parts behind; the original error is what matters.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key.as_str())
                    .upload_id(upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        body: &Bytes,
    ) -> Result<Vec<CompletedPart>> {
        let mut parts = Vec::new();
        for (i, start) in (0..body.len()).step_by(MULTIPART_PART_SIZE).enumerate() {
            let number =
                i32::try_from(i + 1).map_err(|_| StorageError::Other("too many parts".into()))?;
            let chunk = body.slice(start..(start + MULTIPART_PART_SIZE).min(body.len()));
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key.as_str())
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(chunk))
                .send()
                .await
                .map_err(|e| classify(&e, key.as_str()))?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .part_number(number)
                    .build(),
            );
        }
        Ok(parts)
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|e| classify(&e, key.as_str()))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::Unavailable(format!("reading {key}: {e}")))?;
        Ok(body.into_bytes())
    }

    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                size: out
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                content_type: out.content_type().map(str::to_owned),
            })),
            Err(e) => match classify(&e, key.as_str()) {
                StorageError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|e| classify(&e, key.as_str()))?;
        Ok(())
    }

    pub async fn presign_get(
        &self,
        key: &ObjectKey,
        start: SystemTime,
        expires_in: Duration,
    ) -> Result<String> {
        let cfg = PresigningConfig::builder()
            .start_time(start)
            .expires_in(expires_in)
            .build()
            .map_err(|e| StorageError::Other(format!("presigning: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .presigned(cfg)
            .await
            .map_err(|e| classify(&e, key.as_str()))?;
        Ok(req.uri().to_owned())
    }

    pub async fn check(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify(&e, &self.bucket))?;
        Ok(())
    }

    /// Creates the bucket if it does not exist (tests and first-run setup).
    pub async fn ensure_bucket(&self) -> Result<()> {
        if self.check().await.is_ok() {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify(&e, &self.bucket))?;
        Ok(())
    }
}
