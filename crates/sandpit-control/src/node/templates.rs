//! A template's start-up in a sandbox: its start command and ready check, its boot
//! snapshot, and the sandboxes a template build runs its steps in (system sandboxes over
//! explicit layers, torn down afterwards).
#![expect(
    clippy::disallowed_methods,
    reason = "boot snapshots are written by the node itself under the data dir"
)]

use std::path::{Path, PathBuf};

use super::Node;
use super::images::{
    BASE_TEMPLATE_ID, BASE_TEMPLATE_NAME, boot_snapshot, boot_snapshot_dir, image_config,
};
use crate::ControlError;
use crate::store::TemplateRow;
use crate::util::now_ms;
use sandpit_image_config::ImageConfig;

/// Where a template's start command writes its output inside the sandbox.
pub const START_LOG: &str = "/tmp/sandpit-start.log";

/// How long a start command may take to become ready.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Start the template's start command in a cold-booted sandbox (detached from the agent
/// connection, output to [`START_LOG`]) and wait for its ready check. Nothing to do for a
/// template without one.
pub async fn start_and_wait(node: &Node, row: &crate::store::Sandbox) -> Result<(), ControlError> {
    let Some(template) = node.store.templates.by_id(&row.template_id).await? else {
        return Ok(());
    };
    let cfg = image_config(&template)?;
    if cfg.start_command().is_none() && cfg.ready.is_none() {
        return Ok(());
    }
    let env = super::boot::exec_env(row, Vec::new())?;
    start_command(node, row, &cfg, env).await?;
    wait_ready(node, row, &cfg, READY_TIMEOUT).await
}

/// Launch `cfg`'s start command in the background of a running sandbox.
pub async fn start_command(
    node: &Node,
    row: &crate::store::Sandbox,
    cfg: &ImageConfig,
    env: Vec<(String, String)>,
) -> Result<(), ControlError> {
    let Some(argv) = cfg.start_command() else {
        return Ok(());
    };
    let mut command = sandpit_image_config::shell_join(&argv);
    if let Some(user) = cfg
        .user
        .as_deref()
        .filter(|u| !matches!(*u, "root" | "0" | "0:0"))
    {
        command = sandpit_image_config::shell_join(&[
            "su".into(),
            "-s".into(),
            "/bin/sh".into(),
            "-c".into(),
            command,
            user.into(),
        ]);
    }
    // setsid (where the image has it) puts the command in its own session, so it outlives
    // this exec's process group; its output goes to a file, so the exec ends at once.
    let script = format!(
        "cd \"$1\" 2>/dev/null; if command -v setsid >/dev/null 2>&1; then setsid /bin/sh -c \"$2\" >{START_LOG} 2>&1 </dev/null & else /bin/sh -c \"$2\" >{START_LOG} 2>&1 </dev/null & fi"
    );
    let req = sandpit_agent_proto::ExecRequest {
        argv: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            script,
            "start".into(),
            cfg.workdir.clone().unwrap_or_else(|| "/".into()),
            command,
        ]),
        env,
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    let agent = super::boot::agent_of(node, row).expect("a booted sandbox has a slot");
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let status = agent.exec(req, tx).await.map_err(|f| ControlError::Agent {
        sandbox: row.id.to_string(),
        what: format!("starting the template's start command: {f:?}"),
    })?;
    if status.exit_code != 0 {
        return Err(ControlError::Agent {
            sandbox: row.id.to_string(),
            what: format!(
                "the start command could not be launched (exit {})",
                status.exit_code
            ),
        });
    }
    Ok(())
}

/// Wait until `cfg`'s ready check passes: its port listens, or its command exits 0. With no
/// check, the first exposed port (if any) must listen.
pub async fn wait_ready(
    node: &Node,
    row: &crate::store::Sandbox,
    cfg: &ImageConfig,
    limit: std::time::Duration,
) -> Result<(), ControlError> {
    use sandpit_image_config::ReadyCheck;
    let check = match (&cfg.ready, cfg.exposed_ports.first()) {
        (Some(c), _) => c.clone(),
        (None, Some(p)) if cfg.start_command().is_some() => ReadyCheck::Port(*p),
        _ => return Ok(()),
    };
    let agent = super::boot::agent_of(node, row).expect("a booted sandbox has a slot");
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let ready = match &check {
            ReadyCheck::Port(p) => agent
                .list_ports()
                .await
                .map(|l| l.ports.iter().any(|x| x.port == *p))
                .unwrap_or(false),
            ReadyCheck::Command(c) => {
                let (tx, _rx) = tokio::sync::mpsc::channel(16);
                let req = sandpit_agent_proto::ExecRequest {
                    shell: Some(c.clone()),
                    env: super::boot::exec_env(row, Vec::new())?,
                    timeout_ms: Some(10_000),
                    ..Default::default()
                };
                agent
                    .exec(req, tx)
                    .await
                    .map(|s| s.exit_code == 0)
                    .unwrap_or(false)
            }
        };
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let log = read_start_log(node, row).await;
            return Err(ControlError::Agent {
                sandbox: row.id.to_string(),
                what: format!(
                    "the start command was not ready ({check:?}) within {} s; its output:\n{log}",
                    limit.as_secs()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The start command's output so far (for errors).
pub async fn read_start_log(node: &Node, row: &crate::store::Sandbox) -> String {
    let Some(agent) = super::boot::agent_of(node, row) else {
        return String::new();
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let req = sandpit_agent_proto::ExecRequest {
        argv: Some(vec![
            "tail".into(),
            "-c".into(),
            "8192".into(),
            START_LOG.into(),
        ]),
        timeout_ms: Some(5_000),
        ..Default::default()
    };
    let run = agent.exec(req, tx);
    let collect = async {
        // `tail -c` bounds it, unless the image's `tail` does not: keep at most 16 KiB.
        let mut out = Vec::new();
        while let Some(item) = rx.recv().await {
            if let crate::agent::ExecOutput::Stdout(b) | crate::agent::ExecOutput::Stderr(b) = item
            {
                let room = (16usize << 10).saturating_sub(out.len());
                out.extend_from_slice(&b[..b.len().min(room)]);
            }
        }
        out
    };
    let (_, out) = tokio::join!(run, collect);
    String::from_utf8_lossy(&out).into_owned()
}

/// Boot the base template once, wait for its agent, checkpoint it and keep its files and
/// memory as the template's boot snapshot; creates then restore it instead of booting.
/// Runs in the background at start; does nothing if the snapshot exists.
pub async fn take_boot_snapshot(node: &std::sync::Arc<Node>) -> Result<(), ControlError> {
    let final_dir = boot_snapshot_dir(node, BASE_TEMPLATE_ID);
    if boot_snapshot(node, BASE_TEMPLATE_ID).is_some() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    if let Some(parent) = final_dir.parent() {
        std::fs::create_dir_all(parent).map_err(ControlError::files(
            "creating the boot snapshot's directory",
        ))?;
    }
    let mut row = super::boot::system_row(node, BASE_TEMPLATE_ID, BASE_TEMPLATE_NAME);
    super::boot::insert_with_slot(node, &mut row).await?;
    let tmp = final_dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let taken = async {
        super::boot::boot(node, &row, None).await?;
        // In the image, so a create restoring it need not write it (see save_boot_image).
        super::boot::write_resolv_conf(node, &row).await?;
        save_boot_image(node, &row, &tmp).await?;
        std::fs::rename(&tmp, &final_dir)
            .map_err(ControlError::files("publishing the boot snapshot"))
    }
    .await;
    node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
        .await;
    node.store
        .sandboxes
        .mark_destroyed(&row.id, now_ms())
        .await?;
    if taken.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    taken?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "took the base template's boot snapshot"
    );
    Ok(())
}

/// Checkpoint the running `row` into `dir/memory` and copy its files to `dir/files`: a boot
/// snapshot, which sandboxes of its template restore instead of booting.
pub async fn save_boot_image(
    node: &Node,
    row: &crate::store::Sandbox,
    dir: &Path,
) -> Result<(), ControlError> {
    node.runtime
        .checkpoint(&row.runtime_id, &dir.join("memory"))
        .await?;
    node.runtime
        .copy_files(&node.state_dir(&row.id), &dir.join("files"))
        .await?;
    // What its /etc/resolv.conf says (every caller writes the node's first): a create that
    // restores it writes the file again only when the node's resolvers changed since.
    std::fs::write(dir.join(BOOT_SNAPSHOT_RESOLV), &node.resolv_conf).map_err(
        ControlError::files("recording a boot snapshot's resolv.conf"),
    )?;
    Ok(())
}

/// Beside a boot snapshot's image: the resolv.conf its sandbox had.
pub const BOOT_SNAPSHOT_RESOLV: &str = "resolv.conf";

/// Whether the boot snapshot in `dir` holds this node's current resolv.conf (false when it
/// does not say: taken before the record existed, or unreadable).
pub fn boot_snapshot_resolv_current(node: &Node, dir: &Path) -> bool {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(dir.join(BOOT_SNAPSHOT_RESOLV)) else {
        return false;
    };
    let mut text = String::new();
    // Ours, but bounded all the same: one byte more than the node's own says "different".
    let limit = node.resolv_conf.len() as u64 + 1;
    file.take(limit).read_to_string(&mut text).is_ok() && text == node.resolv_conf
}

/// Boot a template once in a system sandbox, start its start command, wait for its ready
/// check and, when boot snapshots are on, keep that moment as the template's boot snapshot
/// (sandboxes then restore with the command already running). The sandbox is torn down
/// whatever happens. For a build whose image has a start command or a ready check.
pub async fn verify_start(
    node: &Node,
    template: &TemplateRow,
    cfg: &ImageConfig,
) -> Result<(), ControlError> {
    let mut row = super::boot::system_row(node, &template.id, &template.name);
    row.egress = crate::Stored::from_raw(template.default_egress.clone());
    let lock = node.lock_of(&row.id);
    let guard = lock.write().await;
    super::boot::insert_with_slot(node, &mut row).await?;
    let snapshot_dir = boot_snapshot_dir(node, &template.id);
    let tmp = snapshot_dir.with_extension("tmp");
    let result = async {
        super::boot::boot(node, &row, None).await?;
        super::boot::write_resolv_conf(node, &row).await?;
        let env = super::boot::exec_env(&row, cfg.env.clone())?;
        start_command(node, &row, cfg, env).await?;
        wait_ready(node, &row, cfg, READY_TIMEOUT).await?;
        if node.cfg.boot_snapshots {
            let _ = std::fs::remove_dir_all(&tmp);
            save_boot_image(node, &row, &tmp).await?;
            let _ = std::fs::remove_dir_all(&snapshot_dir);
            std::fs::rename(&tmp, &snapshot_dir)
                .map_err(ControlError::files("publishing a template's boot snapshot"))?;
        }
        Ok::<(), ControlError>(())
    }
    .await;
    discard_system_sandbox(node, &row, guard).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// A build's `RUN` step, run in a system sandbox of its own over the step's layers.
pub struct BuildStep<'a> {
    pub template_id: &'a str,
    pub template_name: &'a str,
    /// The egress policy the build runs under (stored JSON).
    pub egress: &'a str,
    /// The layers to run over, lowest first (the agent layer goes on top).
    pub layers: &'a [PathBuf],
    pub argv: &'a [String],
    pub workdir: &'a str,
    pub env: &'a [(String, String)],
    /// Where the step's writable layer is exported when it succeeds.
    pub out: &'a Path,
    pub timeout: std::time::Duration,
}

/// Run one build step: boot a large system sandbox over `step.layers`, run the command
/// with its output to `log` as it arrives, stop it and, when it exited 0, export its
/// writable layer to `step.out`. Returns the exit code. The sandbox is torn down whatever
/// happens.
pub async fn run_build_step(
    node: &Node,
    step: BuildStep<'_>,
    log: &(dyn Fn(String) + Send + Sync),
) -> Result<i32, ControlError> {
    let mut row = super::boot::system_row(node, step.template_id, step.template_name);
    row.egress = crate::Stored::from_raw(step.egress.to_string());
    row.size = "large".into();
    let lock = node.lock_of(&row.id);
    let guard = lock.write().await;
    super::boot::insert_with_slot(node, &mut row).await?;
    let result = async {
        let mut spec = super::boot::spec_for(node, &row).await?;
        spec.layers = step
            .layers
            .iter()
            .cloned()
            .chain([node.agent_layer.clone()])
            .collect();
        super::boot::boot_spec(node, &row, &spec, None).await?;
        super::boot::write_resolv_conf(node, &row).await?;
        let agent = super::boot::agent_of(node, &row).expect("slot claimed");
        let req = sandpit_agent_proto::ExecRequest {
            argv: Some(step.argv.to_vec()),
            cwd: Some(step.workdir.to_string()),
            env: step.env.to_vec(),
            timeout_ms: Some(step.timeout.as_millis() as u64),
            ..Default::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let exec = agent.exec(req, tx);
        tokio::pin!(exec);
        let status = loop {
            tokio::select! {
                s = &mut exec => break s,
                Some(item) = rx.recv() => forward(item, log),
            }
        };
        while let Ok(item) = rx.try_recv() {
            forward(item, log);
        }
        let status = status.map_err(|f| ControlError::Agent {
            sandbox: row.id.to_string(),
            what: format!("running a build step: {f:?}"),
        })?;
        if status.timed_out {
            log(format!(
                "\n[timed out after {} s]\n",
                step.timeout.as_secs()
            ));
        }
        node.runtime
            .stop(&row.runtime_id, &node.state_dir(&row.id))
            .await?;
        if status.exit_code == 0 {
            node.runtime
                .export_layer(&node.state_dir(&row.id), step.out)
                .await?;
            clean_run_layer(step.out);
        }
        Ok::<i32, ControlError>(status.exit_code)
    }
    .await;
    discard_system_sandbox(node, &row, guard).await;
    result
}

fn forward(item: crate::agent::ExecOutput, log: &(dyn Fn(String) + Send + Sync)) {
    match item {
        crate::agent::ExecOutput::Stdout(b) | crate::agent::ExecOutput::Stderr(b) => {
            log(String::from_utf8_lossy(&b).into_owned())
        }
        crate::agent::ExecOutput::Started(_) => {}
    }
}

/// What a `RUN` step's exported layer must not keep: the resolver the server wrote, and
/// the mount points the runtime made (empty directories only).
fn clean_run_layer(layer: &Path) {
    let Ok(root) = sandpit_fs::TreeDir::open(layer) else {
        return;
    };
    if let Ok(etc) = root.open_dir(Path::new("etc")) {
        let _ = etc.remove_file(std::ffi::OsStr::new("resolv.conf"));
    }
    for d in ["etc", "proc", "sys", "dev"] {
        root.remove_empty_dir(std::ffi::OsStr::new(d));
    }
}

/// Tear down a system sandbox, mark it destroyed and forget its lock (held until then).
/// Best effort: the outcome of what it ran is already decided.
async fn discard_system_sandbox(
    node: &Node,
    row: &crate::store::Sandbox,
    guard: tokio::sync::RwLockWriteGuard<'_, ()>,
) {
    node.teardown(&row.id, &row.runtime_id, row.slot.map(|s| s as u32))
        .await;
    let _ = node.store.sandboxes.mark_destroyed(&row.id, now_ms()).await;
    drop(guard);
    node.forget_lock(&row.id);
}
