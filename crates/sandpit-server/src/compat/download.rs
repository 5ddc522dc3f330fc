//! `fs/download` links: `GET /csb/download/{token}` streams a file or directory of the
//! sandbox as a gzipped tar, for five minutes after the agent gateway handed out the link.
//! Partial compared with CodeSandbox: a `.tar.gz` rather than a zip (minimal images have
//! `tar` but no `zip`), and `excludes` are not applied.

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
            "czf".into(),
            "-".into(),
            "-C".into(),
            parent,
            name.clone(),
        ]),
        timeout_ms: Some(MAX_MS),
        ..Default::default()
    };
    let (tx, mut rx) = mpsc::channel::<ExecOutput>(16);
    let (body_tx, body_rx) = mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        // The read lock is held while the archive streams (as for `/v1` downloads).
        let _guard = guard;
        let forward = async {
            while let Some(out) = rx.recv().await {
                if let ExecOutput::Stdout(b) = out
                    && body_tx.send(Ok(bytes::Bytes::from(b))).await.is_err()
                {
                    return;
                }
            }
        };
        let (status, ()) = tokio::join!(agent.exec(req, tx), forward);
        if !matches!(status, Ok(ref s) if s.exit_code == 0) {
            tracing::warn!(sandbox = %sandbox, status = ?status, "download archive failed");
        }
    });
    let file = format!("{}.tar.gz", name.trim_start_matches('.').trim_matches('/'));
    let file = if file == ".tar.gz" {
        "download.tar.gz".into()
    } else {
        file
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", file.replace('"', "")),
            ),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx)),
    )
        .into_response())
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
