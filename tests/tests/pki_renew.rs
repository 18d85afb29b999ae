//! `guest-agent renew` with real processes: nothing happens before a certificate is due; a
//! missing certificate, a key that does not match, `--force`, and a revocation by the operator
//! each renew with fresh evidence (a new serial) and run the reload command once; a policy
//! that no longer grants the profile refuses the renewal and the OCSP response is withdrawn;
//! a failing reload command is reported after the files are written. The OCSP response the
//! agent keeps is checked by `openssl ocsp` and stapled by `openssl s_server -status_file` to
//! `openssl s_client -status` (in pki_issue.rs, between two guests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use e2e::{Broker, agent, arg as p, ok, openssl, stderr};

fn setup() -> Broker {
    let b = Broker::start();
    b.provision(&b.policy_with_certificates(
        "policy-pki.json",
        serde_json::json!({
            "web": {
                "rules": ["simulated-guest"],
                "dns": ["web.internal"],
                "usages": ["serverAuth"],
                "max_lifetime_hours": 2
            }
        }),
    ));
    ok(&b.cli(&["ca", "init", "--days", "30"]));
    b
}

/// An agent configuration for one certificate `web`, with `reload` (a TOML array or "").
fn config(b: &Broker, dir: &Path, reload: &str) -> PathBuf {
    let reload = if reload.is_empty() {
        String::new()
    } else {
        format!("reload = {reload}\n")
    };
    b.agent_config(
        dir,
        &format!("[[certificate]]\nprofile = \"web\"\ndns = [\"web.internal\"]\n{reload}"),
        "",
    )
}

fn serial(store: &Path) -> String {
    ok(&openssl(&[
        "x509",
        "-noout",
        "-serial",
        "-in",
        p(&store.join("web.pem")),
    ]))
    .trim()
    .trim_start_matches("serial=")
    .to_ascii_lowercase()
}

/// What `openssl ocsp` makes of the response the agent keeps: verified to the root, about
/// this certificate.
fn staple_status(store: &Path, tmp: &Path) -> String {
    let chain = std::fs::read_to_string(store.join("web.ca.pem")).unwrap();
    let issuer = tmp.join("issuer.pem");
    std::fs::write(
        &issuer,
        chain
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    let out = openssl(&[
        "ocsp",
        "-respin",
        p(&store.join("web.ocsp.der")),
        "-issuer",
        p(&issuer),
        "-cert",
        p(&store.join("web.pem")),
        "-CAfile",
        p(&store.join("web.ca.pem")),
    ]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out))
}

fn reloads(marker: &Path) -> usize {
    std::fs::read_to_string(marker)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn renewal_follows_what_is_due_and_reloads_once_per_change() {
    let b = setup();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let marker = t.join("reloaded");
    let cfg = config(
        &b,
        &t.join("guest"),
        &format!("[\"/bin/sh\", \"-c\", \"echo reloaded >> {}\"]", p(&marker)),
    );
    let store = t.join("guest/credstore");

    // Boot: certificate and a good OCSP response, which OpenSSL verifies.
    let boot = ok(&agent(&cfg, &[]));
    assert!(boot.contains("web: OCSP response (good) written"), "{boot}");
    let status = staple_status(&store, t);
    assert!(
        status.contains("Response verify OK") && status.contains(": good"),
        "{status}"
    );
    let first = serial(&store);

    // Not due: nothing renewed, the response kept (not half way through), no reload.
    let out = ok(&agent(&cfg, &["renew"]));
    assert!(
        out.contains(&format!("web: serial {first} not due; renews after")),
        "{out}"
    );
    assert!(out.contains("web: OCSP response (good) kept"), "{out}");
    assert_eq!(serial(&store), first);
    assert_eq!(reloads(&marker), 0);

    // Missing certificate: renewed, reloaded once.
    std::fs::remove_file(store.join("web.pem")).unwrap();
    let out = ok(&agent(&cfg, &["renew"]));
    assert!(out.contains("web: renewed (missing)"), "{out}");
    let second = serial(&store);
    assert_ne!(second, first);
    assert_eq!(reloads(&marker), 1);
    assert!(staple_status(&store, t).contains(": good"));

    // A key file that is not the certificate's key.
    let stray = ok(&openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ]));
    std::fs::remove_file(store.join("web.key")).unwrap();
    std::fs::write(store.join("web.key"), stray).unwrap();
    let out = ok(&agent(&cfg, &["renew"]));
    assert!(
        out.contains("web: renewed (unusable: the key file is not the certificate's key)"),
        "{out}"
    );
    assert_eq!(reloads(&marker), 2);

    // --force.
    let before = serial(&store);
    let out = ok(&agent(&cfg, &["renew", "--force"]));
    assert!(out.contains("web: renewed (forced)"), "{out}");
    assert_ne!(serial(&store), before);
    assert_eq!(reloads(&marker), 3);

    // Revoked by the operator: the next run learns it by OCSP and renews.
    let revoked = serial(&store);
    ok(&b.cli(&["cert", "revoke", &revoked, "--reason", "keyCompromise"]));
    let out = ok(&agent(&cfg, &["renew"]));
    assert!(out.contains("web: renewed (revoked)"), "{out}");
    assert_ne!(serial(&store), revoked);
    assert_eq!(reloads(&marker), 4);
    assert!(staple_status(&store, t).contains(": good"));

    // The policy stops granting the profile: the certificate is revoked when the policy is
    // set, the renewal is refused (exit 1, the broker's reason), and no OCSP response is kept
    // for a revoked certificate.
    let narrowed = b.policy_with_certificates("policy-none.json", serde_json::json!({}));
    ok(&b.cli(&["policy", "set", p(&narrowed)]));
    let out = agent(&cfg, &["renew"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("web: not renewed (revoked)"), "{err}");
    assert!(!store.join("web.ocsp.der").exists());
    assert_eq!(reloads(&marker), 4);
}

#[test]
fn a_failing_reload_command_is_reported_after_the_files_are_written() {
    let b = setup();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&b, &tmp.path().join("guest"), "[\"/bin/false\"]");
    let store = tmp.path().join("guest/credstore");
    ok(&agent(&cfg, &[]));
    let before = serial(&store);
    let out = agent(&cfg, &["renew", "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reload `/bin/false`: exited with exit status: 1"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web: renewed (forced)"));
    assert_ne!(serial(&store), before);

    // A reload program found on PATH is refused by the configuration parser.
    let bad = config(
        &b,
        &tmp.path().join("bad"),
        "[\"systemctl\", \"reload\", \"nginx\"]",
    );
    let out = agent(&bad, &["config-check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("must be an absolute path"),
        "{}",
        stderr(&out)
    );
}
