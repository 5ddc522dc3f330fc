//! Running `ip` and `nft`.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::NetError;

/// Runs `program args...`, feeding `stdin` if given; returns stdout on success.
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    let command = display(program, args);
    tracing::trace!(%command, "running");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| NetError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|source| NetError::Spawn {
                command: command.clone(),
                source,
            })?;
        drop(pipe);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs an nft script (`nft -f -`): the whole script is one transaction.
pub(crate) async fn nft_script(script: &str) -> Result<String, NetError> {
    run("nft", &["-f", "-"], Some(script)).await
}

fn display(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Whether an error is a command failure whose stderr mentions `needle`.
pub(crate) fn stderr_contains(err: &NetError, needle: &str) -> bool {
    matches!(err, NetError::Command { stderr, .. } if stderr.contains(needle))
}
