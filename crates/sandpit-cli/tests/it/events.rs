//! `GET /v1/events`: a workspace's lifecycle events as Server-Sent Events, in order, resumable
//! with `Last-Event-ID`, and only the workspace's own.

use std::time::Duration;

use sandpit_api_types::TokenCreateRequest;
use sandpit_sdk::types::{CreateSandboxRequest, ForkResult, SandboxMode};
use serde_json::Value;

use crate::{create, server};

/// An open event stream: its events as (id, event name, data).
struct Stream {
    resp: reqwest::Response,
    buf: String,
}

impl Stream {
    async fn open(url: &str, token: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut req = reqwest::Client::new()
            .get(format!("{url}/v1/events"))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        req.send().await.expect("sent")
    }

    /// The next event, or `None` if none came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(i64, String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                // Keep-alive comments carry no id.
                if let Some(id) = id {
                    return Some((id, name, serde_json::from_str(&data).expect("JSON data")));
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?;
            let chunk = chunk.expect("stream readable").expect("stream open");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until one of `kind` came (at most 60 s), all of them.
    async fn until(&mut self, kind: &str) -> Vec<(i64, String, Value)> {
        let mut seen = Vec::new();
        loop {
            let ev = self
                .next(Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("no {kind} event; saw {seen:?}"));
            let done = ev.1 == kind;
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn lifecycle_events_stream_in_order_and_resume() {
    let srv = server().await;
    let client = srv.client();
    let resp = Stream::open(&srv.url, &srv.token, None).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = Stream {
        resp,
        buf: String::new(),
    };

    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1h".into()),
            ..Default::default()
        },
    )
    .await;
    client.hibernate(&sb.id).await.expect("hibernates");
    client.wake(&sb.id).await.expect("wakes");
    let child = match client.fork(&sb.id, 1).await.expect("forks").remove(0) {
        ForkResult::Ok(c) => c.id,
        ForkResult::Err(e) => panic!("fork failed: {e:?}"),
    };
    client.destroy_sandbox(&sb.id).await.expect("destroyed");

    let mut seen = stream.until("forked").await;
    seen.extend(stream.until("destroyed").await);
    let kinds: Vec<(&str, Option<&str>)> = seen
        .iter()
        .map(|(_, k, d)| (k.as_str(), d["sandbox_id"].as_str()))
        .collect();
    let parent = Some(sb.id.as_str());
    assert_eq!(
        kinds,
        [
            ("created", parent),
            ("started", parent),
            ("suspended", parent),
            ("woken", parent),
            ("forked", Some(child.as_str())),
            ("destroyed", parent),
        ],
        "{seen:?}"
    );
    // Ids increase; the data carries them and the details.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    for (id, kind, data) in &seen {
        assert_eq!(data["seq"], *id);
        assert_eq!(data["type"], kind.as_str());
        assert!(data["at"].as_str().is_some_and(|a| a.ends_with('Z')));
    }
    assert_eq!(seen[1].2["detail"]["path"], "cold");
    assert_eq!(seen[2].2["detail"]["reason"], "requested");
    assert_eq!(seen[4].2["detail"]["parent"], sb.id.as_str());

    // Resuming after the suspend gives what followed it, in order.
    let suspended = seen[2].0.to_string();
    let mut again = Stream {
        resp: Stream::open(&srv.url, &srv.token, Some(&suspended)).await,
        buf: String::new(),
    };
    let first = again.next(Duration::from_secs(30)).await.expect("an event");
    assert_eq!((first.0, first.1.as_str()), (seen[3].0, "woken"));

    // Another workspace sees none of it, even from the start of the log.
    let ws_b = client.create_workspace("events-b").await.unwrap();
    let tok_b = client
        .create_token(&ws_b.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    let mut other = Stream {
        resp: Stream::open(&srv.url, tok_b.token.as_deref().unwrap(), Some("0")).await,
        buf: String::new(),
    };
    // Longer than a poll and the settle time together: anything of the log would show.
    assert!(other.next(Duration::from_secs(3)).await.is_none());

    // A malformed Last-Event-ID changes nothing and says why.
    for bad in ["-1", "abc", "123456789012345678901"] {
        let resp = Stream::open(&srv.url, &srv.token, Some(bad)).await;
        assert_eq!(resp.status(), 400, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_last_event_id");
    }
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/events", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}
