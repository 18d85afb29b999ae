//! Prints a real protocol transcript on simulated evidence: the messages of `/v1/challenge`
//! and `/v1/attest` and the problem documents of refusals, as docs/protocol.md shows them.
//! Run: `cargo run -p broker --example transcript`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, SystemTime};

use attestation::protocol::{
    AttestRequest, CertificateEntry, EphemeralKey, Evidence, Kem, encode_b64,
};
use attestation::sim::{ReportFields, SimulatedAmd};
use attestation::{Product, TrustAnchors, Verifier, binding};
use base64::Engine;
use broker::keys::MasterKey;
use broker::release::Broker;
use broker::secrets::SecretKind;
use broker::server::Problem;
use broker::store::SqliteStore;

fn shorten(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.len() > 120 => {
            *s = format!("{}…{} ({} chars)", &s[..40], &s[s.len() - 20..], s.len());
        }
        serde_json::Value::Object(m) => m.values_mut().for_each(shorten),
        serde_json::Value::Array(a) => a.iter_mut().for_each(shorten),
        _ => {}
    }
}

fn show(title: &str, v: &impl serde::Serialize) {
    let mut v = serde_json::to_value(v).unwrap();
    shorten(&mut v);
    println!(
        "### {title}\n\n```json\n{}\n```\n",
        serde_json::to_string_pretty(&v).unwrap()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let sim = SimulatedAmd::generate(Product::Genoa, now).unwrap();
    let fields = ReportFields::new(Product::Genoa);
    let vcek = sim
        .issue_vcek(&fields.chip_id, fields.tcb, now - Duration::from_secs(60))
        .unwrap();
    let master = MasterKey::generate().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    let anchors = TrustAnchors::amd()
        .unwrap()
        .dangerous_trust_simulated_root(sim.ark_der())
        .unwrap();
    let broker = Broker::new(
        store,
        Verifier::new(anchors),
        std::sync::Arc::new(
            broker::keyring::Keyring::new(master, Duration::from_secs(60)).unwrap(),
        ),
        Duration::from_secs(60),
    );
    let policy = serde_json::json!({
        "rules": { "web": { "allOf": [
            { "claim": "measurement", "equals": hex::encode(fields.measurement) },
            { "claim": "policy.debug_allowed", "equals": false }
        ] } },
        "secrets": { "db-key": ["web"] }
    });
    broker
        .set_policy(&policy.to_string(), "transcript", now)
        .await
        .unwrap();
    broker
        .put_secret(
            "db-key",
            SecretKind::Opaque,
            b"an example data key, 32 bytes!!!",
            "transcript",
            now,
        )
        .await
        .unwrap();

    let challenge = broker.challenge(SystemTime::now()).unwrap();
    show("POST /v1/challenge → 200", &challenge);

    let key = EphemeralKey::generate(Kem::X25519);
    let make = |nonce: &str, f: &ReportFields| {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(nonce)
            .unwrap();
        let mut f = f.clone();
        f.report_data = binding::report_data(&raw, &key.public_key().binding_bytes().unwrap());
        AttestRequest {
            nonce: nonce.to_string(),
            evidence: Evidence::Snp {
                report: encode_b64(&vcek.sign_report(&f).unwrap()),
                certificates: vec![
                    CertificateEntry {
                        kind: "vcek".into(),
                        der: encode_b64(vcek.cert_der()),
                    },
                    CertificateEntry {
                        kind: "ask".into(),
                        der: encode_b64(sim.ask_der()),
                    },
                ],
            },
            public_key: key.public_key(),
            secrets: vec!["db-key".into()],
            certificates: Vec::new(),
        }
    };
    let request = make(&challenge.nonce, &fields);
    show("POST /v1/attest (request)", &request);
    let response = broker
        .attest(request.clone(), "127.0.0.1", SystemTime::now())
        .await
        .unwrap();
    show("POST /v1/attest → 200", &response);
    println!(
        "(opened by the guest: {:?})\n",
        String::from_utf8_lossy(&key.open(&response.secrets[0]).unwrap())
    );

    let replay = broker
        .attest(request, "127.0.0.1", SystemTime::now())
        .await
        .unwrap_err();
    show("The same request again → 409", &Problem::from(&replay));

    let mut debug = fields.clone();
    debug.policy |= 1 << 19;
    let nonce = broker.challenge(SystemTime::now()).unwrap().nonce;
    let refused = broker
        .attest(make(&nonce, &debug), "127.0.0.1", SystemTime::now())
        .await
        .unwrap_err();
    show(
        "A guest that allows debugging → 403",
        &Problem::from(&refused),
    );

    let nonce = broker.challenge(SystemTime::now()).unwrap().nonce;
    let mut req = make(&nonce, &fields);
    req.public_key = EphemeralKey::generate(Kem::X25519).public_key();
    let refused = broker
        .attest(req, "127.0.0.1", SystemTime::now())
        .await
        .unwrap_err();
    show(
        "REPORT_DATA binds another key → 403",
        &Problem::from(&refused),
    );
}
