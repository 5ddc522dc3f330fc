//! The rules of request bodies that the derived schemas cannot say, added to the OpenAPI
//! document so generated clients and outside tools see what the server checks: either/or
//! bodies, ranges of list items, the names a map may have, the scopes a token may get, the
//! event kinds a webhook may filter on.
//! Each rule names the component and property it tightens; a rule whose target is missing
//! fails the document's test, so a renamed field cannot silently drop its rule.

use serde_json::{Value, json};

use sandpit_api_types::{EVENT_KINDS, MAX_ALLOW_DOMAINS, SANDBOX_SCOPES};
use sandpit_control::create::MAX_METADATA;

/// An environment variable name the server accepts: not empty, no `=`, no NUL.
const ENV_NAME: &str = "^[^=\\u0000]+$";
/// An IPv4 address or CIDR (`10.0.0.0/8`, `192.0.2.1`); the server checks the octets.
const IPV4_CIDR: &str = "^[0-9]{1,3}(\\.[0-9]{1,3}){3}(/[0-9]{1,2})?$";

/// `(component, JSON pointer inside it, what to merge there)`.
fn rules() -> Vec<(&'static str, &'static str, Value)> {
    let (max_entries, max_key, max_value) = MAX_METADATA;
    let env = json!({"propertyNames": {"minLength": 1, "pattern": ENV_NAME}});
    let exactly_one = json!({"oneOf": [
        {"required": ["command"], "properties": {"command": {"type": "string", "minLength": 1}}},
        {"required": ["argv"], "properties": {"argv": {"type": "array", "minItems": 1}}},
    ]});
    let scopes = json!({"items": {"enum": SANDBOX_SCOPES}});
    vec![
        ("ExecRequest", "", exactly_one),
        ("ExecRequest", "/properties/env", env.clone()),
        ("CreateSandboxRequest", "/properties/env", env),
        (
            "CreateSandboxRequest",
            "/properties/metadata",
            json!({
                "maxProperties": max_entries,
                "propertyNames": {"maxLength": max_key},
                "additionalProperties": {"maxLength": max_value},
            }),
        ),
        (
            "EgressPolicy",
            "/properties/allow_cidrs",
            json!({"items": {"pattern": IPV4_CIDR}}),
        ),
        (
            "EgressPolicy",
            "/properties/deny_cidrs",
            json!({"items": {"pattern": IPV4_CIDR}}),
        ),
        (
            "EgressPolicy",
            "/properties/allow_ports",
            json!({"items": {"minimum": 1, "maximum": 65535}}),
        ),
        (
            "EgressPolicy",
            "/properties/allow_domains",
            json!({"maxItems": MAX_ALLOW_DOMAINS}),
        ),
        (
            "CreateWebhookRequest",
            "/properties/events",
            json!({
                "minItems": 1,
                "maxItems": EVENT_KINDS.len(),
                "items": {"enum": EVENT_KINDS},
            }),
        ),
        (
            "CreateWebhookRequest",
            "/properties/url",
            json!({"pattern": "^[hH][tT][tT][pP][sS]?://"}),
        ),
        ("TokenCreateRequest", "/properties/scopes", scopes.clone()),
        ("TokenUpdateRequest", "/properties/scopes", scopes),
    ]
}

/// Merge `patch` into `target`: objects key by key, anything else replaced.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Apply every rule to `doc`. Returns the rules whose target does not exist.
pub fn apply(doc: &mut utoipa::openapi::OpenApi) -> Vec<String> {
    let mut value = serde_json::to_value(&*doc).expect("the document serializes");
    let mut missing = Vec::new();
    for (component, pointer, patch) in rules() {
        let path = format!("/components/schemas/{component}{pointer}");
        match value.pointer_mut(&path) {
            Some(target) => merge(target, &patch),
            None => missing.push(path),
        }
    }
    *doc = serde_json::from_value(value).expect("the patched document deserializes");
    missing
}
