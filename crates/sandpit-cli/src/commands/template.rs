//! `sandpit template ...`: build templates from Dockerfiles or images, list, show, delete,
//! alias them.
#![expect(clippy::disallowed_methods, reason = "the CLI user's own Dockerfile")]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateTemplateRequest, ReadyCheck, RegistryAuth, TemplateBuildEvent};

use super::sandbox::Conn;

#[derive(clap::Subcommand)]
pub enum TemplateCommand {
    /// Build a template from DIR/Dockerfile with DIR as the build context; shows each step
    /// and streams its output. Exits 1 when the build fails.
    Build {
        #[command(flatten)]
        conn: Conn,
        /// The build context.
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// The Dockerfile (default DIR/Dockerfile).
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// NAME=VALUE for an ARG, repeatable.
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        #[command(flatten)]
        opts: CommonOpts,
    },
    /// Make a template from an image reference (pulled by the server).
    Create {
        #[command(flatten)]
        conn: Conn,
        /// e.g. `busybox:1.36` or `127.0.0.1:5000/app:v1`.
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        opts: CommonOpts,
    },
    /// Build a built-in template that is built on demand (`toolchain`), following its log.
    BuildBuiltin {
        #[command(flatten)]
        conn: Conn,
        #[arg(default_value = "toolchain")]
        name: String,
    },
    /// List templates, every version (`*`: the version the plain name means).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one template version (id, name, name:N or namespace@alias) as JSON.
    Get {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Delete a template: a name deletes every version, name:N (or an id, or an alias)
    /// that one; --force also destroys the sandboxes that use them.
    Delete {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long)]
        force: bool,
    },
    /// Point namespace@alias at a template version (name:N, an id, or a name's latest),
    /// or move it there. Aliases move only this way or by a build naming them.
    Alias {
        #[command(flatten)]
        conn: Conn,
        id: String,
        alias: String,
    },
}

#[derive(clap::Args)]
pub struct CommonOpts {
    #[arg(long, default_value = "")]
    description: String,
    /// Ready when this port listens (checked before the template is finished).
    #[arg(long, conflicts_with = "ready_command")]
    ready_port: Option<u16>,
    /// Ready when this shell command exits 0.
    #[arg(long)]
    ready_command: Option<String>,
    /// namespace@alias to point at the template once built, repeatable.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// Registry user name (with --registry-password).
    #[arg(long, env = "SANDPIT_REGISTRY_USER")]
    registry_user: Option<String>,
    #[arg(long, env = "SANDPIT_REGISTRY_PASSWORD", hide_env_values = true)]
    registry_password: Option<String>,
    /// Return once the build started instead of following it.
    #[arg(long)]
    no_wait: bool,
}

impl CommonOpts {
    fn apply(&self, req: &mut CreateTemplateRequest) {
        req.description = self.description.clone();
        req.ready = match (self.ready_port, &self.ready_command) {
            (Some(p), _) => Some(ReadyCheck::Port(p)),
            (None, Some(c)) => Some(ReadyCheck::Command(c.clone())),
            _ => None,
        };
        req.aliases = self.aliases.clone();
        if let (Some(u), Some(p)) = (&self.registry_user, &self.registry_password) {
            req.registry_auth = Some(RegistryAuth {
                username: Some(u.clone()),
                password: Some(p.clone()),
                token: None,
            });
        }
    }
}

pub async fn run(cmd: TemplateCommand) -> anyhow::Result<u8> {
    match cmd {
        TemplateCommand::Build {
            conn,
            dir,
            name,
            file,
            build_args,
            opts,
        } => {
            let dockerfile_path = file.unwrap_or_else(|| dir.join("Dockerfile"));
            let dockerfile = std::fs::read_to_string(&dockerfile_path)
                .with_context(|| format!("reading {}", dockerfile_path.display()))?;
            let context = sandpit_image::ignore::pack_context(&dir)
                .with_context(|| format!("packing the build context {}", dir.display()))?;
            let mut args = BTreeMap::new();
            for a in build_args {
                let (k, v) = a.split_once('=').context("--build-arg takes NAME=VALUE")?;
                args.insert(k.to_string(), v.to_string());
            }
            let mut req = CreateTemplateRequest {
                name,
                dockerfile: Some(dockerfile),
                context: Some(base64::engine::general_purpose::STANDARD.encode(&context)),
                build_args: args,
                ..Default::default()
            };
            opts.apply(&mut req);
            build(conn.client()?, req, opts.no_wait).await
        }
        TemplateCommand::Create {
            conn,
            image,
            name,
            opts,
        } => {
            let mut req = CreateTemplateRequest {
                name,
                image: Some(image),
                ..Default::default()
            };
            opts.apply(&mut req);
            build(conn.client()?, req, opts.no_wait).await
        }
        TemplateCommand::BuildBuiltin { conn, name } => {
            let client = conn.client()?;
            let t = client.build_builtin_template(&name).await?;
            if t.status == "ready" {
                eprintln!("template {} is built", t.name);
                return Ok(0);
            }
            follow(&client, &t.id, &t.name).await
        }
        TemplateCommand::List { conn } => {
            // Every version; `*` marks the one the plain name means.
            println!(
                "{:<24} {:<28} {:<9} {:<6} ALIASES",
                "ID", "NAME:VERSION", "STATUS", "LATEST"
            );
            for t in conn.client()?.templates().await? {
                println!(
                    "{:<24} {:<28} {:<9} {:<6} {}",
                    t.id,
                    format!("{}:{}", t.name, t.version),
                    t.status,
                    if t.latest { "*" } else { "" },
                    t.aliases.join(",")
                );
            }
            Ok(0)
        }
        TemplateCommand::Get { conn, id } => {
            let t = conn.client()?.get_template(&id).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
            Ok(0)
        }
        TemplateCommand::Delete { conn, id, force } => {
            conn.client()?.delete_template(&id, force).await?;
            Ok(0)
        }
        TemplateCommand::Alias { conn, id, alias } => {
            let a = conn.client()?.set_template_alias(&id, &alias).await?;
            println!("{} -> {}", a.alias, a.template_id);
            Ok(0)
        }
    }
}

/// Print a line above the progress bar, or to stderr when there is no bar (not a
/// terminal: `println` of a hidden bar prints nothing).
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}

/// Start a build and follow it: a progress bar over the steps, each step's output printed
/// as it comes, a summary per step (cached or how long it ran). 1 when the build fails.
async fn build(client: Client, req: CreateTemplateRequest, no_wait: bool) -> anyhow::Result<u8> {
    let t = client.create_template(&req).await?;
    eprintln!(
        "building template {}:{} (version {} of {}, {})",
        t.name, t.version, t.version, t.name, t.id
    );
    if no_wait {
        println!("{}", t.id);
        return Ok(0);
    }
    follow(&client, &t.id, &format!("{}:{}", t.name, t.version)).await
}

/// Follow a build's events until it ends.
async fn follow(client: &Client, id: &str, name: &str) -> anyhow::Result<u8> {
    let mut events = Box::pin(client.template_build_events(id).await?);
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg} {elapsed}")
            .expect("valid template"),
    );
    let mut current = String::new();
    while let Some(ev) = events.next().await {
        match ev? {
            TemplateBuildEvent::Step {
                index,
                total,
                instruction,
                ..
            } => {
                bar.set_length(total as u64);
                bar.set_position(index as u64 - 1);
                current = format!("Step {index}/{total}: {instruction}");
                say(&bar, &current);
                bar.set_message(instruction);
            }
            TemplateBuildEvent::Log { text, .. } => {
                for line in text.lines() {
                    say(&bar, format!("  | {line}"));
                }
            }
            TemplateBuildEvent::StepDone {
                index,
                cached,
                elapsed_ms,
            } => {
                bar.set_position(index as u64);
                say(
                    &bar,
                    if cached {
                        format!("  -> cached ({elapsed_ms} ms)")
                    } else {
                        format!("  -> done in {elapsed_ms} ms")
                    },
                );
            }
            TemplateBuildEvent::Finished {
                status,
                error,
                elapsed_ms,
            } => {
                bar.finish_and_clear();
                if status == "ready" {
                    eprintln!(
                        "template {} ready in {:.1} s",
                        name,
                        elapsed_ms as f64 / 1000.0
                    );
                    println!("{id}");
                    return Ok(0);
                }
                eprintln!("build failed: {}", error.unwrap_or_default());
                let _ = current;
                return Ok(1);
            }
        }
    }
    bar.finish_and_clear();
    anyhow::bail!("the build's event stream ended before the build did")
}
