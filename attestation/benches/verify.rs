//! Cost of verification: parse + full verify of a report against a cached chain, chain
//! verification alone, and the raw ECDSA P-384 verify (aws-lc) as an in-run baseline.
//! `make bench` also measures `openssl speed ecdsap384` in the same run and prints ratios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use attestation::certs::decode_pem_or_der;
use attestation::{AttestationReport, Endorsements, TrustAnchors, Verifier};
use aws_lc_rs::signature;
use criterion::{Criterion, criterion_group, criterion_main};

const REPORT: &[u8] = include_bytes!("../tests/data/trustee-milan-v2/report.bin");
const VCEK: &[u8] = include_bytes!("../tests/data/trustee-milan-v2/vek.der");
const CHAIN: &[u8] = include_bytes!("../tests/data/trustee-milan-v2/ask_ark.pem");

fn bench(c: &mut Criterion) {
    // 2025-09-01, inside the VCEK's validity.
    let at = UNIX_EPOCH + Duration::from_secs(1_756_684_800);
    let verifier = Verifier::new(TrustAnchors::amd().unwrap());
    let endorsements = Endorsements {
        vek: VCEK.to_vec(),
        chain: decode_pem_or_der(CHAIN, "chain").unwrap(),
        crls: Vec::new(),
    };
    let chain = verifier.verify_chain(&endorsements, at).unwrap();

    c.bench_function("report_verify_cached_chain", |b| {
        b.iter(|| {
            verifier
                .verify_report(black_box(REPORT), &chain, at)
                .unwrap()
        })
    });
    c.bench_function("chain_verify", |b| {
        b.iter(|| verifier.verify_chain(black_box(&endorsements), at).unwrap())
    });

    // Baseline: one ECDSA P-384/SHA-384 verify of the same bytes with the same library.
    let report = AttestationReport::parse(REPORT).unwrap();
    let vcek = x509_cert_key(VCEK);
    let key = signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, vcek);
    let sig = report.signature_fixed();
    c.bench_function("ecdsa_p384_verify_baseline", |b| {
        b.iter(|| key.verify(black_box(report.signed_bytes()), &sig).unwrap())
    });
}

fn x509_cert_key(der: &[u8]) -> Vec<u8> {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(der).unwrap();
    cert.tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes()
        .to_vec()
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
