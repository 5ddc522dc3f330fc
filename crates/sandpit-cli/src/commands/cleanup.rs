//! `sandpit cleanup`: remove every host object one server created (sandboxes, mounts,
//! namespaces, veths, nftables table). The database and templates are kept; sandboxes it
//! knew of are failed on its next start. For uninstalling, and for tests.
#![expect(clippy::disallowed_methods, reason = "the operator's data dir")]

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sandpit_net::{NetConfig, Network};
use sandpit_runtime_gvisor::{GvisorConfig, GvisorRuntime};

#[derive(clap::Args)]
pub struct CleanupArgs {
    #[arg(long, env = "SANDPIT_DATA_DIR", default_value = "./.sandpit")]
    data_dir: PathBuf,
    #[arg(long, env = "SANDPIT_PREFIX", default_value = "sp")]
    prefix: String,
    #[arg(long, env = "SANDPIT_POOL", default_value = "10.88.0.0/16")]
    pool: String,
    #[arg(long, env = "SANDPIT_RUNSC", default_value = "runsc")]
    runsc: PathBuf,
    /// gVisor platform (as given to `serve`).
    #[arg(long, env = "SANDPIT_PLATFORM", default_value = "ptrace")]
    platform: String,
    /// The sandboxes' cgroup parent (as given to `serve`; default `sandpit-<prefix>`).
    #[arg(long, env = "SANDPIT_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    /// Required: this stops every sandbox of the server.
    #[arg(long)]
    yes: bool,
}

pub async fn run(args: CleanupArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    anyhow::ensure!(
        args.yes,
        "this stops and removes every sandbox of the server; pass --yes"
    );
    let runtime = GvisorRuntime::new(GvisorConfig {
        runsc: args.runsc,
        root_dir: args.data_dir.join("runsc"),
        platform: args.platform,
        cgroup_parent: args
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| format!("sandpit-{}", args.prefix)),
        debug_log_dir: None,
    })?;
    let net = Network::new(NetConfig {
        prefix: args.prefix,
        pool: args
            .pool
            .parse()
            .map_err(|e| anyhow::anyhow!("--pool: {e}"))?,
        nameservers: Vec::new(),
    })?;
    eprintln!("ready in {:.1} s", t0.elapsed().as_secs_f64());
    remove_everything(&runtime, &net, &args.data_dir).await?;
    eprintln!("removed every sandbox and network object of this server");
    Ok(())
}

/// Stop every sandbox the runtime holds (several at a time, with a progress bar on a
/// terminal) and remove every network object, then the sandboxes' files and memory images.
async fn remove_everything(
    runtime: &GvisorRuntime,
    net: &Network,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} sandboxes stopped [{pos}/{len}] {wide_bar} {elapsed}",
        )
        .expect("static template"),
    );
    let report = runtime
        .cleanup_orphans_with_progress(
            &HashSet::new(),
            &data_dir.join("sandboxes"),
            &|done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .await
        .context("stopping sandboxes")?;
    bar.finish_and_clear();
    eprintln!(
        "stopped {} sandboxes in {:.1} s",
        report.removed.len(),
        t0.elapsed().as_secs_f64()
    );
    let t1 = std::time::Instant::now();
    net.teardown().await.context("removing network objects")?;
    eprintln!(
        "removed the network objects in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    let t2 = std::time::Instant::now();
    for dir in ["sandboxes", "checkpoints"] {
        let p = data_dir.join(dir);
        if p.exists() {
            remove_entries(&p).await?;
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    eprintln!(
        "removed the sandboxes' files in {:.1} s",
        t2.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Remove what `dir` holds (one directory per sandbox), several at a time: unlinking a
/// sandbox's files waits on the disk more than it works.
async fn remove_entries(dir: &std::path::Path) -> anyhow::Result<()> {
    use futures::StreamExt;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    let mut removed = futures::stream::iter(entries)
        .map(|p| async move {
            let shown = p.display().to_string();
            tokio::task::spawn_blocking(move || {
                // Entries here are the server's own: directories, or a file left mid-write.
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                }
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r.with_context(|| format!("removing {shown}")))
        })
        .buffer_unordered(8);
    while let Some(r) = removed.next().await {
        r?;
    }
    Ok(())
}
