//! Template builds: from an OCI image reference or a Dockerfile with its build context.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::EgressPolicy;

pub(crate) fn ready() -> String {
    "ready".into()
}

pub(crate) fn first_version() -> u32 {
    1
}

/// `POST /v1/templates`: build a template. Exactly one of `image` and `dockerfile`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplateRequest {
    /// 1–64 characters `[a-z0-9._-]`, starting with a letter or digit; unique on the server.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// An image reference to pull (`busybox:1.36`, `127.0.0.1:5000/app@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Dockerfile's text. `FROM` names a registry image, one of the workspace's
    /// templates (or a built-in one), or `scratch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// The build context `COPY` and `ADD` read: a tar archive (optionally gzip), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Values for the Dockerfile's `ARG`s.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Credentials for the registry of `image` or of the Dockerfile's `FROM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// When the start command counts as ready (overrides the Dockerfile's HEALTHCHECK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyCheck>,
    /// Egress policy of sandboxes created from the template (default `allow_all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_egress: Option<EgressPolicy>,
    /// Egress policy of the sandboxes that run the build's `RUN` steps (default `allow_all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_egress: Option<EgressPolicy>,
    /// `namespace@alias` names to point at the template once it is built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// Registry credentials: `username` + `password` (basic, or exchanged for a bearer token
/// when the registry asks), or a `token` used as is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A ready check: `{"port": 8080}` or `{"command": "test -f /ready"}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReadyCheck {
    Port(u16),
    Command(String),
}

/// `PUT /v1/templates/{id}/aliases/{alias}` answer and alias listing entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct TemplateAlias {
    /// `namespace@alias`.
    pub alias: String,
    pub template_id: String,
}

/// One event of a template build (`GET /v1/templates/{id}/build`, Server-Sent Events; the
/// event name equals `type`). A stream replays the build from its start and ends after
/// `finished`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateBuildEvent {
    /// A step starts; `index` counts from 1 to `total`.
    Step {
        index: u32,
        total: u32,
        line: u32,
        instruction: String,
    },
    /// Output of the running step (RUN output, pull progress).
    Log { index: u32, text: String },
    /// A step ended; `cached` when its layer came from the build cache.
    StepDone {
        index: u32,
        cached: bool,
        elapsed_ms: u64,
    },
    /// The build ended: `status` is `ready` or `failed` (then `error` says why).
    Finished {
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        elapsed_ms: u64,
    },
}

/// `DELETE /v1/templates/{id}` options.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct DeleteTemplateQuery {
    /// Also destroy the sandboxes and snapshots that use it (refused with 409 otherwise).
    #[serde(default)]
    pub force: bool,
}
