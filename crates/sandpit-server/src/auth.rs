//! API tokens: the bootstrap token and the [`Auth`] extractor that
//! turns a bearer token into the workspace and scopes a request acts with (generation and
//! hashing are `sandpit_control::tokens`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use crate::error::{ApiError, ControlError};
use crate::server::Server;
use crate::store::{TokenRow, WorkspaceRow};
use crate::util::{new_id, now_ms};

pub use sandpit_control::tokens::{
    PREVIEW_TOKEN_PREFIX, TOKEN_PREFIX, generate_token, generate_token_with, hash_token,
};

/// The caller of a request, from its bearer token.
#[derive(Debug, Clone)]
pub struct Auth {
    pub token_id: String,
    pub workspace_id: String,
    pub org_id: String,
    pub scopes: Vec<String>,
}

impl Auth {
    /// 403 `missing_scope` unless the token holds `scope`.
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.scopes.iter().any(|s| s == scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "missing_scope",
                format!("this token lacks the {scope:?} scope"),
            ))
        }
    }
}

impl FromRequestParts<Arc<Server>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, ApiError> {
        // `limits::enforce` resolved it already.
        if let Some(auth) = parts.extensions.get::<Auth>() {
            return Ok(auth.clone());
        }
        resolve(server, &parts.headers).await
    }
}

/// The header the E2B SDKs send their API key in: the same tokens as `Bearer`.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The WebSocket subprotocol a browser names to carry its API token: `bearer.<token>`. A
/// browser cannot set `Authorization` on a WebSocket, and a token in the URL would end up
/// in logs and history; `Sec-WebSocket-Protocol` is the one header it sets. The server
/// never echoes this entry: it answers with [`WS_SUBPROTOCOL`], which the client lists too.
pub const WS_BEARER_PREFIX: &str = "bearer.";

/// The subprotocol a WebSocket route answers with when the client offered it (alongside
/// its `bearer.<token>` entry; a browser fails a handshake whose answer names none of the
/// protocols it offered).
pub const WS_SUBPROTOCOL: &str = "sandpit.v1";

/// The token of a WebSocket upgrade's `bearer.<token>` subprotocol, if it is one and offers
/// one. Only upgrades: an ordinary request must use `Authorization`.
fn ws_bearer(headers: &HeaderMap) -> Option<&str> {
    use axum::http::header::{SEC_WEBSOCKET_PROTOCOL, UPGRADE};
    let upgrade = headers.get(UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_BEARER_PREFIX))
}

/// Whether a request presents an API token (`Authorization: Bearer`, `X-API-KEY`, or a
/// WebSocket upgrade's `bearer.<token>` subprotocol); an `Authorization: Basic` (envd's
/// user) is not one.
pub fn presents_token(headers: &HeaderMap) -> bool {
    headers.contains_key(API_KEY_HEADER)
        || headers
            .get(axum::http::header::AUTHORIZATION)
            .is_some_and(|h| !h.as_bytes().starts_with(b"Basic "))
        || ws_bearer(headers).is_some()
}

/// The caller named by a request's `Authorization: Bearer` header (or, when there is none,
/// its `X-API-KEY` header, as the E2B SDKs send it, or a WebSocket upgrade's
/// `bearer.<token>` subprotocol, as the web console sends it), or 401.
pub async fn resolve(server: &Server, headers: &HeaderMap) -> Result<Auth, ApiError> {
    let token = match headers.get(axum::http::header::AUTHORIZATION) {
        None if !headers.contains_key(API_KEY_HEADER) && ws_bearer(headers).is_some() => {
            ws_bearer(headers)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ApiError::unauthorized("the bearer.<token> subprotocol names no token")
                })?
        }
        Some(header) => header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization header must be Bearer <token>"))?,
        None => headers
            .get(API_KEY_HEADER)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("X-API-KEY must be an API token"))?,
    };
    let found = server
        .store
        .tenants
        .token_by_hash(&hash_token(token))
        .await?;
    let t = found.ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
    if let Some(exp) = t.expires_at
        && exp <= now_ms()
    {
        return Err(ApiError::unauthorized("token has expired"));
    }
    let scopes: Vec<String> = serde_json::from_str(&t.scopes)
        .map_err(|e| ControlError::Internal(format!("scopes of token {}: {e}", t.id)))?;
    Ok(Auth {
        token_id: t.id,
        workspace_id: t.workspace_id,
        org_id: t.org_id,
        scopes,
    })
}

/// On first start (no organization yet): create the default organization, workspace and an
/// admin token with every scope. The token is `preset` when given (from
/// `SANDPIT_BOOTSTRAP_TOKEN`), otherwise generated. Returns the token when it was generated,
/// so the caller prints it once.
pub async fn bootstrap(
    server: &Server,
    preset: Option<&str>,
) -> Result<Option<String>, ControlError> {
    if server.store.tenants.count_orgs().await? > 0 {
        return Ok(None);
    }
    let now = now_ms();
    let org_id = new_id("org");
    server
        .store
        .tenants
        .insert_org(&org_id, "default", now)
        .await?;
    let ws = WorkspaceRow {
        id: new_id("ws"),
        org_id,
        name: "default".into(),
    };
    server.store.tenants.insert_workspace(&ws, now).await?;
    let token = preset.map(str::to_string).unwrap_or_else(generate_token);
    let row = TokenRow {
        id: new_id("tok"),
        workspace_id: ws.id.clone(),
        description: Some("bootstrap admin token".into()),
        scopes: serde_json::to_string(sandpit_api_types::ALL_SCOPES).expect("static list"),
        expires_at: None,
        created_at: now,
    };
    server
        .store
        .tenants
        .insert_token(&row, &hash_token(&token))
        .await?;
    tracing::info!(workspace = %ws.id, "created the default workspace and its admin token");
    Ok(if preset.is_some() { None } else { Some(token) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_upgrade_may_carry_its_token_as_a_subprotocol() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let upgrade = headers(&[
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", "sandpit.v1, bearer.sp_abc"),
        ]);
        assert_eq!(ws_bearer(&upgrade), Some("sp_abc"));
        assert!(presents_token(&upgrade));
        let split = headers(&[
            ("upgrade", "WebSocket"),
            ("sec-websocket-protocol", "sandpit.v1"),
            ("sec-websocket-protocol", "bearer.sp_def"),
        ]);
        assert_eq!(ws_bearer(&split), Some("sp_def"));
        // Not an upgrade: the subprotocol header means nothing.
        let plain = headers(&[("sec-websocket-protocol", "bearer.sp_abc")]);
        assert_eq!(ws_bearer(&plain), None);
        assert!(!presents_token(&plain));
        let other = headers(&[
            ("upgrade", "websocket"),
            ("sec-websocket-protocol", "sandpit.v1"),
        ]);
        assert_eq!(ws_bearer(&other), None);
    }

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 3 + 64);
        assert_eq!(hash_token("x"), hash_token("x"));
        assert_ne!(hash_token(&a), a);
        assert_eq!(hash_token("abc").len(), 64);
    }
}
