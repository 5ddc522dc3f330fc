//! Deleting images and collecting the blobs no image needs.

use std::time::Duration;

use anyhow::{Result, ensure};
use sandpit_objects::{
    ImageKind, Limits, ObjectsError, Progress, delete_manifest, gc, has, pull_dir, push_dir,
};

use crate::{Backend, put_file};

crate::on_both_backends!(
    gc_removes_only_unreferenced_blobs,
    gc_deletes_nothing_when_a_manifest_is_corrupt,
);

async fn gc_removes_only_unreferenced_blobs(b: &Backend) -> Result<()> {
    let limits = Limits::default();
    let (one, two) = (b.path("one"), b.path("two"));
    put_file(&one, "only-one", b"only in one", 0o600)?;
    put_file(&one, "shared", b"in both", 0o600)?;
    put_file(&two, "shared", b"in both", 0o600)?;
    put_file(&two, "only-two", b"only in two", 0o600)?;
    let a = push_dir(
        &b.store,
        &one,
        ImageKind::Snapshot,
        &limits,
        &Progress::new(),
    )
    .await?;
    let c = push_dir(
        &b.store,
        &two,
        ImageKind::Snapshot,
        &limits,
        &Progress::new(),
    )
    .await?;

    // Nothing unreferenced yet.
    let report = gc(&b.store, Duration::ZERO, &limits).await?;
    ensure!(
        report.manifests == 2 && report.blobs_kept == 3 && report.blobs_deleted == 0,
        "{report:?}"
    );

    delete_manifest(&b.store, a).await?;
    delete_manifest(&b.store, a).await?; // idempotent
    ensure!(!has(&b.store, a).await? && has(&b.store, c).await?);

    // A long grace period keeps the fresh orphan.
    let report = gc(&b.store, Duration::from_secs(3600), &limits).await?;
    ensure!(
        report.blobs_young == 1 && report.blobs_deleted == 0,
        "{report:?}"
    );

    let report = gc(&b.store, Duration::ZERO, &limits).await?;
    ensure!(
        report.manifests == 1
            && report.blobs_kept == 2
            && report.blobs_deleted == 1
            && report.bytes_deleted == "only in one".len() as u64,
        "{report:?}"
    );
    let again = gc(&b.store, Duration::ZERO, &limits).await?;
    ensure!(again.blobs_deleted == 0, "{again:?}");

    // The surviving image is whole.
    pull_dir(&b.store, c, &b.path("pulled"), &limits, &Progress::new()).await?;
    ensure!(std::fs::read(b.path("pulled/shared"))? == b"in both");
    ensure!(std::fs::read(b.path("pulled/only-two"))? == b"only in two");
    Ok(())
}

async fn gc_deletes_nothing_when_a_manifest_is_corrupt(b: &Backend) -> Result<()> {
    let limits = Limits::default();
    let one = b.path("one");
    put_file(&one, "f", b"orphan soon", 0o600)?;
    let a = push_dir(&b.store, &one, ImageKind::Layer, &limits, &Progress::new()).await?;
    delete_manifest(&b.store, a).await?;

    // A manifest whose bytes do not match its name.
    let bogus = format!("manifests/sha256/{}", "1".repeat(64));
    b.tamper(&bogus, b"{}".to_vec()).await?;
    let err = gc(&b.store, Duration::ZERO, &limits).await.unwrap_err();
    ensure!(matches!(err, ObjectsError::BadManifest { .. }), "{err}");

    // Once it is gone, the orphan goes.
    b.raw_delete(&bogus).await?;
    let report = gc(&b.store, Duration::ZERO, &limits).await?;
    ensure!(report.blobs_deleted == 1, "{report:?}");
    Ok(())
}
