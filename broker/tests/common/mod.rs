//! Helpers shared by the in-process router tests.
#![allow(clippy::unwrap_used, dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use broker::server::Peer;
use tower::ServiceExt;

/// Sends one request through `app` (with a connection identity when `peer` is given) and
/// returns the status and the body as JSON (or as a JSON string when it is not JSON).
pub async fn send(
    app: axum::Router,
    method: &str,
    uri: &str,
    peer: Option<Peer>,
    body: impl Into<Body>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    if let Some(peer) = peer {
        req.extensions_mut().insert(peer);
    }
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}
