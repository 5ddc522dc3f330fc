//! `sandpit-agent`: the init process and operation server inside every Sandpit sandbox.
//!
//! Usage: `agent [init|serve] [--listen ADDR]`. Without a mode it runs as `init` when it is
//! PID 1 and as `serve` otherwise. `init` reaps every orphan and keeps a `serve` child alive;
//! `serve` answers the host over TCP (see `sandpit-agent-proto`).
#![expect(
    clippy::disallowed_methods,
    reason = "runs inside the sandbox, behind gVisor: every path it touches is the sandbox's own"
)]

/// Log one line to stderr. Never panics: stderr may be a closed pipe inside the sandbox.
/// Skipped once stderr is a file of [`init::LOG_CAP`] bytes or more.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if crate::init::log_has_room() {
            let _ = writeln!(std::io::stderr(), "sandpit-agent: {}", format_args!($($arg)*));
        }
    }};
}

mod conn;
mod crash;
mod exec;
mod files;
mod init;
mod ports;
mod server;
mod terminal;
mod users;
mod watch;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::ExitCode;

use sandpit_agent_proto::AGENT_PORT;

const USAGE: &str = "usage: sandpit-agent [init|serve] [--listen ADDR]";

fn main() -> ExitCode {
    let mut mode: Option<String> = None;
    let mut listen: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "init" | "serve" if mode.is_none() => {
                mode = Some(arg);
                continue;
            }
            "--version" => {
                println!("sandpit-agent {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--listen" => args.next(),
            s if s.starts_with("--listen=") => Some(s["--listen=".len()..].to_string()),
            _ => None,
        };
        match value.as_deref().map(str::parse) {
            Some(Ok(addr)) => listen = Some(addr),
            _ => {
                log!("bad argument {arg:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let is_init = match mode.as_deref() {
        Some("init") => true,
        Some(_) => false,
        None => rustix::process::getpid() == rustix::process::Pid::INIT,
    };
    if is_init {
        init::run(listen)
    } else {
        crash::install();
        let addr = listen.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, AGENT_PORT).into());
        server::serve(addr)
    }
}
