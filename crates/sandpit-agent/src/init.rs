//! PID 1 duties: keep the `serve` child running and reap every process that ends up ours.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::process::{Pid, WaitOptions};

/// `PATH` given to children when the agent's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `HOME` given to children when the agent's environment has none.
pub const DEFAULT_HOME: &str = "/root";

/// Variables to add to a child's environment: defaults for what the agent's own environment
/// (set by the host through the OCI spec, inherited by every child) lacks.
pub fn default_env() -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if std::env::var_os("PATH").is_none() {
        out.push(("PATH", DEFAULT_PATH));
    }
    if std::env::var_os("HOME").is_none() {
        out.push(("HOME", DEFAULT_HOME));
    }
    out
}

/// Where init and serve log once init runs: a file on the sandbox's `/dev` tmpfs (its memory),
/// so it never reaches the sandbox's disk, a template layer or the host.
pub const LOG_PATH: &str = "/dev/.sandpit-agent.log";
/// The agent stops logging to a file once it holds this much.
pub const LOG_CAP: u64 = 1 << 20;

/// Whether a log line may be written: stderr is not a file already [`LOG_CAP`] long.
pub fn log_has_room() -> bool {
    rustix::fs::fstat(rustix::stdio::stderr()).map_or(true, |st| {
        (st.st_mode & 0o170000) != 0o100000 || (st.st_size as u64) < LOG_CAP
    })
}

/// Leave the host's console: stdin becomes `/dev/null` and stdout and stderr [`LOG_PATH`].
/// The console runsc hands init is a file on the host, and any root process in the sandbox
/// can write to init's descriptors through `/proc/1/fd`; after this nothing in the sandbox
/// holds a host file it could grow.
fn leave_console() {
    use rustix::fs::{Mode, OFlags};
    let null = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty());
    let log = rustix::fs::open(
        LOG_PATH,
        OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    );
    let (Ok(null), out) = (null, log) else {
        log!("init: no /dev/null; keeping the console");
        return;
    };
    log!("init: logging to {LOG_PATH} from now on");
    let out = out.as_ref().unwrap_or(&null);
    // Failures leave that descriptor as it was; there is nowhere better to report them.
    let _ = rustix::stdio::dup2_stdin(&null);
    let _ = rustix::stdio::dup2_stdout(out);
    let _ = rustix::stdio::dup2_stderr(out);
}

/// Run as init forever: spawn `/proc/self/exe serve`, reap all children with `waitpid(-1)`,
/// and restart `serve` whenever it dies.
pub fn run(listen: Option<SocketAddr>) -> ! {
    leave_console();
    let arg0 = std::env::args_os().next();
    loop {
        let started = Instant::now();
        let mut cmd = Command::new("/proc/self/exe");
        if let Some(arg0) = &arg0 {
            std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
        }
        cmd.arg("serve");
        if let Some(addr) = listen {
            cmd.arg("--listen").arg(addr.to_string());
        }
        cmd.envs(default_env());
        let serve = match cmd.spawn() {
            // The handle is dropped: the loop below reaps the child by pid.
            Ok(child) => Pid::from_raw(child.id() as i32),
            Err(e) => {
                log!("init: cannot start serve: {e}");
                reap_for(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            match rustix::process::wait(WaitOptions::empty()) {
                Ok(Some((pid, status))) if Some(pid) == serve => {
                    let how = match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => format!("exited with code {code}"),
                        (_, Some(sig)) => format!("was killed by signal {sig}"),
                        _ => format!("{status:?}"),
                    };
                    log!("init: serve {how}; restarting");
                    break;
                }
                Ok(_) | Err(Errno::INTR) => {}
                Err(Errno::CHILD) => {
                    log!("init: serve is gone; restarting");
                    break;
                }
                Err(e) => {
                    log!("init: wait: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // Do not spin if serve dies right away.
        if started.elapsed() < Duration::from_secs(1) {
            reap_for(Duration::from_secs(1));
        }
    }
}

/// Reap children without blocking for `dur`.
fn reap_for(dur: Duration) {
    let until = Instant::now() + dur;
    while Instant::now() < until {
        while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {}
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_is_absolute_dirs() {
        assert!(DEFAULT_PATH.split(':').all(|d| d.starts_with('/')));
        // The test process has PATH set, so no default is added for it.
        assert!(default_env().iter().all(|(k, _)| *k != "PATH"));
    }
}
