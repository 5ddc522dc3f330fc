//! Users (protocol version 5): resolve a user spec (`name`, `uid`, `name:group`, `uid:gid`)
//! in the sandbox's own `/etc/passwd` and `/etc/group`, as Docker does, and switch a child
//! to it before it runs.
//!
//! Both files belong to the tenant: they are read bounded ([`MAX_DB`]), a line that does not
//! parse is skipped, and a spec that resolves to nothing fails with `user_not_found` rather
//! than falling back to root. A numeric user with no passwd entry is used as is (gid 0 unless
//! a group is given, `HOME` `/`), as Docker does.
//!
//! The switch is the one `unsafe` of the agent ([`run_as`]): the child sets its supplementary
//! groups, gid and uid between fork and exec. `std`'s own `uid`/`gid` cannot do it: it drops
//! every supplementary group, and a `pre_exec` hook runs only after its `setuid`.

use std::io::Read;

use rustix::process::{Gid, Uid};
use sandpit_agent_proto::{AgentError, AgentErrorCode, check_user_spec};

use crate::conn::agent_error;

/// Most bytes of `/etc/passwd` or `/etc/group` read; the rest is ignored.
pub const MAX_DB: u64 = 4 << 20;
/// Most supplementary groups a user gets (Linux's `NGROUPS_MAX` is 65536; gVisor's is lower).
pub const MAX_GROUPS: usize = 256;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: every group of `/etc/group` listing the user by name, plus `gid`.
    pub groups: Vec<u32>,
    /// From the passwd entry; `/` when there is none.
    pub home: String,
    /// From the passwd entry, if any.
    pub shell: Option<String>,
}

/// Resolve `spec` against the sandbox's `/etc/passwd` and `/etc/group`.
pub fn resolve(spec: &str) -> Result<Creds, AgentError> {
    resolve_in(spec, &read_db("/etc/passwd")?, &read_db("/etc/group")?)
}

/// Resolve `spec` against the given file contents.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Creds, AgentError> {
    let (user, grp) =
        check_user_spec(spec).map_err(|m| agent_error(AgentErrorCode::BadRequest, m))?;
    let not_found = |what: &str| {
        agent_error(
            AgentErrorCode::UserNotFound,
            format!("{what} not found in the sandbox's /etc/passwd or /etc/group"),
        )
    };
    let pw = passwd.lines().filter_map(PasswdEntry::parse).find(|e| {
        if is_id(user) {
            user.parse() == Ok(e.uid)
        } else {
            e.name == user
        }
    });
    let (uid, mut gid, name, home, shell) = match (&pw, is_id(user)) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home.to_string(), e.shell),
        (None, true) => (
            parse_id(user).ok_or_else(|| not_found(&format!("user {user}")))?,
            0,
            None,
            "/".to_string(),
            None,
        ),
        (None, false) => return Err(not_found(&format!("user {user}"))),
    };
    let groups_db: Vec<GroupEntry> = group.lines().filter_map(GroupEntry::parse).collect();
    if let Some(g) = grp {
        gid = if is_id(g) {
            parse_id(g).ok_or_else(|| not_found(&format!("group {g}")))?
        } else {
            groups_db
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| not_found(&format!("group {g}")))?
        };
    }
    let mut groups = vec![gid];
    // Docker: with an explicit group only that group; else the user's memberships.
    if let (None, Some(name)) = (grp, name) {
        for e in &groups_db {
            if groups.len() >= MAX_GROUPS {
                break;
            }
            if e.members.split(',').any(|m| m == name) && !groups.contains(&e.gid) {
                groups.push(e.gid);
            }
        }
    }
    Ok(Creds {
        uid,
        gid,
        groups,
        home,
        shell: shell.map(str::to_string),
    })
}

/// Resolve an optional spec; `None` means "stay root".
pub fn resolve_opt(spec: Option<&str>) -> Result<Option<Creds>, AgentError> {
    spec.map(resolve).transpose()
}

/// Make `cmd` run as `creds` (supplementary groups, then gid, then uid).
pub fn run_as(cmd: &mut tokio::process::Command, creds: &Creds) {
    let switch = switcher(creds);
    #[expect(
        unsafe_code,
        reason = "the only way to set supplementary groups before setuid"
    )]
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes three raw syscalls through rustix (no allocation, no lock;
    // the group list was built before the fork) and touches no other state.
    unsafe {
        cmd.pre_exec(switch);
    }
}

/// Like [`run_as`] for a terminal's command.
pub fn pty_run_as(cmd: pty_process::Command, creds: &Creds) -> pty_process::Command {
    let switch = switcher(creds);
    #[expect(
        unsafe_code,
        reason = "the only way to set supplementary groups before setuid"
    )]
    // SAFETY: as in `run_as`; pty-process runs this after making the child a session
    // leader, in the forked child before exec.
    unsafe {
        cmd.pre_exec(switch)
    }
}

/// The pre-exec hook: only raw syscalls on data prepared here.
fn switcher(creds: &Creds) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    let groups: Vec<Gid> = creds.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(creds.uid), Gid::from_raw(creds.gid));
    move || {
        // The child has one thread, so the thread's credentials are the process's.
        rustix::thread::set_thread_groups(&groups)?;
        rustix::thread::set_thread_gid(gid)?;
        rustix::thread::set_thread_uid(uid)?;
        Ok(())
    }
}

/// Read at most [`MAX_DB`] bytes of a regular file; a missing file is empty. Never blocks
/// on a FIFO the tenant put there.
fn read_db(path: &str) -> Result<String, AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: &dyn std::fmt::Display| {
        agent_error(
            AgentErrorCode::UserNotFound,
            format!("cannot read {path}: {e}"),
        )
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(failed(&e)),
    };
    let meta = file.metadata().map_err(|e| failed(&e))?;
    if !meta.is_file() {
        return Err(failed(&"not a regular file"));
    }
    let mut buf = Vec::new();
    file.take(MAX_DB)
        .read_to_end(&mut buf)
        .map_err(|e| failed(&e))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A numeric id below 2^32 - 1 (`-1` means "unchanged" to the set*id calls).
fn parse_id(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|id| *id != u32::MAX)
}

/// `name:password:uid:gid:gecos:home:shell`.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: Option<&'a str>,
}

impl<'a> PasswdEntry<'a> {
    fn parse(line: &'a str) -> Option<PasswdEntry<'a>> {
        let f: Vec<&str> = line.splitn(8, ':').collect();
        if f.len() != 7 || f[0].is_empty() || f[0].contains('\0') {
            return None;
        }
        let home = if f[5].starts_with('/') && !f[5].contains('\0') {
            f[5]
        } else {
            "/"
        };
        let shell = Some(f[6]).filter(|s| s.starts_with('/') && !s.contains('\0'));
        Some(PasswdEntry {
            name: f[0],
            uid: parse_id(f[2])?,
            gid: parse_id(f[3])?,
            home,
            shell,
        })
    }
}

/// `name:password:gid:member,member`.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

impl<'a> GroupEntry<'a> {
    fn parse(line: &'a str) -> Option<GroupEntry<'a>> {
        let f: Vec<&str> = line.splitn(5, ':').collect();
        if f.len() != 4 || f[0].is_empty() {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: parse_id(f[2])?,
            members: f[3],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        app:x:1000:1000:App:/home/app:/bin/ash\n\
        svc:x:1001:100::relative:nologin\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nusers:x:100:app,svc\nwheel:x:10:root,app\n";

    fn ok(spec: &str) -> Creds {
        resolve_in(spec, PASSWD, GROUP).unwrap()
    }

    fn code(spec: &str, passwd: &str, group: &str) -> AgentErrorCode {
        resolve_in(spec, passwd, group).unwrap_err().code
    }

    #[test]
    fn resolves_names_ids_and_groups_like_docker() {
        let app = ok("app");
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, [1000, 100, 10]);
        assert_eq!(
            (app.home.as_str(), app.shell.as_deref()),
            ("/home/app", Some("/bin/ash"))
        );
        assert_eq!(ok("1000"), app);
        let root = ok("root");
        assert_eq!(
            (root.uid, root.gid, root.groups.as_slice()),
            (0, 0, &[0, 10][..])
        );
        // An explicit group replaces the memberships.
        let c = ok("app:users");
        assert_eq!((c.uid, c.gid, c.groups.as_slice()), (1000, 100, &[100][..]));
        let c = ok("0:0");
        assert_eq!((c.uid, c.gid, c.groups.as_slice()), (0, 0, &[0][..]));
        // A numeric user without an entry is used as is.
        let c = ok("4242");
        assert_eq!(
            (c.uid, c.gid, c.home.as_str(), c.shell),
            (4242, 0, "/", None)
        );
        assert_eq!(ok("4242:77").gid, 77);
        // A relative home and a shell that is not a path are not used.
        let c = ok("svc");
        assert_eq!((c.home.as_str(), c.shell), ("/", None));
    }

    #[test]
    fn unknown_users_and_bad_specs_fail_closed() {
        assert_eq!(code("nobody", PASSWD, GROUP), AgentErrorCode::UserNotFound);
        assert_eq!(
            code("app:nogroup", PASSWD, GROUP),
            AgentErrorCode::UserNotFound
        );
        assert_eq!(
            code("4294967295", PASSWD, GROUP),
            AgentErrorCode::UserNotFound
        );
        assert_eq!(
            code("99999999999", PASSWD, GROUP),
            AgentErrorCode::UserNotFound
        );
        for bad in [
            "",
            "a:b:c",
            "../etc",
            "a/b",
            "a\0",
            "-x",
            "x:",
            ":x",
            &"a".repeat(65),
        ] {
            assert_eq!(
                code(bad, PASSWD, GROUP),
                AgentErrorCode::BadRequest,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hostile_databases_are_parsed_defensively() {
        let huge = format!("{}:x:1:1::/:/bin/sh\n", "a".repeat(1 << 20));
        let passwd = format!(
            "{huge}broken\napp:x:notanumber:1::/:/bin/sh\napp:x:1000\n\0:x:5:5::/:/bin/sh\n\
             ../app:x:7:7::../..:/bin/sh\napp:x:1000:1000::/home\0x:/bin/sh\n:x:9:9::/:/\n"
        );
        // Only the last well-formed `app` line counts; the NUL in its home is refused.
        let c = resolve_in("app", &passwd, "").unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (1000, 1000, "/"));
        // `..` is just a name here, never a path; `../app` is not a valid spec anyway.
        assert_eq!(code("../app", &passwd, ""), AgentErrorCode::BadRequest);
        let group = format!(
            "{}\nusers:x:x:app\nusers:x:100:app\n:x:5:app\nx:x:6\n",
            "g".repeat(1 << 20)
        );
        let c = resolve_in("app", &passwd, &group).unwrap();
        assert_eq!(c.groups, [1000, 100]);
        assert_eq!(code("app:x", &passwd, &group), AgentErrorCode::UserNotFound);
        // Missing files resolve nothing but numeric ids.
        assert_eq!(code("app", "", ""), AgentErrorCode::UserNotFound);
        assert_eq!(resolve_in("5:5", "", "").unwrap().groups, [5]);
    }

    #[test]
    fn groups_are_capped() {
        let group: String = (0..1000)
            .map(|g| format!("g{g}:x:{}:app\n", g + 2000))
            .collect();
        let c = resolve_in("app", PASSWD, &group).unwrap();
        assert_eq!(c.groups.len(), MAX_GROUPS);
    }
}
