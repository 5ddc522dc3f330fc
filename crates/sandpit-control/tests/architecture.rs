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
    closure_stopping_at(graph, root, &[])
}

/// The packages `root` reaches, not walking into the packages of `stop` (they are in the set,
/// what they reach is not, unless reached another way).
fn closure_stopping_at(
    graph: &BTreeMap<String, Vec<String>>,
    root: &str,
    stop: &[&str],
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone()) && !stop.contains(&p.as_str()) {
            stack.extend(graph.get(&p).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_control_layer_knows_no_http() {
    let graph = lock_graph();
    // sandpit-net's secrets proxy speaks HTTP (hyper) to a sandbox and to the host it calls:
    // the data plane's own protocol, held inside that crate. What the control layer reaches
    // otherwise holds no HTTP, and sandpit-net no HTTP server framework.
    let net = closure(&graph, "sandpit-net");
    for framework in [
        "axum",
        "axum-core",
        "tower-http",
        "utoipa-axum",
        "sandpit-server",
    ] {
        assert!(
            !net.contains(framework),
            "sandpit-net depends on {framework}"
        );
    }
    let deps = closure_stopping_at(&graph, "sandpit-control", &["sandpit-net"]);
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

/// The control layer's modules, by path (`node::boot`), each with the text of its file
/// without comments. Test modules are left out.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &std::path::Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("src dir") {
            let path = entry.expect("entry").path();
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            if stem == "tests" {
                continue;
            }
            let name = |s: &str| {
                if prefix.is_empty() {
                    s.to_string()
                } else {
                    format!("{prefix}::{s}")
                }
            };
            if path.is_dir() {
                walk(&path, &name(&stem), out);
            } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" {
                let module = if stem == "mod" {
                    prefix.to_string()
                } else {
                    name(&stem)
                };
                let text = std::fs::read_to_string(&path)
                    .expect("source")
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.insert(module, text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut out,
    );
    out
}

/// The modules `text` (the file of `module`) names: `crate::a::b`, `super::x`, and the
/// crate root's re-exports, resolved to the longest module path that exists.
fn references(module: &str, text: &str, all: &BTreeMap<String, String>) -> BTreeSet<String> {
    let root_items = [
        ("Status", "domain"),
        ("Stored", "domain"),
        ("Transition", "domain"),
        ("ControlError", "error"),
        ("DisplayChain", "error"),
        ("decode", "error"),
        ("Node", "node"),
        ("NodeConfig", "node"),
        ("Store", "store"),
        ("Db", "store"),
        ("Backend", "store"),
    ];
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let mut out = BTreeSet::new();
    for (anchor, base) in [("crate::", ""), ("super::", parent)] {
        for (i, _) in text.match_indices(anchor) {
            let rest: String = text[i + anchor.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut path = base.to_string();
            let mut found = None;
            for part in rest.split("::").filter(|p| !p.is_empty()) {
                let next = if path.is_empty() {
                    part.to_string()
                } else {
                    format!("{path}::{part}")
                };
                if all.contains_key(&next) {
                    found = Some(next.clone());
                    path = next;
                } else {
                    if found.is_none() && base.is_empty() {
                        found = root_items
                            .iter()
                            .find(|(item, _)| *item == part)
                            .map(|(_, m)| m.to_string());
                    }
                    break;
                }
            }
            out.extend(found.or_else(|| (!base.is_empty()).then(|| base.to_string())));
        }
        // `use crate::{a, b::c}` and `use super::{x, y}` name several at once.
        for (i, _) in text.match_indices(&format!("{anchor}{{")) {
            let list = &text[i + anchor.len() + 1..];
            let list = &list[..list.find('}').unwrap_or(0)];
            for item in list.split(',') {
                let head = item.trim().split("::").next().unwrap_or("").trim();
                let next = if base.is_empty() {
                    head.to_string()
                } else {
                    format!("{base}::{head}")
                };
                if all.contains_key(&next) {
                    out.insert(next);
                } else if let Some((_, m)) = root_items.iter().find(|(it, _)| *it == head) {
                    out.insert(m.to_string());
                }
            }
        }
    }
    out.remove(module);
    out
}

/// No import circle among the control layer's modules. A module and its own submodules
/// are one room (a parent aggregates its children, children use their parent's types);
/// between any other two modules, dependencies go one way.
#[test]
fn the_control_layer_has_no_import_circle() {
    let all = modules();
    assert!(all.contains_key("node::lifecycle") && all.contains_key("store::sandboxes"));
    let related =
        |a: &str, b: &str| a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    let graph: BTreeMap<String, BTreeSet<String>> = all
        .iter()
        .map(|(m, text)| {
            let refs = references(m, text, &all)
                .into_iter()
                .filter(|r| !related(m, r))
                .collect();
            (m.clone(), refs)
        })
        .collect();
    assert!(
        graph["node::lifecycle"].contains("node::boot"),
        "the walk sees lifecycle's use of boot: {:?}",
        graph["node::lifecycle"]
    );
    // Depth-first search for a back edge; report the circle it closes.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = stack.iter().position(|s| s == m) {
            panic!("import circle: {} -> {m}", stack[at..].join(" -> "));
        }
        stack.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, stack, done);
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}
