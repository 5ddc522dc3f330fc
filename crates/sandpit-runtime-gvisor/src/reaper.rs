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
//!
//! Only this process's children are looked at (`/proc/self/task/*/children`), not every
//! process of the host: with a thousand sandboxes held the host has thousands of processes,
//! and every SIGCHLD (each `runsc` the server runs ends with one) would read them all.
#![expect(clippy::disallowed_methods, reason = "/proc is the kernel's")]

use std::time::Duration;

/// How often the children are looked at without a SIGCHLD.
const SAFETY_NET: Duration = Duration::from_secs(10);

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
        let every = if sigchld.is_some() {
            SAFETY_NET
        } else {
            Duration::from_secs(1)
        };
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
                // A safety net only: SIGCHLD wakes this loop for every child that ends.
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// Reap every zombie child of this process that runsc left behind.
pub fn reap_adopted() {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    for pid in candidates() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if is_adopted_zombie(&stat, me)
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
        }
    }
}

/// This process's children, from each thread's `children` list (an adopted process's parent
/// is whichever thread the kernel picked); every pid of the host where the kernel has no
/// such lists (`CONFIG_PROC_CHILDREN` off).
fn candidates() -> Vec<i32> {
    let mut pids = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                listed = true;
                pids.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if listed {
        return pids;
    }
    crate::procs::host_pids()
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

    #[test]
    fn children_are_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let found = candidates().contains(&pid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found);
    }
}
