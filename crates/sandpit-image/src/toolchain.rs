//! The offline `toolchain` root file system: Debian with bash, python3, node, git and
//! common tools, made by `mmdebstrap` through the host's own apt sources (no Docker Hub,
//! no registry). The layer is named by what goes into it (suite, packages, sources), so it
//! is built once and reused until one of them changes.
#![expect(
    clippy::disallowed_methods,
    reason = "the host's apt configuration and the mmdebstrap root the server builds itself"
)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;

use crate::ImageError;
use crate::store::{CacheKey, LayerId, LayerStore};

/// What the toolchain template holds.
pub const PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "curl",
    "git",
    "jq",
    "less",
    "make",
    "nodejs",
    "npm",
    "openssh-client",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "unzip",
    "vim-tiny",
    "wget",
    "xz-utils",
    "zip",
];

/// The host's apt source files (`sources.list`, `sources.list.d/*.list|*.sources`).
pub fn host_sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let main = Path::new("/etc/apt/sources.list");
    if std::fs::read_to_string(main)
        .is_ok_and(|t| t.lines().any(|l| l.trim_start().starts_with("deb")))
    {
        out.push(main.to_path_buf());
    }
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// The host's Debian/Ubuntu release codename.
pub fn host_suite() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
}

/// The layer id the toolchain gets with the current suite, packages and sources.
pub fn layer_id() -> Result<LayerId, ImageError> {
    let suite = host_suite()
        .ok_or_else(|| ImageError::Runner("no VERSION_CODENAME in /etc/os-release".into()))?;
    let mut h = Sha256::new();
    h.update(suite.as_bytes());
    h.update(PACKAGES.join(",").as_bytes());
    for s in host_sources() {
        h.update(s.as_os_str().as_encoded_bytes());
        h.update(std::fs::read(&s).unwrap_or_default());
    }
    Ok(LayerId::from_key(&CacheKey(format!("{:x}", h.finalize()))))
}

/// Build the toolchain layer (unless it exists) and return its directory. `log` hears
/// mmdebstrap's output line by line.
pub async fn ensure(
    store: &LayerStore,
    log: &(dyn Fn(String) + Send + Sync),
) -> Result<PathBuf, ImageError> {
    let id = layer_id()?;
    if store.has_layer(&id) {
        return Ok(store.layer_path(&id));
    }
    let suite = host_suite().expect("layer_id checked it");
    let sources = host_sources();
    if sources.is_empty() {
        return Err(ImageError::Runner("the host has no apt sources".into()));
    }
    let tmp = store.temp_path("toolchain");
    let mut cmd = tokio::process::Command::new("mmdebstrap");
    cmd.args(["--variant=apt", "--format=directory", "--mode=root"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        // No documentation and no apt caches: a smaller layer.
        .arg("--dpkgopt=path-exclude=/usr/share/{doc,man,info}/*")
        .arg(&suite)
        .arg(&tmp)
        .args(&sources)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        ImageError::Runner(format!(
            "running mmdebstrap (apt-get install mmdebstrap): {e}"
        ))
    })?;
    let (out, err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    // Both streams into one channel; it closes when both have ended.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let (tx2, tx3) = (tx.clone(), tx);
    let readers = [
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx2.send(l).await;
            }
        }),
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx3.send(l).await;
            }
        }),
    ];
    let mut tail: Vec<String> = Vec::new();
    while let Some(l) = rx.recv().await {
        log(format!("{l}\n"));
        tail.push(l);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    for r in readers {
        let _ = r.await;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ImageError::Runner(format!("waiting for mmdebstrap: {e}")))?;
    if !status.success() {
        crate::store::unmount_below(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ImageError::Runner(format!(
            "mmdebstrap failed ({status}):\n{}",
            tail.join("\n")
        )));
    }
    // The sandbox gets its resolver config from the server.
    let _ = std::fs::write(tmp.join("etc/resolv.conf"), "");
    store.publish_layer(&tmp, &id)
}
