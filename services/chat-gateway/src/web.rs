//! The web client: static files from `web/`, embedded in the binary at build time and served
//! at `/` by every gateway (no Node build step is needed to run the product).

use crate::error::Failure;
use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use chat_protocol::ErrorCode;

#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct Assets;

/// The browser may run only the client's own scripts and talk only to this origin: a
/// message that slipped through as HTML still could not run anything.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; \
     frame-ancestors 'none'";

pub async fn asset(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(file) = Assets::get(path) else {
        return Failure::new(ErrorCode::NotFound, "no such endpoint").into_response();
    };
    let mime = HeaderValue::from_str(file.metadata.mimetype())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
        ],
        file.data,
    )
        .into_response()
}
