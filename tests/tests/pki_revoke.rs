//! Revocation of what the broker's CA issued, checked with tools nobody here wrote: `openssl
//! ocsp` against the broker's responder (good, then revoked; unknown for a serial never
//! issued), `openssl verify -crl_check` with its CRL, rustls/webpki with the CRL; a malformed
//! OCSP request answered 400 while the broker stays up; and automatic revocation when a new
//! policy drops a grant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use e2e::{Broker, arg as p, binary, ok, openssl, openssl_ec_req, stderr};

/// A certificate profile `web` granting `dns` to guests with the default measurement.
fn web_profile(dns: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "web": {
            "rules": ["simulated-guest"],
            "dns": dns,
            "usages": ["serverAuth", "clientAuth"]
        }
    })
}

/// A broker whose certificates name its own responder and CRLs, with a certificate profile
/// `web` for guests with the default measurement, and a CA.
fn setup() -> Broker {
    // `init --dev` names the broker's own address as `[pki] base_url`.
    let b = Broker::start();
    b.provision(&b.policy_with_certificates(
        "policy-pki.json",
        web_profile(&["web.internal", "*.svc.internal"]),
    ));
    ok(&b.cli(&["ca", "init", "--days", "30"]));
    b
}

/// Runs an agent for one certificate named `name` with `dns` names; its credstore.
fn certificate(b: &Broker, dir: &Path, name: &str, dns: &str) -> PathBuf {
    let config = b.agent_config(
        dir,
        &format!("[[certificate]]\nprofile = \"web\"\nname = \"{name}\"\ndns = [{dns}]"),
        "",
    );
    ok(&Command::new(binary("guest-agent").unwrap())
        .args(["--config", p(&config)])
        .output()
        .unwrap());
    dir.join("credstore")
}

/// `curl` against the broker: (status, body).
fn curl(b: &Broker, args: &[&str], path: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "%{http_code}", "--cacert"])
        .arg(b.dir.join("ca.pem"))
        .args(args)
        .arg(b.url(path))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (body, code) = out.stdout.split_at(out.stdout.len() - 3);
    (
        std::str::from_utf8(code).unwrap().parse().unwrap(),
        body.to_vec(),
    )
}

/// The OCSP status OpenSSL reads for `cert` from the broker's responder (request with a
/// nonce made by OpenSSL, posted, the response verified by OpenSSL to `root`).
fn ocsp_status(b: &Broker, tmp: &Path, issuer: &Path, cert: &Path, root: &Path) -> String {
    let req = tmp.join("req.der");
    let resp = tmp.join("resp.der");
    ok(&openssl(&[
        "ocsp",
        "-issuer",
        p(issuer),
        "-cert",
        p(cert),
        "-reqout",
        p(&req),
    ]));
    let (code, body) = curl(
        b,
        &[
            "-H",
            "Content-Type: application/ocsp-request",
            "--data-binary",
            &format!("@{}", p(&req)),
        ],
        "/v1/pki/ocsp",
    );
    assert_eq!(code, 200);
    std::fs::write(&resp, body).unwrap();
    // The request read back (for its nonce; -cert here would make a new one), the response
    // verified to the root through the responder certificate it carries.
    let out = openssl(&[
        "ocsp",
        "-reqin",
        p(&req),
        "-respin",
        p(&resp),
        "-CAfile",
        p(root),
        "-resp_text",
    ]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("Response verify OK"), "{text}");
    assert!(!text.contains("Nonce Verify error"), "{text}");
    text
}

/// Fetches the CRL at `path` and runs `openssl verify -crl_check` of `cert` with it and the
/// CA certificates in `ca_file`: the CRL (DER), and OpenSSL's output (Err when it refuses).
fn crl_verify(
    b: &Broker,
    t: &Path,
    path: &str,
    ca_file: &Path,
    cert: &Path,
) -> (Vec<u8>, Result<String, String>) {
    let (code, der) = curl(b, &[], path);
    assert_eq!(code, 200);
    std::fs::write(t.join("crl.der"), &der).unwrap();
    ok(&openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        p(&t.join("crl.der")),
        "-out",
        p(&t.join("crl.pem")),
    ]));
    let out = openssl(&[
        "verify",
        "-crl_check",
        "-CRLfile",
        p(&t.join("crl.pem")),
        "-CAfile",
        p(ca_file),
        p(cert),
    ]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    (
        der,
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        },
    )
}

/// The CA certificate (the first of the chain file).
fn ca_certificate(store: &Path, name: &str, tmp: &Path) -> PathBuf {
    let chain = std::fs::read_to_string(store.join(format!("{name}.ca.pem"))).unwrap();
    let first = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    let path = tmp.join(format!("{name}-issuer.pem"));
    std::fs::write(&path, first).unwrap();
    path
}

#[test]
fn ocsp_and_crls_follow_revocations_by_operators_and_by_policy() {
    let b = setup();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = certificate(&b, &t.join("a"), "web", "\"web.internal\"");
    let cert = store.join("web.pem");
    let root = store.join("web.ca.pem");
    let issuer = ca_certificate(&store, "web", t);

    // The certificate names the broker's responder, CA certificate and CRL.
    let text = ok(&openssl(&["x509", "-noout", "-text", "-in", p(&cert)]));
    let base = format!("https://127.0.0.1:{}", b.port);
    for expected in [
        format!("OCSP - URI:{base}/v1/pki/ocsp"),
        format!("CA Issuers - URI:{base}/v1/pki/ca/1.der"),
        format!("URI:{base}/v1/pki/crl/1"),
    ] {
        assert!(text.contains(&expected), "{expected}: {text}");
    }

    // Good, by OCSP and by the CRL; the CA certificate URL serves the issuer.
    let status = ocsp_status(&b, t, &issuer, &cert, &root);
    assert!(status.contains("Cert Status: good"), "{status}");
    // The GET form (RFC 6960 A.1): the request base64-encoded in the path.
    let req = std::fs::read(t.join("req.der")).unwrap();
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(&req)
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let (code, body) = curl(&b, &[], &format!("/v1/pki/ocsp/{encoded}"));
    assert_eq!(code, 200);
    std::fs::write(t.join("get-resp.der"), body).unwrap();
    let out = openssl(&[
        "ocsp",
        "-reqin",
        p(&t.join("req.der")),
        "-respin",
        p(&t.join("get-resp.der")),
        "-CAfile",
        p(&root),
        "-resp_text",
    ]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("Response verify OK") && text.contains("Cert Status: good"),
        "{text}"
    );
    let (code, der) = curl(&b, &[], "/v1/pki/ca/1.der");
    assert_eq!(code, 200);
    let issuer_der = openssl(&["x509", "-in", p(&issuer), "-outform", "DER"]);
    assert_eq!(der, issuer_der.stdout);
    let crl_check = |expect_ok: bool| {
        let (der, text) = crl_verify(&b, t, "/v1/pki/crl/1", &root, &cert);
        assert_eq!(text.is_ok(), expect_ok, "{text:?}");
        der
    };
    crl_check(true);

    // A serial never issued: unknown.
    let req = t.join("unknown.der");
    ok(&openssl(&[
        "ocsp",
        "-issuer",
        p(&issuer),
        "-serial",
        "0x0123456789",
        "-reqout",
        p(&req),
    ]));
    let (code, body) = curl(
        &b,
        &[
            "-H",
            "Content-Type: application/ocsp-request",
            "--data-binary",
            &format!("@{}", p(&req)),
        ],
        "/v1/pki/ocsp",
    );
    assert_eq!(code, 200);
    std::fs::write(t.join("unknown-resp.der"), body).unwrap();
    let out = openssl(&[
        "ocsp",
        "-respin",
        p(&t.join("unknown-resp.der")),
        "-reqin",
        p(&req),
        "-CAfile",
        p(&root),
        "-resp_text",
    ]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("Response verify OK") && text.contains("Cert Status: unknown"),
        "{text}"
    );

    // A malformed request: 400 with an OCSP malformedRequest, and the broker stays up.
    let (code, body) = curl(
        &b,
        &[
            "-H",
            "Content-Type: application/ocsp-request",
            "--data-binary",
            "garbage",
        ],
        "/v1/pki/ocsp",
    );
    assert_eq!((code, body), (400, vec![0x30, 0x03, 0x0a, 0x01, 0x01]));
    assert_eq!(curl(&b, &[], "/healthz").0, 200);

    // An operator revokes it: OCSP says revoked with the reason, the CRL lists it, and a
    // rustls/webpki client given the CRL refuses it.
    let serial = ok(&openssl(&["x509", "-noout", "-serial", "-in", p(&cert)]));
    let serial = serial.trim().trim_start_matches("serial=").to_string();
    let revoked = ok(&b.cli(&["cert", "revoke", &serial, "--reason", "keyCompromise"]));
    assert!(revoked.contains("keyCompromise"), "{revoked}");
    let again = b.cli(&["cert", "revoke", &serial]);
    assert!(
        stderr(&again).contains("revoked already"),
        "{}",
        stderr(&again)
    );
    let status = ocsp_status(&b, t, &issuer, &cert, &root);
    assert!(
        status.contains("Cert Status: revoked") && status.contains("keyCompromise"),
        "{status}"
    );
    let crl = crl_check(false);
    let leaf = attestation::certs::decode_pem_or_der(&std::fs::read(&cert).unwrap(), "c").unwrap();
    let root_der =
        attestation::certs::decode_pem_or_der(&std::fs::read(&issuer).unwrap(), "r").unwrap();
    let verify_with_crl = |crl: Vec<u8>| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root_der[0].clone().into()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_crls(vec![crl.into()])
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier.verify_server_cert(
            &leaf[0].clone().into(),
            &[],
            &rustls::pki_types::ServerName::try_from("web.internal").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
    };
    let refused = verify_with_crl(crl);
    assert!(
        matches!(
            refused,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        ),
        "{refused:?}"
    );

    // Policy: a second guest's certificate for a name the new policy no longer grants is
    // revoked (privilegeWithdrawn, reason code 9, which OpenSSL prints without a name) when
    // the policy is set; one still granted is not.
    let other = certificate(&b, &t.join("b"), "svc", "\"a.svc.internal\"");
    let kept = certificate(&b, &t.join("c"), "kept", "\"web.internal\"");
    let narrowed =
        b.policy_with_certificates("policy-narrowed.json", web_profile(&["web.internal"]));
    let set = ok(&b.cli(&["policy", "set", p(&narrowed)]));
    assert!(set.contains("revoked"), "{set}");
    let other_issuer = ca_certificate(&other, "svc", t);
    let status = ocsp_status(
        &b,
        t,
        &other_issuer,
        &other.join("svc.pem"),
        &other.join("svc.ca.pem"),
    );
    assert!(
        status.contains("Cert Status: revoked") && status.contains("(0x9)"),
        "{status}"
    );
    let status = ocsp_status(
        &b,
        t,
        &other_issuer,
        &kept.join("kept.pem"),
        &kept.join("kept.ca.pem"),
    );
    assert!(status.contains("Cert Status: good"), "{status}");
    let audit = ok(&b.cli(&["audit", "--action", "pki.cert.revoke", "--json"]));
    assert!(
        audit.contains("privilegeWithdrawn") && audit.contains("(policy v2)"),
        "{audit}"
    );
}

/// A CA certified by an offline OpenSSL root (its key identifier is OpenSSL's SHA-1 one): its
/// CRL names that identifier, so `openssl verify -crl_check` finds it and sees the revocation.
#[test]
fn an_imported_cas_crl_is_found_by_openssl() {
    let b = Broker::start();
    b.provision(&b.policy_with_certificates("policy-pki.json", web_profile(&["web.internal"])));
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let csr = t.join("ca.csr");
    ok(&b.cli(&["ca", "init", "--csr", p(&csr)]));
    openssl_ec_req(
        "P-384",
        &t.join("root.key"),
        &t.join("root.pem"),
        "/O=Example/CN=Offline Root",
        &["-x509", "-days", "30"],
    );
    let ext = t.join("ca.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    ok(&openssl(&[
        "x509",
        "-req",
        "-in",
        p(&csr),
        "-CA",
        p(&t.join("root.pem")),
        "-CAkey",
        p(&t.join("root.key")),
        "-days",
        "10",
        "-extfile",
        p(&ext),
        "-out",
        p(&t.join("ca.pem")),
    ]));
    let chain = t.join("chain.pem");
    std::fs::write(
        &chain,
        std::fs::read_to_string(t.join("ca.pem")).unwrap()
            + &std::fs::read_to_string(t.join("root.pem")).unwrap(),
    )
    .unwrap();
    ok(&b.cli(&["ca", "import", p(&chain)]));

    let store = certificate(&b, &t.join("a"), "web", "\"web.internal\"");
    let cert = store.join("web.pem");
    let check = |expect_ok: bool| {
        let (_, text) = crl_verify(&b, t, "/v1/pki/crl", &store.join("web.ca.pem"), &cert);
        assert_eq!(text.is_ok(), expect_ok, "{text:?}");
        text.unwrap_or_else(|e| e)
    };
    check(true);
    let serial = ok(&openssl(&["x509", "-noout", "-serial", "-in", p(&cert)]));
    let serial = serial.trim().trim_start_matches("serial=").to_string();
    ok(&b.cli(&["cert", "revoke", &serial, "--reason", "superseded"]));
    let text = check(false);
    assert!(text.contains("certificate revoked"), "{text}");
}
