//! `/v1/sandboxes/{id}/files`: streamed upload and download, and directory listings.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sandpit_agent_proto as proto;
use sandpit_api_types::{ErrorBody, FileEntry, FileList, PathQuery};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiQuery;
use super::sandboxes::agent_failure;
use crate::error::ApiError;
use crate::extract::{Authorized, OwnedSandbox, scope};
use crate::lifecycle;
use crate::server::Server;
use crate::util::rfc3339;
use sandpit_control::agent::AgentFailure;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(upload, download))
        .routes(routes!(list_dir))
}

fn checked_path(path: &str) -> Result<String, ApiError> {
    proto::normalize_path(path).map_err(|e| ApiError::bad_request("invalid_path", e.message))
}

/// Write a file (the raw request body), creating parent directories. The file appears
/// whole or not at all.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "File contents"),
    responses(
        (status = 204, description = "File uploaded"),
        (status = 400, description = "Invalid path (root, contains ..) or exceeds the size limit", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
        (status = 507, description = "The sandbox's disk is full (`disk_full`); nothing was written", body = ErrorBody),
    ))]
async fn upload(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxEditCode>,
    ApiQuery(q): ApiQuery<PathQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match upload_file(&server, &sb, &q.path, &headers, body).await {
        Ok(status) => status.into_response(),
        Err(e) => {
            // The body may be partly unread, so this connection is closed after the answer:
            // say so, or a client may reuse it for its next request and lose that one.
            let mut resp = e.into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

async fn upload_file(
    server: &Arc<Server>,
    sb: &Authorized,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let id = sb.id();
    let path = checked_path(path)?;
    if path == "/" {
        return Err(ApiError::bad_request(
            "invalid_path",
            "cannot write to the root directory",
        ));
    }
    let limit = server.cfg.upload_limit;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::bad_request(
            "file_too_large",
            format!("file exceeds the upload limit of {limit} bytes"),
        ));
    }
    let (agent, guard, row) = lifecycle::running_agent(server, sb).await?;
    // A new file (and the directories made for it) belongs to the template's `USER`.
    let owner = sandpit_control::node::images::default_user(server, &row).await?;
    // A stalled body would hold the sandbox (its read lock) forever: give up on it, and the
    // agent discards its temporary file.
    let idle = server.cfg.body_idle_timeout;
    let body = futures::StreamExt::map(
        tokio_stream::StreamExt::timeout(body.into_data_stream(), idle),
        move |chunk| match chunk {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the body sent nothing for {} s",
                idle.as_secs_f64()
            )),
        },
    );
    // The liveness watch (or a destroy) cancels the sandbox's operations.
    let cancel = server.cancel_of(id);
    let written = tokio::select! {
        w = agent.write_file(&path, owner.as_deref(), Box::pin(body), limit) => Some(w),
        _ = cancel.cancelled() => None,
    };
    let died = server.died(id);
    drop(guard);
    let Some(written) = written else {
        return Err(if died {
            lifecycle::settle_if_dead(server, id)
                .await
                .unwrap_or_else(lifecycle::stopped_error)
        } else {
            ApiError::conflict(
                "sandbox_destroyed",
                "the sandbox was destroyed during the upload",
            )
        });
    };
    match written {
        Ok(_) => {
            sandpit_control::faults::point("upload.written");
            Ok(StatusCode::NO_CONTENT)
        }
        // The agent is gone: maybe the whole sandbox died; if so, say so and settle it.
        Err(AgentFailure::Broken(e)) => Err(lifecycle::settle_if_dead(server, id)
            .await
            .unwrap_or_else(|| agent_failure(AgentFailure::Broken(e)))),
        Err(f) => Err(agent_failure(f)),
    }
}

/// Read a file as `application/octet-stream`, streamed.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "File contents", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Invalid path, or not a regular file (`not_regular_file`: a directory, FIFO, device or socket)", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or file not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
    ))]
async fn download(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let path = checked_path(&q.path)?;
    let (agent, guard, _) = lifecycle::running_agent(&server, &sb).await?;
    let (info, stream) = agent.read_file(&path).await.map_err(agent_failure)?;
    // The read lock must outlive the response body: a checkpoint must not start while the
    // agent connection is open.
    let stream = futures::StreamExt::map(stream, move |item| {
        let _ = &guard;
        item
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, info.size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// List a directory.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "Directory entries, sorted by name", body = FileList),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or directory not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running", body = ErrorBody),
    ))]
async fn list_dir(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<FileList>, ApiError> {
    let path = checked_path(&q.path)?;
    let (agent, _guard, _) = lifecycle::running_agent(&server, &sb).await?;
    let listing = agent.list_dir(&path).await.map_err(agent_failure)?;
    let entries = listing
        .entries
        .into_iter()
        .map(|e| FileEntry {
            name: e.name,
            kind: match e.info.kind {
                proto::EntryKind::File => "file",
                proto::EntryKind::Dir => "dir",
                proto::EntryKind::Symlink => "symlink",
                proto::EntryKind::Other => "other",
            }
            .into(),
            size: e.info.size,
            mode: e.info.mode,
            modified_at: rfc3339(e.info.mtime * 1000),
        })
        .collect();
    Ok(Json(FileList { path, entries }))
}
