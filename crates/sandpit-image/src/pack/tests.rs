//! A packed layer unpacks into the same tree: kinds, modes (set-id and sticky bits), owners,
//! times, symlink targets byte for byte (absolute, dangling, pointing outside), whiteouts,
//! opaque directories, FIFOs, hard links; deep and wide trees within the limits, refused past
//! them; names that would not come back the same refused.

use super::*;
use crate::unpack::{Whiteouts, unpack_into};
use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// Everything the layer says about one entry (inode numbers become the first path that
/// names them, so hard links compare across trees).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    content: Vec<u8>,
    opaque: bool,
    linked_to: Option<PathBuf>,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    fn walk(
        root: &Path,
        rel: &Path,
        out: &mut BTreeMap<PathBuf, Seen>,
        inodes: &mut HashMap<(u64, u64), PathBuf>,
    ) {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let r = rel.join(&name);
            let p = root.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut seen = Seen {
                kind: "",
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
                content: Vec::new(),
                opaque: false,
                linked_to: None,
            };
            if ft.is_dir() {
                seen.kind = "dir";
                let mut v = [0u8; 4];
                seen.opaque = rustix::fs::lgetxattr(&p, OPAQUE, &mut v).is_ok_and(|n| n == 1);
                out.insert(r.clone(), seen);
                walk(root, &r, out, inodes);
                continue;
            }
            if ft.is_symlink() {
                seen.kind = "symlink";
                seen.mode = 0;
                seen.mtime = 0; // symlink times are best effort
                seen.content = std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
            } else if ft.is_file() {
                seen.kind = "file";
                seen.content = std::fs::read(&p).unwrap();
                if m.nlink() > 1 {
                    let first = inodes.entry((m.dev(), m.ino())).or_insert(r.clone());
                    seen.linked_to = Some(first.clone());
                }
            } else if m.mode() & 0o170000 == 0o020000 && m.rdev() == 0 {
                seen = Seen {
                    kind: "whiteout",
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                    ..seen
                };
            } else if m.mode() & 0o170000 == 0o010000 {
                seen.kind = "fifo";
            } else {
                seen.kind = "other";
            }
            out.insert(r, seen);
        }
    }
    walk(root, Path::new(""), &mut out, &mut inodes);
    out
}

/// Pack `src`, unpack into a fresh directory; the unpacked tree's root.
fn round_trip(
    src: &Path,
    limits: &UnpackLimits,
) -> Result<(tempfile::TempDir, PackStats), ImageError> {
    let mut archive = Vec::new();
    let stats = pack_layer(&TreeDir::open(src).unwrap(), &mut archive, limits)?;
    let dest = tempfile::tempdir().unwrap();
    unpack_into(
        archive.as_slice(),
        &TreeDir::open(dest.path()).unwrap(),
        Whiteouts::Overlay,
        limits,
    )?;
    Ok((dest, stats))
}

fn mknod_whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn set_mtime(p: &Path, secs: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A tree with every kind a layer holds, and a tenant's tricks.
fn hostile_layer(root: &Path) {
    let w = |rel: &str, body: &[u8], mode: u32| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    w("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o4755);
    w("usr/bin/group-tool", b"g", 0o2711);
    w("etc/shadow", b"root:*:1::::::\n", 0o600);
    w("big", &vec![7u8; 300_000], 0o644);
    w("empty", b"", 0o000);
    std::os::unix::fs::chown(root.join("etc/shadow"), Some(0), Some(42)).unwrap();
    std::os::unix::fs::chown(root.join("big"), Some(100_000), Some(65_534)).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir_all(root.join("ro/inner")).unwrap();
    w("ro/inner/file", b"under a read-only dir", 0o444);
    // Symlinks: absolute (outside the layer, to the host's files), dangling, climbing out,
    // odd spellings kept as written, a long target, a link to a directory.
    symlink("/etc/passwd", root.join("etc/passwd-link")).unwrap();
    symlink("/", root.join("rootlink")).unwrap();
    symlink("../../../../../../etc/shadow", root.join("usr/bin/climb")).unwrap();
    symlink("nowhere/at/all", root.join("dangling")).unwrap();
    symlink("./a//b/./c/", root.join("odd")).unwrap();
    symlink("x".repeat(300), root.join("long-target")).unwrap();
    symlink("usr", root.join("usr-link")).unwrap();
    // Whiteouts and an opaque directory.
    mknod_whiteout(&root.join("deleted"));
    std::fs::create_dir_all(root.join("var/cache")).unwrap();
    mknod_whiteout(&root.join("var/cache/gone"));
    rustix::fs::setxattr(
        root.join("var/cache"),
        OPAQUE,
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    // Hard links, across directories.
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-again")).unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("etc/tool-link")).unwrap();
    // A FIFO (never opened by the packer; its permission bits go through the umask when
    // it is made again, so this test uses bits the umask keeps).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    // A long path.
    let long: PathBuf = (0..30)
        .map(|i| format!("segment-{i:02}-abcdefgh"))
        .collect();
    w(long.join("leaf").to_str().unwrap(), b"deep", 0o640);
    for p in ["usr/bin/tool", "big", "tmp", "ro/inner/file", "pipe"] {
        set_mtime(&root.join(p), 1_234_567_890);
    }
    std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
}

#[test]
fn a_hostile_layer_round_trips_byte_for_byte() {
    let src = tempfile::tempdir().unwrap();
    hostile_layer(src.path());
    let before = snapshot(src.path());
    let (dest, stats) = round_trip(src.path(), &UnpackLimits::default()).unwrap();
    let after = snapshot(dest.path());
    for (path, seen) in &before {
        assert_eq!(after.get(path), Some(seen), "{}", path.display());
    }
    assert_eq!(before.len(), after.len());
    assert_eq!((stats.whiteouts, stats.hard_links), (3, 2), "{stats:?}");
    assert!(before[Path::new("var/cache")].opaque);
    assert_eq!(
        after[Path::new("usr/bin/climb")].content,
        b"../../../../../../etc/shadow"
    );
    // Nothing was written outside the unpacked tree through a link.
    assert_ne!(
        std::fs::read("/etc/passwd").unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
}

#[test]
fn deep_and_wide_layers_are_bounded_by_the_limits() {
    let src = tempfile::tempdir().unwrap();
    let deep: PathBuf = (0..40).map(|_| "d").collect();
    std::fs::create_dir_all(src.path().join(&deep)).unwrap();
    std::fs::write(src.path().join(&deep).join("f"), b"x").unwrap();
    for i in 0..500 {
        std::fs::write(src.path().join(format!("file-{i}")), i.to_string()).unwrap();
    }
    let (dest, stats) = round_trip(src.path(), &UnpackLimits::default()).unwrap();
    assert_eq!(snapshot(src.path()), snapshot(dest.path()));
    assert_eq!(stats.entries, 40 + 1 + 500);

    let tight = |f: fn(&mut UnpackLimits)| {
        let mut l = UnpackLimits::default();
        f(&mut l);
        let mut sink = Vec::new();
        pack_layer(&TreeDir::open(src.path()).unwrap(), &mut sink, &l).unwrap_err()
    };
    for e in [
        tight(|l| l.max_depth = 20),
        tight(|l| l.max_entries = 100),
        tight(|l| l.max_bytes = 100),
    ] {
        assert!(matches!(e, ImageError::ArchiveTooLarge { .. }), "{e}");
    }
}

#[test]
fn names_that_would_not_come_back_the_same_are_refused() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join(".wh.looks-deleted"), b"").unwrap();
    let e = round_trip(src.path(), &UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains(".wh."), "{e}");

    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join(OsStr::from_bytes(b"caf\xe9")), b"").unwrap();
    let e = round_trip(src.path(), &UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");

    let src = tempfile::tempdir().unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.path().join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let e = round_trip(src.path(), &UnpackLimits::default()).unwrap_err();
    assert!(e.to_string().contains("device node"), "{e}");
}

#[test]
fn a_symlinked_root_is_not_followed() {
    let real = tempfile::tempdir().unwrap();
    std::fs::write(real.path().join("secret"), b"host file").unwrap();
    let holder = tempfile::tempdir().unwrap();
    symlink(real.path(), holder.path().join("layer")).unwrap();
    assert!(TreeDir::open(&holder.path().join("layer")).is_err());
    // A symlinked directory inside a layer is packed as a link, not walked.
    let src = tempfile::tempdir().unwrap();
    symlink(real.path(), src.path().join("host")).unwrap();
    let (dest, stats) = round_trip(src.path(), &UnpackLimits::default()).unwrap();
    assert_eq!(stats.entries, 1);
    assert!(
        !dest.path().join("host").join("secret").exists() || dest.path().join("host").is_symlink()
    );
    assert_eq!(
        std::fs::read_link(dest.path().join("host")).unwrap(),
        real.path()
    );
}
