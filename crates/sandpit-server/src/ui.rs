//! The web console at `/ui/`: static files embedded at build time (`build.rs` turns `ui/src`
//! and the xterm.js files from `ui/node_modules` into a table), and `/ui/config.json`, what
//! the page cannot know on its own (where previews are served). The page talks to the
//! ordinary `/v1` API with the token the user signs in with; nothing here reads a token.
//!
//! Every answer carries a strict Content-Security-Policy: scripts and connections only from
//! this origin (no inline script, no eval), no frames, no plugins. Inline styles are allowed
//! because xterm.js sizes its cells through `<style>` elements it creates. Files are served
//! with `Cache-Control: no-cache` and a strong `ETag`, so a browser revalidates (304) and an
//! upgraded server's console is never mixed with a cached older one.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::server::Server;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

/// The policy of every console answer (see the module docs).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes (not in the OpenAPI document: they are not API).
pub fn router() -> Router<Arc<Server>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/config.json", get(config))
        .route("/ui/{*path}", get(file))
}

/// An embedded file with its content type and entity tag.
struct Asset {
    path: &'static str,
    body: &'static [u8],
    content_type: &'static str,
    etag: HeaderValue,
}

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    assets::FILES
        .iter()
        .map(|(path, body)| {
            let digest = Sha256::digest(body);
            Asset {
                path,
                body,
                content_type: content_type(path),
                etag: HeaderValue::from_str(&format!("\"{}\"", hex::encode(&digest[..16])))
                    .expect("hex is a valid header value"),
            }
        })
        .collect()
});

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

/// `{"preview_domain": …}`: previews are at `<id>-<port>.<preview_domain>`, with the port
/// of the address the browser reached this server at (the rule of E2B's `domain`).
async fn config(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let domain = crate::e2b::host::sandbox_domain(&server.cfg.preview_domain, host);
    let body = serde_json::json!({ "preview_domain": domain }).to_string();
    let mut resp = (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    secure(resp.headers_mut());
    resp
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    if !assets::INSTALLED {
        return not_installed();
    }
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        let mut resp = (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "not found\n",
        )
            .into_response();
        secure(resp.headers_mut());
        return resp;
    };
    let fresh = headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == asset.etag.as_bytes())
    });
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, asset.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(h);
    resp
}

/// The page a server built without the console's third-party files answers.
fn not_installed() -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Sandpit console not installed</title></head><body>\
         <h1>The web console's assets were not installed</h1>\
         <p>This server was built without the console's third-party files (xterm.js, from \
         <code>ui/node_modules</code>). Run <code>scripts/install-deps</code> (it runs \
         <code>npm ci</code> in <code>ui/</code>), then build the server again \
         (<code>cargo build</code>).</p><p>The API under <code>/v1</code> works without it.</p>\
         </body></html>\n",
    )
        .into_response();
    secure(resp.headers_mut());
    resp
}

fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Harness;
    use tower::ServiceExt;

    async fn get(h: &Harness, path: &str, etag: Option<&HeaderValue>) -> Response {
        let mut req = axum::http::Request::get(path);
        if let Some(t) = etag {
            req = req.header(header::IF_NONE_MATCH, t);
        }
        crate::app(h.server.clone())
            .oneshot(req.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_console_is_served_with_its_headers() {
        let h = Harness::new(|_| {}).await;
        if !assets::INSTALLED {
            // What a build without `ui/node_modules` answers.
            let resp = get(&h, "/ui/", None).await;
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            assert!(String::from_utf8_lossy(&body).contains("scripts/install-deps"));
            return;
        }
        let resp = get(&h, "/ui", None).await;
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(resp.headers()[header::LOCATION], "/ui/");

        let resp = get(&h, "/ui/", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(
            resp.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-cache");
        let etag = resp.headers()[header::ETAG].clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let html = String::from_utf8_lossy(&body);
        // No inline script: every script is a file of this origin.
        assert!(html.contains("<script type=\"module\" src="), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert_eq!(
            get(&h, "/ui/", Some(&etag)).await.status(),
            StatusCode::NOT_MODIFIED
        );

        let resp = get(&h, "/ui/vendor/xterm.mjs", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let resp = get(&h, "/ui/vendor/xterm.css", None).await;
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/css; charset=utf-8"
        );
        for missing in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/vendor/"] {
            assert_eq!(
                get(&h, missing, None).await.status(),
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }

        let resp = get(&h, "/ui/config.json", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["preview_domain"], "localhost");
    }
}
