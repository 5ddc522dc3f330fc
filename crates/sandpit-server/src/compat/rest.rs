//! The seed-000 REST routes: `/meta/info`, `/sandbox…`, `/vm/…`, `/templates`, with the
//! CodeSandbox envelope and status codes.

use sandpit_control::Status;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Auth, generate_token_with, hash_token};
use crate::csb_store::{CsbAgentTokenRow, CsbSandboxRow, CsbTables};
use crate::error::CsbError;
use crate::error::{ApiError, ControlError};
use crate::extract::{ApiQuery, OptionalJson};
use crate::extract::{Authorized, CsbSandbox, scope};
use crate::lifecycle;
use crate::server::Server;
use crate::store::{PreviewTokenRow, Sandbox};
use crate::util::parse_expiry;
use crate::util::{new_id, now_ms, rfc3339};

/// The template the SDK forks when it names none (`getDefaultTemplateTag`): served by `base`.
pub const SDK_DEFAULT_TEMPLATES: &[&str] = &["pcz35m", "7ngcrf"];
/// Where the SDK's files live inside a sandbox (`workspace_path`).
pub const WORKSPACE_PATH: &str = "/project/sandbox";
/// Most tags on one sandbox (seed 000).
pub const MAX_TAGS: usize = 10;
/// Largest page of `GET /sandbox`.
pub const MAX_PAGE_SIZE: u32 = 50;
/// Lifetime of an agent gateway token.
pub const AGENT_TOKEN_TTL_MS: i64 = 24 * 3600 * 1000;
/// Agent gateway tokens start with this.
pub const AGENT_TOKEN_PREFIX: &str = "spa_";
/// The VM tiers of seed 000, with the Sandpit size each one runs as.
pub const TIERS: &[(&str, &str, u32, u32)] = &[
    ("Pico", "small", 1, 1),
    ("Nano", "small", 2, 4),
    ("Micro", "small", 4, 8),
    ("Small", "medium", 8, 16),
    ("Medium", "medium", 16, 32),
    ("Large", "large", 32, 64),
    ("XLarge", "large", 64, 128),
];
/// The version the agent gateway reports (`pitcher_version`, `latest_pitcher_version`).
pub const GATEWAY_VERSION: &str = concat!("sandpit-", env!("CARGO_PKG_VERSION"));

type CsbResult = Result<Response, CsbError>;

pub fn router() -> Router<Arc<Server>> {
    Router::new()
        .route("/meta/info", get(meta_info))
        .route("/sandbox", get(list_sandboxes).post(create_sandbox))
        .route("/sandbox/{id}", get(get_sandbox))
        .route("/sandbox/{id}/fork", post(fork_sandbox))
        .route(
            "/sandbox/{id}/tokens",
            get(list_preview_tokens)
                .post(create_preview_token)
                .delete(revoke_all_preview_tokens),
        )
        .route(
            "/sandbox/{id}/tokens/{token_id}",
            patch(update_preview_token),
        )
        .route("/vm/{id}/start", post(start_vm))
        .route("/vm/{id}/hibernate", post(hibernate_vm))
        .route("/vm/{id}/shutdown", post(shutdown_vm))
        .route("/vm/{id}", delete(delete_vm))
        .route("/vm/{id}/hibernation_timeout", put(hibernation_timeout))
        .route("/vm/{id}/specs", put(update_specs))
        .route("/vm/{id}/sessions", post(create_session))
        .route("/vm/{id}/update_specs", post(update_specs))
        .route("/vm/tag", post(create_tag))
        .route("/vm/alias/{namespace}/{alias}", put(assign_alias))
        .route("/vm/clusters", get(list_clusters))
        .route("/vm/running", get(list_running))
        .route("/templates", post(create_template))
}

/// `{"success":true,"errors":[],"data":…}` with a status.
fn ok(status: StatusCode, data: Value) -> Response {
    (
        status,
        Json(json!({"success": true, "errors": [], "data": data})),
    )
        .into_response()
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("sandbox_not_found", format!("no sandbox {id:?}"))
}

/// The caller's sandbox, not destroyed: 404 otherwise (another workspace's sandbox is not
/// revealed). For sandboxes named in a body; routes take a [`CsbSandbox`].
async fn own_sandbox(server: &Server, auth: &Auth, id: &str) -> Result<Authorized, ApiError> {
    Authorized::load_csb(server, auth, id).await
}

/// The CodeSandbox fields of a sandbox; defaults for one made through `/v1`.
async fn csb_of(server: &Server, row: &Sandbox) -> Result<CsbSandboxRow, ControlError> {
    Ok(server
        .store
        .csb()
        .get_sandbox(&row.workspace_id, &row.id)
        .await?
        .unwrap_or_else(|| default_csb(row)))
}

fn default_csb(row: &Sandbox) -> CsbSandboxRow {
    CsbSandboxRow {
        sandbox_id: row.id.to_string(),
        workspace_id: row.workspace_id.to_string(),
        title: None,
        description: None,
        tags: "[]".into(),
        privacy: if row.preview_privacy == sandpit_api_types::PreviewPrivacy::Public {
            1
        } else {
            2
        },
        tier: "Micro".into(),
    }
}

/// A sandbox as seed 000 shows it.
fn view(row: &Sandbox, c: &CsbSandboxRow) -> Value {
    let tags: Vec<String> = serde_json::from_str(&c.tags).unwrap_or_default();
    json!({
        "id": row.id,
        "title": c.title,
        "description": c.description,
        "tags": tags,
        "privacy": c.privacy,
        "is_frozen": false,
        "settings": {"use_pint": false},
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
    })
}

// ---- meta ----

async fn meta_info(State(server): State<Arc<Server>>, auth: Auth) -> CsbResult {
    let rate_limits = super::rate_limits(&server, &auth.workspace_id).await?;
    let info = json!({
        "api": {"latest_version": "2023-07-01", "name": "Sandpit (CodeSandbox-compatible)"},
        "auth": {"scopes": auth.scopes, "team": auth.workspace_id, "version": "2023-07-01"},
        "rate_limits": rate_limits,
    });
    Ok((StatusCode::OK, Json(info)).into_response())
}

// ---- sandboxes ----

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    tags: Option<String>,
    order_by: Option<String>,
    direction: Option<String>,
    page_size: Option<String>,
    page: Option<String>,
    status: Option<String>,
}

fn parse_positive(name: &'static str, text: Option<&str>, default: u32) -> Result<u32, ApiError> {
    match text {
        None => Ok(default),
        Some(t) => t.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{name} must be a positive integer"),
            )
        }),
    }
}

async fn list_sandboxes(
    State(server): State<Arc<Server>>,
    auth: Auth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> CsbResult {
    auth.require("sandbox_read")?;
    let page_size = parse_positive("page_size", q.page_size.as_deref(), 20)?;
    if page_size > MAX_PAGE_SIZE {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("page_size must be at most {MAX_PAGE_SIZE}"),
        )
        .into());
    }
    let page = parse_positive("page", q.page.as_deref(), 1)?;
    let by_updated = match q.order_by.as_deref() {
        None | Some("inserted_at") => false,
        Some("updated_at") => true,
        Some(o) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("order_by must be inserted_at or updated_at, not {o:?}"),
            )
            .into());
        }
    };
    let ascending = match q.direction.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(d) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("direction must be asc or desc, not {d:?}"),
            )
            .into());
        }
    };
    let status = match q.status.as_deref() {
        None => None,
        Some("running") => Some(Status::Running),
        Some(s) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("status can only be running, not {s:?}"),
            )
            .into());
        }
    };
    let wanted: Vec<&str> = q
        .tags
        .as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let rows = server
        .store
        .sandboxes
        .list(&auth.workspace_id, status)
        .await?;
    let csb: BTreeMap<String, CsbSandboxRow> = server
        .store
        .csb()
        .list_sandboxes(&auth.workspace_id)
        .await?
        .into_iter()
        .map(|c| (c.sandbox_id.clone(), c))
        .collect();
    let mut items: Vec<(Sandbox, CsbSandboxRow)> = rows
        .into_iter()
        .filter(|r| r.status != Status::Failed)
        .map(|r| {
            let c = csb
                .get(r.id.as_str())
                .cloned()
                .unwrap_or_else(|| default_csb(&r));
            (r, c)
        })
        .filter(|(_, c)| {
            if wanted.is_empty() {
                return true;
            }
            let tags: Vec<String> = serde_json::from_str(&c.tags).unwrap_or_default();
            wanted.iter().all(|w| tags.iter().any(|t| t == w))
        })
        .collect();
    items.sort_by_key(|(r, _)| {
        (
            if by_updated {
                r.updated_at
            } else {
                r.created_at
            },
            r.id.clone(),
        )
    });
    if !ascending {
        items.reverse();
    }
    let total = items.len();
    let start = (page as usize - 1) * page_size as usize;
    let sandboxes: Vec<Value> = items
        .iter()
        .skip(start)
        .take(page_size as usize)
        .map(|(r, c)| view(r, c))
        .collect();
    let next_page = (start + (page_size as usize) < total).then_some(page + 1);
    Ok(ok(
        StatusCode::OK,
        json!({
            "sandboxes": sandboxes,
            "pagination": {"current_page": page, "next_page": next_page, "total_records": total},
        }),
    ))
}

async fn get_sandbox(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::SandboxRead>,
) -> CsbResult {
    let row = sb.row().clone();
    let c = csb_of(&server, &row).await?;
    Ok(ok(StatusCode::OK, view(&row, &c)))
}

/// The fields `POST /sandbox` and `POST /sandbox/{id}/fork` share.
#[derive(Debug, Default, Deserialize)]
struct SandboxFields {
    title: Option<String>,
    description: Option<String>,
    tags: Option<Vec<String>>,
    privacy: Option<i64>,
    private_preview: Option<bool>,
    #[serde(default)]
    start_options: Option<StartOptions>,
}

#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    #[serde(flatten)]
    fields: SandboxFields,
    template: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, CreateFile>,
}

#[derive(Debug, Default, Deserialize)]
struct CreateFile {
    code: Option<String>,
    binary_content: Option<String>,
    #[serde(default)]
    is_binary: bool,
}

/// Checked [`SandboxFields`].
struct Fields {
    title: Option<String>,
    description: Option<String>,
    tags: Vec<String>,
    privacy: i64,
    private_preview: bool,
    idle_timeout_secs: Option<u64>,
}

fn check_fields(f: SandboxFields) -> Result<Fields, ApiError> {
    let tags = f.tags.unwrap_or_default();
    if tags.len() > MAX_TAGS {
        return Err(ApiError::bad_request(
            "invalid_tags",
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    if tags
        .iter()
        .any(|t| t.trim().is_empty() || t.len() > 64 || t.contains(','))
    {
        return Err(ApiError::bad_request(
            "invalid_tags",
            "tags must be 1 to 64 characters without commas",
        ));
    }
    let privacy = f.privacy.unwrap_or(2);
    if !(0..=2).contains(&privacy) {
        return Err(ApiError::bad_request(
            "invalid_privacy",
            "privacy must be 0 (public), 1 (unlisted) or 2 (private)",
        ));
    }
    let idle_timeout_secs = match f.start_options {
        Some(o) => check_start(&o)?,
        None => None,
    };
    Ok(Fields {
        title: f.title,
        description: f.description,
        tags,
        privacy,
        // Seed 000: private sandboxes have private previews unless told otherwise.
        private_preview: f.private_preview.unwrap_or(privacy == 2),
        idle_timeout_secs,
    })
}

/// Create a sandbox from a template (by name or id; the SDK's default template is `base`),
/// persistent, with the CodeSandbox fields stored beside it.
async fn create_from_template(
    server: &Arc<Server>,
    auth: &Auth,
    template: &str,
    fields: &Fields,
) -> Result<Sandbox, ApiError> {
    let template = if SDK_DEFAULT_TEMPLATES.contains(&template) {
        sandpit_control::node::images::BASE_TEMPLATE_NAME
    } else {
        template
    };
    // A template made by `POST /templates` is a snapshot: boot from its files and memory.
    let snapshot = server
        .store
        .snapshots
        .get(&auth.workspace_id, template)
        .await?
        .map(|s| s.id);
    let req = sandpit_api_types::CreateSandboxRequest {
        template: if snapshot.is_some() {
            String::new()
        } else {
            template.to_string()
        },
        snapshot,
        mode: sandpit_api_types::SandboxMode::Persistent,
        idle_timeout: fields.idle_timeout_secs.map(|s| format!("{s}s")),
        preview: Some(sandpit_api_types::PreviewSettings {
            privacy: if fields.private_preview {
                sandpit_api_types::PreviewPrivacy::Private
            } else {
                sandpit_api_types::PreviewPrivacy::Public
            },
        }),
        ..Default::default()
    };
    lifecycle::create(server, &auth.workspace_id, &req).await
}

async fn store_fields(server: &Server, row: &Sandbox, f: &Fields) -> Result<(), ControlError> {
    server
        .store
        .csb()
        .upsert_sandbox(&CsbSandboxRow {
            sandbox_id: row.id.to_string(),
            workspace_id: row.workspace_id.to_string(),
            title: f.title.clone(),
            description: f.description.clone(),
            tags: serde_json::to_string(&f.tags).expect("strings serialize"),
            privacy: f.privacy,
            tier: "Micro".into(),
        })
        .await?;
    Ok(())
}

/// Make the workspace directory (and the files of `POST /sandbox`) in a new sandbox.
async fn seed_files(
    server: &Arc<Server>,
    sb: &Authorized,
    files: Vec<(String, Vec<u8>)>,
) -> Result<(), ApiError> {
    let id = sb.id();
    let (agent, _guard, row) = lifecycle::running_agent(server, sb).await?;
    // The workspace and its files belong to the template's `USER`.
    let owner = sandpit_control::node::images::default_user(server, &row).await?;
    let owner = owner.as_deref();
    let failed = |e: sandpit_control::agent::AgentFailure| -> ApiError {
        ControlError::Agent {
            sandbox: id.to_string(),
            what: format!("seeding files: {e:?}"),
        }
        .into()
    };
    agent
        .make_dir(WORKSPACE_PATH, true, owner)
        .await
        .map_err(failed)?;
    for (path, bytes) in files {
        let full = format!("{WORKSPACE_PATH}/{}", path.trim_start_matches('/'));
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))]);
        agent
            .write_file(&full, owner, body, server.cfg.upload_limit)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

fn decode_files(files: BTreeMap<String, CreateFile>) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    use base64::Engine;
    let mut out = Vec::with_capacity(files.len());
    for (path, f) in files {
        let clean =
            sandpit_agent_proto::normalize_path(&format!("/{}", path.trim_start_matches('/')))
                .map_err(|e| ApiError::bad_request("invalid_path", e.message))?;
        let bytes = if f.is_binary {
            let b64 = f.binary_content.unwrap_or_default();
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_file",
                        format!("binary_content of {path:?} is not base64"),
                    )
                })?
        } else {
            f.code.unwrap_or_default().into_bytes()
        };
        out.push((clean, bytes));
    }
    Ok(out)
}

async fn create_sandbox(
    State(server): State<Arc<Server>>,
    auth: Auth,
    OptionalJson(body): OptionalJson<CreateBody>,
) -> CsbResult {
    auth.require("sandbox_create")?;
    let fields = check_fields(body.fields)?;
    let files = decode_files(body.files)?;
    let template = body
        .template
        .unwrap_or_else(|| sandpit_control::node::images::BASE_TEMPLATE_NAME.into());
    let row = create_from_template(&server, &auth, &template, &fields).await?;
    let seeded = async {
        store_fields(&server, &row, &fields).await?;
        seed_files(&server, &Authorized::made_for(&auth, row.clone())?, files).await
    }
    .await;
    if let Err(e) = seeded {
        // Nothing half-made stays behind.
        let _ = lifecycle::destroy(&server, &row.id).await;
        return Err(e.into());
    }
    Ok(ok(
        StatusCode::CREATED,
        json!({"id": row.id, "alias": row.id, "title": fields.title}),
    ))
}

async fn fork_sandbox(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<SandboxFields>,
) -> CsbResult {
    auth.require("sandbox_create")?;
    // Either one of the caller's sandboxes (checked before anything else) or a template the
    // workspace may use.
    let own = own_sandbox(&server, &auth, &id).await.ok();
    let fields = check_fields(body)?;
    let row = match own {
        Some(parent_sb) => {
            let parent = parent_sb.row().clone();
            let mut results = crate::fork::fork(&server, &parent_sb, 1).await?;
            let child = match results.pop() {
                Some(sandpit_api_types::ForkResult::Ok(s)) => s.id,
                Some(sandpit_api_types::ForkResult::Err(e)) => {
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "fork_failed",
                        e.error.message,
                    )
                    .into());
                }
                None => return Err(ApiError::bad_request("fork_failed", "no child").into()),
            };
            let row = own_sandbox(&server, &auth, &child).await?.row().clone();
            // A fork inherits the parent's fields unless the request names them.
            let parent_c = csb_of(&server, &parent).await?;
            let fields = Fields {
                title: fields.title.clone().or(parent_c.title),
                description: fields.description.clone().or(parent_c.description),
                ..fields
            };
            store_fields(&server, &row, &fields).await?;
            return Ok(ok(
                StatusCode::CREATED,
                json!({"id": row.id, "alias": row.id, "title": fields.title, "start_response": null}),
            ));
        }
        None => {
            let is_template = SDK_DEFAULT_TEMPLATES.contains(&id.as_str())
                || server
                    .store
                    .templates
                    .find(&auth.workspace_id, &id)
                    .await?
                    .is_some()
                || server
                    .store
                    .snapshots
                    .get(&auth.workspace_id, &id)
                    .await?
                    .is_some();
            if !is_template {
                return Err(not_found(&id).into());
            }
            create_from_template(&server, &auth, &id, &fields).await?
        }
    };
    let seeded = async {
        store_fields(&server, &row, &fields).await?;
        seed_files(
            &server,
            &Authorized::made_for(&auth, row.clone())?,
            Vec::new(),
        )
        .await
    }
    .await;
    if let Err(e) = seeded {
        let _ = lifecycle::destroy(&server, &row.id).await;
        return Err(e.into());
    }
    Ok(ok(
        StatusCode::CREATED,
        json!({"id": row.id, "alias": row.id, "title": fields.title, "start_response": null}),
    ))
}

// ---- VMs ----

#[derive(Debug, Default, Deserialize)]
struct StartOptions {
    hibernation_timeout_seconds: Option<i64>,
    tier: Option<String>,
    #[allow(dead_code)]
    ipcountry: Option<String>,
    #[allow(dead_code)]
    automatic_wakeup_config: Option<Value>,
}

fn check_timeout(secs: i64) -> Result<u64, ApiError> {
    if !(1..=86400).contains(&secs) {
        return Err(ApiError::bad_request(
            "invalid_hibernation_timeout",
            "hibernation_timeout_seconds must be between 1 and 86400",
        ));
    }
    Ok(secs as u64)
}

fn check_tier(tier: &str) -> Result<&'static (&'static str, &'static str, u32, u32), ApiError> {
    TIERS.iter().find(|t| t.0 == tier).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_tier",
            format!(
                "tier must be one of Pico, Nano, Micro, Small, Medium, Large, XLarge, not {tier:?}"
            ),
        )
    })
}

fn check_start(o: &StartOptions) -> Result<Option<u64>, ApiError> {
    if let Some(t) = &o.tier {
        check_tier(t)?;
    }
    o.hibernation_timeout_seconds.map(check_timeout).transpose()
}

/// The base URL of this server as the caller reached it (`Host`, and `X-Forwarded-Proto`
/// behind a TLS proxy), for the WebSocket URL the SDK connects to.
pub(crate) fn ws_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let tls = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    format!("{}://{host}", if tls { "wss" } else { "ws" })
}

/// Mint an agent gateway token for a sandbox: write access only with `sandbox_edit_code`.
pub async fn mint_agent_token(
    server: &Server,
    auth: &Auth,
    sandbox_id: &str,
) -> Result<String, ControlError> {
    mint_token(server, auth, sandbox_id, None, None).await
}

/// Mint a gateway token; a session's (`username`) is single-use, with the session's
/// permission capped by the caller's scopes.
async fn mint_token(
    server: &Server,
    auth: &Auth,
    sandbox_id: &str,
    username: Option<&str>,
    want: Option<&str>,
) -> Result<String, ControlError> {
    let may_write = auth.scopes.iter().any(|s| s == "sandbox_edit_code");
    let permission = if may_write && want != Some("read") {
        "write"
    } else {
        "read"
    };
    let token = generate_token_with(AGENT_TOKEN_PREFIX);
    let now = now_ms();
    server
        .store
        .csb()
        .prune_agent_tokens(sandbox_id, now)
        .await?;
    server
        .store
        .csb()
        .insert_agent_token(
            &hash_token(&token),
            &CsbAgentTokenRow {
                sandbox_id: sandbox_id.to_string(),
                workspace_id: auth.workspace_id.clone(),
                permission: permission.into(),
                expires_at: now + AGENT_TOKEN_TTL_MS,
                username: username.map(str::to_string),
                single_use: username.is_some(),
            },
        )
        .await?;
    Ok(token)
}

async fn start_vm(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    headers: HeaderMap,
    OptionalJson(opts): OptionalJson<StartOptions>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let timeout = check_start(&opts)?;
    let row = sb.row().clone();
    let bootup_type = match row.status {
        Status::Running => "RUNNING",
        Status::Suspended if server.runtime.has_image(&server.checkpoint_dir(&id)) => "RESUME",
        Status::Suspended => "CLEAN",
        other => {
            return Err(ApiError::conflict(
                "invalid_state",
                format!("a {other} sandbox cannot be started"),
            )
            .into());
        }
    };
    if let Some(secs) = timeout {
        server
            .store
            .sandboxes
            .set_idle_timeout(&auth.workspace_id, &id, secs as i64 * 1000, now_ms())
            .await?;
    }
    if let Some(tier) = &opts.tier {
        let mut c = csb_of(&server, &row).await?;
        c.tier = tier.clone();
        server.store.csb().upsert_sandbox(&c).await?;
    }
    lifecycle::wake(&server, &id).await?;
    server.store.sandboxes.touch(&id, now_ms()).await?;
    let pitcher_token = mint_agent_token(&server, &auth, &id).await?;
    let reconnect_token = mint_agent_token(&server, &auth, &id).await?;
    Ok(ok(
        StatusCode::OK,
        json!({
            "id": id,
            "bootup_type": bootup_type,
            "cluster": "sandpit",
            "pitcher_url": format!("{}{}/{id}", ws_base(&headers), super::gateway::PATH_PREFIX),
            "pitcher_token": pitcher_token,
            "reconnect_token": reconnect_token,
            "pitcher_version": GATEWAY_VERSION,
            "latest_pitcher_version": GATEWAY_VERSION,
            "pitcher_manager_version": GATEWAY_VERSION,
            "workspace_path": WORKSPACE_PATH,
            "user_workspace_path": WORKSPACE_PATH,
            "use_pint": false,
        }),
    ))
}

async fn hibernate_vm(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
) -> CsbResult {
    let id = sb.id().to_string();
    lifecycle::check_may_suspend(&server, &sb).await?;
    lifecycle::suspend(&server, &id).await?;
    Ok(ok(StatusCode::OK, json!({"id": id})))
}

async fn shutdown_vm(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
) -> CsbResult {
    let id = sb.id().to_string();
    lifecycle::check_may_suspend(&server, &sb).await?;
    lifecycle::shutdown(&server, &id).await?;
    Ok(ok(StatusCode::OK, json!({"id": id})))
}

async fn delete_vm(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
) -> CsbResult {
    let id = sb.id().to_string();
    lifecycle::destroy(&server, &id).await?;
    Ok(ok(StatusCode::OK, json!({"id": id})))
}

#[derive(Debug, Deserialize)]
struct HibernationTimeoutBody {
    hibernation_timeout_seconds: i64,
}

async fn hibernation_timeout(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    crate::extract::ApiJson(body): crate::extract::ApiJson<HibernationTimeoutBody>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let secs = check_timeout(body.hibernation_timeout_seconds)?;
    server
        .store
        .sandboxes
        .set_idle_timeout(&auth.workspace_id, &id, secs as i64 * 1000, now_ms())
        .await?;
    Ok(ok(
        StatusCode::OK,
        json!({"id": id, "hibernation_timeout_seconds": secs}),
    ))
}

#[derive(Debug, Deserialize)]
struct SpecsBody {
    tier: String,
}

/// Record the tier. Partial: a running sandbox keeps the resources it booted with until its
/// next clean boot (gVisor's cgroup limits are set at start).
async fn update_specs(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    crate::extract::ApiJson(body): crate::extract::ApiJson<SpecsBody>,
) -> CsbResult {
    let id = sb.id().to_string();
    let tier = check_tier(&body.tier)?;
    // The tier's size applies at once to a running sandbox (and at the wake of a suspended
    // one); a stopped one records it for its next start.
    let row = if matches!(sb.row().status, Status::Running | Status::Suspended) {
        crate::lifecycle::resize(&server, &sb, tier.1).await?
    } else {
        sb.row().clone()
    };
    let mut c = csb_of(&server, &row).await?;
    c.tier = tier.0.to_string();
    server.store.csb().upsert_sandbox(&c).await?;
    Ok(ok(StatusCode::OK, json!({"id": id, "tier": tier.0})))
}

#[derive(Debug, Deserialize)]
struct TagBody {
    vm_ids: Vec<String>,
}

async fn create_tag(
    State(server): State<Arc<Server>>,
    auth: Auth,
    crate::extract::ApiJson(body): crate::extract::ApiJson<TagBody>,
) -> CsbResult {
    auth.require("vm_manage")?;
    if body.vm_ids.is_empty() {
        return Err(ApiError::bad_request("invalid_vm_ids", "vm_ids cannot be empty").into());
    }
    for id in &body.vm_ids {
        own_sandbox(&server, &auth, id).await?;
    }
    let tag_id = new_id("tag");
    let ids = serde_json::to_string(&body.vm_ids).expect("strings serialize");
    server
        .store
        .csb()
        .insert_tag(&tag_id, &auth.workspace_id, &ids, now_ms())
        .await?;
    Ok(ok(StatusCode::OK, json!({"tag_id": tag_id})))
}

#[derive(Debug, Deserialize)]
struct AliasBody {
    tag_id: String,
}

async fn assign_alias(
    State(server): State<Arc<Server>>,
    auth: Auth,
    Path((namespace, alias)): Path<(String, String)>,
    crate::extract::ApiJson(body): crate::extract::ApiJson<AliasBody>,
) -> CsbResult {
    auth.require("vm_manage")?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !valid(&namespace) || !valid(&alias) {
        return Err(ApiError::bad_request(
            "invalid_alias",
            "namespace and alias must be 1 to 64 of [A-Za-z0-9-_.]",
        )
        .into());
    }
    if !server
        .store
        .csb()
        .tag_exists(&auth.workspace_id, &body.tag_id)
        .await?
    {
        return Err(
            ApiError::not_found("tag_not_found", format!("no tag {:?}", body.tag_id)).into(),
        );
    }
    server
        .store
        .csb()
        .set_alias(&auth.workspace_id, &namespace, &alias, &body.tag_id)
        .await?;
    Ok(ok(
        StatusCode::OK,
        json!({
            "alias": alias,
            "namespace": namespace,
            "tag_alias_id": format!("{namespace}@{alias}"),
            "tag_id": body.tag_id,
            "team_id": auth.workspace_id,
        }),
    ))
}

async fn list_clusters(auth: Auth, headers: HeaderMap) -> CsbResult {
    auth.require("sandbox_read")?;
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    Ok(ok(
        StatusCode::OK,
        json!({"clusters": [{"host": host, "slug": "sandpit"}]}),
    ))
}

async fn list_running(State(server): State<Arc<Server>>, auth: Auth) -> CsbResult {
    auth.require("sandbox_read")?;
    let rows = server
        .store
        .sandboxes
        .list(&auth.workspace_id, Some(Status::Running))
        .await?;
    let vms: Vec<Value> = rows
        .iter()
        .map(|r| {
            let res = lifecycle::size_resources(&r.size);
            json!({
                "id": r.id,
                "credit_basis": r.size,
                "last_active_at": rfc3339(r.last_active_at),
                "session_started_at": rfc3339(r.updated_at),
                "specs": {
                    "cpu": res.map(|x| x.cpu_millis.div_ceil(1000)),
                    "memory": res.map(|x| x.memory_bytes >> 30),
                },
            })
        })
        .collect();
    // The limit is the network pool's capacity: every running sandbox holds one slot.
    let limit = server.net.capacity();
    Ok(ok(
        StatusCode::OK,
        json!({"concurrent_vm_count": rows.len(), "concurrent_vm_limit": limit, "vms": vms}),
    ))
}

#[derive(Debug, Deserialize)]
struct TemplateBody {
    #[serde(rename = "forkOf")]
    fork_of: String,
    title: Option<String>,
    description: Option<String>,
    tags: Option<Vec<String>>,
}

/// `POST /templates`: a template is a snapshot (files and memory) of `forkOf` — one of the
/// caller's sandboxes, or a template booted for the purpose and destroyed after. Its id is
/// the `tag`, which `POST /sandbox/{tag}/fork` (the SDK's `create({ id: tag })`) boots from.
async fn create_template(
    State(server): State<Arc<Server>>,
    auth: Auth,
    crate::extract::ApiJson(body): crate::extract::ApiJson<TemplateBody>,
) -> CsbResult {
    auth.require("sandbox_create")?;
    let fields = check_fields(SandboxFields {
        title: body.title,
        description: body.description,
        tags: body.tags,
        ..Default::default()
    })?;
    let own = own_sandbox(&server, &auth, &body.fork_of).await.ok();
    let snapshot = match own {
        Some(sb) => crate::fork::take_snapshot(&server, &sb).await?,
        None => {
            let row = create_from_template(&server, &auth, &body.fork_of, &fields).await?;
            let made = async {
                let sb = Authorized::made_for(&auth, row.clone())?;
                seed_files(&server, &sb, Vec::new()).await?;
                crate::fork::take_snapshot(&server, &sb).await
            }
            .await;
            // The sandbox was only the means to the snapshot.
            let _ = lifecycle::destroy(&server, &row.id).await;
            made?
        }
    };
    Ok(ok(
        StatusCode::CREATED,
        json!({"tag": snapshot.id, "sandboxes": [{"id": snapshot.id, "cluster": "sandpit"}]}),
    ))
}

// ---- sessions ----

#[derive(Debug, Deserialize)]
struct SessionBody {
    session_id: String,
    permission: String,
    git_access_token: Option<String>,
    git_user_email: Option<String>,
    git_user_name: Option<String>,
}

/// The Linux user of a session: `csb-` and the session id, lowercase.
pub fn session_user(session_id: &str) -> Result<String, ApiError> {
    let ok = !session_id.is_empty()
        && session_id.len() <= 20
        && session_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(ApiError::bad_request(
            "invalid_session_id",
            "session_id must be 1 to 20 of [A-Za-z0-9_-]",
        ));
    }
    Ok(format!("csb-{}", session_id.to_ascii_lowercase()))
}

/// Make (or reuse) the session's user: home with the workspace linked in, the SDK's
/// `.private/.env`, git identity and credentials; in the `csb-write` group (which may write
/// the workspace) only for write sessions.
const SESSION_SETUP: &str = r#"u=$1; perm=$2; name=$3; email=$4; tok=$5; ws=$6
h=/home/$u
# Users and groups are written to /etc/passwd and /etc/group directly: minimal images (busybox)
# have no adduser.
grep -q '^csb-write:' /etc/group || echo 'csb-write:x:1999:' >> /etc/group || exit 1
if ! grep -q "^$u:" /etc/passwd; then
  uid=$(awk -F: 'BEGIN{m=1999} $3>m && $3<60000 {m=$3} END{print m+1}' /etc/passwd)
  echo "$u:x:$uid:$uid::$h:/bin/sh" >> /etc/passwd || exit 1
  echo "$u:x:$uid:" >> /etc/group || exit 1
fi
mkdir -p "$h/.private" "$ws" || exit 1
[ -e "$h/workspace" ] || ln -s "$ws" "$h/workspace"
[ -e "$h/.private/.env" ] || : > "$h/.private/.env"
if [ -n "$name$email" ]; then
  printf '[user]\n\tname = %s\n\temail = %s\n' "$name" "$email" > "$h/.gitconfig"
fi
if [ -n "$tok" ]; then
  printf 'https://x-access-token:%s@github.com\n' "$tok" > "$h/.private/.gitcredentials"
  printf '[credential]\n\thelper = store --file %s/.private/.gitcredentials\n' "$h" >> "$h/.gitconfig"
  chmod 600 "$h/.private/.gitcredentials"
fi
chown -R "$u:$u" "$h" || exit 1
chgrp -R csb-write "$ws" && chmod -R g+rwX "$ws" && find "$ws" -type d -exec chmod g+s {} +
# Membership of csb-write (the last field of its line) follows the session's permission.
members=$(grep '^csb-write:' /etc/group | cut -d: -f4 | tr ',' '\n' | grep -vx "$u" | grep -v '^$' | tr '\n' ',')
[ "$perm" = write ] && members="$members$u,"
sed -i "s/^csb-write:.*/csb-write:x:1999:${members%,}/" /etc/group
exit 0
"#;

async fn create_session(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    headers: HeaderMap,
    crate::extract::ApiJson(body): crate::extract::ApiJson<SessionBody>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let user = session_user(&body.session_id)?;
    if !matches!(body.permission.as_str(), "read" | "write") {
        return Err(ApiError::bad_request(
            "invalid_permission",
            "permission must be read or write",
        )
        .into());
    }
    let row = sb.row().clone();
    if row.status != Status::Running {
        return Err(ApiError::conflict(
            "sandbox_not_running",
            "start the VM before creating a session",
        )
        .into());
    }
    let (agent, _guard, _) = lifecycle::running_agent(&server, &sb).await?;
    let argv: Vec<String> = [
        "sh",
        "-c",
        SESSION_SETUP,
        "sh",
        &user,
        &body.permission,
        body.git_user_name.as_deref().unwrap_or(""),
        body.git_user_email.as_deref().unwrap_or(""),
        body.git_access_token.as_deref().unwrap_or(""),
        WORKSPACE_PATH,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (status, err) = agent
        .run_for_stderr(argv, std::time::Duration::from_secs(30))
        .await
        .map_err(|e| ControlError::Agent {
            sandbox: id.clone(),
            what: format!("creating session user: {e:?}"),
        })?;
    if status.exit_code != 0 {
        tracing::warn!(sandbox = %id, stderr = %String::from_utf8_lossy(&err), "session setup failed");
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "session_setup_failed",
            "the session's user could not be made in the sandbox (see the server log)",
        )
        .into());
    }
    let token = mint_token(&server, &auth, &id, Some(&user), Some(&body.permission)).await?;
    let write = body.permission == "write" && auth.scopes.iter().any(|s| s == "sandbox_edit_code");
    Ok(ok(
        StatusCode::OK,
        json!({
            "username": user,
            "pitcher_token": token,
            "pitcher_url": format!("{}{}/{id}", ws_base(&headers), super::gateway::PATH_PREFIX),
            "user_workspace_path": format!("/home/{user}/workspace"),
            "capabilities": [],
            "permissions": {"permission": if write { "write" } else { "read" }},
        }),
    ))
}

// ---- preview tokens (seed 000 paths over the `/v1` preview-token store) ----

fn token_view(t: &PreviewTokenRow) -> Value {
    json!({
        "token_id": t.id,
        "token_prefix": t.token_prefix,
        "expires_at": t.expires_at.map(rfc3339),
        "last_used_at": null,
    })
}

#[derive(Debug, Default, Deserialize)]
struct PreviewTokenBody {
    expires_at: Option<String>,
}

async fn create_preview_token(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    OptionalJson(body): OptionalJson<PreviewTokenBody>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let expires_at = body.expires_at.as_deref().map(parse_expiry).transpose()?;
    let (row, token) =
        crate::preview::mint_token(&server, &id, &auth.workspace_id, expires_at).await?;
    let mut t = token_view(&row);
    t["token"] = json!(token);
    Ok(ok(
        StatusCode::CREATED,
        json!({"sandbox_id": id, "token": t}),
    ))
}

async fn list_preview_tokens(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let now = now_ms();
    let tokens: Vec<Value> = server
        .store
        .previews
        .list_tokens(&auth.workspace_id, &id)
        .await?
        .iter()
        .filter(|t| t.expires_at.is_none_or(|e| e > now))
        .map(token_view)
        .collect();
    Ok(ok(
        StatusCode::OK,
        json!({"sandbox_id": id, "tokens": tokens}),
    ))
}

/// Change a token's expiry; an expiry now or in the past revokes it (how the SDK's
/// `revokeToken` works).
async fn update_preview_token(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
    Path((_sandbox, token_id)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<PreviewTokenBody>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let mut row = server
        .store
        .previews
        .get_token(&auth.workspace_id, &id, &token_id)
        .await?
        .filter(|t| t.revoked_at.is_none())
        .ok_or_else(|| {
            ApiError::not_found("token_not_found", format!("no preview token {token_id:?}"))
        })?;
    let now = now_ms();
    match body.expires_at.as_deref() {
        None => row.expires_at = None,
        Some(text) => {
            let at = crate::util::parse_rfc3339(text).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_expires_at",
                    "expires_at must be an RFC 3339 timestamp",
                )
            })?;
            row.expires_at = Some(at);
        }
    }
    if row.expires_at.is_some_and(|at| at <= now) {
        server
            .store
            .previews
            .revoke_token(&auth.workspace_id, &token_id, now)
            .await?;
    } else {
        server
            .store
            .previews
            .set_token_expiry(&auth.workspace_id, &token_id, row.expires_at)
            .await?;
    }
    Ok(ok(
        StatusCode::OK,
        json!({"sandbox_id": id, "token": token_view(&row)}),
    ))
}

async fn revoke_all_preview_tokens(
    State(server): State<Arc<Server>>,
    sb: CsbSandbox<scope::VmManage>,
) -> CsbResult {
    let (auth, id) = (sb.auth().clone(), sb.id().to_string());
    let now = now_ms();
    for t in server
        .store
        .previews
        .list_tokens(&auth.workspace_id, &id)
        .await?
    {
        server
            .store
            .previews
            .revoke_token(&auth.workspace_id, &t.id, now)
            .await?;
    }
    Ok(ok(StatusCode::OK, json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked() {
        let too_many = SandboxFields {
            tags: Some((0..11).map(|i| format!("t{i}")).collect()),
            ..Default::default()
        };
        assert_eq!(check_fields(too_many).err().unwrap().code, "invalid_tags");
        let bad_privacy = SandboxFields {
            privacy: Some(3),
            ..Default::default()
        };
        assert_eq!(
            check_fields(bad_privacy).err().unwrap().code,
            "invalid_privacy"
        );
        let f = check_fields(SandboxFields {
            privacy: Some(1),
            tags: Some(vec!["a".into()]),
            ..Default::default()
        })
        .unwrap();
        assert!(!f.private_preview);
        assert!(
            check_fields(SandboxFields::default())
                .unwrap()
                .private_preview
        );
    }

    #[test]
    fn timeouts_and_tiers() {
        assert!(check_timeout(0).is_err());
        assert!(check_timeout(86401).is_err());
        assert_eq!(check_timeout(60).unwrap(), 60);
        assert!(check_tier("Huge").is_err());
        assert_eq!(check_tier("Small").unwrap().1, "medium");
    }

    #[test]
    fn websocket_base_follows_the_request() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8080".parse().unwrap());
        assert_eq!(ws_base(&h), "ws://127.0.0.1:8080");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(ws_base(&h), "wss://127.0.0.1:8080");
    }
}
