//! Workspaces and API tokens, in the shapes of the CodeSandbox API (seed 000), whose
//! responses wrap data in `{"success": true, "errors": [], "data": ...}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every scope a token can hold.
pub const ALL_SCOPES: &[&str] = &[
    "workspace:create",
    "token:manage",
    "sandbox_create",
    "sandbox_edit_code",
    "sandbox_read",
    "vm_manage",
];

/// The scopes a workspace token may be given through `POST /org/workspace/{id}/tokens`.
pub const SANDBOX_SCOPES: &[&str] = &[
    "sandbox_create",
    "sandbox_edit_code",
    "sandbox_read",
    "vm_manage",
];

/// The CodeSandbox response envelope.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Envelope<T> {
    pub success: bool,
    pub errors: Vec<serde_json::Value>,
    pub data: Option<T>,
}

impl<T> Envelope<T> {
    pub fn ok(data: T) -> Self {
        Envelope {
            success: true,
            errors: Vec::new(),
            data: Some(data),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct WorkspaceCreateRequest {
    /// Name for the new workspace, at most 64 characters.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Workspace {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct TokenCreateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339 timestamp; omitted means the token never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    /// Defaults to every sandbox scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

/// Omitting a field leaves it unchanged; `null` clears it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct TokenUpdateRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    pub description: Option<Option<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    pub expires_at: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
}

/// A token as the API shows it. `token` is present only in the create response: it is shown
/// once and stored hashed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub token_id: String,
    pub team_id: String,
    pub description: Option<String>,
    pub expires_at: Option<String>,
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Distinguishes an absent field (outer `None`) from an explicit `null` (`Some(None)`).
pub(crate) mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_distinguishes_null_from_absent() {
        let r: TokenUpdateRequest = serde_json::from_str(r#"{"expires_at":null}"#).unwrap();
        assert_eq!(r.expires_at, Some(None));
        assert_eq!(r.description, None);
        let r: TokenUpdateRequest = serde_json::from_str(r#"{"description":"x"}"#).unwrap();
        assert_eq!(r.description, Some(Some("x".into())));
    }
}
