//! The router in-process (no sockets): routes, problem documents, limits and authorization.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

mod common;

use axum::body::Body;
use axum::http::StatusCode;
use broker::server::{AppState, router};
use broker::store::{AnyStore, AuditQuery, Store};

async fn state(dir: &std::path::Path, inflight: usize) -> Arc<AppState<AnyStore>> {
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
    common::send(app, method, uri, None, body).await
}

#[tokio::test]
async fn routes_problems_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), 0).await;
    let app = router(state.clone(), 8192);

    let (s, v) = call(app.clone(), "GET", "/healthz", Body::empty()).await;
    assert_eq!((s, v.as_str()), (StatusCode::OK, Some("ok\n")));
    let (s, v) = call(app.clone(), "GET", "/readyz", Body::empty()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("SIMULATED AMD root"), "{v}");
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
    assert!(
        v.as_str()
            .unwrap()
            .contains("broker_dangerous_simulated_root 1")
    );
}

#[tokio::test]
async fn unauthenticated_refusals_cannot_grow_the_audit_log_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), 8).await;
    let app = router(state.clone(), 256 * 1024);

    // A 60 KB unknown field name: echoed truncated, in the answer and the audit row alike.
    let long = "k".repeat(60_000);
    let body = format!("{{\"{long}\": 1}}");
    let (s, v) = call(app.clone(), "POST", "/v1/attest", body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().len() < 1000, "{} bytes", v.to_string().len());

    // A flood of malformed requests and forged nonces from one source.
    for i in 0..150 {
        let body = if i % 2 == 0 {
            "{".to_string()
        } else {
            serde_json::json!({
                "nonce": "forged",
                "evidence": { "kind": "snp", "report": "AAAA" },
                "public_key": { "kem": "x25519-hkdf-sha256", "key": "AAAA" },
                "secrets": ["db-key"]
            })
            .to_string()
        };
        let (s, _) = call(app.clone(), "POST", "/v1/attest", body).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::FORBIDDEN,
            "{s}"
        );
    }
    let store = state.broker.store();
    let all = store
        .query_audit(&AuditQuery {
            action: Some("attest".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let budget = broker::audit::SampleBudget::default().per_source as usize;
    assert_eq!(all.len(), budget, "one source gets its budget of rows");
    let bytes: usize = all.iter().map(|r| r.detail.to_string().len()).sum();
    assert!(bytes < budget * 1000, "{bytes} bytes of audit detail");

    // What was not recorded one row each is counted in one summary row.
    state
        .broker
        .flush_audit_summary(
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(60),
        )
        .await;
    let summary = store
        .query_audit(&AuditQuery {
            action: Some("audit.suppressed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].detail["suppressed"], 151 - budget as u64);
    assert_eq!(summary[0].detail["top_sources"][0]["source"], "unknown");

    // Every refusal is still counted in the metrics.
    let (_, m) = call(app, "GET", "/metrics", Body::empty()).await;
    let m = m.as_str().unwrap();
    assert!(
        m.contains("broker_attestations_total{outcome=\"refused\",reason=\"malformed\"} 76"),
        "{m}"
    );
    assert!(m.contains("reason=\"nonce_malformed\"} 75"), "{m}");
}

#[tokio::test]
async fn without_kbs_there_is_no_kbs_route_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let setup = broker::init::dev(&dir.path().join("dev"), "127.0.0.1:0").unwrap();
    let mut settings = broker::config::Settings::load(&setup.config).unwrap();
    settings.kbs.enabled = false;
    let (state, _tls) = broker::server::build(&settings).await.unwrap();
    let app = router(state.clone(), 64 * 1024);
    for (method, uri, body) in [
        (
            "POST",
            "/kbs/v0/auth",
            r#"{"version":"0.4.0","tee":"snp","extra-params":{}}"#,
        ),
        ("GET", "/kbs/v0/resource/default/key/1", ""),
        ("GET", "/.well-known/jwks.json", ""),
        ("POST", "/v1/token", "{}"),
    ] {
        let (s, v) = call(app.clone(), method, uri, body.to_string()).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}: {v}");
        assert_eq!(v["type"], "urn:snp-key-broker:problem:not-found", "{uri}");
    }
    // And no token key was made.
    assert!(
        state
            .broker
            .store()
            .broker_keys("ear-es256")
            .await
            .unwrap()
            .is_empty()
    );
}
