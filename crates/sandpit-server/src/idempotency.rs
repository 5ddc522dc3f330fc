//! `Idempotency-Key` on create and fork. The first request with a key runs (in a task of its
//! own, so a client that disconnects and retries gets its result); a repeat with the same key
//! and the same body replays that response (`Idempotent-Replayed: true`), waiting while the
//! first still runs; a repeat with another body is refused (422 `idempotency_key_reused`).
//! Without a key the work runs in a task of its own as well, so that a client that goes
//! away never cancels a create or fork half-way.
//! Keys are per workspace, kept 24 hours, and released when the first request fails, so a
//! retry runs again.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::auth::Auth;
use crate::error::{ApiError, DisplayChain};
use crate::server::Server;
use crate::util::now_ms;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// How long a key is remembered.
const KEEP: Duration = Duration::from_secs(24 * 3600);
/// How long a repeat waits for the first request before giving up with 409.
const WAIT: Duration = Duration::from_secs(600);
/// Longest key.
const MAX_KEY_LEN: usize = 255;

/// The request's idempotency key, if any: 1–255 visible ASCII characters, or 400.
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        )
    };
    let key = value.to_str().map_err(|_| bad())?;
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(key.to_string()))
}

/// What identifies "the same request": the operation and its parsed body.
pub fn request_hash(op: &str, request: &impl serde::Serialize) -> String {
    let body = serde_json::to_string(request).expect("requests serialize");
    hex::encode(Sha256::digest(format!("{op}\n{body}").as_bytes()))
}

/// Run `work` at most once per key: see the module docs. Without a key it just runs.
pub async fn once<F>(
    server: &Arc<Server>,
    auth: &Auth,
    key: Option<String>,
    hash: String,
    work: F,
) -> Result<Response, ApiError>
where
    F: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>> + Send + 'static,
{
    let Some(key) = key else {
        // In a task of its own too: a client (or relaying server) that goes away mid-create
        // must not cancel the work half-way and leave a half-made sandbox behind.
        // (In the request's span: its spans belong to the request's trace.)
        let task = tokio::spawn(crate::limits::collecting_headers(work).in_current_span());
        return answer(task).await;
    };
    let ws = auth.workspace_id.clone();
    let started = Instant::now();
    loop {
        let now = now_ms();
        let earlier = server
            .store
            .idempotency
            .begin(
                &server.node.cfg.node_id,
                &ws,
                &key,
                &hash,
                now,
                now + KEEP.as_millis() as i64,
            )
            .await?;
        match earlier {
            None => break,
            Some(row) if row.request_hash != hash => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request",
                ));
            }
            Some(row) => {
                if let (Some(status), Some(body)) = (row.status, row.response) {
                    return Ok(replay(status, body));
                }
                if started.elapsed() > WAIT {
                    return Err(ApiError::conflict(
                        "idempotency_key_in_use",
                        "a request with this Idempotency-Key is still running",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // This request owns the key. The work runs in its own task: a client that goes away
    // does not cancel it, and its result is recorded for the retry.
    let owner = server.clone();
    let recording = crate::limits::collecting_headers(async move {
        let result = work.await;
        let recorded = match &result {
            Ok((status, body)) => {
                owner
                    .store
                    .idempotency
                    .finish(&ws, &key, status.as_u16(), &body.to_string())
                    .await
            }
            Err(_) => owner.store.idempotency.abandon(&ws, &key).await,
        };
        if let Err(e) = recorded {
            tracing::error!(error = %DisplayChain(&e), "recording an idempotent response");
        }
        result
    });
    let task = tokio::spawn(recording.in_current_span());
    answer(task).await
}

/// What a request's own task ends with: its answer, and the headers it added (rate limits).
type TaskOutput = (
    Result<(StatusCode, serde_json::Value), ApiError>,
    Vec<(axum::http::HeaderName, axum::http::HeaderValue)>,
);

/// The response of a request's own task, with the headers it collected.
async fn answer(task: tokio::task::JoinHandle<TaskOutput>) -> Result<Response, ApiError> {
    let (result, headers) = task.await.map_err(|e| {
        tracing::error!(error = %e, "request task failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error; see the server log",
        )
    })?;
    crate::limits::add_headers(headers);
    let (status, body) = result?;
    Ok((status, Json(body)).into_response())
}

fn replay(status: i64, body: String) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut resp = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(key_of(&h).unwrap(), None);
        h.insert(HEADER, HeaderValue::from_static("abc-123_XYZ"));
        assert_eq!(key_of(&h).unwrap().as_deref(), Some("abc-123_XYZ"));
        for bad in ["", "a b", "\t"] {
            h.insert(HEADER, HeaderValue::from_str(bad).unwrap());
            assert_eq!(key_of(&h).unwrap_err().code, "invalid_idempotency_key");
        }
        h.insert(HEADER, HeaderValue::from_str(&"k".repeat(256)).unwrap());
        assert!(key_of(&h).is_err());
        h.insert(HEADER, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert!(key_of(&h).is_err());
    }

    #[test]
    fn hashes_tell_operations_and_bodies_apart() {
        let a = request_hash("create", &serde_json::json!({"template": "base"}));
        assert_eq!(
            a,
            request_hash("create", &serde_json::json!({"template": "base"}))
        );
        assert_ne!(
            a,
            request_hash("fork", &serde_json::json!({"template": "base"}))
        );
        assert_ne!(
            a,
            request_hash("create", &serde_json::json!({"template": "other"}))
        );
    }
}
