//! `sandpit sandbox ...`: a client for the `/v1/sandboxes` API.
#![expect(clippy::disallowed_methods, reason = "the CLI user's own local files")]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sandpit_sdk::Client;
use sandpit_sdk::types::{
    CreateSandboxRequest, EgressPolicy, ExecEvent, ExecRequest, PreviewPrivacy, PreviewSettings,
    PreviewTokenCreateRequest, SandboxMode, UpdateSandboxRequest, VolumeMountRequest,
};

#[derive(clap::Args)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        env = "SANDPIT_URL",
        default_value = "http://127.0.0.1:7878",
        global = true
    )]
    url: String,
    /// API token.
    #[arg(long, env = "SANDPIT_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl Conn {
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.url, self.token()?))
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API token, or why there is none.
    pub fn token(&self) -> anyhow::Result<&str> {
        self.token
            .as_deref()
            .context("no token: set SANDPIT_TOKEN or pass --token")
    }
}

#[derive(clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print it as JSON.
    Create {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "base")]
        template: String,
        /// ephemeral or persistent.
        #[arg(long, default_value = "ephemeral")]
        mode: String,
        /// Ephemeral lifetime, e.g. 10m.
        #[arg(long)]
        timeout: Option<String>,
        /// Persistent idle time before suspend, e.g. 30m.
        #[arg(long)]
        idle_timeout: Option<String>,
        #[arg(long)]
        size: Option<String>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Egress policy as JSON, e.g. '{"mode":"deny_all"}'.
        #[arg(long)]
        egress: Option<String>,
        /// Mount a volume: NAME:/PATH or NAME:/PATH:ro (read-only), repeatable.
        #[arg(long = "volume")]
        volumes: Vec<String>,
    },
    /// List sandboxes.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one sandbox.
    Get {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Run a command; its exit code becomes this command's.
    Exec {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// e.g. 30s (max 5m).
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// Run as this user (`name`, `uid`, `name:group`, `uid:gid`); default: the
        /// template's USER, else root.
        #[arg(long)]
        user: Option<String>,
        /// The shell command line.
        #[arg(required = true, trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Open an interactive terminal in a sandbox (the login shell, or the command after
    /// `--`); its exit code becomes this command's.
    Shell {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Attach to this existing terminal instead of starting one.
        #[arg(long)]
        terminal: Option<String>,
        /// The program and its arguments (default: the login shell).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Upload a local file.
    Upload {
        #[command(flatten)]
        conn: Conn,
        id: String,
        local: PathBuf,
        /// Absolute destination path in the sandbox.
        remote: String,
    },
    /// Download a file ("-" writes to stdout).
    Download {
        #[command(flatten)]
        conn: Conn,
        id: String,
        remote: String,
        local: PathBuf,
    },
    /// Destroy a sandbox.
    Destroy {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Replace the egress policy, e.g. '{"mode":"deny_all","allow_cidrs":["10.0.0.0/8"]}'.
    /// A running sandbox gets it at once; a suspended one on wake.
    Egress {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// The policy as JSON.
        policy: String,
    },
    /// List the TCP ports listening inside a sandbox, or wait for one to open.
    Ports {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Wait until this port listens (exit code 1 if it does not in time).
        #[arg(long)]
        wait: Option<u16>,
        /// How long --wait waits, e.g. 30s.
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Change a sandbox's size (small, medium, large): a running one gets the new CPU and
    /// memory limits at once and its disk grown (a disk never shrinks).
    Resize {
        #[command(flatten)]
        conn: Conn,
        id: String,
        size: String,
    },
    /// Show or change who may open the sandbox's previews
    /// (http://<id>-<port>.<preview domain>).
    Preview {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// public (anyone) or private (preview token needed).
        #[arg(long)]
        privacy: Option<String>,
    },
    /// Manage the preview tokens of a private sandbox.
    #[command(subcommand)]
    PreviewToken(PreviewTokenCommand),
    /// Print changes under a path as they happen, one line each (`add /app/x`); `--json`
    /// prints each event as JSON. Ends when the watched path goes or the sandbox stops.
    Watch {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Absolute path of a file or directory in the sandbox.
        path: String,
        /// Only the directory itself, not its subdirectories.
        #[arg(long)]
        shallow: bool,
        /// Leave out matching paths (gitignore-like: `node_modules`, `*.log`); repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Wake a suspended sandbox.
    Wake {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Suspend a running sandbox to disk.
    Hibernate {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
}

#[derive(clap::Subcommand)]
pub enum PreviewTokenCommand {
    /// Create a token (printed once).
    Create {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// RFC 3339 expiry, e.g. 2030-01-01T00:00:00Z (default: none).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List the tokens (without secrets).
    List {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// Revoke a token.
    Revoke {
        #[command(flatten)]
        conn: Conn,
        id: String,
        token_id: String,
    },
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// `--volume NAME:/PATH[:ro]`.
fn parse_volume_flag(text: &str) -> anyhow::Result<VolumeMountRequest> {
    let (name, rest) = text
        .split_once(':')
        .context("--volume takes NAME:/PATH or NAME:/PATH:ro")?;
    let (path, read_only) = match rest.strip_suffix(":ro") {
        Some(path) => (path, true),
        None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
    };
    Ok(VolumeMountRequest {
        name: name.into(),
        path: path.into(),
        read_only,
    })
}

pub async fn run(cmd: SandboxCommand) -> anyhow::Result<u8> {
    match cmd {
        SandboxCommand::Create {
            conn,
            template,
            mode,
            timeout,
            idle_timeout,
            size,
            env,
            egress,
            volumes,
        } => {
            let mode = match mode.as_str() {
                "ephemeral" => SandboxMode::Ephemeral,
                "persistent" => SandboxMode::Persistent,
                other => anyhow::bail!("--mode must be ephemeral or persistent, not {other:?}"),
            };
            let env: BTreeMap<String, String> = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect::<Option<_>>()
                .context("--env takes KEY=VALUE")?;
            let egress: Option<EgressPolicy> = egress
                .map(|e| serde_json::from_str(&e))
                .transpose()
                .context("--egress is not a valid policy")?;
            let volumes = volumes
                .iter()
                .map(|v| parse_volume_flag(v))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = CreateSandboxRequest {
                template,
                mode,
                timeout,
                idle_timeout,
                env,
                egress,
                size,
                volumes,
                ..Default::default()
            };
            print_json(&conn.client()?.create_sandbox(&req).await?)?;
        }
        SandboxCommand::List { conn, status } => {
            print_json(&conn.client()?.list_sandboxes(status.as_deref()).await?)?;
        }
        SandboxCommand::Get { conn, id } => print_json(&conn.client()?.get_sandbox(&id).await?)?,
        SandboxCommand::Destroy { conn, id } => conn.client()?.destroy_sandbox(&id).await?,
        SandboxCommand::Egress { conn, id, policy } => {
            let policy: EgressPolicy =
                serde_json::from_str(&policy).context("the policy is not valid JSON")?;
            print_json(&conn.client()?.set_egress(&id, &policy).await?)?
        }
        SandboxCommand::Ports {
            conn,
            id,
            wait,
            timeout,
        } => {
            let client = conn.client()?;
            match wait {
                None => print_json(&client.list_ports(&id).await?)?,
                Some(port) => match client.wait_port(&id, port, timeout.as_deref()).await {
                    Ok(ports) => print_json(&ports)?,
                    Err(e) if e.code() == Some("port_wait_timeout") => {
                        eprintln!("sandpit: {e}");
                        return Ok(1);
                    }
                    Err(e) => return Err(e.into()),
                },
            }
        }
        SandboxCommand::Resize { conn, id, size } => {
            let req = UpdateSandboxRequest {
                size: Some(size),
                ..Default::default()
            };
            print_json(&conn.client()?.update_sandbox(&id, &req).await?)?
        }
        SandboxCommand::Preview { conn, id, privacy } => {
            let client = conn.client()?;
            let sandbox = match privacy {
                None => client.get_sandbox(&id).await?,
                Some(p) => {
                    let privacy = PreviewPrivacy::parse(&p)
                        .with_context(|| format!("--privacy is public or private, not {p:?}"))?;
                    let req = UpdateSandboxRequest {
                        preview: Some(PreviewSettings { privacy }),
                        ..Default::default()
                    };
                    client.update_sandbox(&id, &req).await?
                }
            };
            print_json(&sandbox.preview)?
        }
        SandboxCommand::PreviewToken(cmd) => match cmd {
            PreviewTokenCommand::Create {
                conn,
                id,
                expires_at,
            } => {
                let req = PreviewTokenCreateRequest { expires_at };
                print_json(&conn.client()?.create_preview_token(&id, &req).await?)?
            }
            PreviewTokenCommand::List { conn, id } => {
                print_json(&conn.client()?.list_preview_tokens(&id).await?)?
            }
            PreviewTokenCommand::Revoke { conn, id, token_id } => {
                conn.client()?.revoke_preview_token(&id, &token_id).await?
            }
        },
        SandboxCommand::Wake { conn, id } => print_json(&conn.client()?.wake(&id).await?)?,
        SandboxCommand::Watch {
            conn,
            id,
            path,
            shallow,
            exclude,
            json,
        } => {
            use futures::StreamExt;
            let client = conn.client()?;
            let excludes: Vec<&str> = exclude.iter().map(String::as_str).collect();
            let mut events = Box::pin(client.watch(&id, &path, !shallow, &excludes).await?);
            while let Some(event) = events.next().await {
                let event = event?;
                if json {
                    println!("{}", serde_json::to_string(&event)?);
                } else if event.kind == "end" {
                    eprintln!(
                        "watch ended: {}",
                        event.reason.as_deref().unwrap_or("unknown")
                    );
                } else {
                    println!("{} {}", event.kind, event.path);
                }
            }
        }
        SandboxCommand::Hibernate { conn, id } => {
            print_json(&conn.client()?.hibernate(&id).await?)?
        }
        SandboxCommand::Exec {
            conn,
            id,
            timeout,
            cwd,
            user,
            command,
        } => {
            let req = ExecRequest {
                command: Some(command.join(" ")),
                timeout,
                cwd,
                user,
                ..Default::default()
            };
            let mut events = Box::pin(conn.client()?.exec_stream(&id, &req).await?);
            let b64 = base64::engine::general_purpose::STANDARD;
            while let Some(ev) = events.next().await {
                match ev? {
                    ExecEvent::Stdout { data, .. } => {
                        std::io::stdout().write_all(&b64.decode(data)?)?;
                        std::io::stdout().flush()?;
                    }
                    ExecEvent::Stderr { data, .. } => {
                        std::io::stderr().write_all(&b64.decode(data)?)?
                    }
                    ExecEvent::Exit {
                        exit_code,
                        timed_out,
                        ..
                    } => {
                        if timed_out {
                            eprintln!("sandpit: command timed out and was killed");
                        }
                        return Ok(exit_code.clamp(0, 255) as u8);
                    }
                    ExecEvent::Error { code, message } => anyhow::bail!("{code}: {message}"),
                    ExecEvent::Started { .. } => {}
                }
            }
            anyhow::bail!("the stream ended before the command did");
        }
        SandboxCommand::Shell {
            conn,
            id,
            terminal,
            command,
        } => {
            let args = super::shell::ShellArgs {
                id,
                terminal,
                command,
            };
            return super::shell::run(conn.client()?, args).await;
        }
        SandboxCommand::Upload {
            conn,
            id,
            local,
            remote,
        } => {
            let file = tokio::fs::File::open(&local)
                .await
                .with_context(|| format!("opening {}", local.display()))?;
            let len = file.metadata().await?.len();
            let pb = bar(len, "upload");
            let pb2 = pb.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                    if let Ok(c) = &chunk {
                        pb2.inc(c.len() as u64);
                    }
                    chunk
                });
            conn.client()?
                .upload(&id, &remote, reqwest::Body::wrap_stream(stream))
                .await?;
            pb.finish();
        }
        SandboxCommand::Download {
            conn,
            id,
            remote,
            local,
        } => {
            let resp = conn.client()?.download(&id, &remote).await?;
            let to_stdout = local.as_os_str() == "-";
            let pb = if to_stdout {
                ProgressBar::hidden()
            } else {
                bar(resp.content_length().unwrap_or(0), "download")
            };
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if to_stdout {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(
                    tokio::fs::File::create(&local)
                        .await
                        .with_context(|| format!("creating {}", local.display()))?,
                )
            };
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                pb.inc(chunk.len() as u64);
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            pb.finish();
        }
    }
    Ok(0)
}
