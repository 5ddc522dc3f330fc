//! `/v1/volumes`: named volumes of a workspace (create, list, get, delete). Mounting is part
//! of `POST /v1/sandboxes` (`volumes`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_api_types::{CreateVolumeRequest, ErrorBody, Volume, VolumeList};
use sandpit_control::node::volumes;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Server;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_volume, list_volumes))
        .routes(routes!(get_volume, delete_volume))
}

/// Create a volume on this node: an empty filesystem of `size`, kept until deleted.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes",
    request_body = CreateVolumeRequest,
    responses(
        (status = 201, description = "Volume created", body = Volume),
        (status = 400, description = "Invalid name (`invalid_volume_name`) or size (`invalid_volume_size`)", body = ErrorBody),
        (status = 409, description = "The workspace has a volume of that name (`volume_exists`)", body = ErrorBody),
        (status = 503, description = "An API replica holds no volumes (`no_node_available`): send it to a node", body = ErrorBody),
        (status = 507, description = "The workspace keeps max_volumes already (`quota_exceeded`), or the host is below its free-space reserve (`host_disk_full`); nothing was made", body = ErrorBody),
    ))]
async fn create_volume(
    State(server): State<Arc<Server>>,
    auth: Auth,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    auth.require("sandbox_create")?;
    if server.cfg.api_only {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_node_available",
            "an API replica holds no volumes: create volumes through a node's server",
        ));
    }
    let row = volumes::create(&server.node, &auth.workspace_id, &req).await?;
    Ok((StatusCode::CREATED, Json(volumes::to_api(&row))))
}

/// The workspace's volumes, by name.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, description = "The volumes", body = VolumeList)))]
async fn list_volumes(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<VolumeList>, ApiError> {
    auth.require("sandbox_read")?;
    let rows = server.store.volumes.list(&auth.workspace_id).await?;
    Ok(Json(VolumeList {
        volumes: rows.iter().map(volumes::to_api).collect(),
    }))
}

/// One volume.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses(
        (status = 200, description = "The volume", body = Volume),
        (status = 400, description = "Invalid name (`invalid_volume_name`)", body = ErrorBody),
        (status = 404, description = "No such volume (`volume_not_found`)", body = ErrorBody),
    ))]
async fn get_volume(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    auth.require("sandbox_read")?;
    let row = volumes::get(&server.node, &auth.workspace_id, &name).await?;
    Ok(Json(volumes::to_api(&row)))
}

/// Delete a volume and its data: refused while a sandbox that is not destroyed or failed
/// mounts it, or a snapshot refers to it.
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name (`invalid_volume_name`)", body = ErrorBody),
        (status = 404, description = "No such volume (`volume_not_found`)", body = ErrorBody),
        (status = 409, description = "A sandbox mounts it or a snapshot refers to it (`volume_in_use`), or it is on another node (`volume_on_another_node`)", body = ErrorBody),
    ))]
async fn delete_volume(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require("vm_manage")?;
    volumes::delete(&server.node, &auth.workspace_id, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
