//! Workspace secrets (`/v1/secrets`): values a sandbox uses without seeing them. A sandbox
//! created with `secrets: ["name"]` holds a placeholder in `SANDPIT_SECRET_<NAME>`; the
//! server's egress proxy puts the value in its place in HTTPS requests to the secret's hosts.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The longest secret name.
pub const MAX_SECRET_NAME: usize = 63;
/// The longest secret value, in bytes.
pub const MAX_SECRET_VALUE: usize = 8192;
/// The most hosts one secret lists.
pub const MAX_SECRET_HOSTS: usize = 32;
/// The most secrets one sandbox holds.
pub const MAX_SANDBOX_SECRETS: usize = 16;
/// The prefix of the environment variable holding a secret's placeholder: `openai` →
/// `SANDPIT_SECRET_OPENAI`.
pub const SECRET_ENV_PREFIX: &str = "SANDPIT_SECRET_";

/// `POST /v1/secrets`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateSecretRequest {
    /// `[a-z][a-z0-9_]*`, 1 to 63 characters, unique in the workspace. The sandbox's
    /// variable is `SANDPIT_SECRET_` and the name in capitals.
    #[schema(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    pub name: String,
    /// Write-only: never returned, never logged. 1 to 8192 bytes of printable ASCII.
    pub value: String,
    /// Host names (`api.example.com`) and wildcards (`*.example.org`: the names below it)
    /// whose HTTPS requests may carry the value. 1 to 32 entries.
    pub hosts: Vec<String>,
    /// Where the value goes in a request.
    pub inject: SecretInject,
}

/// Where a secret's value goes: exactly one of `header` (with `format`), `query` or `basic`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretInject {
    /// A header name (`Authorization`): a header of that name holding the placeholder gets
    /// `format` with `{value}` replaced by the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// With `header`: the header's value, holding `{value}` once (default `{value}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A query parameter name: `?<query>=<placeholder>` gets the value (percent-encoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// HTTP basic auth: `Authorization: Basic` of `<username>:<placeholder>` gets
    /// `<username>:<value>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicInject>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BasicInject {
    pub username: String,
}

/// `PUT /v1/secrets/{name}`: a new value (used by the next request of every sandbox holding
/// the secret, without restarting them).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateSecretRequest {
    pub value: String,
}

/// A secret as responses show it: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Secret {
    pub name: String,
    pub hosts: Vec<String>,
    pub inject: SecretInject,
    /// The variable a sandbox holding it finds its placeholder in.
    pub env: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SecretList {
    pub secrets: Vec<Secret>,
}

/// Whether `name` is a valid secret name.
pub fn valid_secret_name(name: &str) -> bool {
    (1..=MAX_SECRET_NAME).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The environment variable of secret `name` (`SANDPIT_SECRET_OPENAI`).
pub fn secret_env(name: &str) -> String {
    format!("{SECRET_ENV_PREFIX}{}", name.to_ascii_uppercase())
}
