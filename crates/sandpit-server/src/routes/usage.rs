//! `GET /v1/usage`: the caller's workspace's use of its limits (rates, running and kept
//! sandboxes, templates, builds, snapshots, volumes), read without spending any of them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use sandpit_api_types::{UsageItem, WorkspaceUsage};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::limits::Allowance;
use crate::server::Server;

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new().routes(routes!(usage))
}

fn item(a: Allowance) -> UsageItem {
    UsageItem {
        limit: a.limit,
        used: a.used,
        reset: a.reset,
    }
}

fn count(limit: u32, used: i64) -> UsageItem {
    UsageItem {
        limit,
        used: u32::try_from(used).unwrap_or(u32::MAX),
        reset: None,
    }
}

/// The workspace's limits and what it uses of each (0: no limit).
#[utoipa::path(get, path = "/v1/usage", tag = "workspace",
    responses((status = 200, description = "The workspace's usage", body = WorkspaceUsage)))]
async fn usage(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<WorkspaceUsage>, ApiError> {
    auth.require("sandbox_read")?;
    let ws = auth.workspace_id.as_str();
    let rates = crate::limits::usage(&server, ws).await?;
    let store = &server.store;
    let cfg = &server.limits.cfg;
    let (templates, builds) = store.templates.count(ws).await?;
    Ok(Json(WorkspaceUsage {
        workspace_id: ws.to_string(),
        requests_hourly: item(rates.requests_hourly),
        sandboxes_hourly: item(rates.sandboxes_hourly),
        running: item(rates.running),
        suspended: count(
            cfg.max_suspended,
            store.sandboxes.count_suspendable(ws).await?,
        ),
        templates: count(cfg.max_templates, templates),
        builds: count(cfg.max_builds, builds),
        snapshots: count(cfg.max_snapshots, store.snapshots.count(ws).await?),
        volumes: count(cfg.max_volumes, store.volumes.list(ws).await?.len() as i64),
    }))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use sandpit_api_types::{SandboxMode, WorkspaceUsage};
    use tower::ServiceExt;

    use crate::tests::{Harness, TOKEN};

    #[tokio::test]
    async fn usage_counts_against_the_limits() {
        let h = Harness::new(|cfg| {
            cfg.limits.max_running = 3;
            cfg.limits.max_volumes = 0;
        })
        .await;
        h.create(SandboxMode::Ephemeral).await.unwrap();
        h.create(SandboxMode::Persistent).await.unwrap();
        let get = |token: Option<&str>| {
            let mut req = Request::get("/v1/usage");
            if let Some(t) = token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            crate::app(h.server.clone()).oneshot(req.body(Body::empty()).unwrap())
        };
        let resp = get(Some(TOKEN)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let u: WorkspaceUsage = serde_json::from_slice(&body).unwrap();
        assert_eq!(u.workspace_id, h.auth.workspace_id);
        assert_eq!((u.running.limit, u.running.used), (3, 2));
        // Only the persistent one will be kept suspended.
        assert_eq!(u.suspended.used, 1);
        assert_eq!(u.volumes.limit, 0, "no limit");
        assert_eq!((u.snapshots.used, u.builds.used), (0, 0));
        assert!(u.requests_hourly.limit > 0 && u.requests_hourly.reset.is_some());

        assert_eq!(get(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            get(Some("sp_unknown")).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
}
