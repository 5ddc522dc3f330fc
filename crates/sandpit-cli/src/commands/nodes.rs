//! `sandpit nodes`: the fleet as the database knows it (names, status, leases, free room),
//! and an operator's drain. Talks to the database directly: the fleet is the operator's,
//! not a tenant's, so no API token reaches it.
#![expect(clippy::disallowed_methods, reason = "the operator's data dir")]

use std::path::PathBuf;

use anyhow::Context;
use sandpit_control::store::{NodeRow, NodeStatus, Store};

#[derive(clap::Args)]
pub struct NodesArgs {
    /// The data dir whose SQLite database to read (when no --database is given).
    #[arg(
        long,
        env = "SANDPIT_DATA_DIR",
        default_value = "./.sandpit",
        global = true
    )]
    data_dir: PathBuf,
    /// The fleet's database (`postgres://…` or `sqlite://…`), as given to `serve`.
    #[arg(long, env = "SANDPIT_DATABASE", global = true)]
    database: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<NodesCommand>,
}

#[derive(clap::Subcommand)]
pub enum NodesCommand {
    /// List every node (the default).
    List,
    /// Take no new sandboxes on a node; with an object store and a node secret its running
    /// sandboxes are hibernated and woken on other nodes (without, they keep running).
    Drain { name: String },
    /// Let a drained node take new sandboxes again.
    Undrain { name: String },
    /// Forget a lost node (it may register again later).
    Forget { name: String },
}

/// The database `serve` uses: `database`, else `<data_dir>/sandpit.db` (which must exist).
pub(crate) async fn open_db(
    data_dir: &std::path::Path,
    database: Option<&str>,
) -> anyhow::Result<Store> {
    let url = match database {
        Some(u) => u.to_string(),
        None => {
            let path = data_dir.join("sandpit.db");
            anyhow::ensure!(
                path.is_file(),
                "no database at {} (give --data-dir or --database as to `sandpit serve`)",
                path.display()
            );
            format!("sqlite://{}", path.display())
        }
    };
    Store::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{}", sandpit_control::DisplayChain(&e)))
        .context("opening the database")
}

pub async fn run(args: NodesArgs) -> anyhow::Result<u8> {
    let store = open_db(&args.data_dir, args.database.as_deref()).await?;
    let done = |ok: bool, what: &str, name: &str| -> anyhow::Result<u8> {
        if ok {
            eprintln!("{name}: {what}");
            Ok(0)
        } else {
            anyhow::bail!("{name}: no such node in a state that allows this")
        }
    };
    let e =
        |e: sandpit_control::ControlError| anyhow::anyhow!("{}", sandpit_control::DisplayChain(&e));
    match &args.command {
        None | Some(NodesCommand::List) => {
            let now = store.nodes.now().await.map_err(e)?;
            let nodes = store.nodes.list().await.map_err(e)?;
            if args.json {
                let rows: Vec<serde_json::Value> = nodes.iter().map(|n| to_json(n, now)).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&nodes, now));
            }
            Ok(0)
        }
        Some(NodesCommand::Drain { name }) => done(
            store.nodes.set_draining(name, true).await.map_err(e)?,
            "draining: takes no new sandboxes",
            name,
        ),
        Some(NodesCommand::Undrain { name }) => done(
            store.nodes.set_draining(name, false).await.map_err(e)?,
            "live: takes new sandboxes",
            name,
        ),
        Some(NodesCommand::Forget { name }) => done(
            store.nodes.forget(name).await.map_err(e)?,
            "forgotten",
            name,
        ),
    }
}

/// What a row's lease says at `now`: the status, or `lapsed` for a live node whose lease
/// ran out that no one has declared lost yet.
fn state(n: &NodeRow, now: i64) -> &'static str {
    match n.status {
        NodeStatus::Lost => "lost",
        _ if n.lease_until <= now => "lapsed",
        s => s.as_str(),
    }
}

fn to_json(n: &NodeRow, now: i64) -> serde_json::Value {
    serde_json::json!({
        "name": n.info.id,
        "status": state(n, now),
        "address": n.info.address,
        "runsc": n.info.runsc_build,
        "epoch": n.epoch,
        "lease_left_ms": (n.lease_until - now).max(0),
        "last_heartbeat_ms_ago": (now - n.heartbeat_at).max(0),
        "memory_mib": n.info.memory_mib,
        "free_memory_mib": n.load.free_memory_mib,
        "slots": n.info.slots,
        "free_slots": n.load.free_slots,
    })
}

fn table(nodes: &[NodeRow], now: i64) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:>6} {:>10} {:>16} {:>12}  {}\n",
        "NAME", "STATUS", "EPOCH", "LEASE", "FREE MEM (MiB)", "FREE SLOTS", "ADDRESS"
    );
    for n in nodes {
        let lease = if n.status == NodeStatus::Lost {
            "-".to_string()
        } else {
            format!("{:.1}s", (n.lease_until - now).max(0) as f64 / 1000.0)
        };
        out.push_str(&format!(
            "{:<24} {:<9} {:>6} {:>10} {:>16} {:>12}  {}\n",
            n.info.id,
            state(n, now),
            n.epoch,
            lease,
            format!("{}/{}", n.load.free_memory_mib, n.info.memory_mib),
            format!("{}/{}", n.load.free_slots, n.info.slots),
            n.info.address
        ));
    }
    if nodes.is_empty() {
        out.push_str("(no nodes have registered)\n");
    }
    out
}
