//! `sandpit volume ...`: named volumes (`/v1/volumes`).

use super::sandbox::{Conn, print_json};

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// Create a volume and print it as JSON.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// `[a-z0-9-]`, 1 to 63 characters.
        name: String,
        /// Its size, e.g. 1G or 512M (default: the server's small disk size).
        #[arg(long)]
        size: Option<String>,
    },
    /// List the workspace's volumes.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one volume.
    Get {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// Delete a volume and its data (refused while a sandbox or snapshot uses it).
    Delete {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
}

pub async fn run(cmd: VolumeCommand) -> anyhow::Result<u8> {
    match cmd {
        VolumeCommand::Create { conn, name, size } => {
            print_json(&conn.client()?.create_volume(&name, size.as_deref()).await?)?
        }
        VolumeCommand::List { conn } => print_json(&conn.client()?.list_volumes().await?)?,
        VolumeCommand::Get { conn, name } => print_json(&conn.client()?.get_volume(&name).await?)?,
        VolumeCommand::Delete { conn, name } => conn.client()?.delete_volume(&name).await?,
    }
    Ok(0)
}
