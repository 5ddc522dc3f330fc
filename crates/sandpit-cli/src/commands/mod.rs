//! One module per `sandpit` subcommand.

pub mod cleanup;
pub mod gc;
pub mod mcp;
pub mod nodes;
pub mod sandbox;
pub mod secrets;
pub mod serve;
pub mod shell;
pub mod template;
pub mod tls;
pub mod volume;
