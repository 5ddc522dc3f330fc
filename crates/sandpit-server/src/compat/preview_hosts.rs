//! Trusted preview hosts (seed 000 `/workspace/preview_hosts`): a browser page served from
//! one of a workspace's trusted hosts may load that workspace's private previews without a
//! preview token. The preview proxy asks `crate::preview::trusted_origin` before it asks for a token.
//!
//! This is a browser-side grant (it trusts the `Origin`, or failing that the `Referer`,
//! header that browsers set and pages cannot forge); a non-browser client can send any
//! header, so a workspace that lists hosts accepts that its private previews are as open as
//! those hosts' pages make them.

use crate::csb_store::CsbTables;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::error::CsbError;
use crate::extract::OptionalJson;
use crate::server::Server;
use crate::util::{now_ms, rfc3339};

/// Most trusted hosts per workspace.
pub const MAX_HOSTS: usize = 100;

pub fn router() -> Router<Arc<Server>> {
    Router::new().route("/workspace/preview_hosts", get(list).post(add).put(replace))
}

#[derive(Debug, Default, Deserialize)]
struct HostsBody {
    #[serde(default)]
    hosts: Vec<String>,
}

/// A trusted host: a DNS name (`*.` allowed as its first label) with an optional port,
/// lowercase. Schemes and paths are refused, so the list means what it says.
pub fn normalize_host(text: &str) -> Result<String, ApiError> {
    let host = text.trim().to_ascii_lowercase();
    let bad = || {
        ApiError::bad_request(
            "invalid_host",
            format!(
                "{text:?} is not a host name (like app.example.com, *.example.com or localhost:3000)"
            ),
        )
    };
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => {
            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?;
            (n, Some(p))
        }
        None => (host.as_str(), None),
    };
    let name = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad());
    }
    let _ = port;
    Ok(host)
}

fn check(hosts: &[String]) -> Result<Vec<String>, ApiError> {
    if hosts.len() > MAX_HOSTS {
        return Err(ApiError::bad_request(
            "invalid_host",
            format!("at most {MAX_HOSTS} preview hosts"),
        ));
    }
    hosts.iter().map(|h| normalize_host(h)).collect()
}

async fn view(server: &Server, workspace_id: &str) -> Result<Response, CsbError> {
    let hosts: Vec<serde_json::Value> = server
        .store
        .csb()
        .list_preview_hosts(workspace_id)
        .await?
        .into_iter()
        .map(|(host, at)| json!({"host": host, "inserted_at": rfc3339(at)}))
        .collect();
    // Seed 000 answers all three operations with 201.
    Ok((
        StatusCode::CREATED,
        Json(json!({"success": true, "errors": [], "data": {"preview_hosts": hosts}})),
    )
        .into_response())
}

async fn list(State(server): State<Arc<Server>>, auth: Auth) -> Result<Response, CsbError> {
    auth.require("vm_manage")?;
    view(&server, &auth.workspace_id).await
}

async fn add(
    State(server): State<Arc<Server>>,
    auth: Auth,
    OptionalJson(body): OptionalJson<HostsBody>,
) -> Result<Response, CsbError> {
    auth.require("vm_manage")?;
    let hosts = check(&body.hosts)?;
    let existing = server
        .store
        .csb()
        .list_preview_hosts(&auth.workspace_id)
        .await?;
    let total = existing.len()
        + hosts
            .iter()
            .filter(|h| !existing.iter().any(|(e, _)| e == *h))
            .count();
    if total > MAX_HOSTS {
        return Err(ApiError::bad_request(
            "invalid_host",
            format!("at most {MAX_HOSTS} preview hosts"),
        )
        .into());
    }
    server
        .store
        .csb()
        .put_preview_hosts(&auth.workspace_id, &hosts, false, now_ms())
        .await?;
    view(&server, &auth.workspace_id).await
}

async fn replace(
    State(server): State<Arc<Server>>,
    auth: Auth,
    OptionalJson(body): OptionalJson<HostsBody>,
) -> Result<Response, CsbError> {
    auth.require("vm_manage")?;
    let hosts = check(&body.hosts)?;
    server
        .store
        .csb()
        .put_preview_hosts(&auth.workspace_id, &hosts, true, now_ms())
        .await?;
    view(&server, &auth.workspace_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_validated() {
        assert_eq!(
            normalize_host(" App.Example.com ").unwrap(),
            "app.example.com"
        );
        assert!(normalize_host("*.example.com").is_ok());
        assert!(normalize_host("localhost:3000").is_ok());
        for bad in [
            "https://x.com",
            "x.com/path",
            "",
            "a..b",
            "x.com:0",
            "-a.com",
            "*",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad}");
        }
    }
}
