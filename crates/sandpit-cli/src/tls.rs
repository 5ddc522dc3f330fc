//! HTTPS for `sandpit serve --tls-cert --tls-key`: the operator's PEM certificate chain and
//! key loaded into a rustls server config ([`load`]), and [`TlsListener`], an
//! `axum::serve::Listener` whose connections are TLS streams, so the one serving path of
//! `serve.rs` (HTTP/1.1, upgrades for WebSockets and previews, streamed bodies) runs over
//! TLS unchanged.
//!
//! Handshakes run in tasks of their own (at most [`MAX_HANDSHAKES`] at once, each bounded by
//! [`HANDSHAKE_TIMEOUT`]), so a client that connects and says nothing never holds up
//! another's accept. Only `http/1.1` is offered over ALPN: previews and terminal attachments
//! are HTTP/1.1 upgrades.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes under way at once; past it, accepting waits.
pub const MAX_HANDSHAKES: usize = 256;

/// Load the certificate chain (`cert`, PEM, leaf first) and its private key (`key`, PEM:
/// PKCS#8, PKCS#1 or SEC1). Fails with the file and the reason: unreadable, no PEM item of
/// the right kind, or a key that is not the certificate's.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|items| items.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}", pem_error(e)))
        .with_context(|| format!("--tls-cert {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--tls-cert {}: no certificate in it (a PEM `BEGIN CERTIFICATE` block is expected)",
        cert.display()
    );
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}", pem_error(e)))
        .with_context(|| format!("--tls-key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow::anyhow!(
                "--tls-key {} is not the private key of the certificate in --tls-cert {}",
                key.display(),
                cert.display()
            ),
            e => anyhow::anyhow!(
                "--tls-cert {} / --tls-key {}: {e}",
                cert.display(),
                key.display()
            ),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read it: {e}"),
        Error::NoItemsFound => {
            "no item of the expected kind in it (PEM `BEGIN CERTIFICATE` for the certificate, \
             `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` for the key)"
                .to_string()
        }
        e => format!("not valid PEM: {e:?}"),
    }
}

/// A listener handing out TLS streams whose handshake is done.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serve TLS with `config` on `tcp`. The accept task lives as long as the listener.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            rx,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // As axum's own loop: out of descriptors and the like pass; back off a little.
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let ready = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
        if tx.is_closed() {
            return;
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ends only when the listener is dropped: never while serving.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A self-signed certificate and its key, and another key, made with the openssl CLI.
    fn make_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let (cert, key, other) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("other.pem"),
        );
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        let ok = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&other)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        (cert, key, other)
    }

    #[test]
    fn loads_a_matching_pair_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, other) = make_pair(dir.path());
        let config = load(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        let err = format!("{:#}", load(&cert, &other).unwrap_err());
        assert!(
            err.contains("is not the private key of the certificate"),
            "{err}"
        );

        let missing = dir.path().join("missing.pem");
        let err = format!("{:#}", load(&missing, &key).unwrap_err());
        assert!(
            err.contains("--tls-cert") && err.contains("cannot read it"),
            "{err}"
        );
        let err = format!("{:#}", load(&cert, &missing).unwrap_err());
        assert!(
            err.contains("--tls-key") && err.contains("cannot read it"),
            "{err}"
        );

        // A key where the certificate should be, and the other way round.
        let err = format!("{:#}", load(&key, &key).unwrap_err());
        assert!(err.contains("--tls-cert") && err.contains("no "), "{err}");
        let err = format!("{:#}", load(&cert, &cert).unwrap_err());
        assert!(
            err.contains("--tls-key") && err.contains("no item"),
            "{err}"
        );
    }
}
