//! The agent gateway's shells, kept inside the sandbox so they outlive the WebSocket, a
//! server restart and a hibernation (memory and files are checkpointed together).
//!
//! A shell is a directory `SHELLS_DIR/<shell id>/`: `meta` (JSON: name, type, command),
//! `in` (a FIFO the process reads as stdin, held open read-write by the wrapper so it never
//! sees end-of-file), `out` (stdout and stderr, merged as a terminal shows them), `pid` and,
//! once it ended, `exit` (its exit code). The process runs in its own session (`setsid`), so
//! no agent connection stays open while it runs and hibernation is never held up.
//!
//! `COMMAND` shells run that way: programs see a pipe. `TERMINAL` shells run on a
//! pseudo-terminal the agent keeps (`pty` in their metadata: prompt, echo, job control,
//! resize), created here with `TerminalCreate` under the shell's id; their directory holds
//! only `meta`, and their output, input and exit go through agent attachments (the gateway
//! holds one per terminal a client follows, registered as a live connection so a suspend
//! cuts it).

use std::time::Duration;

use sandpit_agent_proto::{ExecRequest, TerminalCreate, TerminalSize};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use sandpit_control::agent::{AgentClient, AgentFailure};

/// Where shells live inside the sandbox.
pub const SHELLS_DIR: &str = "/tmp/.sandpit-shells";
/// Directory with the `bash` shim (appended to `PATH`, so a real bash wins).
pub const SHIM_DIR: &str = "/tmp/.sandpit-shells/.bin";

/// Most output read from a shell's `out` file at once (the poller sends the rest on its next
/// rounds; opening a shell shows this much of its end).
pub const MAX_OUTPUT_READ: u64 = 1 << 20;
/// Most bytes read from a shell's small files (`meta`, `exit`, setup exit codes).
const MAX_SMALL_FILE: u64 = 64 << 10;

/// What the gateway records about a shell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShellMeta {
    pub id: String,
    pub name: String,
    /// `TERMINAL` or `COMMAND`.
    pub shell_type: String,
    pub command: String,
    pub owner: String,
    pub is_system: bool,
    /// Runs on an agent terminal (a pty) rather than on pipes.
    #[serde(default)]
    pub pty: bool,
}

/// A shell's state read from its directory.
#[derive(Debug, Clone)]
pub struct ShellState {
    pub meta: ShellMeta,
    pub out_len: u64,
    pub exited: bool,
}

/// What every shell needs before it starts (a script fragment over `$d` and `$shim`): its
/// directory, the `bash` shim, and the file the SDK's wrapper sources.
macro_rules! prepare {
    () => {
        r#"mkdir -p "$d" "$shim" || exit 1
if [ ! -x "$shim/bash" ] && ! command -v bash >/dev/null 2>&1; then
  printf '#!/bin/sh\nexec sh "$@"\n' > "$shim/bash.tmp" && chmod 755 "$shim/bash.tmp" && mv "$shim/bash.tmp" "$shim/bash"
fi
# The SDK wraps commands in `source $HOME/.private/.env 2>/dev/null || true && …`; a POSIX
# shell exits when `source` fails, so the file must exist.
export HOME="${HOME:-/root}"
mkdir -p "$HOME/.private" && { [ -e "$HOME/.private/.env" ] || : > "$HOME/.private/.env"; }
"#
    };
}

/// Start the wrapper: a session of its own running `command` in `cwd`, stdin from the FIFO,
/// output to `out`, exit code to `exit` (written then renamed, so it is whole when seen).
const START: &str = concat!(
    r#"d=$1; cmd=$2; cwd=$3; shim=$4
"#,
    prepare!(),
    r#"mkfifo "$d/in" || exit 1
: > "$d/out"
cd "$cwd" 2>/dev/null || cd /
PATH="$PATH:$shim" HOME="$HOME" setsid sh -c 'exec 3<>"$1/in"; sh -c "$2" <&3 >>"$1/out" 2>&1; echo $? > "$1/exit.tmp"; mv "$1/exit.tmp" "$1/exit"' sh "$d" "$cmd" </dev/null >/dev/null 2>&1 &
echo $! > "$d/pid"
"#
);

/// Prepare a terminal shell's surroundings (the same as [`START`]'s): `$1` its directory,
/// `$2` the shim directory.
const PREPARE_TERMINAL: &str = concat!(
    r#"d=$1; shim=$2
"#,
    prepare!()
);

fn dir_of(id: &str) -> String {
    format!("{SHELLS_DIR}/{id}")
}

/// Run a short helper script to its end (output discarded), with optional stdin.
async fn run(
    agent: &AgentClient,
    argv: Vec<String>,
    input: Option<Vec<u8>>,
) -> Result<i32, AgentFailure> {
    let req = ExecRequest {
        argv: Some(argv),
        timeout_ms: Some(30_000),
        stdin: input.is_some(),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let status = match input {
        Some(bytes) => agent.exec_with_input(req, bytes, tx).await?,
        None => agent.exec(req, tx).await?,
    };
    let _ = drain.await;
    Ok(status.exit_code)
}

fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "sh".to_string(),
        "-c".to_string(),
        script.to_string(),
        "sh".to_string(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// Run a shell script to its end; true when it exits 0.
pub async fn script(agent: &AgentClient, text: &str) -> Result<bool, AgentFailure> {
    Ok(run(agent, sh(text, &[]), None).await? == 0)
}

/// The integers stored one per file in `dir` (file name → value); empty if no such dir.
pub async fn read_codes(
    agent: &AgentClient,
    dir: &str,
) -> Result<std::collections::BTreeMap<String, i32>, AgentFailure> {
    let listing = match agent.list_dir(dir).await {
        Ok(l) => l,
        Err(AgentFailure::Refused(_)) => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    let mut out = std::collections::BTreeMap::new();
    for e in listing.entries.iter().filter(|e| !e.name.ends_with(".tmp")) {
        if let Some(code) = read_all(agent, &format!("{dir}/{}", e.name))
            .await?
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
        {
            out.insert(e.name.clone(), code);
        }
    }
    Ok(out)
}

/// Start a shell. Returns false when the wrapper could not be set up.
pub async fn start(agent: &AgentClient, meta: &ShellMeta, cwd: &str) -> Result<bool, AgentFailure> {
    let dir = dir_of(&meta.id);
    // The metadata first: a shell without it would be invisible to `list`.
    let meta_json = serde_json::to_vec(meta).expect("plain struct serializes");
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(meta_json))]);
    agent
        .write_file(&format!("{dir}/meta"), None, body, 1 << 20)
        .await?;
    let code = run(
        agent,
        sh(START, &[&dir, &meta.command, cwd, SHIM_DIR]),
        None,
    )
    .await?;
    Ok(code == 0)
}

/// Start a `TERMINAL` shell on an agent terminal whose id is the shell's. Returns false when
/// its surroundings could not be set up.
pub async fn start_terminal(
    agent: &AgentClient,
    meta: &ShellMeta,
    cwd: &str,
    size: TerminalSize,
) -> Result<bool, AgentFailure> {
    let dir = dir_of(&meta.id);
    prune_terminals(agent).await?;
    if run(agent, sh(PREPARE_TERMINAL, &[&dir, SHIM_DIR]), None).await? != 0 {
        return Ok(false);
    }
    let meta_json = serde_json::to_vec(meta).expect("plain struct serializes");
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(meta_json))]);
    agent
        .write_file(&format!("{dir}/meta"), None, body, 1 << 20)
        .await?;
    // `cd` in the line rather than the terminal's cwd: a missing workspace falls back to /,
    // as pipe shells do.
    let line = format!(
        "cd {} 2>/dev/null || cd /; PATH=\"$PATH:{SHIM_DIR}\"; export PATH; {}",
        sh_quote(cwd),
        meta.command
    );
    agent
        .terminal_create(TerminalCreate {
            id: Some(meta.id.clone()),
            shell: Some(line),
            cols: size.cols,
            rows: size.rows,
            ..Default::default()
        })
        .await?;
    Ok(true)
}

/// Exited terminal shells stay in the agent (with their exit code and scrollback) until
/// removed, and an agent holds at most `MAX_TERMINALS`: past [`KEEP_EXITED`] exited ones,
/// the oldest shells of this gateway (terminals with a shell directory; the v1 API's are
/// left alone) are removed.
async fn prune_terminals(agent: &AgentClient) -> Result<(), AgentFailure> {
    let mut exited: Vec<_> = match agent.terminal_list().await {
        Ok(list) => list.into_iter().filter(|t| t.exit_code.is_some()).collect(),
        Err(AgentFailure::Refused(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    if exited.len() <= KEEP_EXITED {
        return Ok(());
    }
    exited.sort_by_key(|t| t.created_at);
    let excess = exited.len() - KEEP_EXITED;
    for t in exited.into_iter().take(excess) {
        if read_meta(agent, &t.id).await?.is_some_and(|m| m.pty) {
            terminate(agent, &t.id).await?;
        }
    }
    Ok(())
}

/// Exited terminal shells kept for their exit code (see [`prune_terminals`]).
const KEEP_EXITED: usize = 32;

/// `text` as one single-quoted shell word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Send input to a shell's stdin.
pub async fn input(agent: &AgentClient, id: &str, bytes: Vec<u8>) -> Result<bool, AgentFailure> {
    let dir = dir_of(id);
    let code = run(
        agent,
        sh(
            r#"[ -p "$1/in" ] && [ ! -e "$1/exit" ] && cat > "$1/in""#,
            &[&dir],
        ),
        Some(bytes),
    )
    .await?;
    Ok(code == 0)
}

/// Kill a shell's session and forget it.
pub async fn terminate(agent: &AgentClient, id: &str) -> Result<(), AgentFailure> {
    let dir = dir_of(id);
    if sandpit_agent_proto::validate_terminal_id(id).is_ok() {
        match agent.terminal_kill(id, None).await {
            // Not a terminal shell, or an agent without terminals: nothing to kill there.
            Ok(()) | Err(AgentFailure::Refused(_)) => {}
            Err(e) => return Err(e),
        }
    }
    run(
        agent,
        sh(
            r#"p=$(cat "$1/pid" 2>/dev/null); [ -n "$p" ] && [ "$p" -gt 1 ] && kill -TERM -"$p" 2>/dev/null; rm -rf "$1""#,
            &[&dir],
        ),
        None,
    )
    .await?;
    Ok(())
}

/// Rename a shell (its metadata).
pub async fn rename(agent: &AgentClient, id: &str, name: &str) -> Result<bool, AgentFailure> {
    let Some(mut meta) = read_meta(agent, id).await? else {
        return Ok(false);
    };
    meta.name = name.to_string();
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(
        serde_json::to_vec(&meta).expect("plain struct serializes"),
    ))]);
    agent
        .write_file(&format!("{}/meta", dir_of(id)), None, body, 1 << 20)
        .await?;
    Ok(true)
}

/// A small file the gateway keeps in the sandbox, at most [`MAX_SMALL_FILE`] bytes of it;
/// `None` when it is missing or not a regular file (the sandbox's code can replace these
/// files with anything: a FIFO, a device, a huge file).
async fn read_all(agent: &AgentClient, path: &str) -> Result<Option<Vec<u8>>, AgentFailure> {
    match agent.read_bounded(path, 0, MAX_SMALL_FILE).await {
        Ok((_, bytes)) => Ok(Some(bytes)),
        Err(AgentFailure::Refused(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn read_meta(agent: &AgentClient, id: &str) -> Result<Option<ShellMeta>, AgentFailure> {
    Ok(read_all(agent, &format!("{}/meta", dir_of(id)))
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// The state of one shell, or `None` if there is no such shell.
pub async fn state(agent: &AgentClient, id: &str) -> Result<Option<ShellState>, AgentFailure> {
    let listing = match agent.list_dir(&dir_of(id)).await {
        Ok(l) => l,
        Err(AgentFailure::Refused(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(meta) = read_meta(agent, id).await? else {
        return Ok(None);
    };
    if meta.pty {
        // The agent knows whether it runs; a terminal of an earlier boot is gone.
        return Ok(terminal_exit(agent, id).await?.map(|exit| ShellState {
            meta,
            out_len: 0,
            exited: exit.is_some(),
        }));
    }
    let out_len = listing
        .entries
        .iter()
        .find(|e| e.name == "out")
        .map(|e| e.info.size)
        .unwrap_or(0);
    let exited = listing.entries.iter().any(|e| e.name == "exit");
    Ok(Some(ShellState {
        meta,
        out_len,
        exited,
    }))
}

/// Sizes of a shell's output and whether it ended, in one listing (the poller's question).
pub async fn progress(agent: &AgentClient, id: &str) -> Result<Option<(u64, bool)>, AgentFailure> {
    let listing = match agent.list_dir(&dir_of(id)).await {
        Ok(l) => l,
        Err(AgentFailure::Refused(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let out = listing
        .entries
        .iter()
        .find(|e| e.name == "out")
        .map(|e| e.info.size)
        .unwrap_or(0);
    Ok(Some((
        out,
        listing.entries.iter().any(|e| e.name == "exit"),
    )))
}

/// Every shell in the sandbox.
pub async fn list(agent: &AgentClient) -> Result<Vec<ShellState>, AgentFailure> {
    let listing = match agent.list_dir(SHELLS_DIR).await {
        Ok(l) => l,
        Err(AgentFailure::Refused(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in listing.entries.iter().filter(|e| !e.name.starts_with('.')) {
        if let Some(s) = state(agent, &e.name).await? {
            out.push(s);
        }
    }
    Ok(out)
}

/// Output from byte `from` on, at most [`MAX_OUTPUT_READ`] bytes of it (empty when the file
/// is missing or not a regular file).
pub async fn output_from(
    agent: &AgentClient,
    id: &str,
    from: u64,
) -> Result<Vec<u8>, AgentFailure> {
    match agent
        .read_bounded(&format!("{}/out", dir_of(id)), from, MAX_OUTPUT_READ)
        .await
    {
        Ok((_, bytes)) => Ok(bytes),
        Err(AgentFailure::Refused(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A terminal shell as the agent has it: `None` if the agent has no such terminal, else its
/// exit code once it exited.
async fn terminal_exit(agent: &AgentClient, id: &str) -> Result<Option<Option<i32>>, AgentFailure> {
    match agent.terminal_list().await {
        Ok(list) => Ok(list.into_iter().find(|t| t.id == id).map(|t| t.exit_code)),
        Err(AgentFailure::Refused(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The exit code, once the shell ended.
pub async fn exit_code(agent: &AgentClient, id: &str) -> Result<Option<i32>, AgentFailure> {
    if let Some(Some(code)) = terminal_exit(agent, id).await? {
        return Ok(Some(code));
    }
    Ok(read_all(agent, &format!("{}/exit", dir_of(id)))
        .await?
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok()))
}

/// Turn bytes into text without splitting a UTF-8 sequence: returns the text and keeps an
/// incomplete trailing sequence in `carry` for the next chunk.
pub fn utf8_chunk(carry: &mut Vec<u8>, bytes: &[u8]) -> String {
    carry.extend_from_slice(bytes);
    let valid = match std::str::from_utf8(carry) {
        Ok(_) => carry.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => carry.len(),
    };
    let rest = carry.split_off(valid);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = rest;
    text
}

/// How often the gateway looks for new output of the shells a client follows.
pub const POLL: Duration = Duration::from_millis(150);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_chunks_are_not_split() {
        let mut carry = Vec::new();
        let e = "é".as_bytes();
        assert_eq!(utf8_chunk(&mut carry, &[b'a', e[0]]), "a");
        assert_eq!(utf8_chunk(&mut carry, &[e[1], b'b']), "éb");
        assert!(carry.is_empty());
        assert_eq!(utf8_chunk(&mut carry, &[0xff, b'c']), "\u{fffd}c");
    }
}
