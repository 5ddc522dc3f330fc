//! The fleet registry as an operator sees it (`sandpit nodes`): a server joins as a node,
//! its heartbeats carry its free slots, a drain reaches it (creates and forks answer 503 while it lasts), a killed node's lease lapses and
//! a restart registers it again under a new epoch.

use std::time::Duration;

use sandpit_api_types::SandboxMode;
use sandpit_sdk::types::CreateSandboxRequest;
use sandpit_test_support::{TestServer, wait_until};

use crate::{base, bin, create};

fn nodes(srv: &TestServer, args: &[&str]) -> (bool, String, String) {
    nodes_in(
        srv.database.as_ref().map(|d| d.url.as_str()),
        &srv.data_dir,
        args,
    )
}

/// `sandpit nodes` on the database `db`, or else the SQLite one in `data_dir`.
fn nodes_in(db: Option<&str>, data_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("nodes");
    match db {
        Some(db) => cmd.args(["--database", db]),
        None => cmd.arg("--data-dir").arg(data_dir),
    };
    let out = cmd.args(args).output().expect("sandpit nodes runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn this_node(srv: &TestServer, name: &str) -> serde_json::Value {
    let (ok, out, err) = nodes(srv, &["--json"]);
    assert!(ok, "sandpit nodes --json: {err}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON");
    all.into_iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in {out}"))
}

/// Two servers on one database (the first's), each a node named `node-<index>`, both with
/// `extra` in their environment.
pub(crate) async fn two_nodes(extra: &[(&str, &str)]) -> (TestServer, TestServer) {
    let env = |i: u32| {
        let mut env = vec![("SANDPIT_NODE_NAME".to_string(), format!("node-{i}"))];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let a = TestServer::start_with_index_env(bin(), env).await.unwrap();
    let shared = match &a.database {
        Some(db) => db.url.clone(),
        None => format!("sqlite://{}", a.data_dir.join("sandpit.db").display()),
    };
    let b = TestServer::start_with_index_env(bin(), |i| {
        let mut env = env(i);
        env.push(("SANDPIT_DATABASE".into(), shared));
        env
    })
    .await
    .unwrap();
    (a, b)
}

#[tokio::test]
async fn a_server_is_a_node_with_a_lease_its_load_and_a_drain() {
    let mut srv = TestServer::start_with_index_env(bin(), |i| {
        vec![
            ("SANDPIT_NODE_NAME".into(), format!("node-{i}")),
            ("SANDPIT_NODE_LEASE".into(), "3s".into()),
        ]
    })
    .await
    .unwrap();
    let name = format!("node-{}", srv.index);
    let n = this_node(&srv, &name);
    assert_eq!(n["status"], "live", "{n}");
    assert_eq!(n["epoch"], 1);
    // A /24 pool is 64 slots of /30.
    assert_eq!(n["slots"], 64, "{n}");
    assert!(n["memory_mib"].as_i64().unwrap() > 0, "{n}");

    // The heartbeat reports the slot a new sandbox holds.
    let before = n["free_slots"].as_i64().unwrap();
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            mode: SandboxMode::Ephemeral,
            ..base()
        },
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "a heartbeat with one slot fewer",
        || async {
            let n = this_node(&srv, &name);
            (n["free_slots"].as_i64() < Some(before)).then_some(())
        },
    )
    .await
    .unwrap();

    // An operator's drain reaches the node at its next beat; undrain ends it.
    let (ok, _, err) = nodes(&srv, &["drain", &name]);
    assert!(ok, "{err}");
    assert_eq!(this_node(&srv, &name)["status"], "draining");
    wait_until(
        Duration::from_secs(20),
        "the node hears of its drain",
        || async {
            let log = srv.log();
            log.lines()
                .any(|l| l.contains("fleet status changed") && l.contains("draining"))
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Draining, it takes no new sandboxes; its own keep running.
    crate::assert_api_err(client.create_sandbox(&base()).await, 503, "node_draining");
    crate::assert_api_err(client.fork(&sb.id, 1).await, 503, "node_draining");
    assert_eq!(crate::sh(&client, &sb.id, "echo up").await.stdout, "up\n");
    let (ok, _, err) = nodes(&srv, &["undrain", &name]);
    assert!(ok, "{err}");
    wait_until(
        Duration::from_secs(20),
        "creates are taken again",
        || async { client.create_sandbox(&base()).await.ok() },
    )
    .await
    .unwrap();
    // Bad names and unknown nodes: a clear error, nothing changed.
    let (ok, _, err) = nodes(&srv, &["drain", "nobody"]);
    assert!(!ok && err.contains("nobody"), "{err}");
    let (ok, _, err) = nodes(&srv, &["forget", &name]);
    assert!(!ok, "a live node cannot be forgotten: {err}");
    client.destroy_sandbox(&sb.id).await.unwrap();

    // Killed, the node stops beating and its lease lapses; restarted, it registers again.
    srv.kill9();
    wait_until(Duration::from_secs(30), "the lease lapses", || async {
        (this_node(&srv, &name)["status"] == "lapsed").then_some(())
    })
    .await
    .unwrap();
    srv.restart().await.unwrap();
    let n = this_node(&srv, &name);
    assert_eq!(
        (n["status"].as_str(), n["epoch"].as_i64()),
        (Some("live"), Some(2)),
        "{n}"
    );
    let (ok, table, _) = nodes(&srv, &[]);
    assert!(
        ok && table.contains(&name) && table.contains("live"),
        "{table}"
    );
}

/// Two servers on one database (the shape of a fleet before routing): each is a node that
/// sees and settles only its own sandboxes. A restart of one reconciles without failing the
/// other's running sandbox; a call that would touch the other's sandbox answers 503
/// `sandbox_on_another_node` instead of reaching an address that is not its to reach.
#[tokio::test]
async fn servers_sharing_a_database_leave_each_others_sandboxes_alone() {
    let (a, mut b) = two_nodes(&[]).await;
    let (ca, cb) = (a.client(), b.client_with(&a.token));
    let on_a = create(&ca, base()).await;
    let on_b = create(&cb, base()).await;
    // Each pool's first slot: the same number on two nodes.
    assert_eq!(crate::sh(&ca, &on_a.id, "echo a").await.stdout, "a\n");
    assert_eq!(crate::sh(&cb, &on_b.id, "echo b").await.stdout, "b\n");

    // B restarts (kill -9): its reconciliation sees only its own rows.
    b.kill9();
    b.restart().await.unwrap();
    let cb = b.client_with(&a.token);
    assert_eq!(
        crate::sh(&ca, &on_a.id, "echo still").await.stdout,
        "still\n"
    );
    assert_eq!(crate::sh(&cb, &on_b.id, "echo b").await.stdout, "b\n");
    assert_eq!(
        ca.get_sandbox(&on_a.id).await.unwrap().status,
        sandpit_api_types::SandboxStatus::Running
    );

    // Through the other server: read, yes; touch, no (and nothing changes).
    assert_eq!(cb.get_sandbox(&on_a.id).await.unwrap().id, on_a.id);
    crate::assert_api_err(
        cb.exec(
            &on_a.id,
            &sandpit_sdk::types::ExecRequest {
                command: Some("echo no".into()),
                ..Default::default()
            },
        )
        .await,
        503,
        "sandbox_on_another_node",
    );
    crate::assert_api_err(cb.hibernate(&on_a.id).await, 503, "sandbox_on_another_node");
    crate::assert_api_err(
        cb.destroy_sandbox(&on_a.id).await,
        503,
        "sandbox_on_another_node",
    );
    assert_eq!(
        crate::sh(&ca, &on_a.id, "echo alive").await.stdout,
        "alive\n"
    );

    // Both nodes are in the fleet.
    let (ok, out, err) = nodes(&a, &["--json"]);
    assert!(ok, "{err}");
    for i in [a.index, b.index] {
        assert!(out.contains(&format!("\"node-{i}\"")), "{out}");
    }
    ca.destroy_sandbox(&on_a.id).await.unwrap();
    cb.destroy_sandbox(&on_b.id).await.unwrap();
}

/// Two servers, one database, a shared node secret: a sandbox one server runs is used
/// through the other as if it were local (exec, streams, files, a terminal over a relayed
/// WebSocket, hibernate, wake, destroy), and headers that claim a relay without the
/// secret's signature gain nothing.
#[tokio::test]
async fn the_other_server_relays_everything_about_a_sandbox_to_its_node() {
    const SECRET: &str = "fleet-secret-for-tests";
    let (a, b) = two_nodes(&[("SANDPIT_NODE_SECRET", SECRET)]).await;
    let ca = a.client();
    let sb = create(
        &ca,
        sandpit_sdk::types::CreateSandboxRequest {
            mode: SandboxMode::Persistent,
            timeout: None,
            ..base()
        },
    )
    .await;
    let id = sb.id.as_str();
    // The create was placed on one of the two: everything below goes through the other.
    let on_a = a.leaks().runsc.iter().any(|r| r.contains(id));
    let via = if on_a { &b } else { &a };
    let cb = via.client_with(&a.token);

    // Exec, and a streamed exec, through B.
    assert_eq!(
        crate::sh(&cb, id, "echo via-b; hostname").await.stdout,
        "via-b\nsandbox\n"
    );
    let mut stream = Box::pin(
        cb.exec_stream(
            id,
            &sandpit_sdk::types::ExecRequest {
                command: Some("for i in 1 2 3; do echo $i; done".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let mut out = String::new();
    let mut exit = None;
    while let Some(ev) = futures::StreamExt::next(&mut stream).await {
        match ev.unwrap() {
            sandpit_sdk::types::ExecEvent::Stdout { data, .. } => {
                use base64::Engine;
                out.push_str(&String::from_utf8_lossy(
                    &base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap(),
                ));
            }
            sandpit_sdk::types::ExecEvent::Exit { exit_code, .. } => exit = Some(exit_code),
            _ => {}
        }
    }
    assert_eq!((out.as_str(), exit), ("1\n2\n3\n", Some(0)));

    // Files both ways through B (2 MiB, so the body streams).
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    cb.upload(id, "/tmp/big.bin", data.clone()).await.unwrap();
    let back = cb
        .download(id, "/tmp/big.bin")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back[..] == data[..], "the file came back changed");

    // A terminal attached through B: a WebSocket relayed to A.
    let t = cb
        .create_terminal(
            id,
            &sandpit_sdk::types::TerminalCreateRequest {
                command: Some("read line; exit $line".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut v = crate::terminals::Viewer::attach(&cb, id, &t.id, true).await;
    v.type_("7\r").await;
    assert_eq!(v.closed().await, 1000);
    assert_eq!(v.exit, Some(7));

    // The CodeSandbox agent gateway through B: its WebSocket is relayed to A (the agent
    // token checked on both), and reads the file uploaded above.
    let mut gw = crate::security::Gateway::connect_at(&via.url, &a.token, id).await;
    let read = gw
        .call(
            "fs/readFile",
            vec![("path", rmpv::Value::from("/tmp/big.bin"))],
        )
        .await
        .unwrap();
    let bytes = read.as_map().unwrap()[0].1.as_slice().unwrap().len();
    assert_eq!(bytes, 2 << 20);
    drop(gw);
    // A token that does not verify is answered by B itself, never relayed.
    let (status, _) =
        crate::security::raw_get(&format!("{}/csb/agent/{id}/?token=forged", via.url)).await;
    assert_eq!(status, 401);

    // Hibernate through B; the next exec through B wakes it on A with its files.
    assert_eq!(
        cb.hibernate(id).await.unwrap().status,
        sandpit_api_types::SandboxStatus::Suspended
    );
    assert_eq!(
        crate::sh(&cb, id, "wc -c < /tmp/big.bin")
            .await
            .stdout
            .trim(),
        (2u32 << 20).to_string()
    );
    assert_eq!(
        ca.get_sandbox(id).await.unwrap().status,
        sandpit_api_types::SandboxStatus::Running
    );

    // Relay headers without the secret's signature are dropped, not trusted: the request
    // is relayed as any other (and answered), not taken as already relayed (a 503).
    let forged = reqwest::Client::new()
        .post(format!("{}/v1/sandboxes/{id}/exec", via.url))
        .bearer_auth(&a.token)
        .header("x-sandpit-forwarded-by", "node-x")
        .header("x-sandpit-node-auth", "00")
        .json(&serde_json::json!({"command": "echo forged"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    // Another workspace's token gets B's own answer, and nothing reaches A.
    let admin = via.client_with(&a.token);
    let ws = admin.create_workspace("other").await.unwrap();
    let other_token = admin
        .create_token(&ws.id, &Default::default())
        .await
        .unwrap()
        .token
        .unwrap();
    crate::assert_api_err(
        via.client_with(&other_token)
            .exec(id, &Default::default())
            .await,
        403,
        "forbidden",
    );
    // A token that may only read is refused a create by the server it asked, not placed.
    let reader = admin
        .create_token(
            &ws.id,
            &sandpit_sdk::types::TokenCreateRequest {
                scopes: Some(vec!["sandbox_read".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .token
        .unwrap();
    crate::assert_api_err(
        via.client_with(&reader).create_sandbox(&base()).await,
        403,
        "missing_scope",
    );

    // A private preview served by A, opened through B: B checks the token, A serves.
    crate::sh(
        &cb,
        id,
        "mkdir -p /www && echo hello-preview > /www/index.html",
    )
    .await;
    crate::previews::httpd(&cb, id, "8080", "/www").await;
    let token = cb
        .create_preview_token(id, &Default::default())
        .await
        .unwrap()
        .token
        .unwrap();
    let http = crate::previews::preview_client(via, id, &[8080]);
    let url = crate::previews::preview_url(via, id, 8080, "/index.html");
    let (status, code) = crate::previews::status_code(http.get(&url).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "preview_token_required"));
    let page = http
        .get(&url)
        .header("csb-preview-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.text().await.unwrap(), "hello-preview\n");

    cb.destroy_sandbox(id).await.unwrap();
    assert_eq!(
        ca.get_sandbox(id).await.unwrap().status,
        sandpit_api_types::SandboxStatus::Destroyed
    );
    assert!(a.leaks().is_empty() && b.leaks().is_empty());

    // Creates through A are placed over both nodes (by free slots, counted fresh); each
    // answers through either server.
    let mut made = Vec::new();
    for _ in 0..8 {
        made.push(create(&ca, base()).await);
    }
    let (on_a, on_b) = (a.leaks().runsc.len(), b.leaks().runsc.len());
    assert_eq!(
        on_a + on_b,
        8,
        "a: {:?}\nb: {:?}",
        a.leaks().runsc,
        b.leaks().runsc
    );
    assert!(
        on_a >= 1 && on_b >= 1,
        "all 8 on one node: {on_a} on A, {on_b} on B"
    );
    for sb in &made {
        assert_eq!(crate::sh(&cb, &sb.id, "echo ok").await.stdout, "ok\n");
        assert_eq!(crate::sh(&ca, &sb.id, "echo ok").await.stdout, "ok\n");
    }
    for sb in &made {
        ca.destroy_sandbox(&sb.id).await.unwrap();
    }
    assert!(a.leaks().is_empty() && b.leaks().is_empty());
}

/// A node that stops answering (SIGSTOP: a partition, a hung host) loses its lease; the
/// other node's sweep declares it lost and fails its running sandbox (nothing is shown
/// running that may not be). When it answers again its heartbeat is fenced: it registers
/// anew and tears down what the fleet settled, and takes sandboxes again.
#[tokio::test]
async fn a_node_that_stops_answering_is_declared_lost_and_cleans_up_on_return() {
    let (a, b) = two_nodes(&[("SANDPIT_NODE_LEASE", "3s")]).await;
    let b_name = format!("node-{}", b.index);
    let (ca, cb) = (a.client(), b.client_with(&a.token));
    let on_a = create(&ca, base()).await;
    let on_b = create(&cb, base()).await;

    let pid = b.pid().expect("b runs").to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    let result = async {
        wait_until(Duration::from_secs(30), "B declared lost", || async {
            (this_node(&a, &b_name)["status"] == "lost").then_some(())
        })
        .await
        .unwrap();
        wait_until(Duration::from_secs(30), "B's sandbox failed", || async {
            let sb = ca.get_sandbox(&on_b.id).await.unwrap();
            (sb.status == sandpit_api_types::SandboxStatus::Failed).then_some(sb)
        })
        .await
        .unwrap()
    }
    .await;
    signal("-CONT");
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("declared lost"),
        "{:?}",
        result.error
    );

    // Back: fenced, registered anew, the settled sandbox torn down here.
    wait_until(Duration::from_secs(30), "B registers anew", || async {
        let n = this_node(&a, &b_name);
        (n["status"] == "live" && n["epoch"].as_i64() >= Some(2)).then_some(())
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "B tears down what was settled",
        || async {
            (b.leaks().runsc.is_empty()
                && b.log().contains("fleet settled while this node was lost"))
            .then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(crate::sh(&ca, &on_a.id, "echo a").await.stdout, "a\n");
    let again = create(&cb, base()).await;
    assert_eq!(crate::sh(&cb, &again.id, "echo b").await.stdout, "b\n");
    cb.destroy_sandbox(&again.id).await.unwrap();
    ca.destroy_sandbox(&on_a.id).await.unwrap();
}

/// Which of `a` and `b` runs sandbox `id` now (its runsc container is on that node).
fn runner<'s>(id: &str, a: &'s TestServer, b: &'s TestServer) -> Option<&'s TestServer> {
    [a, b]
        .into_iter()
        .find(|s| s.leaks().runsc.iter().any(|r| r.contains(id)))
}

/// Sandboxes move between nodes through object storage (an S3 server on loopback): a
/// drained node hibernates its running sandbox and another node takes it over and wakes
/// it, its process still running and its files intact; then the sandbox, hibernated on
/// that node, wakes on the first after its node is killed (-9) and its lease lapses; then,
/// running there, its node is killed and the other restores it from its last image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernated_sandboxes_move_to_another_node_on_drain_and_on_loss() {
    const SECRET: &str = "fleet-secret-for-tests";
    let s3 = crate::s3::S3::start().await;
    let s3_env = s3.env("fleet");
    let mut env: Vec<(&str, &str)> = vec![
        ("SANDPIT_NODE_SECRET", SECRET),
        ("SANDPIT_NODE_LEASE", "3s"),
    ];
    env.extend(s3_env.iter().map(|(k, v)| (*k, v.as_str())));
    let (mut a, mut b) = two_nodes(&env).await;
    let sb = create(
        &a.client(),
        CreateSandboxRequest {
            mode: SandboxMode::Persistent,
            timeout: None,
            ..base()
        },
    )
    .await;
    let id = sb.id.as_str();
    let first_index = runner(id, &a, &b).expect("it runs on one of them").index;
    let token = a.token.clone();
    let (db, dir) = (
        a.database.as_ref().map(|d| d.url.clone()),
        a.data_dir.clone(),
    );
    let fleet = |args: &[&str]| nodes_in(db.as_deref(), &dir, args);
    let node_status = |name: &str| {
        let (ok, out, err) = fleet(&["--json"]);
        assert!(ok, "{err}");
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        all.into_iter()
            .find(|n| n["name"] == name)
            .map(|n| n["status"].clone())
    };
    let (first, second) = if a.index == first_index {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let (c1, c2) = (first.client_with(&token), second.client_with(&token));
    // A process with state in memory, and a file.
    let pid = crate::sh(
        &c1,
        id,
        "echo kept > /root/file; (while true; do date +%s > /tmp/beat; sleep 1; done) >/dev/null 2>&1 & echo $!",
    )
    .await
    .stdout
    .trim()
    .to_string();
    assert!(!pid.is_empty());

    // Drain its node: the sandbox is hibernated, uploaded and woken on the other node.
    let first_name = format!("node-{}", first.index);
    let (ok, _, err) = fleet(&["drain", &first_name]);
    assert!(ok, "{err}");
    wait_until(
        Duration::from_secs(120),
        "woken on the other node",
        || async {
            first
                .log()
                .contains("drain: woken on another node")
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(second.leaks().runsc.iter().any(|r| r.contains(id)));
    assert!(!first.leaks().runsc.iter().any(|r| r.contains(id)));
    let alive = crate::sh(&c2, id, &format!("kill -0 {pid} && cat /root/file")).await;
    assert_eq!(
        alive.stdout, "kept\n",
        "the process and the file moved: {alive:?}"
    );
    let now = c1.get_sandbox(id).await.unwrap();
    assert_eq!(now.status, sandpit_api_types::SandboxStatus::Running);
    assert!(now.image.is_none(), "a running sandbox shows no image");

    // Undrain; hibernate on the second node, wait for the image to be stored, kill -9 it.
    let (ok, _, err) = fleet(&["undrain", &first_name]);
    assert!(ok, "{err}");
    c2.hibernate(id).await.unwrap();
    let image = wait_until(
        Duration::from_secs(120),
        "the image stored remotely",
        || async {
            c1.get_sandbox(id)
                .await
                .ok()
                .and_then(|s| s.image)
                .filter(|i| i.remote == "stored")
        },
    )
    .await
    .unwrap();
    assert!(image.memory && image.bytes.unwrap_or(0) > 0, "{image:?}");
    assert!(s3.objects("fleet") > 0, "the image is in the bucket");
    let second_name = format!("node-{}", second.index);
    second.kill9();
    wait_until(
        Duration::from_secs(30),
        "the killed node's lease lapses",
        || async {
            let s = node_status(&second_name)?;
            (s == "lapsed" || s == "lost").then_some(())
        },
    )
    .await
    .unwrap();
    // Woken through the surviving node: back with its process and files.
    let woken = c1.wake(id).await.unwrap();
    assert_eq!(woken.status, sandpit_api_types::SandboxStatus::Running);
    let again = crate::sh(&c1, id, &format!("kill -0 {pid} && cat /root/file")).await;
    assert_eq!(again.stdout, "kept\n", "{again:?}");
    assert!(first.leaks().runsc.iter().any(|r| r.contains(id)));

    // Running on the first node, its last hibernation image kept: that node is killed
    // while the sandbox runs, and the second restores it from the image (its process
    // back, what it wrote after that hibernation gone), not failed.
    second.restart().await.unwrap();
    let c2 = second.client_with(&token);
    crate::sh(&c1, id, "echo after > /root/after").await;
    first.kill9();
    let settled = wait_until(
        Duration::from_secs(60),
        "suspended for a restore from its image",
        || async {
            c2.get_sandbox(id)
                .await
                .ok()
                .filter(|s| s.status == sandpit_api_types::SandboxStatus::Suspended)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; the second node's log, newest first:\n{}",
            second
                .log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(
        settled
            .error
            .as_deref()
            .is_some_and(|e| e.contains("last hibernation image")),
        "{settled:?}"
    );
    let back = crate::sh(
        &c2,
        id,
        &format!("kill -0 {pid} && cat /root/file && test ! -e /root/after && echo no-after"),
    )
    .await;
    assert_eq!(back.stdout, "kept\nno-after\n", "{back:?}");
    assert!(second.leaks().runsc.iter().any(|r| r.contains(id)));
    // The killed node comes back and tears down its copy.
    first.restart().await.unwrap();
    assert!(
        !first.leaks().runsc.iter().any(|r| r.contains(id)),
        "{:?}",
        first.leaks().runsc
    );
    c2.destroy_sandbox(id).await.unwrap();
}

/// A server relaying a create or a fork dies (abort, as `kill -9`) once the node doing the
/// work has answered, before its client hears it. The work is done once: the client's
/// retry with the same `Idempotency-Key` through the other server replays the answer, and
/// the workspace holds exactly the sandboxes asked for, all running.
#[tokio::test]
async fn a_relaying_server_killed_mid_create_or_fork_loses_and_doubles_nothing() {
    const SECRET: &str = "fleet-secret-for-tests";
    let (mut a, b) = two_nodes(&[("SANDPIT_NODE_SECRET", SECRET)]).await;
    // A drains, so every create it receives is placed on B and relayed.
    let a_name = format!("node-{}", a.index);
    let (ok, _, err) = nodes(&a, &["drain", &a_name]);
    assert!(ok, "{err}");
    a.set_env("SANDPIT_FAULT_POINT", "relay.answered");
    a.restart().await.unwrap();
    let token = a.token.clone();
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

    let died = post(format!("{}/v1/sandboxes", a.url), "create-1", body.clone()).await;
    assert!(died.is_err(), "A answered: {died:?}");
    for _ in 0..200 {
        if a.has_exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.has_exited(), "A aborted at the fault point");
    let retry = post(format!("{}/v1/sandboxes", b.url), "create-1", body.clone())
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
    let cb = b.client_with(&token);
    let all = cb.list_sandboxes(None).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(b.leaks().runsc.iter().any(|r| r.contains(&sb.id)));

    // The fork of B's sandbox, sent to A, is relayed to B; A dies again before answering.
    a.restart().await.unwrap();
    let fork = serde_json::json!({"count": 2});
    let died = post(
        format!("{}/v1/sandboxes/{}/fork", a.url, sb.id),
        "fork-1",
        fork.clone(),
    )
    .await;
    assert!(died.is_err(), "A answered: {died:?}");
    let retry = post(
        format!("{}/v1/sandboxes/{}/fork", b.url, sb.id),
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
    let all = cb.list_sandboxes(None).await.unwrap();
    assert_eq!(all.len(), 3, "the parent and two children: {all:?}");
    for s in &all {
        assert_eq!(s.status, sandpit_api_types::SandboxStatus::Running, "{s:?}");
        cb.destroy_sandbox(&s.id).await.unwrap();
    }
}

/// A built template's layers and a snapshot's files are on the node that made them: a
/// create naming either, sent to the other server, is placed on a node holding them (its
/// heartbeat lists its layers and snapshots) and relayed there.
#[tokio::test]
async fn creates_from_built_templates_and_snapshots_go_where_their_files_are() {
    const SECRET: &str = "fleet-secret-for-tests";
    let (a, b) = two_nodes(&[
        ("SANDPIT_NODE_SECRET", SECRET),
        ("SANDPIT_NODE_LEASE", "3s"),
    ])
    .await;
    let ca = a.client();
    let t = ca
        .create_template(&sandpit_sdk::types::CreateTemplateRequest {
            name: "here".into(),
            dockerfile: Some("FROM base\nRUN echo built-on-a > /built\n".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    crate::templates::follow(&ca, &t.id).await;
    // A's next heartbeats list the new layers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cb = b.client_with(&a.token);
    let mut made = Vec::new();
    for _ in 0..3 {
        let sb = create(
            &cb,
            CreateSandboxRequest {
                template: "here".into(),
                mode: SandboxMode::Persistent,
                timeout: None,
                ..base()
            },
        )
        .await;
        assert!(
            a.leaks().runsc.iter().any(|r| r.contains(&sb.id)),
            "placed on the node with the layers"
        );
        assert_eq!(
            crate::sh(&cb, &sb.id, "cat /built").await.stdout,
            "built-on-a\n"
        );
        made.push(sb.id);
    }
    let snap = cb.create_snapshot(&made[0]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let from_snap = create(
        &cb,
        CreateSandboxRequest {
            template: String::new(),
            snapshot: Some(snap.id.clone()),
            timeout: None,
            ..base()
        },
    )
    .await;
    assert!(a.leaks().runsc.iter().any(|r| r.contains(&from_snap.id)));
    made.push(from_snap.id);
    for id in made {
        cb.destroy_sandbox(&id).await.unwrap();
    }
}

/// With object storage, a built template's layers and a named snapshot are uploaded, and a
/// node that lacks them fetches them: with their maker draining, creates from both go to
/// the other node, which starts them from what it fetched. The drain also sends the
/// maker's free volume to object storage, and a create mounting it takes it elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_snapshots_start_on_a_node_that_fetches_them() {
    const SECRET: &str = "fleet-secret-for-tests";
    let s3 = crate::s3::S3::start().await;
    let s3_env = s3.env("stored");
    let mut env: Vec<(&str, &str)> = vec![
        ("SANDPIT_NODE_SECRET", SECRET),
        ("SANDPIT_NODE_LEASE", "3s"),
    ];
    env.extend(s3_env.iter().map(|(k, v)| (*k, v.as_str())));
    let (a, b) = two_nodes(&env).await;
    let ca = a.client();
    // Built where it was asked (a server that is a node builds itself).
    let t = ca
        .create_template(&sandpit_sdk::types::CreateTemplateRequest {
            name: "travels".into(),
            dockerfile: Some("FROM base\nRUN echo built-on-a > /built\n".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    crate::templates::follow(&ca, &t.id).await;
    let made = create(
        &ca,
        CreateSandboxRequest {
            template: "travels".into(),
            mode: SandboxMode::Persistent,
            timeout: None,
            ..base()
        },
    )
    .await;
    let maker = runner(&made.id, &a, &b).expect("it runs").index;
    let (maker, other) = if maker == a.index { (&a, &b) } else { (&b, &a) };
    crate::sh(&ca, &made.id, "echo in-snapshot > /root/snap").await;
    let snap = ca.create_snapshot(&made.id).await.unwrap();
    wait_until(
        Duration::from_secs(120),
        "the snapshot stored remotely",
        || async {
            ca.list_snapshots(&made.id)
                .await
                .ok()?
                .into_iter()
                .find(|s| s.id == snap.id)
                .and_then(|s| s.image)
                .filter(|i| i.remote == "stored")
        },
    )
    .await
    .unwrap();
    assert!(s3.objects("stored") > 0);
    ca.destroy_sandbox(&made.id).await.unwrap();
    // A volume on the maker, written by a sandbox that is gone again.
    let cm = maker.client_with(&a.token);
    let vol = cm.create_volume("travels-too", Some("64M")).await.unwrap();
    assert_eq!(vol.node, format!("node-{}", maker.index));
    let mounting = CreateSandboxRequest {
        volumes: vec![sandpit_api_types::VolumeMountRequest {
            name: "travels-too".into(),
            path: "/data".into(),
            read_only: false,
        }],
        ..base()
    };
    let writer = create(&cm, mounting.clone()).await;
    crate::sh(&cm, &writer.id, "echo on-the-volume > /data/f").await;
    cm.destroy_sandbox(&writer.id).await.unwrap();
    // The maker drains: it takes no new sandboxes, and its free volume goes to object
    // storage; creates go to the other node, which fetches what they need.
    let (ok, _, err) = nodes(maker, &["drain", &format!("node-{}", maker.index)]);
    assert!(ok, "{err}");
    wait_until(
        Duration::from_secs(60),
        "the volume in object storage",
        || async {
            ca.get_volume("travels-too")
                .await
                .ok()
                .filter(|v| v.node == sandpit_control::store::STORED_VOLUME)
        },
    )
    .await
    .unwrap();
    let reader = create(&ca, mounting).await;
    assert!(other.leaks().runsc.iter().any(|r| r.contains(&reader.id)));
    assert_eq!(
        crate::sh(&ca, &reader.id, "cat /data/f").await.stdout,
        "on-the-volume\n"
    );
    assert_eq!(
        ca.get_volume("travels-too").await.unwrap().node,
        format!("node-{}", other.index)
    );
    ca.destroy_sandbox(&reader.id).await.unwrap();
    let from_t = create(
        &ca,
        CreateSandboxRequest {
            template: "travels".into(),
            ..base()
        },
    )
    .await;
    assert!(
        other.leaks().runsc.iter().any(|r| r.contains(&from_t.id)),
        "placed on the node without the layers"
    );
    assert_eq!(
        crate::sh(&ca, &from_t.id, "cat /built").await.stdout,
        "built-on-a\n"
    );
    let from_snap = create(
        &ca,
        CreateSandboxRequest {
            template: String::new(),
            snapshot: Some(snap.id.clone()),
            ..base()
        },
    )
    .await;
    assert!(
        other
            .leaks()
            .runsc
            .iter()
            .any(|r| r.contains(&from_snap.id))
    );
    assert_eq!(
        crate::sh(&ca, &from_snap.id, "cat /root/snap /built")
            .await
            .stdout,
        "in-snapshot\nbuilt-on-a\n"
    );
    ca.destroy_sandbox(&from_t.id).await.unwrap();
    ca.destroy_sandbox(&from_snap.id).await.unwrap();
}
