//! The isolation runtime seam: what the control plane asks of a sandbox backend.
//!
//! The server never runs `runsc` (or, later, Firecracker) itself; it calls a [`Runtime`].
//! A backend owns everything below this trait: bundles, root filesystem mounts, the runtime's
//! own state directory, and any quirk workarounds.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]

#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod phases;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Everything a backend needs to boot or restore one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The backend-level id. Fixed length (ids are prefix-matched by runsc).
    pub id: String,
    /// Read-only root filesystem layers, lowest first. The sandbox sees their union.
    pub layers: Vec<PathBuf>,
    /// A directory the backend owns for this sandbox: writable upper layer, bundle, mount
    /// point. Files written inside the sandbox persist here across stop/start.
    pub state_dir: PathBuf,
    /// The init process (the agent) and its arguments.
    pub args: Vec<String>,
    /// Environment of the init process, `KEY=VALUE`.
    pub env: Vec<String>,
    pub hostname: String,
    /// Where the sandbox's network lives; `None` runs it without a network.
    pub network: Option<NetworkAttachment>,
    pub resources: Resources,
    /// Volumes (made by [`Runtime::create_volume`]) to mount into the sandbox. A restore must
    /// name the same destinations as the sandbox that was checkpointed.
    pub volumes: Vec<VolumeMount>,
}

/// A volume mounted into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The volume's directory, as given to [`Runtime::create_volume`].
    pub dir: PathBuf,
    /// Absolute path inside the sandbox (validated by the caller: normalized, not `/`, no
    /// two of one sandbox nested).
    pub destination: String,
    /// Writes fail with `EROFS`, enforced on the host side too (a restored sandbox keeps
    /// the mount flags of the image it was checkpointed with, so the sandbox's own view is
    /// not enough).
    pub read_only: bool,
}

/// A network namespace prepared for a sandbox (see `sandpit-net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    /// `/var/run/netns/<name>`.
    pub netns_path: PathBuf,
    /// Interface inside the namespace that the sandbox uses.
    pub ifname: String,
    /// The sandbox's address on that interface.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The host side of the link, the sandbox's default gateway.
    pub gateway: Ipv4Addr,
}

/// Limits enforced on the host (cgroups for gVisor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// CPU quota in thousandths of a core.
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    /// Size of the disk that holds the files the sandbox writes; writes past it fail with
    /// `ENOSPC` inside the sandbox. `None`: no bound (the host's free space). Applies when the
    /// sandbox's files are first created; they keep their disk across stop, fork and
    /// snapshots, and it grows (never shrinks) when they start with a larger one.
    pub disk_bytes: Option<u64>,
}

/// What the backend knows of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeStatus {
    Running,
    /// Exists in the backend but no longer runs (exited, crashed or OOM-killed).
    Stopped,
    /// The backend has no such sandbox.
    Missing,
}

/// Errors of runtime backends.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("preparing the root filesystem of {id}")]
    Rootfs {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the bundle of {id}")]
    Bundle {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("running {command} for {id}: {stderr}")]
    Command {
        id: String,
        command: String,
        stderr: String,
    },
    #[error("spawning {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint of {id} refused: {reason}")]
    CheckpointRefused { id: String, reason: String },
    /// A live resize that was refused or failed; nothing changed unless `reason` says so.
    #[error("resizing {id}: {reason}")]
    Resize { id: String, reason: String },
    #[error("copying the files of {from} to {to}")]
    CopyFiles {
        from: PathBuf,
        to: PathBuf,
        detail: String,
    },
    #[error("removing the files of {id}")]
    Cleanup {
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// A volume that could not be made, mounted or removed.
    #[error("volume {dir}: {reason}")]
    Volume { dir: PathBuf, reason: String },
    /// A backend's own failure outside the operations above (its host checks, its
    /// maintenance), with the backend's error as the source.
    #[error("{backend} backend: {what}")]
    Backend {
        backend: &'static str,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Work a caller runs alongside a backend's (see [`Runtime::checkpoint_then`]).
pub type Meanwhile<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// A sandbox backend.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Short backend name for logs and `/meta/info` (`gvisor`, `firecracker`).
    fn name(&self) -> &'static str;

    /// Cold-boot a sandbox and return once its init process runs. On error nothing is left
    /// running or mounted (files in `state_dir` stay).
    ///
    /// Volumes ([`SandboxSpec::volumes`]): start and restore make each available (a volume
    /// stays ready on the host while any sandbox of this backend instance mounts it) and
    /// stop, destroy and checkpoint release them once the sandbox no longer runs; the last
    /// user's release unmounts it. [`Runtime::remove_orphans`] rebuilds this from the kept
    /// sandboxes and releases every other volume.
    async fn start(&self, spec: &SandboxSpec) -> Result<(), RuntimeError>;

    /// Save memory and process state to `image_dir` and stop the sandbox. The image is
    /// complete and durable (fsynced) when this returns. Files stay in `state_dir`.
    async fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<(), RuntimeError>;

    /// [`Runtime::checkpoint`], with `meanwhile` (the caller's own cleanup that needs the
    /// sandbox stopped, such as removing its network) run once the image is durable, while
    /// the backend releases the stopped sandbox's resources. Both are done when this
    /// returns; `meanwhile` does not run when the image could not be saved. The default
    /// runs it after [`Runtime::checkpoint`].
    async fn checkpoint_then(
        &self,
        id: &str,
        image_dir: &Path,
        meanwhile: Meanwhile<'_>,
    ) -> Result<(), RuntimeError> {
        self.checkpoint(id, image_dir).await?;
        meanwhile.await;
        Ok(())
    }

    /// Whether `image_dir` holds a complete image written by [`Runtime::checkpoint`] (one
    /// [`Runtime::restore`] can start from). The caller never looks inside an image: what
    /// makes one complete is the backend's business.
    fn has_image(&self, image_dir: &Path) -> bool;

    /// Start a sandbox from an image written by [`Runtime::checkpoint`]. `spec.id` may differ
    /// from the id that was checkpointed, and the network attachment may be another one.
    async fn restore(&self, spec: &SandboxSpec, image_dir: &Path) -> Result<(), RuntimeError>;

    /// Stop the sandbox and release its runtime resources (processes, mounts, runtime
    /// state), keeping the files in `state_dir`. Idempotent.
    async fn stop(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError>;

    /// [`Runtime::stop`], then remove `state_dir`. Idempotent.
    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError>;

    async fn status(&self, id: &str) -> Result<RuntimeStatus, RuntimeError>;

    /// Of `ids`, believed running, those that no longer run (died, were killed, or are
    /// gone). For a liveness watch over many sandboxes, so backends answer it with one
    /// cheap look where they can.
    async fn dead(&self, ids: &[String]) -> Result<Vec<String>, RuntimeError> {
        let mut dead = Vec::new();
        for id in ids {
            if self.status(id).await? != RuntimeStatus::Running {
                dead.push(id.clone());
            }
        }
        Ok(dead)
    }

    /// Copy the files a stopped sandbox wrote (its writable layer) from `from_state_dir` to
    /// the empty or missing `to_state_dir`, cheaply where the filesystem allows (reflinks).
    /// For fork and snapshots: the copy plus a memory image is a complete sandbox.
    async fn copy_files(
        &self,
        from_state_dir: &Path,
        to_state_dir: &Path,
    ) -> Result<(), RuntimeError>;

    /// Move the files a stopped sandbox wrote (its writable layer) out of `state_dir` into
    /// the missing directory `to_dir`, in overlayfs format (whiteouts are 0/0 character
    /// devices, opaque directories carry `trusted.overlay.opaque`), so `to_dir` can serve as
    /// a read-only layer of another sandbox. For template builds.
    async fn export_layer(&self, state_dir: &Path, to_dir: &Path) -> Result<(), RuntimeError>;

    /// Ids of every sandbox this backend instance holds (running or not), for reconciliation
    /// after a crash.
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;

    /// Stop and forget every sandbox this backend instance holds whose id is not in `keep`,
    /// and release what is left of sandboxes not kept below `state_dirs_root` (the parent of
    /// their `state_dir`s: mounts and the like). Files stay; the caller removes the
    /// directories it does not know. For reconciliation after a crash (`keep`: the sandboxes
    /// the store still runs) and for uninstalling (`keep` empty). Idempotent. Volume mounts
    /// of sandboxes not kept are released too (volume directories live in `volumes/`
    /// beside `state_dirs_root`).
    async fn remove_orphans(
        &self,
        keep: &HashSet<String>,
        state_dirs_root: &Path,
    ) -> Result<(), RuntimeError>;

    /// The backend's build (for gVisor, runsc's version line). A memory image restores only
    /// under the build that wrote it; another host compares before restoring one.
    fn build(&self) -> String {
        self.name().to_string()
    }

    /// Put the files a stopped sandbox wrote into the missing directory `to_dir` as plain
    /// regular files that [`Runtime::unpack_files`] on another host can take (hard links
    /// where the filesystem allows: nothing may start the sandbox while `to_dir` is read).
    /// `Ok(false)`, with nothing made, when these files cannot move (a layout that is not a
    /// set of regular files). For moving a hibernated sandbox through object storage.
    async fn pack_files(&self, state_dir: &Path, to_dir: &Path) -> Result<bool, RuntimeError> {
        let _ = (state_dir, to_dir);
        Ok(false)
    }

    /// Make the missing `state_dir` hold the files [`Runtime::pack_files`] put in `from_dir`
    /// (moved, not copied; `from_dir` is on the same filesystem). `from_dir` may come from
    /// another host: anything in it but the files `pack_files` makes is refused.
    async fn unpack_files(&self, from_dir: &Path, state_dir: &Path) -> Result<(), RuntimeError> {
        Err(RuntimeError::CopyFiles {
            from: from_dir.into(),
            to: state_dir.into(),
            detail: format!(
                "the {} backend cannot move files between hosts",
                self.name()
            ),
        })
    }

    /// Change the limits of running sandbox `id` at once: its CPU and memory to
    /// `resources`', and its disk to `resources.disk_bytes` if that is larger (a disk only
    /// grows; a backend that cannot grow it while running grows it at the next start from
    /// the files, which takes `disk_bytes` then). Refuses memory below what the sandbox uses
    /// now ([`RuntimeError::Resize`]), changing nothing. Backends that cannot resize say so
    /// with [`RuntimeError::Resize`].
    async fn update_resources(
        &self,
        id: &str,
        state_dir: &Path,
        resources: &Resources,
    ) -> Result<(), RuntimeError> {
        let _ = (state_dir, resources);
        Err(RuntimeError::Resize {
            id: id.into(),
            reason: format!(
                "the {} backend cannot resize a running sandbox",
                self.name()
            ),
        })
    }

    /// Make a volume of `bytes` in the missing directory `dir`: storage that outlives
    /// sandboxes, bounded to `bytes` (writes past it fail with `ENOSPC` inside the sandbox),
    /// mounted by [`SandboxSpec::volumes`]. Blocking work is the backend's. On error nothing
    /// is left in `dir`. Backends without volumes refuse.
    async fn create_volume(&self, dir: &Path, bytes: u64) -> Result<(), RuntimeError> {
        let _ = bytes;
        Err(RuntimeError::Volume {
            dir: dir.into(),
            reason: format!("the {} backend has no volumes", self.name()),
        })
    }

    /// Remove the volume in `dir` (made by [`Runtime::create_volume`]) and its data.
    /// Refused ([`RuntimeError::Volume`]) while a sandbox of this backend instance mounts it.
    /// Idempotent: a missing `dir` is fine.
    async fn delete_volume(&self, dir: &Path) -> Result<(), RuntimeError> {
        let _ = dir;
        Ok(())
    }

    /// Put the volume in `dir`, which no sandbox mounts, into the missing directory `to_dir`
    /// as plain regular files that [`Runtime::unpack_volume`] on another host takes (hard
    /// links where the filesystem allows). Refused while a sandbox of this backend instance
    /// mounts it. For moving a volume through object storage.
    async fn pack_volume(&self, dir: &Path, to_dir: &Path) -> Result<(), RuntimeError> {
        let _ = to_dir;
        Err(RuntimeError::Volume {
            dir: dir.into(),
            reason: format!("the {} backend cannot move volumes", self.name()),
        })
    }

    /// Make the missing `dir` the volume [`Runtime::pack_volume`] put in `from_dir` (moved,
    /// not copied; same filesystem). `from_dir` may come from another host: anything but
    /// what `pack_volume` makes is refused, and nothing is left in `dir` then.
    async fn unpack_volume(&self, from_dir: &Path, dir: &Path) -> Result<(), RuntimeError> {
        let _ = from_dir;
        Err(RuntimeError::Volume {
            dir: dir.into(),
            reason: format!("the {} backend cannot move volumes", self.name()),
        })
    }

    /// Kill (SIGKILL) the direct children of the sandbox's init process whose command name
    /// is `comm`, leaving init and everything else running. Returns how many were killed.
    /// For an init that restarts its child (Sandpit's agent does), this restarts a wedged
    /// service without losing the sandbox's memory. Backends that cannot do it return 0.
    async fn kill_init_children(&self, id: &str, comm: &str) -> Result<usize, RuntimeError> {
        let _ = (id, comm);
        Ok(0)
    }

    /// A short, human-readable account of a sandbox's state for an error report (is it
    /// alive, what runs inside, its last console output). Never fails: what cannot be
    /// read is said so.
    async fn diagnose(&self, id: &str, state_dir: &Path) -> String {
        let _ = state_dir;
        match self.status(id).await {
            Ok(s) => format!("runtime status: {s:?}"),
            Err(e) => format!("runtime status unknown: {e}"),
        }
    }
}
