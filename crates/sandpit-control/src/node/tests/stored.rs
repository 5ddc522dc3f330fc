//! Named snapshots (and template layers) through an image store (`node::stored`): a
//! snapshot taken on one node is uploaded in the background and a create from it on another
//! node fetches it first; failures of the fetch change nothing and leave nothing. Two nodes
//! share one SQLite store and one directory-backed image store (`DirImages`).
#![allow(
    clippy::disallowed_methods,
    reason = "test fixtures written and read by path in temporary dirs"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::{CreateSandboxRequest, SandboxMode};

use super::moves::{DirImages, code_of, images_in, second_node, second_node_with};
use super::{Harness, unreserved};
use crate::node::{Node, fork, lifecycle};
use crate::remote::{RemoteImage, RemoteState};
use crate::store::{Sandbox, SnapshotRow};
use crate::{ControlError, Status};

async fn snapshot_record(node: &Node, id: &str) -> Option<RemoteImage> {
    let snap = node.store.snapshots.by_id(id).await.unwrap()?;
    snap.remote_image
        .map(|r| serde_json::from_str(&r).expect("the record decodes"))
}

/// Wait for snapshot `id`'s upload to end; its final record.
async fn snapshot_uploaded(node: &Node, id: &str) -> RemoteImage {
    for _ in 0..500 {
        if let Some(r) = snapshot_record(node, id).await
            && r.state != RemoteState::Uploading
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upload of snapshot {id} did not end");
}

/// A running sandbox with a file in its writable layer, and a snapshot of it.
async fn snapshot_with_file(h: &Harness) -> SnapshotRow {
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let upper = h.node.state_dir(&row.id).join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::write(upper.join("notes.txt"), "from the snapshot").unwrap();
    fork::take_snapshot(&h.node, &h.workspace, &row.id)
        .await
        .unwrap()
}

/// Create a sandbox from snapshot `snap` on `node`, for `h`'s workspace.
async fn create_from_snapshot(
    h: &Harness,
    node: &Arc<Node>,
    snap: &str,
) -> Result<Sandbox, ControlError> {
    let req = CreateSandboxRequest {
        snapshot: Some(snap.into()),
        mode: SandboxMode::Ephemeral,
        ..Default::default()
    };
    let (row, snapshot, volumes) = lifecycle::prepare_create(node, &h.workspace, &req).await?;
    let lock = tokio::sync::Mutex::new(());
    lifecycle::create(node, row, snapshot, volumes, &unreserved(&lock)).await
}

/// Entries of a directory (none when it is missing).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Two nodes over one store and one image store; the snapshot is taken on the first.
struct Pair {
    h: Harness,
    b: Arc<Node>,
    b_rt: Arc<sandpit_runtime::fake::FakeRuntime>,
    store: Arc<DirImages>,
    _bucket: tempfile::TempDir,
    b_dir: tempfile::TempDir,
}

async fn pair() -> Pair {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    let b_dir = tempfile::tempdir().unwrap();
    let b_rt = Arc::new(super::runtime_with_agents());
    let b = second_node_with(&h, b_dir.path(), store.clone(), b_rt.clone()).await;
    Pair {
        h,
        b,
        b_rt,
        store,
        _bucket: bucket,
        b_dir,
    }
}

impl Pair {
    fn b_data(&self) -> std::path::PathBuf {
        self.b_dir.path().join("data")
    }

    /// Nothing of a fetch is left on the second node: no staging, no temporary snapshot
    /// directory, and no snapshot unless `published`.
    fn assert_clean(&self, snap: &str, published: bool) {
        assert_eq!(
            entries(&self.b_data().join("images-tmp")),
            Vec::<String>::new()
        );
        let snaps = entries(&self.b_data().join("snapshots"));
        let expected: Vec<String> = if published {
            vec![snap.to_string()]
        } else {
            vec![]
        };
        assert_eq!(snaps, expected);
    }
}

/// A snapshot is uploaded after it answered (the API shows the upload); a create from it
/// on a node without its files fetches them, publishes them and restores from them, with
/// the memory image (same runtime build). A second create there uses the local copy.
#[tokio::test]
async fn a_snapshot_taken_on_one_node_starts_on_another() {
    let p = pair().await;
    let snap = snapshot_with_file(&p.h).await;
    let first = fork::snapshot_to_api(&snap)
        .image
        .expect("an upload is recorded");
    assert_eq!(first.remote, "uploading");
    let r = snapshot_uploaded(&p.h.node, &snap.id).await;
    assert_eq!(r.state, RemoteState::Stored, "{r:?}");
    assert!(r.memory);
    let row =
        p.h.node
            .store
            .snapshots
            .by_id(&snap.id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(fork::snapshot_to_api(&row).image.unwrap().remote, "stored");
    assert_eq!(
        entries(&p.h.cfg.data_dir.join("images-tmp")),
        Vec::<String>::new(),
        "no staging left on the node that uploaded"
    );

    let child = create_from_snapshot(&p.h, &p.b, &snap.id).await.unwrap();
    assert_eq!(
        (child.status, child.node_id.as_str()),
        (Status::Running, "node-b")
    );
    let notes = p.b.state_dir(&child.id).join("upper/notes.txt");
    assert_eq!(std::fs::read_to_string(notes).unwrap(), "from the snapshot");
    let restored = p.b.runtime.status(&child.runtime_id).await.unwrap();
    assert_eq!(restored, sandpit_runtime::RuntimeStatus::Running);
    assert!(
        fork::snapshot_dir(&p.b, &snap.id)
            .join("memory")
            .join(sandpit_runtime::fake::IMAGE_FILE)
            .is_file(),
        "the memory image came along"
    );
    p.assert_clean(&snap.id, true);

    // Fetched once: the next create uses the copy (the store is not asked again).
    std::fs::remove_dir_all(p.store.root.join(r.reference.as_ref().unwrap())).unwrap();
    create_from_snapshot(&p.h, &p.b, &snap.id).await.unwrap();

    // Deleting it forgets the remote image and removes the deleting node's copy; the
    // other node's copy is never used again (the row is gone).
    fork::delete_snapshot(&p.b, &p.h.workspace, &snap.id)
        .await
        .unwrap();
    assert!(!fork::snapshot_dir(&p.b, &snap.id).exists());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *p.store.forgotten.lock().unwrap(),
        vec![r.reference.clone().unwrap()]
    );
    let e = create_from_snapshot(&p.h, &p.h.node, &snap.id)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::NotFound { code, .. } if *code == "snapshot_not_found"),
        "{e}"
    );
    // Its node's copy goes at its next reconciliation.
    assert!(fork::snapshot_dir(&p.h.node, &snap.id).exists());
    p.h.node.reconcile().await.unwrap();
    assert!(!fork::snapshot_dir(&p.h.node, &snap.id).exists());
}

/// Rows of the workspace's sandboxes, whatever their status.
async fn sandbox_count(h: &Harness) -> usize {
    h.node
        .store
        .sandboxes
        .list(&h.workspace, None)
        .await
        .unwrap()
        .len()
}

/// A fetch that fails (the object is gone from the store, or its content no longer matches
/// its digest) answers 503 `snapshot_fetch_failed`, makes no sandbox row and leaves no
/// file; a snapshot that is not stored answers 503 `snapshot_not_stored`.
#[tokio::test]
async fn a_failed_snapshot_fetch_changes_nothing() {
    let p = pair().await;
    let snap = snapshot_with_file(&p.h).await;
    let r = snapshot_uploaded(&p.h.node, &snap.id).await;
    let stored = p.store.root.join(r.reference.unwrap());
    let before = sandbox_count(&p.h).await;

    // Corrupted: one byte of its files changed in the store.
    let file = stored.join("files/upper/notes.txt");
    std::fs::write(&file, "from somewhere else").unwrap();
    let e = create_from_snapshot(&p.h, &p.b, &snap.id)
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "snapshot_fetch_failed");
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert_eq!(sandbox_count(&p.h).await, before);
    p.assert_clean(&snap.id, false);

    // Missing.
    std::fs::remove_dir_all(&stored).unwrap();
    let e = create_from_snapshot(&p.h, &p.b, &snap.id)
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "snapshot_fetch_failed");
    assert_eq!(sandbox_count(&p.h).await, before);
    p.assert_clean(&snap.id, false);

    // Never uploaded (taken on a node without an image store).
    let h2 = Harness::new().await;
    let snap2 = snapshot_with_file(&h2).await;
    assert!(snap2.remote_image.is_none());
    let b2_dir = tempfile::tempdir().unwrap();
    let b2 = second_node(&h2, b2_dir.path(), images_in(b2_dir.path())).await;
    let e = create_from_snapshot(&h2, &b2, &snap2.id).await.unwrap_err();
    assert_eq!(code_of(&e), "snapshot_not_stored");
    assert!(e.to_string().contains("remote state: none"), "{e}");
}

/// A snapshot deleted while its upload runs: the upload's result is not recorded (the row
/// is gone) and what it pushed is forgotten.
#[tokio::test]
async fn a_delete_overtakes_a_snapshot_upload() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let store = Arc::new(DirImages {
        root: bucket.path().join("bucket"),
        gate: Some(gate.clone()),
        ..Default::default()
    });
    h.node.set_image_store(store.clone());
    let snap = snapshot_with_file(&h).await;
    assert_eq!(
        snapshot_record(&h.node, &snap.id).await.unwrap().state,
        RemoteState::Uploading
    );
    fork::delete_snapshot(&h.node, &h.workspace, &snap.id)
        .await
        .unwrap();
    gate.notify_waiters();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        h.node
            .store
            .snapshots
            .by_id(&snap.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        entries(&h.cfg.data_dir.join("images-tmp")),
        Vec::<String>::new(),
        "the cancelled upload's hard links are gone"
    );
    assert!(!fork::snapshot_dir(&h.node, &snap.id).exists());
}

/// One heartbeat of `node` with what it holds (`membership::local_load`).
async fn beat(node: &Node) {
    let store = &node.store.nodes;
    let epoch = store.get(&node.cfg.node_id).await.unwrap().unwrap().epoch;
    let load = crate::membership::local_load(node).await.unwrap();
    let load = crate::store::NodeLoad {
        free_memory_mib: 1024,
        ..load
    };
    let now = store.now().await.unwrap();
    store
        .heartbeat(&node.cfg.node_id, epoch, &load, now, 60_000)
        .await
        .unwrap();
}

/// Placement of a create from a snapshot: on the node holding it while that node can take
/// it; once it is stored, on any node when the holder cannot (draining), and never on a
/// node that could not fetch it before.
#[tokio::test]
async fn a_stored_snapshot_is_placed_on_any_node_holders_first() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let store = Arc::new(DirImages {
        root: bucket.path().join("bucket"),
        gate: Some(gate.clone()),
        ..Default::default()
    });
    h.node.set_image_store(store.clone());
    super::moves::join(&h.node, 60_000).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), store.clone()).await;
    let snap = snapshot_with_file(&h).await;
    beat(&h.node).await;
    beat(&b).await;
    let place = || crate::membership::place_holding(&h.node.store, &[], Some(&snap.id));
    for _ in 0..20 {
        assert_eq!(
            place().await.unwrap().as_deref(),
            Some("node-t"),
            "its holder"
        );
    }
    let nodes = &h.node.store.nodes;
    assert!(nodes.set_draining("node-t", true).await.unwrap());
    assert_eq!(
        place().await.unwrap(),
        None,
        "uploading: only its holder has it"
    );
    gate.notify_one();
    assert_eq!(
        snapshot_uploaded(&h.node, &snap.id).await.state,
        RemoteState::Stored
    );
    assert_eq!(place().await.unwrap().as_deref(), Some("node-b"));
    assert!(nodes.set_draining("node-t", false).await.unwrap());
    // Both can take it now: the holder is preferred.
    for _ in 0..20 {
        assert_eq!(place().await.unwrap().as_deref(), Some("node-t"));
    }
    assert_eq!(
        crate::membership::place_holding(&h.node.store, &[], Some("snap_none"))
            .await
            .unwrap(),
        None
    );
}

/// A layer id as a build names its layers.
const LAYER: &str = "b0123456789abcdef0123456789abcde";

/// A template of `h`'s workspace built on `h`'s node: one layer of its own (a file and a
/// symlink), stacked on the base root filesystem.
async fn built_template(h: &Harness, name: &str) -> crate::store::TemplateRow {
    use crate::store::{TemplateRow, TemplateStatus};
    let layer = h.cfg.data_dir.join("images/layers").join(LAYER);
    std::fs::create_dir_all(layer.join("etc")).unwrap();
    std::fs::write(layer.join("etc/motd"), "built on node-t\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", layer.join("etc/link")).unwrap();
    let base = h
        .node
        .store
        .templates
        .by_id(crate::node::images::BASE_TEMPLATE_ID)
        .await
        .unwrap()
        .unwrap();
    let t = TemplateRow {
        id: format!("tpl_{name}"),
        name: name.into(),
        workspace_id: Some(h.workspace.clone()),
        source: "dockerfile".into(),
        ..base.clone()
    };
    let s = &h.node.store.templates;
    s.upsert(&t).await.unwrap();
    let layers = serde_json::to_string(&[std::path::PathBuf::from(&base.rootfs), layer]).unwrap();
    s.finish_build(&t.id, TemplateStatus::Ready, &layers, "{}", None, 1)
        .await
        .unwrap();
    s.by_id(&t.id).await.unwrap().unwrap()
}

/// Wait until layer `id` is recorded as stored.
async fn layer_stored(node: &Node, id: &str) -> crate::store::StoredLayer {
    for _ in 0..500 {
        if let Some(l) = node.store.layers.get(id).await.unwrap() {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("layer {id} was not stored");
}

/// A template built on one node starts on another: its layer is uploaded after the build,
/// fetched and published under the other node's own data dir, and the sandbox boots from
/// that copy. A template placed by its layers goes to the node that holds them, or, once
/// they are stored and that node cannot take it, to any node.
#[tokio::test]
async fn a_template_built_on_one_node_starts_on_another() {
    let p = pair().await;
    super::moves::join(&p.h.node, 60_000).await;
    let t = built_template(&p.h, "web").await;
    assert_eq!(crate::node::images::layer_ids(&t).unwrap(), [LAYER]);
    beat(&p.h.node).await;
    beat(&p.b).await;
    let layers = [LAYER.to_string()];
    let place = || crate::membership::place_holding(&p.h.node.store, &layers, None);
    assert_eq!(place().await.unwrap().as_deref(), Some("node-t"));
    assert!(
        p.h.node
            .store
            .nodes
            .set_draining("node-t", true)
            .await
            .unwrap()
    );
    assert_eq!(
        place().await.unwrap(),
        None,
        "not stored: only its holder has it"
    );

    crate::node::stored::upload_layers(&p.h.node, &t);
    let stored = layer_stored(&p.h.node, LAYER).await;
    assert!(
        p.store
            .root
            .join(&stored.reference)
            .join("layer/etc/motd")
            .is_file()
    );
    assert_eq!(place().await.unwrap().as_deref(), Some("node-b"));

    let req = CreateSandboxRequest {
        template: "web".into(),
        mode: SandboxMode::Ephemeral,
        ..Default::default()
    };
    let (row, snapshot, volumes) = lifecycle::prepare_create(&p.b, &p.h.workspace, &req)
        .await
        .unwrap();
    let lock = tokio::sync::Mutex::new(());
    let child = lifecycle::create(&p.b, row, snapshot, volumes, &unreserved(&lock))
        .await
        .unwrap();
    assert_eq!(child.node_id, "node-b");
    let local = p.b_data().join("images/layers").join(LAYER);
    assert_eq!(
        std::fs::read_to_string(local.join("etc/motd")).unwrap(),
        "built on node-t\n"
    );
    let spec = p.b_rt.spec_of(&child.runtime_id).unwrap();
    assert!(spec.layers.contains(&local), "{:?}", spec.layers);
    assert!(
        spec.layers
            .iter()
            .all(|l| !l.starts_with(&p.h.cfg.data_dir)),
        "nothing of the other node's data dir: {:?}",
        spec.layers
    );
    assert_eq!(
        entries(&p.b_data().join("images/tmp")),
        Vec::<String>::new()
    );
    assert_eq!(
        entries(&p.b_data().join("images-tmp")),
        Vec::<String>::new()
    );
    // Uploading again finds it stored (one record per layer id).
    crate::node::stored::upload_layers(&p.h.node, &t);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.store.next.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A layer fetch that fails (corrupted or missing object) answers 503
/// `layer_fetch_failed`, makes no row and leaves nothing; a layer that was never uploaded
/// answers 503 `layer_not_stored`.
#[tokio::test]
async fn a_failed_layer_fetch_changes_nothing() {
    let p = pair().await;
    let t = built_template(&p.h, "web").await;
    let create_on_b = || async {
        let req = CreateSandboxRequest {
            template: t.name.clone(),
            mode: SandboxMode::Ephemeral,
            ..Default::default()
        };
        let (row, snapshot, volumes) =
            lifecycle::prepare_create(&p.b, &p.h.workspace, &req).await?;
        let lock = tokio::sync::Mutex::new(());
        lifecycle::create(&p.b, row, snapshot, volumes, &unreserved(&lock)).await
    };
    let e = create_on_b().await.unwrap_err();
    assert_eq!(code_of(&e), "layer_not_stored");

    crate::node::stored::upload_layers(&p.h.node, &t);
    let stored = layer_stored(&p.h.node, LAYER).await;
    let before = sandbox_count(&p.h).await;
    let obj = p.store.root.join(&stored.reference);
    std::fs::write(obj.join("layer/etc/motd"), "tampered\n").unwrap();
    let e = create_on_b().await.unwrap_err();
    assert_eq!(code_of(&e), "layer_fetch_failed");
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    std::fs::remove_dir_all(&obj).unwrap();
    let e = create_on_b().await.unwrap_err();
    assert_eq!(code_of(&e), "layer_fetch_failed");
    assert_eq!(sandbox_count(&p.h).await, before);
    assert!(!p.b_data().join("images/layers").join(LAYER).exists());
    assert_eq!(
        entries(&p.b_data().join("images/tmp")),
        Vec::<String>::new()
    );
    assert_eq!(
        entries(&p.b_data().join("images-tmp")),
        Vec::<String>::new()
    );
}
