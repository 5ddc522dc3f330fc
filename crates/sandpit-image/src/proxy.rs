//! A loopback HTTP proxy that lets `oci-client` reach registries only through a [`Dialer`].
//!
//! `oci-client` builds its own `reqwest` client and takes no connector or resolver, but it
//! takes proxies. Each pull starts one of these on `127.0.0.1:<ephemeral>` and points both
//! the HTTP and the HTTPS proxy at it, so every connection of the pull (the registry, its
//! token realm, redirects to blob storage, a layer's foreign URLs) is a proxy request whose
//! `host:port` goes to [`Dialer::dial`] with [`Purpose::Pull`]: resolved there, judged
//! address by address, connected only where the dialer allows.
//!
//! - `CONNECT host:port` (HTTPS): dialled, answered `200`, then spliced (TLS stays end to end).
//! - `GET http://host:port/path` (plain HTTP, loopback and `--insecure-registries`): dialled,
//!   the request line rewritten to origin form and sent with `Connection: close`, then
//!   spliced; one request per connection, so a kept-alive connection never carries a request
//!   meant for another host.
//!
//! A refused connection gets an empty `403` and is recorded, so the pull can say why it failed
//! instead of quoting whatever the client made of the `403`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_net::dial::{Purpose, Refusal};
use sandpit_net::{Dialer, NetError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A running proxy; stops (with every connection it carries) when dropped.
pub(crate) struct PullProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PullProxy {
    pub async fn start(dialer: Dialer) -> std::io::Result<PullProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(listener, dialer, refusals.clone()));
        Ok(PullProxy {
            url: format!("http://127.0.0.1:{port}"),
            refusals,
            task,
        })
    }

    /// The connections the dialer refused so far, first first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().expect("not poisoned").clone()
    }
}

impl Drop for PullProxy {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks (a JoinSet): they end with it.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, dialer: Dialer, refusals: Arc<Mutex<Vec<Refusal>>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                // Only this process's own client connects (loopback); anything else that
                // finds the port gets no more than the dialer allows anyway.
                if !peer.ip().is_loopback() {
                    continue;
                }
                let (dialer, refusals) = (dialer.clone(), refusals.clone());
                conns.spawn(async move {
                    if let Err(why) = serve(stream, &dialer, &refusals).await {
                        tracing::debug!(%why, "pull proxy: connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One proxied connection.
async fn serve(
    mut client: TcpStream,
    dialer: &Dialer,
    refusals: &Mutex<Vec<Refusal>>,
) -> Result<(), String> {
    let (head, rest) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client))
        .await
        .map_err(|_| "no request head in time".to_string())??;
    let request = match parse_request(&head) {
        Ok(r) => r,
        Err(why) => {
            let _ = client.write_all(STATUS_400).await;
            return Err(why);
        }
    };
    let mut upstream = match dialer
        .dial(&request.host, request.port, Purpose::Pull)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            if let NetError::Refused(r) = &e {
                tracing::info!(refusal = %r, "pull proxy: connection refused");
                refusals.lock().expect("not poisoned").push(r.clone());
                let _ = client.write_all(STATUS_403).await;
            } else {
                let _ = client.write_all(STATUS_502).await;
            }
            return Err(e.to_string());
        }
    };
    match request.forward {
        None => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
        }
        Some(head) => upstream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?,
    }
    upstream.write_all(&rest).await.map_err(|e| e.to_string())?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
}

const STATUS_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const STATUS_403: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const STATUS_502: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Reads up to the end of the request head; returns the head (without the blank line) and
/// whatever bytes came after it.
async fn read_head(s: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            let head = String::from_utf8(buf).map_err(|_| "request head is not UTF-8")?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too long".into());
        }
        let mut chunk = [0u8; 2048];
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the request head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What a proxy request asks for.
#[derive(Debug, PartialEq, Eq)]
struct ProxyRequest {
    host: String,
    port: u16,
    /// For plain HTTP, the head to send upstream (origin form, `Connection: close`, ending
    /// with the blank line); `None` for `CONNECT`.
    forward: Option<String>,
}

/// Parses a proxy request head (pure).
fn parse_request(head: &str) -> Result<ProxyRequest, String> {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {first:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported version {version:?}"));
    }
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(ProxyRequest {
            host,
            port,
            forward: None,
        });
    }
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an absolute http URL: {target:?}"))?;
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let (host, port) = split_authority(authority, Some(80))?;
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    let mut out = format!("{method} {path} {version}\r\n");
    let mut has_host = false;
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        let hop_by_hop = [
            "connection",
            "proxy-connection",
            "keep-alive",
            "proxy-authorization",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h));
        if hop_by_hop {
            continue;
        }
        has_host |= name.eq_ignore_ascii_case("host");
        out.push_str(line);
        out.push_str("\r\n");
    }
    if !has_host {
        out.push_str(&format!("Host: {authority}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(ProxyRequest {
        host,
        port,
        forward: Some(out),
    })
}

/// `host:port`, `[v6]:port`, or a bare host when `default_port` is given.
fn split_authority(a: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("bad authority {a:?}");
    if a.is_empty() || a.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (a.to_string(), None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        (None, Some(d)) => d,
        (None, None) => return Err(bad()),
    };
    if host.is_empty() || host == "[]" {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests() {
        let r =
            parse_request("CONNECT registry.example:443 HTTP/1.1\r\nHost: registry.example:443")
                .unwrap();
        assert_eq!(
            r,
            ProxyRequest {
                host: "registry.example".into(),
                port: 443,
                forward: None
            }
        );
        let r = parse_request("CONNECT [::1]:5000 HTTP/1.1").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("[::1]", 5000));
        for bad in [
            "CONNECT registry.example HTTP/1.1",
            "CONNECT user@registry.example:443 HTTP/1.1",
            "CONNECT :443 HTTP/1.1",
            "CONNECT a:0 HTTP/1.1",
            "CONNECT a:443 HTTP/2",
            "CONNECT a:443",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_requests_are_rewritten_to_origin_form() {
        let r = parse_request(
            "GET http://127.0.0.1:5000/v2/app/manifests/v1 HTTP/1.1\r\nhost: 127.0.0.1:5000\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*",
        )
        .unwrap();
        assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 5000));
        assert_eq!(
            r.forward.unwrap(),
            "GET /v2/app/manifests/v1 HTTP/1.1\r\nhost: 127.0.0.1:5000\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        let r = parse_request("HEAD http://registry.lan?x=1 HTTP/1.1").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("registry.lan", 80));
        assert_eq!(
            r.forward.unwrap(),
            "HEAD /?x=1 HTTP/1.1\r\nHost: registry.lan\r\nConnection: close\r\n\r\n"
        );
        for bad in [
            "GET /relative HTTP/1.1",
            "GET https://a/ HTTP/1.1",
            "GET http://u:p@a/ HTTP/1.1",
            "GET http:///x HTTP/1.1",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
