//! Reaping runsc's sandbox processes ourselves.
//!
//! `runsc run -detach` leaves the sentry (`runsc-sandbox`) and gofer (`runsc-gofer`) behind
//! when it exits; they are re-parented to the nearest child subreaper, normally the host's
//! init. `runsc delete` (and so stop, destroy and checkpoint) waits until they are reaped,
//! and some inits reap slowly (seen here: every ~1.4 s). Marking the server a child
//! subreaper makes it their parent, and this task reaps them as soon as they exit.
//!
//! Only zombies named `exe` are reaped: runsc re-executes `/proc/self/exe`, so that is the
//! kernel's name for the sentry and gofer, while every child the server spawns itself
//! (`runsc`, `ip`, `nft`, `unshare`) keeps its own name and is left to tokio to wait for.
#![expect(clippy::disallowed_methods, reason = "/proc is the kernel's")]

use std::time::Duration;

/// Make this process a child subreaper and start reaping adopted runsc processes until
/// `stop` resolves. Without subreaper rights (not fatal) it only logs.
pub fn spawn_reaper<F>(stop: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        tracing::warn!(error = %e, "cannot become a child subreaper; stopping sandboxes may be slow");
    }
    tokio::spawn(async move {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGCHLD stream; reaping on a timer only");
                None
            }
        };
        tokio::pin!(stop);
        loop {
            reap_adopted();
            tokio::select! {
                _ = &mut stop => return,
                _ = async {
                    match sigchld.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

/// Reap every zombie child of this process that runsc left behind.
pub fn reap_adopted() {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if is_adopted_zombie(&stat, me)
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
        }
    }
}

/// `/proc/<pid>/stat` of a zombie named `exe` whose parent is `me`.
fn is_adopted_zombie(stat: &str, me: i32) -> bool {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next();
    let ppid = rest.next().and_then(|p| p.parse::<i32>().ok());
    comm == "exe" && state == Some("Z") && ppid == Some(me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_only_adopted_runsc_zombies() {
        assert!(is_adopted_zombie("123 (exe) Z 77 123 123 0 -1", 77));
        assert!(!is_adopted_zombie("123 (exe) S 77 123 123 0 -1", 77));
        assert!(!is_adopted_zombie("123 (exe) Z 1 123 123 0 -1", 77));
        assert!(!is_adopted_zombie("123 (runsc) Z 77 123 123 0 -1", 77));
        assert!(!is_adopted_zombie("123 (my (exe)) Z 77 1", 77));
    }
}
