//! Genuine AMD evidence verifies; broken evidence is refused with the exact reason.
//! Vectors are copies of the project's shared set (see tests/data/SOURCE.txt).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::certs::decode_pem_or_der;
use attestation::{
    CertRole, Endorsements, Error, HclReport, Product, RootKind, SigningKeyKind, TcbComponent,
    TrustAnchors, Verifier,
};

fn data(path: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Seconds since the epoch → time.
fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
/// 2025-09-01T00:00:00Z: inside the validity of every genuine certificate in the set
/// (the VLEK is valid 2024-12-10..2025-12-10; the newest VCEK from 2025-05-27).
const SEPT_2025: u64 = 1_756_684_800;
/// 2026-11-22T00:00:00Z: the day this test was written; the VLEK had expired by then.
const NOV_2026: u64 = 1_795_305_600;
/// 2024-01-01T00:00:00Z: inside the validity of the Constellation VLEK.
const JAN_2024: u64 = 1_704_067_200;

fn verifier() -> Verifier {
    Verifier::new(TrustAnchors::amd().unwrap())
}

fn endorsements(dir: &str, with_chain: bool) -> Endorsements {
    Endorsements {
        vek: data(&format!("{dir}/vek.der")),
        chain: if with_chain {
            decode_pem_or_der(&data(&format!("{dir}/ask_ark.pem")), "chain").unwrap()
        } else {
            Vec::new()
        },
        crls: Vec::new(),
    }
}

const VALID: [(&str, Product, u32, SigningKeyKind); 7] = [
    (
        "virtee-sev-milan-v2",
        Product::Milan,
        2,
        SigningKeyKind::Vcek,
    ),
    (
        "go-sev-guest-milan-v2",
        Product::Milan,
        2,
        SigningKeyKind::Vcek,
    ),
    ("trustee-milan-v2", Product::Milan, 2, SigningKeyKind::Vcek),
    (
        "trustee-aws-vlek-milan-v3",
        Product::Milan,
        3,
        SigningKeyKind::Vlek,
    ),
    (
        "trustee-azure-hcl-milan-v2",
        Product::Milan,
        2,
        SigningKeyKind::Vcek,
    ),
    (
        "trustee-azure-genoa-v3",
        Product::Genoa,
        3,
        SigningKeyKind::Vcek,
    ),
    (
        "trustee-e2e-genoa-v3",
        Product::Genoa,
        3,
        SigningKeyKind::Vcek,
    ),
];

#[test]
fn every_valid_vector_verifies_with_and_without_its_chain() {
    let v = verifier();
    for (dir, product, version, kind) in VALID {
        for with_chain in [true, false] {
            let report = data(&format!("{dir}/report.bin"));
            let verified = v
                .verify(&report, &endorsements(dir, with_chain), at(SEPT_2025))
                .unwrap_or_else(|e| panic!("{dir} (chain supplied: {with_chain}): {e}"));
            let claims = verified.claims();
            assert_eq!(claims.product, product, "{dir}");
            assert_eq!(claims.report_version, version, "{dir}");
            assert_eq!(claims.signing_key, kind, "{dir}");
            assert_eq!(claims.root, RootKind::Amd, "{dir}");
        }
    }
}

#[test]
fn claims_match_the_published_facts() {
    let v = verifier();
    let verified = v
        .verify(
            &data("go-sev-guest-milan-v2/report.bin"),
            &endorsements("go-sev-guest-milan-v2", true),
            at(SEPT_2025),
        )
        .unwrap();
    let c = verified.claims();
    assert_eq!(
        c.measurement,
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
    );
    assert!(c.policy.debug_allowed, "this guest allows debugging");
    assert_eq!(c.policy.raw, 0xb0000);
    assert_eq!(
        (
            c.tcb.reported.bootloader,
            c.tcb.reported.tee,
            c.tcb.reported.snp,
            c.tcb.reported.microcode
        ),
        (2, 0, 5, 68)
    );

    let vlek = v
        .verify(
            &data("trustee-aws-vlek-milan-v3/report.bin"),
            &endorsements("trustee-aws-vlek-milan-v3", true),
            at(SEPT_2025),
        )
        .unwrap()
        .claims();
    assert_eq!(vlek.vmpl, 1);
    assert_eq!(
        vlek.chip_id,
        "0".repeat(128),
        "masked CHIP_ID is accepted with a VLEK"
    );
    assert_eq!(
        vlek.csp_id.as_deref(),
        Some("CN=cc-us-east-2.amazonaws.com")
    );
    assert_eq!(vlek.tcb.reported.microcode, 217);

    let json = c.to_json();
    for key in [
        "measurement",
        "policy",
        "tcb",
        "chip_id",
        "vmpl",
        "product",
        "signing_key",
    ] {
        assert!(json.get(key).is_some(), "claims JSON lacks {key}");
    }
}

#[test]
fn vlek_is_refused_after_expiry_and_accepted_inside_validity() {
    let v = verifier();
    let report = data("trustee-aws-vlek-milan-v3/report.bin");
    let e = endorsements("trustee-aws-vlek-milan-v3", true);
    assert!(v.verify(&report, &e, at(SEPT_2025)).is_ok());
    for t in [at(NOV_2026), SystemTime::now()] {
        match v.verify(&report, &e, t) {
            Err(Error::CertificateNotValidAt {
                role: CertRole::Vlek,
                not_after,
                ..
            }) => {
                assert_eq!(not_after, 1_765_404_861, "2025-12-10T22:14:21Z");
            }
            other => panic!("expected the VLEK to be expired, got {other:?}"),
        }
    }
}

#[test]
fn tampered_bits_are_refused_for_their_reason() {
    let v = verifier();
    let dir = "invalid/derived-tampered-go-sev-guest-milan-v2";
    let e = Endorsements {
        vek: data(&format!("{dir}/vcek.der")),
        ..Default::default()
    };
    v.verify(&data(&format!("{dir}/original.bin")), &e, at(SEPT_2025))
        .expect("the untouched report verifies");
    let cases: [(&str, Error); 6] = [
        // The trap: a verifier hashing a re-encoded report accepts this one.
        (
            "flip_03a_current_tcb_reserved_byte.bin",
            Error::ReservedNonZero {
                field: "current_tcb",
                offset: 0x3a,
            },
        ),
        (
            "flip_04c_reserved_after_keyinfo.bin",
            Error::ReservedNonZero {
                field: "reserved_0x4c",
                offset: 0x4c,
            },
        ),
        (
            "flip_090_measurement0.bin",
            Error::ReportSignature {
                key: SigningKeyKind::Vcek,
            },
        ),
        (
            "flip_1f0_launch_tcb_bootloader.bin",
            Error::ReportSignature {
                key: SigningKeyKind::Vcek,
            },
        ),
        (
            "flip_2d0_sig_r_upper_padding.bin",
            Error::NonCanonicalSignature { component: "R" },
        ),
        (
            "flip_330_sig_reserved_area.bin",
            Error::ReservedNonZero {
                field: "signature_reserved",
                offset: 0x330,
            },
        ),
    ];
    for (file, expected) in cases {
        let got = v.verify(&data(&format!("{dir}/{file}")), &e, at(SEPT_2025));
        assert_eq!(got.unwrap_err(), expected, "{file}");
    }
}

#[test]
fn every_single_bit_flip_of_the_signed_bytes_is_refused() {
    let v = verifier();
    let dir = "trustee-milan-v2";
    let chain = v
        .verify_chain(&endorsements(dir, true), at(SEPT_2025))
        .unwrap();
    let original = data(&format!("{dir}/report.bin"));
    v.verify_report(&original, &chain, at(SEPT_2025)).unwrap();
    let mut refused = 0;
    for byte in 0..0x2A0 {
        for bit in 0..8 {
            let mut r = original.clone();
            r[byte] ^= 1 << bit;
            match v.verify_report(&r, &chain, at(SEPT_2025)) {
                Err(_) => refused += 1,
                Ok(_) => panic!("flip of bit {bit} at {byte:#x} verified"),
            }
        }
    }
    assert_eq!(refused, 0x2A0 * 8);
}

#[test]
fn tampered_vceks_fail_the_chain_signature() {
    let v = verifier();
    let report = data("invalid/trustee-tampered-vceks/test-report.bin");
    for vek in ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"] {
        let e = Endorsements {
            vek: data(&format!("invalid/trustee-tampered-vceks/{vek}")),
            ..Default::default()
        };
        assert_eq!(
            v.verify(&report, &e, at(SEPT_2025)).unwrap_err(),
            Error::ChainSignature {
                role: CertRole::Vcek,
                issuer: CertRole::Ask
            },
            "{vek}"
        );
    }
    // The same report with its genuine VCEK verifies.
    assert!(
        v.verify(
            &report,
            &endorsements("trustee-milan-v2", false),
            at(SEPT_2025)
        )
        .is_ok()
    );
}

#[test]
fn vcek_of_another_chip_is_refused() {
    let v = verifier();
    let dir = "invalid/kinvolk-azure-wrong-chip-vcek";
    let certs = decode_pem_or_der(&data(&format!("{dir}/certs.pem")), "certs").unwrap();
    let e = Endorsements {
        vek: certs[0].clone(),
        chain: certs[1..].to_vec(),
        crls: Vec::new(),
    };
    assert_eq!(
        v.verify(&data(&format!("{dir}/report.bin")), &e, at(SEPT_2025))
            .unwrap_err(),
        Error::HwIdMismatch
    );
    // Through the HCL path too.
    let hcl = HclReport::parse(&data(&format!("{dir}/hcl-report-snp.bin"))).unwrap();
    let chain = v.verify_chain(&e, at(SEPT_2025)).unwrap();
    assert_eq!(
        v.verify_hcl(&hcl, &chain, at(SEPT_2025)).unwrap_err(),
        Error::HwIdMismatch
    );
}

#[test]
fn turin_vcek_of_another_chip_is_refused() {
    let v = verifier();
    let dir = "invalid/cross-chip-turin";
    let e = Endorsements {
        vek: data(&format!("{dir}/vcek_turin_other_chip.der")),
        chain: decode_pem_or_der(&data(&format!("{dir}/cert_chain_turin")), "chain").unwrap(),
        crls: Vec::new(),
    };
    let chain = v
        .verify_chain(&e, at(SEPT_2025))
        .expect("a genuine Turin chain");
    assert_eq!(chain.product(), Product::Turin);
    let report = data(&format!("{dir}/report.bin"));
    assert_eq!(
        v.verify_report(&report, &chain, at(SEPT_2025)).unwrap_err(),
        Error::HwIdMismatch
    );

    // With the hwID made to match, the TCB still differs, and then the signature fails.
    let ext = chain.extensions();
    let mut spoofed = report.clone();
    spoofed[0x1A0..0x1A8].copy_from_slice(ext.hwid.as_deref().unwrap());
    match v
        .verify_report(&spoofed, &chain, at(SEPT_2025))
        .unwrap_err()
    {
        Error::TcbMismatch {
            component: TcbComponent::Bootloader,
            reported: 1,
            certified: 0,
        } => {}
        other => panic!("expected a TCB mismatch, got {other:?}"),
    }
}

#[test]
fn vlek_that_did_not_sign_the_masked_v2_report_is_a_signature_failure() {
    let v = verifier();
    let dir = "invalid/constellation-vlek-v2-masked-chipid";
    let e = Endorsements {
        vek: decode_pem_or_der(&data(&format!("{dir}/vlek.pem")), "vlek")
            .unwrap()
            .remove(0),
        chain: decode_pem_or_der(&data(&format!("{dir}/vlekcertchain.pem")), "chain").unwrap(),
        crls: Vec::new(),
    };
    assert_eq!(
        v.verify(&data(&format!("{dir}/report.bin")), &e, at(JAN_2024))
            .unwrap_err(),
        Error::ReportSignature {
            key: SigningKeyKind::Vlek
        }
    );
}

#[test]
fn synthetic_version_0_report_is_unsupported() {
    let v = verifier();
    let e = endorsements("trustee-milan-v2", false);
    assert_eq!(
        v.verify(
            &data("invalid/oak-fake-evidence/report.bin"),
            &e,
            at(SEPT_2025)
        )
        .unwrap_err(),
        Error::UnsupportedVersion { version: 0 }
    );
}

#[test]
fn azure_hcl_reports_verify_and_expose_vm_configuration() {
    let v = verifier();
    for dir in ["trustee-azure-hcl-milan-v2", "trustee-azure-genoa-v3"] {
        let hcl = HclReport::parse(&data(&format!("{dir}/hcl-report.bin"))).unwrap();
        let chain = v
            .verify_chain(&endorsements(dir, true), at(SEPT_2025))
            .unwrap();
        let verified = v.verify_hcl(&hcl, &chain, at(SEPT_2025)).unwrap();
        let azure = verified.claims().azure.expect("azure claims");
        assert_eq!(azure.secure_boot, Some(true), "{dir}");
        assert_eq!(azure.tpm_enabled, Some(true), "{dir}");
        assert!(azure.attestation_key.is_some(), "{dir}");
    }
}

#[test]
fn supplied_chains_of_other_products_do_not_break_a_genuine_chain() {
    let v = verifier();
    // Genoa's ARK offered for a Milan chain: it is pinned, but not the issuer.
    let mut e = endorsements("trustee-milan-v2", true);
    e.chain[1] =
        decode_pem_or_der(&data("trustee-azure-genoa-v3/ask_ark.pem"), "c").unwrap()[1].clone();
    assert!(
        v.verify(&data("trustee-milan-v2/report.bin"), &e, at(SEPT_2025))
            .is_ok()
    );

    // A Milan report with a Genoa chain supplied: that ASK did not issue this VCEK, the
    // built-in Milan ASK did, and the chain is found through it.
    let mut e = endorsements("trustee-milan-v2", false);
    e.chain = decode_pem_or_der(&data("trustee-azure-genoa-v3/ask_ark.pem"), "c").unwrap();
    assert!(
        v.verify(&data("trustee-milan-v2/report.bin"), &e, at(SEPT_2025))
            .is_ok()
    );

    // A Genoa VCEK against a Milan report (v3 reports name their product in CPUID).
    let genoa = endorsements("trustee-e2e-genoa-v3", true);
    let err = v.verify(
        &data("trustee-aws-vlek-milan-v3/report.bin"),
        &genoa,
        at(SEPT_2025),
    );
    assert_eq!(
        err.unwrap_err(),
        Error::ProductMismatch {
            report: Product::Milan,
            certificate: Product::Genoa
        }
    );
}

#[test]
fn vcek_offered_for_a_vlek_report_is_a_key_mismatch() {
    let v = verifier();
    let report = data("trustee-aws-vlek-milan-v3/report.bin");
    let e = endorsements("trustee-milan-v2", true);
    assert_eq!(
        v.verify(&report, &e, at(SEPT_2025)).unwrap_err(),
        Error::SigningKeyMismatch {
            report: SigningKeyKind::Vlek,
            certificate: SigningKeyKind::Vcek
        }
    );
}

#[test]
fn empty_anchors_trust_nothing() {
    let v = Verifier::new(TrustAnchors::empty());
    let err = v.verify(
        &data("trustee-milan-v2/report.bin"),
        &endorsements("trustee-milan-v2", true),
        at(SEPT_2025),
    );
    assert!(matches!(err, Err(Error::UntrustedRoot { .. })), "{err:?}");
}

#[test]
fn pinned_fingerprints_are_the_roots_loaded() {
    let anchors = TrustAnchors::amd().unwrap();
    let roots: Vec<_> = anchors.roots().collect();
    assert_eq!(roots.len(), 3);
    for ((product, kind, fp), (p, expected)) in roots
        .into_iter()
        .zip(attestation::chain::AMD_ARK_FINGERPRINTS)
    {
        assert_eq!(product, p);
        assert_eq!(kind, RootKind::Amd);
        assert_eq!(fp, expected);
    }
}
