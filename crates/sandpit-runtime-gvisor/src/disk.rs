//! The sandbox's disk: where its writable layer lives, and the bound on its size.
//!
//! A sandbox with a disk limit keeps its writable layer in `disk.img`, a sparse ext4 image of
//! exactly that size, loop-mounted at `disk/` while the sandbox runs (or while its files are
//! copied out). The overlay's `upperdir` and `workdir` are `disk/upper` and `disk/work`, so a
//! full disk is `ENOSPC` inside the sandbox and never the host's problem. The image is mounted
//! with `discard`: deleting files inside punches holes in the image, so it takes on the host
//! only what the sandbox holds.
//!
//! A state directory without `disk.img` (no limit, or written by an older version) keeps its
//! layer in `upper/` and `work/` directly, as before.
#![expect(
    clippy::disallowed_methods,
    reason = "disk images and their mount points are host-owned paths under the state dir; /sys/block is the kernel's"
)]

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::mounts;

/// The image file of a sandbox's disk.
pub(crate) fn image_of(state_dir: &Path) -> PathBuf {
    state_dir.join("disk.img")
}

/// Where the disk is mounted.
pub(crate) fn mount_point_of(state_dir: &Path) -> PathBuf {
    state_dir.join("disk")
}

/// Whether the state directory keeps its writable layer on a disk image.
pub(crate) fn has_disk(state_dir: &Path) -> bool {
    image_of(state_dir).is_file()
}

/// The overlay's upper and work directories for `state_dir`.
pub(crate) fn layer_dirs(state_dir: &Path) -> (PathBuf, PathBuf) {
    if has_disk(state_dir) {
        let m = mount_point_of(state_dir);
        (m.join("upper"), m.join("work"))
    } else {
        (state_dir.join("upper"), state_dir.join("work"))
    }
}

/// The smallest disk we make: ext4's journal and metadata need a few MiB of it.
pub const MIN_DISK_BYTES: u64 = 16 << 20;

/// Makes the sparse ext4 image of `bytes` bytes at `image` (atomically: a crash leaves no
/// half-made image). Blocking.
pub(crate) fn create_image(image: &Path, bytes: u64) -> io::Result<()> {
    if bytes < MIN_DISK_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a disk must be at least {MIN_DISK_BYTES} bytes, not {bytes}"),
        ));
    }
    let tmp = image.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        f.set_len(bytes)?;
        drop(f);
        // -m 0: no blocks reserved for root (the sandbox's root writes through runsc, as host
        // root). Lazy init keeps the image sparse and mkfs fast; `-E root_owner` leaves the
        // root directory to root.
        run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
                "-L",
                "sandpit",
            ])
            .arg(&tmp))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, image)?;
        if let Some(parent) = image.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Grows the unmounted disk of `state_dir` to `bytes` if it is smaller (the image and its
/// filesystem); a larger disk is left as it is. Blocking.
pub(crate) fn grow(state_dir: &Path, bytes: u64) -> io::Result<()> {
    let image = image_of(state_dir);
    let size = std::fs::metadata(&image)?.len();
    if size >= bytes || mounts::mounted_fstype(&mount_point_of(state_dir))?.is_some() {
        return Ok(());
    }
    wait_released(&image)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)?
        .set_len(bytes)?;
    // -f: the filesystem was cleanly unmounted, no fsck needed first. On failure the image
    // is only longer than its filesystem, which is harmless.
    run(Command::new("resize2fs").arg("-f").arg(&image))?;
    tracing::info!(image = %image.display(), from = size, to = bytes, "grew the sandbox's disk");
    Ok(())
}

/// Grows the mounted disk of a running sandbox to `bytes` if it is smaller: the image, its
/// loop device (`losetup -c`) and its filesystem (`resize2fs`, online). A larger disk is left
/// as it is. If the filesystem cannot grow online (the kernel needs CAP_SYS_RESOURCE, which
/// some containers lack), the image and the loop device are put back to their size, so the
/// next start grows it offline ([`grow`]), and the error says why. Blocking.
pub(crate) fn grow_mounted(state_dir: &Path, bytes: u64) -> io::Result<()> {
    let image = image_of(state_dir);
    let size = std::fs::metadata(&image)?.len();
    if size >= bytes {
        return Ok(());
    }
    let device = loop_device_of(&image).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not attached to a loop device", image.display()),
        )
    })?;
    let device = format!("/dev/{device}");
    let set_len = |len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)?
            .set_len(len)?;
        run(Command::new("losetup").arg("-c").arg(&device))
    };
    set_len(bytes)?;
    if let Err(e) = run(Command::new("resize2fs").arg(&device)) {
        // Nothing was written past the old end: the filesystem did not grow.
        set_len(size)?;
        return Err(e);
    }
    tracing::info!(image = %image.display(), from = size, to = bytes, "grew a running sandbox's disk");
    Ok(())
}

/// Mounts the disk of `state_dir` at `disk/` unless it is mounted already, and makes sure
/// `upper/` and `work/` exist on it. Blocking.
pub(crate) fn mount(state_dir: &Path) -> io::Result<()> {
    let target = mount_point_of(state_dir);
    mount_image(&image_of(state_dir), &target)?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(target.join(d))?;
    }
    Ok(())
}

/// Loop-mounts the ext4 `image` at `target` (created if missing) unless an ext4 is mounted
/// there already. Blocking.
pub(crate) fn mount_image(image: &Path, target: &Path) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    match mounts::mounted_fstype(target)? {
        Some(fs) if fs == "ext4" => {}
        Some(fs) => {
            return Err(io::Error::other(format!(
                "{} is already mounted with {fs}",
                target.display()
            )));
        }
        None => {
            // The image's last mount may still be shutting down (see `unmount`).
            wait_released(image)?;
            // util-linux sets up the loop device with autoclear: it goes away with the mount.
            run(Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,discard,noatime,nosuid,nodev"])
                .arg(image)
                .arg(target))?;
        }
    }
    Ok(())
}

/// How long [`unmount`] waits for the kernel to let go of the image.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// Unmounts the disk of `state_dir` if it is mounted, and waits until no loop device holds
/// its image any more. Blocking.
///
/// Unmounting our mount point is not enough: runsc's private mount namespace holds a copy of
/// the mount until the kernel has torn that namespace down, and a lazily detached mount lives
/// on while it is busy. Only when the filesystem is shut down is everything written to the
/// image, and only then may the image be copied or mounted again (two live ext4 instances
/// over one image would corrupt it). The filesystem is synced first, so the data is in the
/// image even before that.
pub(crate) fn unmount(state_dir: &Path) -> io::Result<()> {
    unmount_image(&image_of(state_dir), &mount_point_of(state_dir))
}

/// [`unmount`] for the ext4 `image` mounted at `target`. Blocking.
pub(crate) fn unmount_image(image: &Path, target: &Path) -> io::Result<()> {
    if mounts::mounted_fstype(target)?.is_some_and(|fs| fs == "ext4")
        && let Ok(dir) = rustix::fs::open(
            target,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    {
        rustix::fs::syncfs(&dir)?;
    }
    mounts::unmount(target)?;
    wait_released(image)
}

/// Waits until no loop device holds `image` (see [`unmount`]). Blocking.
pub(crate) fn wait_released(image: &Path) -> io::Result<()> {
    if !image.exists() {
        return Ok(());
    }
    let image = std::fs::canonicalize(image)?;
    let started = Instant::now();
    while let Some(dev) = loop_device_of(&image) {
        if started.elapsed() > RELEASE_TIMEOUT {
            return Err(io::Error::other(format!(
                "{} still holds {} after {RELEASE_TIMEOUT:?}",
                dev,
                image.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if started.elapsed() > Duration::from_millis(1) {
        tracing::debug!(
            image = %image.display(),
            waited_ms = started.elapsed().as_millis() as u64,
            "the image's loop device was released"
        );
    }
    Ok(())
}

/// The loop device (`loopN`) backed by `image`, if any, from sysfs.
fn loop_device_of(image: &Path) -> Option<String> {
    let want = image.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.strip_suffix(b"\n").unwrap_or(&backing);
            // A deleted backing file reads as "<path> (deleted)".
            (backing == want).then_some(name)
        })
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, work) = layer_dirs(dir.path());
        assert_eq!(upper, dir.path().join("upper"));
        assert_eq!(work, dir.path().join("work"));
        std::fs::write(image_of(dir.path()), b"").unwrap();
        let (upper, work) = layer_dirs(dir.path());
        assert_eq!(upper, dir.path().join("disk/upper"));
        assert_eq!(work, dir.path().join("disk/work"));
    }

    #[test]
    fn refuses_tiny_disks() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_of(dir.path());
        let e = create_image(&image, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(!image.exists());
    }
}
