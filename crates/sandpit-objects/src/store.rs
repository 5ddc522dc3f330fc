//! Where images live: a store URL, parsed and checked, and the opened [`Store`].
//!
//! Two schemes:
//! - `file:///abs/path`: a local directory (object_store's `LocalFileSystem`, fsync on
//!   write), created if missing. For one box, or a shared mount.
//! - `s3://bucket[/prefix]?endpoint=…&region=…&allow_http=…`: any S3-compatible service
//!   (object_store's `AmazonS3`, path-style requests). Every parameter is optional.
//!
//! Rules: no credentials in the URL (they come from [`StoreOptions::credentials`] or the
//! `AWS_*` environment); no unknown or repeated parameters; bucket names as S3 defines them;
//! prefix components of `[A-Za-z0-9._-]` only, never `.` or `..`; a plain `http://`
//! endpoint only on loopback unless `allow_http=true` (or [`StoreOptions::allow_http`]) says
//! otherwise. Error messages name the rule broken and never echo the URL.

use std::fmt;
use std::net::IpAddr;
use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, StaticCredentialProvider};
use url::Url;

use crate::ObjectsError;

/// A parsed and checked store location. `Display` writes it back without anything secret
/// (there is nothing secret in it: credentials in the URL are refused).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    location: Location,
}

#[derive(Clone, PartialEq, Eq)]
enum Location {
    File {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        /// Components joined by `/`, no leading or trailing `/`; may be empty.
        prefix: String,
        endpoint: Option<Url>,
        region: Option<String>,
        allow_http: bool,
    },
}

/// Credentials for an S3 store. `Debug` shows the key id only; the secret and token are
/// never formatted.
#[derive(Clone)]
pub struct S3Credentials {
    /// The access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// A session token for temporary credentials (`AWS_SESSION_TOKEN`).
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How to open a store, beyond its URL.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Credentials for `s3://`. When set they win over everything in the environment.
    /// When `None`, object_store's usual chain applies (`AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, web identity, ECS, then instance
    /// metadata) as far as `read_env` lets it see the environment.
    pub credentials: Option<S3Credentials>,
    /// Allow a plain-HTTP endpoint that is not loopback (as the URL's `allow_http=true`).
    pub allow_http: bool,
    /// Read `AWS_*` variables (credentials, region, endpoint when the URL names none, and
    /// object_store's other S3 keys). The URL's own settings win over the environment;
    /// `AWS_ALLOW_HTTP` is ignored (the HTTP rule above is the only one), and so are
    /// object_store's HTTP client keys (timeouts, proxy): [`Store::open`] sets its own.
    /// Default `true`.
    pub read_env: bool,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            credentials: None,
            allow_http: false,
            read_env: true,
        }
    }
}

/// An opened object store plus the key prefix images live under. Cheap to clone; share one
/// per process.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    describe: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.describe)
            .finish()
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe)
    }
}

impl StoreUrl {
    /// Parse and check a store URL (see the module docs for the rules). Opens nothing, so
    /// a configuration loader can call it at startup.
    pub fn parse(text: &str) -> Result<StoreUrl, ObjectsError> {
        let bad = |reason: &str| ObjectsError::InvalidUrl {
            reason: reason.into(),
        };
        let scheme_end = text
            .find("://")
            .ok_or_else(|| bad("expected file:///path or s3://bucket[/prefix]"))?;
        match &text[..scheme_end] {
            "file" => parse_file(text),
            "s3" => parse_s3(text),
            _ => Err(bad(
                "unsupported scheme (expected file:///path or s3://bucket[/prefix])",
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::File { root } => write!(f, "file://{}", root.display()),
            Location::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                allow_http,
            } => {
                write!(f, "s3://{bucket}")?;
                if !prefix.is_empty() {
                    write!(f, "/{prefix}")?;
                }
                let mut sep = '?';
                if let Some(e) = endpoint {
                    write!(f, "{sep}endpoint={}", e.as_str().trim_end_matches('/'))?;
                    sep = '&';
                }
                if let Some(r) = region {
                    write!(f, "{sep}region={r}")?;
                    sep = '&';
                }
                if *allow_http {
                    write!(f, "{sep}allow_http=true")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

impl Store {
    /// Open the store `url` names. For `file://` the root directory is created if missing
    /// (it is the node's own path). For `s3://` nothing is contacted yet: a wrong bucket or
    /// credential shows at the first operation. Requests have a 5 s connect timeout and a
    /// 60 s read timeout (a stalled transfer fails) but no overall timeout, so a
    /// multi-GiB blob may take as long as it needs.
    pub fn open(url: &StoreUrl, options: &StoreOptions) -> Result<Store, ObjectsError> {
        match &url.location {
            Location::File { root } => {
                // The store root is the node's own directory, never a tenant's.
                sandpit_fs::TreeDir::create(root).map_err(|source| ObjectsError::CreateRoot {
                    path: root.clone(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|source| ObjectsError::OpenStore {
                        store: url.to_string(),
                        source,
                    })?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                Ok(Store {
                    inner: Arc::new(fs),
                    prefix: String::new(),
                    describe: url.to_string(),
                })
            }
            Location::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                allow_http,
            } => {
                let mut b = if options.read_env {
                    AmazonS3Builder::from_env()
                } else {
                    AmazonS3Builder::new()
                };
                b = b.with_bucket_name(bucket);
                if let Some(r) = region {
                    b = b.with_region(r);
                }
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e.as_str().trim_end_matches('/'));
                }
                // The endpoint in effect may come from AWS_ENDPOINT; the HTTP rule applies
                // to it all the same.
                let allow = match b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
                    Some(e) => http_allowed(&e, *allow_http || options.allow_http)?,
                    None => false,
                };
                if let Some(c) = &options.credentials {
                    b = b.with_credentials(Arc::new(StaticCredentialProvider::new(
                        AwsCredential {
                            key_id: c.access_key_id.clone(),
                            secret_key: c.secret_access_key.clone(),
                            token: c.session_token.clone(),
                        },
                    )));
                }
                let client = ClientOptions::new()
                    .with_allow_http(allow)
                    .with_timeout_disabled()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_read_timeout(Duration::from_secs(60));
                let s3 = b
                    .with_allow_http(allow)
                    .with_virtual_hosted_style_request(false)
                    .with_client_options(client)
                    .build()
                    .map_err(|source| ObjectsError::OpenStore {
                        store: url.to_string(),
                        source,
                    })?;
                Ok(Store {
                    inner: Arc::new(s3),
                    prefix: prefix.clone(),
                    describe: url.to_string(),
                })
            }
        }
    }

    /// A store over any object_store backend (GCS, Azure, in-memory …), images under
    /// `prefix` (`/`-separated components, may be empty). `describe` names it in messages
    /// and must hold nothing secret.
    pub fn from_object_store(
        inner: Arc<dyn ObjectStore>,
        prefix: &str,
        describe: &str,
    ) -> Result<Store, ObjectsError> {
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_prefix(prefix)?;
        }
        Ok(Store {
            inner,
            prefix: prefix.to_string(),
            describe: describe.to_string(),
        })
    }

    /// The backend.
    pub(crate) fn inner(&self) -> &dyn ObjectStore {
        &*self.inner
    }

    /// The full key of `rel` (which is made of plain components) under the prefix.
    pub(crate) fn key(&self, rel: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(rel)
        } else {
            StorePath::from(format!("{}/{rel}", self.prefix))
        }
    }
}

/// Whether a plain-HTTP `endpoint` may be used: https always; http on loopback, or when
/// allowed explicitly. Anything else is an error.
fn http_allowed(endpoint: &str, explicitly: bool) -> Result<bool, ObjectsError> {
    let bad = |reason: &str| ObjectsError::InvalidUrl {
        reason: reason.into(),
    };
    let url = Url::parse(endpoint).map_err(|_| bad("the endpoint is not a URL"))?;
    match url.scheme() {
        "https" => Ok(false),
        "http" if explicitly || is_loopback(&url) => Ok(true),
        "http" => Err(bad(
            "plain-HTTP endpoint that is not loopback: set allow_http=true to use it anyway",
        )),
        _ => Err(bad("the endpoint's scheme must be http or https")),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn parse_file(text: &str) -> Result<StoreUrl, ObjectsError> {
    let bad = |reason: &str| ObjectsError::InvalidUrl {
        reason: reason.into(),
    };
    // Look at the raw path before the URL parser resolves `..` and `.` away.
    let raw = text.strip_prefix("file://").unwrap_or_default();
    if !raw.starts_with('/') {
        return Err(bad("file URLs must be file:///absolute/path (no host)"));
    }
    let raw_path = raw.split(['?', '#']).next().unwrap_or_default();
    let lower = raw_path.to_ascii_lowercase();
    if raw_path.split('/').any(|c| c == "." || c == "..")
        || ["%2e", "%2f", "%00"].iter().any(|e| lower.contains(e))
    {
        return Err(bad(
            "the path must not contain . or .. components (nor encoded dots, slashes or NULs)",
        ));
    }
    let url = Url::parse(text).map_err(|_| bad("not a valid file URL"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("file URLs take no query or fragment"));
    }
    if url.host().is_some() {
        return Err(bad("file URLs must be file:///absolute/path (no host)"));
    }
    let root = url
        .to_file_path()
        .map_err(|()| bad("not a valid local path"))?;
    if root.parent().is_none() {
        return Err(bad("the store root must not be /"));
    }
    if !root
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(bad("the path must be absolute and normalized"));
    }
    Ok(StoreUrl {
        location: Location::File { root },
    })
}

fn parse_s3(text: &str) -> Result<StoreUrl, ObjectsError> {
    let bad = |reason: &str| ObjectsError::InvalidUrl {
        reason: reason.into(),
    };
    // Look at the raw path before the URL parser resolves `..` and `.` away.
    let raw = text.strip_prefix("s3://").unwrap_or_default();
    let raw_path = raw.split(['?', '#']).next().unwrap_or_default();
    if raw_path.contains('%') || raw_path.split('/').skip(1).any(|c| c == "." || c == "..") {
        return Err(bad(
            "the prefix must be /-separated components of A-Z, a-z, 0-9, . _ - (no empty, . or .. components)",
        ));
    }
    let url = Url::parse(text).map_err(|_| bad("not a valid s3:// URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials in the URL are refused: use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or explicit credentials",
        ));
    }
    if url.port().is_some() {
        return Err(bad(
            "an s3:// URL names a bucket, not a host:port (use endpoint=)",
        ));
    }
    if url.fragment().is_some() {
        return Err(bad("s3:// URLs take no fragment"));
    }
    let bucket = url
        .host_str()
        .ok_or_else(|| bad("missing bucket name (s3://bucket[/prefix])"))?
        .to_string();
    check_bucket(&bucket)?;
    let prefix = url.path().trim_start_matches('/').trim_end_matches('/');
    if !prefix.is_empty() {
        check_prefix(prefix)?;
    }

    let mut endpoint = None;
    let mut region = None;
    let mut allow_http = None;
    for (key, value) in url.query_pairs() {
        match &*key {
            "endpoint" if endpoint.is_none() => {
                endpoint = Some(parse_endpoint(&value)?);
            }
            "region" if region.is_none() => {
                let ok = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    return Err(bad("region must be lowercase letters, digits and -"));
                }
                region = Some(value.into_owned());
            }
            "allow_http" if allow_http.is_none() => {
                allow_http = Some(match &*value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("allow_http must be true or false")),
                });
            }
            "endpoint" | "region" | "allow_http" => {
                return Err(bad("a query parameter is repeated"));
            }
            // The name is not echoed: a misplaced secret could be in it.
            _ => {
                return Err(bad(
                    "unknown query parameter (allowed: endpoint, region, allow_http)",
                ));
            }
        }
    }
    let allow_http = allow_http.unwrap_or(false);
    if let Some(e) = &endpoint {
        http_allowed(e.as_str(), allow_http)?;
    }
    Ok(StoreUrl {
        location: Location::S3 {
            bucket,
            prefix: prefix.to_string(),
            endpoint,
            region,
            allow_http,
        },
    })
}

fn parse_endpoint(value: &str) -> Result<Url, ObjectsError> {
    let bad = |reason: &str| ObjectsError::InvalidUrl {
        reason: reason.into(),
    };
    let url = Url::parse(value).map_err(|_| bad("the endpoint is not a URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials in the endpoint are refused"));
    }
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(bad("the endpoint must be http(s)://host[:port]"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "the endpoint must be http(s)://host[:port] with no path or query",
        ));
    }
    Ok(url)
}

/// S3 bucket naming: 3–63 characters of lowercase letters, digits, `.` and `-`, starting
/// and ending with a letter or digit, no `..`.
fn check_bucket(bucket: &str) -> Result<(), ObjectsError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && bucket
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && !bucket.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ObjectsError::InvalidUrl {
            reason: "bucket names are 3-63 characters of a-z, 0-9, . and -".into(),
        })
    }
}

/// A key prefix: `/`-separated components of `[A-Za-z0-9._-]`, none empty, `.` or `..`.
fn check_prefix(prefix: &str) -> Result<(), ObjectsError> {
    let ok = prefix.len() <= 512
        && prefix.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(ObjectsError::InvalidUrl {
            reason: "the prefix must be /-separated components of A-Z, a-z, 0-9, . _ - (no empty, . or .. components)".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str) -> String {
        match StoreUrl::parse(text) {
            Err(ObjectsError::InvalidUrl { reason }) => reason,
            other => panic!("{text}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn file_urls() {
        let u = StoreUrl::parse("file:///var/lib/sandpit/objects").unwrap();
        assert_eq!(u.to_string(), "file:///var/lib/sandpit/objects");
        for bad in [
            "file://host/x",
            "file:///a/../b",
            "file:///a/./b",
            "file:///a?x=1",
            "file:///a/%2e%2e/b",
            "file:///a%2fb",
            "file:///",
            "file:relative",
        ] {
            reason(bad);
        }
    }

    #[test]
    fn s3_urls() {
        let u = StoreUrl::parse(
            "s3://sandpit-images/node/a?endpoint=http://127.0.0.1:9000&region=eu-west-1",
        )
        .unwrap();
        assert_eq!(
            u.to_string(),
            "s3://sandpit-images/node/a?endpoint=http://127.0.0.1:9000&region=eu-west-1"
        );
        let u = StoreUrl::parse("s3://bucket/").unwrap();
        assert_eq!(u.to_string(), "s3://bucket");
        StoreUrl::parse("s3://bucket?endpoint=http://[::1]:9000").unwrap();
        StoreUrl::parse("s3://bucket?endpoint=http://localhost:9000").unwrap();
        StoreUrl::parse("s3://bucket?endpoint=https://minio.internal").unwrap();
        StoreUrl::parse("s3://bucket?endpoint=http://minio.internal:9000&allow_http=true").unwrap();
    }

    #[test]
    fn s3_url_rules() {
        assert!(reason("s3://bucket?endpoint=http://10.0.0.5:9000").contains("allow_http"));
        assert!(reason("s3://bucket?endpoint=ftp://127.0.0.1").contains("http"));
        assert!(reason("s3://bucket?endpoint=http://127.0.0.1/path").contains("no path"));
        assert!(reason("s3://bucket?region=x&region=y").contains("repeated"));
        assert!(reason("s3://bucket?allow_http=yes").contains("true or false"));
        reason("s3://Bucket_Name");
        reason("s3://ab");
        reason("s3://bucket/a//b");
        reason("s3://bucket/a/../b");
        reason("s3://bucket/a/%2e%2e/b");
        reason("s3://bucket/./b");
        reason("s3://bucket/a b");
        reason("s3://bucket:9000/x");
        reason("s3:///prefix");
        reason("gs://bucket");
        reason("bucket");
    }

    #[test]
    fn secrets_are_never_echoed() {
        for text in [
            "s3://AKIAEXAMPLE:SuperSecret123@bucket/x",
            "s3://bucket/x?SuperSecret123=1",
            "s3://bucket/x?secret=SuperSecret123",
            "s3://bucket/x?endpoint=http://u:SuperSecret123@127.0.0.1:9000",
            "s3://bucket/x?region=SuperSecret123",
        ] {
            let r = reason(text);
            assert!(!r.contains("SuperSecret123"), "{text}: {r}");
            assert!(!r.contains("AKIAEXAMPLE"), "{text}: {r}");
        }
        let c = S3Credentials {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "SuperSecret123".into(),
            session_token: Some("TokenSecret".into()),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("SuperSecret123") && !shown.contains("TokenSecret"));
    }

    #[test]
    fn keys_join_the_prefix() {
        let inner = Arc::new(object_store::memory::InMemory::new());
        let s = Store::from_object_store(inner.clone(), "/a/b/", "mem").unwrap();
        assert_eq!(s.key("blobs/x").as_ref(), "a/b/blobs/x");
        let s = Store::from_object_store(inner.clone(), "", "mem").unwrap();
        assert_eq!(s.key("blobs/x").as_ref(), "blobs/x");
        assert!(Store::from_object_store(inner, "a/../b", "mem").is_err());
    }

    #[test]
    fn http_rule_applies_to_the_effective_endpoint() {
        assert!(!http_allowed("https://s3.example.com", false).unwrap());
        assert!(http_allowed("http://127.0.0.1:9000", false).unwrap());
        assert!(http_allowed("http://example.com", true).unwrap());
        assert!(http_allowed("http://example.com", false).is_err());
    }
}
