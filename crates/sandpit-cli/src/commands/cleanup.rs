//! `sandpit cleanup`: remove every host object one server created (sandboxes, mounts,
//! namespaces, veths, nftables table). The database and templates are kept; sandboxes it
//! knew of are failed on its next start. For uninstalling, and for tests.
#![expect(clippy::disallowed_methods, reason = "the operator's data dir")]

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::Context;
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
    /// Required: this stops every sandbox of the server.
    #[arg(long)]
    yes: bool,
}

pub async fn run(args: CleanupArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.yes,
        "this stops and removes every sandbox of the server; pass --yes"
    );
    let runtime = GvisorRuntime::new(GvisorConfig {
        runsc: args.runsc,
        root_dir: args.data_dir.join("runsc"),
        platform: "ptrace".into(),
        cgroup_parent: format!("sandpit-{}", args.prefix),
        debug_log_dir: None,
    })?;
    runtime
        .cleanup_orphans(&HashSet::new(), &args.data_dir.join("sandboxes"))
        .await
        .context("stopping sandboxes")?;
    let net = Network::new(NetConfig {
        prefix: args.prefix,
        pool: args
            .pool
            .parse()
            .map_err(|e| anyhow::anyhow!("--pool: {e}"))?,
        nameservers: Vec::new(),
    })?;
    net.teardown().await.context("removing network objects")?;
    for dir in ["sandboxes", "checkpoints"] {
        let p = args.data_dir.join(dir);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    eprintln!("removed every sandbox and network object of this server");
    Ok(())
}
