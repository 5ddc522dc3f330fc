//! The surfaces are not knotted together: the CodeSandbox surface (`compat/`) builds on the
//! shared modules (extractors, errors, lifecycle, stores) and never on the `/v1` routes; no
//! shared module reaches into `compat/`; only the app's assembly (`routes/mod.rs`, which
//! merges the surfaces' routers) names both.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (doc comments may name any module).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("source")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn compat_and_the_shared_modules_do_not_import_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found the sources");
    let mut seen_compat = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let rel = rel.to_string_lossy();
        let text = code(file);
        if rel.starts_with("compat/") {
            seen_compat += 1;
            for banned in ["crate::routes", "super::super::routes"] {
                assert!(!text.contains(banned), "{rel} names {banned}");
            }
        } else if rel != "routes/mod.rs" && rel != "lib.rs" && !rel.starts_with("tests/") {
            assert!(
                !text.contains("crate::compat"),
                "{rel} reaches into compat/; move what it needs to a shared module"
            );
        }
    }
    assert!(seen_compat >= 5, "found compat/");
}

/// The service modules act for a tenant through an `Authorized` (made only by the
/// extractors) or a workspace id, never through the HTTP layer's `Auth` extractor.
#[test]
fn services_take_no_http_extractor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for service in ["lifecycle.rs", "fork.rs", "builds.rs"] {
        let text = code(&src.join(service));
        let names_auth = text
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .any(|word| word == "Auth");
        assert!(!names_auth, "{service} names the Auth extractor");
    }
}

/// The edge holds no orchestration: no module of the server drives a backend's transitions
/// itself (the template builder's steps run through `node::templates::run_build_step`); the
/// control layer's node does.
#[test]
fn the_edge_drives_no_backend_transition() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let rel = rel.to_string_lossy();
        if rel.starts_with("tests/") {
            continue;
        }
        checked += 1;
        let flat: String = code(file).chars().filter(|c| !c.is_whitespace()).collect();
        for call in [
            ".runtime.start(",
            ".runtime.restore(",
            ".runtime.checkpoint(",
            ".runtime.stop(",
            ".runtime.destroy(",
            ".runtime.copy_files(",
            ".runtime.export_layer(",
            ".net.attach(",
            ".net.detach(",
            ".net.set_egress(",
        ] {
            assert!(
                !flat.contains(call),
                "{rel} calls {call}: orchestration belongs in sandpit_control::node"
            );
        }
    }
    assert!(checked > 20, "found the sources");
}

/// MCP tools are REST requests: `mcp.rs` reaches sandboxes only by running `/v1` requests
/// through the app (`routes::app`), so its authorization, scopes, limits and errors cannot
/// drift from the REST API's.
#[test]
fn mcp_acts_only_through_the_rest_routes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let text = code(&src.join("mcp.rs"));
    assert!(text.contains("crate::routes::app("), "mcp.rs runs the app");
    for banned in [
        "crate::lifecycle",
        "crate::extract",
        "crate::fork",
        "Authorized",
        "running_agent",
        "AgentClient",
        ".store.",
        ".node.",
    ] {
        assert!(!text.contains(banned), "mcp.rs names {banned}");
    }
}
