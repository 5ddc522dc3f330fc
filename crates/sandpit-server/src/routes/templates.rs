//! `/v1/templates`: the templates a workspace can start sandboxes from: list, get, build
//! (from an image or a Dockerfile, async, with a streamed build log; building a name again
//! adds its next version), a name's versions, delete, aliases.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use sandpit_api_types::{
    CreateTemplateRequest, DeleteTemplateQuery, ErrorBody, Template, TemplateAlias,
    TemplateBuildEvent, TemplateList,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Auth;
use crate::builds;
use crate::error::ApiError;
use crate::routes::ApiQuery;
use crate::server::Server;
use crate::util::now_ms;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(list_templates, create_template))
        .routes(routes!(get_template, delete_template))
        .routes(routes!(build_events, build_builtin))
        .routes(routes!(set_alias, delete_alias))
        .routes(routes!(list_versions))
}

/// Built-in templates and the workspace's own, every version (by name, then version).
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses(
        (status = 200, description = "The templates", body = TemplateList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 507, description = "The host's data filesystem is below its free-space reserve (`host_disk_full`); nothing was made", body = ErrorBody),
    ))]
async fn list_templates(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<TemplateList>, ApiError> {
    auth.require("sandbox_read")?;
    let rows = server.store.templates.list(&auth.workspace_id).await?;
    let mut templates = Vec::with_capacity(rows.len());
    for t in rows {
        templates.push(builds::view(&server, &auth.workspace_id, t).await?);
    }
    Ok(Json(TemplateList { templates }))
}

/// Build a template from an image reference or a Dockerfile (with its build context as a
/// base64 tar). Building an existing name adds its next version (`version` in the answer);
/// the name moves to it once it is ready (a failed build never moves it). Answers at once
/// with the template in status `building`; follow the build at
/// `GET /v1/templates/{id}/build`.
#[utoipa::path(post, path = "/v1/templates", tag = "templates",
    request_body = CreateTemplateRequest,
    responses(
        (status = 202, description = "The build started", body = Template),
        (status = 400, description = "Invalid name, source, Dockerfile (the message names the line), context, alias or policy", body = ErrorBody),
        (status = 409, description = "A built-in template's name (`template_exists`)", body = ErrorBody),
        (status = 413, description = "The build context is too large", body = ErrorBody),
    ))]
async fn create_template(
    State(server): State<Arc<Server>>,
    auth: Auth,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    auth.require("sandbox_create")?;
    // Larger than other JSON bodies: it carries the build context.
    let body = axum::body::to_bytes(
        request.into_body(),
        builds::MAX_CONTEXT_BYTES / 3 * 4 + (1 << 20),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body too large",
        )
    })?;
    let req: CreateTemplateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))?;
    let row = builds::create(&server, &auth.workspace_id, req).await?;
    let view = builds::view(&server, &auth.workspace_id, row).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

async fn find(
    server: &Server,
    auth: &Auth,
    id: &str,
) -> Result<crate::store::TemplateRow, ApiError> {
    server
        .store
        .templates
        .find(&auth.workspace_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("template_not_found", format!("no template {id:?}")))
}

/// A template version by id, name (its highest ready version), `name:N` or
/// `namespace@alias`.
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates",
    params(("id" = String, Path, description = "Template id, name, name:N or namespace@alias")),
    responses(
        (status = 200, description = "The template", body = Template),
        (status = 400, description = "A malformed name:N (`invalid_template_version`)", body = ErrorBody),
        (status = 404, description = "No such template in this workspace", body = ErrorBody),
    ))]
async fn get_template(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    auth.require("sandbox_read")?;
    let t = find(&server, &auth, &id).await?;
    Ok(Json(builds::view(&server, &auth.workspace_id, t).await?))
}

/// Delete a workspace template: every version when `{id}` is its name, else the one version
/// `name:N`, an id or an alias names. Refused while sandboxes use a version it would delete
/// unless `force=true`, which destroys them.
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates",
    params(("id" = String, Path, description = "Template name (every version), id, name:N or namespace@alias"), DeleteTemplateQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A malformed name:N (`invalid_template_version`)", body = ErrorBody),
        (status = 403, description = "A built-in template", body = ErrorBody),
        (status = 404, description = "No such template in this workspace", body = ErrorBody),
        (status = 409, description = "Sandboxes use it (code template_in_use) or it is being built", body = ErrorBody),
    ))]
async fn delete_template(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeleteTemplateQuery>,
) -> Result<StatusCode, ApiError> {
    auth.require("sandbox_create")?;
    sandpit_control::node::catalog::delete(&server.node, &auth.workspace_id, &id, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn sse(ev: &TemplateBuildEvent) -> Event {
    let name = match ev {
        TemplateBuildEvent::Step { .. } => "step",
        TemplateBuildEvent::Log { .. } => "log",
        TemplateBuildEvent::StepDone { .. } => "step_done",
        TemplateBuildEvent::Finished { .. } => "finished",
    };
    Event::default()
        .event(name)
        .json_data(ev)
        .expect("event serializes")
}

/// The build's events as Server-Sent Events (`step`, `log`, `step_done`, `finished`), from
/// the start of the build; the stream ends after `finished`.
#[utoipa::path(get, path = "/v1/templates/{id}/build", tag = "templates",
    params(("id" = String, Path, description = "Template id, name or namespace@alias")),
    responses(
        (status = 200, description = "An event stream of TemplateBuildEvent objects", body = TemplateBuildEvent, content_type = "text/event-stream"),
        (status = 404, description = "No such template in this workspace", body = ErrorBody),
    ))]
async fn build_events(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require("sandbox_read")?;
    let t = find(&server, &auth, &id).await?;
    let (past, live) = server.builds.subscribe(&server, &t.id);
    let past = futures::stream::iter(past.into_iter().map(|e| Ok::<_, Infallible>(sse(&e))));
    let live = futures::stream::unfold(live, |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(ev) => {
                let done = matches!(ev, TemplateBuildEvent::Finished { .. });
                Some((Ok(sse(&ev)), if done { None } else { Some(rx) }))
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let ev = TemplateBuildEvent::Log {
                    index: 0,
                    text: format!("[{n} events skipped: the client read too slowly]\n"),
                };
                Some((Ok(sse(&ev)), Some(rx)))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    use futures::StreamExt;
    Ok(Sse::new(past.chain(live)).keep_alive(KeepAlive::default()))
}

/// Point `namespace@alias` at this template version (creating the alias or moving it
/// here). An alias moves only this way or when a build that names it ends ready.
#[utoipa::path(put, path = "/v1/templates/{id}/aliases/{alias}", tag = "templates",
    params(
        ("id" = String, Path, description = "Template id, name (its highest ready version) or name:N"),
        ("alias" = String, Path, description = "namespace@alias, each 1–64 characters [a-z0-9._-] starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}@[a-z0-9][a-z0-9._-]{0,63}$"),
    ),
    responses(
        (status = 200, description = "The alias now points here", body = TemplateAlias),
        (status = 400, description = "Invalid alias or name:N", body = ErrorBody),
        (status = 404, description = "No such template in this workspace", body = ErrorBody),
    ))]
async fn set_alias(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((id, alias)): Path<(String, String)>,
) -> Result<Json<TemplateAlias>, ApiError> {
    auth.require("sandbox_create")?;
    let (ns, name) = sandpit_control::node::catalog::parse_alias(&alias)?;
    let t = find(&server, &auth, &id).await?;
    server
        .store
        .templates
        .set_alias(&auth.workspace_id, ns, name, &t.id, now_ms())
        .await?;
    Ok(Json(TemplateAlias {
        alias,
        template_id: t.id,
    }))
}

/// Remove an alias.
#[utoipa::path(delete, path = "/v1/templates/{id}/aliases/{alias}", tag = "templates",
    params(
        ("id" = String, Path, description = "Template id or name"),
        ("alias" = String, Path, description = "namespace@alias, each 1–64 characters [a-z0-9._-] starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}@[a-z0-9][a-z0-9._-]{0,63}$"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Invalid alias (`invalid_alias`)", body = ErrorBody),
        (status = 404, description = "No such alias on this template", body = ErrorBody),
    ))]
async fn delete_alias(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((id, alias)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    auth.require("sandbox_create")?;
    let (ns, name) = sandpit_control::node::catalog::parse_alias(&alias)?;
    let t = find(&server, &auth, &id).await?;
    if server
        .store
        .templates
        .resolve_alias(&auth.workspace_id, ns, name)
        .await?
        .as_deref()
        != Some(t.id.as_str())
    {
        return Err(ApiError::not_found(
            "alias_not_found",
            format!("{alias} does not point at this template"),
        ));
    }
    server
        .store
        .templates
        .delete_alias(&auth.workspace_id, ns, name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The versions of the name `{id}` belongs to (deleted ones aside), oldest first.
#[utoipa::path(get, path = "/v1/templates/{id}/versions", tag = "templates",
    params(("id" = String, Path, description = "Template id, name, name:N or namespace@alias")),
    responses(
        (status = 200, description = "The name's versions", body = TemplateList),
        (status = 400, description = "A malformed name:N (`invalid_template_version`)", body = ErrorBody),
        (status = 404, description = "No such template in this workspace", body = ErrorBody),
    ))]
async fn list_versions(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TemplateList>, ApiError> {
    auth.require("sandbox_read")?;
    let t = find(&server, &auth, &id).await?;
    let rows = server
        .store
        .templates
        .versions(&auth.workspace_id, &t.name)
        .await?;
    let mut templates = Vec::with_capacity(rows.len());
    for t in rows {
        templates.push(builds::view(&server, &auth.workspace_id, t).await?);
    }
    Ok(Json(TemplateList { templates }))
}

/// Build a built-in template that is built on demand (`toolchain`: Debian with bash,
/// python3, node and git from the host's apt sources). Starts the build unless it is built
/// or building; follow it at `GET /v1/templates/{id}/build`.
#[utoipa::path(post, path = "/v1/templates/{id}/build", tag = "templates",
    params(("id" = String, Path, description = "Template id or name (toolchain)")),
    responses(
        (status = 202, description = "The template, building or already built", body = Template),
        (status = 400, description = "Not a template built on demand", body = ErrorBody),
        (status = 404, description = "No such template", body = ErrorBody),
    ))]
async fn build_builtin(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require("sandbox_create")?;
    let row = builds::build_builtin(&server, &auth.workspace_id, &id).await?;
    let view = builds::view(&server, &auth.workspace_id, row).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}
