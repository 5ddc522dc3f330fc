//! The sandbox lifecycle at the HTTP edge: each call authorizes (an [`Authorized`] sandbox),
//! applies the per-workspace rates and early quota answers ([`crate::limits`], with the
//! SDK's headers), then hands over to the control layer's orchestration
//! (`sandpit_control::node::lifecycle`), whose errors become [`ApiError`]s once.

use std::sync::Arc;

use sandpit_api_types::{CreateSandboxRequest, EgressPolicy, PreviewSettings, SandboxMode};
use sandpit_control::agent::AgentClient;
use sandpit_control::node::boot::{Admitted, owned};
use sandpit_control::node::lifecycle as node;
use sandpit_control::{ControlError, Status};
use tokio::sync::OwnedRwLockReadGuard;

pub use sandpit_control::node::boot::{
    agent_of, deny_all, egress_rules, exec_env, size_resources, to_api,
};
pub use sandpit_control::node::lifecycle::STOPPED_REASON;

use crate::error::ApiError;
use crate::extract::Authorized;
use crate::server::Server;
use crate::store::Sandbox;
use crate::util::now_ms;

/// Run a lifecycle operation (create, wake, fork, hibernate, shutdown) measuring its phases
/// (`sandpit_control::phases`), and add them to the response as `Server-Timing`
/// (`sandpit_api_types::server_timing`): phase names and milliseconds, nothing a tenant
/// chose. A replayed idempotent response carries none (it did no work).
/// (Not an `async fn`: see `phases::measure`.)
pub fn server_timed<F: std::future::Future>(op: F) -> impl std::future::Future<Output = F::Output> {
    use futures::FutureExt;
    sandpit_control::phases::measure(op).map(|(out, timings)| {
        let value = sandpit_api_types::server_timing::format(timings.metrics());
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            crate::limits::add_headers([(
                axum::http::HeaderName::from_static(sandpit_api_types::server_timing::HEADER),
                value,
            )]);
        }
        out
    })
}

/// `POST /v1/sandboxes`: validate (nothing changes on a bad request), check the host's disk
/// reserve and the workspace's rates and quotas, then start it (`node::create`).
pub async fn create(
    server: &Arc<Server>,
    workspace_id: &str,
    req: &CreateSandboxRequest,
) -> Result<Sandbox, ApiError> {
    let (mut row, snapshot, volumes) =
        node::prepare_create(&server.node, workspace_id, req).await?;
    // Secrets: checked, placeholders drawn and put into the environment; recorded once the
    // create is admitted.
    let held = if req.secrets.is_empty() {
        None
    } else {
        let mut env = row.env.decode(|| format!("environment of {}", row.id))?;
        let held = sandpit_control::secrets::prepare_sandbox(
            &server.node,
            workspace_id,
            &req.secrets,
            &mut env,
        )
        .await?;
        row.env = sandpit_control::Stored::encode(&env);
        held
    };
    server.ensure_free_disk()?;
    // Held until the store counts the new row.
    let room = server
        .limits
        .admit(
            &server.node,
            workspace_id,
            1,
            req.mode == SandboxMode::Persistent,
        )
        .await?;
    let room = std::sync::Mutex::new(room);
    let admitted = Admitted {
        lock: &server.limits.admission,
        hand_back: &|n| room.lock().expect("room poisoned").release(n),
    };
    if let Some(held) = &held {
        server.store.secrets.bind(&row.id, held).await?;
    }
    Ok(node::create(&server.node, row, snapshot, volumes, &admitted).await?)
}

/// The current row of a sandbox the caller was authorized for (see [`Authorized`]); 404 if
/// it is gone.
pub async fn current(server: &Server, sb: &Authorized) -> Result<Sandbox, ApiError> {
    Ok(owned(&server.node, sb.workspace_id(), sb.id()).await?)
}

/// Destroy a sandbox: idempotent, works in every state.
pub async fn destroy(server: &Arc<Server>, id: &str) -> Result<(), ApiError> {
    Ok(node::destroy(&server.node, id).await?)
}

/// Stop a sandbox without saving its memory (see `node::shutdown`).
pub async fn shutdown(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    Ok(node::shutdown(&server.node, id).await?)
}

/// Save a running sandbox's memory to disk and stop it, freeing its RAM.
pub async fn suspend(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    Ok(node::suspend(&server.node, id).await?)
}

/// Wake a suspended sandbox: the running quota is answered early here (with the SDK's
/// headers); the slot claim checks it again in the store.
pub async fn wake(server: &Arc<Server>, id: &str) -> Result<Sandbox, ApiError> {
    let room = match server.store.sandboxes.get(id).await? {
        Some(row) if row.status == Status::Suspended => Some(
            server
                .limits
                .admit_wake(&server.node, &row.workspace_id)
                .await?,
        ),
        _ => None,
    };
    let room = std::sync::Mutex::new(room);
    let admitted = Admitted {
        lock: &server.limits.admission,
        hand_back: &|n| {
            if let Some(r) = room.lock().expect("room poisoned").as_mut() {
                r.release(n)
            }
        },
    };
    Ok(node::wake(&server.node, id, &admitted).await?)
}

/// After an agent operation failed: settle the sandbox if it died (`node::settle_if_dead`);
/// the error for the client if it did.
pub async fn settle_if_dead(server: &Arc<Server>, id: &str) -> Option<ApiError> {
    node::settle_if_dead(&server.node, id)
        .await
        .then(stopped_error)
}

/// 409 `sandbox_stopped`: the sandbox died under the request.
pub fn stopped_error() -> ApiError {
    ApiError::conflict("sandbox_stopped", STOPPED_REASON)
}

/// 507 `quota_exceeded` when hibernating or shutting down `sb` would pass its workspace's
/// `max_suspended` (a running ephemeral sandbox; persistent ones count from their create).
pub async fn check_may_suspend(server: &Server, sb: &Authorized) -> Result<(), ApiError> {
    let row = current(server, sb).await?;
    if row.mode == SandboxMode::Persistent || row.status != Status::Running {
        return Ok(());
    }
    Ok(node::check_suspendable(&server.node, sb.workspace_id(), 1).await?)
}

/// A running sandbox's agent, with the sandbox's read lock held for the operation. Wakes a
/// suspended sandbox first; 409 for sandboxes that cannot run.
pub async fn running_agent(
    server: &Arc<Server>,
    sb: &Authorized,
) -> Result<(AgentClient, OwnedRwLockReadGuard<()>, Sandbox), ApiError> {
    let id = sb.id();
    for _ in 0..3 {
        let row = match current(server, sb).await {
            Ok(row) => row,
            // Hibernated on a node that is gone (or draining, its image stored): the wake
            // takes it over here, then the loop goes on with it as this node's.
            Err(e) if e.code == "sandbox_on_another_node" => {
                match server.store.sandboxes.get(id).await? {
                    Some(row)
                        if row.status == Status::Suspended
                            && crate::forward::moves_here(server, &row).await =>
                    {
                        wake(server, id).await?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        match row.status {
            Status::Running => {
                let guard = server.lock_of(id).read_owned().await;
                // Re-check under the lock: a transition may have run meanwhile.
                let row = current(server, sb).await?;
                if row.status != Status::Running {
                    continue;
                }
                server.store.sandboxes.touch(id, now_ms()).await?;
                let agent = agent_of(server, &row).ok_or_else(|| {
                    ControlError::Internal(format!("running sandbox {id} has no slot"))
                })?;
                return Ok((agent, guard, row));
            }
            Status::Suspended => {
                wake(server, id).await?;
            }
            other => {
                return Err(ApiError::conflict(
                    "sandbox_not_running",
                    format!("the sandbox is {other}"),
                ));
            }
        }
    }
    Err(ApiError::conflict(
        "sandbox_busy",
        "the sandbox changed state during the request; retry",
    ))
}

/// Replace a sandbox's egress policy (see `node::set_egress`).
pub async fn set_egress(
    server: &Arc<Server>,
    sb: &Authorized,
    policy: &EgressPolicy,
) -> Result<Sandbox, ApiError> {
    Ok(node::set_egress(&server.node, sb.workspace_id(), sb.id(), policy).await?)
}

/// Change a sandbox's preview privacy (see `node::set_preview`).
pub async fn set_preview(
    server: &Arc<Server>,
    sb: &Authorized,
    preview: PreviewSettings,
) -> Result<Sandbox, ApiError> {
    Ok(node::set_preview(&server.node, sb.workspace_id(), sb.id(), preview).await?)
}

/// Change a sandbox's size in place (see `node::resize`).
pub async fn resize(
    server: &Arc<Server>,
    sb: &Authorized,
    size: &str,
) -> Result<Sandbox, ApiError> {
    Ok(node::resize(&server.node, sb.workspace_id(), sb.id(), size).await?)
}

/// Extend an ephemeral running sandbox's expiry (see `node::keepalive`).
pub async fn keepalive(
    server: &Arc<Server>,
    sb: &Authorized,
    timeout: &str,
) -> Result<Sandbox, ApiError> {
    Ok(node::keepalive(&server.node, sb.workspace_id(), sb.id(), timeout).await?)
}
