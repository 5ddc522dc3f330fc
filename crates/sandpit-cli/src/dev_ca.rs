//! `sandpit serve --tls-dev-ca DIR` and `sandpit tls dev-ca DIR`: HTTPS for development
//! without buying or requesting a certificate. A local CA is made once in `DIR` and kept; the
//! server's certificate, signed by it, is made again whenever the names it must carry change
//! or it comes within [`RENEW_BEFORE`] of its end. Trust `DIR/ca.pem` in the clients (curl
//! `--cacert`, `SSL_CERT_FILE`, `NODE_EXTRA_CA_CERTS`, the browser's authorities).
//!
//! The files, written whole (temporary file, fsync, rename) so a crash leaves the old ones:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the CA's certificate (10 years) |
//! | `ca-key.pem` | its private key, mode 0600 |
//! | `server.pem` | the server's certificate (1 year), then the CA's |
//! | `server-key.pem` | its private key, mode 0600 |
//! | `server.json` | the names and the end of `server.pem`, to know when to make it again |
//!
//! This is for development and closed networks: whoever reads `ca-key.pem` can make
//! certificates every client trusting `ca.pem` believes. The directory is made 0700.
#![expect(
    clippy::disallowed_methods,
    reason = "the operator's directory and /proc, no tenant tree"
)]

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a server certificate is valid.
const SERVER_VALIDITY: Duration = Duration::days(365);
/// A server certificate this close to its end is made again at start.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// The CA's common name.
const CA_NAME: &str = "Sandpit development CA";

/// Where a development CA's files are.
#[derive(Debug, Clone)]
pub struct DevCa {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    meta: PathBuf,
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Made {
    /// A new CA (clients must trust the new `ca.pem`).
    pub ca: bool,
    /// A new server certificate.
    pub server: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ServerMeta {
    names: Vec<String>,
    /// Unix seconds.
    not_after: i64,
}

impl DevCa {
    pub fn at(dir: &Path) -> DevCa {
        DevCa {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            meta: dir.join("server.json"),
        }
    }
}

/// The names a development server certificate carries: loopback, the listen address when it
/// is a particular one, this host's name, and the preview domain with its subdomains (the
/// previews' and the E2B hosts).
pub fn names_for(listen: &std::net::SocketAddr, preview_domain: &str) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    names.push(preview_domain.to_string());
    names.push(format!("*.{preview_domain}"));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Make (or keep) the CA in `dir` and a server certificate for `names`, signed by it.
pub fn ensure(dir: &Path, names: &[String]) -> anyhow::Result<(DevCa, Made)> {
    anyhow::ensure!(!names.is_empty(), "a server certificate needs a name");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", dir.display()))?;
    let files = DevCa::at(dir);
    let now = OffsetDateTime::now_utc();
    let (issuer, made_ca) = match (files.ca_cert.exists(), files.ca_key.exists()) {
        (true, true) => (load_ca(&files)?, false),
        (false, false) => (make_ca(&files, now)?, true),
        (cert, _) => anyhow::bail!(
            "{}: {} is there but {} is not; move the directory away to make a new CA (clients \
             must then trust the new ca.pem)",
            dir.display(),
            if cert { "ca.pem" } else { "ca-key.pem" },
            if cert { "ca-key.pem" } else { "ca.pem" },
        ),
    };
    let wanted: Vec<String> = names.to_vec();
    let current = std::fs::read(&files.meta)
        .ok()
        .and_then(|b| serde_json::from_slice::<ServerMeta>(&b).ok());
    let fresh = !made_ca
        && files.server_cert.exists()
        && files.server_key.exists()
        && current.is_some_and(|m| {
            m.names == wanted && m.not_after - (now + RENEW_BEFORE).unix_timestamp() > 0
        });
    if !fresh {
        make_server(&files, &issuer, &wanted, now)?;
    }
    Ok((
        files,
        Made {
            ca: made_ca,
            server: !fresh,
        },
    ))
}

fn load_ca(files: &DevCa) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key_pem = std::fs::read_to_string(&files.ca_key)
        .with_context(|| format!("reading {}", files.ca_key.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{}: not a PEM private key", files.ca_key.display()))?;
    let cert_pem = std::fs::read_to_string(&files.ca_cert)
        .with_context(|| format!("reading {}", files.ca_cert.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).with_context(|| {
        format!(
            "{}: not a CA certificate for {}",
            files.ca_cert.display(),
            files.ca_key.display()
        )
    })?;
    Ok(issuer)
}

fn make_ca(files: &DevCa, now: OffsetDateTime) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "Sandpit");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + CA_VALIDITY;
    let key = KeyPair::generate().context("generating the CA's key")?;
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_file(&files.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.ca_cert, cert.pem().as_bytes(), 0o644)?;
    Ok(Issuer::new(params, key))
}

fn make_server(
    files: &DevCa,
    issuer: &Issuer<'static, KeyPair>,
    names: &[String],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(n) => n
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| anyhow::anyhow!("{n:?} is not a DNS name: {e}")),
            Err(_) => Err(anyhow::anyhow!(
                "{n:?} is not a DNS name (letters, digits, '-' and '.', a leading '*.' at most) \
                 or an IP address"
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::days(1);
    params.not_after = now + SERVER_VALIDITY;
    let key = KeyPair::generate().context("generating the server's key")?;
    let cert = params
        .signed_by(&key, issuer)
        .context("signing the server's certificate")?;
    let ca_pem = std::fs::read_to_string(&files.ca_cert)
        .with_context(|| format!("reading {}", files.ca_cert.display()))?;
    write_file(&files.server_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(
        &files.server_cert,
        format!("{}{}", cert.pem(), ca_pem).as_bytes(),
        0o644,
    )?;
    let meta = ServerMeta {
        names: names.to_vec(),
        not_after: params.not_after.unix_timestamp(),
    };
    write_file(&files.meta, &serde_json::to_vec_pretty(&meta)?, 0o644)?;
    Ok(())
}

/// A host name a certificate may carry: dot-separated labels of letters, digits and '-'
/// (at most 63 bytes each, 253 in all), the first one possibly `*`.
fn is_dns_name(n: &str) -> bool {
    let rest = n.strip_prefix("*.").unwrap_or(n);
    n.len() <= 253
        && !rest.is_empty()
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Write `path` whole: a temporary file beside it with `mode`, fsync, rename.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// How to trust the CA, for the operator.
pub fn trust_hint(files: &DevCa) -> String {
    let ca = files.ca_cert.display();
    format!(
        "trust {ca} in clients: curl --cacert {ca}; SSL_CERT_FILE={ca} (Python, Go, the CLI); \
         NODE_EXTRA_CA_CERTS={ca} (Node); or cp {ca} /usr/local/share/ca-certificates/sandpit-dev.crt \
         && update-ca-certificates"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn names() -> Vec<String> {
        vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "sandpit.example".into(),
            "*.sandpit.example".into(),
        ]
    }

    /// Whether `server.pem` chains to `ca.pem` for `name`, as a client would check it.
    fn verifies(files: &DevCa, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&files.ca_cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(&files.server_cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(drop)
    }

    #[test]
    fn makes_a_ca_once_and_a_server_certificate_clients_accept() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let (files, made) = ensure(&tls, &names()).unwrap();
        assert_eq!(
            made,
            Made {
                ca: true,
                server: true
            }
        );
        for name in [
            "localhost",
            "127.0.0.1",
            "sandpit.example",
            "sb1-8080.sandpit.example",
        ] {
            verifies(&files, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verifies(&files, "other.example").is_err());
        // Keys are private, the directory too.
        for p in [&files.ca_key, &files.server_key] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert_eq!(
            std::fs::metadata(&tls).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // The certificate loads as the server loads --tls-cert/--tls-key.
        crate::tls::load(&files.server_cert, &files.server_key).unwrap();

        // Same names: nothing is made again.
        let ca_before = std::fs::read(&files.ca_cert).unwrap();
        let server_before = std::fs::read(&files.server_cert).unwrap();
        let (_, made) = ensure(&tls, &names()).unwrap();
        assert_eq!(
            made,
            Made {
                ca: false,
                server: false
            }
        );
        assert_eq!(std::fs::read(&files.server_cert).unwrap(), server_before);

        // Another name: a new server certificate from the same CA.
        let mut more = names();
        more.push("api.sandpit.example".into());
        let (_, made) = ensure(&tls, &more).unwrap();
        assert_eq!(
            made,
            Made {
                ca: false,
                server: true
            }
        );
        assert_eq!(std::fs::read(&files.ca_cert).unwrap(), ca_before);
        assert_ne!(std::fs::read(&files.server_cert).unwrap(), server_before);
        verifies(&files, "api.sandpit.example").unwrap();
    }

    #[test]
    fn a_certificate_near_its_end_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = ensure(dir.path(), &names()).unwrap();
        let mut meta: ServerMeta =
            serde_json::from_slice(&std::fs::read(&files.meta).unwrap()).unwrap();
        meta.not_after = (OffsetDateTime::now_utc() + Duration::days(10)).unix_timestamp();
        std::fs::write(&files.meta, serde_json::to_vec(&meta).unwrap()).unwrap();
        let (_, made) = ensure(dir.path(), &names()).unwrap();
        assert!(made.server && !made.ca);
    }

    #[test]
    fn a_broken_ca_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = ensure(dir.path(), &names()).unwrap();
        std::fs::write(&files.ca_key, "not a key").unwrap();
        let e = format!("{:#}", ensure(dir.path(), &names()).unwrap_err());
        assert!(
            e.contains("ca-key.pem") && e.contains("not a PEM private key"),
            "{e}"
        );
        std::fs::remove_file(&files.ca_key).unwrap();
        let e = format!("{:#}", ensure(dir.path(), &names()).unwrap_err());
        assert!(e.contains("ca-key.pem is not"), "{e}");
        // A name that is no DNS name is refused, not written.
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            ensure(dir.path(), &["bad name\n".to_string()]).unwrap_err()
        );
        assert!(e.contains("not a DNS name"), "{e}");
    }

    #[test]
    fn names_cover_loopback_and_the_preview_domain() {
        let n = names_for(&"0.0.0.0:7878".parse().unwrap(), "sandpit.example");
        for want in [
            "localhost",
            "127.0.0.1",
            "sandpit.example",
            "*.sandpit.example",
        ] {
            assert!(n.iter().any(|x| x == want), "{want} in {n:?}");
        }
        assert!(!n.iter().any(|x| x == "0.0.0.0"));
        let n = names_for(&"10.1.2.3:443".parse().unwrap(), "localhost");
        assert!(n.iter().any(|x| x == "10.1.2.3"));
        assert_eq!(n.iter().filter(|x| *x == "localhost").count(), 1);
    }
}
