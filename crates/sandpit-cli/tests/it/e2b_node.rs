//! E2B compatibility end to end from JavaScript: the unmodified `e2b` npm package (pinned by
//! `tests/e2b/node/package-lock.json`, installed by `scripts/install-deps` into
//! `tests/e2b/node/node_modules`) drives a live server through `tests/e2b/node/test_e2b.mjs`,
//! configured the plain-HTTP way (`E2B_API_URL` and `E2B_SANDBOX_URL` both the server's URL).
//! The script covers PTYs, `commands.connect` and a process that survives a pause too.
//!
//! Traffic stays on loopback (the server) and the test's own sandbox.

use std::path::PathBuf;

use sandpit_sdk::types::SandboxStatus;
use sandpit_test_support::TestServer;
use serde_json::json;

use crate::bin;

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2b/node")
}

#[tokio::test]
async fn the_e2b_npm_sdk_works_unmodified() {
    let dir = script_dir();
    assert!(
        dir.join("node_modules/e2b/package.json").exists(),
        "the e2b npm package is not installed in {}: run scripts/install-deps",
        dir.display()
    );
    let srv = TestServer::start(bin()).await.expect("server starts");
    // The script's output goes to files, so a hang still shows how far it got.
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("test_e2b.mjs")
        .current_dir(&dir)
        .env("E2B_API_KEY", &srv.token)
        .env("E2B_API_URL", &srv.url)
        .env("E2B_SANDBOX_URL", &srv.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG");
    let seen = crate::scripts::run_json(cmd, "test_e2b.mjs", 240, &srv).await;
    let id = seen["id"].as_str().expect("sandbox id").to_string();
    assert_eq!(seen["running"], true, "{seen}");
    assert_eq!(seen["exit"], 3, "{seen}");
    assert_eq!(seen["exitStdout"], "hi\n", "{seen}");
    assert_eq!(seen["run"], "hello", "{seen}");
    assert_eq!(seen["stderr"], "oops", "{seen}");
    assert_eq!(seen["env"], "e2b", "{seen}");
    assert_eq!(seen["cwd"], "/tmp", "{seen}");
    assert_eq!(seen["ticks"], 3, "{seen}");
    assert_eq!(seen["listed"], true, "{seen}");
    assert_eq!(seen["killed"], true, "{seen}");
    assert_eq!(seen["killedExit"], 137, "{seen}");
    assert_eq!(seen["listedAfterKill"], false, "{seen}");
    assert_eq!(seen["writePath"], "/tmp/e2b/hello.txt", "{seen}");
    assert_eq!(seen["read"], "hello from e2b", "{seen}");
    assert_eq!(seen["madeDir"], true, "{seen}");
    assert_eq!(seen["madeDirAgain"], false, "{seen}");
    assert_eq!(
        seen["list"],
        json!([["hello.txt", "file"], ["sub", "dir"]]),
        "{seen}"
    );
    assert_eq!(seen["exists"], true, "{seen}");
    assert_eq!(seen["renamed"], "hello from e2b", "{seen}");
    assert_eq!(seen["afterRemove"], json!(["renamed.txt"]), "{seen}");
    assert_eq!(seen["missing"], "not_found", "{seen}");
    // What the WatchDir stream reported, names relative to the watched directory.
    let watched: Vec<(String, String)> =
        serde_json::from_value(seen["watched"].clone()).expect("watched pairs");
    for (name, kind) in [
        ("hello.txt", "create"),
        ("hello.txt", "write"),
        ("sub", "create"),
        ("sub/deep.txt", "create"),
        ("sub/deep.txt", "write"),
        ("hello.txt", "remove"),
        ("renamed.txt", "create"),
        ("sub", "remove"),
    ] {
        assert!(
            watched.iter().any(|(n, k)| n == name && k == kind),
            "{name} {kind} not watched: {seen}"
        );
    }
    assert_eq!(seen["watchMissing"], "not_found", "{seen}");
    assert_eq!(seen["listedIds"], json!([id]), "{seen}");
    assert_eq!(seen["listedState"], json!(["running"]), "{seen}");
    assert_eq!(seen["metadata"], json!({"suite": "e2b-node"}), "{seen}");
    assert_eq!(seen["infoId"], id.as_str(), "{seen}");
    assert_eq!(seen["timeoutExtended"], true, "{seen}");
    assert_eq!(seen["hostShape"], true, "{seen}");
    assert_eq!(seen["hostBody"], "200 served from the sandbox", "{seen}");
    assert_eq!(seen["paused"], true, "{seen}");
    assert_eq!(seen["pausedState"], json!(["paused"]), "{seen}");
    assert_eq!(seen["resumedRead"], "kept", "{seen}");
    assert_eq!(seen["resumedRun"], "kept", "{seen}");
    assert_eq!(seen["pty"], true, "{seen}");
    assert_eq!(seen["ptySize"], true, "{seen}");
    assert_eq!(seen["ptyKilled"], true, "{seen}");
    crate::scripts::check_process_kept(&seen, "survivorListed", &srv.log());
    if seen["survivorListed"] == true {
        assert!(seen["survivorBeats"].as_u64().unwrap_or(0) >= 2, "{seen}");
    }

    assert!(seen["killSeconds"].as_u64().unwrap_or(99) < 10, "{seen}");
    assert_eq!(seen["afterKill"], "NotFoundError", "{seen}");
    assert_eq!(seen["badKey"], "AuthenticationError", "{seen}");
    // What the SDK did is what the native API sees.
    let s = srv
        .client()
        .get_sandbox(&id)
        .await
        .expect("sandbox row kept");
    assert_eq!(s.status, SandboxStatus::Destroyed);
}
