//! What the tests that drive a real client (the CodeSandbox, E2B and MCP SDKs, from Node or
//! Python) share: a venv with pinned requirements, and running a script that prints one JSON
//! line of what it saw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandpit_test_support::TestServer;
use serde_json::Value;

/// A venv named `name` under the target dir with the requirements file `requirements`
/// installed, made once per requirements content (a stamp holds what it was made from) and
/// under a file lock, so parallel test processes make it once. Fails, with pip's output, if
/// PyPI is out of reach.
pub fn python_venv(name: &str, requirements: &Path) -> PathBuf {
    let reqs = std::fs::read_to_string(requirements)
        .unwrap_or_else(|e| panic!("{}: {e}", requirements.display()));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    // The lock goes with the file at return.
    let lock = std::fs::File::create(dir.with_extension("lock")).expect("venv lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("venv lock");
    let stamp = dir.join("sandpit-requirements.txt");
    let python = dir.join("bin/python");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) && python.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .expect("python3 runs");
    assert!(
        made.status.success(),
        "python3 -m venv failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = std::process::Command::new(dir.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "-q", "-r"])
        .arg(requirements)
        .output()
        .expect("pip runs");
    assert!(
        pip.status.success(),
        "pip could not install {} (is PyPI reachable?)\nstdout:\n{}\nstderr:\n{}",
        requirements.display(),
        String::from_utf8_lossy(&pip.stdout),
        String::from_utf8_lossy(&pip.stderr)
    );
    std::fs::write(&stamp, &reqs).expect("write the venv stamp");
    python
}

/// Run `cmd` (named `what` in failures) for at most `secs` and parse the JSON line it
/// printed last. Its output goes to files, so a hang still shows how far it got; a failure or
/// a hang panics with its output and `srv`'s log.
pub async fn run_json(
    mut cmd: tokio::process::Command,
    what: &str,
    secs: u64,
    srv: &TestServer,
) -> Value {
    let logs = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let status = tokio::time::timeout(Duration::from_secs(secs), child.wait()).await;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = match status {
        Ok(status) => status.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!(
            "{what} did not finish within {secs} s\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
            srv.log()
        ),
    };
    assert!(
        status.success(),
        "{what} failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}",
        srv.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {stdout}"))
}

/// What the node logs when a restored sandbox's agent is not the one that was checkpointed
/// (`boot::wait_restored_agent`): it stayed deaf and the node restarted it, or it crashed
/// after the restore and init restarted it. Either way the sandbox (its memory, its files)
/// is kept and the agent's process table is not.
const AGENT_RESTARTED: [&str; 2] = [
    "restored agent does not answer; restarting it",
    "the restored agent restarted after the restore",
];

/// A process an E2B script started before a pause and did not find after the resume
/// (`seen[kept]` false) is accepted only when the node said its restored agent restarted;
/// otherwise this panics with what the script saw (the listing, the agent's own log).
pub fn check_process_kept(seen: &serde_json::Value, kept: &str, node_log: &str) {
    if seen[kept] == true {
        // A kept process means the agent that answered is the restored one: the node must
        // not have taken it for a restarted one.
        assert!(
            !node_log.contains(AGENT_RESTARTED[1]),
            "the node took the restored agent for a restarted one: {seen}\n{node_log}"
        );
        return;
    }
    assert!(
        AGENT_RESTARTED.iter().any(|m| node_log.contains(m)),
        "the process was lost across the pause without an agent restart: {seen}\n{node_log}"
    );
    eprintln!("the restored agent restarted: its processes were not kept ({seen})");
}
