//! What the edge adds in front of the node: the running quota answered early (before the
//! creation rate is spent), and the room it held handed back once the store counts a row.

use sandpit_api_types::SandboxMode;

use super::Harness;

#[tokio::test]
async fn the_running_quota_is_answered_early_and_its_room_handed_back() {
    let h = Harness::new(|cfg| cfg.limits.max_running = 2).await;
    let first = h.create(SandboxMode::Ephemeral).await.unwrap();
    let second = h.create(SandboxMode::Ephemeral).await.unwrap();
    let refused = h.create(SandboxMode::Ephemeral).await.unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    // A fork of two children does not fit either, and makes nothing.
    let sb = h.authorized(h.row(&first.id).await);
    let refused = crate::fork::fork(&h.server, &sb, 1).await.unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    assert_eq!(h.rt.held().len(), 2);
    // Room comes back with a destroy: nothing stays reserved for the creates that were
    // counted, or for the ones refused.
    crate::lifecycle::destroy(&h.server, &second.id)
        .await
        .unwrap();
    let third = h.create(SandboxMode::Ephemeral).await.unwrap();
    crate::lifecycle::suspend(&h.server, &third.id)
        .await
        .unwrap();
    // A wake counts like a create: room for it now, none once another create took it.
    crate::lifecycle::wake(&h.server, &third.id).await.unwrap();
    crate::lifecycle::suspend(&h.server, &third.id)
        .await
        .unwrap();
    h.create(SandboxMode::Ephemeral).await.unwrap();
    let refused = crate::lifecycle::wake(&h.server, &third.id)
        .await
        .unwrap_err();
    assert_eq!(refused.code, "running_quota_exceeded");
    assert_eq!(
        h.row(&third.id).await.status,
        sandpit_control::Status::Suspended
    );
}
