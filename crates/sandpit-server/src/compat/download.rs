//! `fs/download` links: `GET /csb/download/{token}` streams a file or directory of the
//! sandbox as a zip, as CodeSandbox does, for five minutes after the agent gateway handed out
//! the link. The sandbox's `tar` writes a tar stream (minimal images have `tar` but no
//! `zip`); the host re-packs it as a zip in memory as it streams ([`super::zip`]: bounded,
//! names checked, links kept as links, nothing written to or read from host paths). A
//! stream that fails midway ends the body early, so the client sees a truncated zip.

use crate::csb_store::CsbTables;
use sandpit_control::Status;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::auth::{generate_token_with, hash_token};
use crate::error::{ApiError, ControlError};
use crate::lifecycle;
use crate::server::Server;
use crate::util::now_ms;
use sandpit_control::agent::ExecOutput;

/// Where links point.
pub const PATH_PREFIX: &str = "/csb/download";
/// How long a link works.
pub const TTL_MS: i64 = 5 * 60 * 1000;
/// Download tokens start with this.
pub const TOKEN_PREFIX: &str = "spd_";
/// Longest a download may stream.
const MAX_MS: u64 = 300_000;

pub fn router() -> Router<Arc<Server>> {
    Router::new().route(
        &format!("{PATH_PREFIX}/{{token}}"),
        axum::routing::get(download),
    )
}

/// A link to `path` of `sandbox_id`, relative to the server (`{PATH_PREFIX}/<token>`).
pub async fn mint(server: &Server, sandbox_id: &str, path: &str) -> Result<String, ControlError> {
    let token = generate_token_with(TOKEN_PREFIX);
    server
        .store
        .csb()
        .insert_download_token(&hash_token(&token), sandbox_id, path, now_ms() + TTL_MS)
        .await?;
    Ok(format!("{PATH_PREFIX}/{token}"))
}

/// The archive member name and its parent directory.
fn split(path: &str) -> (String, String) {
    match path.rsplit_once('/') {
        Some(("", name)) if !name.is_empty() => ("/".into(), name.into()),
        Some((parent, name)) if !name.is_empty() => (parent.into(), name.into()),
        _ => ("/".into(), ".".into()),
    }
}

async fn download(
    State(server): State<Arc<Server>>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let (sandbox, path) = server
        .store
        .csb()
        .download_token(&hash_token(&token), now_ms())
        .await?
        .ok_or_else(|| {
            ApiError::not_found("download_not_found", "unknown or expired download link")
        })?;
    let guard = server.lock_of(&sandbox).read_owned().await;
    let row = server
        .store
        .sandboxes
        .get(&sandbox)
        .await?
        .filter(|r| r.status == Status::Running)
        .ok_or_else(|| ApiError::conflict("sandbox_not_running", "the sandbox is not running"))?;
    let agent = lifecycle::agent_of(&server, &row)
        .ok_or_else(|| ControlError::Internal(format!("running sandbox {sandbox} has no slot")))?;
    let (parent, name) = split(&path);
    let req = sandpit_agent_proto::ExecRequest {
        argv: Some(vec![
            "tar".into(),
            "cf".into(),
            "-".into(),
            "-C".into(),
            parent,
            name.clone(),
        ]),
        timeout_ms: Some(MAX_MS),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel::<ExecOutput>(16);
    let (tar_tx, tar_rx) = mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    let (body_tx, body_rx) = mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        // The read lock is held while the archive streams (as for `/v1` downloads).
        let _guard = guard;
        let forward = async {
            while let Some(out) = rx.recv().await {
                if let ExecOutput::Stdout(b) = out
                    && tar_tx.send(Ok(bytes::Bytes::from(b))).await.is_err()
                {
                    return;
                }
            }
            drop(tar_tx);
        };
        let input = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            tokio_stream::wrappers::ReceiverStream::new(tar_rx),
        ));
        let zipping = tokio::task::spawn_blocking(move || {
            super::zip::tar_to_zip(
                input,
                std::io::BufWriter::with_capacity(64 * 1024, ChannelWriter(body_tx)),
            )
        });
        let (status, (), zipped) = tokio::join!(agent.exec(req, tx), forward, zipping);
        if !matches!(status, Ok(ref s) if s.exit_code == 0) {
            tracing::warn!(sandbox = %sandbox, status = ?status, "download archive failed");
        }
        if let Ok(Err(e)) = zipped {
            tracing::warn!(sandbox = %sandbox, error = %crate::error::DisplayChain(&e), "download: the archive could not be re-packed");
        }
    });
    let file = format!("{}.zip", name.trim_start_matches('.').trim_matches('/'));
    let file = if file == ".zip" {
        "download.zip".into()
    } else {
        file
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", file.replace('"', "")),
            ),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx)),
    )
        .into_response())
}

/// Hands the zip writer's output to the response body, blocking (on the blocking thread
/// that writes the zip) while the client is slow; fails once the client is gone.
struct ChannelWriter(mpsc::Sender<Result<bytes::Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn paths_split_into_parent_and_member() {
        assert_eq!(
            split("/project/sandbox"),
            ("/project".into(), "sandbox".into())
        );
        assert_eq!(split("/etc"), ("/".into(), "etc".into()));
        assert_eq!(split("/"), ("/".into(), ".".into()));
    }
}
