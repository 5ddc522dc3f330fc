//! `FakeNetwork`: an in-memory [`SandboxNetwork`] that records every call, for tests of the
//! layers above (feature `fake`). It touches nothing on the host and needs no root.
//!
//! Slots live in a map. Their addresses are loopback ones, so a test's in-process stand-in
//! for a sandbox can listen on the address the server will connect to: each instance takes a
//! random `127.a.b.0/24` block (a = 1–254), one /30 per slot as the real pool does (host
//! `.1`, sandbox `.2`), so tests in parallel processes do not meet on one address. The pool
//! its [`NetConfig`] declares (`10.254.0.0/…`, always denied to sandboxes) is nominal.
//!
//! Failures are scripted with [`FakeNetwork::fail_next`].

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{Dialer, EgressRules, Ipv4Net, NetConfig, NetError, SandboxNetwork, SlotAddrs};

/// The operations failures can be scripted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetOp {
    Init,
    Attach,
    SetEgress,
    ReapplyAddr,
    Detach,
    ListSlots,
    Teardown,
    Adopt,
    SetSecrets,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    Init,
    Attach {
        slot: u32,
        rules: EgressRules,
    },
    SetEgress {
        slot: u32,
        rules: EgressRules,
    },
    ReapplyAddr {
        slot: u32,
    },
    Detach {
        slot: u32,
    },
    ListSlots,
    Teardown,
    Adopt {
        slot: u32,
        rules: EgressRules,
    },
    /// Secrets given (`true`) or taken away.
    SetSecrets {
        slot: u32,
        held: bool,
    },
}

impl NetCall {
    /// The slot the call is about, if it names one.
    pub fn slot(&self) -> Option<u32> {
        match self {
            NetCall::Attach { slot, .. }
            | NetCall::SetEgress { slot, .. }
            | NetCall::ReapplyAddr { slot }
            | NetCall::Detach { slot }
            | NetCall::Adopt { slot, .. }
            | NetCall::SetSecrets { slot, .. } => Some(*slot),
            _ => None,
        }
    }

    /// `init`, `attach`, `set_egress`, `reapply_addr`, `detach`, `list_slots`, `teardown`,
    /// `adopt`, `set_secrets`.
    pub fn op(&self) -> &'static str {
        match self {
            NetCall::Init => "init",
            NetCall::Attach { .. } => "attach",
            NetCall::SetEgress { .. } => "set_egress",
            NetCall::ReapplyAddr { .. } => "reapply_addr",
            NetCall::Detach { .. } => "detach",
            NetCall::ListSlots => "list_slots",
            NetCall::Teardown => "teardown",
            NetCall::Adopt { .. } => "adopt",
            NetCall::SetSecrets { .. } => "set_secrets",
        }
    }
}

#[derive(Default)]
struct State {
    /// Attached slots and the rules they carry.
    attached: BTreeMap<u32, EgressRules>,
    calls: Vec<NetCall>,
    /// Scripted failures: the operation and, if given, the one slot it applies to.
    failures: Vec<(NetOp, Option<u32>)>,
}

impl State {
    fn take_failure(&mut self, op: NetOp, slot: Option<u32>) -> bool {
        let pos = self
            .failures
            .iter()
            .position(|(o, s)| *o == op && (s.is_none() || *s == slot));
        pos.map(|p| self.failures.remove(p)).is_some()
    }
}

/// The recording fake network.
pub struct FakeNetwork {
    cfg: NetConfig,
    dialer: Dialer,
    capacity: u32,
    /// First address of this instance's loopback block.
    base: u32,
    /// Guards the slots and the record; never held across an `.await`.
    state: Mutex<State>,
}

fn scripted(op: &str) -> NetError {
    NetError::Command {
        command: format!("fake {op}"),
        status: "scripted".into(),
        stderr: "scripted failure".into(),
    }
}

impl Default for FakeNetwork {
    fn default() -> Self {
        Self::new(16)
    }
}

impl FakeNetwork {
    /// A network of `capacity` slots (a power of two, 1 to 64).
    ///
    /// # Panics
    /// On any other capacity.
    pub fn new(capacity: u32) -> Self {
        assert!(
            capacity.is_power_of_two() && capacity <= 64,
            "capacity must be a power of two up to 64"
        );
        let pool = Ipv4Net {
            addr: Ipv4Addr::new(10, 254, 0, 0),
            prefix_len: 30 - capacity.trailing_zeros() as u8,
        };
        // Random without a dependency: std's per-process random hash keys.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let a = 1 + (r % 254) as u8;
        let b = (r >> 8) as u8;
        FakeNetwork {
            cfg: NetConfig {
                prefix: "fake".into(),
                pool,
                nameservers: Vec::new(),
            },
            dialer: Dialer::new(pool, Vec::new()),
            capacity,
            base: u32::from(Ipv4Addr::new(127, a, b, 0)),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake network state poisoned")
    }

    /// Make the next `op` fail: on `slot` only, or (`None`) on whichever comes first.
    pub fn fail_next(&self, op: NetOp, slot: Option<u32>) {
        self.lock().failures.push((op, slot));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NetCall> {
        self.lock().calls.clone()
    }

    /// The operations called on `slot`, in order.
    pub fn ops_of(&self, slot: u32) -> Vec<&'static str> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.slot() == Some(slot))
            .map(NetCall::op)
            .collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Attached slots, ascending.
    pub fn attached(&self) -> Vec<u32> {
        self.lock().attached.keys().copied().collect()
    }

    /// The rules `slot` carries, if attached.
    pub fn rules_of(&self, slot: u32) -> Option<EgressRules> {
        self.lock().attached.get(&slot).cloned()
    }

    fn check_slot(&self, slot: u32) -> Result<(), NetError> {
        if slot >= self.capacity {
            return Err(NetError::SlotOutOfRange {
                slot,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Record `call`, then fail if a failure of `op` (on `slot`) is armed.
    fn enter(&self, call: NetCall, op: NetOp) -> Result<(), NetError> {
        let name = call.op();
        let slot = call.slot();
        let mut st = self.lock();
        st.calls.push(call);
        if st.take_failure(op, slot) {
            return Err(scripted(name));
        }
        Ok(())
    }
}

#[async_trait]
impl SandboxNetwork for FakeNetwork {
    fn config(&self) -> &NetConfig {
        &self.cfg
    }

    fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn addrs(&self, slot: u32) -> SlotAddrs {
        assert!(
            slot < self.capacity,
            "slot {slot} outside the pool (capacity {})",
            self.capacity
        );
        let base = self.base + 4 * slot;
        let netns_name = format!("fake-{slot}");
        SlotAddrs {
            netns_path: PathBuf::from("/nonexistent/sandpit-fake-netns").join(&netns_name),
            netns_name,
            host_if: format!("fakeh{slot}"),
            sandbox_if: format!("fakes{slot}"),
            host_ip: Ipv4Addr::from(base + 1),
            sandbox_ip: Ipv4Addr::from(base + 2),
            prefix_len: 30,
        }
    }

    async fn init(&self) -> Result<(), NetError> {
        self.enter(NetCall::Init, NetOp::Init)
    }

    async fn attach(&self, slot: u32, rules: &EgressRules) -> Result<SlotAddrs, NetError> {
        self.enter(
            NetCall::Attach {
                slot,
                rules: rules.clone(),
            },
            NetOp::Attach,
        )?;
        self.check_slot(slot)?;
        rules.validate()?;
        let mut st = self.lock();
        if st.attached.contains_key(&slot) {
            return Err(NetError::SlotBusy {
                slot,
                what: "the fake slot".into(),
            });
        }
        st.attached.insert(slot, rules.clone());
        drop(st);
        Ok(self.addrs(slot))
    }

    async fn set_egress(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        self.enter(
            NetCall::SetEgress {
                slot,
                rules: rules.clone(),
            },
            NetOp::SetEgress,
        )?;
        self.check_slot(slot)?;
        rules.validate()?;
        match self.lock().attached.get_mut(&slot) {
            Some(r) => {
                *r = rules.clone();
                Ok(())
            }
            None => Err(NetError::NotAttached {
                slot,
                chain: format!("slot_{slot}"),
            }),
        }
    }

    async fn reapply_addr(&self, slot: u32) -> Result<(), NetError> {
        self.enter(NetCall::ReapplyAddr { slot }, NetOp::ReapplyAddr)?;
        self.check_slot(slot)
    }

    async fn detach(&self, slot: u32) -> Result<(), NetError> {
        self.enter(NetCall::Detach { slot }, NetOp::Detach)?;
        self.check_slot(slot)?;
        self.lock().attached.remove(&slot);
        Ok(())
    }

    async fn list_slots(&self) -> Result<Vec<u32>, NetError> {
        self.enter(NetCall::ListSlots, NetOp::ListSlots)?;
        Ok(self.attached())
    }

    async fn teardown(&self) -> Result<(), NetError> {
        self.enter(NetCall::Teardown, NetOp::Teardown)?;
        self.lock().attached.clear();
        Ok(())
    }

    fn adopt(&self, slot: u32, rules: &EgressRules) -> Result<(), NetError> {
        self.enter(
            NetCall::Adopt {
                slot,
                rules: rules.clone(),
            },
            NetOp::Adopt,
        )?;
        self.check_slot(slot)?;
        // An adopted slot exists on the host already; the fake knows it only if attached.
        match self.lock().attached.get_mut(&slot) {
            Some(r) => {
                *r = rules.clone();
                Ok(())
            }
            None => Err(NetError::NotAttached {
                slot,
                chain: format!("slot_{slot}"),
            }),
        }
    }

    async fn set_secrets(
        &self,
        slot: u32,
        binding: Option<std::sync::Arc<crate::secrets::SecretsBinding>>,
    ) -> Result<(), NetError> {
        self.enter(
            NetCall::SetSecrets {
                slot,
                held: binding.is_some(),
            },
            NetOp::SetSecrets,
        )?;
        self.check_slot(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: &FakeNetwork) -> (u8, u8) {
        let o = n.addrs(0).sandbox_ip.octets();
        (o[1], o[2])
    }

    #[tokio::test]
    async fn slots_and_failures() {
        let n = FakeNetwork::new(4);
        let deny = EgressRules::default();
        let a = n.attach(1, &deny).await.unwrap();
        assert!(a.sandbox_ip.is_loopback() && a.host_ip.is_loopback());
        assert_eq!(
            u32::from(a.sandbox_ip) - u32::from(n.addrs(0).sandbox_ip),
            4
        );
        assert!(matches!(
            n.attach(1, &deny).await,
            Err(NetError::SlotBusy { .. })
        ));
        assert!(matches!(
            n.attach(4, &deny).await,
            Err(NetError::SlotOutOfRange { .. })
        ));
        assert!(matches!(
            n.set_egress(2, &deny).await,
            Err(NetError::NotAttached { .. })
        ));
        n.fail_next(NetOp::Detach, Some(1));
        assert!(n.detach(1).await.is_err());
        assert_eq!(n.list_slots().await.unwrap(), [1]);
        n.detach(1).await.unwrap();
        n.detach(1).await.unwrap();
        assert!(n.attached().is_empty());
        assert_eq!(
            n.ops_of(1),
            ["attach", "attach", "detach", "detach", "detach"]
        );
    }

    #[test]
    fn instances_take_different_blocks() {
        let blocks: std::collections::HashSet<_> =
            (0..20).map(|_| block(&FakeNetwork::default())).collect();
        assert!(blocks.len() > 1, "random loopback blocks");
        assert!(blocks.iter().all(|(a, _)| *a != 0 && *a != 255));
    }
}
