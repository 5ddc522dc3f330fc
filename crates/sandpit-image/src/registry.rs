//! Pulling images from OCI/Docker registries with `oci-client`: anonymous, basic auth, and
//! the bearer token flow (the client answers a registry's `WWW-Authenticate` challenge
//! itself). Blobs are verified against their digests while they download; each layer is
//! unpacked once into the [`LayerStore`] and shared by every template that uses it.
#![expect(
    clippy::disallowed_methods,
    reason = "downloaded blobs are host-owned temp files; unpacked layers are written and removed only through sandpit_fs"
)]

use std::path::Path;
use std::time::Instant;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::ImageError;
use crate::config::ImageConfig;
use crate::store::{LayerId, LayerStore};
use crate::unpack::{Whiteouts, open_blob, unpack};

/// Credentials for one pull.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryCredentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// A token the registry accepts as is.
    Bearer(String),
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryCredentials::Anonymous => write!(f, "Anonymous"),
            RegistryCredentials::Basic { username, .. } => {
                write!(f, "Basic({username}, <redacted>)")
            }
            RegistryCredentials::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub credentials: RegistryCredentials,
    /// Registries (`host:port`) spoken to over plain HTTP. Loopback registries always are.
    pub insecure_registries: Vec<String>,
}

/// A pulled image: its layers (lowest first) in the store and its config.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: String,
    /// The manifest's digest (`sha256:…`).
    pub digest: String,
    pub layers: Vec<LayerId>,
    pub config: ImageConfig,
    /// Compressed bytes downloaded (0 when every layer was already in the store).
    pub downloaded_bytes: u64,
    /// Bytes of file content unpacked.
    pub unpacked_bytes: u64,
}

/// Parse an image reference (`busybox`, `127.0.0.1:5000/app:v1`, `…@sha256:…`).
pub fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    reference
        .parse::<Reference>()
        .map_err(|e| ImageError::Reference {
            reference: reference.into(),
            reason: e.to_string(),
        })
}

fn is_loopback_registry(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.")
}

/// A client for `reference`'s registry.
pub fn client_for(reference: &Reference, opts: &PullOptions) -> Client {
    let registry = reference.resolve_registry().to_string();
    let mut insecure = opts.insecure_registries.clone();
    if is_loopback_registry(&registry) {
        insecure.push(registry);
    }
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })
}

pub fn registry_auth(c: &RegistryCredentials) -> RegistryAuth {
    match c {
        RegistryCredentials::Anonymous => RegistryAuth::Anonymous,
        RegistryCredentials::Basic { username, password } => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        RegistryCredentials::Bearer(t) => RegistryAuth::Bearer(t.clone()),
    }
}

/// Pull `reference` into `store`. `progress` hears one line per layer.
pub async fn pull(
    store: &LayerStore,
    reference: &str,
    opts: &PullOptions,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<PulledImage, ImageError> {
    let r = parse_reference(reference)?;
    let client = client_for(&r, opts);
    let auth = registry_auth(&opts.credentials);
    let fail = |detail: String| ImageError::Pull {
        reference: reference.into(),
        detail,
    };
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&r, &auth)
        .await
        .map_err(|e| fail(error_chain(&e)))?;
    let config = ImageConfig::from_oci_config(&config);
    let mut layers = Vec::new();
    let (mut downloaded, mut unpacked) = (0u64, 0u64);
    for (i, layer) in manifest.layers.iter().enumerate() {
        let id = LayerId::from_digest(&layer.digest)?;
        if store.has_layer(&id) {
            progress(format!(
                "layer {}/{} {} already present",
                i + 1,
                manifest.layers.len(),
                &layer.digest[..19.min(layer.digest.len())]
            ));
            layers.push(id);
            continue;
        }
        let started = Instant::now();
        let blob = store.temp_path("blob");
        let file = tokio::fs::File::create(&blob)
            .await
            .map_err(ImageError::files("creating a download", &blob))?;
        // oci-client checks the bytes against the descriptor's digest (and the registry's
        // Docker-Content-Digest header) and fails the pull on a mismatch.
        let pulled = client.pull_blob(&r, layer, file).await;
        if let Err(e) = pulled {
            let _ = std::fs::remove_file(&blob);
            return Err(fail(format!("layer {}: {}", layer.digest, error_chain(&e))));
        }
        let size = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        downloaded += size;
        let dir = store.temp_path("layer");
        let stats = {
            let (blob, dir) = (blob.clone(), dir.clone());
            tokio::task::spawn_blocking(move || unpack_blob(&blob, &dir))
                .await
                .map_err(|e| fail(format!("unpack task: {e}")))?
        };
        let _ = std::fs::remove_file(&blob);
        let stats = match stats {
            Ok(s) => s,
            Err(e) => {
                store.discard_temp(&dir);
                return Err(e);
            }
        };
        unpacked += stats.bytes;
        store.publish_layer(&dir, &id)?;
        progress(format!(
            "layer {}/{} {} pulled: {} KiB in {} ms",
            i + 1,
            manifest.layers.len(),
            &layer.digest[..19.min(layer.digest.len())],
            size / 1024,
            started.elapsed().as_millis()
        ));
        layers.push(id);
    }
    Ok(PulledImage {
        reference: reference.into(),
        digest,
        layers,
        config,
        downloaded_bytes: downloaded,
        unpacked_bytes: unpacked,
    })
}

fn unpack_blob(blob: &Path, dir: &Path) -> Result<crate::unpack::UnpackStats, ImageError> {
    std::fs::create_dir_all(dir).map_err(ImageError::files("creating a layer", dir))?;
    unpack(open_blob(blob)?, dir, Whiteouts::Overlay)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_loopback() {
        let r = parse_reference("127.0.0.1:5000/app:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert!(is_loopback_registry(r.registry()));
        assert!(!is_loopback_registry("docker.io"));
        assert!(is_loopback_registry("localhost:5000"));
        assert!(parse_reference("UPPER/Case:!!").is_err());
    }
}
