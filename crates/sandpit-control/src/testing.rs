//! Helpers for tests over the recording fakes (feature `fake`): a runtime whose sandboxes
//! answer as agents, and a data dir a node opens without root.
#![allow(
    clippy::disallowed_methods,
    reason = "test fixtures written by path into a temporary dir"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sandpit_agent_proto::AGENT_PORT;
use sandpit_agent_proto::fake::FakeAgent;
use sandpit_runtime::fake::{FakeRuntime, InitGuard};

/// A runtime whose sandboxes run a [`FakeAgent`] on the address the network gave them, with
/// their `state_dir/upper` as their files.
pub fn runtime_with_agents() -> FakeRuntime {
    FakeRuntime::with_init(|spec| {
        let addr = spec
            .network
            .as_ref()
            .map(|n| SocketAddr::from((n.address, AGENT_PORT)));
        let root = spec.state_dir.join("upper");
        Box::pin(async move {
            let addr = addr.ok_or("the fake agent needs a network")?;
            let agent = FakeAgent::spawn(addr, root)
                .await
                .map_err(|e| format!("fake agent on {addr}: {e}"))?;
            Ok(Box::new(agent) as InitGuard)
        })
    })
}

/// What a node needs on disk without root: an agent binary it accepts (a static ELF header
/// is enough: it is never run) and a built `base` template (so busybox is not needed).
pub fn prepare_data_dir(dir: &Path) -> PathBuf {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    let agent = dir.join("fake-agent-bin");
    std::fs::write(&agent, elf).unwrap();
    let busybox = dir.join("data/templates/base/rootfs/bin");
    std::fs::create_dir_all(&busybox).unwrap();
    std::fs::write(busybox.join("busybox"), "").unwrap();
    agent
}
