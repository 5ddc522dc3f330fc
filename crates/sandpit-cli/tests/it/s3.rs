//! An S3-compatible object store on loopback (`s3s-fs` over a temporary directory) for
//! tests of servers that keep images in object storage.

use std::path::Path;

pub const ACCESS_KEY: &str = "sandpit-fleet-key";
pub const SECRET_KEY: &str = "sandpit-fleet-secret-7Qx2";
pub const BUCKET: &str = "sandpit-images";

/// The server task; stopped (listener and connections) on drop.
pub struct S3 {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl S3 {
    /// Serve a fresh bucket [`BUCKET`] on 127.0.0.1.
    pub async fn start() -> S3 {
        use s3s::auth::SimpleAuth;
        use s3s::service::S3ServiceBuilder;

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs over a temp dir");
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let service = service.clone();
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        S3 {
            addr,
            task,
            _dir: dir,
        }
    }

    /// The environment a `sandpit serve` needs to use it, images under `prefix`.
    pub fn env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "SANDPIT_OBJECT_STORE",
                format!(
                    "s3://{BUCKET}/{prefix}?endpoint=http://{}&region=us-east-1",
                    self.addr
                ),
            ),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// Objects stored under `prefix` (files below the bucket directory).
    pub fn objects(&self, prefix: &str) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p).map_or(0, |d| {
                d.flatten()
                    .map(|e| {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            count(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
        }
        count(&self._dir.path().join(BUCKET).join(prefix))
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.task.abort();
    }
}
