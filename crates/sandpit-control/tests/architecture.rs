//! Invariants of the crate graph, checked from `Cargo.lock` (what is really linked):
//! "sandpit-control knows no HTTP" and "nothing above the `Runtime` trait names a backend".
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "reads the workspace's Cargo.lock by path"
)]

use std::collections::{BTreeMap, BTreeSet};

/// Package name → names of its dependencies, from the lock file.
fn lock_graph() -> BTreeMap<String, Vec<String>> {
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = std::fs::read_to_string(&lock).expect("Cargo.lock");
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = "))
            .expect("a package has a name")
            .trim_matches('"')
            .to_string();
        let mut deps = Vec::new();
        if let Some(start) = block.find("dependencies = [") {
            let list = &block[start + "dependencies = [".len()..];
            let list = &list[..list.find(']').expect("the list ends")];
            for item in list.split(',') {
                let item = item.trim().trim_matches('"');
                if let Some(dep) = item.split_whitespace().next() {
                    deps.push(dep.to_string());
                }
            }
        }
        graph.entry(name).or_default().extend(deps);
    }
    graph
}

fn closure(graph: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone()) {
            stack.extend(graph.get(&p).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_control_layer_knows_no_http() {
    let graph = lock_graph();
    let deps = closure(&graph, "sandpit-control");
    assert!(
        deps.contains("sqlx"),
        "the walk found the store's own dependency"
    );
    for http in [
        "axum",
        "axum-core",
        "hyper",
        "hyper-util",
        "tower",
        "tower-http",
        "http",
        "utoipa-axum",
    ] {
        assert!(!deps.contains(http), "sandpit-control depends on {http}");
    }
    assert!(!deps.contains("sandpit-server"));
}

#[test]
fn nothing_above_the_runtime_trait_names_a_backend() {
    let graph = lock_graph();
    for above in ["sandpit-control", "sandpit-server"] {
        let deps = closure(&graph, above);
        assert!(
            deps.contains("sandpit-api-types"),
            "{above}: the walk works"
        );
        assert!(
            !deps.contains("sandpit-runtime-gvisor"),
            "{above} depends on the gVisor backend; only the CLI may build it"
        );
    }
}
