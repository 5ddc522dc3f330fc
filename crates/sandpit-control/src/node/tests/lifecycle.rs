//! Create, suspend, wake, fork, destroy and reconciliation over the fakes, with their
//! failure paths. Assertions are on the store, the calls the fakes recorded and what they
//! hold afterwards.

use crate::Status;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sandpit_api_types::SandboxMode;
use sandpit_net::SandboxNetwork;
use sandpit_net::fake::{FakeNetwork, NetOp};
use sandpit_runtime::fake::{FakeOp, FakeRuntime};
use sandpit_runtime::{Runtime, RuntimeStatus};

use super::{Harness, runtime_with_agents};
use crate::node::lifecycle;

/// The slot a row holds (it must hold one).
fn slot(row: &crate::store::Sandbox) -> u32 {
    row.slot.expect("holds a slot") as u32
}

async fn agent_answers(h: &Harness, id: &str) -> bool {
    let row = h.row(id).await;
    match crate::node::boot::agent_of(&h.node, &row) {
        Some(agent) => agent.ping().await.is_ok(),
        None => false,
    }
}

#[tokio::test]
async fn create_boots_attaches_and_writes_resolv_conf() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Ephemeral).await.unwrap();
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.slot, Some(0), "the lowest free slot");
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start"]);
    assert_eq!(h.rt.status_of(&row.runtime_id), RuntimeStatus::Running);
    let spec = h.rt.spec_of(&row.runtime_id).unwrap();
    assert_eq!(spec.state_dir, h.node.state_dir(&row.id));
    assert_eq!(
        spec.network.unwrap().address,
        h.net.addrs(0).sandbox_ip,
        "the runtime was given the slot's address"
    );
    assert_eq!(h.net.attached(), [0]);
    assert_eq!(h.net.ops_of(0), ["attach"]);
    let resolv = std::fs::read_to_string(spec.state_dir.join("upper/etc/resolv.conf")).unwrap();
    assert_eq!(resolv, h.node.resolv_conf, "written through the agent");
    assert!(agent_answers(&h, &row.id).await);
    // A second sandbox takes the next slot.
    let second = h.create(SandboxMode::Ephemeral).await.unwrap();
    assert_eq!(h.row(&second.id).await.slot, Some(1));
}

/// The namespace goes while the runtime releases the checkpointed sandbox; when it cannot
/// be removed, the suspended sandbox keeps its slot (the image is kept) and the wake reuses
/// that slot.
#[tokio::test]
async fn suspend_whose_namespace_will_not_go_keeps_the_slot() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();
    h.net.fail_next(NetOp::Detach, Some(0));

    let suspended = lifecycle::suspend(&h.node, &row.id).await.unwrap();
    assert_eq!(suspended.status, Status::Suspended);
    assert_eq!(
        suspended.slot,
        Some(0),
        "kept: its namespace is still there"
    );
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint"]);
    assert_eq!(h.rt.status_of(&rid), RuntimeStatus::Missing);
    assert!(h.rt.has_image(&h.node.checkpoint_dir(&row.id)));
    assert_eq!(h.net.ops_of(0), ["attach", "detach"]);
    // A create meanwhile takes another slot.
    let other = h.create(SandboxMode::Ephemeral).await.unwrap();
    assert_eq!(h.row(&other.id).await.slot, Some(1));

    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(woken.slot, Some(0));
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint", "restore"]);
}

#[tokio::test]
async fn suspend_then_wake_restores_from_the_image() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();

    let suspended = lifecycle::suspend(&h.node, &row.id).await.unwrap();
    assert_eq!(suspended.status, Status::Suspended);
    assert_eq!(suspended.slot, None, "a suspended sandbox holds no slot");
    assert_eq!(suspended.error, None);
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint"]);
    assert_eq!(h.rt.status_of(&rid), RuntimeStatus::Missing);
    assert!(h.rt.has_image(&h.node.checkpoint_dir(&row.id)));
    assert!(h.net.attached().is_empty());
    assert_eq!(h.net.ops_of(0), ["attach", "detach"]);
    assert!(h.node.state_dir(&row.id).exists(), "files kept");

    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(woken.slot, Some(0));
    assert_eq!(woken.error, None);
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint", "restore"]);
    assert!(
        !h.node.checkpoint_dir(&row.id).exists(),
        "the image is removed once restored"
    );
    assert_eq!(h.net.attached(), [0]);
    assert!(agent_answers(&h, &row.id).await);
    // Waking a running sandbox does nothing.
    h.wake(&row.id).await.unwrap();
    assert_eq!(h.rt.ops_of(&rid).len(), 3);
}

#[tokio::test]
async fn destroy_releases_runtime_network_and_files() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Ephemeral).await.unwrap();
    lifecycle::destroy(&h.node, &row.id).await.unwrap();
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Destroyed);
    assert_eq!(stored.slot, None);
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start", "destroy"]);
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty());
    assert!(!h.node.state_dir(&row.id).exists());
    assert!(
        h.node
            .store
            .sandboxes
            .used_slots("node-t")
            .await
            .unwrap()
            .is_empty()
    );
    // Idempotent: a second destroy touches nothing.
    lifecycle::destroy(&h.node, &row.id).await.unwrap();
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start", "destroy"]);
}

#[tokio::test]
async fn runtime_start_failure_fails_the_row_and_leaves_nothing() {
    let h = Harness::new().await;
    h.rt.fail_next(FakeOp::Start, None);
    let err = h.create(SandboxMode::Ephemeral).await.unwrap_err();
    assert!(matches!(err, crate::ControlError::Runtime(_)), "{err:?}");
    let rows = h
        .node
        .store
        .sandboxes
        .with_status("node-t", &[Status::Failed])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(
        row.error.as_deref().unwrap().starts_with("could not start"),
        "{:?}",
        row.error
    );
    assert_eq!(row.slot, None, "slot freed");
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start", "stop", "destroy"]);
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty(), "network detached");
    assert_eq!(h.net.ops_of(0), ["attach", "detach", "detach"]);
    assert!(!h.node.state_dir(&row.id).exists());
    // The next create gets the slot back and works.
    let next = h.create(SandboxMode::Ephemeral).await.unwrap();
    assert_eq!(h.row(&next.id).await.slot, Some(0));
}

#[tokio::test]
async fn network_attach_failure_never_starts_the_runtime() {
    let h = Harness::new().await;
    h.net.fail_next(NetOp::Attach, None);
    assert!(h.create(SandboxMode::Ephemeral).await.is_err());
    let rows = h
        .node
        .store
        .sandboxes
        .with_status("node-t", &[Status::Failed])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let ops = h.rt.ops_of(&rows[0].runtime_id);
    assert!(!ops.contains(&"start"), "{ops:?}");
    assert!(h.net.attached().is_empty());
    assert!(
        h.node
            .store
            .sandboxes
            .used_slots("node-t")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn silent_agent_times_out_and_is_torn_down() {
    // The runtime starts, but nothing inside answers.
    let rt = Arc::new(FakeRuntime::new());
    let mut h = Harness::with(rt, Arc::new(FakeNetwork::new(4))).await;
    h.cfg.agent_ready_timeout = Duration::from_millis(200);
    h.restart().await;
    assert!(h.create(SandboxMode::Ephemeral).await.is_err());
    let rows = h
        .node
        .store
        .sandboxes
        .with_status("node-t", &[Status::Failed])
        .await
        .unwrap();
    let row = &rows[0];
    assert!(row.error.as_deref().unwrap().contains("did not answer"));
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start", "stop", "destroy"]);
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty());
}

#[tokio::test]
async fn checkpoint_failure_suspends_without_memory() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();
    h.rt.fail_next(FakeOp::Checkpoint, Some(&rid));
    let suspended = lifecycle::suspend(&h.node, &row.id).await.unwrap();
    assert_eq!(suspended.status, Status::Suspended);
    assert_eq!(suspended.slot, None);
    assert!(
        suspended
            .error
            .as_deref()
            .unwrap()
            .starts_with("memory snapshot failed"),
        "{:?}",
        suspended.error
    );
    // The failed checkpoint killed it; the server stopped what was left.
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint", "stop"]);
    assert!(h.rt.held().is_empty());
    assert!(!h.node.checkpoint_dir(&row.id).exists(), "no image");
    assert!(h.net.attached().is_empty());
    // The wake boots it afresh from its files.
    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(h.rt.ops_of(&rid), ["start", "checkpoint", "stop", "start"]);
    assert!(agent_answers(&h, &row.id).await);
}

#[tokio::test]
async fn restore_failure_falls_back_to_a_boot_from_files() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    // The wake retries a failed restore once, then boots from the files.
    h.rt.fail_next(FakeOp::Restore, Some(&rid));
    h.rt.fail_next(FakeOp::Restore, Some(&rid));
    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert!(
        woken
            .error
            .as_deref()
            .unwrap()
            .contains("memory snapshot could not be restored"),
        "{:?}",
        woken.error
    );
    assert_eq!(
        h.rt.ops_of(&rid),
        [
            "start",
            "checkpoint",
            "restore",
            "stop",
            "restore",
            "stop",
            "start"
        ]
    );
    assert_eq!(h.rt.pending_failures(), 0);
    assert_eq!(h.net.attached(), [slot(&woken)]);
    assert!(!h.node.checkpoint_dir(&row.id).exists());
    assert!(agent_answers(&h, &row.id).await);
}

#[tokio::test]
async fn wake_that_cannot_start_stays_suspended_without_a_slot() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    h.rt.fail_next(FakeOp::Restore, Some(&rid));
    h.rt.fail_next(FakeOp::Restore, Some(&rid));
    h.rt.fail_next(FakeOp::Start, Some(&rid));
    assert!(h.wake(&row.id).await.is_err());
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Suspended);
    assert_eq!(stored.slot, None, "the claimed slot is given back");
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty());
    assert!(h.node.state_dir(&row.id).exists(), "files kept");
}

#[tokio::test]
async fn fork_copies_files_and_restores_parent_and_children() {
    let h = Harness::new().await;
    let parent = h.create(SandboxMode::Ephemeral).await.unwrap();
    let prid = parent.runtime_id.clone();
    let results = h.fork(&parent.id, 2).await.unwrap();
    assert_eq!(results.len(), 2);
    let children: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(child) => child.id.to_string(),
            Err(e) => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(h.rt.ops_of(&prid), ["start", "checkpoint", "restore"]);
    assert_eq!(h.row(&parent.id).await.status, Status::Running);
    let mut slots = HashSet::new();
    slots.insert(slot(&h.row(&parent.id).await));
    for id in &children {
        let row = h.row(id).await;
        assert_eq!(row.status, Status::Running);
        assert_eq!(h.rt.ops_of(&row.runtime_id), ["restore"]);
        assert!(slots.insert(slot(&row)), "each child its own slot");
        // The parent's files travelled (its resolv.conf, written at its create).
        assert!(h.node.state_dir(id).join("upper/etc/resolv.conf").exists());
        assert!(agent_answers(&h, id).await);
    }
    let copies =
        h.rt.calls()
            .iter()
            .filter(|c| c.op() == "copy_files")
            .count();
    assert_eq!(copies, 2);
    assert_eq!(h.net.attached().len(), 3);
    let tmp = std::fs::read_dir(h.cfg.data_dir.join("images-tmp")).unwrap();
    assert_eq!(tmp.count(), 0, "the temporary image is removed");
}

#[tokio::test]
async fn fork_with_a_failed_checkpoint_restarts_the_parent_from_files() {
    let h = Harness::new().await;
    let parent = h.create(SandboxMode::Ephemeral).await.unwrap();
    let prid = parent.runtime_id.clone();
    h.rt.fail_next(FakeOp::Checkpoint, Some(&prid));
    let err = h.fork(&parent.id, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            crate::ControlError::Conflict {
                code: "checkpoint_refused",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(h.rt.ops_of(&prid), ["start", "checkpoint", "stop", "start"]);
    assert_eq!(h.row(&parent.id).await.status, Status::Running);
    assert!(agent_answers(&h, &parent.id).await);
    // No child row was made; only the parent holds a slot.
    assert_eq!(
        h.node
            .store
            .sandboxes
            .used_slots("node-t")
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(h.rt.held(), [prid]);
}

#[tokio::test]
async fn reconcile_adopts_a_running_sandbox() {
    let mut h = Harness::new().await;
    let row = h.create(SandboxMode::Ephemeral).await.unwrap();
    h.rt.clear_calls();
    h.net.clear_calls();
    h.restart().await;
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.slot, Some(0));
    assert_eq!(
        h.rt.ops_of(&row.runtime_id),
        Vec::<&str>::new(),
        "not touched"
    );
    assert_eq!(h.rt.status_of(&row.runtime_id), RuntimeStatus::Running);
    assert_eq!(
        h.net.ops_of(0),
        ["adopt"],
        "its rules learnt, nothing rebuilt"
    );
    assert!(agent_answers(&h, &row.id).await);
    assert!(h.node.state_dir(&row.id).exists());
}

#[tokio::test]
async fn reconcile_fails_a_create_interrupted_after_boot() {
    let mut h = Harness::new().await;
    let row = h.create(SandboxMode::Ephemeral).await.unwrap();
    // The crash came between the boot and the store write that marks it running.
    h.node
        .store
        .sandboxes
        .force_status(&row.id, Status::Creating, None, crate::util::now_ms())
        .await
        .unwrap();
    h.restart().await;
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Failed);
    assert!(stored.error.as_deref().unwrap().contains("being created"));
    assert_eq!(stored.slot, None);
    assert_eq!(h.rt.ops_of(&row.runtime_id), ["start", "destroy"]);
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty());
    assert!(!h.node.state_dir(&row.id).exists());
}

#[tokio::test]
async fn reconcile_after_a_host_reboot_suspends_persistent_and_fails_ephemeral() {
    let mut h = Harness::new().await;
    let persistent = h.create(SandboxMode::Persistent).await.unwrap();
    let ephemeral = h.create(SandboxMode::Ephemeral).await.unwrap();
    // The runtime lost both (and with them their agents); their network slots survived.
    assert!(h.rt.forget(&persistent.runtime_id));
    assert!(h.rt.forget(&ephemeral.runtime_id));
    h.restart().await;

    let p = h.row(&persistent.id).await;
    assert_eq!(p.status, Status::Suspended);
    assert_eq!(p.slot, None);
    assert!(p.error.as_deref().unwrap().contains("memory was lost"));
    assert!(h.node.state_dir(&persistent.id).exists(), "files kept");

    let e = h.row(&ephemeral.id).await;
    assert_eq!(e.status, Status::Failed);
    assert!(!h.node.state_dir(&ephemeral.id).exists());

    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty(), "both slots released");
    // The persistent one boots from its files again.
    let woken = h.wake(&persistent.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(
        h.rt.ops_of(&persistent.runtime_id).last(),
        Some(&"start"),
        "no image: a cold boot"
    );
}

#[tokio::test]
async fn reconcile_removes_what_the_store_does_not_know() {
    let mut h = Harness::new().await;
    let kept = h.create(SandboxMode::Ephemeral).await.unwrap();
    // Left by a crash: a runtime sandbox, a network slot and a directory no row accounts for.
    let mut stray = h.rt.spec_of(&kept.runtime_id).unwrap();
    stray.id = "t-stray".into();
    stray.state_dir = h.node.state_dir("sb_stray");
    if let Some(n) = stray.network.as_mut() {
        n.address = h.net.addrs(3).sandbox_ip;
    }
    h.rt.start(&stray).await.unwrap();
    h.net
        .attach(3, &sandpit_net::EgressRules::default())
        .await
        .unwrap();
    h.rt.clear_calls();
    h.restart().await;
    assert_eq!(h.rt.held(), std::slice::from_ref(&kept.runtime_id));
    let removal =
        h.rt.calls()
            .into_iter()
            .find(|c| c.op() == "remove_orphans")
            .unwrap();
    assert_eq!(
        removal,
        sandpit_runtime::fake::FakeCall::RemoveOrphans {
            keep: vec![kept.runtime_id.clone()]
        }
    );
    assert_eq!(h.net.attached(), [0], "the stray slot is detached");
    assert!(!h.node.state_dir("sb_stray").exists());
    assert!(h.node.state_dir(&kept.id).exists());
    assert_eq!(h.row(&kept.id).await.status, Status::Running);
}

#[tokio::test]
async fn a_sandbox_that_dies_is_settled() {
    let h = Harness::new().await;
    let ephemeral = h.create(SandboxMode::Ephemeral).await.unwrap();
    let persistent = h.create(SandboxMode::Persistent).await.unwrap();
    assert!(
        !lifecycle::settle_if_dead(&h.node, &ephemeral.id).await,
        "alive: nothing to settle"
    );
    assert!(h.rt.kill(&ephemeral.runtime_id));
    assert!(h.rt.kill(&persistent.runtime_id));
    assert!(
        h.rt.dead(std::slice::from_ref(&ephemeral.runtime_id))
            .await
            .unwrap()
            .contains(&ephemeral.runtime_id)
    );
    assert!(lifecycle::settle_if_dead(&h.node, &ephemeral.id).await);
    assert!(lifecycle::settle_if_dead(&h.node, &persistent.id).await);
    let e = h.row(&ephemeral.id).await;
    assert_eq!(e.status, Status::Failed);
    assert_eq!(e.error.as_deref(), Some(lifecycle::STOPPED_REASON));
    let p = h.row(&persistent.id).await;
    assert_eq!(p.status, Status::Suspended);
    assert_eq!(p.slot, None);
    assert!(h.rt.held().is_empty());
    assert!(h.net.attached().is_empty());
}

#[tokio::test]
async fn fakes_keep_apart_in_one_process() {
    // Two servers in one process (as tests in one binary are) get disjoint agent addresses.
    let a = Harness::with(
        Arc::new(runtime_with_agents()),
        Arc::new(FakeNetwork::new(4)),
    )
    .await;
    let b = Harness::with(
        Arc::new(runtime_with_agents()),
        Arc::new(FakeNetwork::new(4)),
    )
    .await;
    assert_ne!(a.net.addrs(0).sandbox_ip, b.net.addrs(0).sandbox_ip);
    let ra = a.create(SandboxMode::Ephemeral).await.unwrap();
    let rb = b.create(SandboxMode::Ephemeral).await.unwrap();
    assert!(agent_answers(&a, &ra.id).await);
    assert!(agent_answers(&b, &rb.id).await);
}

#[tokio::test]
async fn reconcile_after_a_crash_between_checkpoint_and_store_write() {
    let mut h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let image = h.node.checkpoint_dir(&row.id);
    // The server died after the checkpoint (`hibernate.checkpointed`), before the row said
    // suspended: the runtime no longer holds it, its slot is still attached.
    h.rt.checkpoint(&row.runtime_id, &image).await.unwrap();
    h.restart().await;
    let stored = h.row(&row.id).await;
    assert_eq!(stored.status, Status::Suspended);
    assert_eq!(stored.slot, None);
    assert!(h.net.attached().is_empty());
    assert!(h.rt.has_image(&image), "the image is kept");
    // The wake restores it: its memory was not lost after all.
    let woken = h.wake(&row.id).await.unwrap();
    assert_eq!(woken.status, Status::Running);
    assert_eq!(h.rt.ops_of(&row.runtime_id).last(), Some(&"restore"));
    assert!(agent_answers(&h, &row.id).await);
}

/// A draining node takes no new sandboxes (creates and forks: 503 `node_draining`, nothing
/// made) but keeps serving its own: they still suspend and wake.
#[tokio::test]
async fn a_draining_node_refuses_creates_and_forks_but_wakes_its_own() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    h.node.set_draining(true);
    for e in [
        h.create(SandboxMode::Ephemeral).await.unwrap_err(),
        h.fork(&row.id, 1).await.unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                crate::ControlError::Unavailable {
                    code: "node_draining",
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(h.rt.held().len(), 1, "nothing was made");
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    assert_eq!(h.wake(&row.id).await.unwrap().status, Status::Running);
    h.node.set_draining(false);
    h.create(SandboxMode::Ephemeral).await.unwrap();
}

/// A sandbox another node runs (its row in the shared store, on the same slot number as
/// one of ours) is never touched here: restart reconciliation, the reaper's lists, destroy,
/// suspend, wake and the agent all leave it to its node; ours on the same slot number is
/// unharmed.
#[tokio::test]
async fn another_nodes_sandbox_is_left_to_its_node() {
    let mut h = Harness::new().await;
    let mine = h.create(SandboxMode::Persistent).await.unwrap();
    assert_eq!(mine.slot, Some(0));
    let theirs = crate::store::Sandbox {
        id: "sb_elsewhere".into(),
        runtime_id: "t-sb_elsewhere".into(),
        node_id: "node-other".into(),
        remote_image: None,
        expires_at: Some(1),
        ..mine.clone()
    };
    h.node.store.sandboxes.insert(&theirs).await.unwrap();

    // A restart reconciles only its own rows: the other node's running row is not failed
    // for want of a runtime here.
    h.restart().await;
    assert_eq!(h.row("sb_elsewhere").await.status, Status::Running);
    assert_eq!(h.row(&mine.id).await.status, Status::Running);
    assert!(crate::node::boot::agent_of(&h.node, &theirs).is_none());
    assert!(!lifecycle::settle_if_dead(&h.node, "sb_elsewhere").await);
    let refused = |e: crate::ControlError| {
        assert!(
            matches!(
                e,
                crate::ControlError::Unavailable {
                    code: "sandbox_on_another_node",
                    ..
                }
            ),
            "{e}"
        )
    };
    refused(
        lifecycle::destroy(&h.node, "sb_elsewhere")
            .await
            .unwrap_err(),
    );
    refused(
        lifecycle::suspend(&h.node, "sb_elsewhere")
            .await
            .unwrap_err(),
    );
    refused(h.wake("sb_elsewhere").await.unwrap_err());
    assert_eq!(h.row("sb_elsewhere").await.status, Status::Running);
    assert_eq!(
        h.rt.held(),
        vec![mine.runtime_id.clone()],
        "ours is unharmed"
    );
    assert!(agent_answers(&h, &mine.id).await);
    assert!(
        h.node
            .store
            .sandboxes
            .expired("node-t", i64::MAX)
            .await
            .unwrap()
            .is_empty(),
        "the reaper does not see the other node's expired sandbox"
    );
}

/// Sandboxes the fleet settled while this node was lost (failed in the store, still
/// running here) are torn down when the node hears of it, and their slots are free again;
/// sandboxes it still owns keep running.
#[tokio::test]
async fn sandboxes_settled_while_lost_are_torn_down_on_return() {
    let h = Harness::new().await;
    let gone = h.create(SandboxMode::Ephemeral).await.unwrap();
    let kept = h.create(SandboxMode::Ephemeral).await.unwrap();
    // Another node's sweep: the store says failed, the runtime here still runs it.
    h.node
        .store
        .sandboxes
        .force_status(&gone.id, Status::Failed, Some("lost"), 1)
        .await
        .unwrap();
    assert_eq!(h.node.drop_settled().await.unwrap(), 1);
    assert_eq!(h.rt.held(), vec![kept.runtime_id.clone()]);
    assert_eq!(h.row(&gone.id).await.slot, None, "its slot is free again");
    assert_eq!(h.node.drop_settled().await.unwrap(), 0, "idempotent");
    assert!(agent_answers(&h, &kept.id).await);
}

/// A resize changes a running sandbox's limits in place (no restart), a suspended one's at
/// its wake; a refused one changes nothing.
#[tokio::test]
async fn resize_changes_limits_in_place_or_at_wake_and_a_refusal_changes_nothing() {
    let h = Harness::new().await;
    let row = h.create(SandboxMode::Persistent).await.unwrap();
    let rid = row.runtime_id.clone();
    assert_eq!(row.size, "small");

    let resized = lifecycle::resize(&h.node, &h.workspace, &row.id, "large")
        .await
        .unwrap();
    assert_eq!(
        (resized.size.as_str(), resized.status),
        ("large", Status::Running)
    );
    assert_eq!(
        h.rt.ops_of(&rid),
        ["start", "update_resources"],
        "no restart"
    );
    let spec = h.rt.spec_of(&rid).unwrap();
    assert_eq!(
        (spec.resources.cpu_millis, spec.resources.memory_bytes),
        (4000, 4 << 30)
    );
    // The same size again does nothing.
    lifecycle::resize(&h.node, &h.workspace, &row.id, "large")
        .await
        .unwrap();
    assert_eq!(h.rt.ops_of(&rid).len(), 2);

    // Refusals: bad input, and the runtime's (memory in use): nothing changes.
    let e = lifecycle::resize(&h.node, &h.workspace, &row.id, "huge")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            crate::ControlError::Invalid {
                code: "invalid_size",
                ..
            }
        ),
        "{e}"
    );
    h.rt.fail_next(FakeOp::UpdateResources, Some(&rid));
    let e = lifecycle::resize(&h.node, &h.workspace, &row.id, "small")
        .await
        .unwrap_err();
    assert!(matches!(e, crate::ControlError::Runtime(_)), "{e}");
    assert_eq!(h.row(&row.id).await.size, "large");
    // Suspended: recorded now, applied when it wakes.
    lifecycle::suspend(&h.node, &row.id).await.unwrap();
    let resized = lifecycle::resize(&h.node, &h.workspace, &row.id, "medium")
        .await
        .unwrap();
    assert_eq!(
        (resized.size.as_str(), resized.status),
        ("medium", Status::Suspended)
    );
    let updates = |h: &Harness| {
        h.rt.ops_of(&rid)
            .iter()
            .filter(|o| **o == "update_resources")
            .count()
    };
    assert_eq!(
        updates(&h),
        2,
        "the first and the refused one; none while suspended"
    );
    h.wake(&row.id).await.unwrap();
    let spec = h.rt.spec_of(&rid).unwrap();
    assert_eq!(
        (spec.resources.cpu_millis, spec.resources.memory_bytes),
        (2000, 2 << 30)
    );

    // A sandbox that will not run again cannot be resized.
    lifecycle::destroy(&h.node, &row.id).await.unwrap();
    let e = lifecycle::resize(&h.node, &h.workspace, &row.id, "small")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            crate::ControlError::Conflict {
                code: "invalid_state",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_boot_snapshot_records_the_resolv_conf_it_holds() {
    use crate::node::templates::{BOOT_SNAPSHOT_RESOLV, boot_snapshot_resolv_current};
    let h = Harness::new().await;
    let dir = tempfile::tempdir().unwrap();
    // Taken before the record existed: not current, so a create writes the file.
    assert!(!boot_snapshot_resolv_current(&h.node, dir.path()));
    let record = dir.path().join(BOOT_SNAPSHOT_RESOLV);
    std::fs::write(&record, &h.node.resolv_conf).unwrap();
    assert!(boot_snapshot_resolv_current(&h.node, dir.path()));
    // The node's resolvers changed since (another --dns), or the record grew: rewrite.
    std::fs::write(&record, "nameserver 192.0.2.1\n").unwrap();
    assert!(!boot_snapshot_resolv_current(&h.node, dir.path()));
    std::fs::write(&record, format!("{}# more\n", h.node.resolv_conf)).unwrap();
    assert!(!boot_snapshot_resolv_current(&h.node, dir.path()));
}
