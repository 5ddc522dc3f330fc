//! Integration tests: every case runs against both backends, a `file://` store in a temp
//! directory and a real S3 server (`s3s-fs` over a temp directory, with SigV4 auth) on
//! 127.0.0.1, opened through the same URL parsing a node uses.
#![expect(
    clippy::disallowed_methods,
    reason = "the tests build fixture trees and inspect results by path"
)]

mod gc;
mod hostile;
mod roundtrip;
mod sparse;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use sandpit_objects::{S3Credentials, Store, StoreOptions, StoreUrl};
use tokio::task::JoinHandle;

const ACCESS_KEY: &str = "sandpit-test-key";
const SECRET_KEY: &str = "sandpit-test-secret-Zq81";
const BUCKET: &str = "sandpit-images";
const S3_PREFIX: &str = "cluster-a/images";

/// One backend for one test: the store under test, a raw handle on the same objects (to
/// tamper with them as an attacker or a bad disk would), and what keeps them alive.
pub struct Backend {
    pub name: &'static str,
    pub store: Store,
    raw: Arc<dyn ObjectStore>,
    prefix: &'static str,
    /// Scratch space for source and destination trees.
    pub work: tempfile::TempDir,
    _data: tempfile::TempDir,
    _server: Option<Server>,
}

impl Backend {
    /// A `file://` store in a temp directory.
    pub async fn local() -> Result<Backend> {
        let data = tempfile::tempdir()?;
        let root = data.path().join("objects");
        let url = StoreUrl::parse(&format!("file://{}", root.display()))?;
        let store = Store::open(&url, &StoreOptions::default())?;
        let raw = Arc::new(LocalFileSystem::new_with_prefix(&root)?);
        Ok(Backend {
            name: "file",
            store,
            raw,
            prefix: "",
            work: tempfile::tempdir()?,
            _data: data,
            _server: None,
        })
    }

    /// An S3 server (s3s-fs) on 127.0.0.1, and a store opened from an `s3://` URL.
    pub async fn s3() -> Result<Backend> {
        let data = tempfile::tempdir()?;
        std::fs::create_dir(data.path().join(BUCKET))?;
        let server = Server::start(data.path()).await?;
        let endpoint = format!("http://{}", server.addr);
        let url = StoreUrl::parse(&format!(
            "s3://{BUCKET}/{S3_PREFIX}?endpoint={endpoint}&region=us-east-1"
        ))?;
        let store = Store::open(&url, &test_options(SECRET_KEY))?;
        let raw = Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(BUCKET)
                .with_endpoint(&endpoint)
                .with_region("us-east-1")
                .with_allow_http(true)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()?,
        );
        Ok(Backend {
            name: "s3",
            store,
            raw,
            prefix: S3_PREFIX,
            work: tempfile::tempdir()?,
            _data: data,
            _server: Some(server),
        })
    }

    /// The full key of `rel` (`blobs/sha256/<hex>` …) in the raw store.
    pub fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Overwrite (or create) the object `rel` with `bytes`, behind the store's back.
    pub async fn tamper(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        use object_store::ObjectStoreExt;
        self.raw.put(&self.key(rel), bytes.into()).await?;
        Ok(())
    }

    /// How many objects there are under `rel` (`blobs/sha256`, `manifests/sha256`).
    pub async fn count(&self, rel: &str) -> Result<usize> {
        use futures::TryStreamExt;
        let prefix = self.key(rel);
        let all: Vec<_> = self.raw.list(Some(&prefix)).try_collect().await?;
        Ok(all.len())
    }

    /// A path in the scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }
}

/// Options with explicit credentials and no environment, so the machine's AWS_* variables
/// cannot change what a test does.
pub fn test_options(secret: &str) -> StoreOptions {
    StoreOptions {
        credentials: Some(S3Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: secret.into(),
            session_token: None,
        }),
        allow_http: false,
        read_env: false,
    }
}

/// The s3s-fs server task; aborted (and its listener closed) on drop.
struct Server {
    addr: std::net::SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(root: &Path) -> Result<Server> {
        use s3s::auth::SimpleAuth;
        use s3s::service::S3ServiceBuilder;

        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| anyhow::anyhow!("s3s-fs over the temp dir: {e:?}"))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let service = service.clone();
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(Server { addr, task })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.task.abort();
    }
}

/// Run an async test body once per backend, each in its own runtime, naming the backend
/// on failure.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn file() {
                    let b = $crate::Backend::local().await.expect("file backend");
                    super::$name(&b).await.expect("file backend");
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn s3() {
                    let b = $crate::Backend::s3().await.expect("s3 backend");
                    super::$name(&b).await.expect("s3 backend");
                }
            }
        )*
    };
}

/// What a tree holds, by relative path: kind, permission bits and, for files, size and
/// contents (compared whole: hashing in a debug build would dominate the tests' time).
pub type TreeListing = BTreeMap<String, (char, u32, u64, Vec<u8>)>;

/// Where two listings differ, without dumping file contents.
pub fn differences(a: &TreeListing, b: &TreeListing) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |e: Option<&(char, u32, u64, Vec<u8>)>| match e {
                None => "absent".to_string(),
                Some((kind, mode, size, _)) => format!("{kind} {mode:o} {size} bytes"),
            };
            format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// List `root` (not following symlinks) for comparison.
pub fn listing(root: &Path) -> Result<TreeListing> {
    let mut out = BTreeMap::new();
    let root_meta = std::fs::symlink_metadata(root)?;
    out.insert(
        ".".into(),
        ('d', root_meta.permissions().mode() & 0o7777, 0, Vec::new()),
    );
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&path)?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(rel, ('d', mode, 0, Vec::new()));
                pending.push(path);
            } else if meta.is_file() {
                out.insert(rel, ('f', mode, meta.size(), std::fs::read(&path)?));
            } else {
                out.insert(rel, ('?', mode, 0, Vec::new()));
            }
        }
    }
    Ok(out)
}

/// Deterministic pseudo-random bytes (xorshift64*), so a big file is not compressible or
/// sparse and a failure reproduces.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write `bytes` to `root/rel` (making parents) with `mode`.
pub fn put_file(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, bytes)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The names directly in `dir` (to check a failed pull left nothing beside its target).
pub fn names(dir: &Path) -> Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    out.sort();
    Ok(out)
}

/// A node runs pushes and pulls on spawned tasks (behind `async_trait`), so their futures
/// must be `Send`; this fails to compile otherwise.
#[test]
fn push_and_pull_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let store = Store::from_object_store(
        Arc::new(object_store::memory::InMemory::new()),
        "x",
        "memory",
    )
    .unwrap();
    let (limits, progress) = (
        sandpit_objects::Limits::default(),
        sandpit_objects::Progress::new(),
    );
    let push = sandpit_objects::push_dir(
        &store,
        Path::new("/nonexistent"),
        sandpit_objects::ImageKind::Checkpoint,
        &limits,
        &progress,
    );
    is_send(&push);
    let image: sandpit_objects::ImageRef = format!("sha256:{}", "0".repeat(64)).parse().unwrap();
    let pull = sandpit_objects::pull_dir(
        &store,
        image,
        Path::new("/nonexistent/x"),
        &limits,
        &progress,
    );
    is_send(&pull);
}
