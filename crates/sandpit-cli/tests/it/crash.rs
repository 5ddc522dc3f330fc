//! Crash safety: `kill -9` of the server mid-create, then a restart that leaves no orphans
//! and adopts the sandboxes that survived.

use std::time::Duration;

use sandpit_sdk::types::{CreateSandboxRequest, SandboxMode, SandboxStatus};
use sandpit_test_support::wait_until;

use crate::{base, create, server, sh};

#[tokio::test]
async fn kill9_mid_create_then_restart_leaves_no_orphans() {
    let mut srv = server().await;
    let client = srv.client();

    // A persistent sandbox that is running when the server dies must survive it.
    let keeper = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1h".into()),
            ..Default::default()
        },
    )
    .await;
    client
        .upload(&keeper.id, "/home/keep.txt", "still here")
        .await
        .unwrap();

    // Start a create and kill the server once the runtime has begun working on it.
    let pending = {
        let c = client.clone();
        tokio::spawn(async move { c.create_sandbox(&base()).await })
    };
    let data_dir = srv.data_dir.clone();
    let keeper_id = keeper.id.clone();
    wait_until(
        Duration::from_secs(30),
        "a second sandbox directory to appear",
        || {
            let data_dir = data_dir.clone();
            let keeper_id = keeper_id.clone();
            async move {
                let n = std::fs::read_dir(data_dir.join("sandboxes"))
                    .ok()?
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy() != keeper_id)
                    .count();
                (n > 0).then_some(())
            }
        },
    )
    .await
    .unwrap();
    srv.kill9();
    assert!(
        pending.await.unwrap().is_err(),
        "the interrupted create did not succeed"
    );

    srv.restart().await.unwrap();
    let client = srv.client();
    let all = client.list_sandboxes(Some("failed")).await.unwrap();
    assert_eq!(
        all.len(),
        1,
        "the interrupted sandbox is failed with a reason"
    );
    assert!(
        all[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("server stopped"),
        "{:?}",
        all[0].error
    );

    // The survivor was adopted: running, same files, same address.
    let kept = client.get_sandbox(&keeper.id).await.unwrap();
    assert_eq!(kept.status, SandboxStatus::Running);
    assert_eq!(
        sh(&client, &keeper.id, "cat /home/keep.txt").await.stdout,
        "still here"
    );

    // Nothing exists on the host but the survivor's runtime, namespace and files.
    let leaks = srv.leaks();
    assert_eq!(leaks.runsc.len(), 1, "{leaks:?}");
    assert_eq!(leaks.netns.len(), 1, "{leaks:?}");
    assert_eq!(leaks.sandbox_dirs, vec![keeper.id.clone()], "{leaks:?}");

    // The server's own address pool still works after the restart.
    let fresh = create(&client, base()).await;
    assert_eq!(sh(&client, &fresh.id, "echo ok").await.stdout, "ok\n");
    client.destroy_sandbox(&fresh.id).await.unwrap();
    client.destroy_sandbox(&keeper.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// A simulated host reboot: the server and every runsc process die, namespaces and mounts
/// vanish. Persistent sandboxes come back: a suspended one with its memory, a running one
/// with its files.
#[tokio::test]
async fn persistent_sandboxes_survive_a_simulated_host_reboot() {
    let mut srv = server().await;
    let client = srv.client();
    let persistent = || CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        idle_timeout: Some("1h".into()),
        ..Default::default()
    };
    let sleeping = create(&client, persistent()).await;
    sh(&client, &sleeping.id, crate::COUNTER).await;
    wait_until(Duration::from_secs(10), "the counter runs", || async {
        (crate::counter(&client, &sleeping.id).await >= 3).then_some(())
    })
    .await
    .unwrap();
    client.hibernate(&sleeping.id).await.unwrap();
    let running = create(&client, persistent()).await;
    client
        .upload(&running.id, "/home/work.txt", "unsaved work")
        .await
        .unwrap();

    // "Reboot": the server dies, then every runsc process of this server, every namespace
    // and every mount it had.
    srv.kill9();
    let data = srv.data_dir.display().to_string();
    let pids = std::process::Command::new("pgrep")
        .args(["-f", &format!("runsc.*{data}/")])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        // Positive pids only: never signal a process group.
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    let leaks = srv.leaks();
    for ns in &leaks.netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .status();
    }
    for m in leaks.mounts.iter().rev() {
        let _ = std::process::Command::new("umount")
            .args(["-l", m])
            .status();
    }

    srv.restart().await.unwrap();
    let client = srv.client();
    assert_eq!(
        client.get_sandbox(&sleeping.id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    let woke = client.get_sandbox(&running.id).await.unwrap();
    assert_eq!(woke.status, SandboxStatus::Suspended, "{woke:?}");
    assert!(woke.error.is_some(), "says its memory was lost");

    // Memory intact for the one that was suspended: its counter continues.
    let c = crate::counter(&client, &sleeping.id).await;
    wait_until(
        Duration::from_secs(10),
        "the restored counter runs",
        || async { (crate::counter(&client, &sleeping.id).await > c).then_some(()) },
    )
    .await
    .unwrap();
    // Files intact for the one that was running.
    assert_eq!(
        sh(&client, &running.id, "cat /home/work.txt").await.stdout,
        "unsaved work"
    );

    client.destroy_sandbox(&sleeping.id).await.unwrap();
    client.destroy_sandbox(&running.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// An upgrade: the server restarts with a different agent binary. A sandbox hibernated
/// under the old agent wakes with its memory (the old agent keeps running in it and still
/// speaks the protocol), and new sandboxes get the new agent.
#[tokio::test]
async fn a_hibernated_sandbox_wakes_after_an_agent_upgrade() {
    let mut srv = server().await;
    let client = srv.client();
    let old = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1h".into()),
            ..Default::default()
        },
    )
    .await;
    sh(&client, &old.id, crate::COUNTER).await;
    wait_until(Duration::from_secs(10), "the counter runs", || async {
        (crate::counter(&client, &old.id).await >= 3).then_some(())
    })
    .await
    .unwrap();
    client.hibernate(&old.id).await.unwrap();

    // "Upgrade": a different agent binary (same code, different bytes, so a new layer).
    let upgraded = srv.data_dir.parent().unwrap().join("agent-upgraded");
    let mut bytes = std::fs::read(sandpit_test_support::agent_bin()).unwrap();
    bytes.extend_from_slice(b"sandpit-upgrade-marker");
    std::fs::write(&upgraded, bytes).unwrap();
    std::fs::set_permissions(
        &upgraded,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    srv.set_env("SANDPIT_AGENT_BIN", upgraded.to_str().unwrap());
    srv.restart().await.unwrap();
    let client = srv.client();
    assert_eq!(
        std::fs::read_dir(srv.data_dir.join("agent"))
            .unwrap()
            .count(),
        2,
        "a second agent layer"
    );

    let c = crate::counter(&client, &old.id).await;
    assert!(c >= 3, "memory kept: {c}");
    wait_until(
        Duration::from_secs(10),
        "the old sandbox's counter continues",
        || async { (crate::counter(&client, &old.id).await > c).then_some(()) },
    )
    .await
    .unwrap();
    let fresh = create(&client, base()).await;
    let out = sh(&client, &fresh.id, "tail -c 22 /.sandpit/agent").await;
    assert_eq!(
        out.stdout, "sandpit-upgrade-marker",
        "new sandboxes run the new agent"
    );
    client.destroy_sandbox(&old.id).await.unwrap();
    client.destroy_sandbox(&fresh.id).await.unwrap();
}

/// After a crash (`kill -9` of a server holding running and hibernated sandboxes), `sandpit
/// cleanup --yes` removes every host object: runsc containers and processes, mounts, loop
/// devices, namespaces, veths, the nftables table, the sandboxes' files and memory images.
/// Without `--yes` it refuses and changes nothing.
#[tokio::test]
async fn cleanup_after_a_crash_leaves_nothing() {
    let mut srv = server().await;
    let client = srv.client();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&client, base()).await.id);
    }
    client.hibernate(&ids[0]).await.expect("hibernate");
    srv.kill9();
    let cleanup = |yes: bool| {
        let mut cmd = std::process::Command::new(crate::bin());
        cmd.arg("cleanup")
            .env("SANDPIT_DATA_DIR", &srv.data_dir)
            .env("SANDPIT_PREFIX", &srv.prefix)
            .env("SANDPIT_POOL", &srv.pool);
        if yes {
            cmd.arg("--yes");
        }
        cmd.output().expect("sandpit cleanup runs")
    };
    let refused = cleanup(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass --yes"));
    assert_eq!(
        sandpit_test_support::Leaks::of(&srv.prefix, &srv.data_dir)
            .runsc
            .len(),
        5,
        "refused, yet something changed"
    );
    let out = cleanup(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped 5 sandboxes"), "{stderr}");
    let leaks = sandpit_test_support::Leaks::of(&srv.prefix, &srv.data_dir);
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(!srv.data_dir.join("checkpoints").exists());
}
