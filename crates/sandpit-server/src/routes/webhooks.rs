//! `/v1/webhooks`: a workspace's webhooks (create, list, get, delete) and their recent
//! deliveries. Delivery itself is [`crate::webhooks`].

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sandpit_api_types::{
    CreateWebhookRequest, CreatedWebhook, ErrorBody, MAX_WEBHOOKS, Webhook, WebhookDelivery,
    WebhookDeliveryList, WebhookList,
};
use sandpit_control::store::{DeliveryRow, PENDING, WebhookRow};
use sandpit_control::util::{new_id, now_ms, rfc3339};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiJson;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Server;
use crate::webhooks::{DELIVERIES_SHOWN, SECRET_PREFIX, validate};

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, delete_webhook))
        .routes(routes!(list_deliveries))
}

fn to_api(w: &WebhookRow) -> Webhook {
    Webhook {
        id: w.id.clone(),
        url: w.url.clone(),
        events: w.kinds(),
        description: w.description.clone(),
        created_at: rfc3339(w.created_at),
    }
}

fn delivery_to_api(d: &DeliveryRow) -> WebhookDelivery {
    WebhookDelivery {
        event_id: d.event_seq,
        event_type: d.kind.clone(),
        status: d.status.clone(),
        attempts: u32::try_from(d.attempts).unwrap_or(u32::MAX),
        status_code: d.last_status_code.and_then(|c| u16::try_from(c).ok()),
        error: d.last_error.clone(),
        response_body: d.last_response.clone(),
        last_attempt_at: d.last_attempt_at.map(rfc3339),
        next_attempt_at: (d.status == PENDING).then(|| rfc3339(d.next_attempt_at)),
    }
}

/// A webhook id as the API makes them (`wh_` and 16 hex digits); anything else is no
/// webhook of this workspace.
fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = id
        .strip_prefix("wh_")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok { Ok(()) } else { Err(not_found()) }
}

fn not_found() -> ApiError {
    ApiError::not_found("webhook_not_found", "no such webhook in this workspace")
}

async fn find(server: &Server, auth: &Auth, id: &str) -> Result<WebhookRow, ApiError> {
    check_id(id)?;
    server
        .store
        .webhooks
        .get(&auth.workspace_id, id)
        .await?
        .ok_or_else(not_found)
}

/// Create a webhook: the workspace's lifecycle events (all, or the kinds in `events`) are
/// POSTed to `url`, signed with the secret this answer carries (and no other).
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks",
    request_body = CreateWebhookRequest,
    responses(
        (status = 201, description = "Webhook created; `secret` is shown only here", body = CreatedWebhook),
        (status = 400, description = "Invalid url (`invalid_webhook_url`: not http or https, user info, a fragment, longer than 2048), event kinds (`invalid_webhook_events`) or description (`invalid_webhook_description`), or the workspace has 20 webhooks already (`too_many_webhooks`); nothing was made", body = ErrorBody),
    ))]
async fn create_webhook(
    State(server): State<Arc<Server>>,
    auth: Auth,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> Result<(StatusCode, Json<CreatedWebhook>), ApiError> {
    auth.require("vm_manage")?;
    let v = validate(&req)?;
    let row = WebhookRow {
        id: new_id("wh"),
        workspace_id: auth.workspace_id.clone(),
        url: v.url,
        events: v.events,
        description: v.description,
        secret: sandpit_control::tokens::generate_token_with(SECRET_PREFIX),
        created_at: now_ms(),
    };
    if !server.store.webhooks.insert(&row, MAX_WEBHOOKS).await? {
        return Err(ApiError::bad_request(
            "too_many_webhooks",
            format!("a workspace keeps at most {MAX_WEBHOOKS} webhooks: delete one first"),
        ));
    }
    let w = to_api(&row);
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            id: w.id,
            url: w.url,
            events: w.events,
            description: w.description,
            created_at: w.created_at,
            secret: row.secret,
        }),
    ))
}

/// The workspace's webhooks, oldest first (without their secrets).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, description = "The webhooks", body = WebhookList)))]
async fn list_webhooks(
    State(server): State<Arc<Server>>,
    auth: Auth,
) -> Result<Json<WebhookList>, ApiError> {
    auth.require("sandbox_read")?;
    let rows = server.store.webhooks.list(&auth.workspace_id).await?;
    Ok(Json(WebhookList {
        webhooks: rows.iter().map(to_api).collect(),
    }))
}

/// One webhook (without its secret).
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The webhook", body = Webhook),
        (status = 404, description = "No such webhook (`webhook_not_found`)", body = ErrorBody),
    ))]
async fn get_webhook(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Webhook>, ApiError> {
    auth.require("sandbox_read")?;
    Ok(Json(to_api(&find(&server, &auth, &id).await?)))
}

/// Delete a webhook and its deliveries: nothing more is sent to it (an attempt under way
/// may still finish).
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such webhook (`webhook_not_found`)", body = ErrorBody),
    ))]
async fn delete_webhook(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require("vm_manage")?;
    check_id(&id)?;
    if !server
        .store
        .webhooks
        .delete(&auth.workspace_id, &id)
        .await?
    {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook's most recent deliveries, newest first (at most 100): the event, where the
/// delivery stands, the last attempt's answer or error, the next attempt.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The deliveries", body = WebhookDeliveryList),
        (status = 404, description = "No such webhook (`webhook_not_found`)", body = ErrorBody),
    ))]
async fn list_deliveries(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<WebhookDeliveryList>, ApiError> {
    auth.require("sandbox_read")?;
    let w = find(&server, &auth, &id).await?;
    let rows = server
        .store
        .webhooks
        .deliveries(&auth.workspace_id, &w.id, DELIVERIES_SHOWN)
        .await?;
    Ok(Json(WebhookDeliveryList {
        deliveries: rows.iter().map(delivery_to_api).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_api_made_ids_are_looked_up() {
        assert!(check_id("wh_0123456789abcdef").is_ok());
        for bad in [
            "",
            "wh_",
            "wh_0123456789abcdeg",
            "sb_0123456789abcdef",
            "wh_0123456789abcdef0",
            "wh_%27",
        ] {
            assert_eq!(
                check_id(bad).unwrap_err().code,
                "webhook_not_found",
                "{bad:?}"
            );
        }
    }
}
