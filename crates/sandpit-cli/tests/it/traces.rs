//! Traces: a server started with `--otlp-endpoint` sends its spans over OTLP/HTTP to a
//! receiver in this test; requests carrying a W3C `traceparent` (create, exec, hibernate,
//! wake) get their spans (HTTP, lifecycle, runsc, agent) under the caller's trace, each
//! hanging under a span of the same trace, with no tenant bytes in their attributes; a malformed `traceparent` starts a new trace and the request still succeeds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use sandpit_test_support::{TestServer, wait_until};

/// The caller's trace, and its span that the create and the exec requests come from.
const TRACE_ID: &str = "5e1f0a7c3b2d4e6f8091a2b3c4d5e6f7";
const CREATE_PARENT: &str = "a1b2c3d4e5f60718";
const EXEC_PARENT: &str = "b1b2c3d4e5f60718";
const HIBERNATE_PARENT: &str = "c1b2c3d4e5f60718";
const WAKE_PARENT: &str = "d1b2c3d4e5f60718";
const PARENTS: [&str; 4] = [CREATE_PARENT, EXEC_PARENT, HIBERNATE_PARENT, WAKE_PARENT];

/// Every span the receiver got, with its service name.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on loopback: `POST /v1/traces`, protobuf.
async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut sink = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| string_of(kv.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        sink.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn string_of(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| string_of(kv.value.as_ref()?.value.as_ref()?))
}

/// A traceparent header: version 00, sampled.
fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

#[tokio::test]
async fn spans_join_the_callers_trace_over_otlp() {
    let (collector, got) = receiver().await;
    let srv = TestServer::start_with(crate::bin(), &[("SANDPIT_OTLP_ENDPOINT", &collector)])
        .await
        .expect("server starts");
    let http = reqwest::Client::new();
    let auth = format!("Bearer {}", srv.token);

    let resp = http
        .post(format!("{}/v1/sandboxes", srv.url))
        .header("authorization", &auth)
        .header("traceparent", traceparent(TRACE_ID, CREATE_PARENT))
        .json(&serde_json::json!({"template": "base", "mode": "persistent", "idle_timeout": "1h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let sandbox: serde_json::Value = resp.json().await.unwrap();
    let id = sandbox["id"].as_str().unwrap().to_string();

    let secret_command = "echo trace-me-not-$((40 + 2))";
    let resp = http
        .post(format!("{}/v1/sandboxes/{id}/exec", srv.url))
        .header("authorization", &auth)
        .header("traceparent", traceparent(TRACE_ID, EXEC_PARENT))
        .json(&serde_json::json!({"command": secret_command, "timeout": "30s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let out: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(out["stdout"], "trace-me-not-42\n");

    for (what, parent) in [("hibernate", HIBERNATE_PARENT), ("wake", WAKE_PARENT)] {
        let resp = http
            .post(format!("{}/v1/sandboxes/{id}/{what}", srv.url))
            .header("authorization", &auth)
            .header("traceparent", traceparent(TRACE_ID, parent))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{what}: {}", resp.text().await.unwrap());
    }

    // Malformed: not hex, wrong length. Ignored: the request succeeds in a trace of its own.
    let resp = http
        .get(format!("{}/v1/sandboxes", srv.url))
        .header("authorization", &auth)
        .header("traceparent", "00-not-a-trace-id-01")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let is_server = |s: &Span, method: &str, route: &str| {
        s.kind == SpanKind::Server as i32
            && attr(s, "http.request.method").as_deref() == Some(method)
            && attr(s, "http.route").as_deref() == Some(route)
    };
    // The three requests' server spans, the lifecycle span, and the runtime and agent spans
    // under them (ended once the requests answered; sent within the batch delay).
    let spans = wait_until(Duration::from_secs(30), "the spans at the receiver", || {
        let got = got.lock().unwrap().clone();
        async move {
            let names: HashSet<&str> = got.iter().map(|(_, s)| s.name.as_str()).collect();
            let complete = [
                "sandbox.create",
                "runsc.run",
                "agent.wait_ready",
                "agent.exec",
                "sandbox.hibernate",
                "runsc.checkpoint",
                "sandbox.wake",
                "runsc.restore",
            ]
            .iter()
            .all(|n| names.contains(n))
                && got
                    .iter()
                    .any(|(_, s)| is_server(s, "GET", "/v1/sandboxes"));
            complete.then_some(got)
        }
    })
    .await
    .unwrap();
    assert!(spans.iter().all(|(service, _)| service == "sandpit"));
    let spans: Vec<Span> = spans.into_iter().map(|(_, s)| s).collect();
    let by_id: HashMap<String, &Span> =
        spans.iter().map(|s| (hex::encode(&s.span_id), s)).collect();
    let traced: Vec<&Span> = spans
        .iter()
        .filter(|s| hex::encode(&s.trace_id) == TRACE_ID)
        .collect();

    // The server spans of the two requests hang under the caller's spans.
    let create_http = traced
        .iter()
        .find(|s| is_server(s, "POST", "/v1/sandboxes"))
        .expect("the create request's server span, in the caller's trace");
    assert_eq!(hex::encode(&create_http.parent_span_id), CREATE_PARENT);
    assert_eq!(create_http.name, "POST /v1/sandboxes");
    assert_eq!(
        attr(create_http, "http.response.status_code").as_deref(),
        Some("201")
    );
    let exec_http = traced
        .iter()
        .find(|s| is_server(s, "POST", "/v1/sandboxes/{id}/exec"))
        .expect("the exec request's server span, in the caller's trace");
    assert_eq!(hex::encode(&exec_http.parent_span_id), EXEC_PARENT);

    // Every other span of the trace hangs under a span of the trace that the receiver got.
    for s in &traced {
        let parent = hex::encode(&s.parent_span_id);
        if PARENTS.contains(&parent.as_str()) {
            assert_eq!(
                s.kind,
                SpanKind::Server as i32,
                "{} under the caller",
                s.name
            );
            continue;
        }
        let p = by_id
            .get(&parent)
            .unwrap_or_else(|| panic!("{}: its parent {parent} was not received", s.name));
        assert_eq!(
            hex::encode(&p.trace_id),
            TRACE_ID,
            "{} under another trace",
            s.name
        );
    }
    let ancestors = |s: &Span| {
        let mut chain = Vec::new();
        let mut at = by_id.get(&hex::encode(&s.parent_span_id)).copied();
        while let Some(p) = at {
            chain.push(p.span_id.clone());
            at = by_id.get(&hex::encode(&p.parent_span_id)).copied();
        }
        chain
    };
    let one = |name: &str| -> &Span {
        let all: Vec<&&Span> = traced.iter().filter(|s| s.name == name).collect();
        assert!(!all.is_empty(), "no {name} span in the trace");
        all[0]
    };

    // Lifecycle: create (cold: the test server keeps no warm pool) under the create request,
    // runsc and the agent under it; the sandbox named by id.
    let create = one("sandbox.create");
    assert!(ancestors(create).contains(&create_http.span_id));
    assert_eq!(attr(create, "sandbox.id").as_deref(), Some(id.as_str()));
    assert_eq!(attr(create, "sandbox.create_path").as_deref(), Some("cold"));
    for name in ["runsc.run", "agent.wait_ready", "sandbox.boot"] {
        let s = one(name);
        assert!(
            ancestors(s).contains(&create.span_id),
            "{name} is not under sandbox.create"
        );
    }
    assert!(
        attr(one("runsc.run"), "sandbox.runtime_id").is_some_and(|r| r.ends_with(&id)),
        "runsc.run names its container"
    );
    // Exec: the agent call under the exec request.
    let agent_exec = one("agent.exec");
    assert!(ancestors(agent_exec).contains(&exec_http.span_id));
    assert_eq!(attr(agent_exec, "sandbox.id").as_deref(), Some(id.as_str()));

    // Hibernate and wake: the lifecycle span under its request, runsc under it.
    for (op, runsc, route, parent) in [
        (
            "sandbox.hibernate",
            "runsc.checkpoint",
            "/v1/sandboxes/{id}/hibernate",
            HIBERNATE_PARENT,
        ),
        (
            "sandbox.wake",
            "runsc.restore",
            "/v1/sandboxes/{id}/wake",
            WAKE_PARENT,
        ),
    ] {
        let request = traced
            .iter()
            .find(|s| is_server(s, "POST", route))
            .unwrap_or_else(|| panic!("no server span for {route}"));
        assert_eq!(hex::encode(&request.parent_span_id), parent);
        let lifecycle = one(op);
        assert!(ancestors(lifecycle).contains(&request.span_id), "{op}");
        assert_eq!(attr(lifecycle, "sandbox.id").as_deref(), Some(id.as_str()));
        assert!(
            ancestors(one(runsc)).contains(&lifecycle.span_id),
            "{runsc} is not under {op}"
        );
    }

    // No tenant bytes: neither the command line nor the token is in any attribute.
    for s in &spans {
        for kv in &s.attributes {
            let v = kv
                .value
                .as_ref()
                .and_then(|v| v.value.as_ref())
                .and_then(string_of)
                .unwrap_or_default();
            assert!(
                !v.contains("trace-me-not") && !v.contains(&srv.token),
                "{}: attribute {} = {v:?}",
                s.name,
                kv.key
            );
        }
    }

    // The request with a malformed traceparent: a trace of its own, with no parent.
    let list = spans
        .iter()
        .find(|s| is_server(s, "GET", "/v1/sandboxes"))
        .unwrap();
    assert_ne!(hex::encode(&list.trace_id), TRACE_ID);
    assert_ne!(list.trace_id, vec![0; 16]);
    assert!(list.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attr(list, "http.response.status_code").as_deref(),
        Some("200")
    );

    let resp = http
        .delete(format!("{}/v1/sandboxes/{id}", srv.url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

#[tokio::test]
async fn an_unreachable_collector_fails_no_request() {
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let collector = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let srv = TestServer::start_with(crate::bin(), &[("SANDPIT_OTLP_ENDPOINT", &collector)])
        .await
        .expect("server starts");
    let client = srv.client();
    for _ in 0..20 {
        client
            .list_sandboxes(None)
            .await
            .expect("requests are answered");
    }
    // The failure is said (once: the next warning comes a minute later at the earliest).
    wait_until(Duration::from_secs(10), "the export warning", || async {
        srv.log()
            .contains("traces: export to the collector failed")
            .then_some(())
    })
    .await
    .unwrap();
    client
        .list_sandboxes(None)
        .await
        .expect("requests are answered");
    assert_eq!(
        srv.log()
            .matches("traces: export to the collector failed")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_relayed_request_carries_the_trace_to_the_sandboxs_node() {
    const TRACE: &str = "6e1f0a7c3b2d4e6f8091a2b3c4d5e6f7";
    const PARENT: &str = "e1b2c3d4e5f60718";
    let (collector, got) = receiver().await;
    let (a, b) = crate::fleet::two_nodes(&[
        ("SANDPIT_NODE_SECRET", "fleet-secret-for-tests"),
        ("SANDPIT_OTLP_ENDPOINT", &collector),
    ])
    .await;
    let sb = crate::create(&a.client(), crate::base()).await;
    // Through the server that does not run it: relayed to its node.
    let on_a = a.leaks().runsc.iter().any(|r| r.contains(&sb.id));
    let via = if on_a { &b } else { &a };
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sandboxes/{}/exec", via.url, sb.id))
        .header("authorization", format!("Bearer {}", a.token))
        .header("traceparent", traceparent(TRACE, PARENT))
        .json(&serde_json::json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let route = "/v1/sandboxes/{id}/exec";
    let spans = wait_until(Duration::from_secs(30), "the two servers' spans", || {
        let got = got.lock().unwrap().clone();
        async move {
            let traced: Vec<Span> = got
                .into_iter()
                .map(|(_, s)| s)
                .filter(|s| hex::encode(&s.trace_id) == TRACE)
                .collect();
            let servers = traced
                .iter()
                .filter(|s| attr(s, "http.route").as_deref() == Some(route))
                .count();
            (servers == 2 && traced.iter().any(|s| s.name == "agent.exec")).then_some(traced)
        }
    })
    .await
    .unwrap();
    // The relaying server's span under the caller's; the node's under the relaying one's;
    // the agent call under the node's.
    let relaying = spans
        .iter()
        .find(|s| hex::encode(&s.parent_span_id) == PARENT)
        .expect("the relaying server's span under the caller's");
    assert_eq!(attr(relaying, "http.route").as_deref(), Some(route));
    let node = spans
        .iter()
        .find(|s| s.parent_span_id == relaying.span_id)
        .expect("the node's span under the relaying server's");
    assert_eq!(node.kind, SpanKind::Server as i32);
    assert_eq!(attr(node, "http.route").as_deref(), Some(route));
    let agent = spans.iter().find(|s| s.name == "agent.exec").unwrap();
    assert_eq!(agent.parent_span_id, node.span_id);
    assert_eq!(attr(agent, "sandbox.id").as_deref(), Some(sb.id.as_str()));
}
