//! The overlayfs root of a sandbox, and reading `/proc/self/mountinfo`.
#![expect(
    clippy::disallowed_methods,
    reason = "/proc/self/mountinfo is the kernel's"
)]

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::spec::lowerdir;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountInfo {
    /// Root of the mount within its filesystem.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub super_options: String,
}

/// Parses mountinfo text (see proc(5)); octal escapes (`\040`) are decoded.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                root: PathBuf::from(unescape(left.get(3)?)),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                fstype: right.first()?.to_string(),
                super_options: right.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn mountinfo() -> io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The fstype mounted exactly at `path`, if any (the topmost mount wins).
pub(crate) fn mounted_fstype(path: &Path) -> io::Result<Option<String>> {
    Ok(mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.fstype))
}

/// Mounts an overlay of `layers` (lowest first) with `upper`/`work` at `target`. Blocking.
pub(crate) fn mount_overlay(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> io::Result<()> {
    for p in layers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) || !p.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("overlay path {s:?} must be absolute and free of ',', ':' and '\\'"),
            ));
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir(layers),
        upper.display(),
        work.display()
    );
    if data.len() >= 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "overlay options are {} bytes, mount(2) takes at most 4095: use fewer or shorter layer paths",
                data.len()
            ),
        ));
    }
    let data = CString::new(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )?;
    Ok(())
}

/// Unmounts `target` if something is mounted there; lazily if it is busy. Blocking.
pub(crate) fn unmount(target: &Path) -> io::Result<()> {
    while mounted_fstype(target)?.is_some() {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::BUSY) => {
                tracing::warn!(path = %target.display(), "mount busy, detaching lazily");
                rustix::mount::unmount(target, UnmountFlags::DETACH)?;
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:30 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
36 22 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
37 22 0:32 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
90 22 0:50 / /data/sb\\040x/rootfs rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].mount_point, PathBuf::from("/"));
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[1].super_options, "rw,memory");
        assert_eq!(
            m[2].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m[3].fstype, "cgroup2");
        assert_eq!(m[4].mount_point, PathBuf::from("/data/sb x/rootfs"));
        assert_eq!(m[4].fstype, "overlay");
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("plain"), "plain");
    }

    #[test]
    fn rejects_bad_overlay_paths() {
        let e = mount_overlay(
            &["/a,b".into()],
            Path::new("/u"),
            Path::new("/w"),
            Path::new("/t"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = mount_overlay(
            &["rel".into()],
            Path::new("/u"),
            Path::new("/w"),
            Path::new("/t"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let long: Vec<PathBuf> = (0..100).map(|i| format!("/{i:0>60}").into()).collect();
        let e =
            mount_overlay(&long, Path::new("/u"), Path::new("/w"), Path::new("/t")).unwrap_err();
        assert!(e.to_string().contains("4095"));
    }
}
