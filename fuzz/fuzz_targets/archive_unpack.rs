//! Archive unpacking (#12): whatever bytes arrive as a build context, an `ADD`ed tarball or
//! an image layer, unpacking them into a layer never creates, changes or removes anything
//! outside it. A canary directory (a file, a subdirectory) sits beside the layer, and the
//! unpack runs with small limits so bombs end quickly.
#![no_main]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandpit_image::unpack::{UnpackLimits, Whiteouts, unpack_into};

fn state(dir: &Path) -> Vec<(String, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for p in [dir.to_path_buf(), dir.join("file"), dir.join("sub")] {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let body = if m.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
        out.push((p.display().to_string(), m.mode(), m.nlink(), body));
    }
    out.push(("entries".into(), std::fs::read_dir(dir).unwrap().count() as u32, 0, Vec::new()));
    out
}

fuzz_target!(|data: &[u8]| {
    let top = tempfile::tempdir().unwrap();
    let canary = top.path().join("canary");
    std::fs::create_dir_all(canary.join("sub")).unwrap();
    std::fs::write(canary.join("file"), "canary").unwrap();
    let layer = top.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    let before = state(&canary);
    let root = sandpit_fs::TreeDir::open(&layer).unwrap();
    let limits = UnpackLimits { max_bytes: 1 << 20, max_entries: 1000, max_depth: 32 };
    for whiteouts in [Whiteouts::Overlay, Whiteouts::Plain] {
        let _ = unpack_into(data, &root, whiteouts, &limits);
        assert_eq!(state(&canary), before, "something outside the layer changed");
        assert_eq!(std::fs::read_dir(top.path()).unwrap().count(), 2);
    }
});
