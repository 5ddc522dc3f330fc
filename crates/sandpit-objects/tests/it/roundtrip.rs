//! Push and pull of real trees: contents, modes and structure survive; pushes are
//! idempotent; what an image cannot carry is refused before anything is uploaded.

use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use anyhow::{Result, ensure};
use sandpit_objects::{
    ImageKind, Limits, ObjectsError, Progress, Store, StoreUrl, has, pull_dir, push_dir,
};

use crate::{Backend, differences, listing, names, noise, put_file, test_options};

const BIG: usize = 40 << 20;

crate::on_both_backends!(
    round_trip_keeps_tree_modes_and_bytes,
    second_push_uploads_nothing,
    pull_into_existing_dest_is_refused,
    symlinks_and_special_files_are_refused_on_push,
    push_bounds_are_enforced,
    cancelled_pull_leaves_nothing,
    wrong_credentials_fail_without_echoing_the_secret,
    a_file_written_during_push_is_refused,
);

/// A tree like a checkpoint image plus nesting: a 40 MiB random file (ten chunks), small
/// files, empty files, an empty directory, odd modes.
fn build_tree(root: &std::path::Path) -> Result<()> {
    std::fs::create_dir(root)?;
    put_file(root, "pages", &noise(BIG, 1), 0o640)?;
    put_file(root, "checkpoint.img", &noise(300_000, 2), 0o600)?;
    put_file(root, "pages_meta", b"", 0o600)?;
    put_file(root, "a/b/c/deep.txt", b"deep", 0o444)?;
    put_file(root, "a/b/empty", b"", 0o644)?;
    put_file(root, "a/run.sh", b"#!/bin/sh\necho hi\n", 0o755)?;
    put_file(root, "a/same-as-deep", b"deep", 0o600)?;
    // A zero-filled stretch between data: pulled back sparse, read back equal.
    let mut sparse = vec![0u8; 3 << 20];
    sparse[..5].copy_from_slice(b"start");
    sparse[(3 << 20) - 3..].copy_from_slice(b"end");
    put_file(root, "a/sparse.img", &sparse, 0o600)?;
    std::fs::create_dir_all(root.join("empty-dir/inner"))?;
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::set_permissions(root.join("a/b/c"), std::fs::Permissions::from_mode(0o555))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))?;
    Ok(())
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

async fn round_trip_keeps_tree_modes_and_bytes(b: &Backend) -> Result<()> {
    let src = b.path("src");
    build_tree(&src)?;
    let total = listing(&src)?
        .values()
        .map(|(_, _, size, _)| *size)
        .sum::<u64>();

    let progress = Progress::new();
    let started = Instant::now();
    let image = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &progress,
    )
    .await?;
    let push_secs = started.elapsed().as_secs_f64();
    let pushed = progress.counts();
    ensure!(has(&b.store, image).await?, "pushed image not found");
    // 8 files: two empty, two "deep", the 40 MiB one in ten chunks, the others in one.
    ensure!(pushed.blobs_uploaded == 14, "blobs uploaded: {pushed:?}");
    ensure!(pushed.blobs_present == 1, "the second \"deep\": {pushed:?}");
    // Every file was written whole, so all of it is data to the file system.
    ensure!(pushed.bytes_hashed == total, "{pushed:?} vs {total}");
    ensure!(pushed.bytes_uploaded == total - 4, "{pushed:?}");
    ensure!(
        pushed.bytes_present == 4 && pushed.bytes_in_holes == 0,
        "{pushed:?}"
    );

    let dest = b.path("dest");
    let progress = Progress::new();
    let started = Instant::now();
    let pulled = pull_dir(&b.store, image, &dest, &Limits::default(), &progress).await?;
    let pull_secs = started.elapsed().as_secs_f64();
    ensure!(pulled.kind == ImageKind::Checkpoint);
    ensure!(pulled.files == 8 && pulled.dirs == 5, "{pulled:?}");
    ensure!(pulled.bytes == total);
    ensure!(progress.counts().bytes_downloaded == total);

    let (before, after) = (listing(&src)?, listing(&dest)?);
    ensure!(
        before == after,
        "trees differ: {:#?}",
        differences(&before, &after)
    );
    ensure!(
        names(b.work.path())? == ["dest", "src"],
        "leftovers beside dest"
    );

    let sparse = std::fs::symlink_metadata(dest.join("a/sparse.img"))?;
    use std::os::unix::fs::MetadataExt;
    eprintln!(
        "[{}] {} MiB tree: push {:.1} MB/s ({:.2} s), pull {:.1} MB/s ({:.2} s); sparse 3 MiB file uses {} KiB",
        b.name,
        total >> 20,
        mbps(total, push_secs),
        push_secs,
        mbps(total, pull_secs),
        pull_secs,
        sparse.blocks() / 2,
    );
    Ok(())
}

async fn second_push_uploads_nothing(b: &Backend) -> Result<()> {
    let src = b.path("src");
    std::fs::create_dir(&src)?;
    put_file(&src, "pages", &noise(12 << 20, 3), 0o600)?;
    put_file(&src, "x/small", b"small", 0o600)?;
    let limits = Limits::default();

    let first = Progress::new();
    let a = push_dir(&b.store, &src, ImageKind::Snapshot, &limits, &first).await?;
    // Three 4 MiB chunks and a small file.
    ensure!(first.counts().blobs_uploaded == 4, "{:?}", first.counts());

    let second = Progress::new();
    let again = push_dir(&b.store, &src, ImageKind::Snapshot, &limits, &second).await?;
    let c = second.counts();
    ensure!(again == a, "same tree, different ref: {a} vs {again}");
    ensure!(
        c.blobs_uploaded == 0 && c.bytes_uploaded == 0 && c.blobs_present == 4,
        "second push uploaded: {c:?}"
    );

    // Another kind is another image, over the same blobs.
    let third = Progress::new();
    let layer = push_dir(&b.store, &src, ImageKind::Layer, &limits, &third).await?;
    ensure!(layer != a);
    ensure!(third.counts().blobs_uploaded == 0);

    // The reference survives text and JSON.
    ensure!(a.to_string().parse::<sandpit_objects::ImageRef>()? == a);
    Ok(())
}

async fn pull_into_existing_dest_is_refused(b: &Backend) -> Result<()> {
    let src = b.path("src");
    std::fs::create_dir(&src)?;
    put_file(&src, "f", b"new", 0o600)?;
    let image = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await?;

    // An existing directory, with something of its own in it.
    let dest = b.path("dest");
    put_file(&dest, "mine", b"keep me", 0o600)?;
    let err = pull_dir(&b.store, image, &dest, &Limits::default(), &Progress::new())
        .await
        .unwrap_err();
    ensure!(
        matches!(err, ObjectsError::DestExists { .. }),
        "unexpected: {err}"
    );
    ensure!(std::fs::read(dest.join("mine"))? == b"keep me");
    ensure!(names(&dest)? == ["mine"]);

    // An existing file, and a dangling symlink, in the way.
    let file = b.path("file");
    std::fs::write(&file, b"x")?;
    let link = b.path("link");
    std::os::unix::fs::symlink("/nonexistent-target", &link)?;
    for dest in [&file, &link] {
        let err = pull_dir(&b.store, image, dest, &Limits::default(), &Progress::new())
            .await
            .unwrap_err();
        ensure!(matches!(err, ObjectsError::DestExists { .. }), "{err}");
    }
    ensure!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    ensure!(names(b.work.path())? == ["dest", "file", "link", "src"]);

    // A missing parent is an error, not a mkdir -p.
    let err = pull_dir(
        &b.store,
        image,
        &b.path("no/such/parent"),
        &Limits::default(),
        &Progress::new(),
    )
    .await
    .unwrap_err();
    ensure!(matches!(err, ObjectsError::PrepareDest { .. }), "{err}");
    Ok(())
}

async fn symlinks_and_special_files_are_refused_on_push(b: &Backend) -> Result<()> {
    let limits = Limits::default();
    // A symlink to a file outside, nested a level down.
    let src = b.path("with-link");
    put_file(&src, "ok", b"fine", 0o600)?;
    std::fs::create_dir(src.join("sub"))?;
    std::os::unix::fs::symlink("/etc/passwd", src.join("sub/passwd"))?;
    let progress = Progress::new();
    let err = push_dir(&b.store, &src, ImageKind::Checkpoint, &limits, &progress)
        .await
        .unwrap_err();
    ensure!(
        matches!(&err, ObjectsError::Unsupported { path, what } if path == "sub/passwd" && what.contains("symlink")),
        "unexpected: {err}"
    );
    ensure!(progress.counts().bytes_uploaded == 0 && progress.counts().bytes_hashed == 0);

    // The directory itself being a symlink.
    let link = b.path("link-to-dir");
    std::os::unix::fs::symlink(&src, &link)?;
    let err = push_dir(&b.store, &link, ImageKind::Checkpoint, &limits, &progress)
        .await
        .unwrap_err();
    ensure!(
        matches!(err, ObjectsError::ReadSource { .. }),
        "unexpected: {err}"
    );

    // A FIFO (opening it would block a naive reader).
    let src = b.path("with-fifo");
    put_file(&src, "ok", b"fine", 0o600)?;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )?;
    let err = push_dir(&b.store, &src, ImageKind::Checkpoint, &limits, &progress)
        .await
        .unwrap_err();
    ensure!(
        matches!(&err, ObjectsError::Unsupported { what, .. } if what.contains("special")),
        "unexpected: {err}"
    );

    // A setuid file.
    let src = b.path("with-setuid");
    put_file(&src, "tool", b"#!/bin/sh\n", 0o4755)?;
    let err = push_dir(&b.store, &src, ImageKind::Layer, &limits, &progress)
        .await
        .unwrap_err();
    ensure!(
        matches!(&err, ObjectsError::Unsupported { what, .. } if what.contains("set-id")),
        "unexpected: {err}"
    );
    ensure!(progress.counts().bytes_uploaded == 0);
    Ok(())
}

async fn push_bounds_are_enforced(b: &Backend) -> Result<()> {
    let src = b.path("src");
    std::fs::create_dir(&src)?;
    for i in 0..5 {
        put_file(&src, &format!("f{i}"), &noise(1000, i), 0o600)?;
    }
    let progress = Progress::new();
    for limits in [
        Limits {
            max_entries: 4,
            ..Limits::default()
        },
        Limits {
            max_file_bytes: 999,
            ..Limits::default()
        },
        Limits {
            max_total_bytes: 4999,
            ..Limits::default()
        },
    ] {
        let err = push_dir(&b.store, &src, ImageKind::Layer, &limits, &progress)
            .await
            .unwrap_err();
        ensure!(
            matches!(err, ObjectsError::TooLarge { .. }),
            "{limits:?}: {err}"
        );
    }
    ensure!(progress.counts().bytes_hashed == 0);
    // At the limits exactly, it goes through.
    let exact = Limits {
        max_entries: 5,
        max_file_bytes: 1000,
        max_total_bytes: 5000,
        ..Limits::default()
    };
    push_dir(&b.store, &src, ImageKind::Layer, &exact, &progress).await?;
    // A manifest that a pull under the same limits would refuse is not written.
    let tight = Limits {
        max_manifest_bytes: 200,
        ..Limits::default()
    };
    let err = push_dir(&b.store, &src, ImageKind::Snapshot, &tight, &progress)
        .await
        .unwrap_err();
    ensure!(matches!(err, ObjectsError::TooLarge { .. }), "{err}");
    Ok(())
}

async fn cancelled_pull_leaves_nothing(b: &Backend) -> Result<()> {
    let src = b.path("src");
    put_file(&src, "pages", &noise(24 << 20, 5), 0o600)?;
    put_file(&src, "other", &noise(9 << 20, 6), 0o600)?;
    let image = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    let dest = b.path("dest");
    let progress = Progress::new();
    let limits = Limits::default();
    let pull = pull_dir(&b.store, image, &dest, &limits, &progress);
    // Drop the pull once bytes are flowing.
    let started = async {
        while progress.counts().bytes_downloaded == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        done = pull => {
            // Too fast to interrupt on this machine: then it must be complete.
            done?;
            eprintln!("[{}] the pull finished before it could be cancelled", b.name);
            ensure!(differences(&listing(&src)?, &listing(&dest)?).is_empty());
            return Ok(());
        }
        () = started => {}
    }
    ensure!(
        names(b.work.path())? == ["src"],
        "leftovers after a cancelled pull: {:?}",
        names(b.work.path())?
    );
    Ok(())
}

async fn wrong_credentials_fail_without_echoing_the_secret(b: &Backend) -> Result<()> {
    if b.name != "s3" {
        return Ok(()); // a directory has no credentials
    }
    let url = StoreUrl::parse(&b.store.to_string())?;
    let secret = "WrongSecret-do-not-print-9f2c";
    let store = Store::open(&url, &test_options(secret))?;
    let src = b.path("src");
    put_file(&src, "f", b"data", 0o600)?;
    let err = push_dir(
        &store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await
    .unwrap_err();
    let debug = format!("{err:?}");
    let text = format!("{debug} / {:#}", anyhow::Error::from(err));
    ensure!(!text.contains(secret), "the secret leaked: {text}");
    ensure!(!format!("{store:?} {store}").contains(secret));
    Ok(())
}

async fn a_file_written_during_push_is_refused(b: &Backend) -> Result<()> {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let src = b.path("src");
    put_file(&src, "pages", &noise(24 << 20, 8), 0o600)?;
    put_file(&src, "other", b"steady", 0o600)?;
    // A writer that keeps changing one byte (its value stays the same: only the file's
    // times tell) until the push is over.
    let stop = Arc::new(AtomicBool::new(false));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("pages"))?;
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut writes = 0;
            while !stop.load(Ordering::Relaxed) {
                file.write_all_at(&[0x5a], 10 << 20)?;
                writes += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(writes)
        })
    };
    let result = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("the writer thread")?;
    let err = match result {
        Ok(image) => anyhow::bail!("pushed {image} while the file changed ({writes} writes)"),
        Err(err) => err,
    };
    ensure!(
        matches!(&err, ObjectsError::Changed { path } if path == "pages"),
        "unexpected: {err}"
    );
    ensure!(
        b.count("manifests/sha256").await? == 0,
        "a manifest was written"
    );
    Ok(())
}
