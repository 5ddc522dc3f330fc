//! Fork and named snapshots: memory and files carried into children that then diverge.

use std::time::Duration;

use sandpit_sdk::types::{CreateSandboxRequest, ForkResult, SandboxMode, SandboxStatus};
use sandpit_test_support::wait_until;

use crate::{assert_api_err, create, server, sh};

#[tokio::test]
async fn fork_and_snapshots_carry_memory_and_files_and_children_diverge() {
    let srv = server().await;
    let client = srv.client();
    let parent = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1h".into()),
            env: [("ROLE".to_string(), "parent".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    let pid = parent.id.clone();
    sh(&client, &pid, crate::COUNTER).await;
    client
        .upload(&pid, "/home/before.txt", "written before fork")
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the counter runs", || async {
        (crate::counter(&client, &pid).await >= 5).then_some(())
    })
    .await
    .unwrap();

    assert_api_err(client.fork(&pid, 0).await, 400, "invalid_count");
    assert_api_err(client.fork(&pid, 101).await, 400, "invalid_count");

    let before = crate::counter(&client, &pid).await;
    let results = client.fork(&pid, 3).await.unwrap();
    assert_eq!(results.len(), 3);
    let children: Vec<String> = results
        .into_iter()
        .map(|r| match r {
            ForkResult::Ok(sb) => {
                assert_eq!(sb.status, SandboxStatus::Running);
                assert_eq!(sb.mode, SandboxMode::Persistent);
                sb.id
            }
            ForkResult::Err(e) => panic!("a child failed: {e:?}"),
        })
        .collect();

    // The parent keeps running with its memory.
    assert_eq!(
        client.get_sandbox(&pid).await.unwrap().status,
        SandboxStatus::Running
    );
    assert!(crate::counter(&client, &pid).await >= before);

    for (i, child) in children.iter().enumerate() {
        // The counting process came along (a fresh boot would have no /tmp/count process).
        let first = crate::counter(&client, child).await;
        assert!(
            first >= before,
            "child resumed at {first}, parent was at {before}"
        );
        wait_until(
            Duration::from_secs(10),
            "the child's counter keeps counting",
            || async { (crate::counter(&client, child).await > first).then_some(()) },
        )
        .await
        .unwrap();
        assert_eq!(
            sh(&client, child, "cat /home/before.txt").await.stdout,
            "written before fork"
        );
        assert_eq!(
            sh(&client, child, "echo $ROLE").await.stdout,
            "parent\n",
            "settings are inherited"
        );
        client
            .upload(child, "/home/mine.txt", format!("child {i}"))
            .await
            .unwrap();
    }
    // Writes after the fork stay with their writer.
    for (i, child) in children.iter().enumerate() {
        let out = sh(&client, child, "cat /home/mine.txt; ls /home").await;
        assert_eq!(out.stdout, format!("child {i}before.txt\nmine.txt\nuser\n"));
    }
    let out = sh(&client, &pid, "ls /home").await;
    assert_eq!(
        out.stdout, "before.txt\nuser\n",
        "children's writes do not reach the parent"
    );

    // Each child answered on its own network slot above (the agent is reached at the
    // slot's address), so no two share one.

    // Named snapshot of a running sandbox, then a new sandbox from it.
    sh(&client, &pid, "echo snap > /home/at-snapshot.txt").await;
    let snap = client.create_snapshot(&pid).await.unwrap();
    assert!(snap.size_bytes > 0);
    assert_eq!(client.list_snapshots(&pid).await.unwrap().len(), 1);
    sh(&client, &pid, "echo later > /home/after-snapshot.txt").await;
    let from_snap = create(
        &client,
        CreateSandboxRequest {
            snapshot: Some(snap.id.clone()),
            mode: SandboxMode::Persistent,
            ..Default::default()
        },
    )
    .await;
    let out = sh(
        &client,
        &from_snap.id,
        "cat /home/at-snapshot.txt; ls /home",
    )
    .await;
    assert_eq!(out.stdout, "snap\nat-snapshot.txt\nbefore.txt\nuser\n");
    let c = crate::counter(&client, &from_snap.id).await;
    wait_until(
        Duration::from_secs(10),
        "the snapshot's counter runs",
        || async { (crate::counter(&client, &from_snap.id).await > c).then_some(()) },
    )
    .await
    .unwrap();

    // Snapshots are scoped to the workspace.
    let ws_b = client.create_workspace("other").await.unwrap();
    let tok_b = client
        .create_token(&ws_b.id, &Default::default())
        .await
        .unwrap();
    let b = srv.client_with(tok_b.token.as_deref().unwrap());
    assert_api_err(
        b.create_sandbox(&CreateSandboxRequest {
            snapshot: Some(snap.id.clone()),
            ..Default::default()
        })
        .await,
        404,
        "snapshot_not_found",
    );
    assert_api_err(b.delete_snapshot(&snap.id).await, 404, "snapshot_not_found");

    // Fork of a suspended sandbox.
    client.hibernate(&from_snap.id).await.unwrap();
    let results = client.fork(&from_snap.id, 1).await.unwrap();
    let ForkResult::Ok(grandchild) = &results[0] else {
        panic!("{results:?}")
    };
    assert_eq!(
        sh(&client, &grandchild.id, "cat /home/at-snapshot.txt")
            .await
            .stdout,
        "snap\n"
    );
    assert_eq!(
        client.get_sandbox(&from_snap.id).await.unwrap().status,
        SandboxStatus::Suspended
    );

    client.delete_snapshot(&snap.id).await.unwrap();
    assert_api_err(
        client.delete_snapshot(&snap.id).await,
        404,
        "snapshot_not_found",
    );
    assert!(!srv.data_dir.join("snapshots").join(&snap.id).exists());

    for id in children.iter().chain([&pid, &from_snap.id, &grandchild.id]) {
        client.destroy_sandbox(id).await.unwrap();
    }
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
