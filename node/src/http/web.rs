//! The browser chat page: static assets compiled into the binary (`node/web/`).
//!
//! No build step and no network at run time: `index.html`, `app.js`, `style.css`,
//! `icon.svg` and the service worker `sw.js` (push notifications) are embedded with
//! `include_str!` and served with their content type, a strong `ETag` (answering
//! `If-None-Match` with 304), `Cache-Control: no-cache` (the browser revalidates, so a
//! new binary's page is picked up at once) and a strict same-origin Content Security
//! Policy. The page speaks only the client protocol
//! (`docs/protocol.md`).

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// Only this origin's scripts, styles, images, connections (WebSocket included) and
/// service worker; no inline code, no frames, no plugins. The worker gets the same
/// policy, so it too can only talk to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; worker-src 'self'; manifest-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Asset {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        Asset {
            body,
            content_type,
            etag: format!("\"{hex}\""),
        }
    }
}

static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../web/index.html"),
        "text/html; charset=utf-8",
    )
});
static APP: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../web/app.js"),
        "text/javascript; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../web/style.css"),
        "text/css; charset=utf-8",
    )
});
static ICON: LazyLock<Asset> =
    LazyLock::new(|| Asset::new(include_str!("../../web/icon.svg"), "image/svg+xml"));
/// Registered with scope `/` (its own folder), so no `Service-Worker-Allowed` header.
static WORKER: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../web/sw.js"),
        "text/javascript; charset=utf-8",
    )
});

/// `GET /`, `/app.js`, `/style.css`, `/icon.svg`, `/sw.js` (HEAD too).
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/app.js",
            get(|h: HeaderMap| async move { serve(&APP, &h) }),
        )
        .route(
            "/style.css",
            get(|h: HeaderMap| async move { serve(&STYLE, &h) }),
        )
        .route(
            "/icon.svg",
            get(|h: HeaderMap| async move { serve(&ICON, &h) }),
        )
        .route(
            "/sw.js",
            get(|h: HeaderMap| async move { serve(&WORKER, &h) }),
        )
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == asset.etag || t.trim() == "*")
        });
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(etag) = HeaderValue::from_str(&asset.etag) {
        h.insert(header::ETAG, etag);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
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
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_light() {
        let total: usize = [&INDEX, &APP, &STYLE, &ICON, &WORKER]
            .iter()
            .map(|a| a.body.len())
            .sum();
        assert!(total < 150 * 1024, "page weight {total} bytes");
    }

    #[test]
    fn a_matching_etag_gets_304_with_the_same_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&APP.etag).unwrap(),
        );
        let res = serve(&APP, &h);
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            res.headers()[header::CONTENT_SECURITY_POLICY],
            HeaderValue::from_static(CSP)
        );
        let res = serve(&APP, &HeaderMap::new());
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }

    #[test]
    fn the_service_worker_is_javascript_and_allowed_by_the_policy() {
        let res = serve(&WORKER, &HeaderMap::new());
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert!(CSP.contains("worker-src 'self'"));
        assert!(WORKER.body.contains("addEventListener('push'"));
    }
}
