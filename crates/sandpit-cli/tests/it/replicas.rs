//! The scale-out shape: three `sandpit node` processes (each with its own prefix, pool and
//! data dir) and one `sandpit serve --api-only` replica, which runs no sandbox and relays
//! every request that needs a node, all on one database.

use std::time::Duration;

use sandpit_api_types::{SandboxMode, SandboxStatus};
use sandpit_sdk::types::CreateSandboxRequest;
use sandpit_test_support::TestServer;

use crate::{base, bin, create};

const SECRET: &str = "fleet-secret-for-tests";

/// Which of `nodes` runs sandbox `id` (by its runsc container).
fn runner(nodes: &[TestServer], id: &str) -> Option<usize> {
    nodes
        .iter()
        .position(|n| n.leaks().runsc.iter().any(|r| r.contains(id)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_replica_places_creates_over_three_nodes_and_relays_everything() {
    // One database for all: PostgreSQL when the tests run on it (the first node's), else a
    // SQLite file they share.
    let shared_dir = tempfile::tempdir().unwrap();
    let sqlite = std::env::var_os("SANDPIT_E2E_POSTGRES")
        .is_none()
        .then(|| format!("sqlite://{}", shared_dir.path().join("fleet.db").display()));
    let node_env = |name: String, db: Option<String>| {
        move |_: u32| {
            let mut env = vec![
                ("SANDPIT_NODE_NAME".to_string(), name),
                ("SANDPIT_NODE_SECRET".to_string(), SECRET.to_string()),
                ("SANDPIT_NODE_LEASE".to_string(), "3s".to_string()),
            ];
            env.extend(db.map(|db| ("SANDPIT_DATABASE".to_string(), db)));
            env
        }
    };
    let first = TestServer::start_command(bin(), "node", node_env("node-1".into(), sqlite.clone()))
        .await
        .unwrap();
    let shared = first
        .database
        .as_ref()
        .map(|d| d.url.clone())
        .or(sqlite)
        .unwrap();
    let mut nodes = vec![first];
    for i in 2..=3 {
        let node = TestServer::start_command(
            bin(),
            "node",
            node_env(format!("node-{i}"), Some(shared.clone())),
        )
        .await
        .unwrap();
        nodes.push(node);
    }
    let replica = TestServer::start_with(
        bin(),
        &[
            ("SANDPIT_API_ONLY", "true"),
            ("SANDPIT_DATABASE", &shared),
            ("SANDPIT_NODE_SECRET", SECRET),
            ("SANDPIT_NODE_NAME", "api-1"),
        ],
    )
    .await
    .unwrap();
    let token = nodes[0].token.clone();
    let cr = replica.client_with(&token);

    // Only the nodes hold leases: the replica is not a place for sandboxes.
    let out = std::process::Command::new(bin())
        .args(["nodes", "--json", "--database", &shared])
        .output()
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = listed.iter().filter_map(|n| n["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);

    // 30 creates through the replica spread over the three nodes.
    let mut made = Vec::new();
    for _ in 0..30 {
        made.push(create(&cr, base()).await.id);
    }
    let mut per_node = [0usize; 3];
    for id in &made {
        let i = runner(&nodes, id).unwrap_or_else(|| panic!("{id} runs on no node"));
        per_node[i] += 1;
    }
    eprintln!("30 creates through the replica, per node: {per_node:?}");
    assert!(
        per_node.iter().all(|&n| n >= 3),
        "uneven placement: {per_node:?}"
    );
    assert!(replica.leaks().is_empty(), "{:?}", replica.leaks());
    // Each answers exec through the replica.
    for id in &made {
        assert_eq!(crate::sh(&cr, id, "echo ok").await.stdout, "ok\n");
    }
    let listed = cr.list_sandboxes(None).await.unwrap();
    assert_eq!(listed.len(), 30);
    for id in made.drain(..) {
        cr.destroy_sandbox(&id).await.unwrap();
    }

    // A persistent sandbox through the replica: files, a streamed exec, a preview, a
    // hibernate and a wake, all relayed to its node.
    let sb = create(
        &cr,
        CreateSandboxRequest {
            mode: SandboxMode::Persistent,
            timeout: None,
            ..base()
        },
    )
    .await;
    let id = sb.id.as_str();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    cr.upload(id, "/tmp/data.bin", data.clone()).await.unwrap();
    let back = cr
        .download(id, "/tmp/data.bin")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(back[..] == data[..], "the file came back changed");
    let mut stream = Box::pin(
        cr.exec_stream(
            id,
            &sandpit_sdk::types::ExecRequest {
                command: Some("for i in 1 2 3; do echo $i; done".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let mut exit = None;
    let mut events = 0;
    while let Some(ev) = futures::StreamExt::next(&mut stream).await {
        events += 1;
        if let sandpit_sdk::types::ExecEvent::Exit { exit_code, .. } = ev.unwrap() {
            exit = Some(exit_code);
        }
    }
    assert_eq!(exit, Some(0), "after {events} events");
    crate::sh(
        &cr,
        id,
        "mkdir -p /www && echo via-replica > /www/index.html",
    )
    .await;
    crate::previews::httpd(&cr, id, "8080", "/www").await;
    let preview_token = cr
        .create_preview_token(id, &Default::default())
        .await
        .unwrap()
        .token
        .unwrap();
    let page = crate::previews::preview_client(&replica, id, &[8080])
        .get(crate::previews::preview_url(
            &replica,
            id,
            8080,
            "/index.html",
        ))
        .header("csb-preview-token", &preview_token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap(), "via-replica\n");
    assert_eq!(
        cr.hibernate(id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    assert_eq!(
        crate::sh(&cr, id, "wc -c < /tmp/data.bin")
            .await
            .stdout
            .trim(),
        (1u32 << 20).to_string()
    );
    cr.destroy_sandbox(id).await.unwrap();

    // A template built through the replica: the build runs on a node, its events come
    // from that node, and a create from it is placed where its layers are.
    let t = cr
        .create_template(&sandpit_sdk::types::CreateTemplateRequest {
            name: "via-replica".into(),
            dockerfile: Some("FROM base\nRUN echo built > /built\n".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    crate::templates::follow(&cr, &t.id).await;
    // The builder's next heartbeat lists the layers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from_t = create(
        &cr,
        CreateSandboxRequest {
            template: "via-replica".into(),
            ..base()
        },
    )
    .await;
    assert_eq!(
        crate::sh(&cr, &from_t.id, "cat /built").await.stdout,
        "built\n"
    );
    cr.destroy_sandbox(&from_t.id).await.unwrap();

    // A volume made through the replica lives on a node; a sandbox mounting it is placed
    // there, and its delete goes there too.
    let volume = cr.create_volume("shared-data", Some("64M")).await.unwrap();
    // Nodes are named node-1, node-2, node-3 in the order of `nodes`.
    let home = (0..nodes.len())
        .find(|i| volume.node == format!("node-{}", i + 1))
        .unwrap_or_else(|| panic!("homed on {:?}, not a node", volume.node));
    let with_volume = create(
        &cr,
        CreateSandboxRequest {
            volumes: vec![sandpit_api_types::VolumeMountRequest {
                name: "shared-data".into(),
                path: "/data".into(),
                read_only: false,
            }],
            ..base()
        },
    )
    .await;
    assert_eq!(
        runner(&nodes, &with_volume.id),
        Some(home),
        "placed on the volume's node"
    );
    crate::sh(&cr, &with_volume.id, "echo kept > /data/file").await;
    cr.destroy_sandbox(&with_volume.id).await.unwrap();
    cr.delete_volume("shared-data").await.unwrap();
    crate::assert_api_err(cr.get_volume("shared-data").await, 404, "volume_not_found");

    // With every node draining, the replica has nowhere to create: 503, nothing made.
    for i in 1..=3 {
        let out = std::process::Command::new(bin())
            .args([
                "nodes",
                "--database",
                &shared,
                "drain",
                &format!("node-{i}"),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    crate::assert_api_err(cr.create_sandbox(&base()).await, 503, "no_node_available");
    let left = cr.list_sandboxes(None).await.unwrap();
    assert!(left.is_empty(), "nothing was made: {left:?}");
    for node in &nodes {
        assert!(node.leaks().is_empty(), "{:?}", node.leaks());
    }
    assert!(replica.leaks().is_empty());
}

/// An API replica dies (abort at a fault point, as `kill -9`) after the node it relayed a
/// create, then a fork, to has answered, before its client hears it. The work is done
/// once: the retry with the same `Idempotency-Key` through the restarted replica replays
/// the answer, and the workspace holds exactly the sandboxes asked for, all running.
#[tokio::test]
async fn an_api_replica_killed_mid_create_or_fork_loses_and_doubles_nothing() {
    let shared_dir = tempfile::tempdir().unwrap();
    let sqlite = std::env::var_os("SANDPIT_E2E_POSTGRES")
        .is_none()
        .then(|| format!("sqlite://{}", shared_dir.path().join("fleet.db").display()));
    let node = TestServer::start_command(bin(), "node", move |_| {
        let mut env = vec![
            ("SANDPIT_NODE_NAME".to_string(), "node-1".to_string()),
            ("SANDPIT_NODE_SECRET".to_string(), SECRET.to_string()),
        ];
        env.extend(sqlite.map(|db| ("SANDPIT_DATABASE".to_string(), db)));
        env
    })
    .await
    .unwrap();
    let shared = match &node.database {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", shared_dir.path().join("fleet.db").display()),
    };
    let mut replica = TestServer::start_with(
        bin(),
        &[
            ("SANDPIT_API_ONLY", "true"),
            ("SANDPIT_DATABASE", &shared),
            ("SANDPIT_NODE_SECRET", SECRET),
            ("SANDPIT_NODE_NAME", "api-1"),
            ("SANDPIT_FAULT_POINT", "relay.answered"),
        ],
    )
    .await
    .unwrap();
    let token = node.token.clone();
    let http = reqwest::Client::new();
    let post = |url: String, key: &'static str, body: serde_json::Value| {
        http.post(url)
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let body = serde_json::to_value(CreateSandboxRequest {
        mode: SandboxMode::Persistent,
        timeout: None,
        ..base()
    })
    .unwrap();
    let wait_aborted = |replica: &mut TestServer| {
        for _ in 0..200 {
            if replica.has_exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the replica did not abort at the fault point");
    };

    let died = post(
        format!("{}/v1/sandboxes", replica.url),
        "create-1",
        body.clone(),
    )
    .await;
    assert!(died.is_err(), "the replica answered: {died:?}");
    wait_aborted(&mut replica);
    // Restarted without the fault: the retry through it replays the node's answer.
    replica.set_env("SANDPIT_FAULT_POINT", "");
    replica.restart().await.unwrap();
    let retry = post(format!("{}/v1/sandboxes", replica.url), "create-1", body)
        .await
        .unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(
        retry
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let sb: sandpit_api_types::Sandbox = retry.json().await.unwrap();
    let cr = replica.client_with(&token);
    assert_eq!(cr.list_sandboxes(None).await.unwrap().len(), 1);

    replica.set_env("SANDPIT_FAULT_POINT", "relay.answered");
    replica.restart().await.unwrap();
    let fork = serde_json::json!({"count": 2});
    let died = post(
        format!("{}/v1/sandboxes/{}/fork", replica.url, sb.id),
        "fork-1",
        fork.clone(),
    )
    .await;
    assert!(died.is_err(), "the replica answered: {died:?}");
    wait_aborted(&mut replica);
    replica.set_env("SANDPIT_FAULT_POINT", "");
    replica.restart().await.unwrap();
    let retry = post(
        format!("{}/v1/sandboxes/{}/fork", replica.url, sb.id),
        "fork-1",
        fork,
    )
    .await
    .unwrap();
    assert!(retry.status().is_success(), "{}", retry.status());
    assert_eq!(
        retry
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let cr = replica.client_with(&token);
    let all = cr.list_sandboxes(None).await.unwrap();
    assert_eq!(all.len(), 3, "the parent and two children: {all:?}");
    for s in &all {
        assert_eq!(s.status, SandboxStatus::Running, "{s:?}");
        cr.destroy_sandbox(&s.id).await.unwrap();
    }
    assert!(node.leaks().is_empty(), "{:?}", node.leaks());
}

/// The E2B Python SDK through an API replica: its creates go to a node, and every envd call
/// (commands, files, a process kept across a pause) is relayed to the sandbox's node.
#[tokio::test]
async fn the_e2b_sdk_works_through_an_api_replica() {
    let python = tokio::task::spawn_blocking(|| {
        crate::scripts::python_venv(
            "e2b-venv",
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/requirements.txt"),
        )
    })
    .await
    .expect("venv");
    let shared_dir = tempfile::tempdir().unwrap();
    let sqlite = std::env::var_os("SANDPIT_E2E_POSTGRES")
        .is_none()
        .then(|| format!("sqlite://{}", shared_dir.path().join("fleet.db").display()));
    let node = TestServer::start_command(bin(), "node", {
        let sqlite = sqlite.clone();
        move |_| {
            let mut env = vec![
                ("SANDPIT_NODE_NAME".to_string(), "node-1".to_string()),
                ("SANDPIT_NODE_SECRET".to_string(), SECRET.to_string()),
                ("SANDPIT_NODE_LEASE".to_string(), "3s".to_string()),
            ];
            env.extend(sqlite.map(|db| ("SANDPIT_DATABASE".to_string(), db)));
            env
        }
    })
    .await
    .unwrap();
    let shared = node
        .database
        .as_ref()
        .map(|d| d.url.clone())
        .or(sqlite)
        .unwrap();
    let replica = TestServer::start_with(
        bin(),
        &[
            ("SANDPIT_API_ONLY", "true"),
            ("SANDPIT_DATABASE", &shared),
            ("SANDPIT_NODE_SECRET", SECRET),
            ("SANDPIT_NODE_NAME", "api-1"),
        ],
    )
    .await
    .unwrap();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg("test_e2b_fleet.py")
        .current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b"))
        .env("E2B_API_KEY", &node.token)
        .env("E2B_API_URL", &replica.url)
        .env("E2B_SANDBOX_URL", &replica.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    let seen = crate::scripts::run_json(cmd, "test_e2b_fleet.py", 240, &replica).await;
    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["run"], "relayed", "{seen}");
    assert_eq!(seen["read"], "through the replica", "{seen}");
    assert_eq!(seen["beats"], 3, "{seen}");
    assert_eq!(seen["listed"], true, "{seen}");
    assert_eq!(seen["paused"], true, "{seen}");
    assert_eq!(seen["resumedRead"], "through the replica", "{seen}");
    // The process outlives the pause, unless the node says the restored agent restarted.
    crate::scripts::check_process_kept(&seen, "keptProcess", &node.log());
    assert_eq!(seen["listedIds"], serde_json::json!([id]), "{seen}");
    // The sandbox ran on the node; the replica ran nothing.
    assert!(replica.leaks().is_empty(), "{:?}", replica.leaks());
    assert_eq!(
        node.client().get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Destroyed
    );
}
