//! Who counts as an operator: only certificates from the operator CA that are explicitly
//! operator certificates (clientAuth and an operator URI SAN). A workload certificate the
//! broker releases, or its own server certificate, is never an admin credential. Also the
//! admin API's input handling: names, bodies, shape errors, transactions with the audit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use broker::server::{AppState, Peer, router};
use broker::store::{AnyStore, AuditQuery, Store};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A dev setup whose operator CA the test holds the key of.
struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        broker::init::dev(&dir, "127.0.0.1:0").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("operator-ca.pem"), cert.pem()).unwrap();
        Setup {
            _tmp: tmp,
            dir,
            ca: Issuer::new(params, key),
        }
    }

    fn issue(&self, params: CertificateParams) -> (KeyPair, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (key, cert.der().clone())
    }

    fn settings(&self) -> broker::config::Settings {
        broker::config::Settings::load(&self.dir.join("broker.toml")).unwrap()
    }

    async fn state(&self) -> Arc<AppState<AnyStore>> {
        broker::server::build(&self.settings()).await.unwrap().0
    }
}

fn pem_chain(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    chain: &[CertificateDer<'static>],
    body: impl Into<Body>,
) -> (StatusCode, serde_json::Value) {
    let peer = Peer {
        addr: SocketAddr::from(([127, 0, 0, 9], 40000)),
        client_chain: chain.to_vec(),
    };
    common::send(app.clone(), method, uri, Some(peer), body).await
}

#[tokio::test]
async fn only_explicit_operator_certificates_administer() {
    let setup = Setup::new();
    let state = setup.state().await;
    let app = router(state.clone(), 64 * 1024);

    let operator = {
        let (_k, c) = setup.issue(broker::init::operator_params("alice").unwrap());
        vec![c]
    };
    let no_eku = {
        let mut p = broker::init::operator_params("alice").unwrap();
        p.extended_key_usages.clear();
        vec![setup.issue(p).1]
    };
    let server_auth_only = {
        let mut p = broker::init::operator_params("alice").unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        vec![setup.issue(p).1]
    };
    let no_operator_san = {
        let mut p = CertificateParams::new(vec!["web.internal".into()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        vec![setup.issue(p).1]
    };
    let two_names = {
        let mut p = broker::init::operator_params("alice").unwrap();
        p.subject_alt_names.push(SanType::URI(
            "urn:snp-key-broker:operator:mallory".try_into().unwrap(),
        ));
        vec![setup.issue(p).1]
    };
    // What a guest receives in `make demo`: the workload's certificate (and the broker's own,
    // which the e2e tests release as a tls-key).
    let released = pem_chain(&setup.dir.join("web-tls.pem"));
    let server = pem_chain(&setup.dir.join("server.pem"));

    for (label, chain, reason) in [
        ("no extended key usage", &no_eku, "no clientAuth"),
        // webpki already refuses an extended key usage without clientAuth.
        (
            "serverAuth only",
            &server_auth_only,
            "untrusted certificate",
        ),
        (
            "clientAuth without operator SAN",
            &no_operator_san,
            "not an operator certificate",
        ),
        (
            "two operator names",
            &two_names,
            "not an operator certificate",
        ),
        (
            "released workload certificate",
            &released,
            "untrusted certificate",
        ),
        ("the server's certificate", &server, "untrusted certificate"),
    ] {
        for (method, uri, body) in [
            ("GET", "/v1/admin/secrets", ""),
            ("PUT", "/v1/admin/policy", "{}"),
            ("DELETE", "/v1/admin/secrets/db-key", ""),
        ] {
            let (s, v) = call(&app, method, uri, chain, body).await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{label}: {method} {uri}: {v}");
            assert_eq!(
                v["type"], "urn:snp-key-broker:problem:client-certificate-refused",
                "{label}"
            );
            assert!(
                v["detail"].as_str().unwrap().contains(reason),
                "{label}: {v}"
            );
        }
    }
    let (s, v) = call(&app, "GET", "/v1/admin/secrets", &operator, "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        &app,
        "POST",
        "/v1/admin/secrets/db-key/generate",
        &operator,
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // Refusals are recorded with the peer and the presented certificate's fingerprint, not
    // under the subject the caller chose; the operator's changes under its name.
    let audit = state
        .broker
        .store()
        .query_audit(&AuditQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let denied: Vec<_> = audit
        .iter()
        .filter(|r| r.action == "admin.denied")
        .collect();
    assert_eq!(denied.len(), 18);
    for r in &denied {
        assert_eq!(r.actor, "unauthenticated 127.0.0.9");
        assert_eq!(r.detail["peer"], "127.0.0.9");
        assert_eq!(r.detail["certificate_sha256"].as_str().unwrap().len(), 64);
    }
    let put = audit.iter().find(|r| r.action == "secret.put").unwrap();
    assert_eq!(put.actor, "operator alice");

    // An allow-list narrows who may, by operator name.
    let mut settings = setup.settings();
    settings.tls.operator_names = Some(vec!["bob".into()]);
    let narrowed = broker::server::build(&settings).await.unwrap().0;
    let app = router(narrowed, 64 * 1024);
    let (s, v) = call(&app, "GET", "/v1/admin/secrets", &operator, "").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("operator not allowed")
    );
}

#[tokio::test]
async fn no_certificate_the_broker_serves_or_releases_may_be_an_operator_credential() {
    let setup = Setup::new();
    // Uploading a tls-key whose certificate would pass as an operator certificate is refused.
    let state = setup.state().await;
    let app = router(state.clone(), 64 * 1024);
    let (op_key, op_cert) = setup.issue(broker::init::operator_params("alice").unwrap());
    let operator = vec![op_cert.clone()];
    let rogue_pem = format!("{}{}", op_key.serialize_pem(), der_to_pem(&op_cert));
    let body = serde_json::json!({
        "kind": "tls-key",
        "value": attestation::protocol::encode_b64(rogue_pem.as_bytes()),
    });
    let (s, v) = call(
        &app,
        "PUT",
        "/v1/admin/secrets/rogue",
        &operator,
        body.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("operator certificate")
    );

    // Also when its issuer is not (yet) the operator CA: a guest could add the intermediate
    // that chains it there, or wait for its validity to begin.
    let other = Setup::new();
    let (k, c) = other.issue(broker::init::operator_params("alice").unwrap());
    let leaf_only = format!("{}{}", k.serialize_pem(), der_to_pem(&c));
    let body = serde_json::json!({
        "kind": "tls-key",
        "value": attestation::protocol::encode_b64(leaf_only.as_bytes()),
    });
    let (s, v) = call(
        &app,
        "PUT",
        "/v1/admin/secrets/rogue2",
        &operator,
        body.to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // One stored behind the API's back (an older broker, a restored backup) stops the start.
    let settings = setup.settings();
    let master = broker::keys::MasterKey::load(&settings.master_key).unwrap();
    let sealed = master
        .record_cipher()
        .unwrap()
        .seal("rogue", 1, rogue_pem.as_bytes())
        .unwrap();
    let record = broker::store::StoredSecret {
        name: "rogue".into(),
        version: 1,
        kind: "tls-key".into(),
        meta: serde_json::json!({}),
        sealed,
        key_version: 1,
    };
    let audit = broker::store::AuditRecord {
        id: 0,
        at: 0,
        actor: "test".into(),
        action: "secret.put".into(),
        outcome: "ok".into(),
        detail: serde_json::json!({}),
    };
    state
        .broker
        .store()
        .insert_secret(&record, 0, "test", &audit)
        .await
        .unwrap();
    drop(app);
    drop(state);
    let e = broker::server::build(&settings).await.unwrap_err();
    assert!(e.to_string().contains("secret rogue"), "{e}");

    // A server certificate that would pass as an operator certificate stops the start.
    let setup = Setup::new();
    let mut p = broker::init::operator_params("web").unwrap();
    p.subject_alt_names
        .push(SanType::DnsName("localhost".try_into().unwrap()));
    p.extended_key_usages
        .push(ExtendedKeyUsagePurpose::ServerAuth);
    let (key, cert) = setup.issue(p);
    std::fs::write(setup.dir.join("server.pem"), der_to_pem(&cert)).unwrap();
    std::fs::remove_file(setup.dir.join("server.key")).unwrap();
    broker::keys::write_private_file(
        &setup.dir.join("server.key"),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let e = broker::server::build(&setup.settings()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("would be accepted as an operator certificate"),
        "{e}"
    );
}

fn der_to_pem(cert: &CertificateDer<'_>) -> String {
    attestation::sim::to_pem(cert.as_ref())
}

#[tokio::test]
async fn admin_input_names_bodies_and_shapes() {
    let setup = Setup::new();
    let state = setup.state().await;
    let app = router(state.clone(), 64 * 1024);
    let (_k, c) = setup.issue(broker::init::operator_params("alice").unwrap());
    let op = vec![c];

    // Names that are path tricks are refused by every route.
    for uri in [
        "/v1/admin/secrets/..",
        "/v1/admin/secrets/.",
        "/v1/admin/secrets/nope%2F..%2Fdb-key",
    ] {
        let (s, v) = call(&app, "DELETE", uri, &op, "").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
        let (s, _) = call(&app, "POST", &format!("{uri}/rotate"), &op, "").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}");
    }

    // A valid policy between the default body limit and the policy limit is accepted.
    let mut secrets = serde_json::Map::new();
    for i in 0..4000 {
        secrets.insert(format!("secret-{i:05}"), serde_json::json!(["r"]));
    }
    let big = serde_json::json!({
        "rules": { "r": { "claim": "vmpl", "equals": 0 } },
        "secrets": secrets,
    })
    .to_string();
    assert!(
        big.len() > 64 * 1024 && big.len() < 1024 * 1024,
        "{}",
        big.len()
    );
    let (s, v) = call(&app, "PUT", "/v1/admin/policy", &op, big).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Duplicate keys are refused, naming the path.
    let dup =
        r#"{"rules": {"r": {"claim": "vmpl", "equals": 0}}, "secrets": {"a": ["r"], "a": []}}"#;
    let (s, v) = call(&app, "PUT", "/v1/admin/policy", &op, dup).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("/secrets/a"), "{v}");

    // Shape errors are 400, like syntax errors (the protocol docs say so).
    let (s, v) = call(
        &app,
        "PUT",
        "/v1/admin/secrets/x",
        &op,
        r#"{"kind": 1, "value": "AA=="}"#,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(&app, "POST", "/v1/attest", &[], r#"{"nonce": 1}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["type"], "urn:snp-key-broker:problem:malformed");

    // Audit prune: audited itself, refused for a time in the future.
    let (s, v) = call(&app, "DELETE", "/v1/admin/audit?before=1", &op, "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["deleted"], 0);
    let (s, _) = call(
        &app,
        "DELETE",
        "/v1/admin/audit?before=99999999999",
        &op,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let audit = state
        .broker
        .store()
        .query_audit(&AuditQuery {
            action: Some("audit.prune".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor, "operator alice");
}
