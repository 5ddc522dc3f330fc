//! `/v1/sandboxes/{id}/preview-tokens`: the tokens that open a private sandbox's previews.
//! Shown once, stored hashed, scoped to one sandbox (and its workspace).

use sandpit_control::Status;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_api_types::{
    ErrorBody, PreviewToken, PreviewTokenCreateRequest, PreviewTokenList, PreviewTokenUpdateRequest,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiJson, OptionalJson};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::extract::{Authorized, OwnedSandbox, scope};
use crate::lifecycle;
use crate::server::Server;
use crate::store::{PreviewTokenRow, Sandbox};
use crate::util::parse_expiry;
use crate::util::{now_ms, rfc3339};

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_preview_token, list_preview_tokens))
        .routes(routes!(update_preview_token, revoke_preview_token))
}

fn view(t: &PreviewTokenRow, token: Option<String>) -> PreviewToken {
    PreviewToken {
        token_id: t.id.clone(),
        sandbox_id: t.sandbox_id.clone(),
        token_prefix: t.token_prefix.clone(),
        expires_at: t.expires_at.map(rfc3339),
        created_at: rfc3339(t.created_at),
        token,
    }
}

/// The caller's sandbox, which must not be destroyed or failed (409).
async fn live_sandbox(server: &Server, sb: &Authorized) -> Result<Sandbox, ApiError> {
    let row = lifecycle::current(server, sb).await?;
    if matches!(row.status, Status::Destroyed | Status::Failed) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("a {} sandbox has no previews", row.status),
        ));
    }
    Ok(row)
}

/// A token of the caller's sandbox that is not revoked (404 otherwise).
async fn token_of(
    server: &Server,
    auth: &Auth,
    id: &str,
    token_id: &str,
) -> Result<PreviewTokenRow, ApiError> {
    server
        .store
        .previews
        .get_token(&auth.workspace_id, id, token_id)
        .await?
        .filter(|t| t.revoked_at.is_none())
        .ok_or_else(|| {
            ApiError::not_found(
                "preview_token_not_found",
                format!("no preview token {token_id:?}"),
            )
        })
}

/// Create a preview token. The token is in this response only.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/preview-tokens", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = Option<PreviewTokenCreateRequest>,
    responses(
        (status = 201, description = "Token created; `token` is shown once", body = PreviewToken),
        (status = 400, description = "Invalid expiry", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox destroyed or failed", body = ErrorBody),
    ))]
async fn create_preview_token(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    OptionalJson(req): OptionalJson<PreviewTokenCreateRequest>,
) -> Result<(StatusCode, Json<PreviewToken>), ApiError> {
    let sandbox = live_sandbox(&server, &sb).await?;
    let expires_at = req.expires_at.as_deref().map(parse_expiry).transpose()?;
    let (row, token) =
        crate::preview::mint_token(&server, &sandbox.id, &sandbox.workspace_id, expires_at).await?;
    Ok((StatusCode::CREATED, Json(view(&row, Some(token)))))
}

/// The sandbox's preview tokens (not revoked), without their secrets.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/preview-tokens", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The tokens", body = PreviewTokenList),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
    ))]
async fn list_preview_tokens(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
) -> Result<Json<PreviewTokenList>, ApiError> {
    let rows = server
        .store
        .previews
        .list_tokens(sb.workspace_id(), sb.id())
        .await?;
    Ok(Json(PreviewTokenList {
        tokens: rows.iter().map(|t| view(t, None)).collect(),
    }))
}

/// Change a preview token's expiry (`null`: never expires).
#[utoipa::path(patch, path = "/v1/sandboxes/{id}/preview-tokens/{token_id}", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id"), ("token_id" = String, Path, description = "Preview token id")),
    request_body = PreviewTokenUpdateRequest,
    responses(
        (status = 200, description = "Token updated", body = PreviewToken),
        (status = 400, description = "Invalid expiry", body = ErrorBody),
        (status = 404, description = "Sandbox or token not found", body = ErrorBody),
        (status = 409, description = "Sandbox destroyed or failed", body = ErrorBody),
    ))]
async fn update_preview_token(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    Path((_sandbox, token_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<PreviewTokenUpdateRequest>,
) -> Result<Json<PreviewToken>, ApiError> {
    let auth = sb.auth();
    live_sandbox(&server, &sb).await?;
    let mut row = token_of(&server, auth, sb.id(), &token_id).await?;
    if let Some(expiry) = req.expires_at {
        row.expires_at = expiry.as_deref().map(parse_expiry).transpose()?;
        server
            .store
            .previews
            .set_token_expiry(&auth.workspace_id, &row.id, row.expires_at)
            .await?;
    }
    Ok(Json(view(&row, None)))
}

/// Revoke a preview token. It stops working at once (requests with it get 401
/// `preview_token_revoked`).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/preview-tokens/{token_id}", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id"), ("token_id" = String, Path, description = "Preview token id")),
    responses(
        (status = 204, description = "Token revoked"),
        (status = 404, description = "Sandbox or token not found", body = ErrorBody),
    ))]
async fn revoke_preview_token(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::VmManage>,
    Path((_sandbox, token_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let auth = sb.auth();
    let row = token_of(&server, auth, sb.id(), &token_id).await?;
    server
        .store
        .previews
        .revoke_token(&auth.workspace_id, &row.id, now_ms())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
