//! Dockerfile builds: each instruction is a step whose result (the image's layers and
//! config after it) is cached under a key hashed from the parent step's key, the
//! instruction with its variables substituted, the build arguments and, for `COPY`/`ADD`,
//! the content of the context files it reads. A rebuild therefore re-runs only the first
//! changed step and those after it. `RUN` steps go through a [`StepRunner`] (the server
//! boots a gVisor sandbox over the layers so far); `COPY`/`ADD` layers are written here.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::ImageError;
use crate::config::{ImageConfig, ReadyCheck, shell_join};
use crate::dockerfile::{self, Command, Instruction, Kind, substitute};
use crate::ignore::{IgnoreRules, component_matches};
use crate::registry::{PullOptions, pull};
use crate::store::{CacheEntry, CacheKey, LayerId, LayerStore};
use crate::unpack::{UnpackLimits, Whiteouts, decompress, unpack_into};
use sandpit_fs::{InTheWay, Kind as EntryKind, Meta, TreeDir};

/// What a build reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// A step starts (`index` counts from 1).
    Step {
        index: usize,
        total: usize,
        line: usize,
        instruction: String,
    },
    /// Output of the running step (RUN output, pull progress), a line or a chunk.
    Log { index: usize, text: String },
    /// A step ended; `cached` when its result came from the cache.
    StepDone {
        index: usize,
        cached: bool,
        elapsed_ms: u64,
    },
}

/// One step as it went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    pub index: usize,
    pub line: usize,
    pub instruction: String,
    pub cached: bool,
    pub elapsed_ms: u64,
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// Layer directories, lowest first.
    pub layers: Vec<PathBuf>,
    pub config: ImageConfig,
    pub steps: Vec<StepReport>,
}

/// A `RUN` step to execute: `argv` over `layers` (lowest first), writing the files it
/// changes, in overlayfs format, into the directory `out` (which does not exist yet).
#[derive(Debug, Clone)]
pub struct RunStep {
    pub layers: Vec<PathBuf>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub out: PathBuf,
}

/// What a build needs from its host: templates to build `FROM`, and a place to run
/// commands.
#[async_trait]
pub trait StepRunner: Send + Sync {
    /// The layers and config of the template `name`, if the builder's owner has one.
    async fn template(&self, name: &str)
    -> Result<Option<(Vec<PathBuf>, ImageConfig)>, ImageError>;

    /// Run a `RUN` step; returns its exit code. Output goes to `log` as it arrives.
    async fn run(
        &self,
        step: RunStep,
        log: &(dyn Fn(String) + Send + Sync),
    ) -> Result<i32, ImageError>;
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// The build context (files `COPY` and `ADD` read).
    pub context: PathBuf,
    pub dockerfile: String,
    pub build_args: BTreeMap<String, String>,
    pub pull: PullOptions,
}

pub struct Builder {
    pub store: LayerStore,
    pub runner: Arc<dyn StepRunner>,
}

/// Largest output of a failed RUN step kept for its error.
const FAILED_OUTPUT_TAIL: usize = 16 * 1024;

struct State {
    key: CacheKey,
    layers: Vec<PathBuf>,
    config: ImageConfig,
    args: BTreeMap<String, Option<String>>,
}

impl State {
    fn lookup(&self, name: &str) -> Option<String> {
        self.config
            .get_env(name)
            .map(String::from)
            .or_else(|| self.args.get(name).cloned().flatten())
    }

    fn subst(&self, s: &str) -> String {
        substitute(s, &|n| self.lookup(n))
    }

    fn args_fingerprint(&self) -> String {
        serde_json::to_string(&self.args).expect("map serializes")
    }
}

impl Builder {
    /// Build `req`, reporting through `events`.
    pub async fn build(
        &self,
        req: &BuildRequest,
        events: &(dyn Fn(BuildEvent) + Send + Sync),
    ) -> Result<BuildOutcome, ImageError> {
        let instructions = dockerfile::parse(&req.dockerfile)?;
        let ignore = TreeDir::open(&req.context)
            .map_err(|e| e.to_string())
            .and_then(|ctx| IgnoreRules::load(&ctx))
            .map_err(|message| ImageError::Step {
                step: 0,
                line: 0,
                instruction: "(build context)".into(),
                message,
            })?;
        let total = instructions.len();
        let mut state = State {
            key: CacheKey::root("empty"),
            layers: Vec::new(),
            config: ImageConfig::default(),
            args: BTreeMap::new(),
        };
        let mut steps = Vec::new();
        for (i, ins) in instructions.iter().enumerate() {
            let index = i + 1;
            events(BuildEvent::Step {
                index,
                total,
                line: ins.line,
                instruction: ins.text.clone(),
            });
            let started = Instant::now();
            let cached = self
                .step(req, &ignore, &mut state, index, ins, events)
                .await?;
            let elapsed_ms = started.elapsed().as_millis() as u64;
            events(BuildEvent::StepDone {
                index,
                cached,
                elapsed_ms,
            });
            steps.push(StepReport {
                index,
                line: ins.line,
                instruction: ins.text.clone(),
                cached,
                elapsed_ms,
            });
        }
        Ok(BuildOutcome {
            layers: state.layers,
            config: state.config,
            steps,
        })
    }

    /// Run one step; returns whether it was a cache hit.
    async fn step(
        &self,
        req: &BuildRequest,
        ignore: &IgnoreRules,
        st: &mut State,
        index: usize,
        ins: &Instruction,
        events: &(dyn Fn(BuildEvent) + Send + Sync),
    ) -> Result<bool, ImageError> {
        let step_err = |message: String| ImageError::Step {
            step: index,
            line: ins.line,
            instruction: ins.text.clone(),
            message,
        };
        let log = |text: String| events(BuildEvent::Log { index, text });
        match &ins.kind {
            Kind::Arg { name, default } => {
                let value = req
                    .build_args
                    .get(name)
                    .cloned()
                    .or_else(|| default.as_ref().map(|d| st.subst(d)));
                st.args.insert(name.clone(), value);
                let key = st.key.child(&["ARG", name, &st.args_fingerprint()]);
                self.metadata(st, key)
            }
            Kind::From { image } => {
                let image = st.subst(image);
                if image == "scratch" {
                    st.key = CacheKey::root("scratch");
                    st.layers.clear();
                    st.config = ImageConfig::default();
                    return Ok(false);
                }
                if let Some((layers, config)) = self.runner.template(&image).await? {
                    let fingerprint =
                        serde_json::to_string(&(&layers, &config)).expect("serializes");
                    log(format!("FROM template {image}"));
                    st.key = CacheKey::root(&format!("template:{fingerprint}"));
                    st.layers = layers;
                    st.config = config;
                    return Ok(true);
                }
                let pulled = pull(&self.store, &image, &req.pull, &log)
                    .await
                    .map_err(|e| step_err(e.to_string()))?;
                log(format!("FROM {image} ({})", pulled.digest));
                st.key = CacheKey::root(&format!("image:{}", pulled.digest));
                let cached = pulled.downloaded_bytes == 0;
                st.layers = pulled
                    .layers
                    .iter()
                    .map(|l| self.store.layer_path(l))
                    .collect();
                st.config = pulled.config;
                Ok(cached)
            }
            Kind::Env(pairs) => {
                for (k, v) in pairs {
                    let v = st.subst(v);
                    st.config.set_env(k, &v);
                }
                let key = st.key.child(&[
                    "ENV",
                    &serde_json::to_string(&st.config.env).expect("serializes"),
                ]);
                self.metadata(st, key)
            }
            Kind::Workdir(dir) => {
                let dir = absolute(st.config.workdir.as_deref().unwrap_or("/"), &st.subst(dir));
                st.config.workdir = Some(dir.clone());
                let key = st.key.child(&["WORKDIR", &dir]);
                if let Some(hit) = self.store.cached(&key) {
                    return self.apply(st, key, hit, true);
                }
                // Looked up beneath each layer without following symlinks: a layer's
                // symlink on the way counts as "not there" (the new layer makes the dir).
                let rel = Path::new(dir.trim_start_matches('/'));
                let exists = st
                    .layers
                    .iter()
                    .any(|l| TreeDir::open(l).is_ok_and(|t| t.lstat(rel).ok().flatten().is_some()));
                if !exists {
                    let tmp = self.store.temp_path("workdir");
                    let made = TreeDir::create(&tmp)
                        .and_then(|t| t.make_dirs(rel, 0o755, InTheWay::Replace))
                        .map_err(|e| ImageError::Tree {
                            what: "creating WORKDIR".into(),
                            source: e,
                        });
                    if let Err(e) = made {
                        self.store.discard_temp(&tmp);
                        return Err(e);
                    }
                    let id = LayerId::from_key(&key);
                    st.layers.push(self.store.publish_layer(&tmp, &id)?);
                }
                self.commit(st, key, false)
            }
            Kind::User(user) => {
                st.config.user = Some(st.subst(user));
                let key = st
                    .key
                    .child(&["USER", st.config.user.as_deref().unwrap_or_default()]);
                self.metadata(st, key)
            }
            Kind::Expose(ports) => {
                for p in ports {
                    let p = st.subst(p);
                    let n = p
                        .split('/')
                        .next()
                        .and_then(|n| n.parse::<u16>().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| step_err(format!("invalid port {p:?}")))?;
                    if !st.config.exposed_ports.contains(&n) {
                        st.config.exposed_ports.push(n);
                    }
                }
                st.config.exposed_ports.sort_unstable();
                let key = st
                    .key
                    .child(&["EXPOSE", &format!("{:?}", st.config.exposed_ports)]);
                self.metadata(st, key)
            }
            Kind::Cmd(c) => {
                st.config.cmd = Some(c.argv());
                let key = st.key.child(&["CMD", &format!("{:?}", st.config.cmd)]);
                self.metadata(st, key)
            }
            Kind::Entrypoint(c) => {
                st.config.entrypoint = Some(c.argv());
                st.config.cmd = None; // Docker: a new ENTRYPOINT drops the inherited CMD
                let key = st
                    .key
                    .child(&["ENTRYPOINT", &format!("{:?}", st.config.entrypoint)]);
                self.metadata(st, key)
            }
            Kind::Healthcheck(c) => {
                st.config.ready = c.as_ref().map(|c| {
                    ReadyCheck::Command(match c {
                        Command::Shell(s) => s.clone(),
                        Command::Exec(a) => shell_join(a),
                    })
                });
                let key = st
                    .key
                    .child(&["HEALTHCHECK", &format!("{:?}", st.config.ready)]);
                self.metadata(st, key)
            }
            Kind::Label => {
                let key = st.key.child(&["LABEL", &ins.text]);
                self.metadata(st, key)
            }
            Kind::Run(c) => {
                let mut argv = c.argv();
                if let Some(user) = st
                    .config
                    .user
                    .as_deref()
                    .filter(|u| !matches!(*u, "root" | "0" | "0:0"))
                {
                    argv = vec![
                        "su".into(),
                        "-s".into(),
                        "/bin/sh".into(),
                        "-c".into(),
                        shell_join(&argv),
                        user.into(),
                    ];
                }
                let key = st.key.child(&[
                    "RUN",
                    &serde_json::to_string(&argv).expect("serializes"),
                    &st.args_fingerprint(),
                ]);
                if let Some(hit) = self.store.cached(&key) {
                    log("CACHED".into());
                    return self.apply(st, key, hit, true);
                }
                let mut env: Vec<(String, String)> = st
                    .args
                    .iter()
                    .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
                    .collect();
                env.extend(st.config.env.iter().cloned());
                if !env.iter().any(|(k, _)| k == "PATH") {
                    env.push((
                        "PATH".into(),
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    ));
                }
                let out = self.store.temp_path("run");
                let tail = Arc::new(Mutex::new(String::new()));
                let code = {
                    let tail = tail.clone();
                    let sink = move |text: String| {
                        {
                            let mut t = tail.lock().expect("not poisoned");
                            t.push_str(&text);
                            if t.len() > FAILED_OUTPUT_TAIL {
                                let mut cut = t.len() - FAILED_OUTPUT_TAIL;
                                while !t.is_char_boundary(cut) {
                                    cut += 1;
                                }
                                t.drain(..cut);
                            }
                        }
                        events(BuildEvent::Log { index, text });
                    };
                    self.runner
                        .run(
                            RunStep {
                                layers: st.layers.to_vec(),
                                argv,
                                env,
                                workdir: st.config.workdir.clone().unwrap_or_else(|| "/".into()),
                                out: out.clone(),
                            },
                            &sink,
                        )
                        .await
                };
                let code = match code {
                    Ok(c) => c,
                    Err(e) => {
                        self.store.discard_temp(&out);
                        return Err(e);
                    }
                };
                if code != 0 {
                    self.store.discard_temp(&out);
                    return Err(ImageError::RunFailed {
                        step: index,
                        line: ins.line,
                        instruction: ins.text.clone(),
                        exit_code: code,
                        output: tail.lock().expect("not poisoned").clone(),
                    });
                }
                let id = LayerId::from_key(&key);
                st.layers.push(self.store.publish_layer(&out, &id)?);
                self.commit(st, key, false)
            }
            Kind::Copy {
                add,
                sources,
                dest,
                chown,
                chmod,
            } => {
                let dest = st.subst(dest);
                let workdir = st.config.workdir.clone().unwrap_or_else(|| "/".into());
                let sources: Vec<String> = sources.iter().map(|s| st.subst(s)).collect();
                if let Some(url) = sources.iter().find(|s| s.contains("://")) {
                    return Err(step_err(format!(
                        "ADD from a URL ({url}) is not supported; download it in a RUN step"
                    )));
                }
                let owner = chown
                    .as_deref()
                    .map(parse_owner)
                    .transpose()
                    .map_err(&step_err)?;
                let mode = chmod
                    .as_deref()
                    .map(|m| {
                        u32::from_str_radix(m, 8)
                            .map_err(|_| step_err(format!("invalid --chmod {m:?}")))
                    })
                    .transpose()?;
                let ctx = TreeDir::open(&req.context).map_err(|e| step_err(e.to_string()))?;
                let plan = plan_copy(
                    &ctx,
                    ignore,
                    &sources,
                    &absolute(&workdir, &dest),
                    dest.ends_with('/'),
                    *add,
                )
                .map_err(step_err)?;
                let content = {
                    let plan = plan.clone();
                    let ctx = TreeDir::open(&req.context).map_err(|e| step_err(e.to_string()))?;
                    tokio::task::spawn_blocking(move || hash_plan(&ctx, &plan))
                        .await
                        .map_err(|e| step_err(format!("hash task: {e}")))?
                        .map_err(step_err)?
                };
                let key =
                    st.key
                        .child(&["COPY", &ins.text, &content, &format!("{owner:?}{mode:?}")]);
                if let Some(hit) = self.store.cached(&key) {
                    log("CACHED".into());
                    return self.apply(st, key, hit, true);
                }
                let tmp = self.store.temp_path("copy");
                let written = {
                    let tmp = tmp.clone();
                    tokio::task::spawn_blocking(move || write_plan(&ctx, &plan, &tmp, owner, mode))
                        .await
                        .map_err(|e| step_err(format!("copy task: {e}")))?
                };
                match written {
                    Ok(n) => log(format!("{n} files")),
                    Err(e) => {
                        self.store.discard_temp(&tmp);
                        return Err(step_err(e));
                    }
                }
                let id = LayerId::from_key(&key);
                st.layers.push(self.store.publish_layer(&tmp, &id)?);
                self.commit(st, key, false)
            }
        }
    }

    fn apply(
        &self,
        st: &mut State,
        key: CacheKey,
        hit: CacheEntry,
        cached: bool,
    ) -> Result<bool, ImageError> {
        st.layers = hit.layers;
        st.config = hit.config;
        st.key = key;
        Ok(cached)
    }

    /// A step that changes only the config: a hit when it was seen before.
    fn metadata(&self, st: &mut State, key: CacheKey) -> Result<bool, ImageError> {
        let hit = self.store.cached(&key).is_some();
        self.commit(st, key, hit)
    }

    fn commit(&self, st: &mut State, key: CacheKey, cached: bool) -> Result<bool, ImageError> {
        self.store.put_cache(
            &key,
            &CacheEntry {
                layers: st.layers.clone(),
                config: st.config.clone(),
            },
        )?;
        st.key = key;
        Ok(cached)
    }
}

/// `dir` made absolute against `base` and normalized (no `.`/`..` beyond the root).
fn absolute(base: &str, dir: &str) -> String {
    let joined = if dir.starts_with('/') {
        PathBuf::from(dir)
    } else {
        Path::new(base).join(dir)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    format!("/{}", parts.join("/"))
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let id = |p: &str| match p {
        "root" => Ok(0),
        p => p
            .parse::<u32>()
            .map_err(|_| format!("--chown={s}: use numeric ids (names are not resolved)")),
    };
    match s.split_once(':') {
        Some((u, g)) => Ok((id(u)?, id(g)?)),
        None => {
            let u = id(s)?;
            Ok((u, u))
        }
    }
}

/// One thing a COPY/ADD step writes. `rel` is the source's path inside the context (empty
/// for the context itself), read only through the context's handle.
#[derive(Debug, Clone)]
enum CopyItem {
    /// A context file, directory or symlink copied to an absolute image path.
    Entry { rel: PathBuf, to: String },
    /// A local tarball unpacked into an image directory (`ADD`).
    Unpack { rel: PathBuf, to: String },
}

/// Messages for a context entry that cannot be read.
fn ctx_err(rel: &Path) -> impl FnOnce(sandpit_fs::FsError) -> String + '_ {
    move |e| match e {
        sandpit_fs::FsError::Escape { .. } => format!(
            "{} is a symlink or passes through one; sources are not read through symlinks",
            rel.display()
        ),
        e => e.to_string(),
    }
}

/// Resolve sources against the context: wildcards in the last component, directories
/// walked, `.dockerignore` applied. Every look-up goes through the context's handle and
/// never follows a symlink (a symlink is copied as one; a source through one is refused),
/// and `..` is refused.
fn plan_copy(
    ctx: &TreeDir,
    ignore: &IgnoreRules,
    sources: &[String],
    dest: &str,
    dest_is_dir: bool,
    add: bool,
) -> Result<Vec<CopyItem>, String> {
    let mut matched: Vec<(PathBuf, Meta)> = Vec::new();
    let mut wildcard = false;
    for src in sources {
        let clean = crate::unpack::clean_path(src.as_bytes())
            .map_err(|_| format!("source {src:?} is outside the build context"))?
            .unwrap_or_default();
        let rel = clean.to_string_lossy().to_string();
        let last = clean
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut found = Vec::new();
        if last.contains(['*', '?']) {
            wildcard = true;
            let parent = clean.parent().unwrap_or(Path::new(""));
            let dir = ctx.open_dir(parent).map_err(ctx_err(parent))?;
            for (name, meta) in dir.entries().map_err(ctx_err(parent))? {
                let n = name.to_string_lossy();
                let r = parent.join(&*n);
                if component_matches(&last, &n) && !ignore.is_ignored(&r.to_string_lossy()) {
                    found.push((r, meta));
                }
            }
        } else if let Some(meta) = ctx.lstat(&clean).map_err(ctx_err(&clean))?
            && (rel.is_empty() || !ignore.is_ignored(&rel))
        {
            found.push((clean.clone(), meta));
        }
        if found.is_empty() {
            return Err(format!(
                "{src:?} not found in the build context (or excluded by .dockerignore)"
            ));
        }
        matched.extend(found);
    }
    let into_dir = dest_is_dir || matched.len() > 1 || wildcard;
    let mut items = Vec::new();
    for (rel, meta) in matched {
        let rel_text = rel.to_string_lossy().to_string();
        if meta.kind == EntryKind::Dir {
            walk(ctx, ignore, &rel, dest, &mut items)?;
        } else if add && meta.kind == EntryKind::File && is_tarball(&rel_text) {
            items.push(CopyItem::Unpack {
                rel,
                to: dest.to_string(),
            });
        } else {
            let name = rel
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let to = if into_dir {
                absolute(dest, &name)
            } else {
                dest.to_string()
            };
            items.push(CopyItem::Entry { rel, to });
        }
    }
    Ok(items)
}

/// Copy a directory's contents (not the directory itself, as Docker does) under `dest`.
fn walk(
    ctx: &TreeDir,
    ignore: &IgnoreRules,
    rel: &Path,
    dest: &str,
    items: &mut Vec<CopyItem>,
) -> Result<(), String> {
    items.push(CopyItem::Entry {
        rel: rel.to_path_buf(),
        to: dest.to_string(),
    });
    let dir = ctx.open_dir(rel).map_err(ctx_err(rel))?;
    for (name, meta) in dir.entries().map_err(ctx_err(rel))? {
        let r = rel.join(&name);
        let text = r.to_string_lossy();
        if ignore.is_ignored(&text) || (rel.as_os_str().is_empty() && name == ".dockerignore") {
            continue;
        }
        let to = absolute(dest, &name.to_string_lossy());
        if meta.kind == EntryKind::Dir {
            walk(ctx, ignore, &r, &to, items)?;
        } else {
            items.push(CopyItem::Entry { rel: r, to });
        }
    }
    Ok(())
}

fn is_tarball(name: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.zst"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// A digest of everything the plan reads: paths, modes and contents.
fn hash_plan(ctx: &TreeDir, items: &[CopyItem]) -> Result<String, String> {
    let mut h = Sha256::new();
    for item in items {
        let (rel, to, kind) = match item {
            CopyItem::Entry { rel, to } => (rel, to, "e"),
            CopyItem::Unpack { rel, to } => (rel, to, "u"),
        };
        let meta = ctx
            .lstat(rel)
            .map_err(ctx_err(rel))?
            .ok_or_else(|| format!("{}: vanished from the context", rel.display()))?;
        h.update(format!("{kind}\0{}\0{to}\0{:o}\0", rel.display(), meta.raw_mode).as_bytes());
        match meta.kind {
            EntryKind::Symlink => {
                h.update(ctx.read_link(rel).map_err(ctx_err(rel))?.as_encoded_bytes())
            }
            EntryKind::File => {
                let mut f = ctx.open_file(rel).map_err(ctx_err(rel))?;
                std::io::copy(&mut f, &mut h).map_err(|e| format!("{}: {e}", rel.display()))?;
            }
            EntryKind::Dir | EntryKind::Other => {}
        }
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

/// Write the plan into the new layer directory `layer` (a fresh host path); returns how
/// many entries. Both trees are reached only through handles: a symlink the plan writes
/// into the layer is never followed by a later item (it is replaced), and nothing is read
/// from the context through one.
fn write_plan(
    ctx: &TreeDir,
    items: &[CopyItem],
    layer: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
) -> Result<usize, String> {
    let out = TreeDir::create(layer).map_err(|e| format!("creating the layer: {e}"))?;
    let (uid, gid) = owner.unwrap_or((0, 0));
    for item in items {
        let (rel, to) = match item {
            CopyItem::Entry { rel, to } | CopyItem::Unpack { rel, to } => (rel, to),
        };
        let err = |e: sandpit_fs::FsError| format!("{to}: {e}");
        let to_rel = Path::new(to.trim_start_matches('/'));
        if let CopyItem::Unpack { .. } = item {
            let dst = out
                .make_dirs(to_rel, 0o755, InTheWay::Replace)
                .map_err(err)?;
            let file = ctx.open_file(rel).map_err(ctx_err(rel))?;
            let reader = decompress(file).map_err(|e| format!("{}: {e}", rel.display()))?;
            unpack_into(reader, &dst, Whiteouts::Plain, &UnpackLimits::current())
                .map_err(|e| format!("unpacking {}: {e}", rel.display()))?;
            continue;
        }
        let meta = ctx
            .lstat(rel)
            .map_err(ctx_err(rel))?
            .ok_or_else(|| format!("{}: vanished from the context", rel.display()))?;
        let mode = mode.unwrap_or(meta.mode);
        let Some(name) = to_rel.file_name() else {
            // The layer's root itself (`COPY dir /`).
            if meta.kind == EntryKind::Dir {
                out.set_attrs(Some((uid, gid)), mode, None).map_err(err)?;
            }
            continue;
        };
        let parent = out
            .make_dirs(
                to_rel.parent().unwrap_or(Path::new("")),
                0o755,
                InTheWay::Replace,
            )
            .map_err(err)?;
        match meta.kind {
            EntryKind::Dir => {
                let d = parent
                    .make_dir(name, 0o755, InTheWay::Replace)
                    .map_err(err)?;
                d.set_attrs(Some((uid, gid)), mode, None).map_err(err)?;
            }
            EntryKind::Symlink => {
                let target = ctx.read_link(rel).map_err(ctx_err(rel))?;
                parent.symlink(&target, name).map_err(err)?;
                parent.chown(name, uid, gid).map_err(err)?;
            }
            EntryKind::File => {
                let mut src = ctx.open_file(rel).map_err(ctx_err(rel))?;
                let mut dst = parent.create_file(name).map_err(err)?;
                std::io::copy(&mut src, &mut dst).map_err(|e| format!("{to}: {e}"))?;
                sandpit_fs::set_attrs(&dst, Some((uid, gid)), mode, None)
                    .map_err(|e| format!("{to}: {e}"))?;
            }
            EntryKind::Other => {} // sockets, fifos, devices in a context are not copied
        }
    }
    Ok(items.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Runs `RUN` steps on the host against a copy of nothing: writes the command line
    /// into a file of the new layer, so tests can see which steps ran.
    struct Recorder {
        runs: Mutex<Vec<Vec<String>>>,
        fail_with: Option<i32>,
    }

    #[async_trait]
    impl StepRunner for Recorder {
        async fn template(
            &self,
            name: &str,
        ) -> Result<Option<(Vec<PathBuf>, ImageConfig)>, ImageError> {
            Ok((name == "tpl").then(|| {
                (
                    Vec::new(),
                    ImageConfig {
                        workdir: Some("/srv".into()),
                        ..Default::default()
                    },
                )
            }))
        }
        async fn run(
            &self,
            step: RunStep,
            log: &(dyn Fn(String) + Send + Sync),
        ) -> Result<i32, ImageError> {
            self.runs.lock().unwrap().push(step.argv.clone());
            std::fs::create_dir_all(&step.out).unwrap();
            std::fs::write(step.out.join("ran"), step.argv.join(" ")).unwrap();
            log(format!("output of {}\n", step.argv.join(" ")));
            Ok(self.fail_with.unwrap_or(0))
        }
    }

    fn builder(fail_with: Option<i32>) -> (Builder, Arc<Recorder>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder {
            runs: Mutex::new(Vec::new()),
            fail_with,
        });
        let b = Builder {
            store: LayerStore::open(dir.path().join("images")).unwrap(),
            runner: rec.clone(),
        };
        (b, rec, dir)
    }

    fn events() -> (
        Arc<Mutex<Vec<BuildEvent>>>,
        impl Fn(BuildEvent) + Send + Sync,
    ) {
        let v = Arc::new(Mutex::new(Vec::new()));
        let w = v.clone();
        (v, move |e| w.lock().unwrap().push(e))
    }

    #[tokio::test]
    async fn rebuild_reruns_only_changed_steps() {
        let (b, rec, dir) = builder(None);
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("src/cache")).unwrap();
        std::fs::write(ctx.join("src/app.sh"), "echo app").unwrap();
        std::fs::write(ctx.join("src/cache/junk"), "x").unwrap();
        std::fs::write(ctx.join(".dockerignore"), "**/cache\n").unwrap();
        let mut req = BuildRequest {
            context: ctx.clone(),
            dockerfile: "FROM tpl\nENV GREETING=hi\nRUN echo $GREETING > /a\nCOPY src/ /app/\nRUN echo one\n".into(),
            ..Default::default()
        };
        let (ev, sink) = events();
        let first = b.build(&req, &sink).await.unwrap();
        assert_eq!(rec.runs.lock().unwrap().len(), 2);
        assert!(first.steps.iter().all(|s| s.index == 1 || !s.cached));
        assert_eq!(first.config.workdir.as_deref(), Some("/srv"));
        let copy_layer = first.layers[1].clone();
        assert!(copy_layer.join("app/app.sh").is_file());
        assert!(
            !copy_layer.join("app/cache").exists(),
            ".dockerignore applies"
        );
        assert!(
            ev.lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, BuildEvent::Log { text, .. } if text.contains("output of")))
        );

        // Change only the last step: the RUN before it and the COPY are cache hits.
        req.dockerfile = req.dockerfile.replace("echo one", "echo two");
        let second = b.build(&req, &sink).await.unwrap();
        let runs = rec.runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[2], vec!["/bin/sh", "-c", "echo two"]);
        let cached: Vec<bool> = second.steps.iter().map(|s| s.cached).collect();
        assert_eq!(cached, vec![true, true, true, true, false]);
        assert_eq!(second.layers[..2], first.layers[..2]);

        // A changed context file invalidates the COPY and what follows it.
        std::fs::write(ctx.join("src/app.sh"), "echo changed").unwrap();
        let third = b.build(&req, &sink).await.unwrap();
        let cached: Vec<bool> = third.steps.iter().map(|s| s.cached).collect();
        assert_eq!(cached, vec![true, true, true, false, false]);
        // An ignored file's change does not.
        std::fs::write(ctx.join("src/cache/junk"), "y").unwrap();
        let fourth = b.build(&req, &sink).await.unwrap();
        assert!(fourth.steps[3].cached && fourth.steps[4].cached);
    }

    #[tokio::test]
    async fn a_failed_run_reports_its_output_and_code() {
        let (b, _rec, dir) = builder(Some(3));
        let req = BuildRequest {
            context: dir.path().into(),
            dockerfile: "FROM scratch\n\nRUN exit 3\n".into(),
            ..Default::default()
        };
        let (_ev, sink) = events();
        let e = b.build(&req, &sink).await.unwrap_err();
        match &e {
            ImageError::RunFailed {
                step,
                line,
                exit_code,
                output,
                ..
            } => {
                assert_eq!((*step, *line, *exit_code), (2, 3, 3));
                assert!(output.contains("output of /bin/sh -c exit 3"));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("exit code 3"));
        // Nothing half-built was left in the store.
        assert_eq!(
            std::fs::read_dir(b.store.root().join("layers"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn add_unpacks_local_tarballs_and_refuses_escapes() {
        let (b, _rec, dir) = builder(None);
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        let mut t = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o755);
        t.append_data(&mut h, "bin/hi", &b"hi"[..]).unwrap();
        std::fs::write(ctx.join("root.tar"), t.into_inner().unwrap()).unwrap();
        std::os::unix::fs::symlink("/etc", ctx.join("etc-link")).unwrap();
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: "FROM scratch\nADD root.tar /\nCMD [\"/bin/hi\"]\n".into(),
            ..Default::default()
        };
        let (_ev, sink) = events();
        let out = b.build(&req, &sink).await.unwrap();
        assert!(out.layers[0].join("bin/hi").is_file());
        assert_eq!(out.config.start_command().unwrap(), vec!["/bin/hi"]);
        for bad in [
            "COPY ../x /x",
            "COPY etc-link/passwd /x",
            "ADD http://example.com/x /x",
            "COPY missing /x",
        ] {
            let req = BuildRequest {
                context: ctx.clone(),
                dockerfile: format!("FROM scratch\n{bad}\n"),
                ..Default::default()
            };
            let e = b.build(&req, &sink).await.unwrap_err().to_string();
            assert!(e.contains("line 2"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn copy_never_writes_through_a_symlink_it_copied() {
        // Hole 1 of #12: `COPY d1 d2 /` where d1/x -> a host directory and d2/x/ holds a file.
        let (b, _rec, dir) = builder(None);
        let host = dir.path().join("host-dir");
        std::fs::create_dir_all(&host).unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("d1")).unwrap();
        std::fs::create_dir_all(ctx.join("d2/x")).unwrap();
        std::os::unix::fs::symlink(&host, ctx.join("d1/x")).unwrap();
        std::fs::write(ctx.join("d2/x/planted"), "pwned").unwrap();
        std::fs::set_permissions(ctx.join("d2/x"), std::fs::Permissions::from_mode(0o4777))
            .unwrap();
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: "FROM scratch\nCOPY d1 d2 /\n".into(),
            ..Default::default()
        };
        let (_ev, sink) = events();
        let out = b.build(&req, &sink).await.unwrap();
        assert!(!host.join("planted").exists(), "written on the host");
        assert_eq!(std::fs::read_dir(&host).unwrap().count(), 0);
        assert_eq!(
            std::fs::metadata(&host).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        // The later directory replaced the symlink inside the layer.
        let x = out.layers[0].join("x");
        assert!(x.is_dir() && !x.is_symlink());
        assert!(x.join("planted").is_file());
    }

    #[tokio::test]
    async fn a_special_dockerignore_is_refused_not_read() {
        // Hole 5 of #12: `.dockerignore` -> /dev/zero grew the server's memory without end.
        let (b, _rec, dir) = builder(None);
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::os::unix::fs::symlink("/dev/zero", ctx.join(".dockerignore")).unwrap();
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: "FROM scratch\n".into(),
            ..Default::default()
        };
        let (_ev, sink) = events();
        let e = b.build(&req, &sink).await.unwrap_err().to_string();
        assert!(e.contains(".dockerignore"), "{e}");
        // A FIFO in its place is refused without blocking; an oversized one too.
        std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            ctx.join(".dockerignore"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(b.build(&req, &sink).await.is_err());
        std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
        std::fs::write(
            ctx.join(".dockerignore"),
            vec![b'#'; crate::ignore::MAX_IGNORE_FILE as usize + 1],
        )
        .unwrap();
        assert!(b.build(&req, &sink).await.is_err());
        // A FIFO as a COPY source is skipped, never opened.
        std::fs::remove_file(ctx.join(".dockerignore")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            ctx.join("pipe"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: "FROM scratch\nCOPY . /\n".into(),
            ..Default::default()
        };
        let out = b.build(&req, &sink).await.unwrap();
        assert!(!out.layers[0].join("pipe").exists());
    }

    #[test]
    fn paths_and_owners() {
        assert_eq!(absolute("/app", "sub/../x"), "/app/x");
        assert_eq!(absolute("/app", "/../../etc"), "/etc");
        assert_eq!(parse_owner("1000:100").unwrap(), (1000, 100));
        assert_eq!(parse_owner("root").unwrap(), (0, 0));
        assert!(parse_owner("www-data").is_err());
    }
}
