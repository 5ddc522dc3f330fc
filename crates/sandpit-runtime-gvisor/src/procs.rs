//! Finding the host processes of one runsc sandbox (`runsc-sandbox` and `runsc-gofer`).
#![expect(clippy::disallowed_methods, reason = "/proc is the kernel's")]

use std::path::Path;

/// Pids of live (non-zombie) processes that belong to sandbox `id` under runsc root `root`:
/// the sentry (`runsc-sandbox ... boot ... <id>`) and the gofer (`runsc-gofer ...
/// --bundle=<bundle>`). runsc re-executes itself with these names and `--root=<root>`.
pub(crate) fn sandbox_pids(root: &Path, id: &str, bundle: Option<&Path>) -> Vec<i32> {
    let root_arg = format!("--root={}", root.display());
    let bundle_arg = bundle.map(|b| format!("--bundle={}", b.display()));
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if matches_sandbox(&args, &root_arg, id, bundle_arg.as_deref()) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn matches_sandbox(args: &[&[u8]], root_arg: &str, id: &str, bundle_arg: Option<&str>) -> bool {
    let Some(argv0) = args.first() else {
        return false;
    };
    if !args.contains(&root_arg.as_bytes()) {
        return false;
    }
    let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or(argv0);
    match name {
        b"runsc-sandbox" => args.last() == Some(&id.as_bytes()),
        b"runsc-gofer" => bundle_arg.is_some_and(|b| args.contains(&b.as_bytes())),
        _ => false,
    }
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn is_alive(pid: i32) -> bool {
    !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| state == 'Z' || state == 'X'),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<&[u8]> {
        s.split(' ').map(str::as_bytes).collect()
    }

    #[test]
    fn matches_sentry_and_gofer() {
        let root = "--root=/r";
        let sentry = args("runsc-sandbox --root=/r --network=none boot --bundle=/s/b sbx-1");
        assert!(matches_sandbox(&sentry, root, "sbx-1", None));
        assert!(!matches_sandbox(&sentry, root, "sbx-10", None));
        assert!(!matches_sandbox(&sentry, "--root=/other", "sbx-1", None));
        let gofer = args("runsc-gofer --root=/r gofer --bundle=/s/b --io-fds=5");
        assert!(matches_sandbox(
            &gofer,
            root,
            "sbx-1",
            Some("--bundle=/s/b")
        ));
        assert!(!matches_sandbox(
            &gofer,
            root,
            "sbx-1",
            Some("--bundle=/s/c")
        ));
        assert!(!matches_sandbox(&gofer, root, "sbx-1", None));
        let client = args("runsc --root=/r state sbx-1");
        assert!(!matches_sandbox(
            &client,
            root,
            "sbx-1",
            Some("--bundle=/s/b")
        ));
    }

    #[test]
    fn own_process_is_not_a_zombie() {
        assert!(!is_zombie(std::process::id() as i32));
        assert!(is_zombie(i32::MAX));
    }
}
