//! API replicas (`sandpit serve --api-only`): servers that answer the API and run no
//! sandboxes. Every request that needs a node is relayed to one (`crate::forward`); what
//! they answer themselves reads and writes only the database.
//!
//! A replica is still a [`Server`](crate::Server) over a control-layer node, so the routes
//! are the same code; its backends are the two below, which hold nothing: a network with no
//! slots (admission refuses any sandbox before it would start) and a runtime that lists no
//! sandbox and refuses to start one. Routing keeps requests away from them; they make a
//! routing mistake a clear error instead of a sandbox on the wrong machine.

use std::collections::HashSet;
use std::path::Path;

use async_trait::async_trait;
use sandpit_net::{Dialer, EgressRules, NetConfig, NetError, SandboxNetwork, SlotAddrs};
use sandpit_runtime::{Runtime, RuntimeError, RuntimeStatus, SandboxSpec};

/// What the backends answer to anything that would run a sandbox here.
const NO_SANDBOXES: &str =
    "this server is an API replica (--api-only): it runs no sandboxes; its requests go to nodes";

fn refused() -> RuntimeError {
    RuntimeError::Backend {
        backend: "none",
        what: NO_SANDBOXES.into(),
        source: NO_SANDBOXES.into(),
    }
}

/// The runtime of an API replica: no sandbox runs here, so none is listed, stopped or
/// destroyed (those succeed with nothing done) and none starts.
#[derive(Debug, Default)]
pub struct NoRuntime;

#[async_trait]
impl Runtime for NoRuntime {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn start(&self, _spec: &SandboxSpec) -> Result<(), RuntimeError> {
        Err(refused())
    }
    async fn checkpoint(&self, _id: &str, _image_dir: &Path) -> Result<(), RuntimeError> {
        Err(refused())
    }
    fn has_image(&self, _image_dir: &Path) -> bool {
        false
    }
    async fn restore(&self, _spec: &SandboxSpec, _image_dir: &Path) -> Result<(), RuntimeError> {
        Err(refused())
    }
    async fn stop(&self, _id: &str, _state_dir: &Path) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn destroy(&self, _id: &str, _state_dir: &Path) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn status(&self, _id: &str) -> Result<RuntimeStatus, RuntimeError> {
        Ok(RuntimeStatus::Missing)
    }
    async fn copy_files(&self, _from: &Path, _to: &Path) -> Result<(), RuntimeError> {
        Err(refused())
    }
    async fn export_layer(&self, _state_dir: &Path, _to_dir: &Path) -> Result<(), RuntimeError> {
        Err(refused())
    }
    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    async fn remove_orphans(
        &self,
        _keep: &HashSet<String>,
        _state_dirs_root: &Path,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// The network of an API replica: no slots, nothing on the host.
pub struct NoNetwork {
    config: NetConfig,
    dialer: Dialer,
}

impl NoNetwork {
    pub fn new(config: NetConfig) -> Self {
        let dialer = Dialer::new(config.pool, config.nameservers.clone());
        NoNetwork { config, dialer }
    }
}

#[async_trait]
impl SandboxNetwork for NoNetwork {
    fn config(&self) -> &NetConfig {
        &self.config
    }
    fn dialer(&self) -> &Dialer {
        &self.dialer
    }
    fn capacity(&self) -> u32 {
        0
    }
    fn addrs(&self, slot: u32) -> SlotAddrs {
        panic!("slot {slot}: an API replica has no slots")
    }
    async fn init(&self) -> Result<(), NetError> {
        Ok(())
    }
    async fn attach(&self, slot: u32, _rules: &EgressRules) -> Result<SlotAddrs, NetError> {
        Err(NetError::SlotOutOfRange { slot, capacity: 0 })
    }
    async fn set_egress(&self, slot: u32, _rules: &EgressRules) -> Result<(), NetError> {
        Err(NetError::SlotOutOfRange { slot, capacity: 0 })
    }
    async fn reapply_addr(&self, slot: u32) -> Result<(), NetError> {
        Err(NetError::SlotOutOfRange { slot, capacity: 0 })
    }
    async fn detach(&self, _slot: u32) -> Result<(), NetError> {
        Ok(())
    }
    async fn list_slots(&self) -> Result<Vec<u32>, NetError> {
        Ok(Vec::new())
    }
    async fn teardown(&self) -> Result<(), NetError> {
        Ok(())
    }
    fn adopt(&self, slot: u32, _rules: &EgressRules) -> Result<(), NetError> {
        Err(NetError::SlotOutOfRange { slot, capacity: 0 })
    }
    async fn set_secrets(
        &self,
        slot: u32,
        _binding: Option<std::sync::Arc<sandpit_net::secrets::SecretsBinding>>,
    ) -> Result<(), NetError> {
        Err(NetError::SlotOutOfRange { slot, capacity: 0 })
    }
}
