//! `GET /v1/events`: the workspace's lifecycle events as Server-Sent Events, read from the
//! store's log (so a stream on any server or replica sees every node's events), resumable
//! with `Last-Event-ID`.
//!
//! A stream polls the log every [`POLL`], reading only events at least [`SETTLE`] old: a
//! PostgreSQL sequence hands out `seq`s before their rows commit, so a reader that went
//! right up to the newest could pass over a `seq` that commits a moment later. Each
//! workspace holds at most [`MAX_STREAMS`] streams at once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use sandpit_api_types::{ErrorBody, EventsQuery, LifecycleEvent};
use sandpit_control::store::EventRow;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ApiQuery;
use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Server;
use sandpit_control::util::{now_ms, rfc3339};

/// How often a stream looks for new events.
pub const POLL: Duration = Duration::from_millis(500);
/// How old an event must be before a stream sends it.
pub const SETTLE: Duration = Duration::from_millis(1000);
/// Most events read from the log at once.
const PAGE: i64 = 100;
/// Most streams one workspace holds open.
pub const MAX_STREAMS: u32 = 16;
/// How often an idle stream carries a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<Arc<Server>> {
    OpenApiRouter::new().routes(routes!(events))
}

/// Open streams per workspace.
#[derive(Default)]
pub struct EventStreams {
    open: Mutex<HashMap<String, u32>>,
}

/// One open stream; dropping it frees its place.
struct StreamPlace {
    server: Arc<Server>,
    workspace_id: String,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut open = self
            .server
            .event_streams
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.workspace_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.workspace_id);
            }
        }
    }
}

fn take_place(server: &Arc<Server>, workspace_id: &str) -> Result<StreamPlace, ApiError> {
    let mut open = server
        .event_streams
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let n = open.entry(workspace_id.to_string()).or_insert(0);
    if *n >= MAX_STREAMS {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            format!("a workspace holds at most {MAX_STREAMS} event streams at once"),
        ));
    }
    *n += 1;
    Ok(StreamPlace {
        server: server.clone(),
        workspace_id: workspace_id.to_string(),
    })
}

/// Where to start: `Last-Event-ID`, else `after`, else `None` (from the next event).
fn start_after(headers: &HeaderMap, q: &EventsQuery) -> Result<Option<i64>, ApiError> {
    if let Some(h) = headers.get("last-event-id") {
        let bad = || {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID must be the seq of an event (a non-negative integer)",
            )
        };
        let text = h.to_str().map_err(|_| bad())?.trim();
        if text.len() > 19 {
            return Err(bad());
        }
        return text
            .parse::<i64>()
            .ok()
            .filter(|s| *s >= 0)
            .map(Some)
            .ok_or_else(bad);
    }
    match q.after {
        Some(a) if a < 0 => Err(ApiError::bad_request(
            "invalid_after",
            "after must be a non-negative seq",
        )),
        other => Ok(other),
    }
}

pub fn to_api(row: &EventRow) -> LifecycleEvent {
    LifecycleEvent {
        seq: row.seq,
        kind: row.kind.clone(),
        sandbox_id: row.sandbox_id.clone(),
        detail: serde_json::from_str(&row.detail).unwrap_or_else(|_| serde_json::json!({})),
        at: rfc3339(row.at),
    }
}

/// Stream the workspace's lifecycle events.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this seq (what an EventSource sends when it reconnects)"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events, each `data` a LifecycleEvent (`id` its seq, event name its type), oldest first", content_type = "text/event-stream", body = LifecycleEvent),
        (status = 400, description = "A malformed `Last-Event-ID` (`invalid_last_event_id`) or `after` (`invalid_after`)", body = ErrorBody),
        (status = 429, description = "The workspace holds its most streams already (`too_many_streams`)", body = ErrorBody),
    ))]
async fn events(
    State(server): State<Arc<Server>>,
    auth: Auth,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    auth.require("sandbox_read")?;
    let after = start_after(&headers, &q)?;
    let workspace_id = auth.workspace_id.clone();
    let place = take_place(&server, &workspace_id)?;
    let mut seq = match after {
        Some(s) => s,
        None => server.store.events.last_seq(&workspace_id).await?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(PAGE as usize);
    let shutdown = server.shutdown.clone();
    tokio::spawn(async move {
        let _place = place;
        let server = _place.server.clone();
        loop {
            let until = now_ms() - SETTLE.as_millis() as i64;
            match server
                .store
                .events
                .after(&workspace_id, seq, until, PAGE)
                .await
            {
                Ok(rows) => {
                    let full = rows.len() as i64 == PAGE;
                    for row in rows {
                        seq = row.seq;
                        let data = serde_json::to_string(&to_api(&row)).expect("serializes");
                        let ev = Event::default()
                            .id(row.seq.to_string())
                            .event(row.kind.clone())
                            .data(data);
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(workspace = %workspace_id, error = %sandpit_control::DisplayChain(&e), "event stream: reading the log");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_a_stream_starts() {
        let q = |after| EventsQuery { after };
        let mut h = HeaderMap::new();
        assert_eq!(start_after(&h, &q(None)).unwrap(), None);
        assert_eq!(start_after(&h, &q(Some(5))).unwrap(), Some(5));
        assert_eq!(
            start_after(&h, &q(Some(-1))).unwrap_err().code,
            "invalid_after"
        );
        h.insert("last-event-id", "7".parse().unwrap());
        assert_eq!(start_after(&h, &q(Some(5))).unwrap(), Some(7));
        for bad in ["-1", "x", "99999999999999999999", "1.5", ""] {
            h.insert("last-event-id", bad.parse().unwrap());
            assert_eq!(
                start_after(&h, &q(None)).unwrap_err().code,
                "invalid_last_event_id",
                "{bad:?}"
            );
        }
    }
}
