//! The attest path on simulated evidence, on one core: challenge check, chain (cached),
//! report verification, binding, single-use nonce and audit writes to SQLite, policy, HPKE
//! seal. Next to it, in the same run, the raw ECDSA P-384 verify that dominates verification.
//! `make bench` adds `openssl speed ecdsap384` and prints the ratios. And the same attestation
//! carrying one certificate request (a P-256 CSR verified, bound, decided, issued and recorded
//! by the private CA), for the added cost of a certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use attestation::protocol::{
    AttestRequest, CertificateEntry, EphemeralKey, Evidence, Kem, encode_b64,
};
use attestation::sim::{ReportFields, SimulatedAmd};
use attestation::{AttestationReport, Product, TrustAnchors, Verifier, binding};
use aws_lc_rs::signature;
use base64::Engine;
use broker::keys::MasterKey;
use broker::release::Broker;
use broker::secrets::SecretKind;
use broker::store::SqliteStore;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let sim = SimulatedAmd::generate(Product::Genoa, now).unwrap();
    let fields = ReportFields::new(Product::Genoa);
    let vcek = sim
        .issue_vcek(&fields.chip_id, fields.tcb, now - Duration::from_secs(60))
        .unwrap();
    let master = MasterKey::generate().unwrap();
    let store = rt
        .block_on(SqliteStore::open(&dir.path().join("bench.db")))
        .unwrap();
    let anchors = TrustAnchors::amd()
        .unwrap()
        .dangerous_trust_simulated_root(sim.ark_der())
        .unwrap()
        .with_intermediate(sim.ask_der());
    let broker = Broker::new(
        store,
        Verifier::new(anchors),
        std::sync::Arc::new(
            broker::keyring::Keyring::new(master, Duration::from_secs(600)).unwrap(),
        ),
        Duration::from_secs(600),
    );
    let policy = serde_json::json!({
        "rules": { "sim": { "allOf": [
            { "claim": "measurement", "equals": hex::encode(fields.measurement) },
            { "claim": "policy.debug_allowed", "equals": false },
            { "claim": "tcb.reported.snp", "greaterOrEquals": 1 }
        ] } },
        "secrets": { "db-key": ["sim"] },
        "certificates": { "web": {
            "rules": ["sim"], "dns": ["web.internal"], "usages": ["serverAuth", "clientAuth"]
        } }
    });
    rt.block_on(async {
        broker
            .set_policy(&policy.to_string(), "bench", now)
            .await
            .unwrap();
        broker
            .put_secret("db-key", SecretKind::Opaque, &[7u8; 32], "bench", now)
            .await
            .unwrap();
        broker::pki::ca::create(
            broker.store(),
            broker.keyring(),
            &broker::pki::NewCa::SelfSigned {
                subject: "bench CA".into(),
                days: 30,
            },
            false,
            "bench",
            now,
        )
        .await
        .unwrap();
    });

    let make_request = || {
        let nonce = broker.challenge(SystemTime::now()).unwrap().nonce;
        let key = EphemeralKey::generate(Kem::X25519);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&nonce)
            .unwrap();
        let mut f = fields.clone();
        f.report_data = binding::report_data(&raw, &key.public_key().binding_bytes().unwrap());
        AttestRequest {
            nonce,
            evidence: Evidence::Snp {
                report: encode_b64(&vcek.sign_report(&f).unwrap()),
                certificates: vec![CertificateEntry {
                    kind: "vcek".into(),
                    der: encode_b64(vcek.cert_der()),
                }],
            },
            public_key: key.public_key(),
            secrets: vec!["db-key".into()],
            certificates: Vec::new(),
        }
    };

    // The same request with one certificate request: a P-256 key and its CSR made outside the
    // measured work (the guest makes them), the binding version 2.
    let make_certificate_request = || {
        use rcgen::PublicKeyData;
        let mut req = make_request();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec!["web.internal".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&req.nonce)
            .unwrap();
        let mut f = fields.clone();
        f.report_data = binding::report_data_v2(
            &raw,
            &req.public_key.binding_bytes().unwrap(),
            &[&key.subject_public_key_info()],
        );
        req.evidence = Evidence::Snp {
            report: encode_b64(&vcek.sign_report(&f).unwrap()),
            certificates: vec![CertificateEntry {
                kind: "vcek".into(),
                der: encode_b64(vcek.cert_der()),
            }],
        };
        req.certificates = vec![attestation::protocol::CertificateRequest {
            profile: "web".into(),
            csr: encode_b64(csr.der()),
        }];
        req
    };

    let mut group = c.benchmark_group("attest");
    group.bench_function("attest_simulated_one_core", |b| {
        b.iter_batched(
            make_request,
            |req| {
                rt.block_on(broker.attest(req, "127.0.0.1", SystemTime::now()))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    group.bench_function("attest_with_certificate_request", |b| {
        b.iter_batched(
            make_certificate_request,
            |req| {
                let answer = rt
                    .block_on(broker.attest(req, "127.0.0.1", SystemTime::now()))
                    .unwrap();
                assert_eq!(answer.certificates.len(), 1);
                answer
            },
            BatchSize::SmallInput,
        )
    });

    // Baseline in the same run: one raw ECDSA P-384 verify of a report (aws-lc).
    let report_bytes = vcek.sign_report(&fields).unwrap();
    let report = AttestationReport::parse(&report_bytes).unwrap();
    let point = {
        use der::Decode;
        x509_cert::Certificate::from_der(vcek.cert_der())
            .unwrap()
            .tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes()
            .to_vec()
    };
    let key = signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point);
    let sig = report.signature_fixed();
    group.bench_function("ecdsa_p384_verify_baseline", |b| {
        b.iter(|| key.verify(black_box(report.signed_bytes()), &sig).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
