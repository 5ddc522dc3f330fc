//! Volumes: storage that outlives sandboxes.
//!
//! A volume's directory holds `volume.img`, a sparse ext4 image of the volume's size (made
//! like a sandbox's disk, [`disk::create_image`]). While any sandbox of this backend mounts
//! it, the image is loop-mounted at `mnt/` on the host ([`Users`] counts the sandboxes), and
//! each sandbox gets `mnt/data` bind-mounted at its own mount point
//! `<state dir>/volumes/<i>` inside the private mount namespace runsc runs in (so nothing of
//! it is left on the host when the sandbox ends), read-only there when asked: a restored
//! sandbox keeps the mount flags of its image, so a read-only view must be read-only on the
//! host side. The host never walks the volume's tree: it only makes `data/` at its root,
//! which sandboxes cannot reach (they see what is below it).
#![expect(
    clippy::disallowed_methods,
    reason = "volume images, their mount points and state-dir records are host-owned paths"
)]

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{disk, mounts};

/// The image file of a volume.
pub(crate) fn image_of(dir: &Path) -> PathBuf {
    dir.join("volume.img")
}

/// Where the image is mounted on the host.
pub(crate) fn mount_point_of(dir: &Path) -> PathBuf {
    dir.join("mnt")
}

/// What sandboxes see: a directory at the root of the volume's filesystem.
pub(crate) fn data_of(dir: &Path) -> PathBuf {
    mount_point_of(dir).join("data")
}

/// The record in a sandbox's state dir of the volumes it mounts (for [`Users::adopt`]).
pub(crate) fn record_of(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes.json")
}

/// The mount point of a sandbox's `i`th volume, in its state dir.
pub(crate) fn bind_point(state_dir: &Path, i: usize) -> PathBuf {
    state_dir.join("volumes").join(i.to_string())
}

/// Makes the volume: `dir` (which must not exist) with its image. On error `dir` is gone.
/// Blocking.
pub(crate) fn create(dir: &Path, bytes: u64) -> io::Result<()> {
    std::fs::create_dir(dir)?;
    let made = disk::create_image(&image_of(dir), bytes);
    if made.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    made
}

/// The file name of a volume's image in a packed volume.
const PACKED_IMAGE: &str = "volume.img";

/// Puts the (unused) volume in `dir` into the missing `to`: its image, unmounted first, as
/// one hard link. Blocking.
pub(crate) fn pack(dir: &Path, to: &Path) -> io::Result<()> {
    unmount(dir)?;
    std::fs::create_dir(to)?;
    std::fs::hard_link(image_of(dir), to.join(PACKED_IMAGE))
}

/// Makes the missing `dir` the volume packed in `from` (maybe from another host): `from`
/// must hold exactly one regular file, the image, which is moved. Blocking.
pub(crate) fn unpack(from: &Path, dir: &Path) -> io::Result<()> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            return Err(io::Error::other("a packed volume holds only its image"));
        }
        names.push(entry.file_name());
    }
    if names != [std::ffi::OsString::from(PACKED_IMAGE)] {
        return Err(io::Error::other("a packed volume holds only its image"));
    }
    std::fs::create_dir(dir)?;
    if let Err(e) = std::fs::rename(from.join(PACKED_IMAGE), image_of(dir)) {
        let _ = std::fs::remove_dir_all(dir);
        return Err(e);
    }
    Ok(())
}

/// Removes the (unmounted) volume. Idempotent. Blocking.
pub(crate) fn delete(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    unmount(dir)?;
    std::fs::remove_dir_all(dir)
}

fn mount(dir: &Path) -> io::Result<()> {
    if !image_of(dir).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no volume in {}", dir.display()),
        ));
    }
    disk::mount_image(&image_of(dir), &mount_point_of(dir))?;
    let data = data_of(dir);
    // Only the host writes the filesystem's root; `data` is never something a sandbox made.
    match std::fs::symlink_metadata(&data) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::other(format!(
            "{} is not a directory",
            data.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&data),
        Err(e) => Err(e),
    }
}

fn unmount(dir: &Path) -> io::Result<()> {
    disk::unmount_image(&image_of(dir), &mount_point_of(dir))
}

/// Which sandboxes (runtime ids) of this backend instance mount each volume (by directory).
/// A volume is mounted on the host while its set is not empty. Its methods block (they
/// mount and unmount under the lock).
#[derive(Debug, Default)]
pub(crate) struct Users(Mutex<HashMap<PathBuf, HashSet<String>>>);

impl Users {
    /// Sandbox `id` is about to start with the volumes in `dirs`: mount each that is not
    /// mounted yet and count `id` as a user. On error, whatever this call mounted is released.
    pub(crate) fn acquire(&self, id: &str, dirs: &[PathBuf]) -> io::Result<()> {
        let mut map = self.0.lock().expect("volume users poisoned");
        for (n, dir) in dirs.iter().enumerate() {
            let users = map.entry(dir.clone()).or_default();
            let fresh = users.is_empty();
            let mounted = if fresh { mount(dir) } else { Ok(()) };
            match mounted {
                Ok(()) => {
                    users.insert(id.to_string());
                }
                Err(e) => {
                    if fresh {
                        map.remove(dir);
                    }
                    for done in &dirs[..n] {
                        let _ = release_one(&mut map, done, id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Sandbox `id` no longer runs: it stops counting, and a volume it was the last user of
    /// is unmounted (after runsc's namespaces let go of it). Idempotent.
    pub(crate) fn release(&self, id: &str) -> io::Result<()> {
        let mut map = self.0.lock().expect("volume users poisoned");
        let dirs: Vec<PathBuf> = map
            .iter()
            .filter(|(_, users)| users.contains(id))
            .map(|(dir, _)| dir.clone())
            .collect();
        let mut first_err = None;
        for dir in dirs {
            if let Err(e) = release_one(&mut map, &dir, id) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Whether a sandbox mounts the volume in `dir`.
    pub(crate) fn in_use(&self, dir: &Path) -> bool {
        let map = self.0.lock().expect("volume users poisoned");
        map.get(dir).is_some_and(|u| !u.is_empty())
    }

    /// After a restart: sandbox `id` runs with the volumes in `dirs` (mounted already).
    pub(crate) fn adopt(&self, id: &str, dirs: &[PathBuf]) {
        let mut map = self.0.lock().expect("volume users poisoned");
        for dir in dirs {
            map.entry(dir.clone()).or_default().insert(id.to_string());
        }
    }

    /// Every volume directory some sandbox uses.
    pub(crate) fn used(&self) -> HashSet<PathBuf> {
        let map = self.0.lock().expect("volume users poisoned");
        map.iter()
            .filter(|(_, u)| !u.is_empty())
            .map(|(d, _)| d.clone())
            .collect()
    }
}

fn release_one(
    map: &mut HashMap<PathBuf, HashSet<String>>,
    dir: &Path,
    id: &str,
) -> io::Result<()> {
    let Some(users) = map.get_mut(dir) else {
        return Ok(());
    };
    users.remove(id);
    if !users.is_empty() {
        return Ok(());
    }
    map.remove(dir);
    unmount(dir)
}

/// Writes the record of the volumes a sandbox mounts. Blocking.
pub(crate) fn write_record(state_dir: &Path, dirs: &[PathBuf]) -> io::Result<()> {
    let path = record_of(state_dir);
    if dirs.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let text = serde_json::to_vec(dirs).map_err(io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The volumes a sandbox's record names (none if it has no record). Bounded read.
pub(crate) fn read_record(state_dir: &Path) -> io::Result<Vec<PathBuf>> {
    use std::io::Read;
    let file = match std::fs::File::open(record_of(state_dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut text = Vec::new();
    file.take(1 << 20).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(io::Error::other)
}

/// The volumes mounted below `volumes_root` (`<root>/<volume>/mnt`), from mountinfo.
pub(crate) fn mounted_under(volumes_root: &Path) -> io::Result<Vec<PathBuf>> {
    let root = match std::fs::canonicalize(volumes_root) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    Ok(mounts::mountinfo()?
        .into_iter()
        .filter(|m| m.fstype == "ext4" && m.mount_point.file_name().is_some_and(|n| n == "mnt"))
        .filter_map(|m| m.mount_point.parent().map(Path::to_path_buf))
        .filter(|dir| dir.parent() == Some(root.as_path()))
        .collect())
}

/// Unmounts the volume in `dir` (an orphan: no sandbox uses it). Blocking.
pub(crate) fn unmount_orphan(dir: &Path) -> io::Result<()> {
    unmount(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_record(dir.path()).unwrap().is_empty());
        let dirs = vec![
            PathBuf::from("/d/volumes/v1"),
            PathBuf::from("/d/volumes/v2"),
        ];
        write_record(dir.path(), &dirs).unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), dirs);
        write_record(dir.path(), &[]).unwrap();
        assert!(!record_of(dir.path()).exists());
    }

    #[test]
    fn a_missing_volume_is_not_mounted() {
        let users = Users::default();
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("nope");
        assert!(users.acquire("sb1", std::slice::from_ref(&v)).is_err());
        assert!(!users.in_use(&v));
        assert!(users.used().is_empty());
    }
}
