//! The dashboard at `/ui/`: a page, a style sheet and a script compiled into the binary
//! (no build step, nothing fetched from elsewhere), which log in with a domain user and
//! then read the same `/api` resources any client reads, with that user's session.
//!
//! The files themselves need no session (they hold no data); everything they show
//! comes through the API, which checks the session and the role of every call, so the
//! buttons the page hides from a ReadOnly user would be refused anyway. The page is
//! served with a Content-Security-Policy that allows scripts, styles and requests from
//! this origin only and no inline script at all: whatever a VM or user name holds, the
//! script puts it in the page as text, and the browser would run no script smuggled in.

use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use super::ApiState;

/// Where the dashboard lives; `/ui` redirects here.
pub const PATH: &str = "/ui/";

const INDEX_HTML: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// The page's policy: its own script and style sheet, API calls to its own origin, SVG
/// charts drawn by the script (no images fetched), no frames, no plugins, no forms
/// posted anywhere (the login is the script's `fetch`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's files, each with its headers.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent(PATH) }))
        .route(PATH, get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route(
            "/ui/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// Whether `path` is one of the dashboard's files, which need no session.
pub(super) fn is_asset(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/ui" | PATH | "/ui/dashboard.js" | "/ui/dashboard.css")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    // A new endpoint version brings new files: the browser asks again each time rather
    // than run an old script against a new API.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// Every API answer but the dashboard's files is data of the moment (and may be
/// confidential): no browser or proxy keeps it, unless the handler said otherwise.
pub(super) async fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_script_and_style_from_files_and_has_no_inline_script() {
        assert!(INDEX_HTML.contains(r#"<script src="dashboard.js""#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="dashboard.css""#));
        // CSP forbids inline script and style: any in the page would silently not run.
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        assert!(!INDEX_HTML.contains("<style") && !INDEX_HTML.contains("style="));
        for handler in ["onclick", "onload", "onsubmit", "onerror", "javascript:"] {
            assert!(!INDEX_HTML.contains(handler), "{handler}");
        }
        // The script writes names from the inventory as text only.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("eval("));
    }
}
