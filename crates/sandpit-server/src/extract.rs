//! Authorization before anything else: the extractors that load the sandbox a route names and
//! check the caller's workspace before the handler runs, so no lock is taken, no sandbox is
//! woken and nothing is changed for a caller who may not touch it.
//!
//! Every route that names a sandbox takes one of them: [`OwnedSandbox`] on `/v1` (the
//! route's scope, 403 `missing_scope`; then 404 for an unknown sandbox, 403 for another
//! workspace's, as seed 003 asks), [`CsbSandbox`] on the CodeSandbox surface (the scope,
//! then 404 for an unknown, destroyed or another workspace's sandbox: seed 000 reveals
//! nothing) and [`GatewaySandbox`] on the agent gateway (its agent token names the sandbox
//! and workspace). The scope is checked first, so a token without it learns nothing about
//! the sandbox. Both REST extractors dereference to an [`Authorized`], which functions that
//! act on a tenant's sandbox (`lifecycle`, `fork`) take and which only this module makes:
//! holding one is the proof that the checks ran.
//!
//! The check runs before the request body is read (axum runs `FromRequestParts` extractors
//! before the body extractor), and the workspace of a sandbox never changes once a tenant
//! can name it (only pooled sandboxes, owned by the system workspace, are re-keyed), so the
//! row checked here stays the caller's for the whole request.

use sandpit_control::Status;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::auth::{Auth, hash_token};
use crate::csb_store::{CsbAgentTokenRow, CsbTables};
use crate::error::ApiError;
use crate::routes::org::CsbError;
use crate::server::Server;
use crate::store::Sandbox;
use crate::util::now_ms;

/// The API token scopes a route may require ([`OwnedSandbox`]'s parameter).
pub trait Scope {
    const NAME: &'static str;
}

/// The scopes, as types.
pub mod scope {
    macro_rules! scopes {
        ($($ty:ident = $name:literal),* $(,)?) => {$(
            #[derive(Debug, Clone, Copy)]
            pub struct $ty;
            impl super::Scope for $ty {
                const NAME: &'static str = $name;
            }
        )*};
    }
    scopes!(
        SandboxRead = "sandbox_read",
        SandboxEditCode = "sandbox_edit_code",
        SandboxCreate = "sandbox_create",
        VmManage = "vm_manage",
    );
}

/// A sandbox of the caller's workspace, as it was when the check ran.
#[derive(Debug, Clone)]
pub struct Authorized {
    auth: Auth,
    row: Sandbox,
}

impl Authorized {
    /// The caller.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The sandbox's row when it was checked (re-read it under the sandbox's lock before
    /// acting on its status).
    pub fn row(&self) -> &Sandbox {
        &self.row
    }

    pub fn id(&self) -> &str {
        &self.row.id
    }

    pub fn workspace_id(&self) -> &str {
        &self.row.workspace_id
    }

    /// The `/v1` check: 404 `sandbox_not_found` if there is no such sandbox, 403 `forbidden`
    /// if it is another workspace's. Reads the store, nothing else.
    pub async fn load(server: &Server, auth: &Auth, id: &str) -> Result<Self, ApiError> {
        let row = server
            .store
            .sandboxes
            .get(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if row.workspace_id != auth.workspace_id {
            return Err(ApiError::forbidden(
                "forbidden",
                "this sandbox belongs to another workspace",
            ));
        }
        Ok(Authorized {
            auth: auth.clone(),
            row,
        })
    }

    /// The CodeSandbox check: 404 for an unknown, destroyed or another workspace's sandbox.
    pub async fn load_csb(server: &Server, auth: &Auth, id: &str) -> Result<Self, ApiError> {
        match server.store.sandboxes.get(id).await? {
            Some(row)
                if row.workspace_id == auth.workspace_id && row.status != Status::Destroyed =>
            {
                Ok(Authorized {
                    auth: auth.clone(),
                    row,
                })
            }
            _ => Err(not_found(id)),
        }
    }

    /// A sandbox the server has just made for `auth` (create, fork): its row names the
    /// caller's workspace by construction.
    pub(crate) fn made_for(auth: &Auth, row: Sandbox) -> Result<Self, ApiError> {
        if row.workspace_id != auth.workspace_id {
            return Err(crate::error::ControlError::Internal(format!(
                "sandbox {} was made for another workspace",
                row.id
            ))
            .into());
        }
        Ok(Authorized {
            auth: auth.clone(),
            row,
        })
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("sandbox_not_found", format!("no sandbox {id:?}"))
}

/// The `id` segment of the route's path.
async fn path_id(parts: &mut Parts, server: &Arc<Server>) -> Result<String, ApiError> {
    let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, server)
        .await
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    params
        .get("id")
        .cloned()
        .ok_or_else(|| ApiError::not_found("route_not_found", "no such route"))
}

/// The `/v1` extractor: the token's scope `S`, then the sandbox's workspace (see the module
/// docs). Dereferences to the [`Authorized`] sandbox.
#[derive(Debug, Clone)]
pub struct OwnedSandbox<S: Scope>(Authorized, PhantomData<S>);

impl<S: Scope> std::ops::Deref for OwnedSandbox<S> {
    type Target = Authorized;
    fn deref(&self) -> &Authorized {
        &self.0
    }
}

impl<S: Scope + Send + Sync> FromRequestParts<Arc<Server>> for OwnedSandbox<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, ApiError> {
        let auth = Auth::from_request_parts(parts, server).await?;
        auth.require(S::NAME)?;
        let id = path_id(parts, server).await?;
        Ok(OwnedSandbox(
            Authorized::load(server, &auth, &id).await?,
            PhantomData,
        ))
    }
}

/// The CodeSandbox surface's extractor: the token's scope `S`, then 404 whatever the
/// reason, in the CodeSandbox envelope.
#[derive(Debug, Clone)]
pub struct CsbSandbox<S: Scope>(Authorized, PhantomData<S>);

impl<S: Scope> std::ops::Deref for CsbSandbox<S> {
    type Target = Authorized;
    fn deref(&self) -> &Authorized {
        &self.0
    }
}

impl<S: Scope + Send + Sync> FromRequestParts<Arc<Server>> for CsbSandbox<S> {
    type Rejection = CsbError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, CsbError> {
        let auth = Auth::from_request_parts(parts, server).await?;
        auth.require(S::NAME)?;
        let id = path_id(parts, server).await?;
        Ok(CsbSandbox(
            Authorized::load_csb(server, &auth, &id).await?,
            PhantomData,
        ))
    }
}

/// The agent gateway's check: the `token` query parameter is an unexpired agent token of
/// the sandbox the path names, and that sandbox is its workspace's and not destroyed (401,
/// then 404). A single-use token is not spent here: the handler spends it once the request
/// is a proper WebSocket upgrade.
#[derive(Debug, Clone)]
pub struct GatewaySandbox {
    /// The token as presented (to spend it).
    pub token: String,
    pub grant: CsbAgentTokenRow,
    pub row: Sandbox,
}

impl FromRequestParts<Arc<Server>> for GatewaySandbox {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Arc<Server>) -> Result<Self, ApiError> {
        let id = path_id(parts, server).await?;
        let query: HashMap<String, String> =
            serde_urlencoded::from_str(parts.uri.query().unwrap_or("")).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("invalid query string: {e}"))
            })?;
        let token = query
            .get("token")
            .cloned()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("the token query parameter is required"))?;
        let grant = server
            .store
            .csb()
            .agent_token(&id, &hash_token(&token))
            .await?
            .filter(|t| t.expires_at > now_ms())
            .ok_or_else(|| ApiError::unauthorized("unknown or expired agent token"))?;
        let row = server
            .store
            .sandboxes
            .get(&id)
            .await?
            .filter(|r| r.workspace_id == grant.workspace_id && r.status != Status::Destroyed)
            .ok_or_else(|| not_found(&id))?;
        Ok(GatewaySandbox { token, grant, row })
    }
}

// ---- bodies and queries, with errors in the API's shape ----

/// The largest JSON body any route reads.
pub(crate) const MAX_JSON_BODY: usize = 1 << 20;

/// A JSON body, parsed whatever the Content-Type says (so `curl -d` works), with errors in
/// the API's shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = read_body(req).await?;
        parse_json(&body).map(ApiJson)
    }
}

/// An optional JSON body: empty means `T::default()`.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = read_body(req).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&body).map(OptionalJson)
    }
}

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), MAX_JSON_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds 1 MiB",
            )
        })
}

/// Every JSON body of the API is an object. serde's derived structs would also take an
/// array of the fields in order (`["x"]` for `{"name":"x"}`), which the API document never
/// allowed, so anything but an object is refused here, for every JSON route at once.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "invalid request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// Query parameters with errors in the API's shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(query)
            .map(ApiQuery)
            .map_err(|e| {
                ApiError::bad_request("invalid_query", format!("invalid query string: {e}"))
            })
    }
}
