//! What is in the bucket is not trusted: corrupted blobs and hand-written manifests are
//! refused, and a refused pull leaves nothing on disk.

use anyhow::{Result, ensure};
use object_store::ObjectStoreExt;
use sandpit_objects::{ImageKind, ImageRef, Limits, ObjectsError, Progress, pull_dir, push_dir};
use sha2::{Digest, Sha256};

use crate::{Backend, names, noise, put_file};

crate::on_both_backends!(
    corrupted_blob_fails_pull_and_leaves_nothing,
    hostile_manifests_are_refused_and_write_nothing,
    unknown_image_is_not_found,
);

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pull `image` into a fresh `dest` under the scratch dir and return the error; check the
/// failed pull left nothing there.
pub async fn refused_pull(b: &Backend, image: ImageRef, limits: &Limits) -> Result<ObjectsError> {
    let before = names(b.work.path())?;
    let dest = b.path("dest");
    let result = pull_dir(&b.store, image, &dest, limits, &Progress::new()).await;
    let Err(err) = result else {
        anyhow::bail!("pull of {image} succeeded");
    };
    ensure!(
        std::fs::symlink_metadata(&dest).is_err(),
        "dest exists after a failed pull"
    );
    ensure!(
        names(b.work.path())? == before,
        "leftovers after a failed pull: {:?}",
        names(b.work.path())?
    );
    Ok(err)
}

async fn corrupted_blob_fails_pull_and_leaves_nothing(b: &Backend) -> Result<()> {
    let src = b.path("src");
    let big = noise(3 << 20, 7);
    put_file(&src, "big", &big, 0o600)?;
    put_file(&src, "small", b"small", 0o600)?;
    let image = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    let blob = format!("blobs/sha256/{}", sha256_hex(&big));

    // Same size, one bit flipped in the middle: only the digest can tell.
    let mut flipped = big.clone();
    flipped[1 << 20] ^= 1;
    b.tamper(&blob, flipped.clone()).await?;
    let err = refused_pull(b, image, &Limits::default()).await?;
    let ObjectsError::DigestMismatch {
        path,
        offset,
        expected,
        actual,
    } = &err
    else {
        anyhow::bail!("expected a digest mismatch, got {err}");
    };
    ensure!(path == "big" && *offset == 0);
    ensure!(*expected == format!("sha256:{}", sha256_hex(&big)));
    ensure!(*actual == format!("sha256:{}", sha256_hex(&flipped)));

    // Truncated, and grown.
    b.tamper(&blob, big[..big.len() - 1].to_vec()).await?;
    let err = refused_pull(b, image, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::SizeMismatch { .. }), "{err}");
    let mut grown = big.clone();
    grown.push(0);
    b.tamper(&blob, grown).await?;
    let err = refused_pull(b, image, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::SizeMismatch { .. }), "{err}");

    // Gone.
    b.raw_delete(&blob).await?;
    let err = refused_pull(b, image, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::BlobMissing { .. }), "{err}");

    // A push repairs a missing (or wrongly sized) blob, and the pull then works.
    let progress = Progress::new();
    push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &progress,
    )
    .await?;
    ensure!(progress.counts().blobs_uploaded == 1);
    pull_dir(
        &b.store,
        image,
        &b.path("dest"),
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    ensure!(std::fs::read(b.path("dest/big"))? == big);
    Ok(())
}

/// A manifest with the given `dirs` and `files` JSON arrays (format 2, 4 MiB chunks,
/// checkpoint).
pub fn manifest(dirs: &str, files: &str) -> String {
    manifest_cb(4 << 20, dirs, files)
}

/// The same with another `chunk_bytes`.
pub fn manifest_cb(chunk_bytes: u64, dirs: &str, files: &str) -> String {
    format!(
        r#"{{"format":2,"kind":"checkpoint","chunk_bytes":{chunk_bytes},"mode":448,"dirs":[{dirs}],"files":[{files}]}}"#
    )
}

/// A file whose one chunk (at 0) is the blob `digest`.
fn file(path: &str, size: u64, digest: &str) -> String {
    chunked(path, size, &[(0, digest)])
}

/// A file with the given chunks (offset, hex digest).
pub fn chunked(path: &str, size: u64, chunks: &[(u64, &str)]) -> String {
    let chunks: Vec<String> = chunks
        .iter()
        .map(|(offset, digest)| format!(r#"[{offset},"sha256:{digest}"]"#))
        .collect();
    format!(
        r#"{{"path":{path:?},"mode":420,"size":{size},"chunks":[{}]}}"#,
        chunks.join(",")
    )
}

/// Store `text` as a manifest under its digest, as a hostile writer of the bucket could.
pub async fn plant(b: &Backend, text: &str) -> Result<ImageRef> {
    let image: ImageRef = format!("sha256:{}", sha256_hex(text.as_bytes())).parse()?;
    b.tamper(
        &format!("manifests/sha256/{}", image.hex()),
        text.as_bytes().to_vec(),
    )
    .await?;
    Ok(image)
}

async fn hostile_manifests_are_refused_and_write_nothing(b: &Backend) -> Result<()> {
    // A real blob for the manifests to point at, so only the manifest is at fault.
    let src = b.path("src");
    put_file(&src, "hello", b"hello", 0o644)?;
    let good = push_dir(
        &b.store,
        &src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    let h = sha256_hex(b"hello");
    let ok = |path: &str| file(path, 5, &h);

    let oversized = {
        let body = manifest("", &ok("hello"));
        let pad = (16 << 20) + 1 - body.len();
        format!("{}{}", body, " ".repeat(pad))
    };
    let cases: Vec<(&str, String)> = vec![
        ("parent escape", manifest("", &ok("../x"))),
        (
            "nested escape",
            manifest(r#"{"path":"a","mode":493}"#, &ok("a/../../x")),
        ),
        ("absolute path", manifest("", &ok("/etc/passwd"))),
        (
            "empty component",
            manifest(r#"{"path":"a","mode":493}"#, &ok("a//b")),
        ),
        ("dot component", manifest("", &ok("./hello"))),
        ("trailing slash", manifest("", &ok("hello/"))),
        ("empty path", manifest("", &ok(""))),
        (
            "duplicate path",
            manifest("", &format!("{},{}", ok("hello"), ok("hello"))),
        ),
        (
            "file and dir at once",
            manifest(r#"{"path":"hello","mode":493}"#, &ok("hello")),
        ),
        ("unlisted parent", manifest("", &ok("x/hello"))),
        ("huge size", manifest("", &file("hello", 1 << 62, &h))),
        (
            "sizes adding past u64",
            manifest(
                "",
                &format!(
                    "{},{}",
                    file("a", u64::MAX / 2 + 1, &h),
                    file("b", u64::MAX / 2 + 1, &h)
                ),
            ),
        ),
        (
            "setuid mode",
            manifest("", &ok("hello").replace(r#""mode":420"#, r#""mode":2541"#)),
        ),
        (
            "unknown version",
            manifest("", &ok("hello")).replace(r#""format":2"#, r#""format":3"#),
        ),
        (
            "format 1",
            format!(
                r#"{{"format":1,"kind":"checkpoint","mode":448,"dirs":[],"files":[{{"path":"hello","mode":420,"size":5,"digest":"sha256:{h}"}}]}}"#
            ),
        ),
        (
            "unknown field",
            manifest("", &ok("hello")).replace(r#""mode":448"#, r#""mode":448,"owner":0"#),
        ),
        (
            "bad digest",
            manifest("", &file("hello", 5, &h.to_uppercase())),
        ),
        ("not json", "this is not a manifest".into()),
        ("oversized", oversized),
    ];
    for (label, text) in &cases {
        let image: ImageRef = format!("sha256:{}", sha256_hex(text.as_bytes())).parse()?;
        b.tamper(
            &format!("manifests/sha256/{}", image.hex()),
            text.clone().into_bytes(),
        )
        .await?;
        let err = refused_pull(b, image, &Limits::default()).await?;
        ensure!(
            matches!(err, ObjectsError::BadManifest { .. }),
            "{label}: expected BadManifest, got {err}"
        );
    }

    // A valid manifest under a key that is not its digest.
    let text = manifest("", &ok("hello"));
    let liar: ImageRef = format!("sha256:{}", sha256_hex(b"something else")).parse()?;
    b.tamper(
        &format!("manifests/sha256/{}", liar.hex()),
        text.into_bytes(),
    )
    .await?;
    let err = refused_pull(b, liar, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::BadManifest { .. }), "{err}");

    // A manifest within the rules but over the caller's limits.
    let two = manifest("", &format!("{},{}", ok("a"), ok("b")));
    let image: ImageRef = format!("sha256:{}", sha256_hex(two.as_bytes())).parse()?;
    b.tamper(
        &format!("manifests/sha256/{}", image.hex()),
        two.into_bytes(),
    )
    .await?;
    for limits in [
        Limits {
            max_entries: 1,
            ..Limits::default()
        },
        Limits {
            max_total_bytes: 9,
            ..Limits::default()
        },
        Limits {
            max_manifest_bytes: 64,
            ..Limits::default()
        },
    ] {
        let err = refused_pull(b, image, &limits).await?;
        ensure!(
            matches!(err, ObjectsError::BadManifest { .. }),
            "{limits:?}: {err}"
        );
    }
    // And within them it pulls: the refusals above were about the manifest only.
    let pulled = pull_dir(
        &b.store,
        image,
        &b.path("two"),
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    ensure!(pulled.files == 2 && std::fs::read(b.path("two/b"))? == b"hello");

    // A manifest that lies about a blob's size is caught before anything is written.
    let short = manifest("", &file("hello", 3, &h));
    let image: ImageRef = format!("sha256:{}", sha256_hex(short.as_bytes())).parse()?;
    b.tamper(
        &format!("manifests/sha256/{}", image.hex()),
        short.into_bytes(),
    )
    .await?;
    let err = refused_pull(b, image, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::SizeMismatch { .. }), "{err}");

    // The good image still pulls.
    pull_dir(
        &b.store,
        good,
        &b.path("good"),
        &Limits::default(),
        &Progress::new(),
    )
    .await?;
    Ok(())
}

async fn unknown_image_is_not_found(b: &Backend) -> Result<()> {
    // An empty store: nothing to collect, nothing to fail on.
    let report =
        sandpit_objects::gc(&b.store, std::time::Duration::ZERO, &Limits::default()).await?;
    ensure!(report == sandpit_objects::GcReport::default(), "{report:?}");

    let image: ImageRef = format!("sha256:{}", "0".repeat(64)).parse()?;
    ensure!(!sandpit_objects::has(&b.store, image).await?);
    let err = refused_pull(b, image, &Limits::default()).await?;
    ensure!(matches!(err, ObjectsError::NotFound { .. }), "{err}");
    // Deleting what is not there is fine.
    sandpit_objects::delete_manifest(&b.store, image).await?;
    Ok(())
}

impl Backend {
    /// Delete the object `rel` behind the store's back.
    pub async fn raw_delete(&self, rel: &str) -> Result<()> {
        self.raw.delete(&self.key(rel)).await?;
        Ok(())
    }
}
