//! The seed-000 organization routes: `POST /org/workspace` and API token management.
//! Responses use the CodeSandbox envelope; errors carry both the envelope's `errors` list
//! and the `/v1` `error` object.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_api_types::{
    ALL_SCOPES, Envelope, ErrorBody, SANDBOX_SCOPES, TokenCreateRequest, TokenInfo,
    TokenUpdateRequest, Workspace, WorkspaceCreateRequest,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, OptionalJson};
use crate::auth::{Auth, generate_token, hash_token};
use crate::error::ApiError;
use crate::server::Server;
use crate::store::{TokenRow, WorkspaceRow};
use crate::util::{new_id, now_ms, rfc3339};

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_workspace))
        .routes(routes!(create_token))
        .routes(routes!(update_token, revoke_token))
}

pub use crate::error::CsbError;

/// Create a workspace in the caller's organization.
#[utoipa::path(post, path = "/org/workspace", tag = "workspace",
    request_body = WorkspaceCreateRequest,
    responses(
        (status = 201, description = "Workspace Create Response", body = Envelope<Workspace>),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 403, description = "Token lacks workspace:create", body = ErrorBody),
    ))]
async fn create_workspace(
    State(server): State<Arc<Server>>,
    auth: Auth,
    OptionalJson(req): OptionalJson<WorkspaceCreateRequest>,
) -> Result<(StatusCode, Json<Envelope<Workspace>>), CsbError> {
    auth.require("workspace:create")?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 64 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "workspace name must be 1 to 64 characters",
        )
        .into());
    }
    let ws = WorkspaceRow {
        id: new_id("ws"),
        org_id: auth.org_id.clone(),
        name,
    };
    server.store.tenants.insert_workspace(&ws, now_ms()).await?;
    Ok((
        StatusCode::CREATED,
        Json(Envelope::ok(Workspace {
            id: ws.id,
            name: ws.name,
        })),
    ))
}

fn check_scopes(scopes: &[String]) -> Result<(), ApiError> {
    for s in scopes {
        if !SANDBOX_SCOPES.contains(&s.as_str()) {
            let hint = if ALL_SCOPES.contains(&s.as_str()) {
                "it is reserved for the bootstrap token"
            } else {
                "unknown scope"
            };
            return Err(ApiError::bad_request(
                "invalid_scope",
                format!("scope {s:?} cannot be granted ({hint}); use {SANDBOX_SCOPES:?}"),
            ));
        }
    }
    Ok(())
}

use crate::util::parse_expiry;

fn info(t: &TokenRow, token: Option<String>) -> TokenInfo {
    TokenInfo {
        token_id: t.id.clone(),
        team_id: t.workspace_id.clone(),
        description: t.description.clone(),
        expires_at: t.expires_at.map(rfc3339),
        scopes: serde_json::from_str(&t.scopes).unwrap_or_default(),
        token,
    }
}

/// The workspace, which must belong to the caller's organization (404 otherwise).
async fn workspace_in_org(
    server: &Server,
    auth: &Auth,
    team_id: &str,
) -> Result<WorkspaceRow, ApiError> {
    server
        .store
        .tenants
        .get_workspace(&auth.org_id, team_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("workspace_not_found", format!("no workspace {team_id:?}"))
        })
}

/// Create an API token for a workspace. The token is in this response only.
#[utoipa::path(post, path = "/org/workspace/{team_id}/tokens", tag = "token",
    params(("team_id" = String, Path, description = "Workspace id")),
    request_body = Option<TokenCreateRequest>,
    responses(
        (status = 201, description = "Token Create Response", body = Envelope<TokenInfo>),
        (status = 400, description = "Invalid scope or expiry", body = ErrorBody),
        (status = 403, description = "Token lacks token:manage", body = ErrorBody),
        (status = 404, description = "No such workspace in this organization", body = ErrorBody),
    ))]
async fn create_token(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(team_id): Path<String>,
    OptionalJson(req): OptionalJson<TokenCreateRequest>,
) -> Result<(StatusCode, Json<Envelope<TokenInfo>>), CsbError> {
    auth.require("token:manage")?;
    let ws = workspace_in_org(&server, &auth, &team_id).await?;
    let scopes = req
        .scopes
        .unwrap_or_else(|| SANDBOX_SCOPES.iter().map(|s| s.to_string()).collect());
    check_scopes(&scopes)?;
    let expires_at = req.expires_at.as_deref().map(parse_expiry).transpose()?;
    let token = generate_token();
    let row = TokenRow {
        id: new_id("tok"),
        workspace_id: ws.id,
        description: req.description,
        scopes: serde_json::to_string(&scopes).expect("strings serialize"),
        expires_at,
        created_at: now_ms(),
    };
    server
        .store
        .tenants
        .insert_token(&row, &hash_token(&token))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Envelope::ok(info(&row, Some(token)))),
    ))
}

/// Update a token's description, expiry or scopes.
#[utoipa::path(patch, path = "/org/workspace/{team_id}/tokens/{token_id}", tag = "token",
    params(("team_id" = String, Path, description = "Workspace id"), ("token_id" = String, Path, description = "Token id")),
    request_body = TokenUpdateRequest,
    responses(
        (status = 201, description = "Token Update Response", body = Envelope<TokenInfo>),
        (status = 400, description = "Invalid scope or expiry", body = ErrorBody),
        (status = 404, description = "No such workspace or token", body = ErrorBody),
    ))]
async fn update_token(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((team_id, token_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<TokenUpdateRequest>,
) -> Result<(StatusCode, Json<Envelope<TokenInfo>>), CsbError> {
    auth.require("token:manage")?;
    let ws = workspace_in_org(&server, &auth, &team_id).await?;
    let mut row = server
        .store
        .tenants
        .get_token(&ws.id, &token_id)
        .await?
        .ok_or_else(|| ApiError::not_found("token_not_found", format!("no token {token_id:?}")))?;
    if let Some(d) = req.description {
        row.description = d;
    }
    if let Some(e) = req.expires_at {
        if row.expires_at.is_some_and(|at| at <= now_ms()) {
            return Err(ApiError::bad_request(
                "token_expired",
                "an expired token's expiry cannot be changed",
            )
            .into());
        }
        row.expires_at = e.as_deref().map(parse_expiry).transpose()?;
    }
    if let Some(scopes) = req.scopes {
        check_scopes(&scopes)?;
        row.scopes = serde_json::to_string(&scopes).expect("strings serialize");
    }
    server.store.tenants.update_token(&row).await?;
    Ok((StatusCode::CREATED, Json(Envelope::ok(info(&row, None)))))
}

/// Revoke (delete) a token. It stops working at once.
#[utoipa::path(delete, path = "/org/workspace/{team_id}/tokens/{token_id}", tag = "token",
    params(("team_id" = String, Path, description = "Workspace id"), ("token_id" = String, Path, description = "Token id")),
    responses(
        (status = 204, description = "Token revoked"),
        (status = 404, description = "No such workspace or token", body = ErrorBody),
    ))]
async fn revoke_token(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((team_id, token_id)): Path<(String, String)>,
) -> Result<StatusCode, CsbError> {
    auth.require("token:manage")?;
    let ws = workspace_in_org(&server, &auth, &team_id).await?;
    if !server.store.tenants.delete_token(&ws.id, &token_id).await? {
        return Err(
            ApiError::not_found("token_not_found", format!("no token {token_id:?}")).into(),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}
