//! `broker policy schema | suggest | check` as real processes on real evidence.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

use e2e::{binary, vectors};

const SEPT_2025: &str = "2025-09-01T00:00:00Z";

fn broker(args: &[&str]) -> Output {
    Command::new(binary("broker").unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn evidence(dir: &str) -> Vec<String> {
    let d = vectors().join(dir);
    vec![
        "--report".into(),
        d.join("report.bin").display().to_string(),
        "--vek".into(),
        d.join("vek.der").display().to_string(),
        "--at".into(),
        SEPT_2025.into(),
    ]
}

fn run(mut args: Vec<String>, more: &[&str]) -> Output {
    args.extend(more.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    broker(&refs)
}

#[test]
fn schema_is_json_schema() {
    let out = broker(&["policy", "schema"]);
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["required"], serde_json::json!(["rules", "secrets"]));
}

#[test]
fn suggested_policy_releases_to_its_guest_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    let mut args = vec!["policy".to_string(), "suggest".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(args, &["--secret", "web-tls"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&policy, &out.stdout).unwrap();
    let p = policy.display().to_string();

    let mut args = vec!["policy".to_string(), "check".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(args, &["--policy", &p]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("RELEASE web-tls: rule \"suggested\" holds"),
        "{text}"
    );

    // Another guest: refused, and the first failed condition is named.
    let mut args = vec!["policy".to_string(), "check".to_string()];
    args.extend(evidence("virtee-sev-milan-v2"));
    let out = run(args.clone(), &["--policy", &p]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("REFUSE web-tls: rule \"suggested\": measurement == "),
        "{text}"
    );
    assert!(text.contains("FAIL  measurement"), "{text}");
    // ...with a hint to trace the measurement back to a platform (broker measure --match).
    let hint = text.lines().last().unwrap();
    assert!(
        hint.starts_with("hint: ") && hint.contains("--match "),
        "{text}"
    );
    assert_eq!(hint.split("--match ").nth(1).unwrap().len(), 96, "{hint}");

    let out = run(args, &["--policy", &p, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decisions"][0]["released"], false);
    assert_eq!(v["decisions"][0]["rules"][0]["conditions"]["kind"], "allOf");
}

#[test]
fn a_debug_guest_is_refused_by_a_no_debug_rule() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": {"no-debug": {"claim": "policy.debug_allowed", "equals": false}},
            "secrets": {"db": ["no-debug"]}}"#,
    )
    .unwrap();
    let mut args = vec!["policy".to_string(), "check".to_string()];
    args.extend(evidence("go-sev-guest-milan-v2"));
    let out = run(args, &["--policy", &policy.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap(),
        "REFUSE db: rule \"no-debug\": policy.debug_allowed == false (actual true)"
    );
}

#[test]
fn a_malformed_policy_names_the_json_path() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": {"r": {"allOf": [{"claim": "tcb.reported.snp", "greaterOrEquals": "22"}]}}, "secrets": {}}"#,
    )
    .unwrap();
    let mut args = vec!["policy".to_string(), "check".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(args, &["--policy", &policy.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy /rules/r/allOf/0/greaterOrEquals: must be a non-negative integer"),
        "{err}"
    );
}

#[test]
fn suggest_without_a_vek_drafts_from_the_unverified_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = vectors().join("trustee-milan-v2/report.bin");
    let out = broker(&[
        "policy",
        "suggest",
        "--report",
        report.to_str().unwrap(),
        "--secret",
        "db",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let draft: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        draft["description"]
            .as_str()
            .unwrap()
            .contains("UNVERIFIED")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNVERIFIED"));
    // Verified afterwards, the same report is released by the draft.
    let policy = dir.path().join("p.json");
    std::fs::write(&policy, &out.stdout).unwrap();
    let mut args = vec!["policy".to_string(), "check".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(args, &["--policy", policy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A policy drafted from a computed measurement (`policy suggest-measured`, what
/// `broker measure` prints) releases to the guest that has it, on a platform at the given
/// TCB, and refuses a TCB below the minimum; bad input is a one-line error.
#[test]
fn a_policy_from_a_computed_measurement_releases_to_its_guest() {
    // The measurement and TCB the guest will have; here read from the vector's report, as
    // `broker measure` would compute them for its image.
    let mut args = vec!["verify".to_string(), "--json".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(args, &[]);
    assert!(out.status.success());
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let measurement = claims["measurement"].as_str().unwrap().to_string();
    let t = &claims["tcb"]["reported"];
    let tcb = |snp: u64| {
        format!(
            "bootloader={},tee={},snp={snp},microcode={}",
            t["bootloader"], t["tee"], t["microcode"]
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let draft = |min_tcb: &str| {
        let out = broker(&[
            "policy",
            "suggest-measured",
            "--measurement",
            &measurement,
            "--product",
            "Milan",
            "--min-tcb",
            min_tcb,
            "--secret",
            "web-tls",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.path().join(format!("p{}.json", min_tcb.len()));
        std::fs::write(&path, &out.stdout).unwrap();
        path.display().to_string()
    };
    let snp = t["snp"].as_u64().unwrap();
    let check = |policy: &str| {
        let mut args = vec!["policy".to_string(), "check".to_string()];
        args.extend(evidence("trustee-milan-v2"));
        run(args, &["--policy", policy])
    };
    let out = check(&draft(&tcb(snp)));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("RELEASE web-tls: rule \"measured\" holds"),
        "{text}"
    );
    let out = check(&draft(&tcb(snp + 10)));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("tcb.reported.snp"), "{text}");
    assert!(
        !text.contains("hint:"),
        "refused on the TCB, not the measurement: {text}"
    );

    // Broken input: one line, exit status 2, naming the option.
    for (args, expect) in [
        (
            vec![
                "--measurement",
                "abcd",
                "--product",
                "Milan",
                "--min-tcb",
                "bootloader=1,tee=0,snp=1,microcode=1",
            ],
            "--measurement",
        ),
        (
            vec![
                "--measurement",
                &measurement,
                "--product",
                "Naples",
                "--min-tcb",
                "bootloader=1,tee=0,snp=1,microcode=1",
            ],
            "--product",
        ),
        (
            vec![
                "--measurement",
                &measurement,
                "--product",
                "Milan",
                "--min-tcb",
                "bootloader=1,tee=0,snp=1",
            ],
            "microcode missing",
        ),
        (
            vec![
                "--measurement",
                &measurement,
                "--product",
                "Turin",
                "--min-tcb",
                "bootloader=1,tee=0,snp=1,microcode=1",
            ],
            "fmc missing",
        ),
        (
            vec![
                "--measurement",
                &measurement,
                "--product",
                "Milan",
                "--min-tcb",
                "bootloader=1,tee=0,snp=1,microcode=1,snp=2",
            ],
            "twice",
        ),
    ] {
        let mut all = vec!["policy", "suggest-measured"];
        all.extend(args);
        let out = broker(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "{expect}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

/// Certificate profiles: drafted by `policy suggest --certificate`, explained by `policy
/// check` with what they grant, and refused for another guest; a malformed one is named.
#[test]
fn certificate_profiles_are_drafted_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    let mut args = vec!["policy".to_string(), "suggest".to_string()];
    args.extend(evidence("trustee-milan-v2"));
    let out = run(
        args.clone(),
        &[
            "--secret",
            "db-key",
            "--certificate",
            "web=dns:web.internal,uri:spiffe://example.org/web",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let draft: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        draft["certificates"]["web"],
        serde_json::json!({
            "rules": ["suggested"],
            "dns": ["web.internal"],
            "uri": ["spiffe://example.org/web"],
            "usages": ["serverAuth", "clientAuth"],
            "max_lifetime_hours": 24
        })
    );
    std::fs::write(&policy, &out.stdout).unwrap();
    let p = policy.display().to_string();
    let out = run(args, &["--certificate", "web=email:a@b"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut check = vec!["policy".to_string(), "check".to_string()];
    check.extend(evidence("trustee-milan-v2"));
    let out = run(check, &["--policy", &p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("RELEASE certificate:web: rule \"suggested\" holds; grants dns web.internal; uri spiffe://example.org/web; usages serverAuth, clientAuth; at most 24 h"),
        "{text}"
    );
    let mut check = vec!["policy".to_string(), "check".to_string()];
    check.extend(evidence("virtee-sev-milan-v2"));
    let out = run(check, &["--policy", &p, "--secret", "certificate:web"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("REFUSE certificate:web: rule \"suggested\": measurement == "),
        "{text}"
    );

    // The loader names the path of a bad grant.
    let mut doc = draft.clone();
    doc["certificates"]["web"]["dns"] = serde_json::json!(["*.*.internal"]);
    std::fs::write(&policy, doc.to_string()).unwrap();
    let mut check = vec!["policy".to_string(), "check".to_string()];
    check.extend(evidence("trustee-milan-v2"));
    let out = run(check, &["--policy", &p]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/certificates/web/dns/0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
