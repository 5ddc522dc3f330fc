//! [`SandboxNetwork`]: what the server asks of sandbox networking, so it can be handed a real
//! [`Network`] or, in tests, a [`crate::fake::FakeNetwork`].

use std::sync::Arc;

use async_trait::async_trait;

use crate::secrets::SecretsBinding;

use crate::{Dialer, EgressRules, NetConfig, NetError, Network, SlotAddrs};

/// Sandbox networking as the server uses it: one slot per running sandbox, its egress policy,
/// reconciliation. Every method has the contract of the [`Network`] method of the same name.
#[async_trait]
pub trait SandboxNetwork: Send + Sync + 'static {
    /// The prefix, the pool (always denied to sandboxes) and the nameservers.
    fn config(&self) -> &NetConfig;
    /// The one way the host connects on a tenant's behalf.
    fn dialer(&self) -> &Dialer;
    /// Number of slots; slots are `0..capacity`.
    fn capacity(&self) -> u32;
    /// Names and addresses of `slot` (a pure function of the slot). Panics outside the pool.
    fn addrs(&self, slot: u32) -> SlotAddrs;
    /// Prepare the host (tables, forwarding, the domain filter). Idempotent.
    async fn init(&self) -> Result<(), NetError>;
    /// Make the slot's namespace and link with `rules`; undone on failure.
    /// [`NetError::SlotBusy`] if anything of it exists already.
    async fn attach(&self, slot: u32, rules: &EgressRules) -> Result<SlotAddrs, NetError>;
    /// Replace the slot's egress rules at once; [`NetError::NotAttached`] if it is not.
    async fn set_egress(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError>;
    /// Put the sandbox address back on the slot's interface (before a restore).
    async fn reapply_addr(&self, slot: u32) -> Result<(), NetError>;
    /// Remove whatever exists of the slot. Idempotent.
    async fn detach(&self, slot: u32) -> Result<(), NetError>;
    /// Slots with anything left of them, for reconciliation.
    async fn list_slots(&self) -> Result<Vec<u32>, NetError>;
    /// Detach every slot and remove the instance's host objects (uninstall).
    async fn teardown(&self) -> Result<(), NetError>;
    /// Take over a slot an earlier process attached: learn its rules, change nothing.
    fn adopt(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError>;
    /// Give the slot's sandbox its secrets, or take them away (`None`); see
    /// [`Network::set_secrets`]. Idempotent.
    async fn set_secrets(
        &self,
        slot: u32,
        binding: Option<Arc<SecretsBinding>>,
    ) -> Result<(), NetError>;
}

#[async_trait]
impl SandboxNetwork for Network {
    fn config(&self) -> &NetConfig {
        Network::config(self)
    }
    fn dialer(&self) -> &Dialer {
        Network::dialer(self)
    }
    fn capacity(&self) -> u32 {
        Network::capacity(self)
    }
    fn addrs(&self, slot: u32) -> SlotAddrs {
        Network::addrs(self, slot)
    }
    async fn init(&self) -> Result<(), NetError> {
        Network::init(self).await
    }
    async fn attach(&self, slot: u32, rules: &EgressRules) -> Result<SlotAddrs, NetError> {
        Network::attach(self, slot, rules).await
    }
    async fn set_egress(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        Network::set_egress(self, slot, rules).await
    }
    async fn reapply_addr(&self, slot: u32) -> Result<(), NetError> {
        Network::reapply_addr(self, slot).await
    }
    async fn detach(&self, slot: u32) -> Result<(), NetError> {
        Network::detach(self, slot).await
    }
    async fn list_slots(&self) -> Result<Vec<u32>, NetError> {
        Network::list_slots(self).await
    }
    async fn teardown(&self) -> Result<(), NetError> {
        Network::teardown(self).await
    }
    fn adopt(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        Network::adopt(self, slot, rules)
    }
    async fn set_secrets(
        &self,
        slot: u32,
        binding: Option<Arc<SecretsBinding>>,
    ) -> Result<(), NetError> {
        Network::set_secrets(self, slot, binding).await
    }
}
