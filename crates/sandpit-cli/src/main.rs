//! `sandpit`: the server (`sandpit serve`) and a client for its API (`sandpit sandbox ...`).

mod commands;
mod dev_ca;
mod objects;
mod telemetry;
mod tls;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sandpit",
    version,
    about = "Self-hosted sandboxes for untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the API and a node running sandboxes (the single-box default), or
    /// with --api-only an API replica that relays to the fleet's nodes.
    Serve(Box<commands::serve::ServeArgs>),
    /// Run one node of a fleet: sandboxes on this host, registered in the fleet's
    /// PostgreSQL database (--control postgres://…) with a lease, reached by the API
    /// replicas with --node-secret. It answers the API too. (`sandpit nodes drain NAME`
    /// drains one.)
    Node(Box<commands::serve::ServeArgs>),
    /// Manage sandboxes on a server.
    #[command(subcommand)]
    Sandbox(commands::sandbox::SandboxCommand),
    /// Build and manage templates (from Dockerfiles or images).
    #[command(subcommand)]
    Template(commands::template::TemplateCommand),
    /// Named volumes: storage that outlives sandboxes (mount with `sandbox create --volume`).
    #[command(subcommand)]
    Volume(commands::volume::VolumeCommand),
    /// Speak MCP (the Model Context Protocol) on stdin/stdout for a local agent (Claude
    /// Desktop and the like), bridged to the server's `/mcp` endpoint with your token.
    Mcp(commands::mcp::McpArgs),
    /// Print the OpenAPI document of the server's API.
    Openapi,
    /// Remove every sandbox and host object of one server (keeps the database).
    Cleanup(commands::cleanup::CleanupArgs),
    /// The fleet's nodes (leases, free room) from the database; drain one.
    Nodes(commands::nodes::NodesArgs),
    /// Remove layers, build cache entries and deleted templates' files nothing references.
    Gc(commands::gc::GcArgs),
    /// TLS for development: a local CA (`sandpit serve --tls-dev-ca DIR` makes it too).
    #[command(subcommand)]
    Tls(commands::tls::TlsCommand),
    /// Operator commands on workspace secrets (rotate the master key).
    #[command(subcommand)]
    Secrets(commands::secrets::SecretsCommand),
}

/// The stack of every runtime thread (workers and the blocking pool).
const WORKER_STACK: usize = 8 << 20;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Workers get a main thread's stack (std's default for spawned threads is 2 MiB): an
    // unoptimized build's deepest request paths (an exec that wakes a sandbox) take about
    // half of 2 MiB, and an overflow aborts the whole server. Untouched pages cost nothing.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK)
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(args) => commands::serve::run(*args).await.map(|_| 0),
            Command::Node(args) => commands::serve::run_node(*args).await.map(|_| 0),
            Command::Sandbox(cmd) => commands::sandbox::run(cmd).await,
            Command::Template(cmd) => commands::template::run(cmd).await,
            Command::Volume(cmd) => commands::volume::run(cmd).await,
            Command::Cleanup(args) => commands::cleanup::run(args).await.map(|_| 0),
            Command::Nodes(args) => commands::nodes::run(args).await,
            Command::Gc(args) => commands::gc::run(args).await,
            Command::Tls(cmd) => commands::tls::run(cmd),
            Command::Secrets(cmd) => commands::secrets::run(cmd).await,
            Command::Mcp(args) => commands::mcp::run(args).await,
            Command::Openapi => {
                println!("{}", sandpit_server::openapi().to_pretty_json()?);
                Ok(0)
            }
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
