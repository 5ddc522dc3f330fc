//! Previews: a sandbox's HTTP ports served at `http://<sandbox id>-<port>.<preview domain>`
//! by the server's own listener, public or behind preview tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Who may open a sandbox's previews.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PreviewPrivacy {
    /// Only requests with a valid preview token of this sandbox (query `preview_token`,
    /// header `csb-preview-token` or cookie `csb_preview_token`).
    #[default]
    Private,
    /// Anyone who can reach the server.
    Public,
}

impl PreviewPrivacy {
    pub fn as_str(self) -> &'static str {
        match self {
            PreviewPrivacy::Private => "private",
            PreviewPrivacy::Public => "public",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "private" => Some(PreviewPrivacy::Private),
            "public" => Some(PreviewPrivacy::Public),
            _ => None,
        }
    }
}

/// A sandbox's preview settings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct PreviewSettings {
    #[serde(default)]
    pub privacy: PreviewPrivacy,
}

/// `PATCH /v1/sandboxes/{id}`: omitted fields stay as they are.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandboxRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewSettings>,
    /// A new size preset (`small`, `medium`, `large`): a running sandbox gets its CPU and
    /// memory limits at once and its disk grown (a disk never shrinks); a suspended one at
    /// its wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

/// `POST /v1/sandboxes/{id}/preview-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PreviewTokenCreateRequest {
    /// RFC 3339; omitted: the token never expires (revoke it instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
}

/// `PATCH /v1/sandboxes/{id}/preview-tokens/{token_id}`: `null` removes the expiry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PreviewTokenUpdateRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::org::double_option"
    )]
    pub expires_at: Option<Option<String>>,
}

/// A preview token as the API shows it. `token` is present only in the create response: it
/// is shown once and stored hashed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PreviewToken {
    pub token_id: String,
    pub sandbox_id: String,
    /// The token's first characters, to tell tokens apart.
    pub token_prefix: String,
    pub expires_at: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewTokenList {
    /// Tokens not revoked, expired ones included, oldest first.
    pub tokens: Vec<PreviewToken>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_defaults_to_private() {
        let s: PreviewSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s.privacy, PreviewPrivacy::Private);
        let s: PreviewSettings = serde_json::from_str(r#"{"privacy":"public"}"#).unwrap();
        assert_eq!(s.privacy, PreviewPrivacy::Public);
        assert!(serde_json::from_str::<PreviewSettings>(r#"{"privacy":"open"}"#).is_err());
        let u: PreviewTokenUpdateRequest = serde_json::from_str(r#"{"expires_at":null}"#).unwrap();
        assert_eq!(u.expires_at, Some(None));
    }
}
