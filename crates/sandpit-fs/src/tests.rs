#![allow(
    clippy::disallowed_methods,
    reason = "tests build host-side fixtures by path"
)]

use super::*;
use proptest::prelude::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// A tree root beside a canary directory holding a file, both in one temp dir.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    let canary = tmp.path().join("canary");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("file"), b"canary").unwrap();
    std::fs::set_permissions(canary.join("file"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o755)).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        canary,
    }
}

/// Everything under `dir`: (relative path, mode, size, content hash-ish).
fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let meta = std::fs::symlink_metadata(dir).unwrap();
    out.push((PathBuf::new(), meta.mode(), meta.len(), Vec::new()));
    for e in walk(dir) {
        let m = std::fs::symlink_metadata(&e).unwrap();
        let body = if m.is_file() {
            std::fs::read(&e).unwrap()
        } else {
            Vec::new()
        };
        out.push((
            e.strip_prefix(dir).unwrap().to_path_buf(),
            m.mode(),
            m.len(),
            body,
        ));
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push(p.clone());
        if m.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

#[test]
fn symlinks_in_any_component_are_refused() {
    let f = fixture();
    std::os::unix::fs::symlink(&f.canary, f.root.join("link")).unwrap();
    std::os::unix::fs::symlink("../canary", f.root.join("rel")).unwrap();
    let t = TreeDir::open(&f.root).unwrap();
    for p in [
        "link",
        "link/file",
        "rel/file",
        "../canary/file",
        "/etc/passwd",
    ] {
        assert!(t.open_file(Path::new(p)).is_err(), "{p} opened");
        assert!(t.open_dir(Path::new(p)).is_err(), "{p} opened as a dir");
    }
    assert!(matches!(
        t.open_dir(Path::new("link")),
        Err(FsError::Escape { .. })
    ));
    assert!(matches!(
        t.make_dirs(Path::new("link/x"), 0o755, InTheWay::Refuse),
        Err(FsError::Escape { .. })
    ));
    // Replacing unlinks the symlink and makes a directory: nothing lands in the canary.
    let d = t
        .make_dirs(Path::new("link/x"), 0o755, InTheWay::Replace)
        .unwrap();
    d.create_file(OsStr::new("f")).unwrap();
    assert!(f.root.join("link").is_dir() && !f.root.join("link").is_symlink());
    assert!(!f.canary.join("x").exists());
}

#[test]
fn special_files_and_large_files_are_not_read() {
    let f = fixture();
    let t = TreeDir::open(&f.root).unwrap();
    t.mknod(OsStr::new("fifo"), Node::Fifo { mode: 0o644 })
        .unwrap();
    assert!(matches!(
        t.read_capped(Path::new("fifo"), 10),
        Err(FsError::NotRegular { .. })
    ));
    std::os::unix::fs::symlink("/dev/zero", f.root.join("zero")).unwrap();
    assert!(matches!(
        t.read_capped(Path::new("zero"), 10),
        Err(FsError::Escape { .. })
    ));
    std::fs::write(f.root.join("big"), vec![b'x'; 11]).unwrap();
    assert!(matches!(
        t.read_capped(Path::new("big"), 10),
        Err(FsError::TooLarge { limit: 10, .. })
    ));
    assert_eq!(t.read_capped(Path::new("big"), 11).unwrap().len(), 11);
    assert!(
        t.read_capped(Path::new("missing"), 10)
            .unwrap_err()
            .is_not_found()
    );
}

#[test]
fn remove_unlinks_symlinks_and_never_follows_them() {
    let f = fixture();
    std::fs::create_dir_all(f.root.join("d/e")).unwrap();
    std::os::unix::fs::symlink(&f.canary, f.root.join("d/e/to-canary")).unwrap();
    let t = TreeDir::open(&f.root).unwrap();
    t.remove(OsStr::new("d")).unwrap();
    assert!(!f.root.join("d").exists());
    assert!(f.canary.join("file").exists());
}

#[test]
fn attributes_go_through_handles() {
    let f = fixture();
    let t = TreeDir::open(&f.root).unwrap();
    let d = t
        .make_dir(OsStr::new("x"), 0o700, InTheWay::Refuse)
        .unwrap();
    d.set_attrs(Some((1000, 1000)), 0o4777, Some(1_600_000_000))
        .unwrap();
    let m = std::fs::metadata(f.root.join("x")).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.mtime()),
        (0o4777, 1000, 1_600_000_000)
    );
    // The directory replaced by a symlink afterwards: re-opening refuses it.
    t.remove(OsStr::new("x")).unwrap();
    t.symlink(f.canary.join("file").as_os_str(), OsStr::new("x"))
        .unwrap();
    assert!(t.open_dir(Path::new("x")).is_err());
    assert_eq!(
        std::fs::metadata(f.canary.join("file")).unwrap().mode() & 0o7777,
        0o644
    );
}

/// An operation of the property test. Names come from a small set so that operations
/// collide; symlink targets point at the canary (absolute and relative).
#[derive(Debug, Clone)]
enum Op {
    MakeDirs(String, bool),
    Create(String, String),
    Symlink(String, String),
    HardLink(String, String),
    Remove(String),
    Chmod(String, u32),
    Chown(String),
    Read(String),
}

fn rel() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("a"),
        Just("b"),
        Just("c"),
        Just(".."),
        Just("."),
        Just("")
    ];
    proptest::collection::vec(name, 1..4).prop_map(|v| v.join("/"))
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/CANARY".to_string()),
        Just("/CANARY/file".to_string()),
        Just("../canary".to_string()),
        Just("../../canary/file".to_string()),
        Just("a".to_string()),
        Just("/".to_string()),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (rel(), any::<bool>()).prop_map(|(p, r)| Op::MakeDirs(p, r)),
        (rel(), rel()).prop_map(|(d, n)| Op::Create(d, n)),
        (rel(), target()).prop_map(|(p, t)| Op::Symlink(p, t)),
        (rel(), rel()).prop_map(|(a, b)| Op::HardLink(a, b)),
        rel().prop_map(Op::Remove),
        (rel(), prop_oneof![Just(0o4777u32), Just(0o777), Just(0)])
            .prop_map(|(p, m)| Op::Chmod(p, m)),
        rel().prop_map(Op::Chown),
        rel().prop_map(Op::Read),
    ]
}

fn split(p: &str) -> (PathBuf, OsString) {
    let p = Path::new(p);
    (
        p.parent().unwrap_or(Path::new("")).to_path_buf(),
        p.file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| OsString::from("..")),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever sequence of operations, with whatever names and symlinks planted on the way,
    /// nothing outside the tree is created, modified, chmod-ed or deleted.
    #[test]
    fn nothing_outside_the_tree_changes(ops in proptest::collection::vec(op(), 1..24)) {
        let f = fixture();
        let before = snapshot(&f.canary);
        let t = TreeDir::open(&f.root).unwrap();
        for op in ops {
            // Errors are fine (refusals); escapes are not.
            let _ = match op {
                Op::MakeDirs(p, replace) => t
                    .make_dirs(Path::new(&p), 0o755, if replace { InTheWay::Replace } else { InTheWay::Refuse })
                    .map(drop),
                Op::Create(d, n) => {
                    let (_, name) = split(&n);
                    t.open_dir(Path::new(&d)).and_then(|d| {
                        use std::io::Write;
                        let mut file = d.create_file(&name)?;
                        let _ = file.write_all(b"x");
                        Ok(())
                    })
                }
                Op::Symlink(p, target) => {
                    let (parent, name) = split(&p);
                    let target = target.replace("/CANARY", &f.canary.display().to_string());
                    t.open_dir(&parent).and_then(|d| d.symlink(OsStr::new(&target), &name))
                }
                Op::HardLink(a, b) => {
                    let (pa, na) = split(&a);
                    let (pb, nb) = split(&b);
                    t.open_dir(&pa).and_then(|da| t.open_dir(&pb).and_then(|db| db.hard_link(&da, &na, &nb)))
                }
                Op::Remove(p) => {
                    let (parent, name) = split(&p);
                    t.open_dir(&parent).and_then(|d| d.remove(&name))
                }
                Op::Chmod(p, mode) => t.open_dir(Path::new(&p)).and_then(|d| d.set_attrs(None, mode, None)),
                Op::Chown(p) => {
                    let (parent, name) = split(&p);
                    t.open_dir(&parent).and_then(|d| d.chown(&name, 1234, 1234))
                }
                Op::Read(p) => t.read_capped(Path::new(&p), 1 << 20).map(drop),
            };
        }
        prop_assert_eq!(snapshot(&f.canary), before);
        // Nothing appeared beside the tree either.
        let siblings: Vec<_> = std::fs::read_dir(f.root.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        prop_assert_eq!(siblings.len(), 2);
    }
}
