//! The `/v1/sandboxes` API (seed 003) and its extensions (streaming exec, file listing).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Longest lifetime of an ephemeral sandbox, and the longest keepalive.
pub const MAX_EPHEMERAL_TIMEOUT_SECS: u64 = 24 * 3600;
/// Longest exec timeout.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 300;
/// Exec timeout when the request names none.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SandboxMode {
    /// Destroyed when its `timeout` passes.
    #[default]
    Ephemeral,
    /// Suspended (memory saved to disk) after `idle_timeout`; files survive restarts.
    Persistent,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Ephemeral => "ephemeral",
            SandboxMode::Persistent => "persistent",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    Creating,
    Running,
    /// Memory and processes saved to disk, no RAM held. Wakes on `wake` or any call that
    /// needs it running.
    Suspended,
    Destroyed,
    /// Could not be started or recovered; `error` says why.
    Failed,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Running => "running",
            SandboxStatus::Suspended => "suspended",
            SandboxStatus::Destroyed => "destroyed",
            SandboxStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => SandboxStatus::Creating,
            "running" => SandboxStatus::Running,
            "suspended" => SandboxStatus::Suspended,
            "destroyed" => SandboxStatus::Destroyed,
            "failed" => SandboxStatus::Failed,
            _ => return None,
        })
    }
}

/// Outbound firewall policy (seed 003 "Egress controls").
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// `allow_all` or `deny_all`.
    #[schema(pattern = "^(allow_all|deny_all)$")]
    pub mode: String,
    /// CIDRs to allow when mode is `deny_all`. Never opens the always-denied set (the sandbox
    /// pool, the host's addresses, loopback, link-local with the metadata address, multicast,
    /// broadcast): an entry entirely inside it is refused (400 `invalid_egress_policy`), a wider
    /// one (`0.0.0.0/0`, `10.0.0.0/8`) is accepted and that part is cut out of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    /// CIDRs to block, evaluated before the allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_cidrs: Vec<String>,
    /// Restrict `allow_cidrs` to these destination TCP ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ports: Vec<u32>,
    /// With `deny_all`: domain names (`example.com`) and wildcards (`*.example.com`, the
    /// names below it) whose web traffic (TCP 80 and 443) and DNS queries pass. Checked on
    /// each connection by its TLS SNI or HTTP `Host`, and connected to the address the
    /// server resolves, so DNS answers cannot be used to reach other hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<String>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            mode: "allow_all".into(),
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            allow_ports: Vec::new(),
            allow_domains: Vec::new(),
        }
    }
}

/// Most entries in `allow_domains`.
pub const MAX_ALLOW_DOMAINS: usize = 256;

/// A normalized `allow_domains` entry: lowercase, no trailing dot; `*.` only as a whole
/// first label, and not over a top-level domain.
pub fn normalize_domain_pattern(text: &str) -> Result<String, String> {
    let bad = || format!("{text:?} is not a domain name or a *.<domain> wildcard");
    let (wild, rest) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !labels_ok {
        return Err(bad());
    }
    if wild && !name.contains('.') {
        return Err(format!("{text:?} would match a whole top-level domain"));
    }
    Ok(if wild { format!("*.{name}") } else { name })
}

/// An IPv4 network in CIDR notation, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// Parse `a.b.c.d/n` (or a bare address, meaning `/32`). Host bits must be zero.
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, l),
        None => (text, "32"),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv4 CIDR (IPv6 is not supported yet)"))?;
    let prefix_len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?;
    let mask = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - prefix_len)
    };
    if u32::from(addr) & !mask != 0 {
        return Err(format!("{text:?} has host bits set"));
    }
    Ok(Cidr { addr, prefix_len })
}

/// The fixed part of the set of destinations no sandbox ever reaches, whatever its policy
/// says (`sandpit_net::dial::ALWAYS_DENIED_V4` enforces the same ranges; a test there keeps
/// the lists equal). The sandbox pool and the host's own addresses belong to the set too.
pub const ALWAYS_DENIED: [(Cidr, &str); 5] = [
    (cidr(0, 0, 0, 0, 8), "unspecified addresses (0.0.0.0/8)"),
    (cidr(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (
        cidr(169, 254, 0, 0, 16),
        "link-local addresses with the metadata service (169.254.0.0/16)",
    ),
    (cidr(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (
        cidr(240, 0, 0, 0, 4),
        "reserved and broadcast addresses (240.0.0.0/4)",
    ),
];

const fn cidr(a: u8, b: u8, c: u8, d: u8, prefix_len: u8) -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(a, b, c, d),
        prefix_len,
    }
}

impl Cidr {
    fn bits(&self) -> (u32, u32) {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        };
        (u32::from(self.addr) & mask, mask)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        let (net, mask) = self.bits();
        other.prefix_len >= self.prefix_len && u32::from(other.addr) & mask == net
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Whether `net` lies entirely inside the union of `ranges` (halving it where a range covers
/// part of it).
fn covered_by(net: Cidr, ranges: &[Cidr]) -> bool {
    if ranges.iter().any(|r| r.contains(&net)) {
        return true;
    }
    if net.prefix_len == 32 || !ranges.iter().any(|r| r.overlaps(&net)) {
        return false;
    }
    let len = net.prefix_len + 1;
    let high = Ipv4Addr::from(u32::from(net.addr) | (1u32 << (32 - u32::from(len))));
    covered_by(
        Cidr {
            addr: net.addr,
            prefix_len: len,
        },
        ranges,
    ) && covered_by(
        Cidr {
            addr: high,
            prefix_len: len,
        },
        ranges,
    )
}

/// The egress policy, validated and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEgress {
    pub allow_all: bool,
    pub allow_cidrs: Vec<Cidr>,
    pub deny_cidrs: Vec<Cidr>,
    pub allow_ports: Vec<u16>,
    /// Normalized (see [`normalize_domain_pattern`]), deduplicated.
    pub allow_domains: Vec<String>,
}

/// Why a policy was refused: a stable code and a message.
pub type Invalid = (&'static str, String);

impl EgressPolicy {
    /// Check the policy. Codes: `invalid_egress_mode`, `invalid_cidr`, `invalid_port`,
    /// `invalid_domain`, `invalid_egress_policy` (a list that means nothing in this mode, or
    /// an `allow_cidrs` entry entirely inside the always-denied set: see [`ALWAYS_DENIED`]).
    pub fn validate(&self) -> Result<ValidEgress, Invalid> {
        self.validate_within(None)
    }

    /// [`EgressPolicy::validate`], with the server's sandbox pool counted in the always-denied
    /// set.
    pub fn validate_within(&self, pool: Option<Cidr>) -> Result<ValidEgress, Invalid> {
        let valid = self.validate_stored()?;
        let mut denied: Vec<(Cidr, String)> = ALWAYS_DENIED
            .iter()
            .map(|(c, what)| (*c, what.to_string()))
            .collect();
        if let Some(pool) = pool {
            denied.push((pool, format!("the sandbox pool ({pool})")));
        }
        let ranges: Vec<Cidr> = denied.iter().map(|(c, _)| *c).collect();
        for (entry, text) in valid.allow_cidrs.iter().zip(&self.allow_cidrs) {
            if covered_by(*entry, &ranges) {
                let names: Vec<&str> = denied
                    .iter()
                    .filter(|(c, _)| c.overlaps(entry))
                    .map(|(_, what)| what.as_str())
                    .collect();
                return Err((
                    "invalid_egress_policy",
                    format!(
                        "allow_cidrs entry {text:?} lies inside {}, which sandboxes never reach",
                        names.join(" and ")
                    ),
                ));
            }
        }
        Ok(valid)
    }

    /// The checks of [`EgressPolicy::validate`] but the always-denied one: for policies read
    /// back from the store, so that one stored before that rule keeps working (nftables and
    /// the server's dialer cut those entries out anyway).
    pub fn validate_stored(&self) -> Result<ValidEgress, Invalid> {
        let allow_all = match self.mode.as_str() {
            "allow_all" => true,
            "deny_all" => false,
            other => {
                return Err((
                    "invalid_egress_mode",
                    format!("egress mode must be allow_all or deny_all, not {other:?}"),
                ));
            }
        };
        let parse_all = |list: &[String]| -> Result<Vec<Cidr>, Invalid> {
            list.iter()
                .map(|c| parse_cidr(c).map_err(|m| ("invalid_cidr", m)))
                .collect()
        };
        let allow_cidrs = parse_all(&self.allow_cidrs)?;
        let deny_cidrs = parse_all(&self.deny_cidrs)?;
        let mut allow_ports = Vec::with_capacity(self.allow_ports.len());
        for &p in &self.allow_ports {
            if p == 0 || p > 65535 {
                return Err(("invalid_port", format!("port {p} is out of range 1-65535")));
            }
            allow_ports.push(p as u16);
        }
        if allow_all && !allow_cidrs.is_empty() {
            return Err((
                "invalid_egress_policy",
                "allow_cidrs means nothing with mode allow_all (everything is allowed)".into(),
            ));
        }
        if allow_all && !allow_ports.is_empty() {
            return Err((
                "invalid_egress_policy",
                "allow_ports means nothing with mode allow_all".into(),
            ));
        }
        if self.allow_domains.len() > MAX_ALLOW_DOMAINS {
            return Err((
                "invalid_domain",
                format!("at most {MAX_ALLOW_DOMAINS} entries in allow_domains"),
            ));
        }
        let mut allow_domains = Vec::with_capacity(self.allow_domains.len());
        for d in &self.allow_domains {
            let d = normalize_domain_pattern(d).map_err(|m| ("invalid_domain", m))?;
            if !allow_domains.contains(&d) {
                allow_domains.push(d);
            }
        }
        if allow_all && !allow_domains.is_empty() {
            return Err((
                "invalid_egress_policy",
                "allow_domains means nothing with mode allow_all (everything is allowed)".into(),
            ));
        }
        if !allow_ports.is_empty() && allow_cidrs.is_empty() {
            return Err((
                "invalid_egress_policy",
                "allow_ports restricts allow_cidrs, which is empty".into(),
            ));
        }
        Ok(ValidEgress {
            allow_all,
            allow_cidrs,
            deny_cidrs,
            allow_ports,
            allow_domains,
        })
    }
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Template name or id to boot from. Required unless `snapshot` is given.
    #[serde(default)]
    pub template: String,
    /// Start from a named snapshot (its files and memory) instead of a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub mode: SandboxMode,
    /// Until auto-destroy (ephemeral only), e.g. `10m`. Max 24h, default 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^\s*([0-9]+(ms|s|m|h|d))+\s*$")]
    pub timeout: Option<String>,
    /// Inactivity before auto-suspend (persistent only), e.g. `30m`. Default 30m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^\s*([0-9]+(ms|s|m|h|d))+\s*$")]
    pub idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// If omitted, the template's default policy (itself `allow_all` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressPolicy>,
    /// `small` (default), `medium` or `large`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(small|medium|large)$")]
    pub size: Option<String>,
    /// Preview settings; omitted: private previews (preview tokens needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<crate::PreviewSettings>,
    /// Volumes to mount (at most 8; see `POST /v1/volumes`). Not with `snapshot`, which
    /// mounts the volumes its sandbox had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::VolumeMountRequest>,
    /// Workspace secrets the sandbox may use (at most 16; see `POST /v1/secrets`): each
    /// gives it a placeholder in `SANDPIT_SECRET_<NAME>`, which the server's proxy replaces
    /// by the value in HTTPS requests to the secret's hosts. Not with `snapshot`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// A sandbox as every `/v1/sandboxes` response shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub status: SandboxStatus,
    pub template: String,
    pub mode: SandboxMode,
    pub size: String,
    pub created_at: String,
    /// When an ephemeral sandbox will be destroyed.
    pub expires_at: Option<String>,
    /// Persistent sandboxes: inactivity before suspend.
    pub idle_timeout: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Names of the environment variables set at create (values are not echoed back).
    pub env_keys: Vec<String>,
    pub egress: EgressPolicy,
    /// Who may open `http://<id>-<port>.<preview domain>`.
    #[serde(default)]
    pub preview: crate::PreviewSettings,
    /// Why the sandbox failed, when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A suspended sandbox's image in object storage, when the server has one configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SandboxImage>,
}

/// Where a suspended sandbox's image is: with `remote` `stored`, it can wake on another
/// node (when its own is lost or draining); otherwise only on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxImage {
    /// `uploading`, `stored`, `failed` or `unsupported` (files that cannot move: the
    /// server runs without disk limits).
    pub remote: String,
    /// The runtime build that wrote the memory image; another build wakes the sandbox from
    /// its files only.
    pub runtime: String,
    /// Whether the image holds the sandbox's memory (running processes), not only files.
    pub memory: bool,
    /// With `stored`: the image's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// With `failed` or `unsupported`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// creating, running, suspended, destroyed or failed. Without it, every sandbox that is
    /// not destroyed.
    #[param(value_type = Option<SandboxStatus>)]
    pub status: Option<String>,
}

/// `POST /v1/sandboxes/{id}/keepalive`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveRequest {
    /// New timeout from now, max 24h.
    #[schema(pattern = r"^\s*([0-9]+(ms|s|m|h|d))+\s*$")]
    pub timeout: String,
}

/// `POST /v1/sandboxes/{id}/exec` and `/exec/stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// A shell command line (`/bin/sh -c`). Exactly one of `command` and `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A program and its arguments, run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Max 5m, default 60s. The whole process group is killed when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^\s*([0-9]+(ms|s|m|h|d))+\s*$")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Run as this user: `name`, `uid`, `name:group` or `uid:gid` (as Docker's `--user`),
    /// looked up in the sandbox's `/etc/passwd` and `/etc/group`. Default: the template's
    /// `USER`, else root. A malformed spec is 400 `invalid_user`; one the sandbox does not
    /// know is 400 `user_not_found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 64,
        pattern = r"^[A-Za-z0-9._][A-Za-z0-9._-]*(:[A-Za-z0-9._][A-Za-z0-9._-]*)?$"
    )]
    pub user: Option<String>,
}

/// The result of a finished command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    /// True when the command was killed because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// One event of `POST /v1/sandboxes/{id}/exec/stream` (Server-Sent Events; the SSE event name
/// equals `type`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    /// `data` is base64 of the raw bytes; `seq` counts output events from 1.
    Stdout {
        seq: u64,
        data: String,
    },
    Stderr {
        seq: u64,
        data: String,
    },
    Exit {
        exit_code: i32,
        duration_ms: u64,
        timed_out: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Absolute path inside the sandbox (no `..`, at most 4096 bytes).
    #[param(pattern = "^/", max_length = 4096)]
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    /// RFC 3339.
    pub modified_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

/// Query of `GET /v1/sandboxes/{id}/watch`.
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Absolute path of a directory or a file inside the sandbox (no `..`, at most 4096
    /// bytes).
    #[param(pattern = "^/", max_length = 4096)]
    pub path: String,
    /// Follow the whole tree under the directory, including directories created later
    /// (default false: its direct entries only).
    #[serde(default)]
    pub recursive: Option<bool>,
    /// Glob patterns, relative to `path`, to leave out; repeat the parameter for several (at
    /// most 64, each at most 256 bytes). A pattern without `/` matches any path component
    /// (`node_modules`, `*.log`); one with `/` matches the relative path, `**` standing for
    /// any number of components (`**/dist/**`). Everything under an excluded directory is
    /// excluded.
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
}

/// One event of `GET /v1/sandboxes/{id}/watch` (Server-Sent Events; the SSE event name
/// equals `type`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct FileEvent {
    /// `add` (created or moved in), `change` (contents or metadata), `remove` (deleted or
    /// moved out), `overflow` (events were dropped because the client did not keep up: list
    /// the tree again; `path` is the watched path) or `limit` (the tree has more than 4096
    /// directories: changes under `path` are not seen). A rename is a `remove` and an `add`.
    /// The last event of a stream is `end`, with `reason` and the watched `path`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Whether the path is (or was) a directory.
    pub dir: bool,
    /// Only on `end`: `gone` (the watched path was removed or moved), `suspended` (the
    /// sandbox is being suspended, forked or destroyed: reconnect, which wakes it, and list
    /// the tree again) or `agent_gone` (the connection to the sandbox broke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A TCP port listening inside a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    /// The address it is bound to: `0.0.0.0` or `::` (every address: reachable through
    /// previews), `127.0.0.1` or `::1` (loopback only: not reachable from outside).
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PortList {
    /// Sorted by port. The agent's own port is not listed.
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct PortWaitQuery {
    /// How long to wait, e.g. `30s` (default), at most 5m.
    #[param(pattern = r"^\s*([0-9]+(ms|s|m|h|d))+\s*$")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Template {
    pub id: String,
    pub name: String,
    /// This version's number within its name, from 1. `name:N` names it; building the name
    /// again adds version N+1. Numbers are never reused.
    #[serde(default = "crate::templates::first_version")]
    #[schema(minimum = 1)]
    pub version: u32,
    /// Whether the plain name means this version now (its highest ready one).
    #[serde(default)]
    pub latest: bool,
    pub description: String,
    pub created_at: String,
    pub default_egress: EgressPolicy,
    /// Sandboxes of this template booted and waiting in the warm pool.
    #[serde(default)]
    pub warm: u32,
    /// Whether a boot snapshot is ready (creates restore it instead of booting).
    #[serde(default)]
    pub boot_snapshot: bool,
    /// `building`, `ready` (sandboxes can start from it) or `failed`.
    #[serde(default = "crate::templates::ready")]
    pub status: String,
    /// Why the build failed (the failed step and its output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `builtin`, `image:<reference>` or `dockerfile`.
    #[serde(default)]
    pub source: String,
    /// The command every new sandbox starts with (ENTRYPOINT + CMD), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_command: Option<Vec<String>>,
    /// How many read-only layers the template stacks.
    #[serde(default)]
    pub layers: u32,
    /// `namespace@alias` names that point at this template.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many children, 1–100 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub count: Option<u32>,
}

/// One child of a fork: the sandbox, or why it could not be made.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum ForkResult {
    Ok(Box<Sandbox>),
    Err(ErrorBodyRef),
}

/// `{"error":{"code","message"}}` inside a fork result.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ErrorBodyRef {
    pub error: crate::ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    pub sandboxes: Vec<ForkResult>,
}

/// A named snapshot: a sandbox's files and memory, to start new sandboxes from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Snapshot {
    pub id: String,
    /// The sandbox it was taken from.
    pub sandbox_id: String,
    pub template: String,
    pub created_at: String,
    /// Disk used by the snapshot's files and memory image.
    pub size_bytes: u64,
    /// Where the snapshot is in object storage, when the server has one (`--object-store`):
    /// once `remote` is `stored`, sandboxes can be created from it on any node (a node
    /// without its files fetches them first); otherwise only on the node that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SandboxImage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<Template>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str, allow: &[&str], deny: &[&str], ports: &[u32]) -> EgressPolicy {
        EgressPolicy {
            mode: mode.into(),
            allow_cidrs: allow.iter().map(|s| s.to_string()).collect(),
            deny_cidrs: deny.iter().map(|s| s.to_string()).collect(),
            allow_ports: ports.to_vec(),
            allow_domains: Vec::new(),
        }
    }

    #[test]
    fn allow_domains_validation() {
        let with = |mode: &str, domains: &[&str]| EgressPolicy {
            allow_domains: domains.iter().map(|s| s.to_string()).collect(),
            ..policy(mode, &[], &[], &[])
        };
        let v = with("deny_all", &["Example.COM.", "*.github.com", "example.com"])
            .validate()
            .unwrap();
        assert_eq!(v.allow_domains, vec!["example.com", "*.github.com"]);
        for bad in [
            "",
            "*",
            "*.com",
            "a..b",
            "-a.com",
            "a b.com",
            "*.*.a.com",
            "a.com/x",
            "10.0.0.1/8",
        ] {
            assert_eq!(
                with("deny_all", &[bad]).validate().unwrap_err().0,
                "invalid_domain",
                "{bad:?}"
            );
        }
        assert_eq!(
            with("allow_all", &["example.com"])
                .validate()
                .unwrap_err()
                .0,
            "invalid_egress_policy"
        );
        let many: Vec<String> = (0..=MAX_ALLOW_DOMAINS)
            .map(|i| format!("d{i}.test"))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            with("deny_all", &refs).validate().unwrap_err().0,
            "invalid_domain"
        );
    }

    #[test]
    fn egress_validation_codes() {
        let code = |p: EgressPolicy| p.validate().unwrap_err().0;
        assert_eq!(code(policy("open", &[], &[], &[])), "invalid_egress_mode");
        assert_eq!(
            code(policy("deny_all", &["10.0.0.0/33"], &[], &[])),
            "invalid_cidr"
        );
        assert_eq!(
            code(policy("deny_all", &["10.0.0.1/8"], &[], &[])),
            "invalid_cidr"
        );
        assert_eq!(
            code(policy("deny_all", &["nope"], &[], &[])),
            "invalid_cidr"
        );
        assert_eq!(
            code(policy("deny_all", &["10.0.0.0/8"], &[], &[0])),
            "invalid_port"
        );
        assert_eq!(
            code(policy("deny_all", &["10.0.0.0/8"], &[], &[70000])),
            "invalid_port"
        );
        assert_eq!(
            code(policy("deny_all", &[], &[], &[443])),
            "invalid_egress_policy"
        );
        assert_eq!(
            code(policy("allow_all", &["10.0.0.0/8"], &[], &[])),
            "invalid_egress_policy"
        );
    }

    #[test]
    fn egress_validation_accepts_and_parses() {
        let v = policy(
            "deny_all",
            &["10.1.0.0/16", "1.2.3.4"],
            &["10.1.2.0/24"],
            &[443],
        )
        .validate()
        .unwrap();
        assert!(!v.allow_all);
        assert_eq!(v.allow_cidrs[1].prefix_len, 32);
        assert_eq!(v.allow_ports, vec![443]);
        assert!(
            policy("allow_all", &[], &["0.0.0.0/0"], &[])
                .validate()
                .unwrap()
                .allow_all
        );
    }

    /// Entries entirely inside the always-denied set are refused and named; wider ones pass
    /// (nftables and the dialer cut the denied part out); deny_cidrs may name anything.
    #[test]
    fn allow_cidrs_inside_the_always_denied_set() {
        let pool = parse_cidr("10.88.0.0/16").unwrap();
        let check =
            |allow: &[&str]| policy("deny_all", allow, &[], &[]).validate_within(Some(pool));
        for (entry, named) in [
            ("127.0.0.1", "loopback"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.169.254/32", "metadata"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/4", "multicast"),
            ("239.1.2.3", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0/8", "unspecified"),
            ("0.0.0.0", "unspecified"),
            ("10.88.0.0/16", "sandbox pool (10.88.0.0/16)"),
            ("10.88.4.0/30", "sandbox pool"),
            ("224.0.0.0/3", "multicast (224.0.0.0/4) and reserved"),
        ] {
            let (code, message) = check(&["1.2.3.4", entry]).unwrap_err();
            assert_eq!(code, "invalid_egress_policy", "{entry}");
            assert!(message.contains(named), "{entry}: {message}");
            assert!(message.contains(entry), "{entry}: {message}");
        }
        for wide in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.88.0.0/15",
            "126.0.0.0/7",
            "169.254.0.0/15",
            "192.168.0.0/16",
            "128.0.0.0/1",
        ] {
            assert!(check(&[wide]).is_ok(), "{wide}");
        }
        // Without the pool only the fixed ranges count; stored policies are not checked.
        assert!(
            policy("deny_all", &["10.88.0.0/16"], &[], &[])
                .validate()
                .is_ok()
        );
        assert_eq!(
            policy("deny_all", &["127.0.0.1"], &[], &[])
                .validate()
                .unwrap_err()
                .0,
            "invalid_egress_policy"
        );
        assert!(
            policy("deny_all", &["127.0.0.1"], &[], &[])
                .validate_stored()
                .is_ok()
        );
        assert!(
            policy("allow_all", &[], &["169.254.169.254", "10.88.0.0/16"], &[])
                .validate_within(Some(pool))
                .is_ok()
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(
            serde_json::from_str::<CreateSandboxRequest>(r#"{"template":"base","bogus":1}"#)
                .is_err()
        );
        let r: CreateSandboxRequest = serde_json::from_str(r#"{"template":"base"}"#).unwrap();
        assert_eq!(r.mode, SandboxMode::Ephemeral);
    }

    proptest::proptest! {
        /// Validation never panics, and what it accepts re-validates to the same rules.
        #[test]
        fn egress_validation_is_total(
            mode in "(allow_all|deny_all|[a-z_]{0,9})",
            allow in proptest::collection::vec("([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?", 0..3),
            deny in proptest::collection::vec("([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?|[a-z:/]{0,6}", 0..3),
            ports in proptest::collection::vec(0u32..70000, 0..3),
        ) {
            let p = EgressPolicy { mode, allow_cidrs: allow, deny_cidrs: deny, allow_ports: ports, allow_domains: Vec::new() };
            if let Ok(v) = p.validate() {
                proptest::prop_assert_eq!(p.validate().unwrap(), v.clone());
                proptest::prop_assert_eq!(p.validate_stored().unwrap(), v.clone());
                proptest::prop_assert!(v.allow_ports.iter().all(|&p| p > 0));
                proptest::prop_assert!(v.allow_cidrs.iter().chain(&v.deny_cidrs).all(|c| c.prefix_len <= 32));
            }
        }

        /// An accepted `allow_cidrs` entry always has an address outside the always-denied
        /// set; a refused one has none.
        #[test]
        fn accepted_entries_reach_something(a in proptest::num::u32::ANY, len in 0u8..=32, probe in proptest::num::u32::ANY) {
            let pool = parse_cidr("10.88.0.0/16").unwrap();
            let entry = Cidr { addr: Ipv4Addr::from(a), prefix_len: len };
            let (net, mask) = entry.bits();
            let entry = Cidr { addr: Ipv4Addr::from(net), prefix_len: len };
            let text = entry.to_string();
            let accepted = policy("deny_all", &[&text], &[], &[]).validate_within(Some(pool)).is_ok();
            let denied = |ip: u32| {
                let one = Cidr { addr: Ipv4Addr::from(ip), prefix_len: 32 };
                ALWAYS_DENIED.iter().any(|(c, _)| c.contains(&one)) || pool.contains(&one)
            };
            // A random address of the entry: outside the set means the entry is accepted.
            let inside = net | (probe & !mask);
            if !denied(inside) {
                proptest::prop_assert!(accepted, "{} refused though {} is reachable", text, Ipv4Addr::from(inside));
            } else if !accepted {
                proptest::prop_assert!(denied(inside));
            }
            if !accepted {
                proptest::prop_assert!(denied(net) && denied(net | !mask), "{} refused", text);
            }
            // Single addresses and whole covered blocks: refused exactly when denied.
            if len == 32 {
                proptest::prop_assert_eq!(accepted, !denied(net));
            }
        }

        #[test]
        fn durations_parse_totally(text in "[0-9a-z]{0,10}") {
            if let Ok(d) = crate::parse_duration(&text) {
                proptest::prop_assert_eq!(crate::parse_duration(&crate::format_duration(d)).unwrap(), d);
            }
        }
    }
}
