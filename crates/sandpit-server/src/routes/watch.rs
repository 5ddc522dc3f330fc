//! `/v1/sandboxes/{id}/watch`: file changes inside a sandbox as Server-Sent Events, from the
//! agent's inotify watch.
//!
//! Like a terminal attachment, a watch holds no sandbox lock while it lives: it registers in
//! the sandbox's live connections under the read lock while the agent connection is made,
//! then lets the lock go. A suspend (destroy, fork) cuts it: the agent connection resets, the
//! client gets an `end` event with reason `suspended`, and the stream closes.
//!
//! Between the agent and the client sits one [`EventQueue`]: the agent connection is read
//! at once into it, and the client takes from it as fast as it reads. A client that does not
//! keep up gets one `overflow` event in place of what it missed, never a growing buffer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sandpit_agent_proto::{self as proto, EventQueue, WatchEvent, WatchRequest};
use sandpit_api_types::{ErrorBody, FileEvent, WatchQuery};
use sandpit_control::agent::AgentFailure;
use sandpit_control::agent_watch::AgentWatch;
use sandpit_control::live::ConnGuard;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::extract::{OwnedSandbox, scope};
use crate::lifecycle;
use crate::server::Server;

/// How often an idle stream carries a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new().routes(routes!(watch))
}

/// Parse and check the query: the path as the file routes check it, the excludes bounded.
pub fn watch_request(query: Option<&str>) -> Result<WatchRequest, ApiError> {
    let bad_query = |m: String| ApiError::bad_request("invalid_query", m);
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| bad_query(format!("invalid query string: {e}")))?;
    let mut req = WatchRequest::default();
    let mut path = None;
    for (k, v) in pairs {
        match k.as_str() {
            "path" if path.is_none() => path = Some(v),
            "recursive" => {
                req.recursive = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(bad_query(format!(
                            "recursive must be true or false, not {v:?}"
                        )));
                    }
                }
            }
            "exclude" => {
                if req.excludes.len() >= proto::MAX_WATCH_EXCLUDES {
                    return Err(ApiError::bad_request(
                        "invalid_exclude",
                        format!(
                            "at most {} exclude patterns are allowed",
                            proto::MAX_WATCH_EXCLUDES
                        ),
                    ));
                }
                req.excludes.push(v);
            }
            other => {
                return Err(bad_query(format!(
                    "unknown or repeated query parameter {other:?}"
                )));
            }
        }
    }
    req.path = path.ok_or_else(|| bad_query("path is required".into()))?;
    req.validate().map_err(|e| match e.code {
        proto::AgentErrorCode::InvalidPath => ApiError::bad_request("invalid_path", e.message),
        _ => ApiError::bad_request("invalid_exclude", e.message),
    })
}

fn watch_failure(f: AgentFailure) -> ApiError {
    match f {
        AgentFailure::Refused(e) if e.code == proto::AgentErrorCode::UnsupportedVersion => {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "agent_too_old",
                format!(
                    "this sandbox's agent has no file watches (it predates them): {}",
                    e.message
                ),
            )
        }
        f => super::sandboxes::agent_failure(f),
    }
}

/// Watch a file or a directory tree. The answer is a stream of Server-Sent Events whose
/// `data` is a JSON `FileEvent`, one per change, in the order they happened, starting with
/// the first change after the answer's headers; comments keep an idle stream alive. The
/// stream ends with an `end` event when the watched path goes
/// away or the sandbox is suspended; closing it ends the watch. A client that reads too
/// slowly gets an `overflow` event in place of the changes it missed. A suspended sandbox is
/// woken, as for the file routes; an open watch does not keep a sandbox awake.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/watch", tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), WatchQuery),
    responses(
        (status = 200, description = "Server-Sent Events, each `data` a FileEvent, the last of type `end`", content_type = "text/event-stream", body = FileEvent),
        (status = 400, description = "Invalid query (`invalid_query`), path (`invalid_path`: relative, contains `..`, too long) or excludes (`invalid_exclude`: more than 64, longer than 256 bytes, empty or with NUL)", body = ErrorBody),
        (status = 403, description = "Sandbox belongs to another workspace", body = ErrorBody),
        (status = 404, description = "Sandbox or path not found", body = ErrorBody),
        (status = 409, description = "Sandbox not running, or the sandbox's inotify limits are reached (`too_many_watches`)", body = ErrorBody),
        (status = 501, description = "The sandbox's agent predates file watches (agent_too_old)", body = ErrorBody),
    ))]
async fn watch(
    State(server): State<Arc<Server>>,
    sb: OwnedSandbox<scope::SandboxRead>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let req = watch_request(query.as_deref())?;
    let root = req.path.clone();
    let id = sb.id().to_string();
    let (agent, guard, _) = lifecycle::running_agent(&server, &sb).await?;
    // Registered under the read lock, so no suspend runs between this and the agent
    // connection; the lock goes once both exist (see the module docs).
    let live = server.previews.register(&id);
    let agent_watch = agent.watch(req).await.map_err(watch_failure)?;
    drop(guard);
    let (tx, rx) = mpsc::channel::<Item>(1);
    tokio::spawn(relay(root.clone(), agent_watch, live, tx));
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).flat_map(move |item| {
        let events: Vec<Result<Event, Infallible>> = match item {
            Item::Events(batch) => batch.into_iter().map(|e| Ok(sse_event(e))).collect(),
            Item::End(reason) => vec![Ok(to_sse(FileEvent {
                kind: "end".into(),
                path: root.clone(),
                dir: false,
                reason: Some(reason.into()),
            }))],
        };
        futures::stream::iter(events)
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

fn sse_event(e: WatchEvent) -> Event {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    to_sse(FileEvent {
        kind,
        path: e.path,
        dir: e.dir,
        reason: None,
    })
}

fn to_sse(e: FileEvent) -> Event {
    Event::default()
        .event(e.kind.clone())
        .json_data(e)
        .unwrap_or_default()
}

/// What the relay hands the response body.
enum Item {
    Events(Vec<WatchEvent>),
    End(&'static str),
}

/// Move changes from the agent into the queue and from the queue to the client, until the
/// client goes, the watched path goes, the agent connection breaks or a suspend cuts it.
async fn relay(root: String, agent_watch: AgentWatch, live: ConnGuard, tx: mpsc::Sender<Item>) {
    let cancel = live.cancel_token();
    // The agent connection is read in a task of its own (reading a frame is not
    // cancel-safe), which holds the live registration, so the registration goes only
    // once the connection is reset.
    let (batches_tx, mut batches) = mpsc::channel::<Option<Vec<WatchEvent>>>(1);
    let mut reader = tokio::spawn(async move {
        let _live = live;
        let mut agent_watch = agent_watch;
        loop {
            match agent_watch.next().await {
                Ok(Some(batch)) => {
                    if batches_tx.send(Some(batch)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = batches_tx.send(None).await;
                    return;
                }
                Err(e) => {
                    tracing::info!(error = ?e, "watch: agent connection ended");
                    return;
                }
            }
        }
    });
    let mut queue = EventQueue::new(&root);
    let mut end: Option<&'static str> = None;
    loop {
        if let Some(reason) = end
            && queue.is_empty()
        {
            let _ = tx.send(Item::End(reason)).await;
            break;
        }
        let pending = !queue.is_empty();
        tokio::select! {
            permit = tx.reserve(), if pending => match permit {
                Ok(permit) => permit.send(Item::Events(queue.take_batch())),
                Err(_) => break,
            },
            batch = batches.recv(), if end.is_none() => match batch {
                Some(Some(events)) => events.into_iter().for_each(|e| queue.push(e)),
                Some(None) => end = Some("gone"),
                None => end = Some("agent_gone"),
            },
            () = cancel.cancelled(), if end.is_none() => {
                // Nothing more reaches the client: the cut must not wait on it.
                reader.abort();
                let _ = (&mut reader).await;
                queue = EventQueue::new(&root);
                end = Some("suspended");
            }
            () = tx.closed() => break,
        }
    }
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked_before_anything() {
        let ok = watch_request(Some(
            "path=/w/&recursive=true&exclude=**%2Fnode_modules%2F**&exclude=*.log",
        ))
        .unwrap();
        assert_eq!(ok.path, "/w");
        assert!(ok.recursive);
        assert_eq!(ok.excludes, ["**/node_modules/**", "*.log"]);
        let code = |q: &str| watch_request(Some(q)).unwrap_err().code;
        assert_eq!(code("path=w"), "invalid_path");
        assert_eq!(code("path=/w/../etc"), "invalid_path");
        assert_eq!(code(&format!("path=/{}", "x".repeat(5000))), "invalid_path");
        assert_eq!(code("recursive=true"), "invalid_query");
        assert_eq!(code("path=/w&recursive=maybe"), "invalid_query");
        assert_eq!(code("path=/w&path=/x"), "invalid_query");
        assert_eq!(code("path=/w&bogus=1"), "invalid_query");
        assert_eq!(
            code(&format!("path=/w&exclude={}", "x".repeat(300))),
            "invalid_exclude"
        );
        assert_eq!(code("path=/w&exclude="), "invalid_exclude");
        assert_eq!(code("path=/w&exclude=a%00b"), "invalid_exclude");
        let many = "&exclude=x".repeat(65);
        assert_eq!(code(&format!("path=/w{many}")), "invalid_exclude");
    }
}
