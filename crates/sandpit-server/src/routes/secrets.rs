//! `/v1/secrets`: workspace secrets that sandboxes use without seeing them (create, list,
//! replace a value, delete). Values are write-only. Holding them is part of
//! `POST /v1/sandboxes` (`secrets`); see `sandpit_control::secrets`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_api_types::{CreateSecretRequest, ErrorBody, Secret, SecretList, UpdateSecretRequest};
use sandpit_control::secrets;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Server;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_secret, list_secrets))
        .routes(routes!(replace_secret, delete_secret))
}

/// Create a secret. Its value is sealed with the server's secrets key and never returned.
#[utoipa::path(post, path = "/v1/secrets", tag = "secrets",
    request_body = CreateSecretRequest,
    responses(
        (status = 201, description = "Secret created (without its value)", body = Secret),
        (status = 400, description = "Invalid name (`invalid_secret_name`), value (`invalid_secret_value`), hosts (`invalid_secret_hosts`) or inject (`invalid_secret_inject`); nothing was stored", body = ErrorBody),
        (status = 403, description = "The server has no secrets key (`secrets_disabled`)", body = ErrorBody),
        (status = 409, description = "The workspace has a secret of that name (`secret_exists`)", body = ErrorBody),
    ))]
async fn create_secret(
    State(server): State<Arc<Server>>,
    auth: Auth,
    ApiJson(req): ApiJson<CreateSecretRequest>,
) -> Result<(StatusCode, Json<Secret>), ApiError> {
    auth.require("sandbox_create")?;
    let secret = secrets::create(&server.node, &auth.workspace_id, &req).await?;
    tracing::info!(workspace = %auth.workspace_id, secret = %secret.name, "secret created");
    Ok((StatusCode::CREATED, Json(secret)))
}

/// The workspace's secrets, by name (never their values).
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses(
        (status = 200, description = "The secrets", body = SecretList),
        (status = 403, description = "The server has no secrets key (`secrets_disabled`)", body = ErrorBody),
    ))]
async fn list_secrets(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<SecretList>, ApiError> {
    auth.require("sandbox_read")?;
    Ok(Json(SecretList {
        secrets: secrets::list(&server.node, &auth.workspace_id).await?,
    }))
}

/// Replace a secret's value: the next request of every sandbox holding it uses the new one
/// (no restart).
#[utoipa::path(put, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    request_body = UpdateSecretRequest,
    responses(
        (status = 200, description = "Replaced (without its value)", body = Secret),
        (status = 400, description = "Invalid value (`invalid_secret_value`); nothing changed", body = ErrorBody),
        (status = 403, description = "The server has no secrets key (`secrets_disabled`)", body = ErrorBody),
        (status = 404, description = "No such secret (`secret_not_found`)", body = ErrorBody),
    ))]
async fn replace_secret(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateSecretRequest>,
) -> Result<Json<Secret>, ApiError> {
    auth.require("sandbox_create")?;
    let secret = secrets::replace(&server.node, &auth.workspace_id, &name, &req.value).await?;
    tracing::info!(workspace = %auth.workspace_id, secret = %secret.name, "secret value replaced");
    Ok(Json(secret))
}

/// Delete a secret: from now on no request is injected with it; sandboxes holding it keep a
/// placeholder that goes out unchanged.
#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "The server has no secrets key (`secrets_disabled`)", body = ErrorBody),
        (status = 404, description = "No such secret (`secret_not_found`)", body = ErrorBody),
    ))]
async fn delete_secret(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require("sandbox_create")?;
    secrets::delete(&server.node, &auth.workspace_id, &name).await?;
    tracing::info!(workspace = %auth.workspace_id, secret = %name, "secret deleted");
    Ok(StatusCode::NO_CONTENT)
}
