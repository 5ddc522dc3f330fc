//! Embeds the web console (`ui/` at the repository root) into the server: writes
//! `$OUT_DIR/ui_assets.rs`, a table of the console's own files (`ui/src`) and the few
//! third-party files it needs from `ui/node_modules` (xterm.js and its fit addon, installed
//! from `ui/package-lock.json` by `scripts/install-deps`), each as `include_bytes!`. When
//! those are missing the build still succeeds, with a warning, and `/ui/` says what to run.
#![allow(
    clippy::disallowed_methods,
    reason = "a build script reading the repository's own ui/ directory"
)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The third-party files the console loads, as (name under `/ui/vendor/`, path under
/// `ui/node_modules/`).
const VENDOR: &[(&str, &str)] = &[
    ("xterm.mjs", "@xterm/xterm/lib/xterm.mjs"),
    ("xterm.css", "@xterm/xterm/css/xterm.css"),
    ("addon-fit.mjs", "@xterm/addon-fit/lib/addon-fit.mjs"),
];

/// The console's own files are served only with these extensions.
const OWN_EXTENSIONS: &[&str] = &["html", "js", "css", "svg"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ui = manifest.join("../../ui");
    let ui = ui.canonicalize().unwrap_or(ui);
    // The whole directory (cargo looks at every file's mtime in it): the console's sources,
    // and node_modules appearing after `scripts/install-deps`.
    println!("cargo:rerun-if-changed={}", ui.display());

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let src = ui.join("src");
    if let Ok(dir) = std::fs::read_dir(&src) {
        for entry in dir.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ext = Path::new(&name)
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("");
            if path.is_file() && OWN_EXTENSIONS.contains(&ext) {
                files.push((name, path));
            }
        }
    }
    let modules = ui.join("node_modules");
    let missing: Vec<&str> = VENDOR
        .iter()
        .filter(|(_, rel)| !modules.join(rel).is_file())
        .map(|(_, rel)| *rel)
        .collect();
    let installed = missing.is_empty() && !files.is_empty();
    if installed {
        for (name, rel) in VENDOR {
            files.push((format!("vendor/{name}"), modules.join(rel)));
        }
    } else {
        println!(
            "cargo:warning=the web console's assets are not installed (missing in {}: {}); \
             /ui/ will say so. Run scripts/install-deps (npm ci in ui/) and build again",
            modules.display(),
            missing.join(", ")
        );
    }
    files.sort();

    let mut out =
        String::from("/// Whether the console's third-party files were found at build time.\n");
    writeln!(out, "pub(crate) const INSTALLED: bool = {installed};").unwrap();
    out.push_str("/// (path under `/ui/`, contents), sorted by path.\n");
    out.push_str("pub(crate) static FILES: &[(&str, &[u8])] = &[\n");
    if installed {
        for (name, path) in &files {
            let path = path.canonicalize().expect("a file just listed");
            writeln!(out, "    ({name:?}, include_bytes!({:?})),", path.display()).unwrap();
        }
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("ui_assets.rs");
    std::fs::write(&dest, out).expect("write ui_assets.rs");
}
