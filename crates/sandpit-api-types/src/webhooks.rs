//! Webhooks: a workspace's lifecycle events (the same JSON as `GET /v1/events`) POSTed to
//! an endpoint of its choosing, signed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most webhooks one workspace keeps.
pub const MAX_WEBHOOKS: u32 = 20;
/// The longest webhook URL.
pub const MAX_WEBHOOK_URL: usize = 2048;
/// The longest description.
pub const MAX_WEBHOOK_DESCRIPTION: usize = 256;
/// The kinds of lifecycle events (`LifecycleEvent.type`), which a webhook may filter on.
pub const EVENT_KINDS: &[&str] = &[
    "created",
    "started",
    "suspended",
    "woken",
    "forked",
    "failed",
    "destroyed",
    "build_finished",
    "secret_injected",
];

/// `POST /v1/webhooks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// Where events are POSTed: an `http` or `https` URL without user info or fragment, at
    /// most 2048 characters. Only public addresses are reached (the operator may allow
    /// others with `--webhook-allow-hosts`); a refused address is recorded on the delivery.
    #[schema(max_length = 2048)]
    pub url: String,
    /// The event kinds to send (`created`, `started`, `suspended`, `woken`, `forked`,
    /// `failed`, `destroyed`, `build_finished`); absent: every kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// A note for people, at most 256 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub description: Option<String>,
}

/// A webhook (without its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// The event kinds it receives; absent: every kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: String,
}

/// The answer to `POST /v1/webhooks`: the webhook and its signing secret, shown only here.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CreatedWebhook {
    pub id: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: String,
    /// The HMAC-SHA256 key of `Sandpit-Signature` (see docs/webhooks.md). Returned only in
    /// this answer.
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

/// One event's delivery to a webhook.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookDelivery {
    /// The event's `seq` (the `Sandpit-Event-Id` header).
    pub event_id: i64,
    /// The event's type, while the event is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// `pending` (another attempt at `next_attempt_at`), `delivered` (a 2xx answer) or
    /// `failed` (no 2xx answer within a day of the event).
    pub status: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The HTTP status of the last attempt's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why the last attempt got no answer (refused address, connect or TLS error, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The start of the last answer's body (at most 4 KiB, lossy UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<String>,
    /// When the next attempt is due (pending deliveries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookDeliveryList {
    /// Newest first, at most 100.
    pub deliveries: Vec<WebhookDelivery>,
}
