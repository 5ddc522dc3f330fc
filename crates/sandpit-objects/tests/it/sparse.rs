//! Format 2 at work on what the product pushes: a sparse disk image whose apparent size is
//! far larger than its data is read, stored and pulled back as its data only; a small
//! change uploads one chunk; hostile chunk lists and chunk blobs are refused.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, ensure};
use sandpit_objects::{
    ImageKind, ImageRef, Limits, ObjectsError, Progress, ProgressCounts, pull_dir, push_dir,
};

use crate::hostile::{chunked, manifest, manifest_cb, plant, refused_pull, sha256_hex};
use crate::{Backend, differences, listing, noise, put_file};

crate::on_both_backends!(
    sparse_disk_moves_only_its_data,
    one_changed_byte_uploads_one_chunk,
    zero_chunks_are_holes,
    hostile_chunk_lists_are_refused,
);

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 4 * MIB;
const DISK: u64 = 10 * GIB;

/// Where the test disk holds data: (offset, length, noise seed). The second region
/// straddles a chunk boundary, so four chunks hold data.
const REGIONS: [(u64, u64, u64); 3] = [
    (0, MIB, 11),
    (3 * GIB + 3 * MIB, 2 * MIB, 12),
    (DISK - MIB / 2, MIB / 2, 13),
];
const DATA_CHUNKS: u64 = 4;
/// A chunk written with zeros: allocated on disk, yet a hole in the image.
const ZERO_CHUNK_AT: u64 = 6 * GIB;

/// A tree like a hibernated sandbox's: a 10 GiB sparse `disk.img` with a few MiB of data
/// in [`REGIONS`] and an explicitly written zero chunk, a small file, a nested directory.
fn build_disk_tree(root: &Path) -> Result<()> {
    std::fs::create_dir(root)?;
    let disk = File::create_new(root.join("disk.img"))?;
    disk.set_len(DISK)?;
    for (offset, len, seed) in REGIONS {
        disk.write_all_at(&noise(len as usize, seed), offset)?;
    }
    disk.write_all_at(&vec![0; CHUNK as usize], ZERO_CHUNK_AT)?;
    disk.sync_all()?;
    std::fs::set_permissions(root.join("disk.img"), PermissionsExt::from_mode(0o600))?;
    put_file(root, "config.json", b"{\"vcpus\":2}", 0o644)?;
    put_file(root, "state/net/eth0", &noise(70_000, 14), 0o600)?;
    Ok(())
}

/// Bytes of the small files in [`build_disk_tree`].
const SMALL: u64 = 11 + 70_000;

/// `len` bytes of `path` at `offset`.
fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0; len as usize];
    File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Check a pulled `disk.img` against [`REGIONS`]: data where it was written, zeros around
/// it and in holes, the full apparent size, and only about its data allocated.
fn check_disk(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)?;
    ensure!(meta.len() == DISK, "size {}", meta.len());
    ensure!(meta.permissions().mode() & 0o777 == 0o600);
    for (offset, len, seed) in REGIONS {
        // The whole chunks around each region: the data, and zeros elsewhere in them.
        let start = offset / CHUNK * CHUNK;
        let end = (offset + len).div_ceil(CHUNK) * CHUNK;
        let got = read_at(path, start, end - start)?;
        let mut want = vec![0; (end - start) as usize];
        want[(offset - start) as usize..][..len as usize]
            .copy_from_slice(&noise(len as usize, seed));
        ensure!(
            sha256_hex(&got) == sha256_hex(&want),
            "region at {offset} differs"
        );
    }
    for hole in [ZERO_CHUNK_AT, 7 * GIB, 5 * GIB + 12345] {
        ensure!(
            read_at(path, hole, CHUNK)?.iter().all(|b| *b == 0),
            "not zeros at {hole}"
        );
    }
    let allocated = meta.blocks() * 512;
    ensure!(
        allocated < 100 * MIB,
        "the pulled disk is not sparse: {allocated} bytes allocated"
    );
    ensure!(
        allocated <= DATA_CHUNKS * CHUNK + MIB,
        "more allocated than the data chunks: {allocated} bytes"
    );
    Ok(())
}

async fn push(b: &Backend, src: &Path) -> Result<(ImageRef, ProgressCounts)> {
    let progress = Progress::new();
    let image = push_dir(
        &b.store,
        src,
        ImageKind::Checkpoint,
        &Limits::default(),
        &progress,
    )
    .await?;
    Ok((image, progress.counts()))
}

async fn pull(b: &Backend, image: ImageRef, dest: &str) -> Result<ProgressCounts> {
    let progress = Progress::new();
    pull_dir(
        &b.store,
        image,
        &b.path(dest),
        &Limits::default(),
        &progress,
    )
    .await?;
    Ok(progress.counts())
}

async fn sparse_disk_moves_only_its_data(b: &Backend) -> Result<()> {
    let src = b.path("src");
    build_disk_tree(&src)?;
    let total = DISK + SMALL;

    let (image, pushed) = push(b, &src).await?;
    // Read: the data chunks, the zero chunk the file system reports as data (unless it
    // detects zeros itself), the small files. Never the holes.
    let data = DATA_CHUNKS * CHUNK + SMALL;
    ensure!(
        (data..=data + CHUNK).contains(&pushed.bytes_hashed),
        "{pushed:?}"
    );
    // Stored: the four data chunks and the two small files.
    ensure!(pushed.blobs_uploaded == DATA_CHUNKS + 2, "{pushed:?}");
    ensure!(pushed.bytes_uploaded == data, "{pushed:?}");
    ensure!(pushed.bytes_in_holes == total - data, "{pushed:?}");
    ensure!(b.count("blobs/sha256").await? == 6);

    let pulled = pull(b, image, "dest").await?;
    ensure!(pulled.bytes_downloaded == data, "{pulled:?}");
    ensure!(pulled.blobs_downloaded == DATA_CHUNKS + 2, "{pulled:?}");
    ensure!(pulled.bytes_in_holes == total - data, "{pulled:?}");
    check_disk(&b.path("dest/disk.img"))?;
    // The small files and the nested directory, as they were (`listing` would read the
    // disk whole).
    for (rel, mode) in [("config.json", 0o644), ("state/net/eth0", 0o600)] {
        let (a, z) = (src.join(rel), b.path("dest").join(rel));
        ensure!(std::fs::read(&a)? == std::fs::read(&z)?, "{rel} differs");
        ensure!(std::fs::metadata(&z)?.permissions().mode() & 0o777 == mode);
    }
    ensure!(std::fs::metadata(b.path("dest/state/net"))?.is_dir());

    // The same tree pushed again is the same image and uploads nothing.
    let (again, counts) = push(b, &src).await?;
    ensure!(again == image && counts.blobs_uploaded == 0, "{counts:?}");
    ensure!(counts.blobs_present == DATA_CHUNKS + 2 && counts.bytes_present == data);
    Ok(())
}

async fn one_changed_byte_uploads_one_chunk(b: &Backend) -> Result<()> {
    let src = b.path("src");
    build_disk_tree(&src)?;
    let (old, _) = push(b, &src).await?;
    let blobs = b.count("blobs/sha256").await?;

    // One byte, in the chunk after the one where the second region starts.
    let at = 3 * GIB + CHUNK + 100;
    let disk = File::options().write(true).open(src.join("disk.img"))?;
    let before = read_at(&src.join("disk.img"), at, 1)?[0];
    disk.write_all_at(&[before ^ 0xff], at)?;
    drop(disk);

    let (new, counts) = push(b, &src).await?;
    ensure!(new != old, "a changed disk kept its reference");
    ensure!(
        counts.blobs_uploaded == 1 && counts.bytes_uploaded == CHUNK,
        "{counts:?}"
    );
    ensure!(counts.blobs_present == DATA_CHUNKS - 1 + 2, "{counts:?}");
    ensure!(b.count("blobs/sha256").await? == blobs + 1);

    // Both images pull, each with its own byte.
    pull(b, old, "old").await?;
    check_disk(&b.path("old/disk.img"))?;
    pull(b, new, "new").await?;
    ensure!(read_at(&b.path("new/disk.img"), at, 1)?[0] == before ^ 0xff);
    ensure!(read_at(&b.path("old/disk.img"), at, 1)?[0] == before);
    Ok(())
}

async fn zero_chunks_are_holes(b: &Backend) -> Result<()> {
    let src = b.path("src");
    // Written in full: a zero chunk, a data chunk, then a short zero tail chunk.
    let mut mixed = vec![0u8; (2 * CHUNK + 100) as usize];
    mixed[CHUNK as usize..2 * CHUNK as usize].copy_from_slice(&noise(CHUNK as usize, 21));
    put_file(&src, "mixed", &mixed, 0o600)?;
    put_file(&src, "zeros", &vec![0; MIB as usize], 0o600)?;

    let (image, pushed) = push(b, &src).await?;
    ensure!(
        pushed.blobs_uploaded == 1 && pushed.bytes_uploaded == CHUNK,
        "{pushed:?}"
    );
    ensure!(pushed.bytes_in_holes == CHUNK + 100 + MIB, "{pushed:?}");
    ensure!(b.count("blobs/sha256").await? == 1);

    pull(b, image, "dest").await?;
    let (before, after) = (listing(&src)?, listing(&b.path("dest"))?);
    ensure!(before == after, "{:?}", differences(&before, &after));
    // The zeros came back as holes.
    let blocks = |rel: &str| -> Result<u64> { Ok(std::fs::metadata(b.path(rel))?.blocks() * 512) };
    ensure!(blocks("dest/zeros")? == 0, "{}", blocks("dest/zeros")?);
    ensure!(blocks("dest/mixed")? <= CHUNK + 64 * 1024);
    Ok(())
}

async fn hostile_chunk_lists_are_refused(b: &Backend) -> Result<()> {
    let limits = Limits::default();
    // Real blobs for the manifests to name, so only the manifest (or the blob's length)
    // is at fault: "hello", and one of 64 KiB + 1 bytes under its own digest.
    let src = b.path("src");
    put_file(&src, "hello", b"hello", 0o644)?;
    push(b, &src).await?;
    let h = sha256_hex(b"hello");
    let long = noise((64 << 10) + 1, 31);
    let l = sha256_hex(&long);
    b.tamper(&format!("blobs/sha256/{l}"), long).await?;

    let refused_manifests: Vec<(&str, String)> = vec![
        (
            "misaligned offset",
            manifest("", &chunked("f", 2 * CHUNK, &[(4096, &h)])),
        ),
        (
            "offset at the size",
            manifest("", &chunked("f", 2 * CHUNK, &[(0, &h), (2 * CHUNK, &h)])),
        ),
        (
            "offset past the size",
            manifest("", &chunked("f", 5, &[(64 * CHUNK, &h)])),
        ),
        (
            "unsorted chunks",
            manifest("", &chunked("f", 2 * CHUNK, &[(CHUNK, &h), (0, &h)])),
        ),
        (
            "duplicate chunk",
            manifest("", &chunked("f", 2 * CHUNK, &[(0, &h), (0, &h)])),
        ),
        (
            "chunk in an empty file",
            manifest("", &chunked("f", 0, &[(0, &h)])),
        ),
        (
            "negative offset",
            manifest("", &chunked("f", 5, &[(0, &h)])).replace("[[0,", "[[-1,"),
        ),
        (
            "chunk_bytes not a power of two",
            manifest_cb(3 << 20, "", &chunked("f", 5, &[(0, &h)])),
        ),
        (
            "chunk_bytes too small",
            manifest_cb(32 << 10, "", &chunked("f", 5, &[(0, &h)])),
        ),
        (
            "chunk_bytes too large",
            manifest_cb(128 << 20, "", &chunked("f", 5, &[(0, &h)])),
        ),
        (
            "chunk_bytes zero",
            manifest_cb(0, "", &chunked("f", 5, &[(0, &h)])),
        ),
        (
            "chunk list missing",
            manifest("", r#"{"path":"f","mode":420,"size":5}"#),
        ),
    ];
    for (label, text) in &refused_manifests {
        let image = plant(b, text).await?;
        let err = refused_pull(b, image, &limits).await?;
        ensure!(
            matches!(err, ObjectsError::BadManifest { .. }),
            "{label}: expected BadManifest, got {err}"
        );
    }

    // Good manifests, bad chunks: the first chunks are fine and written, then one fails,
    // and the whole pull is undone.
    let k64 = 64 << 10;
    let full = noise(k64 as usize, 32);
    let k = sha256_hex(&full);
    b.tamper(&format!("blobs/sha256/{k}"), full).await?;
    let other = sha256_hex(b"not hello");
    b.tamper(&format!("blobs/sha256/{other}"), b"hello".to_vec())
        .await?;
    let two = |size: u64, second: &str| {
        manifest_cb(
            k64,
            "",
            &format!(
                "{},{}",
                chunked("a", 5, &[(0, &h)]),
                chunked("b", size, &[(0, &k[..]), (k64, second)])
            ),
        )
    };
    type Expect = fn(&ObjectsError) -> bool;
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "blob bytes not matching its digest",
            manifest_cb(k64, "", &chunked("f", 5, &[(0, &other)])),
            |e| matches!(e, ObjectsError::DigestMismatch { path, offset: 0, .. } if path == "f"),
        ),
        (
            "blob longer than chunk_bytes",
            manifest_cb(k64, "", &chunked("f", 10 * k64, &[(0, &l)])),
            |e| {
                matches!(e, ObjectsError::SizeMismatch { expected, actual, .. }
                    if *expected == 64 << 10 && *actual == (64 << 10) + 1)
            },
        ),
        (
            "blob longer than the last chunk",
            manifest_cb(k64, "", &chunked("f", k64 + 7, &[(k64, &l)])),
            |e| matches!(e, ObjectsError::SizeMismatch { offset, expected: 7, .. } if *offset == 64 << 10),
        ),
        (
            "blob shorter than its chunk",
            two(3 * k64, &h),
            |e| matches!(e, ObjectsError::SizeMismatch { path, expected, actual: 5, .. } if path == "b" && *expected == 64 << 10),
        ),
        (
            "blob missing",
            two(3 * k64, &"0".repeat(64)),
            |e| matches!(e, ObjectsError::BlobMissing { path, .. } if path == "b"),
        ),
    ];
    for (label, text, expected) in &cases {
        let image = plant(b, text).await?;
        let err = refused_pull(b, image, &limits).await?;
        ensure!(expected(&err), "{label}: got {err:?}");
    }
    Ok(())
}

/// Throughput in release builds: a 10 GiB sparse disk with 200 MiB of data (50 regions of
/// 4 MiB, some straddling chunk boundaries), pushed then pulled. Run with
/// `cargo test --release -p sandpit-objects --test it -- --ignored --nocapture measure`.
mod measure {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "slow in debug builds; a measurement, not a check"]
    async fn file() {
        let b = crate::Backend::local().await.expect("file backend");
        super::measure(&b).await.expect("file backend");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "slow in debug builds; a measurement, not a check"]
    async fn s3() {
        let b = crate::Backend::s3().await.expect("s3 backend");
        super::measure(&b).await.expect("s3 backend");
    }
}

async fn measure(b: &Backend) -> Result<()> {
    let src = b.path("src");
    std::fs::create_dir(&src)?;
    let disk = File::create_new(src.join("disk.img"))?;
    disk.set_len(DISK)?;
    let mut data = 0;
    for i in 0..50u64 {
        // Spread over the disk; every other region starts mid-chunk.
        let offset = i * (DISK / 50) + (i % 2) * (CHUNK / 2);
        disk.write_all_at(&noise(CHUNK as usize, 100 + i), offset)?;
        data += CHUNK;
    }
    disk.sync_all()?;
    drop(disk);

    let started = Instant::now();
    let (image, pushed) = push(b, &src).await?;
    let push_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let pulled = pull(b, image, "dest").await?;
    let pull_secs = started.elapsed().as_secs_f64();
    ensure!(pulled.bytes_downloaded == pushed.bytes_uploaded);
    let allocated = std::fs::metadata(b.path("dest/disk.img"))?.blocks() * 512;
    let mb = |bytes: u64, secs: f64| bytes as f64 / MIB as f64 / secs;
    eprintln!(
        "[{}] 10 GiB sparse disk, {} MiB written: push {:.2} s ({} MiB read, {} MiB uploaded in {} chunks: {:.0} MB/s of data, {:.0} MB/s apparent); \
         pull {:.2} s ({} MiB downloaded: {:.0} MB/s of data, {:.0} MB/s apparent); pulled file allocates {} MiB",
        b.name,
        data / MIB,
        push_secs,
        pushed.bytes_hashed / MIB,
        pushed.bytes_uploaded / MIB,
        pushed.blobs_uploaded,
        mb(pushed.bytes_uploaded, push_secs),
        mb(DISK, push_secs),
        pull_secs,
        pulled.bytes_downloaded / MIB,
        mb(pulled.bytes_downloaded, pull_secs),
        mb(DISK, pull_secs),
        allocated / MIB,
    );
    Ok(())
}
