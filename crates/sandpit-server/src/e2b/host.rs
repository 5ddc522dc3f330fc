//! E2B's host names. With `E2B_DOMAIN=<d>` the SDKs call the control API at
//! `https://api.<d>`, envd at `https://49983-<sandbox id>.<sandbox domain>`, and
//! `getHost(port)` names `<port>-<sandbox id>.<sandbox domain>`, where the sandbox domain is
//! the `domain` of the create/connect answer ([`sandbox_domain`]: this server's preview
//! domain, with the port the client reached it on).
//!
//! [`route`], a middleware inside the preview router, takes the hosts of that form under
//! the preview domain:
//! - `49983-<id>` is envd: the request gets `E2b-Sandbox-Id: <id>` (replacing any the
//!   client sent) and goes on to [`super::envd::route`], which checks the envd token before
//!   anything; the agent's port is never proxied;
//! - `<port>-<id>` for any other port is the preview of that port, through
//!   [`crate::preview::proxy`] with every rule of Sandpit's own `<id>-<port>` previews
//!   (token or public, cookie isolation, upgrade origin, wake, live connections);
//! - a host that claims this form (its first part digits, or its second a sandbox id) but
//!   is malformed is refused here: 400 `invalid_host` for a port outside 1-65535, 404
//!   `sandbox_not_found` for an id that is not one. Nothing is looked up for them.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::control::valid_id;
use super::envd::{PORT_HEADER, SANDBOX_HEADER};
use super::{E2bError, ENVD_PORT};
use crate::error::ApiError;
use crate::server::Server;

/// What an E2B host names.
#[derive(Debug, PartialEq, Eq)]
pub enum E2bHost {
    /// `49983-<id>`: envd of sandbox `<id>`.
    Envd(String),
    /// `<port>-<id>`: the preview of that port.
    Preview(String, u16),
}

/// The E2B host a `Host` names under `domain` (the preview domain), with or without a
/// `:port` suffix, case-insensitive. `None`: not of E2B's form (another route takes it);
/// `Some(Err)`: of E2B's form but malformed.
pub fn parse(host: &str, domain: &str) -> Option<Result<E2bHost, ApiError>> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label = name.strip_suffix(&domain)?.strip_suffix('.')?;
    if label.contains('.') {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let id_shaped =
        id.len() > 2 && id.starts_with("sb") && id[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if !digits && !id_shaped {
        return None;
    }
    let port = match port.parse::<u16>() {
        Ok(p) if digits && p > 0 && !port.starts_with('0') => p,
        _ => {
            let shown: String = port.chars().take(16).collect();
            return Some(Err(ApiError::bad_request(
                "invalid_host",
                format!("the port in the host must be 1-65535, not {shown:?}"),
            )));
        }
    };
    if !valid_id(id) {
        let shown: String = id.chars().take(64).collect();
        return Some(Err(ApiError::not_found(
            "sandbox_not_found",
            format!("sandbox {shown:?} not found"),
        )));
    }
    Some(Ok(if port.to_string() == ENVD_PORT {
        E2bHost::Envd(id.to_string())
    } else {
        E2bHost::Preview(id.to_string(), port)
    }))
}

/// The `domain` of create, connect and get answers: the SDKs derive envd's and
/// `getHost`'s names from it (`<port>-<id>.<domain>`, plain concatenation). The preview
/// domain, with the port of the `Host` the client reached this server at when it named one
/// (`api.localhost:8443` → `localhost:8443`), so the derived names land on this listener.
pub fn sandbox_domain(preview_domain: &str, host: Option<&str>) -> String {
    let domain = preview_domain.trim_end_matches('.').to_ascii_lowercase();
    let port = host
        .and_then(|h| h.rsplit_once(':'))
        .filter(|(name, _)| !name.contains(':') || name.ends_with(']'))
        .and_then(|(_, p)| p.parse::<u16>().ok().filter(|p| *p > 0));
    match port {
        Some(p) => format!("{domain}:{p}"),
        None => domain,
    }
}

/// The host a request names: its URI's authority (HTTP/2) or its `Host` header.
pub fn request_host(req_uri: &axum::http::Uri, headers: &axum::http::HeaderMap) -> Option<String> {
    req_uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// Middleware: E2B envd and preview hosts (see the module docs); everything else to `next`.
pub async fn route(State(server): State<Arc<Server>>, mut req: Request, next: Next) -> Response {
    let Some(host) = request_host(req.uri(), req.headers()) else {
        return next.run(req).await;
    };
    match parse(&host, &server.cfg.preview_domain) {
        None => next.run(req).await,
        Some(Err(e)) => E2bError(e).into_response(),
        Some(Ok(E2bHost::Preview(id, port))) => crate::preview::proxy(server, req, &id, port).await,
        Some(Ok(E2bHost::Envd(id))) => {
            // The host names the sandbox: a header the client sent does not override it.
            let headers = req.headers_mut();
            match HeaderValue::from_str(&id) {
                Ok(v) => {
                    headers.insert(SANDBOX_HEADER, v);
                }
                Err(_) => {
                    return E2bError(ApiError::not_found("sandbox_not_found", "no such sandbox"))
                        .into_response();
                }
            }
            headers.insert(PORT_HEADER, HeaderValue::from_static(ENVD_PORT));
            next.run(req).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sb0123456789abcdef";

    fn ok(host: &str) -> Option<E2bHost> {
        match parse(host, "localhost") {
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => panic!("{host}: refused with {}", e.code),
            None => None,
        }
    }

    fn refused(host: &str) -> &'static str {
        match parse(host, "localhost") {
            Some(Err(e)) => e.code,
            other => panic!("{host}: not refused: {other:?}"),
        }
    }

    #[test]
    fn envd_and_preview_hosts() {
        assert_eq!(
            ok(&format!("49983-{ID}.localhost:8443")),
            Some(E2bHost::Envd(ID.into()))
        );
        assert_eq!(
            ok(&format!("8000-{}.LOCALHOST.", ID.to_uppercase())),
            Some(E2bHost::Preview(ID.into(), 8000))
        );
        assert_eq!(
            ok(&format!("65535-{ID}.localhost")),
            Some(E2bHost::Preview(ID.into(), 65535))
        );
    }

    #[test]
    fn other_hosts_are_not_taken() {
        for host in [
            "localhost:7878",
            "api.localhost:8443",
            "127.0.0.1:7878",
            "[::1]:7878",
            &format!("{ID}-8000.localhost"), // Sandpit's own preview form
            &format!("8000-{ID}.other.example"),
            &format!("8000-{ID}.sub.localhost"),
            "my-app.localhost",
            "localhost",
        ] {
            assert_eq!(ok(host), None, "{host}");
        }
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for port in ["0", "65536", "99999999", "08000", "80a", "abc", ""] {
            assert_eq!(
                refused(&format!("{port}-{ID}.localhost")),
                "invalid_host",
                "{port}"
            );
        }
        let long = format!("sb{}", "0".repeat(63));
        for id in ["sb", "sbxyz", "sb0123-", "notasandbox", "SB", &long] {
            assert_eq!(
                refused(&format!("8000-{id}.localhost")),
                "sandbox_not_found",
                "{id}"
            );
        }
    }

    #[test]
    fn sandbox_domain_keeps_the_port_the_client_used() {
        assert_eq!(
            sandbox_domain("localhost", Some("api.localhost:8443")),
            "localhost:8443"
        );
        assert_eq!(
            sandbox_domain("localhost", Some("127.0.0.1:7878")),
            "localhost:7878"
        );
        assert_eq!(
            sandbox_domain("Sandpit.Example.", Some("api.sandpit.example.com")),
            "sandpit.example"
        );
        assert_eq!(
            sandbox_domain("localhost", Some("[::1]:7878")),
            "localhost:7878"
        );
        assert_eq!(sandbox_domain("localhost", Some("[::1]")), "localhost");
        assert_eq!(sandbox_domain("localhost", Some("x:0")), "localhost");
        assert_eq!(sandbox_domain("localhost", None), "localhost");
    }
}
