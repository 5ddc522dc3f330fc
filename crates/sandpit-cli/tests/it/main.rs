//! End-to-end tests: a real `sandpit serve` over a real socket, real gVisor sandboxes, real
//! network namespaces and nftables, a real SQLite file. They need root and runsc (the README's
//! test command installs it).
#![allow(
    clippy::disallowed_methods,
    reason = "integration tests build host-side fixtures and read host state by path"
)]

mod abuse;
mod api;
mod console;
mod crash;
mod csb;
mod database;
mod e2b;
mod e2b_node;
mod egress;
mod events;
mod fleet;
mod fork;
mod idempotency;
mod lifecycle;
mod limits;
mod mcp;
mod metrics;
mod previews;
mod reliability;
mod replicas;
mod s3;
mod scripts;
mod secrets;
mod security;
mod soak;
mod templates;
mod terminals;
mod tls;
mod traces;
mod users;
mod volumes;
mod watch;
mod webhooks;

use std::path::Path;

use sandpit_sdk::types::{CreateSandboxRequest, ExecRequest, ExecResponse, Sandbox};
use sandpit_sdk::{Client, SdkError};
use sandpit_test_support::TestServer;

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sandpit"))
}

pub async fn server() -> TestServer {
    TestServer::start(bin()).await.expect("server starts")
}

pub async fn create(client: &Client, req: CreateSandboxRequest) -> Sandbox {
    client
        .create_sandbox(&req)
        .await
        .expect("sandbox is created")
}

pub fn base() -> CreateSandboxRequest {
    CreateSandboxRequest {
        template: "base".into(),
        timeout: Some("10m".into()),
        ..Default::default()
    }
}

pub async fn sh(client: &Client, id: &str, command: &str) -> ExecResponse {
    client
        .exec(
            id,
            &ExecRequest {
                command: Some(command.into()),
                timeout: Some("30s".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec {command:?}: {e:?}"))
}

/// Assert an API error's status and code.
#[track_caller]
pub fn assert_api_err<T: std::fmt::Debug>(r: Result<T, SdkError>, status: u16, code: &str) {
    match r {
        Err(SdkError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!(
                (s.as_u16(), c.as_str()),
                (status, code),
                "message: {message}"
            );
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// The value a test's counting process last wrote to /tmp/count. The counter rewrites the
/// file, so a read that lands between truncate and write is retried.
pub async fn counter(client: &Client, id: &str) -> u64 {
    let out = sh(
        client,
        id,
        "for i in 1 2 3 4 5 6 7 8; do c=$(cat /tmp/count); [ -n \"$c\" ] && break; sleep 0.05; done; echo $c",
    )
    .await;
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter in {id}: {out:?}"))
}

/// Start a process that counts in memory and writes each value to /tmp/count.
pub const COUNTER: &str = "i=0; (while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) > /dev/null 2>&1 &";
