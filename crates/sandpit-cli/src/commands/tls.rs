//! `sandpit tls dev-ca DIR`: make (or refresh) the development CA `sandpit serve
//! --tls-dev-ca DIR` uses, ahead of the server, to hand `DIR/ca.pem` to clients first.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TlsCommand {
    /// Make the development CA in DIR (kept if there) and a server certificate for the names
    /// `sandpit serve --tls-dev-ca DIR` with the same --listen and --preview-domain will use;
    /// print the CA's path and how to trust it.
    DevCa {
        /// The directory (made 0700), e.g. /var/lib/sandpit/tls.
        dir: PathBuf,
        /// The address the server will listen on.
        #[arg(long, env = "SANDPIT_LISTEN", default_value = "127.0.0.1:7878")]
        listen: SocketAddr,
        /// The server's preview domain.
        #[arg(long, env = "SANDPIT_PREVIEW_DOMAIN", default_value = "localhost")]
        preview_domain: String,
    },
}

pub fn run(cmd: TlsCommand) -> anyhow::Result<u8> {
    match cmd {
        TlsCommand::DevCa {
            dir,
            listen,
            preview_domain,
        } => {
            let names = crate::dev_ca::names_for(&listen, &preview_domain);
            let (files, made) = crate::dev_ca::ensure(&dir, &names)
                .with_context(|| format!("the development CA in {}", dir.display()))?;
            println!(
                "{} {}",
                if made.ca { "made" } else { "kept" },
                files.ca_cert.display()
            );
            println!(
                "{} {} for {}",
                if made.server { "made" } else { "kept" },
                files.server_cert.display(),
                names.join(", ")
            );
            println!("{}", crate::dev_ca::trust_hint(&files));
            Ok(0)
        }
    }
}
