//! `sandpit secrets`: operator commands on the secrets store. `rotate-key` opens every stored
//! secret value and every lineage CA's key with the old master key and seals them again with
//! the new one, in one transaction on the database directly (like `sandpit gc`). Nothing is
//! written unless everything opens with the old key.
//! Stop the servers first (or restart them with the new key right after): a server still
//! holding the old key cannot open values sealed with the new one.

use std::path::PathBuf;

use sandpit_control::secrets::{MasterKey, rotate_key};

#[derive(clap::Subcommand)]
pub enum SecretsCommand {
    /// Re-seal every secret value and lineage CA key with a new master key.
    RotateKey(RotateKeyArgs),
    /// Print a new random master key (64 hex digits) for --secrets-key-file.
    GenerateKey,
}

#[derive(clap::Args)]
pub struct RotateKeyArgs {
    /// The data dir whose SQLite database to use when no --database is given.
    #[arg(long, env = "SANDPIT_DATA_DIR", default_value = "./.sandpit")]
    data_dir: PathBuf,
    /// The database (`postgres://…` or `sqlite://…`), as given to `serve`.
    #[arg(long, env = "SANDPIT_DATABASE")]
    database: Option<String>,
    /// The file holding the current key.
    #[arg(long)]
    old_key_file: PathBuf,
    /// The file holding the new key.
    #[arg(long)]
    new_key_file: PathBuf,
}

pub async fn run(cmd: SecretsCommand) -> anyhow::Result<u8> {
    match cmd {
        SecretsCommand::GenerateKey => {
            println!("{}", MasterKey::generate_hex());
            Ok(0)
        }
        SecretsCommand::RotateKey(args) => {
            let err = |e: sandpit_control::ControlError| {
                anyhow::anyhow!("{}", sandpit_control::DisplayChain(&e))
            };
            let old = MasterKey::from_file(&args.old_key_file).map_err(err)?;
            let new = MasterKey::from_file(&args.new_key_file).map_err(err)?;
            let store = super::nodes::open_db(&args.data_dir, args.database.as_deref()).await?;
            let done = rotate_key(&store, &old, &new).await.map_err(err)?;
            println!(
                "re-sealed {} secret values and {} lineage CA keys with the new key",
                done.values, done.lineage_keys
            );
            Ok(0)
        }
    }
}
