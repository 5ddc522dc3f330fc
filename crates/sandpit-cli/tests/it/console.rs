//! The web console (`/ui/`) in a real browser: Debian's Chromium, headless, driven by
//! `playwright-core` (pinned by `tests/ui/package-lock.json`, installed by
//! `scripts/install-deps`; no browser download) through `tests/ui/console.mjs`, against a
//! live server with real sandboxes. The script signs in, creates a sandbox, types in its
//! terminal, uploads and downloads a file, opens a preview, builds a template and destroys
//! the sandbox; this test checks what it saw and what the API says afterwards.
//! Screenshots are kept under `target/console-screenshots/`.
//!
//! Traffic stays on loopback (the server, previews through `*.localhost`) and the test's own
//! sandboxes; Chromium runs with its background networking off.

use std::path::{Path, PathBuf};

use sandpit_sdk::types::SandboxStatus;
use sandpit_test_support::TestServer;

use crate::bin;

const CHROMIUM: &str = "/usr/bin/chromium";

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

#[tokio::test]
async fn the_web_console_works_in_chromium() {
    let dir = script_dir();
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in {}: run scripts/install-deps",
        dir.display()
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run scripts/install-deps (Debian's chromium package)"
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .join("console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let srv = TestServer::start(bin()).await.expect("server starts");
    // Random enough to be found only where this run put it.
    let marker = {
        use sha2::Digest;
        let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
        format!("m{}", &hex::encode(sha2::Sha256::digest(seed))[..16])
    };

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("console.mjs")
        .current_dir(&dir)
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .env("SANDPIT_MARKER", &marker)
        .env("SANDPIT_SCREENSHOTS", &shots)
        .env("SANDPIT_CHROMIUM", CHROMIUM);
    let seen = crate::scripts::run_json(cmd, "console.mjs", 300, &srv).await;

    // The page itself: no script or connection refused by its policy, no uncaught error,
    // and the API token never in a URL (WebSocket included).
    assert_eq!(seen["cspViolations"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["tokenInUrl"], serde_json::json!([]), "{seen}");

    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["badTokenKept"], 0, "{seen}");
    assert_eq!(seen["listed"], true, "{seen}");
    assert_eq!(seen["otherAppeared"], true, "{seen}");
    assert_eq!(seen["filterHides"], true, "{seen}");
    assert_eq!(seen["otherDestroyStatus"], 204, "{seen}");
    assert_eq!(seen["otherGone"], true, "{seen}");
    assert_eq!(seen["terminalOutput"], format!("{marker}-1234"), "{seen}");
    let name = format!("{marker}.txt");
    let content = format!("uploaded from the console {marker}\n");
    assert_eq!(seen["uploaded"], name.as_str(), "{seen}");
    assert_eq!(seen["listedSize"], content.len().to_string(), "{seen}");
    assert_eq!(seen["downloaded"], content.as_str(), "{seen}");
    assert_eq!(seen["downloadName"], name.as_str(), "{seen}");
    assert_eq!(seen["execStatus"], 200, "{seen}");
    assert_eq!(seen["portWaitStatus"], 200, "{seen}");
    assert_eq!(
        seen["previewHost"],
        format!("{id}-8080.localhost"),
        "{seen}"
    );
    assert_eq!(seen["previewBody"], format!("preview-{marker}"), "{seen}");
    assert_eq!(seen["previewUrlHasToken"], false, "{seen}");
    assert_eq!(seen["buildLogOutput"], true, "{seen}");
    assert_eq!(seen["buildStatus"], "ready", "{seen}");
    assert_eq!(seen["buildListed"], true, "{seen}");
    assert_eq!(seen["usageRunning"], "1 / 200", "{seen}");
    assert_eq!(seen["chartLines"], 2, "{seen}");
    assert_eq!(seen["destroyed"], true, "{seen}");
    assert_eq!(seen["tokenKept"], 0, "{seen}");

    // What the page did is what the API sees.
    let client = srv.client();
    let sb = client.get_sandbox(&id).await.expect("sandbox row kept");
    assert_eq!(sb.status, SandboxStatus::Destroyed);
    let templates = client.templates().await.expect("templates");
    let built = templates
        .iter()
        .find(|t| t.name == format!("console-{marker}"))
        .expect("the console's template is listed");
    assert_eq!(built.status, "ready", "{built:?}");
    let shots_taken = std::fs::read_dir(&shots)
        .expect("screenshots")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    assert!(
        shots_taken >= 6,
        "{shots_taken} screenshots in {}",
        shots.display()
    );
}
