//! One storage suite, run against a real S3-protocol server (s3s-fs, which checks SigV4
//! signatures) and against the local directory backend.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kiln_storage::{LocalStore, ObjectKey, S3Config, S3Store, Storage, StorageError};

use kiln_e2e::{
    S3_ACCESS_KEY as ACCESS_KEY, S3_SECRET_KEY as SECRET_KEY, S3Server, Scratch, free_port,
};

/// The S3 client settings for a test server.
fn s3_config(server: &S3Server, secret: &str) -> S3Config {
    config_at(
        &server.endpoint,
        secret,
        2,
        kiln_storage::S3_DEFAULT_TIMEOUT,
    )
}

/// The S3 client settings for `endpoint`, with this many tries of at most `timeout` each.
fn config_at(endpoint: &str, secret: &str, max_attempts: u32, timeout: Duration) -> S3Config {
    S3Config {
        bucket: "kiln-test".into(),
        endpoint: Some(endpoint.to_owned()),
        region: "us-east-1".into(),
        path_style: true,
        credentials: Some((ACCESS_KEY.into(), secret.into())),
        max_attempts,
        timeout,
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    S3,
    Local,
}

/// A store of either kind, and what keeps it alive.
struct Env {
    storage: Storage,
    _server: Option<S3Server>,
    _dir: Scratch,
}

async fn env(backend: Backend) -> Env {
    let dir = Scratch::new();
    match backend {
        Backend::S3 => {
            let server = S3Server::start();
            let store = S3Store::connect(s3_config(&server, SECRET_KEY))
                .await
                .expect("connect");
            store.ensure_bucket().await.expect("bucket");
            Env {
                storage: Storage::S3(store),
                _server: Some(server),
                _dir: dir,
            }
        }
        Backend::Local => {
            let local = LocalStore::new(
                dir.0.join("objects"),
                b"test-signing-secret-123".to_vec(),
                "http://kiln.test",
            )
            .expect("local store");
            Env {
                storage: Storage::Local(local),
                _server: None,
                _dir: dir,
            }
        }
    }
}

/// Fetches a signed URL the way a browser would: plain HTTP GET for S3; for the local store the
/// same check the HTTP API performs.
async fn fetch_signed(storage: &Storage, url: &str) -> Result<Bytes, String> {
    match storage {
        Storage::S3(_) => {
            // reqwest is built without a crypto provider of its own (rustls on ring).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let resp = reqwest::get(url).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            resp.bytes().await.map_err(|e| e.to_string())
        }
        Storage::Local(l) => l
            .open_signed(url, SystemTime::now())
            .await
            .map_err(|e| e.to_string()),
    }
}

macro_rules! both {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn s3() { super::$name(super::Backend::S3).await }
            #[tokio::test]
            async fn local() { super::$name(super::Backend::Local).await }
        }
    )+};
}

both!(
    put_get_head_delete,
    twenty_megabytes_round_trip_byte_exact,
    signed_urls_fetch_then_expire
);

async fn put_get_head_delete(backend: Backend) {
    let e = env(backend).await;
    let key = ObjectKey::kit("01JOBTEST", "photos/main.jpg").expect("key");
    assert!(matches!(
        e.storage.get(&key).await,
        Err(StorageError::NotFound(_))
    ));
    assert_eq!(e.storage.head(&key).await.expect("head"), None);
    e.storage
        .put(&key, Bytes::from_static(b"first"), "image/jpeg")
        .await
        .expect("put");
    e.storage
        .put(&key, Bytes::from_static(b"second version"), "image/jpeg")
        .await
        .expect("overwrite");
    assert_eq!(
        &e.storage.get(&key).await.expect("get")[..],
        b"second version"
    );
    let meta = e.storage.head(&key).await.expect("head").expect("exists");
    assert_eq!(
        (meta.size, meta.content_type.as_deref()),
        (14, Some("image/jpeg"))
    );
    e.storage.delete(&key).await.expect("delete");
    e.storage
        .delete(&key)
        .await
        .expect("deleting twice is fine");
    assert_eq!(e.storage.head(&key).await.expect("head"), None);
    e.storage.check().await.expect("ready");
}

async fn twenty_megabytes_round_trip_byte_exact(backend: Backend) {
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let body: Vec<u8> = (0..20 * 1024 * 1024 + 12_345).map(|_| rng.u8(..)).collect();
    let e = env(backend).await;
    let key = ObjectKey::kit("01JOBBIG", "lookbook.pdf").expect("key");
    e.storage
        .put(&key, Bytes::from(body.clone()), "application/pdf")
        .await
        .expect("put 20 MB");
    let back = e.storage.get(&key).await.expect("get");
    assert_eq!(back.len(), body.len());
    assert!(back[..] == body[..], "seed {seed}: bytes differ");
}

async fn signed_urls_fetch_then_expire(backend: Backend) {
    let e = env(backend).await;
    let key = ObjectKey::kit("01JOBSIGN", "copy/seo.json").expect("key");
    e.storage
        .put(
            &key,
            Bytes::from_static(b"{\"title\":\"ring\"}"),
            "application/json",
        )
        .await
        .expect("put");

    let url = e
        .storage
        .presign_get(&key, SystemTime::now(), Duration::from_secs(300))
        .await
        .expect("presign");
    assert_eq!(
        &fetch_signed(&e.storage, &url)
            .await
            .expect("valid URL fetches")[..],
        b"{\"title\":\"ring\"}"
    );

    // Signed an hour ago for one minute: expired, without waiting for a clock.
    let past = SystemTime::now() - Duration::from_secs(3_600);
    let old = e
        .storage
        .presign_get(&key, past, Duration::from_secs(60))
        .await
        .expect("presign");
    let err = fetch_signed(&e.storage, &old)
        .await
        .expect_err("expired URL must fail");
    assert!(
        err.contains("expired") || err.contains("403"),
        "expected an expiry refusal, got {err}"
    );

    // Pointing a valid signature at another object fails too.
    let other = ObjectKey::kit("01JOBSIGN", "copy/other.json").expect("key");
    e.storage
        .put(&other, Bytes::from_static(b"secret"), "application/json")
        .await
        .expect("put");
    let tampered = url.replace("seo.json", "other.json");
    assert!(
        fetch_signed(&e.storage, &tampered).await.is_err(),
        "tampered URL must fail"
    );
}

#[tokio::test]
async fn s3_wrong_credentials_fail_with_a_clear_error() {
    let server = S3Server::start();
    let good = S3Store::connect(s3_config(&server, SECRET_KEY))
        .await
        .expect("connect");
    good.ensure_bucket().await.expect("bucket");
    let bad = Storage::S3(
        S3Store::connect(s3_config(&server, "not-the-secret"))
            .await
            .expect("connect"),
    );
    let key = ObjectKey::kit("01JOBAUTH", "a.txt").expect("key");
    let err = bad
        .put(&key, Bytes::from_static(b"x"), "text/plain")
        .await
        .expect_err("wrong secret");
    assert!(matches!(err, StorageError::Auth(_)), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("refused the credentials"), "{err}");
}

#[tokio::test]
async fn s3_down_is_retryable() {
    let port = free_port(); // nothing listens here
    let cfg = config_at(
        &format!("http://127.0.0.1:{port}"),
        SECRET_KEY,
        1,
        kiln_storage::S3_DEFAULT_TIMEOUT,
    );
    let store = Storage::S3(S3Store::connect(cfg).await.expect("connect is lazy"));
    let key = ObjectKey::kit("01JOBDOWN", "a.txt").expect("key");
    let err = store
        .put(&key, Bytes::from_static(b"x"), "text/plain")
        .await
        .expect_err("nobody listens");
    assert!(err.is_retryable(), "{err:?}");
}

/// A server that takes every connection and reads the request but never answers (hung, or a
/// half-open connection): each try gives up after the timeout, and the call fails retryable.
/// Without a timeout the SDK waited for ever, and a kit attempt sat silent until its deadline.
#[tokio::test]
async fn s3_that_never_answers_fails_retryable_after_its_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut sink).await;
            }));
        }
    });
    let cfg = config_at(
        &format!("http://127.0.0.1:{port}"),
        SECRET_KEY,
        2,
        Duration::from_millis(500),
    );
    let store = Storage::S3(S3Store::connect(cfg).await.expect("connect is lazy"));
    let key = ObjectKey::kit("01JOBHUNG", "a.txt").expect("key");
    // The bound only turns the old hang into a failure: two tries of 0.5 s and the SDK's
    // backoff between them end well inside it.
    let err = tokio::time::timeout(Duration::from_secs(60), store.get(&key))
        .await
        .expect("the call gave up on a server that never answers")
        .expect_err("nothing answered");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the request reached the server"
    );
}

#[tokio::test]
async fn local_store_refuses_to_escape_and_writes_atomically() {
    let dir = Scratch::new();
    let store = LocalStore::new(
        dir.0.join("objects"),
        b"test-signing-secret-123".to_vec(),
        "http://kiln.test",
    )
    .expect("store");
    assert!(ObjectKey::parse("kits/../../etc/passwd").is_err());
    assert!(ObjectKey::kit("job", "../x").is_err());
    let key = ObjectKey::kit("01JOB", "a/b/c.json").expect("key");
    store
        .put(&key, Bytes::from_static(b"{}"), "application/json")
        .await
        .expect("put");
    // Nothing is left in the temporary area after a completed write.
    let leftovers = std::fs::read_dir(dir.0.join("objects/.tmp"))
        .expect("tmp dir")
        .count();
    assert_eq!(leftovers, 0);
    assert!(store.path_of(&key).expect("path").starts_with(store.root()));
    // A bad signature and a short secret are refused.
    let url = store
        .presign_get(&key, SystemTime::now(), Duration::from_secs(60))
        .expect("presign");
    let flipped = if url.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{flipped}", &url[..url.len() - 1]);
    assert!(matches!(
        store.open_signed(&forged, SystemTime::now()).await,
        Err(StorageError::BadSignature)
    ));
    assert!(LocalStore::new(dir.0.join("x"), b"short".to_vec(), "http://kiln.test").is_err());
}
