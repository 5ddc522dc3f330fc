//! Hibernated sandboxes through an image store (`node::moves`): the background upload and
//! what overtakes it, and the take-over by another node over the same store when the owner
//! is lost or draining. Two nodes share one SQLite store and one directory-backed image
//! store; each has its own data dir, runtime and network fakes.
#![allow(
    clippy::disallowed_methods,
    reason = "test fixtures written and read by path in temporary dirs"
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sandpit_api_types::SandboxMode;
use sandpit_net::fake::FakeNetwork;

use super::{Harness, RESOLV_CONF, runtime_with_agents, unreserved};
use crate::node::{Node, images, lifecycle, moves};
use crate::remote::{BoxError, ImageKind, ImageStore, Pushed, RemoteImage, RemoteState};
use crate::store::NodeInfo;
use crate::{ControlError, Status, Stored};

/// An image store in a directory: each push copies the tree to `img-N` and keeps its kind
/// and a digest of its content, which a pull checks (as `sandpit-objects` checks every
/// chunk), so a test can corrupt or remove what is stored.
#[derive(Default)]
pub(super) struct DirImages {
    pub root: PathBuf,
    pub next: AtomicU64,
    pub forgotten: Mutex<Vec<String>>,
    /// When set, a push waits for it (so a test can overtake an upload).
    pub gate: Option<Arc<tokio::sync::Notify>>,
    /// Kind and content digest of each pushed image.
    pub pushed: Mutex<std::collections::HashMap<String, (ImageKind, String)>>,
}

/// A digest of a tree's names, kinds and contents.
fn digest_tree(dir: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    fn walk(dir: &Path, rel: &str, h: &mut Sha256) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = format!("{rel}/{}", e.file_name().to_string_lossy());
            h.update(name.as_bytes());
            if e.file_type()?.is_dir() {
                h.update(b"d");
                walk(&e.path(), &name, h)?;
            } else {
                h.update(b"f");
                h.update(std::fs::read(e.path())?);
            }
        }
        Ok(())
    }
    let mut h = Sha256::new();
    walk(dir, "", &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            bytes += copy_tree(&src, &dst)?;
        } else {
            bytes += std::fs::copy(&src, &dst)?;
        }
    }
    Ok(bytes)
}

#[async_trait]
impl ImageStore for DirImages {
    async fn push(&self, dir: &Path, kind: ImageKind) -> Result<Pushed, BoxError> {
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        let reference = format!("img-{}", self.next.fetch_add(1, Ordering::SeqCst));
        let bytes = copy_tree(dir, &self.root.join(&reference))?;
        let digest = digest_tree(dir)?;
        self.pushed
            .lock()
            .unwrap()
            .insert(reference.clone(), (kind, digest));
        Ok(Pushed {
            reference,
            bytes,
            uploaded: bytes,
        })
    }

    async fn pull(&self, reference: &str, dest: &Path, kind: ImageKind) -> Result<u64, BoxError> {
        let src = self.root.join(reference);
        if !src.is_dir() {
            return Err(format!("no image {reference}").into());
        }
        let Some((pushed_kind, digest)) = self.pushed.lock().unwrap().get(reference).cloned()
        else {
            return Err(format!("no manifest for {reference}").into());
        };
        if pushed_kind != kind {
            return Err(format!("image {reference} is a {pushed_kind:?}, not a {kind:?}").into());
        }
        if digest_tree(&src)? != digest {
            return Err(format!("image {reference}: digest mismatch").into());
        }
        Ok(copy_tree(&src, dest)?)
    }

    async fn push_layer(&self, layer: &Path, staging: &Path) -> Result<Pushed, BoxError> {
        copy_tree(layer, &staging.join("layer"))?;
        self.push(staging, ImageKind::Layer).await
    }

    async fn pull_layer(
        &self,
        reference: &str,
        dest: &Path,
        staging: &Path,
    ) -> Result<u64, BoxError> {
        let bytes = self.pull(reference, staging, ImageKind::Layer).await?;
        std::fs::rename(staging.join("layer"), dest)?;
        Ok(bytes)
    }

    async fn forget(&self, reference: &str) -> Result<(), BoxError> {
        self.forgotten.lock().unwrap().push(reference.into());
        Ok(())
    }
}

pub(super) fn images_in(dir: &Path) -> Arc<DirImages> {
    Arc::new(DirImages {
        root: dir.join("bucket"),
        ..Default::default()
    })
}

/// Register `node` in the fleet with a lease of `lease_ms` from the database's now.
pub(super) async fn join(node: &Node, lease_ms: i64) {
    let now = node.store.nodes.now().await.unwrap();
    node.store
        .nodes
        .register(
            &NodeInfo {
                id: node.cfg.node_id.clone(),
                address: "http://127.0.0.1:1".into(),
                runsc_build: node.runtime.build(),
                memory_mib: 1024,
                slots: 4,
            },
            now,
            lease_ms,
        )
        .await
        .unwrap();
}

/// Its lease lapses: the sweep marks it lost.
pub(super) async fn lose(node: &Node) {
    let now = node.store.nodes.now().await.unwrap();
    node.store.nodes.expire(now + 3_600_000).await.unwrap();
}

/// A second node over `h`'s store, with its own data dir, prefix and fakes.
pub(super) async fn second_node(h: &Harness, dir: &Path, images: Arc<DirImages>) -> Arc<Node> {
    second_node_with(h, dir, images, Arc::new(runtime_with_agents())).await
}

/// [`second_node`] over the runtime `rt`.
pub(super) async fn second_node_with(
    h: &Harness,
    dir: &Path,
    images: Arc<DirImages>,
    rt: Arc<sandpit_runtime::fake::FakeRuntime>,
) -> Arc<Node> {
    let agent_bin = crate::testing::prepare_data_dir(dir);
    let mut cfg = super::config(dir);
    cfg.node_id = "node-b".into();
    cfg.prefix = "b".into();
    crate::node::make_data_dirs(&cfg.data_dir).unwrap();
    let agent_layer = images::install_agent_layer(&cfg.data_dir, &agent_bin).unwrap();
    let node = Node::new(
        cfg,
        h.node.store.clone(),
        rt,
        Arc::new(FakeNetwork::new(4)),
        agent_layer,
        RESOLV_CONF.into(),
    );
    images::ensure_base(&node).await.unwrap();
    node.set_image_store(images);
    join(&node, 60_000).await;
    node
}

pub(super) async fn record(node: &Node, id: &str) -> Option<RemoteImage> {
    let row = node.store.sandboxes.get(id).await.unwrap().unwrap();
    row.remote_image
        .map(|r| r.decode(|| "remote image".into()).unwrap())
}

/// Wait for the upload of `id` to end; its final record.
pub(super) async fn uploaded(node: &Node, id: &str) -> RemoteImage {
    for _ in 0..500 {
        if let Some(r) = record(node, id).await
            && r.state != RemoteState::Uploading
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upload of {id} did not end");
}

/// A persistent sandbox with a file in its writable layer, suspended.
async fn suspended_with_file(h: &Harness) -> crate::store::Sandbox {
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let upper = h.node.state_dir(&row.id).join("upper");
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::write(upper.join("notes.txt"), "kept across nodes").unwrap();
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    row
}

/// Wake `id` through `node`, with no room held in front of the store.
pub(super) async fn wake_on(
    node: &Arc<Node>,
    id: &str,
) -> Result<crate::store::Sandbox, ControlError> {
    let lock = tokio::sync::Mutex::new(());
    lifecycle::wake(node, id, &unreserved(&lock)).await
}

pub(super) fn code_of(e: &ControlError) -> &'static str {
    match e {
        ControlError::Unavailable { code, .. } | ControlError::Conflict { code, .. } => code,
        other => panic!("unexpected error {other}"),
    }
}

/// A suspend uploads in the background and records the image (shown by the API); the
/// wake keeps it as the sandbox's latest image (not shown while it runs), and the next
/// suspend's upload replaces it and forgets it.
#[tokio::test]
async fn a_suspend_uploads_and_the_next_one_replaces_the_image() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    let row = suspended_with_file(&h).await;
    let r = uploaded(&h.node, &row.id).await;
    assert_eq!(r.state, RemoteState::Stored, "{r:?}");
    assert!(r.memory, "the memory image went too");
    assert_eq!(r.runtime, "fake");
    let reference = r.reference.clone().unwrap();
    let pushed = bucket.path().join("bucket").join(&reference);
    assert!(
        pushed
            .join("memory")
            .join(sandpit_runtime::fake::IMAGE_FILE)
            .is_file()
    );
    assert!(pushed.join("files/upper/notes.txt").is_file());
    let api = crate::node::boot::to_api(&h.row(&row.id).await);
    assert_eq!(api.image.unwrap().remote, "stored");
    // No staging is left behind.
    let tmp = h.cfg.data_dir.join("images-tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);

    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(
        record(&h.node, &row.id).await.and_then(|r| r.reference),
        Some(reference.clone()),
        "kept as the latest image"
    );
    assert!(crate::node::boot::to_api(&woken).image.is_none());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(store.forgotten.lock().unwrap().is_empty());

    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    let next = uploaded(&h.node, &row.id).await;
    assert_ne!(next.reference.as_deref(), Some(reference.as_str()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*store.forgotten.lock().unwrap(), vec![reference]);
    // A destroy forgets the one it holds.
    lifecycle::destroy(&h.node, &row.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.forgotten.lock().unwrap().len(), 2);
}

/// A node lost while its sandbox runs: a sandbox with a stored hibernation image is
/// suspended by the sweep (no owner, no slot) and wakes on another node from that image,
/// its memory image included; one without an image fails. When the lost node answers
/// again, it tears down its copy and the slot.
#[tokio::test]
async fn a_lost_nodes_running_sandbox_wakes_elsewhere_from_its_last_image() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    join(&h.node, 60_000).await;
    let row = suspended_with_file(&h).await;
    let image = uploaded(&h.node, &row.id).await;
    h.wake(&row.id).await.unwrap();
    let a_runtime_id = row.runtime_id.clone();
    let without = h.create(SandboxMode::Persistent).await.unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), store.clone()).await;

    lose(&h.node).await;
    crate::membership::sweep(&h.node.store).await.unwrap();
    let settled = h.row(&row.id).await;
    assert_eq!(
        (settled.status, settled.node_id.as_str(), settled.slot),
        (Status::Suspended, crate::store::LOST_OWNER, None)
    );
    assert_eq!(
        settled.error.as_deref(),
        Some(crate::membership::NODE_LOST_RESTORABLE)
    );
    assert_eq!(h.row(&without.id).await.status, Status::Failed);

    let woken = wake_on(&b, &row.id).await.unwrap();
    assert_eq!(
        (woken.status, woken.node_id.as_str()),
        (Status::Running, "node-b")
    );
    let b_runtime_id = woken.runtime_id.clone();
    let b_state = b.state_dir(&row.id);
    assert_eq!(
        std::fs::read_to_string(b_state.join("upper/notes.txt")).unwrap(),
        "kept across nodes"
    );
    assert_eq!(woken.error, None, "restored with its memory: no note");
    assert_eq!(
        record(&b, &row.id).await.and_then(|r| r.reference),
        image.reference,
        "the image it came from stays its latest"
    );

    // A answers again: fenced, it tears down what still runs of the sandbox, and the slot.
    assert_eq!(
        h.rt.status_of(&a_runtime_id),
        sandpit_runtime::RuntimeStatus::Running,
        "still running on the lost node"
    );
    h.node.drop_settled().await.unwrap();
    assert_eq!(
        h.rt.status_of(&a_runtime_id),
        sandpit_runtime::RuntimeStatus::Missing
    );
    assert!(h.net.attached().is_empty(), "{:?}", h.net.attached());
    assert!(!h.node.state_dir(&row.id).exists());
    assert_ne!(a_runtime_id, b_runtime_id);
    assert_eq!(h.row(&row.id).await.node_id, "node-b");
}

/// A wake right after a suspend cancels the upload still under way; its result is never
/// recorded, and the next suspend uploads afresh.
#[tokio::test]
async fn a_wake_overtakes_an_upload() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let store = Arc::new(DirImages {
        root: bucket.path().join("bucket"),
        gate: Some(gate.clone()),
        ..Default::default()
    });
    h.node.set_image_store(store.clone());
    let row = suspended_with_file(&h).await;
    assert_eq!(
        record(&h.node, &row.id).await.unwrap().state,
        RemoteState::Uploading
    );
    h.wake(&row.id).await.unwrap();
    gate.notify_waiters();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(record(&h.node, &row.id).await.is_none());
    assert_eq!(store.next.load(Ordering::SeqCst), 0, "nothing was pushed");
    let tmp = h.cfg.data_dir.join("images-tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the cancelled upload's hard links are gone"
    );

    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    gate.notify_one();
    assert_eq!(uploaded(&h.node, &row.id).await.state, RemoteState::Stored);
}

/// The take-over: while its node is live, another node leaves the sandbox alone; once that
/// node is lost, the other fetches the image and wakes it with its memory image and files,
/// under its own runtime id and a slot of its own. Only one node owns it afterwards.
#[tokio::test]
async fn a_lost_nodes_sandbox_wakes_on_another_node() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    join(&h.node, 60_000).await;
    let row = suspended_with_file(&h).await;
    assert_eq!(uploaded(&h.node, &row.id).await.state, RemoteState::Stored);
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), store.clone()).await;

    let e = wake_on(&b, &row.id).await.unwrap_err();
    assert_eq!(code_of(&e), "sandbox_on_another_node");
    assert_eq!(h.row(&row.id).await.node_id, "node-t");

    lose(&h.node).await;
    let woken = wake_on(&b, &row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(woken.node_id, "node-b");
    assert_eq!(woken.runtime_id, format!("b-{}", row.id));
    assert!(woken.slot.is_some());
    let notes = b.state_dir(&row.id).join("upper/notes.txt");
    assert_eq!(std::fs::read_to_string(notes).unwrap(), "kept across nodes");
    assert!(woken.error.is_none(), "memory kept: {:?}", woken.error);
    assert_eq!(
        record(&b, &row.id).await.map(|r| r.state),
        Some(RemoteState::Stored),
        "kept at the wake as its latest image"
    );
    // The old node no longer acts on it.
    let e = wake_on(&h.node, &row.id).await.unwrap_err();
    assert_eq!(code_of(&e), "sandbox_on_another_node");
    assert!(
        b_dir
            .path()
            .join("data/images-tmp")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "the fetched image was moved into place or removed"
    );
}

/// A memory image written under another runtime build is not restored: the sandbox boots
/// from its files, and its note says its processes were lost.
#[tokio::test]
async fn another_runtime_build_wakes_from_files() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    let row = suspended_with_file(&h).await;
    let mut r = uploaded(&h.node, &row.id).await;
    let old = Stored::encode(&r);
    r.runtime = "runsc version 0.0~19990101".into();
    assert!(
        h.node
            .store
            .sandboxes
            .set_remote_image(
                &row.id,
                "node-t",
                Some(old.raw()),
                Some(Stored::encode(&r).raw()),
                1
            )
            .await
            .unwrap()
    );
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), store).await;
    // node-t never joined the fleet: an owner the fleet does not know is gone.
    let woken = wake_on(&b, &row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    let note = woken.error.unwrap_or_default();
    assert!(note.contains("processes were lost"), "{note}");
    let b_rt_ops = b.runtime.status(&woken.runtime_id).await.unwrap();
    assert_eq!(b_rt_ops, sandpit_runtime::RuntimeStatus::Running);
}

/// Without an image in object storage nothing moves: 503 `image_not_stored`, the row and
/// the owner unchanged. A destroy, though, settles it from any node.
#[tokio::test]
async fn without_a_stored_image_a_lost_nodes_sandbox_stays_but_can_be_destroyed() {
    let h = Harness::new().await;
    let row = suspended_with_file(&h).await;
    assert!(
        record(&h.node, &row.id).await.is_none(),
        "no image store here"
    );
    let bucket = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), images_in(bucket.path())).await;
    let e = wake_on(&b, &row.id).await.unwrap_err();
    assert_eq!(code_of(&e), "image_not_stored");
    let after = h.row(&row.id).await;
    assert_eq!(
        (after.status, after.node_id.as_str()),
        (Status::Suspended, "node-t")
    );
    assert!(!b.state_dir(&row.id).exists());

    lifecycle::destroy(&b, &row.id).await.unwrap();
    assert_eq!(h.row(&row.id).await.status, Status::Destroyed);
}

/// The store's move is conditional on the owner: of two nodes, one takes the sandbox.
#[tokio::test]
async fn only_one_node_takes_a_sandbox_over() {
    let h = Harness::new().await;
    let row = suspended_with_file(&h).await;
    let s = &h.node.store.sandboxes;
    assert!(
        s.move_to(&row.id, "node-t", "node-b", "b-x", 1)
            .await
            .unwrap()
    );
    assert!(
        !s.move_to(&row.id, "node-t", "node-c", "c-x", 1)
            .await
            .unwrap()
    );
    assert_eq!(h.row(&row.id).await.node_id, "node-b");
}

/// A drain hibernates every running sandbox of the node (their uploads start).
#[tokio::test]
async fn a_drain_hibernates_the_running_sandboxes() {
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    h.node.set_image_store(images_in(bucket.path()));
    let a = h.create(SandboxMode::Persistent).await.unwrap();
    let b = h.create(SandboxMode::Ephemeral).await.unwrap();
    assert!(h.node.set_draining(true), "the drain starts");
    assert!(!h.node.set_draining(true), "and only once");
    let done = crate::node::drain::hibernate_all(&h.node).await;
    assert_eq!(done.len(), 2);
    for id in [&a.id, &b.id] {
        assert_eq!(h.row(id).await.status, Status::Suspended);
        let r = moves::wait_stored(&h.node, id, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(r.is_some(), "{id} stored");
    }
}

/// A draining owner keeps a hibernated sandbox whose image is not stored (another node
/// leaves it alone: the owner still wakes it), and gives it up once the image is stored.
#[tokio::test]
async fn a_draining_owner_keeps_what_cannot_move() {
    let h = Harness::new().await;
    join(&h.node, 60_000).await;
    let row = suspended_with_file(&h).await;
    let bucket = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    let b = second_node(&h, b_dir.path(), store.clone()).await;
    assert!(
        h.node
            .store
            .nodes
            .set_draining("node-t", true)
            .await
            .unwrap()
    );
    let e = wake_on(&b, &row.id).await.unwrap_err();
    assert_eq!(code_of(&e), "sandbox_on_another_node");
    assert!(
        !moves::answers_here(&b, &h.row(&row.id).await)
            .await
            .unwrap()
    );

    // Woken and hibernated again with an image store: now it moves.
    h.node.set_image_store(store);
    h.wake(&row.id).await.unwrap();
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    assert_eq!(uploaded(&h.node, &row.id).await.state, RemoteState::Stored);
    assert!(
        moves::answers_here(&b, &h.row(&row.id).await)
            .await
            .unwrap()
    );
    let woken = wake_on(&b, &row.id).await.unwrap();
    assert_eq!(woken.node_id, "node-b");
}

/// The node's drain flag trails the fleet's status by up to a heartbeat; an undrain counts
/// at once (placement may already send sandboxes here), a drain still refuses.
#[tokio::test]
async fn an_undrain_counts_before_the_next_heartbeat() {
    let h = Harness::new().await;
    join(&h.node, 60_000).await;
    assert!(
        h.node
            .store
            .nodes
            .set_draining("node-t", true)
            .await
            .unwrap()
    );
    h.node.set_draining(true);
    let e = h.create(SandboxMode::Ephemeral).await.unwrap_err();
    assert_eq!(code_of(&e), "node_draining");
    assert!(
        h.node
            .store
            .nodes
            .set_draining("node-t", false)
            .await
            .unwrap()
    );
    assert!(h.node.is_draining(), "no heartbeat yet");
    h.create(SandboxMode::Ephemeral).await.unwrap();
    assert!(!h.node.is_draining());
}

/// A drain sends the volumes no sandbox mounts to object storage (one a sandbox mounts
/// stays); a create on another node that mounts a moved volume fetches it and takes it.
#[tokio::test]
async fn a_drain_moves_free_volumes_and_another_node_takes_them() {
    use sandpit_api_types::{CreateSandboxRequest, CreateVolumeRequest, VolumeMountRequest};
    let h = Harness::new().await;
    let bucket = tempfile::tempdir().unwrap();
    let store = images_in(bucket.path());
    h.node.set_image_store(store.clone());
    join(&h.node, 60_000).await;
    let volume = |name: &str| CreateVolumeRequest {
        name: name.into(),
        size: Some("64M".into()),
    };
    let free = crate::node::volumes::create(&h.node, &h.workspace, &volume("free"))
        .await
        .unwrap();
    let used = crate::node::volumes::create(&h.node, &h.workspace, &volume("used"))
        .await
        .unwrap();
    let mounting = |name: &str| CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        volumes: vec![VolumeMountRequest {
            name: name.into(),
            path: "/data".into(),
            read_only: false,
        }],
        ..Default::default()
    };
    h.create_with(&mounting("used")).await.unwrap();

    assert_eq!(crate::node::volumes::move_all(&h.node).await, 1);
    let moved = h.node.store.volumes.by_id(&free.id).await.unwrap().unwrap();
    assert_eq!(moved.node_id, crate::store::STORED_VOLUME);
    assert!(moved.remote_image.is_some());
    assert!(!h.node.volume_dir(&free.id).exists(), "the local copy went");
    let stayed = h.node.store.volumes.by_id(&used.id).await.unwrap().unwrap();
    assert_eq!(stayed.node_id, h.node.cfg.node_id);

    let b_dir = tempfile::tempdir().unwrap();
    let b = second_node(&h, b_dir.path(), store.clone()).await;
    let (row, snapshot, mounts) = lifecycle::prepare_create(&b, &h.workspace, &mounting("free"))
        .await
        .unwrap();
    let lock = tokio::sync::Mutex::new(());
    let sb = lifecycle::create(&b, row, snapshot, mounts, &unreserved(&lock))
        .await
        .unwrap();
    assert_eq!(sb.node_id, "node-b");
    let taken = b.store.volumes.by_id(&free.id).await.unwrap().unwrap();
    assert_eq!(
        (taken.node_id.as_str(), taken.remote_image),
        ("node-b", None)
    );
    assert!(
        b.volume_dir(&free.id)
            .join(sandpit_runtime::fake::VOLUME_FILE)
            .is_file()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store.forgotten.lock().unwrap().len(),
        1,
        "its stored image went"
    );
    // The one still mounted on A cannot be mounted on B: it did not move.
    let e = lifecycle::prepare_create(&b, &h.workspace, &mounting("used"))
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), "volume_on_another_node");
}
