//! Volumes over the fakes: who keeps a volume mounted, the one-writer rule, fork children
//! reading, snapshots referring, and failures that leave nothing.

use sandpit_api_types::{
    CreateSandboxRequest, CreateVolumeRequest, SandboxMode, VolumeMountRequest,
};
use sandpit_runtime::fake::FakeOp;

use super::Harness;
use crate::ControlError;
use crate::node::volumes;
use crate::store::{Sandbox, VolumeRow};
use crate::{Status, node};

fn code(e: &ControlError) -> &'static str {
    match e {
        ControlError::Conflict { code, .. }
        | ControlError::Invalid { code, .. }
        | ControlError::NotFound { code, .. } => code,
        ControlError::Kept { .. } => "kept",
        _ => "other",
    }
}

async fn volume(h: &Harness, name: &str) -> VolumeRow {
    volumes::create(
        &h.node,
        &h.workspace,
        &CreateVolumeRequest {
            name: name.into(),
            size: Some("64M".into()),
        },
    )
    .await
    .unwrap()
}

async fn with(h: &Harness, mounts: &[(&str, &str, bool)]) -> Result<Sandbox, ControlError> {
    h.create_with(&CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        volumes: mounts
            .iter()
            .map(|(name, path, ro)| VolumeMountRequest {
                name: (*name).into(),
                path: (*path).into(),
                read_only: *ro,
            })
            .collect(),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn volume_users_follow_the_sandboxes_that_run() {
    let h = Harness::new().await;
    let v = volume(&h, "data").await;
    let dir = h.node.volume_dir(&v.id);
    let a = with(&h, &[("data", "/data", false)]).await.unwrap();
    let r = with(&h, &[("data", "/mnt/ro", true)]).await.unwrap();
    assert_eq!(h.rt.volume_users(&dir), {
        let mut ids = vec![a.runtime_id.clone(), r.runtime_id.clone()];
        ids.sort();
        ids
    });
    let spec = h.rt.spec_of(&r.runtime_id).unwrap();
    assert_eq!(spec.volumes.len(), 1);
    assert_eq!(spec.volumes[0].dir, dir);
    assert_eq!(spec.volumes[0].destination, "/mnt/ro");
    assert!(spec.volumes[0].read_only);

    // Suspended: no longer a user; woken: the same mount again.
    node::lifecycle::suspend(&h.node, &a.id).await.unwrap();
    assert_eq!(h.rt.volume_users(&dir), vec![r.runtime_id.clone()]);
    h.wake(&a.id).await.unwrap();
    let spec = h.rt.spec_of(&a.runtime_id).unwrap();
    assert_eq!(
        (
            spec.volumes[0].destination.as_str(),
            spec.volumes[0].read_only
        ),
        ("/data", false)
    );
    assert_eq!(h.rt.volume_users(&dir).len(), 2);
    let e = volumes::delete(&h.node, &h.workspace, "data")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "volume_in_use");

    for sb in [&a, &r] {
        node::lifecycle::destroy(&h.node, &sb.id).await.unwrap();
    }
    assert!(h.rt.volume_users(&dir).is_empty());
    volumes::delete(&h.node, &h.workspace, "data")
        .await
        .unwrap();
    assert!(!dir.exists());
    assert!(
        h.node
            .store
            .volumes
            .get(&h.workspace, "data")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn volume_has_one_writer_among_live_sandboxes() {
    let h = Harness::new().await;
    volume(&h, "data").await;
    let a = with(&h, &[("data", "/data", false)]).await.unwrap();
    let held = h.rt.held();
    let e = with(&h, &[("data", "/other", false)]).await.unwrap_err();
    assert_eq!(code(&e), "volume_busy");
    // Refused before anything was made.
    assert_eq!(h.rt.held(), held);
    // Suspended, it still holds the volume.
    node::lifecycle::suspend(&h.node, &a.id).await.unwrap();
    let e = with(&h, &[("data", "/data", false)]).await.unwrap_err();
    assert_eq!(code(&e), "volume_busy");
    node::lifecycle::destroy(&h.node, &a.id).await.unwrap();
    let b = with(&h, &[("data", "/data", false)]).await.unwrap();
    assert_eq!(h.row(&b.id).await.status, Status::Running);
}

#[tokio::test]
async fn volume_fork_children_read_and_snapshots_refer() {
    let h = Harness::new().await;
    let v = volume(&h, "data").await;
    let a = with(&h, &[("data", "/data", false)]).await.unwrap();
    let child = h.fork(&a.id, 1).await.unwrap().remove(0).unwrap();
    let spec = h.rt.spec_of(&child.runtime_id).unwrap();
    assert_eq!(
        (
            spec.volumes[0].destination.as_str(),
            spec.volumes[0].read_only
        ),
        ("/data", true)
    );
    // The parent keeps writing.
    assert!(!h.rt.spec_of(&a.runtime_id).unwrap().volumes[0].read_only);

    let snap = node::fork::take_snapshot(&h.node, &h.workspace, &a.id)
        .await
        .unwrap();
    for sb in [&a, &child] {
        node::lifecycle::destroy(&h.node, &sb.id).await.unwrap();
    }
    let e = volumes::delete(&h.node, &h.workspace, "data")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "volume_in_use");

    // A sandbox from the snapshot mounts what its sandbox had; naming others is refused.
    let e = h
        .create_with(&CreateSandboxRequest {
            snapshot: Some(snap.id.clone()),
            volumes: vec![VolumeMountRequest {
                name: "data".into(),
                path: "/x".into(),
                read_only: true,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), "invalid_volumes");
    let from = h
        .create_with(&CreateSandboxRequest {
            snapshot: Some(snap.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let spec = h.rt.spec_of(&from.runtime_id).unwrap();
    assert_eq!(spec.volumes[0].dir, h.node.volume_dir(&v.id));
    assert!(!spec.volumes[0].read_only);
    node::lifecycle::destroy(&h.node, &from.id).await.unwrap();
    node::fork::delete_snapshot(&h.node, &h.workspace, &snap.id)
        .await
        .unwrap();
    volumes::delete(&h.node, &h.workspace, "data")
        .await
        .unwrap();
}

#[tokio::test]
async fn volume_failures_and_bad_input_leave_nothing() {
    let h = Harness::configured(
        std::sync::Arc::new(crate::testing::runtime_with_agents()),
        std::sync::Arc::new(sandpit_net::fake::FakeNetwork::new(4)),
        |cfg| cfg.quotas.max_volumes = 1,
    )
    .await;
    for name in ["../x", "a/b", "a\0b", "vé", &"a".repeat(64)] {
        let e = volumes::create(
            &h.node,
            &h.workspace,
            &CreateVolumeRequest {
                name: name.into(),
                size: None,
            },
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), "invalid_volume_name");
    }
    h.rt.fail_next(FakeOp::CreateVolume, None);
    assert!(
        volumes::create(
            &h.node,
            &h.workspace,
            &CreateVolumeRequest {
                name: "data".into(),
                size: None,
            },
        )
        .await
        .is_err()
    );
    assert!(
        h.node
            .store
            .volumes
            .list(&h.workspace)
            .await
            .unwrap()
            .is_empty()
    );
    let v = volume(&h, "data").await;
    let e = volumes::create(
        &h.node,
        &h.workspace,
        &CreateVolumeRequest {
            name: "more".into(),
            size: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), "kept");
    assert_eq!(
        std::fs::read_dir(h.node.cfg.data_dir.join("volumes"))
            .unwrap()
            .count(),
        1
    );

    for (path, want) in [
        ("/", "invalid_volume_path"),
        ("/proc/x", "invalid_volume_path"),
        ("/.sandpit/a", "invalid_volume_path"),
        ("x", "invalid_volume_path"),
    ] {
        let e = with(&h, &[("data", path, false)]).await.unwrap_err();
        assert_eq!(code(&e), want, "{path}");
    }
    let e = with(&h, &[("data", "/a", false), ("data", "/b", true)])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "invalid_volumes");
    assert!(h.rt.held().is_empty());

    // A boot that fails: the row fails, nothing keeps the volume, it can be deleted.
    h.rt.fail_next(FakeOp::Start, None);
    assert!(with(&h, &[("data", "/data", false)]).await.is_err());
    assert!(h.rt.volume_users(&h.node.volume_dir(&v.id)).is_empty());
    let b = with(&h, &[("data", "/data", false)]).await.unwrap();
    node::lifecycle::destroy(&h.node, &b.id).await.unwrap();
    volumes::delete(&h.node, &h.workspace, "data")
        .await
        .unwrap();
}
