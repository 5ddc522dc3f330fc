//! What a node starts sandboxes from: the built-in `base` template (a busybox root
//! filesystem with Debian's static bash as `/bin/bash` and the account `user` (uid 1000,
//! home `/home/user`) the E2B SDKs expect, built offline in a second), the agent layer stacked over every template, a
//! template's layers and image config as stored, and where its boot snapshot lives.
#![expect(
    clippy::disallowed_methods,
    reason = "the base rootfs, the agent layer and boot snapshots are written by the node itself under the data dir"
)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Node;
use crate::ControlError;
use crate::store::TemplateRow;
use crate::util::now_ms;
use sandpit_image_config::ImageConfig;

/// Where the agent sits inside every sandbox.
pub const AGENT_PATH_IN_SANDBOX: &str = "/.sandpit/agent";

pub const BASE_TEMPLATE_ID: &str = "tpl_base";
pub const BASE_TEMPLATE_NAME: &str = "base";

/// True when `path` is an ELF executable without a program interpreter, i.e. it runs in a
/// root filesystem that has no C library.
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let mut head = Vec::new();
    std::fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 {
        return Ok(false); // not a 64-bit ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        if off + 4 > head.len() {
            return Ok(false);
        }
        let p_type = u32::from_le_bytes(head[off..off + 4].try_into().expect("4 bytes"));
        if p_type == 3 {
            return Ok(false); // PT_INTERP: dynamically linked
        }
    }
    Ok(true)
}

/// Copy the agent binary into a content-addressed layer `agent/<hash>/.sandpit/agent` and
/// return the layer's directory. Refuses a binary that is not static.
pub fn install_agent_layer(data_dir: &Path, agent_bin: &Path) -> Result<PathBuf, ControlError> {
    let is_static = is_static_elf(agent_bin).map_err(ControlError::files(format!(
        "reading the agent binary {} (build it with `scripts/build-agent` or set SANDPIT_AGENT_BIN)",
        agent_bin.display()
    )))?;
    if !is_static {
        return Err(ControlError::Files {
            what: format!("the agent binary {}", agent_bin.display()),
            source: std::io::Error::other(
                "it is not a static executable; build it with scripts/build-agent",
            ),
        });
    }
    let bytes =
        std::fs::read(agent_bin).map_err(ControlError::files("reading the agent binary"))?;
    let hash = hex::encode(&Sha256::digest(&bytes)[..8]);
    let layer = data_dir.join("agent").join(&hash);
    if layer.join(".sandpit/agent").exists() {
        return Ok(layer);
    }
    let tmp = data_dir
        .join("agent")
        .join(format!(".tmp-{hash}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join(".sandpit"))
        .map_err(ControlError::files("creating the agent layer"))?;
    let dest = tmp.join(".sandpit/agent");
    std::fs::write(&dest, &bytes).map_err(ControlError::files("writing the agent layer"))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(ControlError::files("making the agent executable"))?;
    std::fs::rename(&tmp, &layer).map_err(ControlError::files("publishing the agent layer"))?;
    Ok(layer)
}

/// Build the `base` template (busybox, bash when the host has a static one, the accounts
/// `root` and `user`, a minimal `/etc`) if it does not exist yet, and register it. A base
/// built by an older version (no `/bin/bash`, no `user`) is kept as it is: sandboxes and
/// memory images stack on it, so it is never changed in place (remove
/// `<data dir>/templates/base/rootfs` while no sandbox uses it to rebuild it).
pub async fn ensure_base(node: &Node) -> Result<(), ControlError> {
    let dir = node.cfg.data_dir.join("templates").join(BASE_TEMPLATE_NAME);
    let rootfs = dir.join("rootfs");
    if !rootfs.join("bin/busybox").exists() {
        let started = std::time::Instant::now();
        build_busybox_rootfs(&dir, &rootfs)?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built the base template"
        );
    } else if !base_has_user(node) {
        tracing::info!(
            rootfs = %rootfs.display(),
            "the base template predates /bin/bash and the account `user` (E2B's default user \
             runs as root); remove its rootfs while no sandbox uses it to rebuild it"
        );
    }
    node.store
        .templates
        .upsert(&TemplateRow::builtin(
            BASE_TEMPLATE_ID,
            BASE_TEMPLATE_NAME,
            "busybox (static) with a shell and the core utilities, bash, users root and user",
            rootfs.display().to_string(),
            now_ms(),
        ))
        .await?;
    Ok(())
}

/// A template's image config (environment, start command, ready check); empty for the
/// built-in ones. Fails closed: a stored config that does not decode is an error, never an
/// empty config (which would drop the image's environment and user).
pub fn image_config(t: &TemplateRow) -> Result<ImageConfig, ControlError> {
    crate::error::decode(|| format!("image config of template {}", t.id), &t.config)
}

/// A template's read-only layers, lowest first (the agent layer goes on top of them).
pub fn layers_of(t: &TemplateRow) -> Result<Vec<PathBuf>, ControlError> {
    let layers: Vec<PathBuf> =
        crate::error::decode(|| format!("layers of template {}", t.id), &t.layers)?;
    Ok(if layers.is_empty() {
        vec![PathBuf::from(&t.rootfs)]
    } else {
        layers
    })
}

/// Whether `id` is a layer id as the layer store names them (`sandpit-image`'s `LayerId`:
/// 32 hex digits, or `b` and 31 for built ones), so it is safe as a path component.
pub fn valid_layer_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'b')
}

/// Where layer `id` is published on this node (`<data dir>/images/layers/<id>`, the layer
/// store of `sandpit-image`).
pub fn layer_dir(node: &Node, id: &str) -> PathBuf {
    node.cfg.data_dir.join("images").join("layers").join(id)
}

/// A template's layers as directories of this node, lowest first: a layer of the layer
/// store (`…/images/layers/<id>`, content-addressed) and the base root filesystem
/// (`…/templates/base/rootfs`) are this node's own copies, wherever the node that wrote the
/// row keeps its data dir (a layer another node built is fetched there before a boot:
/// `node::stored::ensure_layers`). Other paths are kept as recorded.
pub fn local_layers(node: &Node, t: &TemplateRow) -> Result<Vec<PathBuf>, ControlError> {
    let data = &node.cfg.data_dir;
    fn dir_name(d: Option<&Path>) -> Option<&str> {
        d.and_then(|d| d.file_name()).and_then(|n| n.to_str())
    }
    Ok(layers_of(t)?
        .into_iter()
        .map(|p| {
            let parent = p.parent();
            let name = p.file_name().and_then(|n| n.to_str()).map(str::to_string);
            match name {
                Some(id)
                    if dir_name(parent) == Some("layers")
                        && dir_name(parent.and_then(Path::parent)) == Some("images")
                        && valid_layer_id(&id) =>
                {
                    data.join("images").join("layers").join(id)
                }
                Some(n)
                    if n == "rootfs"
                        && dir_name(parent) == Some(BASE_TEMPLATE_NAME)
                        && dir_name(parent.and_then(Path::parent)) == Some("templates") =>
                {
                    data.join("templates")
                        .join(BASE_TEMPLATE_NAME)
                        .join("rootfs")
                }
                _ => p,
            }
        })
        .collect())
}

/// The ids of a template's layers that live in the layer store
/// (`<data dir>/images/layers/<id>`), lowest first: what a node must hold, or fetch, to
/// boot it. The base root filesystem a `FROM base` stacks on is on every node and is not
/// one of them.
pub fn layer_ids(t: &TemplateRow) -> Result<Vec<String>, ControlError> {
    Ok(layers_of(t)?
        .iter()
        .filter(|p| p.parent().and_then(|d| d.file_name()) == Some("layers".as_ref()))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect())
}

/// The working directory of an exec that names none: the template's `WORKDIR` (as
/// `docker exec` does); `None` (the agent's `/`) for templates without one.
pub async fn default_cwd(node: &Node, row: &crate::store::Sandbox) -> Option<String> {
    if row.template_id == BASE_TEMPLATE_ID {
        return None;
    }
    let t = node.store.templates.by_id(&row.template_id).await.ok()??;
    image_config(&t).ok()?.workdir
}

/// The user an exec, terminal or file write that names none runs as or belongs to: the
/// template's `USER` (as `docker exec` does); `None` (root) for templates without one.
/// Fails closed: a template whose config does not decode is an error, never root.
pub async fn default_user(
    node: &Node,
    row: &crate::store::Sandbox,
) -> Result<Option<String>, ControlError> {
    if row.template_id == BASE_TEMPLATE_ID {
        return Ok(None);
    }
    let Some(t) = node.store.templates.by_id(&row.template_id).await? else {
        return Ok(None);
    };
    Ok(image_config(&t)?.user.filter(|u| !u.is_empty()))
}

/// The account the E2B SDKs' user `user` (their default) runs as: the template's `USER`
/// when it names one (as for any exec), else `user` when the template's root filesystem is
/// this node's `base` (or a template built `FROM base`) and that base has the account,
/// else root (`None`), as for a template without users.
pub async fn e2b_user(
    node: &Node,
    row: &crate::store::Sandbox,
) -> Result<Option<String>, ControlError> {
    let on_base = if row.template_id == BASE_TEMPLATE_ID {
        true
    } else {
        let Some(t) = node.store.templates.by_id(&row.template_id).await? else {
            return Ok(None);
        };
        if let Some(user) = image_config(&t)?.user.filter(|u| !u.is_empty()) {
            return Ok(Some(user));
        }
        // The lowest layer of a `FROM base` build is the base root filesystem.
        local_layers(node, &t)?.first()
            == Some(
                &node
                    .cfg
                    .data_dir
                    .join("templates")
                    .join(BASE_TEMPLATE_NAME)
                    .join("rootfs"),
            )
    };
    Ok((on_base && base_has_user(node)).then(|| E2B_USER.to_string()))
}

/// The account of the base template the E2B SDKs run as by default.
pub const E2B_USER: &str = "user";
/// Its uid and gid.
pub const E2B_UID: u32 = 1000;

/// Whether this node's base root filesystem has the account `user` (built by this version;
/// an older base is never changed in place, see [`ensure_base`]).
pub fn base_has_user(node: &Node) -> bool {
    let rootfs = node
        .cfg
        .data_dir
        .join("templates")
        .join(BASE_TEMPLATE_NAME)
        .join("rootfs");
    rootfs.join("home").join(E2B_USER).is_dir()
}

/// Find a static bash on the host (Debian's `bash-static`), for the base template's
/// `/bin/bash`.
fn find_bash() -> Option<PathBuf> {
    [
        "/usr/local/lib/sandpit/bash",
        "/bin/bash-static",
        "/usr/bin/bash-static",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists() && is_static_elf(p).unwrap_or(false))
    .map(Path::to_path_buf)
}

/// Find a static busybox on the host. First the one scripts/install-deps fetches on bookworm,
/// whose own busybox-static is built without wget's `-T` (and segfaults on it, busybox sh
/// running its applet whatever `wget` is on PATH).
fn find_busybox() -> Result<PathBuf, ControlError> {
    for candidate in [
        "/usr/local/lib/sandpit/busybox",
        "/bin/busybox",
        "/usr/bin/busybox",
        "/usr/local/bin/busybox",
    ] {
        let p = Path::new(candidate);
        if p.exists() && is_static_elf(p).unwrap_or(false) {
            return Ok(p.to_path_buf());
        }
    }
    Err(ControlError::Files {
        what: "the base template".into(),
        source: std::io::Error::other(
            "no static busybox found; install it with `apt-get install busybox-static`",
        ),
    })
}

fn build_busybox_rootfs(dir: &Path, rootfs: &Path) -> Result<(), ControlError> {
    let busybox = find_busybox()?;
    let tmp = dir.join(format!(".tmp-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "proc", "sys", "dev", "tmp",
        "var/tmp", "run",
    ] {
        std::fs::create_dir_all(tmp.join(d))
            .map_err(ControlError::files("creating the base rootfs"))?;
    }
    for d in ["tmp", "var/tmp"] {
        std::fs::set_permissions(tmp.join(d), std::fs::Permissions::from_mode(0o1777))
            .map_err(ControlError::files("setting /tmp permissions"))?;
    }
    std::fs::copy(&busybox, tmp.join("bin/busybox"))
        .map_err(ControlError::files("copying busybox"))?;
    let list = std::process::Command::new(&busybox)
        .arg("--list")
        .output()
        .map_err(ControlError::files("listing busybox applets"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        // `busybox --list` names busybox itself; linking it would replace the binary.
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", tmp.join("bin").join(applet))
            .map_err(ControlError::files(format!("linking applet {applet}")))?;
    }
    // The E2B SDKs run `/bin/bash -l -c` as `user` (or `root`): Debian's static bash, when
    // the host has it (scripts/install-deps installs `bash-static`).
    let bash = find_bash();
    match &bash {
        Some(b) => {
            std::fs::copy(b, tmp.join("bin/bash")).map_err(ControlError::files("copying bash"))?;
        }
        None => tracing::warn!(
            "no static bash found (apt-get install bash-static): the base template has no /bin/bash"
        ),
    }
    let user_shell = if bash.is_some() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let home = tmp.join("home").join(E2B_USER);
    std::fs::create_dir_all(&home).map_err(ControlError::files("creating /home/user"))?;
    match std::os::unix::fs::chown(&home, Some(E2B_UID), Some(E2B_UID)) {
        Ok(()) => {}
        // Only a server without root (the fake-runtime unit tests) cannot give it away.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!("not root: /home/user of the base template stays the server's")
        }
        Err(e) => {
            return Err(ControlError::Files {
                what: "giving /home/user to user".into(),
                source: e,
            });
        }
    }
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))
        .map_err(ControlError::files("setting /home/user permissions"))?;
    let passwd = format!(
        "root:x:0:0:root:/root:/bin/sh\n\
         {E2B_USER}:x:{E2B_UID}:{E2B_UID}:{E2B_USER}:/home/{E2B_USER}:{user_shell}\n\
         nobody:x:65534:65534:nobody:/:/bin/false\n"
    );
    let group = format!("root:x:0:\n{E2B_USER}:x:{E2B_UID}:\nnogroup:x:65534:\n");
    let files = [
        ("etc/passwd", passwd.as_str()),
        ("etc/group", group.as_str()),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/hostname", "sandbox\n"),
        ("etc/resolv.conf", ""),
    ];
    for (path, text) in files {
        std::fs::write(tmp.join(path), text)
            .map_err(ControlError::files(format!("writing {path}")))?;
    }
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs)
            .map_err(ControlError::files("replacing an incomplete base rootfs"))?;
    }
    std::fs::rename(&tmp, rootfs).map_err(ControlError::files("publishing the base rootfs"))?;
    Ok(())
}

/// Where a template's boot snapshot lives: its writable layer (`files/upper`) and memory
/// image (`memory/`) right after its agent answered (and its start command was ready).
/// Keyed by the template's id, never its name: names are unique only within a workspace, and
/// a snapshot holds what the template's start command made (memory and files), which only
/// its own workspace may see. Keyed by the agent layer too, so a new agent gets a new
/// snapshot instead of restoring an old agent's memory.
pub fn boot_snapshot_dir(node: &Node, template_id: &str) -> PathBuf {
    let agent = node
        .agent_layer
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    node.cfg
        .data_dir
        .join("templates")
        .join(template_id)
        .join(format!("boot-snapshot-{agent}"))
}

/// The template's boot snapshot, if it has been taken.
pub fn boot_snapshot(node: &Node, template_id: &str) -> Option<PathBuf> {
    let dir = boot_snapshot_dir(node, template_id);
    node.runtime.has_image(&dir.join("memory")).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_static_and_dynamic_binaries() {
        // /bin/sh on Debian is dynamically linked.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("x");
        std::fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&not_elf).unwrap());
    }
}
