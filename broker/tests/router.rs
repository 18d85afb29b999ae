//! The router in-process (no sockets): routes, problem documents, limits and authorization.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use broker::server::{AppState, router};
use broker::store::{AuditQuery, SqliteStore, Store};
use tower::ServiceExt;

async fn state(dir: &std::path::Path, inflight: usize) -> Arc<AppState<SqliteStore>> {
    let setup = broker::init::dev(&dir.join("dev"), "127.0.0.1:0").unwrap();
    let mut settings = broker::config::Settings::load(&setup.config).unwrap();
    settings.limits.max_inflight_attestations = inflight;
    let (state, _tls) = broker::server::build(&settings).await.unwrap();
    state
}

async fn call(
    app: axum::Router,
    method: &str,
    uri: &str,
    body: impl Into<Body>,
) -> (StatusCode, serde_json::Value) {
    let resp = app
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

#[tokio::test]
async fn routes_problems_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), 0).await;
    let app = router(state.clone(), 8192);

    let (s, v) = call(app.clone(), "GET", "/healthz", Body::empty()).await;
    assert_eq!((s, v.as_str()), (StatusCode::OK, Some("ok\n")));
    let (s, _) = call(app.clone(), "GET", "/readyz", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(app.clone(), "GET", "/nope", Body::empty()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["type"], "urn:snp-key-broker:problem:not-found");

    let (s, v) = call(app.clone(), "POST", "/v1/challenge", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["nonce"].as_str().unwrap().len() > 40);

    // No in-flight slots: 429 with Retry-After, audited.
    let body = serde_json::json!({
        "nonce": v["nonce"],
        "evidence": { "kind": "snp", "report": "AAAA" },
        "public_key": { "kem": "x25519-hkdf-sha256", "key": "AAAA" },
        "secrets": ["db-key"]
    });
    let (s, v) = call(app.clone(), "POST", "/v1/attest", body.to_string()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["type"], "urn:snp-key-broker:problem:rate-limited");

    // Body limit and malformed JSON.
    let (s, v) = call(app.clone(), "POST", "/v1/attest", "x".repeat(10_000)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["type"], "urn:snp-key-broker:problem:too-large");
    let (s, v) = call(app.clone(), "POST", "/v1/attest", "{").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["type"], "urn:snp-key-broker:problem:malformed");

    // Admin routes without a connection identity (no TLS client certificate): 401.
    for (method, uri) in [
        ("GET", "/v1/admin/secrets"),
        ("PUT", "/v1/admin/policy"),
        ("GET", "/v1/admin/audit"),
        ("DELETE", "/v1/admin/secrets/db-key"),
    ] {
        let (s, v) = call(app.clone(), method, uri, "{}").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {uri}");
        assert_eq!(
            v["type"],
            "urn:snp-key-broker:problem:client-certificate-required"
        );
    }

    let audit = state
        .broker
        .store()
        .query_audit(&AuditQuery::default())
        .await
        .unwrap();
    let reasons: Vec<&str> = audit
        .iter()
        .filter_map(|r| r.detail["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"rate_limited"), "{reasons:?}");
    assert!(reasons.contains(&"too_large"), "{reasons:?}");
    assert!(reasons.contains(&"malformed"), "{reasons:?}");
    assert_eq!(
        audit.iter().filter(|r| r.action == "admin.denied").count(),
        4
    );

    let (s, v) = call(app, "GET", "/metrics", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str()
            .unwrap()
            .contains("broker_http_requests_total{route=\"/healthz\",status=\"200\"} 1")
    );
}
