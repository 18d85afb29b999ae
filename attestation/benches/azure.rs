//! Cost of verifying Azure vTPM evidence (HCL report + TPM quote) against a cached chain,
//! beside a bare SNP report from the same simulated chip in the same run (the baseline the
//! ratio in `make bench` is taken against) and one raw RSA-2048 PKCS#1 verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use attestation::sim::{ReportFields, SimulatedAmd, SimulatedVtpm};
use attestation::{Endorsements, HclReport, Product, TrustAnchors, Verifier, binding};
use aws_lc_rs::signature;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let now = SystemTime::now();
    let amd = SimulatedAmd::generate(Product::Genoa, now).unwrap();
    let mut fields = ReportFields::new(Product::Genoa);
    let vcek = amd
        .issue_vcek(&fields.chip_id, fields.tcb, now - Duration::from_secs(3600))
        .unwrap();
    let anchors = TrustAnchors::amd()
        .unwrap()
        .dangerous_trust_simulated_root(amd.ark_der())
        .unwrap()
        .with_intermediate(amd.ask_der());
    let verifier = Verifier::new(anchors);
    let chain = verifier
        .verify_chain(
            &Endorsements {
                vek: vcek.cert_der().to_vec(),
                ..Default::default()
            },
            now,
        )
        .unwrap();

    let bound = binding::report_data(b"nonce", b"key");
    fields.report_data = bound;
    let report = vcek.sign_report(&fields).unwrap();
    let vtpm = SimulatedVtpm::generate().unwrap();
    let hcl = vtpm.hcl_report(&vcek, &fields, &bound).unwrap();
    let quote = vtpm.quote(&bound).unwrap();

    c.bench_function("azure/snp_report_verify_baseline", |b| {
        b.iter(|| {
            verifier
                .verify_report(black_box(&report), &chain, now)
                .unwrap()
        })
    });
    c.bench_function("azure/az_snp_vtpm_verify", |b| {
        b.iter(|| {
            let parsed = HclReport::parse(black_box(&hcl)).unwrap();
            let v = verifier
                .verify_az_snp_vtpm(&parsed, black_box(&quote), &chain, now)
                .unwrap();
            v.check_binding(b"nonce", b"key").unwrap();
        })
    });
    let (n, e) = vtpm.ak_public();
    let ak = signature::RsaPublicKeyComponents { n: &n, e: &e };
    c.bench_function("azure/rsa2048_pkcs1_verify_baseline", |b| {
        b.iter(|| {
            ak.verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                black_box(&quote.message),
                &quote.signature,
            )
            .unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
