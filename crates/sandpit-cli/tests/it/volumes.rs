//! Volumes end to end: data that outlives sandboxes, one writer, read-only views (forks
//! included), hibernate and wake with a volume mounted, refused deletes and bad input.

use sandpit_sdk::types::{
    CreateSandboxRequest, ForkResult, SandboxMode, SandboxStatus, VolumeMountRequest,
};

use crate::{assert_api_err, create, server, sh};

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMountRequest {
    VolumeMountRequest {
        name: name.into(),
        path: path.into(),
        read_only,
    }
}

fn with_volumes(volumes: Vec<VolumeMountRequest>) -> CreateSandboxRequest {
    CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        idle_timeout: Some("1h".into()),
        volumes,
        ..Default::default()
    }
}

#[tokio::test]
async fn volumes_outlive_sandboxes_with_one_writer_and_read_only_views() {
    let srv = server().await;
    let client = srv.client();

    // Bad names and sizes: 400, nothing made.
    for name in ["../x", "a/b", "a\0b", "vé", "Data", "", &"a".repeat(64)] {
        assert_api_err(
            client.create_volume(name, Some("64M")).await,
            400,
            "invalid_volume_name",
        );
    }
    for size in ["1X", "1M", "1T", "-5G"] {
        assert_api_err(
            client.create_volume("data", Some(size)).await,
            400,
            "invalid_volume_size",
        );
    }
    assert!(client.list_volumes().await.unwrap().is_empty());
    let volumes_dir = srv.data_dir.join("volumes");
    assert_eq!(std::fs::read_dir(&volumes_dir).unwrap().count(), 0);

    let vol = client.create_volume("data", Some("64M")).await.unwrap();
    assert_eq!((vol.name.as_str(), vol.size_bytes), ("data", 64 << 20));
    assert_api_err(
        client.create_volume("data", None).await,
        409,
        "volume_exists",
    );
    assert_eq!(client.list_volumes().await.unwrap(), vec![vol.clone()]);
    assert_eq!(client.get_volume("data").await.unwrap(), vol);
    assert_api_err(client.get_volume("nope").await, 404, "volume_not_found");

    // Bad mounts: 400/404, no sandbox made.
    let before = client.list_sandboxes(None).await.unwrap().len();
    for path in [
        "/",
        "relative",
        "/proc/x",
        "/sys",
        "/dev/shm",
        "/.sandpit",
        "/a/../b",
        "/a\0b",
        "/tmp",
    ] {
        assert_api_err(
            client
                .create_sandbox(&with_volumes(vec![mount("data", path, false)]))
                .await,
            400,
            "invalid_volume_path",
        );
    }
    assert_api_err(
        client
            .create_sandbox(&with_volumes(vec![
                mount("data", "/work", false),
                mount("data", "/work/sub", true),
            ]))
            .await,
        400,
        "invalid_volumes",
    );
    assert_api_err(
        client
            .create_sandbox(&with_volumes(vec![mount("../x", "/work", false)]))
            .await,
        400,
        "invalid_volume_name",
    );
    assert_api_err(
        client
            .create_sandbox(&with_volumes(vec![mount("missing", "/work", false)]))
            .await,
        404,
        "volume_not_found",
    );
    assert_eq!(client.list_sandboxes(None).await.unwrap().len(), before);

    // The writer.
    let a = create(&client, with_volumes(vec![mount("data", "/data", false)])).await;
    let out = sh(
        &client,
        &a.id,
        "echo hello > /data/hello && cat /data/hello",
    )
    .await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "hello\n"),
        "{out:?}"
    );

    // A second writer is refused; a reader sees the data and cannot write.
    assert_api_err(
        client
            .create_sandbox(&with_volumes(vec![mount("data", "/data", false)]))
            .await,
        409,
        "volume_busy",
    );
    let reader = create(&client, with_volumes(vec![mount("data", "/mnt/ro", true)])).await;
    let out = sh(
        &client,
        &reader.id,
        "cat /mnt/ro/hello; echo x > /mnt/ro/new",
    )
    .await;
    assert_eq!(out.stdout, "hello\n", "{out:?}");
    assert_ne!(out.exit_code, 0);
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");

    // Hibernate and wake with the volume mounted: the mount and its data are back.
    client.hibernate(&a.id).await.unwrap();
    assert_eq!(
        client.get_sandbox(&a.id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    client.wake(&a.id).await.unwrap();
    let out = sh(
        &client,
        &a.id,
        "cat /data/hello && echo again >> /data/hello",
    )
    .await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "hello\n"),
        "{out:?}"
    );

    // A fork child reads its parent's read-write volume read-only.
    let child = match client.fork(&a.id, 1).await.unwrap().remove(0) {
        ForkResult::Ok(sb) => sb,
        ForkResult::Err(e) => panic!("the child failed: {e:?}"),
    };
    let out = sh(&client, &child.id, "cat /data/hello; echo x > /data/child").await;
    assert_eq!(out.stdout, "hello\nagain\n", "{out:?}");
    assert!(out.stderr.contains("Read-only file system"), "{out:?}");
    let out = sh(
        &client,
        &a.id,
        "echo parent > /data/parent && cat /data/parent",
    )
    .await;
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "parent\n"),
        "{out:?}"
    );

    // In use: not deleted.
    assert_api_err(client.delete_volume("data").await, 409, "volume_in_use");

    // The data outlives its writer: a new sandbox mounts it read-write.
    for id in [&a.id, &reader.id, &child.id] {
        client.destroy_sandbox(id).await.unwrap();
    }
    let b = create(
        &client,
        with_volumes(vec![mount("data", "/srv/data", false)]),
    )
    .await;
    let out = sh(
        &client,
        &b.id,
        "cat /srv/data/hello /srv/data/parent; ls /srv/data",
    )
    .await;
    assert_eq!(
        out.stdout, "hello\nagain\nparent\nhello\nparent\n",
        "{out:?}"
    );
    assert_api_err(client.delete_volume("data").await, 409, "volume_in_use");
    client.destroy_sandbox(&b.id).await.unwrap();

    client.delete_volume("data").await.unwrap();
    assert_api_err(client.get_volume("data").await, 404, "volume_not_found");
    assert_eq!(std::fs::read_dir(&volumes_dir).unwrap().count(), 0);
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// A server killed (-9) with volumes mounted adopts them on its restart: the running
/// sandbox keeps its volume, a suspended one wakes with it, and after everything is
/// destroyed and the volumes deleted, nothing is left on the host.
#[tokio::test]
async fn a_restarted_server_keeps_its_volumes_mounted_and_leaves_nothing() {
    let mut srv = server().await;
    let client = srv.client();
    client.create_volume("kept", Some("64M")).await.unwrap();
    client.create_volume("slept", Some("64M")).await.unwrap();
    let running = create(&client, with_volumes(vec![mount("kept", "/data", false)])).await;
    let sleeping = create(&client, with_volumes(vec![mount("slept", "/data", false)])).await;
    sh(&client, &running.id, "echo before > /data/f").await;
    sh(&client, &sleeping.id, "echo asleep > /data/f").await;
    client.hibernate(&sleeping.id).await.unwrap();

    srv.kill9();
    srv.restart().await.unwrap();
    let client = srv.client();
    assert_eq!(
        sh(&client, &running.id, "cat /data/f").await.stdout,
        "before\n"
    );
    sh(&client, &running.id, "echo after >> /data/f").await;
    assert_eq!(
        sh(&client, &running.id, "cat /data/f").await.stdout,
        "before\nafter\n"
    );
    assert_eq!(
        sh(&client, &sleeping.id, "cat /data/f").await.stdout,
        "asleep\n"
    );
    // The one writer rule survived the restart.
    assert_api_err(
        client
            .create_sandbox(&with_volumes(vec![mount("kept", "/other", false)]))
            .await,
        409,
        "volume_busy",
    );

    for id in [&running.id, &sleeping.id] {
        client.destroy_sandbox(id).await.unwrap();
    }
    client.delete_volume("kept").await.unwrap();
    client.delete_volume("slept").await.unwrap();
    assert!(srv.leaks().is_empty(), "{:?}", srv.leaks());
    let left: Vec<_> = std::fs::read_dir(srv.data_dir.join("volumes"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "volume files left: {left:?}");
}
