//! `/v1/templates`: the templates a workspace can start sandboxes from.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use sandpit_api_types::{ErrorBody, Template, TemplateList};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Server;
use crate::util::rfc3339;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new().routes(routes!(list_templates))
}

/// Built-in templates and the workspace's own.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses(
        (status = 200, description = "The templates", body = TemplateList),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ))]
async fn list_templates(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<TemplateList>, ApiError> {
    auth.require("sandbox_read")?;
    let rows = server.store.list_templates(&auth.workspace_id).await?;
    let mut templates = Vec::with_capacity(rows.len());
    for t in rows {
        let warm = server.store.pooled_count(&t.id).await? as u32;
        templates.push(Template {
            warm,
            boot_snapshot: server.cfg.boot_snapshots
                && crate::templates::boot_snapshot(&server, &t.name).is_some(),
            id: t.id,
            name: t.name,
            description: t.description,
            created_at: rfc3339(t.created_at),
            default_egress: serde_json::from_str(&t.default_egress).unwrap_or_default(),
        });
    }
    Ok(Json(TemplateList { templates }))
}
