//! The gVisor backend of [`sandpit_runtime::Runtime`]: drives `runsc` through its OCI CLI.
//!
//! Per sandbox, `state_dir` holds the writable overlay layer, `rootfs/` (the overlayfs mount
//! over the read-only layers, runsc's root), `bundle/config.json` and `console.log` (stdout
//! and stderr of the init process, appended). The writable layer is `disk/upper` and
//! `disk/work` on `disk.img`, an ext4 image of the sandbox's disk limit loop-mounted at
//! `disk/` (see [`disk`]); without a limit it is `upper/` and `work/` directly. runsc runs
//! with `--overlay2=none`, so files written inside the sandbox land in the upper layer and
//! survive stop/start; `/tmp` is bind-mounted from the rootfs so it is on disk too.
//!
//! Quirks handled here (runsc 0.0~20240729, kernel ≥ 6.8):
//! - `runsc run|restore` execute in a private mount namespace with a tmpfs over
//!   `/proc/sys/net` (google/gvisor#10704, "cannot run with network enabled in root network
//!   namespace").
//! - runsc moves the veth's address and routes into its netstack; they are put back on the
//!   interface before every start and restore.
//! - A checkpoint with a connected TCP endpoint fails and kills the sandbox: reported as
//!   [`RuntimeError::CheckpointRefused`].
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]
#![expect(
    clippy::disallowed_methods,
    reason = "state dirs, bundles, checkpoint images and the runsc root are host-owned paths; the sandbox's own files are reached only by runsc, or by `cp -a` (no symlink followed) on a stopped disk"
)]

mod cgroup;
mod disk;
mod error;
mod mounts;
mod procs;
mod reaper;
mod spec;
mod volume;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandpit_runtime::phases::{self, Phase};
use sandpit_runtime::{NetworkAttachment, Runtime, RuntimeError, RuntimeStatus, SandboxSpec};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

pub use cgroup::CgroupLimits;
pub use disk::MIN_DISK_BYTES;
pub use error::GvisorError;
pub use procs::host_pids;
pub use reaper::{reap_adopted, spawn_reaper};

/// How long a `runsc run`/`restore` may take before it is killed.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long other runsc commands may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// After `runsc delete`, how long to wait for the sandbox processes before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(3);
/// ... and after SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed checkpoint may take to kill the sandbox before we call it a survivor.
const CHECKPOINT_DEATH_WAIT: Duration = Duration::from_secs(4);
/// The name [`Runtime::pack_files`] gives the disk image it carries.
const DISK_FILE: &str = "disk.img";
/// The most of `console.log` quoted in an error.
const ERROR_TAIL: usize = 4000;

/// Configuration of a [`GvisorRuntime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GvisorConfig {
    /// The runsc binary; default `runsc` (looked up on PATH).
    pub runsc: PathBuf,
    /// runsc's `--root`: its state directory. One per server instance.
    pub root_dir: PathBuf,
    /// `systrap` (default), `ptrace` or `kvm`.
    pub platform: String,
    /// `linux.cgroupsPath` of a sandbox is `<cgroup_parent>/<id>`. Relative (the default
    /// `sandpit`): below the server's own cgroup in every hierarchy; starting with `/`: from the
    /// hierarchy root.
    pub cgroup_parent: String,
    /// If set, runsc writes debug logs there (`--debug --debug-log=<dir>/`).
    pub debug_log_dir: Option<PathBuf>,
}

impl GvisorConfig {
    /// Defaults with the given runsc state directory.
    pub fn new(root_dir: impl Into<PathBuf>) -> Self {
        Self {
            runsc: "runsc".into(),
            root_dir: root_dir.into(),
            platform: "systrap".into(),
            cgroup_parent: "sandpit".into(),
            debug_log_dir: None,
        }
    }
}

/// What [`GvisorRuntime::cleanup_orphans`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrphanReport {
    /// runsc containers killed and deleted.
    pub removed: Vec<String>,
    /// Overlay and disk mounts unmounted.
    pub unmounted: Vec<PathBuf>,
}

/// Orphans torn down at once by [`GvisorRuntime::cleanup_orphans`].
pub const TEARDOWN_PARALLEL: usize = 16;

/// The gVisor backend.
#[derive(Debug, Clone)]
pub struct GvisorRuntime {
    cfg: GvisorConfig,
    /// runsc's version line, read once when first asked.
    build: std::sync::Arc<std::sync::OnceLock<String>>,
    /// The sandboxes that mount each volume (see [`volume`]).
    volumes: std::sync::Arc<volume::Users>,
    /// Per runtime id, what would otherwise take a runsc process (20 to 40 ms) to learn:
    /// its sentry, for the liveness watch (`dead`), and its state directory, for a
    /// checkpoint. Filled when this process boots a sandbox and when `runsc list` names the
    /// sentry of one adopted after a restart (no state directory then: a checkpoint asks
    /// `runsc state`); emptied at teardown.
    known: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Known>>>,
}

/// A sandbox's sentry (pid and start time) and, if this process booted it, its files.
#[derive(Debug, Clone)]
struct Known {
    sentry: procs::Started,
    state_dir: Option<PathBuf>,
}

/// Host tasks (processes and threads, each taking a pid) one idle sandbox holds, rounded up:
/// measured 46 on the ptrace platform (the sentry's and gofer's threads, a stub process per
/// address space).
pub const TASKS_PER_SANDBOX: u64 = 64;

/// How many tasks the kernel lets exist at once: the lower of `kernel.pid_max` and
/// `kernel.threads-max` (`None` if unreadable). Past it, a sandbox fails to start with
/// "resource temporarily unavailable".
pub fn host_task_limit() -> Option<u64> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(Path::new("/proc/sys/kernel").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("pid_max")?.min(read("threads-max")?))
}

/// Why `sandboxes` running sandboxes may not fit this host's task limit, if they may not.
pub fn task_limit_shortfall(sandboxes: u64) -> Option<String> {
    let limit = host_task_limit()?;
    let needed = sandboxes.saturating_mul(TASKS_PER_SANDBOX) + 4096;
    (limit < needed).then(|| {
        format!(
            "this host allows {limit} tasks (the lower of kernel.pid_max and \
             kernel.threads-max); {sandboxes} sandboxes need about {needed} (each one is \
             about {TASKS_PER_SANDBOX} host threads); raise it, e.g. \
             `sysctl -w kernel.pid_max=4194304` (and kernel.threads-max if lower)"
        )
    })
}

/// Checks that this host can run sandboxes: root, runsc, unshare, ip and overlayfs. Returns
/// runsc's version line.
pub fn check_host(runsc: &Path) -> Result<String, GvisorError> {
    if !rustix::process::geteuid().is_root() {
        return Err(GvisorError::Host {
            reason: "the gVisor backend must run as root".into(),
        });
    }
    let version = tool_output(runsc, &["--version"])?;
    tool_output(Path::new("unshare"), &["--version"])?;
    tool_output(Path::new("ip"), &["-V"])?;
    let fs = std::fs::read_to_string("/proc/filesystems").map_err(|source| GvisorError::Read {
        path: "/proc/filesystems".into(),
        source,
    })?;
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err(GvisorError::Host {
            reason: "the kernel has no overlay filesystem (modprobe overlay)".into(),
        });
    }
    Ok(version
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Checks that this host can give sandboxes disk limits: loop devices and `mkfs.ext4`.
pub fn check_disk_support() -> Result<(), GvisorError> {
    tool_output(Path::new("mkfs.ext4"), &["-V"])?;
    if !Path::new("/dev/loop-control").exists() {
        return Err(GvisorError::Host {
            reason: "disk limits need loop devices and /dev/loop-control is missing \
                     (modprobe loop), or turn disk limits off"
                .into(),
        });
    }
    Ok(())
}

fn tool_output(program: &Path, args: &[&str]) -> Result<String, GvisorError> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GvisorError::ToolMissing {
            program: program.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(GvisorError::ToolFailed {
            command: format!("{} {}", program.display(), args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Which runsc command starts the sandbox.
enum Launch<'a> {
    Run,
    Restore(&'a Path),
}

/// Paths of a prepared sandbox.
struct Prepared {
    state_dir: PathBuf,
    bundle: PathBuf,
    /// When each phase of the preparation ran (on a blocking thread; recorded back in the
    /// measured task, see `sandpit_runtime::phases`).
    spans: Vec<(Phase, Instant, Instant)>,
}

/// Paths inside a state directory.
fn rootfs_of(state_dir: &Path) -> PathBuf {
    state_dir.join("rootfs")
}

fn bundle_of(state_dir: &Path) -> PathBuf {
    state_dir.join("bundle")
}

impl GvisorRuntime {
    /// Validates the configuration and creates the runsc state directory.
    pub fn new(mut cfg: GvisorConfig) -> Result<Self, GvisorError> {
        let parent = cfg.cgroup_parent.trim_start_matches('/');
        if parent.is_empty()
            || parent
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || !parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        {
            return Err(GvisorError::Config {
                reason: format!(
                    "cgroup_parent {:?} must be a path of [A-Za-z0-9-_.] components",
                    cfg.cgroup_parent
                ),
            });
        }
        if cfg.platform.is_empty() || !cfg.platform.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(GvisorError::Config {
                reason: format!("platform {:?} is not a runsc platform name", cfg.platform),
            });
        }
        std::fs::create_dir_all(&cfg.root_dir).map_err(|source| GvisorError::RootDir {
            path: cfg.root_dir.clone(),
            source,
        })?;
        cfg.root_dir =
            std::fs::canonicalize(&cfg.root_dir).map_err(|source| GvisorError::RootDir {
                path: cfg.root_dir.clone(),
                source,
            })?;
        Ok(Self {
            cfg,
            build: Default::default(),
            volumes: Default::default(),
            known: Default::default(),
        })
    }

    pub fn config(&self) -> &GvisorConfig {
        &self.cfg
    }

    /// `linux.cgroupsPath` of sandbox `id`.
    pub fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cfg.cgroup_parent.trim_end_matches('/'))
    }

    /// The cgroup directories of sandbox `id`, one per mounted hierarchy (they exist only while
    /// it runs).
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        let path = self.cgroups_path(id);
        cgroup::host_hierarchies()
            .iter()
            .map(|h| h.dir(&path))
            .collect()
    }

    /// Memory and CPU limits as applied in the sandbox's cgroup; `None` if it has none.
    pub fn cgroup_limits(&self, id: &str) -> Option<CgroupLimits> {
        cgroup::read_limits(&cgroup::host_hierarchies(), &self.cgroups_path(id))
    }

    /// Removes the (empty) `cgroup_parent` directories runsc creates. Best effort; for
    /// shutdown and tests.
    pub fn remove_cgroup_parent(&self) {
        let parent = self.cfg.cgroup_parent.trim_end_matches('/');
        for h in cgroup::host_hierarchies() {
            let mut dir = h.dir(parent);
            // Remove the parent and its own empty ancestors up to where it was rooted.
            for _ in 0..parent.split('/').filter(|c| !c.is_empty()).count() {
                if std::fs::remove_dir(&dir).is_err() {
                    break;
                }
                if !dir.pop() {
                    break;
                }
            }
        }
    }

    /// Kills and deletes every runsc container under our root that is not in `keep`, then
    /// unmounts every overlay mounted at `<dir>/rootfs` and every disk mounted at `<dir>/disk`
    /// below `state_dirs_root` that does not belong to a kept container. For server start-up
    /// after a crash.
    pub async fn cleanup_orphans(
        &self,
        keep: &HashSet<String>,
        state_dirs_root: &Path,
    ) -> Result<OrphanReport, GvisorError> {
        self.cleanup_orphans_with_progress(keep, state_dirs_root, &|_, _| {})
            .await
    }

    /// [`Self::cleanup_orphans`], calling `progress(done, total)` as each orphan is torn
    /// down ([`TEARDOWN_PARALLEL`] at a time: a teardown mostly waits, on runsc and on the
    /// sandbox's processes to go).
    pub async fn cleanup_orphans_with_progress(
        &self,
        keep: &HashSet<String>,
        state_dirs_root: &Path,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<OrphanReport, GvisorError> {
        use futures::StreamExt;
        let mut report = OrphanReport::default();
        let mut kept_state_dirs = HashSet::new();
        let mut orphans = Vec::new();
        for id in self.list().await? {
            let state_dir = self.state_json(&id).await?.and_then(|s| state_dir_of(&s));
            if keep.contains(&id) {
                if let Some(dir) = &state_dir {
                    let dirs = volume::read_record(dir).map_err(|source| GvisorError::Read {
                        path: volume::record_of(dir),
                        source,
                    })?;
                    self.volumes.adopt(&id, &dirs);
                }
                kept_state_dirs.extend(state_dir);
                continue;
            }
            orphans.push((id, state_dir));
        }
        let total = orphans.len();
        progress(0, total);
        let mut done = futures::stream::iter(orphans)
            .map(|(id, state_dir)| async move {
                tracing::info!(%id, "removing orphaned sandbox");
                let rootfs = state_dir.as_deref().map(rootfs_of);
                let was_mounted = match &rootfs {
                    Some(r) => mounts::mounted_fstype(r).ok().flatten().is_some(),
                    None => false,
                };
                self.teardown(&id, state_dir.as_deref()).await?;
                Ok::<_, RuntimeError>((id, rootfs.filter(|_| was_mounted)))
            })
            .buffer_unordered(TEARDOWN_PARALLEL);
        let mut first_err = None;
        while let Some(r) = done.next().await {
            match r {
                Ok((id, unmounted)) => {
                    report.removed.push(id);
                    report.unmounted.extend(unmounted);
                }
                // The others go on; the first failure is the answer.
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
            progress(report.removed.len(), total);
        }
        drop(done);
        if let Some(e) = first_err {
            return Err(e.into());
        }
        let root = match std::fs::canonicalize(state_dirs_root) {
            Ok(root) => root,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(source) => {
                return Err(GvisorError::Read {
                    path: state_dirs_root.into(),
                    source,
                });
            }
        };
        let mounts = mounts::mountinfo().map_err(|source| GvisorError::Read {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
        // Overlays first: each holds its sandbox's disk busy.
        let (overlays, disks): (Vec<_>, Vec<_>) = mounts
            .into_iter()
            .filter(|m| {
                matches!(
                    (m.fstype.as_str(), m.mount_point.file_name()),
                    ("overlay", Some(n)) if n == "rootfs"
                ) || matches!(
                    (m.fstype.as_str(), m.mount_point.file_name()),
                    ("ext4", Some(n)) if n == "disk"
                )
            })
            .partition(|m| m.fstype == "overlay");
        for m in overlays.into_iter().chain(disks) {
            let Some(state_dir) = m.mount_point.parent() else {
                continue;
            };
            if !m.mount_point.starts_with(&root)
                || kept_state_dirs.contains(state_dir)
                || report.unmounted.contains(&m.mount_point)
            {
                continue;
            }
            tracing::info!(path = %m.mount_point.display(), "unmounting orphaned {}", m.fstype);
            let target = m.mount_point.clone();
            blocking(move || mounts::unmount(&target))
                .await
                .map_err(|source| RuntimeError::Cleanup {
                    id: m.mount_point.display().to_string(),
                    source,
                })?;
            report.unmounted.push(m.mount_point);
        }
        // Volumes no kept sandbox mounts (they live in `volumes/` beside the state dirs).
        if let Some(data_dir) = root.parent() {
            let used = self.volumes.used();
            let volumes_root = data_dir.join("volumes");
            let mounted =
                volume::mounted_under(&volumes_root).map_err(|source| GvisorError::Read {
                    path: volumes_root.clone(),
                    source,
                })?;
            for dir in mounted.into_iter().filter(|d| !used.contains(d)) {
                tracing::info!(path = %dir.display(), "unmounting an orphaned volume");
                let d = dir.clone();
                blocking(move || volume::unmount_orphan(&d))
                    .await
                    .map_err(|source| RuntimeError::Cleanup {
                        id: dir.display().to_string(),
                        source,
                    })?;
                report.unmounted.push(volume::mount_point_of(&dir));
            }
        }
        Ok(report)
    }

    /// Global runsc flags.
    fn global_args(&self, network: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            format!("--root={}", self.cfg.root_dir.display()).into(),
            format!("--platform={}", self.cfg.platform).into(),
            "--overlay2=none".into(),
            // ICMP (ping) needs raw sockets in gVisor's netstack. They stay inside it: what
            // leaves the sandbox passes the slot's nftables chain, which drops spoofed
            // sources.
            "--net-raw".into(),
        ];
        if !network {
            a.push("--network=none".into());
        }
        if let Some(dir) = &self.cfg.debug_log_dir {
            a.push("--debug".into());
            a.push(format!("--debug-log={}/", dir.display()).into());
        }
        a
    }

    /// Runs a short runsc command with captured output.
    async fn runsc(&self, id: &str, args: &[&str]) -> Result<RunscOutput, RuntimeError> {
        let mut full = self.global_args(true);
        full.extend(args.iter().map(OsString::from));
        let command = format!("runsc {}", args.join(" "));
        let child = Command::new(&self.cfg.runsc)
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                command: command.clone(),
                source,
            })?;
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Ok(out) => out.map_err(|source| RuntimeError::Spawn {
                command: command.clone(),
                source,
            })?,
            Err(_) => {
                return Err(RuntimeError::Command {
                    id: id.into(),
                    command,
                    stderr: format!("timed out after {COMMAND_TIMEOUT:?}"),
                });
            }
        };
        Ok(RunscOutput {
            command,
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// `runsc state <id>` as JSON; `None` if runsc has no such container.
    async fn state_json(&self, id: &str) -> Result<Option<serde_json::Value>, RuntimeError> {
        let out = self.runsc(id, &["state", id]).await?;
        if !out.success {
            if out.stderr.contains("does not exist") {
                return Ok(None);
            }
            return Err(out.into_error(id));
        }
        let v: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Command {
                id: id.into(),
                command: out.command.clone(),
                stderr: format!("unparsable output ({e}): {}", out.stdout),
            })?;
        // runsc matches ids by prefix: only an exact match is this sandbox.
        if v["id"].as_str() != Some(id) {
            return Ok(None);
        }
        Ok(Some(v))
    }

    /// Whether runsc may know sandbox `id`: any of its metadata files in the root directory
    /// (`<id>_sandbox:<id>.state` and `.lock` in the runsc we run; a directory `<id>` in
    /// older layouts). False means it certainly does not.
    fn may_exist(&self, id: &str) -> bool {
        let root = &self.cfg.root_dir;
        [
            root.join(format!("{id}_sandbox:{id}.state")),
            root.join(format!("{id}_sandbox:{id}.lock")),
            root.join(id),
        ]
        .iter()
        .any(|p| p.symlink_metadata().is_ok())
    }

    /// A running sandbox's state directory and sentry pid, for a checkpoint: from what this
    /// process booted while its sentry runs (no process spawned), else from `runsc state`.
    /// An error if the sandbox is not running.
    async fn running_sandbox(
        &self,
        id: &str,
    ) -> Result<(Option<PathBuf>, Option<i32>), RuntimeError> {
        let not_running = |status: String| RuntimeError::Command {
            id: id.into(),
            command: "runsc checkpoint".into(),
            stderr: format!("sandbox is not running (status {status})"),
        };
        let booted = self
            .known
            .lock()
            .expect("sandbox map poisoned")
            .get(id)
            .and_then(|k| Some((k.state_dir.clone()?, k.sentry)));
        if let Some((state_dir, sentry)) = booted {
            if !sentry.still_running() {
                return Err(not_running("\"stopped\"".into()));
            }
            return Ok((Some(state_dir), Some(sentry.pid())));
        }
        let state = self
            .state_json(id)
            .await?
            .ok_or_else(|| RuntimeError::Command {
                id: id.into(),
                command: "runsc checkpoint".into(),
                stderr: "no such sandbox".into(),
            })?;
        if state["status"] != "running" {
            return Err(not_running(state["status"].to_string()));
        }
        let sentry_pid = state["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 0);
        Ok((state_dir_of(&state), sentry_pid))
    }

    /// [`Runtime::checkpoint`], and [`Runtime::checkpoint_then`] with `meanwhile`.
    #[tracing::instrument(level = "debug", name = "runsc.checkpoint", skip_all,
        fields(sandbox.runtime_id = %id))]
    async fn checkpoint_inner(
        &self,
        id: &str,
        image_dir: &Path,
        meanwhile: Option<sandpit_runtime::Meanwhile<'_>>,
    ) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let (state_dir, sentry_pid) = self.running_sandbox(id).await?;
        let io_err = |source: io::Error| RuntimeError::Cleanup {
            id: id.into(),
            source,
        };
        let name = image_dir
            .file_name()
            .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "bad image dir")))?
            .to_string_lossy()
            .into_owned();
        let parent = image_dir.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(io_err)?;
        let parent = std::fs::canonicalize(parent).map_err(io_err)?;
        let image_dir = parent.join(&name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io_err)?;

        let t_ckpt = Instant::now();
        let image_arg = format!("--image-path={}", tmp.display());
        let out = self.runsc(id, &["checkpoint", &image_arg, id]).await;
        let ckpt_time = t_ckpt.elapsed();
        phases::record(Phase::Checkpoint, t_ckpt, t_ckpt + ckpt_time);
        let out = match out {
            Ok(out) if out.success => out,
            failed => {
                let _ = std::fs::remove_dir_all(&tmp);
                let out = failed?;
                // A failed checkpoint usually kills the sandbox, which takes a second or two;
                // runsc's status flickers meanwhile, so watch the sentry process itself.
                let deadline = Instant::now() + CHECKPOINT_DEATH_WAIT;
                let died = loop {
                    match sentry_pid {
                        Some(pid) if procs::is_alive(pid) => {}
                        _ => break true,
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let fate = if died {
                    "the failed checkpoint killed the sandbox: call stop()".to_string()
                } else {
                    let status = self.status(id).await.unwrap_or(RuntimeStatus::Missing);
                    format!(
                        "the sandbox survived the failed checkpoint (status {status:?}): check \
                         status() before using it"
                    )
                };
                return Err(match refused_reason(&out.stderr) {
                    Some(reason) => RuntimeError::CheckpointRefused {
                        id: id.into(),
                        reason: format!(
                            "{reason} (close connections into the sandbox with RST before \
                             checkpointing); {fate}"
                        ),
                    },
                    None => RuntimeError::Command {
                        id: id.into(),
                        command: out.command,
                        stderr: format!("{}; {fate}", out.stderr),
                    },
                });
            }
        };
        drop(out);
        let (tmp2, image2) = (tmp.clone(), image_dir.clone());
        let published = phases::timed(
            Phase::Image,
            blocking(move || {
                sync_dir(&tmp2)?;
                publish_image(&tmp2, &image2)
            }),
        )
        .await;
        if let Err(e) = published {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io_err(e));
        }
        let t_stop = Instant::now();
        let teardown = phases::timed(Phase::Teardown, self.teardown(id, state_dir.as_deref()));
        match meanwhile {
            // The caller's cleanup (its network) and ours need nothing of each other.
            Some(meanwhile) => tokio::join!(teardown, meanwhile).0?,
            None => teardown.await?,
        }
        tracing::info!(
            %id,
            image = %image_dir.display(),
            checkpoint_ms = ckpt_time.as_millis() as u64,
            teardown_ms = t_stop.elapsed().as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "sandbox checkpointed"
        );
        Ok(())
    }

    /// Creates the state directory layout, mounts the overlay (or reuses the mount) and writes
    /// the bundle.
    async fn prepare(&self, spec: &SandboxSpec) -> Result<Prepared, RuntimeError> {
        validate(spec)?;
        let spec = spec.clone();
        let cgroups_path = self.cgroups_path(&spec.id);
        let id = spec.id.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare_blocking(&spec, &cgroups_path))
            .await
            .map_err(|e| RuntimeError::Rootfs {
                id,
                source: io::Error::other(e),
            })??;
        for &(phase, from, to) in &prepared.spans {
            phases::record(phase, from, to);
        }
        Ok(prepared)
    }

    /// Starts the sandbox with `runsc run|restore -detach` inside the mount-namespace
    /// workaround; its stdio goes to `console.log`.
    async fn launch(
        &self,
        spec: &SandboxSpec,
        prepared: &Prepared,
        launch: Launch<'_>,
    ) -> Result<(), RuntimeError> {
        let console_path = prepared.state_dir.join("console.log");
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(|source| RuntimeError::Bundle {
                id: spec.id.clone(),
                source,
            })?;
        let offset = console.metadata().map(|m| m.len()).unwrap_or(0);
        let console_err = console.try_clone().map_err(|source| RuntimeError::Bundle {
            id: spec.id.clone(),
            source,
        })?;
        let mut runsc_args = self.global_args(spec.network.is_some());
        let sub = match launch {
            Launch::Run => vec!["run".into(), "-detach".into()],
            Launch::Restore(image) => vec![
                "restore".into(),
                "-detach".into(),
                format!("--image-path={}", image.display()),
            ],
        };
        runsc_args.extend(sub.into_iter().map(OsString::from));
        // Where runsc writes the sandbox process's pid: how the start is confirmed below
        // without another runsc process.
        let pid_file = prepared.state_dir.join("sandbox.pid");
        let _ = std::fs::remove_file(&pid_file);
        runsc_args.push(format!("--pid-file={}", pid_file.display()).into());
        runsc_args.push(format!("--bundle={}", prepared.bundle.display()).into());
        runsc_args.push(spec.id.clone().into());
        let command = match launch {
            Launch::Run => "runsc run",
            Launch::Restore(_) => "runsc restore",
        };
        // Each volume's data is bind-mounted at the sandbox's own mount point in this private
        // namespace only (read-only there when asked); paths travel as arguments, never as
        // script text.
        let mut script = String::from("mount -t tmpfs none /proc/sys/net && ");
        let mut script_args: Vec<OsString> = Vec::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let flags = if v.read_only {
                "remount,bind,ro,nosuid,nodev"
            } else {
                "remount,bind,nosuid,nodev"
            };
            script.push_str(&format!(
                r#"mount --bind "$1" "$2" && mount -o {flags} "$2" && shift 2 && "#
            ));
            script_args.push(volume::data_of(&v.dir).into());
            script_args.push(volume::bind_point(&prepared.state_dir, i).into());
        }
        script.push_str(r#"exec "$@""#);
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .arg("sh")
            .args(&script_args)
            .arg(&self.cfg.runsc)
            .args(&runsc_args)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            command: "unshare".into(),
            source,
        })?;
        let status = match tokio::time::timeout(LAUNCH_TIMEOUT, child.wait()).await {
            Ok(status) => status.map_err(|source| RuntimeError::Spawn {
                command: command.into(),
                source,
            })?,
            Err(_) => {
                return Err(RuntimeError::Command {
                    id: spec.id.clone(),
                    command: command.into(),
                    stderr: format!("timed out after {LAUNCH_TIMEOUT:?}"),
                });
            }
        };
        if !status.success() {
            return Err(RuntimeError::Command {
                id: spec.id.clone(),
                command: command.into(),
                stderr: format!("{status}: {}", console_tail(&console_path, offset)),
            });
        }
        // runsc exited 0 with the sandbox started; it may have died since. Its pid says so
        // (a `runsc state` would cost a process; asked only when the pid file is unreadable).
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|p| *p > 0);
        let status = match pid.map(procs::Started::of) {
            Some(Some(sentry)) => {
                self.known.lock().expect("sandbox map poisoned").insert(
                    spec.id.clone(),
                    Known {
                        sentry,
                        state_dir: Some(spec.state_dir.clone()),
                    },
                );
                RuntimeStatus::Running
            }
            Some(None) => RuntimeStatus::Stopped,
            None => self.status(&spec.id).await?,
        };
        match status {
            RuntimeStatus::Running => Ok(()),
            other => Err(RuntimeError::Command {
                id: spec.id.clone(),
                command: command.into(),
                stderr: format!(
                    "sandbox is {other:?} right after start: {}",
                    console_tail(&console_path, offset)
                ),
            }),
        }
    }

    /// Start or restore, undoing everything on failure.
    async fn boot(&self, spec: &SandboxSpec, launch: Launch<'_>) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let what = match launch {
            Launch::Run => "runsc run",
            Launch::Restore(_) => "runsc restore",
        };
        // runsc itself would fail on a taken id, but only after dropping the other sandbox's
        // metadata: ask first — with `runsc state` (a process) only when runsc's files for
        // the id are there.
        if self.may_exist(&spec.id)
            && let Some(state) = self.state_json(&spec.id).await?
        {
            return Err(RuntimeError::Command {
                id: spec.id.clone(),
                command: what.into(),
                stderr: format!(
                    "a sandbox with this id exists already (status {})",
                    state["status"]
                ),
            });
        }
        let result = async {
            let dirs: Vec<PathBuf> = spec.volumes.iter().map(|v| v.dir.clone()).collect();
            if !dirs.is_empty() {
                let (users, id) = (self.volumes.clone(), spec.id.clone());
                blocking(move || users.acquire(&id, &dirs))
                    .await
                    .map_err(|source| RuntimeError::Rootfs {
                        id: spec.id.clone(),
                        source: io::Error::new(
                            source.kind(),
                            format!("mounting its volumes: {source}"),
                        ),
                    })?;
            }
            let prepared = self.prepare(spec).await?;
            if let Some(net) = &spec.network {
                phases::timed(Phase::Netns, reapply_address(&spec.id, net)).await?;
            }
            let t_launch = Instant::now();
            phases::timed(Phase::Runsc, self.launch(spec, &prepared, launch)).await?;
            Ok::<_, RuntimeError>(t_launch.elapsed())
        }
        .await;
        match result {
            Ok(launch_time) => {
                tracing::info!(
                    id = %spec.id,
                    command = what,
                    total_ms = t0.elapsed().as_millis() as u64,
                    runsc_ms = launch_time.as_millis() as u64,
                    "sandbox running"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(id = %spec.id, error = %e, "{what} failed, cleaning up");
                if let Err(cleanup) = phases::timed(
                    Phase::Teardown,
                    self.teardown(&spec.id, Some(&spec.state_dir)),
                )
                .await
                {
                    tracing::warn!(id = %spec.id, error = %cleanup, "cleanup after failed boot");
                }
                Err(e)
            }
        }
    }

    /// Kills and deletes the container, waits for its processes, unmounts the rootfs and
    /// removes leftover cgroups. Idempotent.
    async fn teardown(&self, id: &str, state_dir: Option<&Path>) -> Result<(), RuntimeError> {
        // Mount points and bundle paths are recorded canonical.
        let state_dir = match state_dir.map(std::fs::canonicalize) {
            None => None,
            Some(Ok(dir)) => Some(dir),
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => state_dir.map(Path::to_path_buf),
            Some(Err(source)) => {
                return Err(RuntimeError::Cleanup {
                    id: id.into(),
                    source,
                });
            }
        };
        let state_dir = state_dir.as_deref();
        let bundle = state_dir.map(bundle_of);
        // `delete -force` kills a running sandbox itself (no `runsc kill` first: a process
        // more for nothing); it fails harmlessly when the sandbox is already gone, and
        // processes that outlive it are killed below.
        self.known.lock().expect("sandbox map poisoned").remove(id);
        let t0 = Instant::now();
        let delete = self.runsc(id, &["delete", "-force", id]).await?;
        if !delete.success && !delete.stderr.contains("does not exist") {
            return Err(delete.into_error(id));
        }
        let t_delete = t0.elapsed();
        self.wait_processes_gone(id, bundle.as_deref()).await?;
        tracing::debug!(%id, delete_ms = t_delete.as_millis() as u64, wait_ms = (t0.elapsed() - t_delete).as_millis() as u64, "teardown");
        if let Some(state_dir) = state_dir {
            let (rootfs, dir) = (rootfs_of(state_dir), state_dir.to_path_buf());
            blocking(move || {
                mounts::unmount(&rootfs)?;
                disk::unmount(&dir)
            })
            .await
            .map_err(|source| RuntimeError::Cleanup {
                id: id.into(),
                source,
            })?;
        }
        let (users, id_owned) = (self.volumes.clone(), id.to_string());
        blocking(move || users.release(&id_owned))
            .await
            .map_err(|source| RuntimeError::Cleanup {
                id: id.into(),
                source,
            })?;
        let path = self.cgroups_path(id);
        let mut attempt = 0;
        loop {
            let hs = cgroup::host_hierarchies();
            match cgroup::remove_dirs(&hs, &path) {
                Ok(()) => break,
                Err(e) if attempt < 20 => {
                    tracing::debug!(%id, error = %e, "cgroup still busy");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(source) => {
                    return Err(RuntimeError::Cleanup {
                        id: id.into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Waits until no `runsc-sandbox`/`runsc-gofer` process of `id` is left, SIGKILLing
    /// stragglers after a grace period.
    async fn wait_processes_gone(
        &self,
        id: &str,
        bundle: Option<&Path>,
    ) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let mut killed = false;
        loop {
            let root = self.cfg.root_dir.clone();
            let (id_owned, bundle_owned) = (id.to_string(), bundle.map(Path::to_path_buf));
            let pids = tokio::task::spawn_blocking(move || {
                procs::sandbox_pids(&root, &id_owned, bundle_owned.as_deref())
            })
            .await
            .unwrap_or_default();
            if pids.is_empty() {
                return Ok(());
            }
            let waited = t0.elapsed();
            if waited > EXIT_GRACE && !killed {
                tracing::warn!(%id, ?pids, "sandbox processes outlived runsc delete, killing");
                for pid in &pids {
                    if let Some(pid) = rustix::process::Pid::from_raw(*pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
                killed = true;
            }
            if waited > EXIT_GRACE + EXIT_TIMEOUT {
                return Err(RuntimeError::Command {
                    id: id.into(),
                    command: "runsc delete".into(),
                    stderr: format!("sandbox processes {pids:?} did not exit"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Output of a short runsc command.
struct RunscOutput {
    command: String,
    success: bool,
    stdout: String,
    stderr: String,
}

impl RunscOutput {
    fn into_error(self, id: &str) -> RuntimeError {
        RuntimeError::Command {
            id: id.into(),
            command: self.command,
            stderr: self.stderr,
        }
    }
}

/// The state directory of a container, from its bundle path in `runsc state`.
fn state_dir_of(state: &serde_json::Value) -> Option<PathBuf> {
    let bundle = Path::new(state["bundle"].as_str()?);
    (bundle.file_name()? == "bundle").then(|| bundle.parent().map(Path::to_path_buf))?
}

fn validate(spec: &SandboxSpec) -> Result<(), RuntimeError> {
    let invalid = |msg: String| RuntimeError::Bundle {
        id: spec.id.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, msg),
    };
    if spec.id.is_empty()
        || spec.id.len() > 128
        || !spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || spec.id.starts_with('.')
    {
        return Err(invalid(format!(
            "id {:?} must be 1-128 characters [A-Za-z0-9-_.]",
            spec.id
        )));
    }
    if spec.args.is_empty() {
        return Err(invalid("no init process arguments".into()));
    }
    if spec.layers.is_empty() {
        return Err(RuntimeError::Rootfs {
            id: spec.id.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no root filesystem layers"),
        });
    }
    Ok(())
}

fn prepare_blocking(spec: &SandboxSpec, cgroups_path: &str) -> Result<Prepared, RuntimeError> {
    let rootfs_err = |source: io::Error| RuntimeError::Rootfs {
        id: spec.id.clone(),
        source,
    };
    let mut spans = Vec::new();
    let t_disk = Instant::now();
    std::fs::create_dir_all(&spec.state_dir).map_err(rootfs_err)?;
    let state_dir = std::fs::canonicalize(&spec.state_dir).map_err(rootfs_err)?;
    if let Some(bytes) = spec.resources.disk_bytes
        && !disk::has_disk(&state_dir)
        && !state_dir.join("upper").exists()
    {
        disk::create_image(&disk::image_of(&state_dir), bytes).map_err(rootfs_err)?;
    }
    if disk::has_disk(&state_dir) {
        if let Some(bytes) = spec.resources.disk_bytes {
            // Files made at a smaller size (a snapshot started larger): grow, never shrink.
            disk::grow(&state_dir, bytes).map_err(rootfs_err)?;
        }
        disk::mount(&state_dir).map_err(rootfs_err)?;
    }
    let t_rootfs = Instant::now();
    spans.push((Phase::Disk, t_disk, t_rootfs));
    let (upper, work) = disk::layer_dirs(&state_dir);
    let rootfs = rootfs_of(&state_dir);
    for d in [&upper, &work, &rootfs] {
        std::fs::create_dir_all(d).map_err(rootfs_err)?;
    }
    let layers = spec
        .layers
        .iter()
        .map(std::fs::canonicalize)
        .collect::<io::Result<Vec<_>>>()
        .map_err(rootfs_err)?;
    match mounts::mounted_fstype(&rootfs).map_err(rootfs_err)? {
        Some(fs) if fs == "overlay" => {
            tracing::debug!(id = %spec.id, "reusing mounted rootfs");
        }
        Some(fs) => {
            return Err(rootfs_err(io::Error::other(format!(
                "{} is already mounted with {fs}",
                rootfs.display()
            ))));
        }
        None => mounts::mount_overlay(&layers, &upper, &work, &rootfs).map_err(rootfs_err)?,
    }
    let bind_tmp = ensure_tmp(&rootfs).map_err(rootfs_err)?;
    let t_bundle = Instant::now();
    spans.push((Phase::Rootfs, t_rootfs, t_bundle));
    let _ = std::fs::remove_dir_all(state_dir.join("volumes"));
    let mut volume_sources = Vec::new();
    for i in 0..spec.volumes.len() {
        let point = volume::bind_point(&state_dir, i);
        std::fs::create_dir_all(&point).map_err(rootfs_err)?;
        volume_sources.push(point);
    }
    let dirs: Vec<PathBuf> = spec.volumes.iter().map(|v| v.dir.clone()).collect();
    volume::write_record(&state_dir, &dirs).map_err(rootfs_err)?;
    let config = spec::oci_config(
        spec,
        &spec::BundleParams {
            rootfs: &rootfs,
            bind_tmp,
            cgroups_path,
            volume_sources: &volume_sources,
        },
    );
    let bundle = bundle_of(&state_dir);
    let bundle_err = |source: io::Error| RuntimeError::Bundle {
        id: spec.id.clone(),
        source,
    };
    std::fs::create_dir_all(&bundle).map_err(bundle_err)?;
    let text = serde_json::to_vec_pretty(&config).map_err(|e| bundle_err(io::Error::other(e)))?;
    let tmp = bundle.join("config.json.tmp");
    std::fs::write(&tmp, text).map_err(bundle_err)?;
    std::fs::rename(&tmp, bundle.join("config.json")).map_err(bundle_err)?;
    spans.push((Phase::Bundle, t_bundle, Instant::now()));
    Ok(Prepared {
        state_dir,
        bundle,
        spans,
    })
}

/// Makes sure the rootfs has the mount points `/proc`, `/dev`, `/sys` and a `/tmp` directory
/// (mode 1777 if created; created entries land in the upper dir); returns whether `/tmp` is a
/// real directory that can be bind-mounted over `/tmp`.
fn ensure_tmp(rootfs: &Path) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    for dir in ["proc", "dev", "sys"] {
        let path = rootfs.join(dir);
        if std::fs::symlink_metadata(&path).is_err() {
            std::fs::create_dir(&path)?;
        }
    }
    let tmp = rootfs.join("tmp");
    match std::fs::symlink_metadata(&tmp) {
        Ok(m) => Ok(m.is_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Puts the sandbox address and default route back on the interface inside the namespace
/// (runsc removed them when it took them over).
async fn reapply_address(id: &str, net: &NetworkAttachment) -> Result<(), RuntimeError> {
    let ns = net
        .netns_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| RuntimeError::Command {
            id: id.into(),
            command: "ip".into(),
            stderr: format!("bad netns path {}", net.netns_path.display()),
        })?;
    // One `ip` process for the three (a process each costs milliseconds).
    let script = format!(
        "addr replace {}/{} dev {if_}\nlink set {if_} up\nroute replace default via {} dev {if_}\n",
        net.address,
        net.prefix_len,
        net.gateway,
        if_ = net.ifname,
    );
    let command = format!("ip -n {ns} -batch -");
    let mut child = Command::new("ip")
        .args(["-n", &ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RuntimeError::Spawn {
            command: command.clone(),
            source,
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(script.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| RuntimeError::Spawn {
            command: command.clone(),
            source,
        })?;
    written.map_err(|source| RuntimeError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            id: id.into(),
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// PIDs of the processes named `comm` whose parent is PID 1, from `runsc ps`'s table
/// (`UID PID PPID C TTY STIME TIME CMD`).
fn init_children(table: &str, comm: &str) -> Vec<u32> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pid: u32 = f.get(1)?.parse().ok()?;
            let ppid: u32 = f.get(2)?.parse().ok()?;
            (ppid == 1 && f.last() == Some(&comm)).then_some(pid)
        })
        .collect()
}

/// The end of `console.log` after `offset`: runsc's own error messages land there too.
fn console_tail(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let new = text.get(offset as usize..).unwrap_or_default();
    let start = new.len().saturating_sub(ERROR_TAIL);
    String::from_utf8_lossy(&new[start..]).trim().to_string()
}

/// The reason of a checkpoint refused because of network state, from runsc's stderr.
fn refused_reason(stderr: &str) -> Option<String> {
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot be saved in") || l.contains("unsupported networking state"))?;
    let start = ["save rejected", "endpoint cannot be saved"]
        .iter()
        .find_map(|m| line.find(m))
        .unwrap_or(0);
    Some(line[start..].trim().trim_end_matches(':').to_string())
}

/// [`Runtime::copy_files`] for a sandbox with a disk: the whole image is copied (sparsely,
/// with reflinks where the filesystem has them). The source must be stopped, so its disk is
/// unmounted and clean.
async fn copy_disk(from_state_dir: &Path, to_state_dir: &Path) -> Result<(), RuntimeError> {
    let (from, to) = (disk::image_of(from_state_dir), disk::image_of(to_state_dir));
    let err = |detail: String| RuntimeError::CopyFiles {
        from: from.clone(),
        to: to.clone(),
        detail,
    };
    let mounted = mounts::mounted_fstype(&disk::mount_point_of(from_state_dir))
        .map_err(|e| err(e.to_string()))?;
    if mounted.is_some() {
        return Err(err(
            "the source disk is mounted: the sandbox must be stopped first".into(),
        ));
    }
    let image = from.clone();
    blocking(move || disk::wait_released(&image))
        .await
        .map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(to_state_dir).map_err(|e| err(e.to_string()))?;
    if to.exists() || to_state_dir.join("upper").exists() {
        return Err(err("the destination already has files".into()));
    }
    let tmp = to.with_extension("img.tmp");
    let out = tokio::process::Command::new("cp")
        .arg("--reflink=auto")
        .arg("--sparse=always")
        .arg(&from)
        .arg(&tmp)
        .output()
        .await
        .map_err(|e| err(format!("running cp: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let (tmp2, to2) = (tmp.clone(), to.clone());
    let published = blocking(move || {
        std::fs::File::open(&tmp2)?.sync_all()?;
        std::fs::rename(&tmp2, &to2)?;
        std::fs::File::open(to2.parent().unwrap_or(Path::new("/")))?.sync_all()
    })
    .await;
    if let Err(e) = published {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    Ok(())
}

/// `cp -a from to`: keeps owners, modes, times, xattrs and overlay whiteouts. On failure
/// `to` is removed.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| format!("running cp: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(to);
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(())
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Fsyncs every file in `dir` and the directory itself.
fn sync_dir(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Moves the finished image `tmp` to `image_dir` atomically (exchanging with an existing
/// image, which is then removed) and fsyncs the parent.
fn publish_image(tmp: &Path, image_dir: &Path) -> io::Result<()> {
    let parent = image_dir.parent().unwrap_or(Path::new("/"));
    if image_dir.exists() {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            tmp,
            rustix::fs::CWD,
            image_dir,
            rustix::fs::RenameFlags::EXCHANGE,
        )?;
        std::fs::File::open(parent)?.sync_all()?;
        std::fs::remove_dir_all(tmp)?;
    } else {
        std::fs::rename(tmp, image_dir)?;
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl Runtime for GvisorRuntime {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    #[tracing::instrument(level = "debug", name = "runsc.run", skip_all,
        fields(sandbox.runtime_id = %spec.id))]
    async fn start(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        self.boot(spec, Launch::Run).await
    }

    async fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<(), RuntimeError> {
        self.checkpoint_inner(id, image_dir, None).await
    }

    async fn checkpoint_then(
        &self,
        id: &str,
        image_dir: &Path,
        meanwhile: sandpit_runtime::Meanwhile<'_>,
    ) -> Result<(), RuntimeError> {
        self.checkpoint_inner(id, image_dir, Some(meanwhile)).await
    }

    fn has_image(&self, image_dir: &Path) -> bool {
        image_dir.join("checkpoint.img").is_file()
    }

    async fn remove_orphans(
        &self,
        keep: &HashSet<String>,
        state_dirs_root: &Path,
    ) -> Result<(), RuntimeError> {
        match self.cleanup_orphans(keep, state_dirs_root).await {
            Ok(report) => {
                if !report.removed.is_empty() || !report.unmounted.is_empty() {
                    tracing::info!(removed = ?report.removed, unmounted = ?report.unmounted, "orphaned sandboxes removed");
                }
                Ok(())
            }
            Err(GvisorError::Runtime(e)) => Err(e),
            Err(other) => Err(RuntimeError::Backend {
                backend: "gvisor",
                what: "removing orphaned sandboxes".into(),
                source: Box::new(other),
            }),
        }
    }

    #[tracing::instrument(level = "debug", name = "runsc.restore", skip_all,
        fields(sandbox.runtime_id = %spec.id))]
    async fn restore(&self, spec: &SandboxSpec, image_dir: &Path) -> Result<(), RuntimeError> {
        let image = std::fs::canonicalize(image_dir).map_err(|source| RuntimeError::Rootfs {
            id: spec.id.clone(),
            source: io::Error::new(
                source.kind(),
                format!("checkpoint image {}: {source}", image_dir.display()),
            ),
        })?;
        if !image.join("checkpoint.img").is_file() {
            return Err(RuntimeError::Command {
                id: spec.id.clone(),
                command: "runsc restore".into(),
                stderr: format!("no checkpoint.img in {}", image.display()),
            });
        }
        self.boot(spec, Launch::Restore(&image)).await
    }

    #[tracing::instrument(level = "debug", name = "runsc.stop", skip_all,
        fields(sandbox.runtime_id = %id))]
    async fn stop(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        phases::timed(Phase::Teardown, self.teardown(id, Some(state_dir))).await?;
        tracing::info!(%id, ms = t0.elapsed().as_millis() as u64, "sandbox stopped");
        Ok(())
    }

    #[tracing::instrument(level = "debug", name = "runsc.destroy", skip_all,
        fields(sandbox.runtime_id = %id))]
    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        self.stop(id, state_dir).await?;
        let dir = state_dir.to_path_buf();
        let id_owned = id.to_string();
        blocking(move || {
            // Never delete through a mount: whatever is mounted below must be gone by now.
            if let Ok(canon) = std::fs::canonicalize(&dir)
                && let Some(m) = mounts::mountinfo()?
                    .into_iter()
                    .find(|m| m.mount_point.starts_with(&canon))
            {
                return Err(io::Error::other(format!(
                    "{} is still mounted",
                    m.mount_point.display()
                )));
            }
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await
        .map_err(|source| RuntimeError::Cleanup {
            id: id_owned,
            source,
        })
    }

    fn build(&self) -> String {
        self.build
            .get_or_init(|| match tool_output(&self.cfg.runsc, &["--version"]) {
                Ok(v) => v.lines().next().unwrap_or_default().trim().to_string(),
                Err(e) => format!("unknown ({e})"),
            })
            .clone()
    }

    async fn pack_files(&self, state_dir: &Path, to_dir: &Path) -> Result<bool, RuntimeError> {
        if !disk::has_disk(state_dir) {
            // The writable layer is a directory tree (no disk limit): not carried.
            return Ok(false);
        }
        let image = disk::image_of(state_dir);
        let err = |detail: String| RuntimeError::CopyFiles {
            from: image.clone(),
            to: to_dir.into(),
            detail,
        };
        if mounts::mounted_fstype(&disk::mount_point_of(state_dir))
            .map_err(|e| err(e.to_string()))?
            .is_some()
        {
            return Err(err(
                "the disk is mounted: the sandbox must be stopped".into()
            ));
        }
        let (image2, to) = (image.clone(), to_dir.to_path_buf());
        blocking(move || {
            disk::wait_released(&image2)?;
            std::fs::create_dir(&to)?;
            std::fs::hard_link(&image2, to.join(DISK_FILE))
        })
        .await
        .map_err(|e| err(e.to_string()))?;
        Ok(true)
    }

    async fn unpack_files(&self, from_dir: &Path, state_dir: &Path) -> Result<(), RuntimeError> {
        let err = |detail: String| RuntimeError::CopyFiles {
            from: from_dir.into(),
            to: state_dir.into(),
            detail,
        };
        let (from, to) = (from_dir.to_path_buf(), state_dir.to_path_buf());
        blocking(move || {
            // Exactly what `pack_files` makes: one regular file (not followed if a link).
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&from)? {
                let entry = entry?;
                if !entry.file_type()?.is_file() || entry.file_name() != DISK_FILE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected entry {:?}", entry.file_name()),
                    ));
                }
                names.push(entry.file_name());
            }
            if names.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no {DISK_FILE}"),
                ));
            }
            std::fs::create_dir(&to)?;
            std::fs::rename(from.join(DISK_FILE), disk::image_of(&to))?;
            std::fs::File::open(&to)?.sync_all()
        })
        .await
        .map_err(|e| err(e.to_string()))
    }

    async fn copy_files(
        &self,
        from_state_dir: &Path,
        to_state_dir: &Path,
    ) -> Result<(), RuntimeError> {
        if disk::has_disk(from_state_dir) {
            return copy_disk(from_state_dir, to_state_dir).await;
        }
        let (from, to) = (from_state_dir.join("upper"), to_state_dir.join("upper"));
        let err = |detail: String| RuntimeError::CopyFiles {
            from: from.clone(),
            to: to.clone(),
            detail,
        };
        std::fs::create_dir_all(to_state_dir).map_err(|e| err(e.to_string()))?;
        if to.exists() || disk::has_disk(to_state_dir) {
            return Err(err("the destination already has files".into()));
        }
        // cp keeps owners, modes, times, hard links, xattrs (overlay whiteouts) and sparse
        // files, and uses reflinks where the filesystem has them.
        let out = tokio::process::Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(&from)
            .arg(&to)
            .output()
            .await
            .map_err(|e| err(format!("running cp: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&to);
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(())
    }

    async fn export_layer(&self, state_dir: &Path, to_dir: &Path) -> Result<(), RuntimeError> {
        let (from, _) = disk::layer_dirs(state_dir);
        let err = |detail: String| RuntimeError::CopyFiles {
            from: from.clone(),
            to: to_dir.to_path_buf(),
            detail,
        };
        if to_dir.exists() {
            return Err(err("the destination exists".into()));
        }
        if let Some(parent) = to_dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
        }
        if !disk::has_disk(state_dir) {
            // Same file system: a rename; otherwise a copy.
            if std::fs::rename(&from, to_dir).is_ok() {
                return Ok(());
            }
            return copy_tree(&from, to_dir).await.map_err(err);
        }
        // On its disk: mounted for the copy, unmounted again whatever happens.
        let dir = state_dir.to_path_buf();
        blocking(move || disk::mount(&dir))
            .await
            .map_err(|e| err(e.to_string()))?;
        let copied = copy_tree(&from, to_dir).await;
        let dir = state_dir.to_path_buf();
        let unmounted = blocking(move || disk::unmount(&dir)).await;
        copied.map_err(err)?;
        unmounted.map_err(|e| err(format!("unmounting the disk: {e}")))
    }

    async fn dead(&self, ids: &[String]) -> Result<Vec<String>, RuntimeError> {
        // Asked every couple of seconds with every running sandbox: a `runsc list` each time
        // costs the host a process whose work grows with the count (and a SIGCHLD). Once
        // this process booted a sandbox or runsc named its sentry, a look at that process
        // (same pid, same start time, not a zombie) answers; runsc is asked only about
        // sandboxes whose sentry is unknown or gone (a wake starts a new one under the
        // same id).
        let suspects: Vec<String> = {
            let known = self.known.lock().expect("sandbox map poisoned");
            ids.iter()
                .filter(|id| known.get(*id).is_none_or(|k| !k.sentry.still_running()))
                .cloned()
                .collect()
        };
        if suspects.is_empty() {
            return Ok(Vec::new());
        }
        // One `runsc list` for all of them, then a look at each sentry process (runsc's own
        // probe takes a zombie for alive).
        let out = self.runsc("", &["list", "-format=json"]).await?;
        if !out.success {
            return Err(out.into_error(""));
        }
        // `null` when there are none.
        let listed: Vec<serde_json::Value> =
            serde_json::from_str::<Option<Vec<serde_json::Value>>>(out.stdout.trim())
                .map_err(|e| RuntimeError::Command {
                    id: String::new(),
                    command: out.command.clone(),
                    stderr: format!("unparsable output ({e}): {}", out.stdout),
                })?
                .unwrap_or_default();
        let running: std::collections::HashMap<&str, i32> = listed
            .iter()
            .filter(|c| matches!(c["status"].as_str(), Some("running" | "paused")))
            .filter_map(|c| {
                let pid = c["pid"].as_i64().and_then(|p| i32::try_from(p).ok())?;
                Some((c["id"].as_str()?, pid))
            })
            .filter(|(_, pid)| *pid > 0)
            .collect();
        let mut known = self.known.lock().expect("sandbox map poisoned");
        Ok(suspects
            .into_iter()
            .filter(|id| {
                match running
                    .get(id.as_str())
                    .and_then(|pid| procs::Started::of(*pid))
                {
                    Some(sentry) => {
                        known
                            .entry(id.clone())
                            .and_modify(|k| k.sentry = sentry)
                            .or_insert(Known {
                                sentry,
                                state_dir: None,
                            });
                        false
                    }
                    None => {
                        known.remove(id);
                        true
                    }
                }
            })
            .collect())
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus, RuntimeError> {
        Ok(match self.state_json(id).await? {
            None => RuntimeStatus::Missing,
            // runsc probes the sentry with kill(pid, 0), which succeeds on a zombie: a sandbox
            // that died and is not reaped yet still shows as running. Check the process.
            Some(s) => match (s["status"].as_str(), s["pid"].as_i64()) {
                (Some("running" | "paused"), Some(pid))
                    if i32::try_from(pid).is_ok_and(|p| p > 0 && !procs::is_alive(p)) =>
                {
                    RuntimeStatus::Stopped
                }
                (Some("running" | "paused"), _) => RuntimeStatus::Running,
                _ => RuntimeStatus::Stopped,
            },
        })
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let out = self.runsc("", &["list", "-format", "json"]).await?;
        if !out.success {
            return Err(out.into_error(""));
        }
        let v: serde_json::Value =
            serde_json::from_str(&out.stdout).map_err(|e| RuntimeError::Command {
                id: String::new(),
                command: out.command.clone(),
                stderr: format!("unparsable output ({e}): {}", out.stdout),
            })?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["id"].as_str().map(str::to_string))
            .collect())
    }

    async fn update_resources(
        &self,
        id: &str,
        state_dir: &Path,
        resources: &sandpit_runtime::Resources,
    ) -> Result<(), RuntimeError> {
        let resize = |reason: String| RuntimeError::Resize {
            id: id.into(),
            reason,
        };
        let path = self.cgroups_path(id);
        let (memory, cpu) = (resources.memory_bytes, resources.cpu_millis);
        tokio::task::spawn_blocking(move || {
            cgroup::write_limits(
                &cgroup::host_hierarchies(),
                &path,
                memory,
                cpu,
                spec::CPU_PERIOD_US,
            )
        })
        .await
        .map_err(|e| resize(format!("the resize task failed: {e}")))?
        .map_err(|e| resize(e.to_string()))?;
        if let Some(bytes) = resources.disk_bytes
            && disk::has_disk(state_dir)
        {
            let state_dir = state_dir.to_path_buf();
            let grown = tokio::task::spawn_blocking(move || disk::grow_mounted(&state_dir, bytes))
                .await
                .map_err(|e| resize(format!("the resize task failed: {e}")))?;
            if let Err(e) = grown {
                // The disk keeps its size until the sandbox next starts (a wake included),
                // which grows it offline.
                tracing::warn!(sandbox = id, error = %e, "the running sandbox's disk cannot grow now; it grows at its next start");
            }
        }
        Ok(())
    }

    async fn create_volume(&self, dir: &Path, bytes: u64) -> Result<(), RuntimeError> {
        let d = dir.to_path_buf();
        blocking(move || volume::create(&d, bytes))
            .await
            .map_err(|e| RuntimeError::Volume {
                dir: dir.into(),
                reason: e.to_string(),
            })
    }

    async fn delete_volume(&self, dir: &Path) -> Result<(), RuntimeError> {
        if self.volumes.in_use(dir) {
            return Err(RuntimeError::Volume {
                dir: dir.into(),
                reason: "a sandbox mounts it".into(),
            });
        }
        let d = dir.to_path_buf();
        blocking(move || volume::delete(&d))
            .await
            .map_err(|e| RuntimeError::Volume {
                dir: dir.into(),
                reason: e.to_string(),
            })
    }

    async fn pack_volume(&self, dir: &Path, to_dir: &Path) -> Result<(), RuntimeError> {
        if self.volumes.in_use(dir) {
            return Err(RuntimeError::Volume {
                dir: dir.into(),
                reason: "a sandbox mounts it".into(),
            });
        }
        let (d, to) = (dir.to_path_buf(), to_dir.to_path_buf());
        blocking(move || volume::pack(&d, &to))
            .await
            .map_err(|e| RuntimeError::Volume {
                dir: dir.into(),
                reason: e.to_string(),
            })
    }

    async fn unpack_volume(&self, from_dir: &Path, dir: &Path) -> Result<(), RuntimeError> {
        let (from, d) = (from_dir.to_path_buf(), dir.to_path_buf());
        blocking(move || volume::unpack(&from, &d))
            .await
            .map_err(|e| RuntimeError::Volume {
                dir: dir.into(),
                reason: e.to_string(),
            })
    }

    async fn kill_init_children(&self, id: &str, comm: &str) -> Result<usize, RuntimeError> {
        let out = self.runsc(id, &["ps", id]).await?;
        if !out.success {
            return Err(out.into_error(id));
        }
        let mut killed = 0;
        for pid in init_children(&out.stdout, comm) {
            let pid = pid.to_string();
            let k = self.runsc(id, &["kill", "--pid", &pid, id, "KILL"]).await?;
            if k.success {
                killed += 1;
            }
        }
        Ok(killed)
    }

    async fn diagnose(&self, id: &str, state_dir: &Path) -> String {
        let status = match self.status(id).await {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("unknown ({e})"),
        };
        let ps = match self.runsc(id, &["ps", "--format", "json", id]).await {
            Ok(out) if out.success => out.stdout.trim().to_string(),
            Ok(out) => format!("failed: {}", out.stderr.trim()),
            Err(e) => format!("failed: {e}"),
        };
        // What the sandbox itself sees: its TCP sockets, the agent's threads and the end of
        // init's stderr, wherever init sends it (through the sentry, not the network).
        let inside = match self
            .runsc(
                id,
                &[
                    "exec",
                    id,
                    "/bin/sh",
                    "-c",
                    "cat /proc/net/tcp; for t in /proc/*/task/*; do echo \"$t $(cat $t/stat 2>/dev/null | cut -d' ' -f2-3) $(cat $t/wchan 2>/dev/null)\"; done; echo '--- init stderr:'; tail -c 2000 /proc/1/fd/2 2>/dev/null",
                ],
            )
            .await
        {
            Ok(out) => format!("{}{}", out.stdout.trim(), out.stderr.trim()),
            Err(e) => format!("failed: {e}"),
        };
        let console = console_tail(&state_dir.join("console.log"), 0);
        let console = console
            .get(console.len().saturating_sub(1000)..)
            .unwrap_or(&console);
        format!("runtime status: {status}; processes: {ps}; console: {console}; inside: {inside}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_children_from_runsc_ps() {
        let table = "UID       PID       PPID      C         TTY       STIME     TIME      CMD\n\
                     0         1         0         18        ?         18:34     0s        agent\n\
                     0         2         1         34        ?         18:34     0s        exe\n\
                     0         9         2         0         ?         18:34     0s        sh\n\
                     0         11        1         0         ?         18:35     0s        sleep\n";
        assert_eq!(init_children(table, "exe"), vec![2]);
        assert_eq!(init_children(table, "sleep"), vec![11]);
        assert!(init_children("", "exe").is_empty());
    }

    #[test]
    fn refused_reason_from_runsc_output() {
        let stderr = "checkpoint failed: checkpointing container \"ctr3\": encoding error: save \
                      rejected due to unsupported networking state: endpoint cannot be saved in \
                      connected state: local 10.233.8.2:9090, remote 10.233.8.1:49930:\n\
                      goroutine 600 [running]:\n";
        assert_eq!(
            refused_reason(stderr).unwrap(),
            "save rejected due to unsupported networking state: endpoint cannot be saved in \
             connected state: local 10.233.8.2:9090, remote 10.233.8.1:49930"
        );
        assert_eq!(refused_reason("checkpoint failed: file exists"), None);
    }

    #[test]
    fn state_dir_from_bundle() {
        let s = serde_json::json!({"id": "x", "bundle": "/data/sb/x/bundle"});
        assert_eq!(state_dir_of(&s), Some(PathBuf::from("/data/sb/x")));
        let s = serde_json::json!({"id": "x", "bundle": "/elsewhere"});
        assert_eq!(state_dir_of(&s), None);
    }

    #[test]
    fn config_validation() {
        let dir = std::env::temp_dir().join(format!("sandpit-gv-unit-{}", std::process::id()));
        let mut cfg = GvisorConfig::new(&dir);
        cfg.cgroup_parent = "../escape".into();
        assert!(matches!(
            GvisorRuntime::new(cfg.clone()),
            Err(GvisorError::Config { .. })
        ));
        cfg.cgroup_parent = "sandpit-t1".into();
        cfg.platform = "sys trap".into();
        assert!(matches!(
            GvisorRuntime::new(cfg.clone()),
            Err(GvisorError::Config { .. })
        ));
        cfg.platform = "ptrace".into();
        let rt = GvisorRuntime::new(cfg).unwrap();
        assert_eq!(rt.cgroups_path("abc"), "sandpit-t1/abc");
        assert!(rt.config().root_dir.is_absolute());
        let args = rt.global_args(false);
        assert!(args.contains(&OsString::from("--platform=ptrace")));
        assert!(args.contains(&OsString::from("--network=none")));
        assert!(args.contains(&OsString::from("--overlay2=none")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spec_validation() {
        let spec = SandboxSpec {
            id: "bad id".into(),
            layers: vec!["/l".into()],
            state_dir: "/s".into(),
            args: vec!["/bin/sh".into()],
            env: vec![],
            hostname: "h".into(),
            network: None,
            resources: sandpit_runtime::Resources {
                cpu_millis: 0,
                memory_bytes: 0,
                disk_bytes: None,
            },
            volumes: vec![],
        };
        assert!(matches!(validate(&spec), Err(RuntimeError::Bundle { .. })));
        let ok = SandboxSpec {
            id: "sbx-0001".into(),
            ..spec.clone()
        };
        assert!(validate(&ok).is_ok());
        let no_layers = SandboxSpec {
            layers: vec![],
            ..ok.clone()
        };
        assert!(matches!(
            validate(&no_layers),
            Err(RuntimeError::Rootfs { .. })
        ));
        let no_args = SandboxSpec { args: vec![], ..ok };
        assert!(matches!(
            validate(&no_args),
            Err(RuntimeError::Bundle { .. })
        ));
    }
}
