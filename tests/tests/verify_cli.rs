//! `broker verify` as a real process against real AMD evidence: exit codes, output lines,
//! JSON claims.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use attestation::certs::decode_pem_or_der;
use attestation::sim::{ReportFields, SimulatedAmd};
use attestation::{Product, SigningKeyKind};
use e2e::{binary, stderr, vectors};

/// Inside every genuine certificate's validity (see attestation/tests/vectors.rs).
const SEPT_2025: &str = "2025-09-01T00:00:00Z";

fn broker(args: &[&str]) -> Output {
    Command::new(binary("broker").unwrap())
        .args(args)
        .output()
        .expect("broker runs")
}

fn path(rel: &str) -> String {
    vectors().join(rel).display().to_string()
}

#[test]
fn genuine_reports_verify_and_print_their_claims() {
    for (dir, report, measurement_prefix) in [
        ("virtee-sev-milan-v2", "report.bin", "7a1e5c26"),
        ("go-sev-guest-milan-v2", "report.bin", "b07af962"),
        ("trustee-milan-v2", "report.bin", ""),
        ("trustee-aws-vlek-milan-v3", "report.bin", "8922ebbd"),
        ("trustee-e2e-genoa-v3", "report.bin", ""),
        ("trustee-azure-hcl-milan-v2", "hcl-report.bin", "9ac48fca"),
        ("trustee-azure-genoa-v3", "hcl-report.bin", "f57dc09a"),
    ] {
        let out = broker(&[
            "verify",
            "--report",
            &path(&format!("{dir}/{report}")),
            "--vek",
            &path(&format!("{dir}/vek.der")),
            "--chain",
            &path(&format!("{dir}/ask_ark.pem")),
            "--at",
            SEPT_2025,
            "--json",
        ]);
        assert!(out.status.success(), "{dir}: {}", stderr(&out));
        let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let m = claims["measurement"].as_str().unwrap();
        assert!(m.starts_with(measurement_prefix), "{dir}: {m}");
        assert_eq!(claims["root"], "amd", "{dir}");
        if report == "hcl-report.bin" {
            assert_eq!(claims["azure"]["secure_boot"], true, "{dir}");
        }

        // The human form, without the optional chain.
        let out = broker(&[
            "verify",
            "--report",
            &path(&format!("{dir}/{report}")),
            "--vek",
            &path(&format!("{dir}/vek.der")),
            "--at",
            SEPT_2025,
        ]);
        assert!(out.status.success(), "{dir}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("verified: "));
    }
}

fn assert_refused(args: &[&str], line: &str, check: &str) {
    let out = broker(args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
    assert_eq!(stderr(&out).trim_end(), line, "{args:?}");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = broker(&json_args);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["check"], check, "{args:?}");
}

#[test]
fn broken_evidence_is_refused_with_one_line_naming_the_check() {
    let kinvolk = "invalid/kinvolk-azure-wrong-chip-vcek";
    for report in ["report.bin", "hcl-report-snp.bin"] {
        assert_refused(
            &[
                "verify",
                "--report",
                &path(&format!("{kinvolk}/{report}")),
                "--vek",
                &path(&format!("{kinvolk}/certs.pem")),
                "--at",
                SEPT_2025,
            ],
            "refused: VCEK hwID does not match CHIP_ID",
            "hwid_mismatch",
        );
    }
    assert_refused(
        &[
            "verify",
            "--report",
            &path("invalid/cross-chip-turin/report.bin"),
            "--vek",
            &path("invalid/cross-chip-turin/vcek_turin_other_chip.der"),
            "--chain",
            &path("invalid/cross-chip-turin/cert_chain_turin"),
            "--at",
            SEPT_2025,
        ],
        "refused: VCEK hwID does not match CHIP_ID",
        "hwid_mismatch",
    );
    let tampered = "invalid/derived-tampered-go-sev-guest-milan-v2";
    for (file, line, check) in [
        (
            "flip_03a_current_tcb_reserved_byte.bin",
            "refused: reserved field current_tcb is not zero (offset 0x3a)",
            "report_reserved",
        ),
        (
            "flip_090_measurement0.bin",
            "refused: report signature does not verify with the VCEK",
            "report_signature",
        ),
        (
            "flip_2d0_sig_r_upper_padding.bin",
            "refused: signature component R is not canonically zero-padded",
            "report_signature_encoding",
        ),
    ] {
        assert_refused(
            &[
                "verify",
                "--report",
                &path(&format!("{tampered}/{file}")),
                "--vek",
                &path(&format!("{tampered}/vcek.der")),
                "--at",
                SEPT_2025,
            ],
            line,
            check,
        );
    }
    assert_refused(
        &[
            "verify",
            "--report",
            &path("invalid/trustee-tampered-vceks/test-report.bin"),
            "--vek",
            &path("invalid/trustee-tampered-vceks/test-vcek-invalid-new.der"),
            "--at",
            SEPT_2025,
        ],
        "refused: VCEK signature does not verify with the ASK key",
        "chain_signature",
    );
    assert_refused(
        &[
            "verify",
            "--report",
            &path("invalid/oak-fake-evidence/report.bin"),
            "--vek",
            &path("trustee-milan-v2/vek.der"),
            "--at",
            SEPT_2025,
        ],
        "refused: unsupported report version 0",
        "report_version",
    );
}

#[test]
fn vlek_is_expired_now_and_valid_in_2025() {
    let dir = "trustee-aws-vlek-milan-v3";
    let args = [
        "verify",
        "--report",
        &path(&format!("{dir}/report.bin")),
        "--vek",
        &path(&format!("{dir}/vek.der")),
    ];
    let out = broker(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("refused: VLEK is not valid at "),
        "{}",
        stderr(&out)
    );
    let mut at = args.to_vec();
    at.extend(["--at", SEPT_2025]);
    assert!(broker(&at).status.success());
}

#[test]
fn a_supplied_root_that_is_not_pinned_is_refused() {
    // A chain with AMD's names and a different ARK key (the published fake AMD keys).
    let keys = vectors().join("invalid/go-sev-guest-fake-amd-keys");
    let key = |n: &str| {
        let pem = std::fs::read(keys.join(format!("{n}_private_key.pem"))).unwrap();
        decode_pem_or_der(&pem, n).unwrap().remove(0)
    };
    let now = std::time::SystemTime::now();
    let fake = SimulatedAmd::impersonating_amd(
        Product::Milan,
        &key("ark"),
        &key("ask"),
        &key("asvk"),
        now,
    )
    .unwrap();
    let fields = ReportFields::new(Product::Milan);
    let vcek = fake
        .issue_vcek_with_key(&key("vcek"), &fields.chip_id, fields.tcb, now)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let report = write("report.bin", &vcek.sign_report(&fields).unwrap());
    let vek = write("vcek.der", vcek.cert_der());
    let chain = write(
        "chain.pem",
        fake.cert_chain_pem(SigningKeyKind::Vcek).as_bytes(),
    );

    let out = broker(&[
        "verify", "--report", &report, "--vek", &vek, "--chain", &chain,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("refused: supplied root is not a pinned AMD root (SHA-256 "),
        "{}",
        stderr(&out)
    );
    let out = broker(&["verify", "--report", &report, "--vek", &vek]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "refused: VCEK signature does not verify with the ASK key"
    );
}

#[test]
fn unusable_input_exits_2() {
    let missing = Path::new("/nonexistent/report.bin").display().to_string();
    let out = broker(&["verify", "--report", &missing, "--vek", &missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: cannot read /nonexistent/report.bin"));

    let report = path("trustee-milan-v2/report.bin");
    let vek = path("trustee-milan-v2/vek.der");
    let out = broker(&[
        "verify",
        "--report",
        &report,
        "--vek",
        &vek,
        "--at",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is not an RFC 3339 time"));

    let out = broker(&["verify", "--report", &report]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no VCEK/VLEK given"));

    // A truncated report is a refusal (the evidence is bad), not an input error.
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.bin");
    std::fs::write(
        &short,
        &std::fs::read(vectors().join("trustee-milan-v2/report.bin")).unwrap()[..100],
    )
    .unwrap();
    let out = broker(&[
        "verify",
        "--report",
        &short.display().to_string(),
        "--vek",
        &vek,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "refused: report is 100 bytes, expected 1184"
    );
}
