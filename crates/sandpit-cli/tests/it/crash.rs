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
