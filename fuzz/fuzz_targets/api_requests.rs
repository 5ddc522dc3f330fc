//! The HTTP API's request parsers: JSON bodies of create, exec, fork and egress, and the
//! duration syntax. Arbitrary input never panics; an accepted duration formats and parses
//! back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpit_api_types as api;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<api::CreateSandboxRequest>(data);
    let _ = serde_json::from_slice::<api::ExecRequest>(data);
    let _ = serde_json::from_slice::<api::ForkRequest>(data);
    if let Ok(p) = serde_json::from_slice::<api::EgressPolicy>(data) {
        let _ = p.validate();
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(d) = api::parse_duration(text)
    {
        let again = api::parse_duration(&api::format_duration(d)).expect("formatted durations parse");
        assert_eq!(again, d, "{text:?}");
    }
});
