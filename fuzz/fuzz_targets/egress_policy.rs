//! The egress policy evaluator: whatever the API's validation accepts, the network layer's
//! validation accepts too (so a stored policy can always be applied), and the always-denied
//! ranges cannot be allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpit_api_types as api;
use sandpit_net::{EgressRules, Ipv4Net};

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = serde_json::from_slice::<api::EgressPolicy>(data) else {
        return;
    };
    let Ok(valid) = policy.validate() else {
        return;
    };
    let nets = |list: &[api::Cidr]| -> Vec<Ipv4Net> {
        list.iter()
            .map(|c| Ipv4Net {
                addr: c.addr,
                prefix_len: c.prefix_len,
            })
            .collect()
    };
    let rules = EgressRules {
        allow_all: valid.allow_all,
        allow_cidrs: nets(&valid.allow_cidrs),
        deny_cidrs: nets(&valid.deny_cidrs),
        allow_ports: valid.allow_ports.clone(),
        allow_domains: valid.allow_domains.clone(),
    };
    if let Err(e) = rules.validate() {
        panic!("the API accepted {policy:?} but the network layer refuses it: {e}");
    }
    for c in valid.allow_cidrs.iter().chain(&valid.deny_cidrs) {
        assert!(
            Ipv4Net::new(c.addr, c.prefix_len).is_ok(),
            "the API accepted the CIDR {c:?}"
        );
    }
});
