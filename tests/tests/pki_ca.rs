//! The private CA's issuing key (`broker ca …`): a self-signed root, or a request signed by
//! an operator's offline root made with OpenSSL, checked by OpenSSL; the trust bundle at
//! `GET /v1/pki/ca`; rotation; and each wrong import refused with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use e2e::{Broker, arg as p, ok, openssl, stderr};

/// `GET /v1/pki/ca` with curl: status and body.
fn bundle(b: &Broker) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
        .arg(b.dir.join("ca.pem"))
        .arg(b.url("/v1/pki/ca"))
        .output()
        .unwrap();
    let text = ok(&out);
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[test]
fn a_self_signed_ca_is_published_rotated_and_never_shown_with_its_key() {
    let b = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(bundle(&b).0, 404, "no CA yet");

    let made = json(&b.cli(&["ca", "init", "--subject", "Workload CA", "--days", "30"]));
    assert_eq!(made["version"], 1);
    assert_eq!(made["state"], "active");
    let cert = tmp.path().join("ca1.pem");
    std::fs::write(&cert, made["certificate"].as_str().unwrap()).unwrap();
    let text = ok(&openssl(&["x509", "-in", p(&cert), "-noout", "-text"]));
    for expected in [
        "CA:TRUE, pathlen:0",
        "Certificate Sign, CRL Sign",
        "CN = Workload CA",
        "ASN1 OID: prime256v1",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    ok(&openssl(&["verify", "-CAfile", p(&cert), p(&cert)]));

    // One CA: a second init is a conflict, rotation makes version 2.
    let again = b.cli(&["ca", "init"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("ca rotate"), "{}", stderr(&again));
    let rotated = json(&b.cli(&["ca", "rotate", "--subject", "Workload CA 2"]));
    assert_eq!(rotated["version"], 2);

    // Both are published (old certificates stay verifiable), newest first.
    let (code, pem) = bundle(&b);
    assert_eq!(code, 200);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(pem.starts_with(rotated["certificate"].as_str().unwrap()));

    // What operators see carries no key; the audit log records each step.
    let shown = ok(&b.cli(&["ca", "show"]));
    assert!(
        !shown.contains("PRIVATE KEY") && !shown.contains("sealed"),
        "{shown}"
    );
    let audit = ok(&b.cli(&["audit", "--action", "pki.ca.rotate", "--json"]));
    assert!(audit.contains("Workload CA 2"), "{audit}");

    // The key is sealed at rest: no PKCS#8 private key in the database file.
    let db = std::fs::read(b.dir.join("broker.db")).unwrap();
    let needle = b"-----BEGIN PRIVATE KEY";
    assert!(!db.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn a_request_signed_by_an_offline_root_is_imported_and_wrong_chains_are_refused() {
    let b = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    let csr = t("ca.csr");
    let printed = ok(&b.cli(&["ca", "init", "--subject", "Issuing CA", "--csr", p(&csr)]));
    assert!(printed.contains("pending"), "{printed}");
    ok(&openssl(&["req", "-in", p(&csr), "-verify", "-noout"]));
    // The request file is never overwritten.
    let again = b.cli(&["ca", "rotate", "--csr", p(&csr)]);
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(bundle(&b).0, 404, "nothing published while pending");

    // The operator's offline root, and another root.
    let root = |name: &str| {
        ok(&openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-nodes",
            "-keyout",
            p(&t(&format!("{name}.key"))),
            "-out",
            p(&t(&format!("{name}.pem"))),
            "-subj",
            &format!("/O=Example/CN={name}"),
            "-days",
            "30",
        ]));
    };
    root("Offline Root");
    root("Other Root");
    let ext = t("ca.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    let leaf_ext = t("leaf.ext");
    std::fs::write(&leaf_ext, "basicConstraints=critical,CA:FALSE\n").unwrap();
    let sign = |request: &Path, out: &str, extfile: &Path| {
        ok(&openssl(&[
            "x509",
            "-req",
            "-in",
            p(request),
            "-CA",
            p(&t("Offline Root.pem")),
            "-CAkey",
            p(&t("Offline Root.key")),
            "-days",
            "10",
            "-extfile",
            p(extfile),
            "-out",
            p(&t(out)),
        ]));
    };
    let chain = |cert: &str, root: &str| {
        let path = t(&format!("{cert}+{root}"));
        let text =
            std::fs::read_to_string(t(cert)).unwrap() + &std::fs::read_to_string(t(root)).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    };
    let refused = |file: &Path, reason: &str| {
        let out = b.cli(&["ca", "import", p(file)]);
        assert!(!out.status.success(), "{reason}");
        assert!(stderr(&out).contains(reason), "{reason}: {}", stderr(&out));
    };

    // A certificate for another key (a request OpenSSL made with its own key).
    ok(&openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        p(&t("other.key")),
        "-subj",
        "/CN=Issuing CA",
        "-out",
        p(&t("other.csr")),
    ]));
    sign(&t("other.csr"), "other.pem", &ext);
    refused(&chain("other.pem", "Offline Root.pem"), "another key");
    // The right key, but no CA certificate.
    sign(&csr, "leaf.pem", &leaf_ext);
    refused(
        &chain("leaf.pem", "Offline Root.pem"),
        "not a CA certificate",
    );
    // A CA that may not sign CRLs.
    let no_crl = t("no-crl.ext");
    std::fs::write(
        &no_crl,
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign\n",
    )
    .unwrap();
    sign(&csr, "no-crl.pem", &no_crl);
    refused(&chain("no-crl.pem", "Offline Root.pem"), "cRLSign");
    // The right certificate under another root.
    sign(&csr, "ca.pem", &ext);
    refused(&chain("ca.pem", "Other Root.pem"), "would not verify");
    // Without the root.
    refused(&t("ca.pem"), "root last");

    // The right chain.
    let imported = json(&b.cli(&["ca", "import", p(&chain("ca.pem", "Offline Root.pem"))]));
    assert_eq!(imported["state"], "active");
    assert_eq!(imported["chain"].as_array().unwrap().len(), 1);
    let (code, pem) = bundle(&b);
    assert_eq!(code, 200);
    let published = t("bundle.pem");
    std::fs::write(&published, &pem).unwrap();
    // OpenSSL agrees: the bundle's CA chains to the offline root.
    ok(&openssl(&[
        "verify",
        "-CAfile",
        p(&t("Offline Root.pem")),
        p(&t("ca.pem")),
    ]));
    assert!(pem.contains(&std::fs::read_to_string(t("Offline Root.pem")).unwrap()));
    // Imported once: a second import is a conflict.
    refused(
        &chain("ca.pem", "Offline Root.pem"),
        "already has its certificate",
    );
    let audit = ok(&b.cli(&["audit", "--action", "pki.ca.import", "--json"]));
    assert!(audit.contains("\"root\""), "{audit}");
}
