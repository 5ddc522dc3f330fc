//! Pulling images from OCI/Docker registries with `oci-client`: anonymous, basic auth, and
//! the bearer token flow (the client answers a registry's `WWW-Authenticate` challenge
//! itself). Blobs are verified against their digests while they download; each layer is
//! unpacked once into the [`LayerStore`] and shared by every template that uses it.
//!
//! A pull is made on a tenant's behalf, to a registry the tenant names, so:
//! - every connection goes through the server's [`Dialer`] (by way of [`crate::proxy`]):
//!   never into the always-denied set, and to loopback, private or host addresses only for a
//!   registry the operator listed (`--allowed-registries`);
//! - an error never quotes what the registry (or whatever answered) sent: registry error
//!   codes of the OCI spec and HTTP statuses only ([`describe`]);
//! - a layer already in the store is reused only once this pull proved it may read it: the
//!   manifest came with this pull's credentials, the layer was stored from the same registry
//!   and repository before, and a `HEAD` of its blob with the same credentials succeeds.
//!   Otherwise the blob is downloaded and verified against its digest again (and not
//!   unpacked twice), so knowing a digest never gets a tenant someone else's layer.
#![expect(
    clippy::disallowed_methods,
    reason = "downloaded blobs are host-owned temp files; unpacked layers are written and removed only through sandpit_fs"
)]

use std::path::Path;
use std::time::Instant;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sandpit_net::Dialer;

use crate::ImageError;
use crate::config::ImageConfig;
use crate::proxy::PullProxy;
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
    /// Every connection of the pull goes through it; its exceptions are the registries the
    /// operator allows on loopback, private or host addresses. Without one, pulls fail.
    pub dialer: Option<Dialer>,
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

/// A client for `reference`'s registry that connects directly, for tests and tools that push
/// to a registry of their own. Never for a tenant's pull: [`pull`] goes through the dialer.
pub fn push_client(reference: &Reference, insecure_registries: &[String]) -> Client {
    client_config(reference, insecure_registries, None)
}

fn client_config(reference: &Reference, insecure: &[String], proxy: Option<&str>) -> Client {
    let registry = reference.resolve_registry().to_string();
    let mut insecure = insecure.to_vec();
    if is_loopback_registry(&registry) {
        insecure.push(registry);
    }
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        // Both schemes through the pull proxy, no exceptions (`no_proxy` unset: nothing
        // bypasses it, loopback included; system proxy settings are not read).
        http_proxy: proxy.map(str::to_string),
        https_proxy: proxy.map(str::to_string),
        no_proxy: None,
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
    let fail = |detail: String| ImageError::Pull {
        reference: reference.into(),
        detail,
    };
    let dialer = opts
        .dialer
        .clone()
        .ok_or_else(|| fail("pulls are off: no dialer configured".into()))?;
    let proxy = PullProxy::start(dialer)
        .await
        .map_err(|e| fail(format!("starting the pull proxy: {e}")))?;
    let client = client_config(&r, &opts.insecure_registries, Some(&proxy.url));
    let auth = registry_auth(&opts.credentials);
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&r, &auth)
        .await
        .map_err(|e| fail(why(&e, &proxy.refusals())))?;
    let config = ImageConfig::from_oci_config(&config);
    // Where the layers come from: a stored layer is reused without a download only for a
    // pull from where it was stored from before (see the module docs).
    let source = format!("{}/{}", r.resolve_registry(), r.repository());
    let total = manifest.layers.len();
    let mut layers = Vec::new();
    let (mut downloaded, mut unpacked) = (0u64, 0u64);
    for (i, layer) in manifest.layers.iter().enumerate() {
        let id = LayerId::from_digest(&layer.digest)?;
        let short = &layer.digest[..19.min(layer.digest.len())];
        if store.has_layer(&id) && store.layer_has_source(&id, &source) {
            // This pull's credentials must open the blob too; anything but a yes means a
            // download, which proves it (or fails).
            if let Ok(true) = client.blob_exists(&r, &layer.digest).await {
                progress(format!("layer {}/{total} {short} already present", i + 1));
                layers.push(id);
                continue;
            }
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
            return Err(fail(format!(
                "layer {}: {}",
                layer.digest,
                why(&e, &proxy.refusals())
            )));
        }
        let size = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        downloaded += size;
        if store.has_layer(&id) {
            // Stored from elsewhere before: now proven, not unpacked again.
            let _ = std::fs::remove_file(&blob);
            store.add_layer_source(&id, &source)?;
            progress(format!(
                "layer {}/{total} {short} verified: {} KiB in {} ms (already unpacked)",
                i + 1,
                size / 1024,
                started.elapsed().as_millis()
            ));
            layers.push(id);
            continue;
        }
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
        store.add_layer_source(&id, &source)?;
        progress(format!(
            "layer {}/{total} {short} pulled: {} KiB in {} ms",
            i + 1,
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

/// Why a request of a pull failed: the dialer's refusal if it refused a connection (the
/// client only saw an empty 403), otherwise [`describe`].
fn why(e: &OciDistributionError, refusals: &[sandpit_net::dial::Refusal]) -> String {
    match refusals.first() {
        Some(r) if r.range.liftable() => format!(
            "refused to connect: {r}; image pulls reach loopback, private and host addresses only \
             for registries the server lists in --allowed-registries"
        ),
        Some(r) => format!("refused to connect: {r}, which image pulls never reach"),
        None => describe(e),
    }
}

/// A failed registry request in words that quote nothing the other side sent: HTTP statuses,
/// the OCI spec's error codes and our own descriptions, never a response body (which could be
/// anything an address answered, and ends up in a tenant's build log).
pub fn describe(e: &OciDistributionError) -> String {
    use OciDistributionError as E;
    match e {
        E::AuthenticationFailure(_) => "authentication with the registry failed".into(),
        E::UnauthorizedError { .. } => "not authorized (HTTP 401)".into(),
        E::RegistryError { envelope, .. } => {
            let codes: Vec<&str> = envelope.errors.iter().map(|e| code_name(&e.code)).collect();
            format!("the registry answered {}", codes.join(", "))
        }
        E::ServerError { code, .. } => format!("the registry answered HTTP {code}"),
        E::ImageManifestNotFoundError(_) => "manifest not found".into(),
        E::DigestError(d) => match d {
            oci_client::errors::DigestError::VerificationError { expected, actual } => {
                format!("digest mismatch: expected {expected}, got {actual}")
            }
            _ => "the registry sent an unusable digest".into(),
        },
        E::ImageIndexParsingNoPlatformResolverError => "image index without a platform".into(),
        E::IncompatibleLayerMediaTypeError(_) | E::UnsupportedMediaTypeError(_) => {
            "unsupported media type".into()
        }
        E::UnsupportedSchemaVersionError(v) => format!("unsupported manifest schema version {v}"),
        E::ConfigConversionError(_)
        | E::JsonError(_)
        | E::ManifestEncodingError(_)
        | E::ManifestParsingError(_)
        | E::VersionedParsingError(_) => {
            "the registry sent a manifest or config that does not parse".into()
        }
        E::RegistryTokenDecodeError(_) => "the registry's token answer does not parse".into(),
        E::HeaderValueError(_) => "the registry sent an unreadable header".into(),
        E::RegistryNoDigestError => "the registry sent no digest header".into(),
        E::RegistryNoLocationError => "the registry sent no location header".into(),
        E::SpecViolationError(_) => "the registry does not follow the distribution spec".into(),
        E::PullNoLayersError => "the image has no layers".into(),
        E::UrlParseError(_) => "a URL from the registry does not parse".into(),
        E::IoError(io) => format!("i/o error: {}", io.kind()),
        E::RequestError(r) => {
            // Its kind and status, and for a connection error the (local) cause; never the
            // text of a body it failed to decode.
            if let Some(status) = r.status() {
                return format!("the registry answered HTTP {}", status.as_u16());
            }
            if r.is_timeout() {
                return "the registry did not answer in time".into();
            }
            if r.is_connect() {
                let mut cur = std::error::Error::source(r);
                while let Some(c) = cur {
                    if let Some(io) = c.downcast_ref::<std::io::Error>() {
                        return format!("could not connect to the registry: {}", io.kind());
                    }
                    cur = c.source();
                }
                return "could not connect to the registry".into();
            }
            if r.is_redirect() {
                return "too many redirects".into();
            }
            if r.is_decode() || r.is_body() {
                return "the registry's answer could not be read".into();
            }
            "the request to the registry failed".into()
        }
        E::GenericError(_) => "registry error".into(),
        E::PushNoDataError | E::PushLayerNoDataError => "nothing to push".into(),
    }
}

/// An OCI error code as the spec spells it; codes outside the spec are not quoted.
fn code_name(c: &OciErrorCode) -> &'static str {
    match c {
        OciErrorCode::BlobUnknown => "BLOB_UNKNOWN",
        OciErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
        OciErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
        OciErrorCode::DigestInvalid => "DIGEST_INVALID",
        OciErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
        OciErrorCode::ManifestInvalid => "MANIFEST_INVALID",
        OciErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
        OciErrorCode::ManifestUnverified => "MANIFEST_UNVERIFIED",
        OciErrorCode::NameInvalid => "NAME_INVALID",
        OciErrorCode::NameUnknown => "NAME_UNKNOWN",
        OciErrorCode::NotFound => "NOT_FOUND",
        OciErrorCode::SizeInvalid => "SIZE_INVALID",
        OciErrorCode::TagInvalid => "TAG_INVALID",
        OciErrorCode::Unauthorized => "UNAUTHORIZED",
        OciErrorCode::Denied => "DENIED",
        OciErrorCode::Unsupported => "UNSUPPORTED",
        OciErrorCode::Toomanyrequests => "TOOMANYREQUESTS",
        OciErrorCode::Other(_) => "an error code outside the OCI spec",
    }
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
