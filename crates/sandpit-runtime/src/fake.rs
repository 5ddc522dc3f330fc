//! `FakeRuntime`: an in-memory [`Runtime`] that records every call, for tests of the layers
//! above the trait (feature `fake`). It needs no root and no runsc, and answers in
//! microseconds.
//!
//! It keeps the trait's contracts: `start` and `restore` leave nothing running on error; a
//! checkpoint is complete when it returns and stops the sandbox; `stop` and `destroy` are
//! idempotent and `destroy` removes `state_dir`; a restore may use another id than the one
//! checkpointed. Its "sandboxes" are entries in a map, their files a real `state_dir` (a test
//! points it at a temporary directory), their memory image one marker file.
//!
//! What runs inside is up to the test: [`FakeRuntime::with_init`] gives a function called
//! whenever a sandbox's init would start (start, restore, restart of init's children); what
//! it returns is dropped when that init ends (stop, checkpoint, death). A server test starts
//! an in-process agent there.
//!
//! Failures are scripted: [`FakeRuntime::fail_next`] makes the next call of an operation (on
//! one sandbox or any) fail the way a real backend does, [`FakeRuntime::kill`] makes a
//! running sandbox die, [`FakeRuntime::forget`] makes the backend lose it (a host reboot).
#![expect(
    clippy::disallowed_methods,
    reason = "the fake's own state dirs and image dirs, which tests place in temporary directories"
)]

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{Resources, Runtime, RuntimeError, RuntimeStatus, SandboxSpec};

/// What a started init leaves behind; dropped when the init ends.
pub type InitGuard = Box<dyn Any + Send + Sync>;

/// What an init function returns: it may wait (an address still held by a stopping init).
pub type InitFuture = Pin<Box<dyn Future<Output = Result<InitGuard, String>> + Send>>;

/// Called when a sandbox's init starts; an error fails the start (or restore).
pub type InitFn = dyn Fn(&SandboxSpec) -> InitFuture + Send + Sync;

/// The file a fake memory image consists of (its content: the id checkpointed).
pub const IMAGE_FILE: &str = "fake-image";

/// The file that marks a fake volume's directory (its content: the size in bytes).
pub const VOLUME_FILE: &str = "fake-volume";

/// The operations failures can be scripted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    Start,
    /// A failed checkpoint kills the sandbox (as gVisor's usually does): status `Stopped`,
    /// no image written.
    Checkpoint,
    Restore,
    Stop,
    Destroy,
    Status,
    CopyFiles,
    ExportLayer,
    List,
    RemoveOrphans,
    UpdateResources,
    CreateVolume,
}

/// One recorded call, with the arguments that matter for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Start {
        id: String,
        state_dir: PathBuf,
        address: Option<Ipv4Addr>,
    },
    Checkpoint {
        id: String,
        image_dir: PathBuf,
    },
    Restore {
        id: String,
        image_dir: PathBuf,
        address: Option<Ipv4Addr>,
    },
    Stop {
        id: String,
    },
    Destroy {
        id: String,
    },
    Status {
        id: String,
    },
    Dead {
        ids: Vec<String>,
    },
    CopyFiles {
        from: PathBuf,
        to: PathBuf,
    },
    ExportLayer {
        state_dir: PathBuf,
        to: PathBuf,
    },
    List,
    KillInitChildren {
        id: String,
        comm: String,
    },
    UpdateResources {
        id: String,
        resources: Resources,
    },
    RemoveOrphans {
        /// Sorted.
        keep: Vec<String>,
    },
    CreateVolume {
        dir: PathBuf,
        bytes: u64,
    },
    DeleteVolume {
        dir: PathBuf,
    },
}

impl FakeCall {
    /// The operation's name: `start`, `checkpoint`, `restore`, `stop`, `destroy`, `status`,
    /// `dead`, `copy_files`, `export_layer`, `list`, `kill_init_children`, `remove_orphans`.
    pub fn op(&self) -> &'static str {
        match self {
            FakeCall::Start { .. } => "start",
            FakeCall::Checkpoint { .. } => "checkpoint",
            FakeCall::Restore { .. } => "restore",
            FakeCall::Stop { .. } => "stop",
            FakeCall::Destroy { .. } => "destroy",
            FakeCall::Status { .. } => "status",
            FakeCall::Dead { .. } => "dead",
            FakeCall::CopyFiles { .. } => "copy_files",
            FakeCall::ExportLayer { .. } => "export_layer",
            FakeCall::List => "list",
            FakeCall::KillInitChildren { .. } => "kill_init_children",
            FakeCall::UpdateResources { .. } => "update_resources",
            FakeCall::RemoveOrphans { .. } => "remove_orphans",
            FakeCall::CreateVolume { .. } => "create_volume",
            FakeCall::DeleteVolume { .. } => "delete_volume",
        }
    }

    /// The sandbox the call is about, if it names one.
    pub fn id(&self) -> Option<&str> {
        match self {
            FakeCall::Start { id, .. }
            | FakeCall::Checkpoint { id, .. }
            | FakeCall::Restore { id, .. }
            | FakeCall::Stop { id }
            | FakeCall::Destroy { id }
            | FakeCall::Status { id }
            | FakeCall::KillInitChildren { id, .. }
            | FakeCall::UpdateResources { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// A sandbox the fake holds.
struct Held {
    /// `Running` or `Stopped` (died); a sandbox it does not hold is `Missing`.
    status: RuntimeStatus,
    spec: SandboxSpec,
    init: Option<InitGuard>,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    calls: Vec<FakeCall>,
    /// Scripted failures, consumed first-match in order: the operation and, if given, the
    /// one sandbox id it applies to.
    failures: Vec<(FakeOp, Option<String>)>,
}

impl State {
    /// Consume a scripted failure of `op` on `id`, if one is armed.
    fn take_failure(&mut self, op: FakeOp, id: Option<&str>) -> bool {
        let pos = self
            .failures
            .iter()
            .position(|(o, target)| *o == op && (target.is_none() || target.as_deref() == id));
        pos.map(|p| self.failures.remove(p)).is_some()
    }
}

/// The recording fake backend. Cheap to share (`Arc` it).
#[derive(Default)]
pub struct FakeRuntime {
    /// Guards the whole state; never held across an `.await` or while init runs.
    state: Mutex<State>,
    init: Option<Arc<InitFn>>,
}

fn scripted(id: &str, op: &str) -> RuntimeError {
    RuntimeError::Command {
        id: id.into(),
        command: format!("fake {op}"),
        stderr: "scripted failure".into(),
    }
}

impl FakeRuntime {
    /// A fake whose sandboxes run nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake that calls `init` whenever a sandbox's init process would start.
    pub fn with_init(init: impl Fn(&SandboxSpec) -> InitFuture + Send + Sync + 'static) -> Self {
        FakeRuntime {
            state: Mutex::default(),
            init: Some(Arc::new(init)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake runtime state poisoned")
    }

    /// Make the next `op` fail: on sandbox `id` only, or (`None`) on whichever comes first.
    pub fn fail_next(&self, op: FakeOp, id: Option<&str>) {
        self.lock().failures.push((op, id.map(str::to_string)));
    }

    /// The running sandbox `id` dies (a limit or `kill -9`): it stays known, `Stopped`, and
    /// its init ends. False if it was not running.
    pub fn kill(&self, id: &str) -> bool {
        let guard = {
            let mut st = self.lock();
            match st.held.get_mut(id) {
                Some(h) if h.status == RuntimeStatus::Running => {
                    h.status = RuntimeStatus::Stopped;
                    h.init.take()
                }
                _ => return false,
            }
        };
        drop(guard);
        true
    }

    /// The backend loses sandbox `id` entirely (a host reboot): it becomes `Missing`.
    pub fn forget(&self, id: &str) -> bool {
        let held = self.lock().held.remove(id);
        held.is_some()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// The operations called on sandbox `id`, in order, without the read-only ones
    /// (`status`, `dead`, `list`): e.g. `["start", "checkpoint", "restore", "destroy"]`.
    pub fn ops_of(&self, id: &str) -> Vec<&'static str> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.id() == Some(id) && !matches!(c, FakeCall::Status { .. }))
            .map(FakeCall::op)
            .collect()
    }

    /// Forget the calls recorded so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The status the fake holds for `id`, without recording a call.
    pub fn status_of(&self, id: &str) -> RuntimeStatus {
        self.lock()
            .held
            .get(id)
            .map_or(RuntimeStatus::Missing, |h| h.status)
    }

    /// Ids of the sandboxes the fake holds (running or stopped), sorted.
    pub fn held(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().held.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The spec sandbox `id` was last started or restored with.
    pub fn spec_of(&self, id: &str) -> Option<SandboxSpec> {
        self.lock().held.get(id).map(|h| h.spec.clone())
    }

    /// The sandboxes the fake holds (running or died, not yet stopped) that mount the
    /// volume in `dir`, sorted: what keeps it mounted.
    pub fn volume_users(&self, dir: &Path) -> Vec<String> {
        let mut ids: Vec<String> = self
            .lock()
            .held
            .iter()
            .filter(|(_, h)| h.spec.volumes.iter().any(|v| v.dir == dir))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Scripted failures not yet consumed.
    pub fn pending_failures(&self) -> usize {
        self.lock().failures.len()
    }

    fn record(&self, call: FakeCall) {
        self.lock().calls.push(call);
    }

    /// Start (or restore) `spec`: refuse a running id, run init outside the lock, then hold
    /// the sandbox. Nothing is held on error.
    async fn launch(&self, spec: &SandboxSpec, op: FakeOp) -> Result<(), RuntimeError> {
        let name = if op == FakeOp::Start {
            "start"
        } else {
            "restore"
        };
        {
            let mut st = self.lock();
            if st.take_failure(op, Some(&spec.id)) {
                return Err(scripted(&spec.id, name));
            }
            if st
                .held
                .get(&spec.id)
                .is_some_and(|h| h.status == RuntimeStatus::Running)
            {
                return Err(RuntimeError::Command {
                    id: spec.id.clone(),
                    command: format!("fake {name}"),
                    stderr: "a sandbox with this id is running".into(),
                });
            }
        }
        if let Some(v) = spec
            .volumes
            .iter()
            .find(|v| !v.dir.join(VOLUME_FILE).is_file())
        {
            return Err(RuntimeError::Volume {
                dir: v.dir.clone(),
                reason: "no such volume".into(),
            });
        }
        std::fs::create_dir_all(spec.state_dir.join("upper")).map_err(|source| {
            RuntimeError::Rootfs {
                id: spec.id.clone(),
                source,
            }
        })?;
        let init = match &self.init {
            Some(f) => Some(f(spec).await.map_err(|stderr| RuntimeError::Command {
                id: spec.id.clone(),
                command: format!("fake {name} (init)"),
                stderr,
            })?),
            None => None,
        };
        let old = self.lock().held.insert(
            spec.id.clone(),
            Held {
                status: RuntimeStatus::Running,
                spec: spec.clone(),
                init,
            },
        );
        drop(old);
        Ok(())
    }

    /// Drop sandbox `id` (its init ends outside the lock). Returns whether it was held.
    fn drop_held(&self, id: &str) -> bool {
        let held = self.lock().held.remove(id);
        held.is_some()
    }
}

#[async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn start(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        self.record(FakeCall::Start {
            id: spec.id.clone(),
            state_dir: spec.state_dir.clone(),
            address: spec.network.as_ref().map(|n| n.address),
        });
        self.launch(spec, FakeOp::Start).await
    }

    async fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::Checkpoint {
            id: id.into(),
            image_dir: image_dir.into(),
        });
        let dying = {
            let mut st = self.lock();
            let running = st
                .held
                .get(id)
                .is_some_and(|h| h.status == RuntimeStatus::Running);
            if !running {
                return Err(RuntimeError::Command {
                    id: id.into(),
                    command: "fake checkpoint".into(),
                    stderr: "sandbox is not running".into(),
                });
            }
            if st.take_failure(FakeOp::Checkpoint, Some(id)) {
                let h = st.held.get_mut(id).expect("checked above");
                h.status = RuntimeStatus::Stopped;
                Some(h.init.take())
            } else {
                None
            }
        };
        if let Some(init) = dying {
            drop(init);
            return Err(RuntimeError::CheckpointRefused {
                id: id.into(),
                reason: "scripted failure; the failed checkpoint killed the sandbox: call stop()"
                    .into(),
            });
        }
        // Complete when it appears: written aside, then renamed into place.
        let io = |source| RuntimeError::Cleanup {
            id: id.into(),
            source,
        };
        let parent = image_dir.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(io)?;
        let tmp = parent.join(format!(
            ".{}.tmp",
            image_dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io)?;
        std::fs::write(tmp.join(IMAGE_FILE), id).map_err(io)?;
        let _ = std::fs::remove_dir_all(image_dir);
        std::fs::rename(&tmp, image_dir).map_err(io)?;
        // A checkpoint stops the sandbox and releases it (as `runsc delete` does).
        self.drop_held(id);
        Ok(())
    }

    fn has_image(&self, image_dir: &Path) -> bool {
        image_dir.join(IMAGE_FILE).is_file()
    }

    async fn restore(&self, spec: &SandboxSpec, image_dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::Restore {
            id: spec.id.clone(),
            image_dir: image_dir.into(),
            address: spec.network.as_ref().map(|n| n.address),
        });
        if !self.has_image(image_dir) {
            return Err(RuntimeError::Command {
                id: spec.id.clone(),
                command: "fake restore".into(),
                stderr: format!("no image in {}", image_dir.display()),
            });
        }
        self.launch(spec, FakeOp::Restore).await
    }

    async fn stop(&self, id: &str, _state_dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::Stop { id: id.into() });
        if self.lock().take_failure(FakeOp::Stop, Some(id)) {
            return Err(scripted(id, "stop"));
        }
        self.drop_held(id);
        Ok(())
    }

    async fn destroy(&self, id: &str, state_dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::Destroy { id: id.into() });
        if self.lock().take_failure(FakeOp::Destroy, Some(id)) {
            return Err(scripted(id, "destroy"));
        }
        self.drop_held(id);
        match std::fs::remove_dir_all(state_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::Cleanup {
                id: id.into(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    async fn update_resources(
        &self,
        id: &str,
        _state_dir: &Path,
        resources: &Resources,
    ) -> Result<(), RuntimeError> {
        self.record(FakeCall::UpdateResources {
            id: id.into(),
            resources: *resources,
        });
        let mut st = self.lock();
        if st.take_failure(FakeOp::UpdateResources, Some(id)) {
            return Err(scripted(id, "update_resources"));
        }
        match st.held.get_mut(id) {
            Some(h) if h.status == RuntimeStatus::Running => {
                h.spec.resources = *resources;
                Ok(())
            }
            _ => Err(RuntimeError::Resize {
                id: id.into(),
                reason: "not running".into(),
            }),
        }
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus, RuntimeError> {
        self.record(FakeCall::Status { id: id.into() });
        if self.lock().take_failure(FakeOp::Status, Some(id)) {
            return Err(scripted(id, "status"));
        }
        Ok(self.status_of(id))
    }

    async fn dead(&self, ids: &[String]) -> Result<Vec<String>, RuntimeError> {
        self.record(FakeCall::Dead { ids: ids.to_vec() });
        let st = self.lock();
        Ok(ids
            .iter()
            .filter(|id| {
                st.held
                    .get(id.as_str())
                    .is_none_or(|h| h.status != RuntimeStatus::Running)
            })
            .cloned()
            .collect())
    }

    async fn copy_files(
        &self,
        from_state_dir: &Path,
        to_state_dir: &Path,
    ) -> Result<(), RuntimeError> {
        self.record(FakeCall::CopyFiles {
            from: from_state_dir.into(),
            to: to_state_dir.into(),
        });
        let failed = |detail: String| RuntimeError::CopyFiles {
            from: from_state_dir.into(),
            to: to_state_dir.into(),
            detail,
        };
        if self.lock().take_failure(FakeOp::CopyFiles, None) {
            return Err(failed("scripted failure".into()));
        }
        copy_tree(from_state_dir, to_state_dir).map_err(|e| failed(e.to_string()))
    }

    async fn pack_files(&self, state_dir: &Path, to_dir: &Path) -> Result<bool, RuntimeError> {
        let failed = |detail: String| RuntimeError::CopyFiles {
            from: state_dir.into(),
            to: to_dir.into(),
            detail,
        };
        if to_dir.exists() {
            return Err(failed("the destination exists".into()));
        }
        copy_tree(state_dir, to_dir).map_err(|e| failed(e.to_string()))?;
        Ok(true)
    }

    async fn unpack_files(&self, from_dir: &Path, state_dir: &Path) -> Result<(), RuntimeError> {
        if state_dir.exists() {
            return Err(RuntimeError::CopyFiles {
                from: from_dir.into(),
                to: state_dir.into(),
                detail: "the destination exists".into(),
            });
        }
        std::fs::rename(from_dir, state_dir).map_err(|e| RuntimeError::CopyFiles {
            from: from_dir.into(),
            to: state_dir.into(),
            detail: e.to_string(),
        })
    }

    async fn export_layer(&self, state_dir: &Path, to_dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::ExportLayer {
            state_dir: state_dir.into(),
            to: to_dir.into(),
        });
        let failed = |source| RuntimeError::Cleanup {
            id: state_dir.display().to_string(),
            source,
        };
        if self.lock().take_failure(FakeOp::ExportLayer, None) {
            return Err(failed(std::io::Error::other("scripted failure")));
        }
        let upper = state_dir.join("upper");
        if upper.is_dir() {
            std::fs::rename(&upper, to_dir).map_err(failed)
        } else {
            std::fs::create_dir_all(to_dir).map_err(failed)
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.record(FakeCall::List);
        if self.lock().take_failure(FakeOp::List, None) {
            return Err(scripted("*", "list"));
        }
        Ok(self.held())
    }

    async fn remove_orphans(
        &self,
        keep: &HashSet<String>,
        _state_dirs_root: &Path,
    ) -> Result<(), RuntimeError> {
        let mut sorted: Vec<String> = keep.iter().cloned().collect();
        sorted.sort();
        self.record(FakeCall::RemoveOrphans { keep: sorted });
        let removed: Vec<Held> = {
            let mut st = self.lock();
            if st.take_failure(FakeOp::RemoveOrphans, None) {
                return Err(scripted("*", "remove_orphans"));
            }
            let orphans: Vec<String> = st
                .held
                .keys()
                .filter(|id| !keep.contains(*id))
                .cloned()
                .collect();
            orphans.iter().filter_map(|id| st.held.remove(id)).collect()
        };
        drop(removed);
        Ok(())
    }

    async fn create_volume(&self, dir: &Path, bytes: u64) -> Result<(), RuntimeError> {
        self.record(FakeCall::CreateVolume {
            dir: dir.into(),
            bytes,
        });
        let err = |reason: String| RuntimeError::Volume {
            dir: dir.into(),
            reason,
        };
        if self.lock().take_failure(FakeOp::CreateVolume, None) {
            return Err(err("scripted failure".into()));
        }
        if dir.exists() {
            return Err(err("exists already".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join(VOLUME_FILE), bytes.to_string()).map_err(|e| err(e.to_string()))
    }

    async fn delete_volume(&self, dir: &Path) -> Result<(), RuntimeError> {
        self.record(FakeCall::DeleteVolume { dir: dir.into() });
        let users = self.volume_users(dir);
        if !users.is_empty() {
            return Err(RuntimeError::Volume {
                dir: dir.into(),
                reason: format!("mounted by {users:?}"),
            });
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::Volume {
                dir: dir.into(),
                reason: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    async fn pack_volume(&self, dir: &Path, to_dir: &Path) -> Result<(), RuntimeError> {
        let err = |reason: String| RuntimeError::Volume {
            dir: dir.into(),
            reason,
        };
        let users = self.volume_users(dir);
        if !users.is_empty() {
            return Err(err(format!("mounted by {users:?}")));
        }
        std::fs::create_dir(to_dir).map_err(|e| err(e.to_string()))?;
        for entry in std::fs::read_dir(dir).map_err(|e| err(e.to_string()))? {
            let entry = entry.map_err(|e| err(e.to_string()))?;
            std::fs::hard_link(entry.path(), to_dir.join(entry.file_name()))
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }

    async fn unpack_volume(&self, from_dir: &Path, dir: &Path) -> Result<(), RuntimeError> {
        let err = |reason: String| RuntimeError::Volume {
            dir: dir.into(),
            reason,
        };
        if !from_dir.join(VOLUME_FILE).is_file() {
            return Err(err("not a fake volume".into()));
        }
        std::fs::rename(from_dir, dir).map_err(|e| err(e.to_string()))
    }

    async fn kill_init_children(&self, id: &str, comm: &str) -> Result<usize, RuntimeError> {
        self.record(FakeCall::KillInitChildren {
            id: id.into(),
            comm: comm.into(),
        });
        // Init restarts its child: the init function runs again, memory (the entry) kept.
        let spec = {
            let mut st = self.lock();
            match st.held.get_mut(id) {
                Some(h) if h.status == RuntimeStatus::Running => {
                    drop(h.init.take());
                    h.spec.clone()
                }
                _ => return Ok(0),
            }
        };
        let Some(f) = &self.init else {
            return Ok(0);
        };
        let init = f(&spec).await.map_err(|stderr| RuntimeError::Command {
            id: id.into(),
            command: "fake kill_init_children (init)".into(),
            stderr,
        })?;
        if let Some(h) = self.lock().held.get_mut(id) {
            h.init = Some(init);
        }
        Ok(1)
    }
}

/// Copy the tree `from` into the empty or missing `to` (directories and regular files).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NetworkAttachment, Resources};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn spec(id: &str, dir: &Path) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            layers: vec![],
            state_dir: dir.join(id),
            args: vec!["/init".into()],
            env: vec![],
            hostname: "sandbox".into(),
            network: Some(NetworkAttachment {
                netns_path: "/nonexistent".into(),
                ifname: "eth0".into(),
                address: Ipv4Addr::LOCALHOST,
                prefix_len: 30,
                gateway: Ipv4Addr::LOCALHOST,
            }),
            resources: Resources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                disk_bytes: None,
            },
            volumes: vec![],
        }
    }

    /// Counts live inits, so tests see when one starts and ends.
    fn counting() -> (FakeRuntime, Arc<AtomicUsize>) {
        struct Live(Arc<AtomicUsize>);
        impl Drop for Live {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let live = Arc::new(AtomicUsize::new(0));
        let l = live.clone();
        let rt = FakeRuntime::with_init(move |_| {
            l.fetch_add(1, Ordering::SeqCst);
            let guard = Box::new(Live(l.clone())) as InitGuard;
            Box::pin(async move { Ok(guard) })
        });
        (rt, live)
    }

    #[tokio::test]
    async fn lifecycle_contract() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, live) = counting();
        let s = spec("a", dir.path());
        rt.start(&s).await.unwrap();
        assert_eq!(rt.status("a").await.unwrap(), RuntimeStatus::Running);
        assert_eq!(live.load(Ordering::SeqCst), 1);
        assert!(rt.start(&s).await.is_err(), "a running id is refused");
        std::fs::write(s.state_dir.join("upper/file"), "x").unwrap();

        let image = dir.path().join("img");
        rt.checkpoint("a", &image).await.unwrap();
        assert!(rt.has_image(&image));
        assert_eq!(rt.status("a").await.unwrap(), RuntimeStatus::Missing);
        assert_eq!(live.load(Ordering::SeqCst), 0, "checkpoint stops init");

        // Restore under another id; the image stays (fork restores it many times).
        let b = spec("b", dir.path());
        rt.copy_files(&s.state_dir, &b.state_dir).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(b.state_dir.join("upper/file")).unwrap(),
            "x"
        );
        rt.restore(&b, &image).await.unwrap();
        rt.restore(&s, &image).await.unwrap();
        assert_eq!(live.load(Ordering::SeqCst), 2);
        assert_eq!(rt.list().await.unwrap(), vec!["a", "b"]);
        assert_eq!(rt.dead(&["a".into(), "zz".into()]).await.unwrap(), ["zz"]);

        rt.stop("a", &s.state_dir).await.unwrap();
        rt.stop("a", &s.state_dir).await.unwrap();
        assert!(s.state_dir.exists(), "stop keeps the files");
        rt.destroy("b", &b.state_dir).await.unwrap();
        rt.destroy("b", &b.state_dir).await.unwrap();
        assert!(!b.state_dir.exists(), "destroy removes the files");
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert_eq!(
            rt.ops_of("a"),
            ["start", "start", "checkpoint", "restore", "stop", "stop"]
        );
        assert!(
            rt.restore(&s, &dir.path().join("none")).await.is_err(),
            "no image, no restore"
        );
    }

    #[tokio::test]
    async fn scripted_failures() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, live) = counting();
        let s = spec("a", dir.path());
        rt.fail_next(FakeOp::Start, Some("a"));
        assert!(rt.start(&s).await.is_err());
        assert_eq!(rt.status_of("a"), RuntimeStatus::Missing, "nothing left");
        assert_eq!(live.load(Ordering::SeqCst), 0);
        rt.start(&s).await.unwrap();

        rt.fail_next(FakeOp::Checkpoint, Some("other"));
        rt.fail_next(FakeOp::Checkpoint, Some("a"));
        let image = dir.path().join("img");
        assert!(matches!(
            rt.checkpoint("a", &image).await,
            Err(RuntimeError::CheckpointRefused { .. })
        ));
        assert!(!rt.has_image(&image));
        assert_eq!(rt.status_of("a"), RuntimeStatus::Stopped, "killed by it");
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert_eq!(
            rt.pending_failures(),
            1,
            "the other sandbox's is still armed"
        );

        rt.stop("a", &s.state_dir).await.unwrap();
        rt.start(&s).await.unwrap();
        assert!(rt.kill("a"));
        assert_eq!(rt.dead(&["a".into()]).await.unwrap(), ["a"]);
        assert!(rt.forget("a"));
        assert_eq!(rt.status("a").await.unwrap(), RuntimeStatus::Missing);
    }

    #[tokio::test]
    async fn orphans_and_init_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, live) = counting();
        for id in ["a", "b", "c"] {
            rt.start(&spec(id, dir.path())).await.unwrap();
        }
        assert_eq!(rt.kill_init_children("a", "exe").await.unwrap(), 1);
        assert_eq!(live.load(Ordering::SeqCst), 3);
        let keep: HashSet<String> = ["b".to_string()].into();
        rt.remove_orphans(&keep, dir.path()).await.unwrap();
        assert_eq!(rt.held(), ["b"]);
        assert_eq!(live.load(Ordering::SeqCst), 1);
        assert!(dir.path().join("a").exists(), "files stay");
    }
}
