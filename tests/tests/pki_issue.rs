//! Certificates from the broker's CA for measured guests: two simulated guests' agents get
//! certificates for keys they made, and OpenSSL runs mutual TLS between them with those
//! certificates; a Rust client (rustls/webpki) verifies one. Broken twins at the protocol
//! level: a request bound to another key, the version-1 binding, a request whose signature
//! does not verify, a name outside the profile, an unknown profile, another measurement, and
//! no CA.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use attestation::binding;
use attestation::protocol::{
    AttestResponse, CertificateRequest, ChallengeResponse, EphemeralKey, Evidence, Kem, encode_b64,
};
use base64::Engine;
use e2e::{Broker, Guest, arg as p, binary, free_port, ok, stderr};

/// The dev policy with a certificate profile `web`, for guests with the default measurement.
fn policy(b: &Broker) -> PathBuf {
    b.policy_with_certificates(
        "policy-pki.json",
        serde_json::json!({
            "web": {
                "rules": ["simulated-guest"],
                "dns": ["web.internal", "*.svc.internal"],
                "uri": ["spiffe://example.org/web"],
                "usages": ["serverAuth", "clientAuth"],
                "max_lifetime_hours": 2
            }
        }),
    )
}

fn setup() -> Broker {
    let b = Broker::start();
    b.provision(&policy(&b));
    ok(&b.cli(&["ca", "init", "--subject", "Workload CA", "--days", "30"]));
    b
}

/// An agent configuration asking for `db-key` and one certificate.
fn agent_config(b: &Broker, dir: &Path, certificate: &str, extra_sim: &str) -> PathBuf {
    b.agent_config(
        dir,
        &format!("[[secrets]]\nname = \"db-key\"\n[[certificate]]\n{certificate}"),
        extra_sim,
    )
}

fn agent(config: &Path) -> Output {
    Command::new(binary("guest-agent").unwrap())
        .args(["--config", p(config)])
        .output()
        .unwrap()
}

#[test]
fn two_measured_guests_run_mutual_tls_with_their_certificates() {
    let b = setup();
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server");
    let client_dir = tmp.path().join("client");
    let printed = ok(&agent(&agent_config(
        &b,
        &server_dir,
        "profile = \"web\"\nname = \"web\"\ndns = [\"web.internal\"]\nuri = [\"spiffe://example.org/web\"]",
        "",
    )));
    assert!(printed.contains("wrote certificate web"), "{printed}");
    ok(&agent(&agent_config(
        &b,
        &client_dir,
        "profile = \"web\"\nname = \"peer\"\ndns = [\"a.svc.internal\"]",
        "",
    )));
    let s = server_dir.join("credstore");
    let c = client_dir.join("credstore");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.join("web.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400);

    // OpenSSL's view of what was issued.
    let text = ok(&Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", p(&s.join("web.pem"))])
        .output()
        .unwrap());
    for expected in [
        "DNS:web.internal",
        "URI:spiffe://example.org/web",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "CA:FALSE",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    ok(&Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            p(&s.join("web.ca.pem")),
            "-purpose",
            "sslserver",
            p(&s.join("web.pem")),
        ])
        .output()
        .unwrap());
    // Twin: the same certificate a minute after its notAfter (the profile's 2 hours) is refused
    // as expired.
    let end = ok(&Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in", p(&s.join("web.pem"))])
        .output()
        .unwrap());
    let end = end.trim().trim_start_matches("notAfter=");
    let end = ok(&Command::new("date")
        .args(["-u", "-d", end, "+%s"])
        .output()
        .unwrap());
    let after = end.trim().parse::<u64>().unwrap() + 60;
    let expired = Command::new("openssl")
        .args(["verify", "-attime", &after.to_string(), "-CAfile"])
        .args([p(&s.join("web.ca.pem")), p(&s.join("web.pem"))])
        .output()
        .unwrap();
    assert!(!expired.status.success());
    assert!(
        String::from_utf8_lossy(&expired.stdout).contains("certificate has expired")
            || stderr(&expired).contains("certificate has expired"),
        "{}",
        stderr(&expired)
    );

    // Mutual TLS between the two guests: each verifies the other's certificate to the CA.
    let port = free_port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            p(&s.join("web.pem")),
            "-key",
            p(&s.join("web.key")),
            "-CAfile",
            p(&s.join("web.ca.pem")),
            "-Verify",
            "1",
            "-verify_return_error",
            // The OCSP response the server's agent keeps beside its certificate, stapled.
            "-status_file",
            p(&s.join("web.ocsp.der")),
            "-www",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Connected means: the client verified the server, and the server (which verifies the
    // client's certificate) answered a request over the connection. With TLS 1.3 the
    // server's verdict on the client certificate arrives after the client's handshake is
    // done, so only an answer proves it was accepted.
    let s_client = |cert: &Path, key: &Path, hostname: &str| {
        use std::io::Write;
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-cert",
                p(cert),
                "-key",
                p(key),
                "-CAfile",
                p(&c.join("peer.ca.pem")),
                "-verify_return_error",
                "-verify_hostname",
                hostname,
                "-ign_eof",
                "-status",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n");
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        let answered = String::from_utf8_lossy(&out.stdout).contains("HTTP/1.0 200 ok");
        (
            out.status.success() && text.contains("Verification: OK") && answered,
            text,
        )
    };
    let (connected, out) = s_client(&c.join("peer.pem"), &c.join("peer.key"), "web.internal");
    // The client received the server's stapled OCSP response: successful, and good.
    assert!(
        out.contains("OCSP Response Status: successful") && out.contains("Cert Status: good"),
        "{out}"
    );
    // Twins: the server's certificate does not name other.internal; a client certificate
    // from another CA (the dev setup's workload CA) is refused by the server.
    let (wrong_name, _) = s_client(&c.join("peer.pem"), &c.join("peer.key"), "other.internal");
    let foreign = b.dir.join("web-tls.pem");
    let (foreign_client, _) = s_client(&foreign, &foreign, "web.internal");
    let _ = server.kill();
    let _ = server.wait();
    assert!(connected, "{out}");
    assert!(!wrong_name && !foreign_client);

    // The broker recorded both, in the audit log and in its list, with their serials.
    let audit = ok(&b.cli(&["audit", "--action", "attest", "--json"]));
    assert_eq!(audit.matches("\"serial\"").count(), 2, "{audit}");
    let listed: serde_json::Value = serde_json::from_str(&ok(&b.cli(&["cert", "list"]))).unwrap();
    let listed = listed["certificates"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let serial = ok(&Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in", p(&s.join("web.pem"))])
        .output()
        .unwrap());
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    let web = listed
        .iter()
        .find(|c| c["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("{serial} not in {listed:?}"));
    assert_eq!(web["profile"], "web");
    assert_eq!(
        web["names"],
        serde_json::json!(["dns:web.internal", "uri:spiffe://example.org/web"])
    );
}

/// A challenge, then an attest request for `certificates` from `guest`, with REPORT_DATA
/// computed by `bind` from the nonce, the HPKE key's binding bytes and the requests.
async fn attest(
    b: &Broker,
    guest: &Guest,
    certificates: Vec<CertificateRequest>,
    bind: impl Fn(&[u8], &[u8]) -> [u8; 64],
) -> (u16, serde_json::Value) {
    let client = b.guest_client(None);
    let challenge: ChallengeResponse = client
        .post(b.url("/v1/challenge"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&challenge.nonce)
        .unwrap();
    let key = EphemeralKey::generate(Kem::X25519);
    let mut request = guest.request(&challenge.nonce, &key, &[], None);
    let report = guest.sign(bind(&nonce, &key.public_key().binding_bytes().unwrap()));
    if let Evidence::Snp { report: r, .. } = &mut request.evidence {
        *r = encode_b64(&report);
    }
    request.certificates = certificates;
    let resp = client
        .post(b.url("/v1/attest"))
        .json(&request)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// A P-256 key and a request for `dns` signed by it: (request, its SPKI).
fn csr(profile: &str, dns: &[&str]) -> (CertificateRequest, Vec<u8>) {
    use rcgen::PublicKeyData;
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
            .unwrap();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (
        CertificateRequest {
            profile: profile.into(),
            csr: encode_b64(&der),
        },
        key.subject_public_key_info(),
    )
}

fn v2(spkis: Vec<Vec<u8>>) -> impl Fn(&[u8], &[u8]) -> [u8; 64] {
    move |nonce, key| {
        let refs: Vec<&[u8]> = spkis.iter().map(Vec::as_slice).collect();
        binding::report_data_v2(nonce, key, &refs)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_issued_only_for_the_bound_key_the_granted_names_and_the_measured_guest() {
    let b = Broker::start();
    b.provision(&policy(&b));
    let amd = b.simulated_amd();
    let guest = Guest::new(&amd, |_| {});

    // No CA yet.
    let (req, spki) = csr("web", &["web.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![spki])).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("no active CA"),
        "{body}"
    );
    ok(&b.cli(&["ca", "init", "--days", "30"]));

    // The good request: the certificate verifies with rustls/webpki to the published CA.
    let (req, spki) = csr("web", &["web.internal", "x.svc.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![spki])).await;
    assert_eq!(status, 200, "{body}");
    let response: AttestResponse = serde_json::from_value(body).unwrap();
    let issued = &response.certificates[0];
    let leaf = attestation::certs::decode_pem_or_der(issued.certificate.as_bytes(), "c").unwrap();
    let root = attestation::certs::decode_pem_or_der(issued.chain[0].as_bytes(), "r").unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root[0].clone().into()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    use rustls::client::danger::ServerCertVerifier;
    for (name, valid) in [("x.svc.internal", true), ("y.svc.internal", false)] {
        let result = verifier.verify_server_cert(
            &leaf[0].clone().into(),
            &[],
            &rustls::pki_types::ServerName::try_from(name).unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        );
        assert_eq!(result.is_ok(), valid, "{name}: {result:?}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now + 2 * 3600 - 5..=now + 2 * 3600 + 5).contains(&issued.not_after));

    // Broken twins, each with its exact refusal.
    let (req, _) = csr("web", &["web.internal"]);
    let (_, other_spki) = csr("web", &["web.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![other_spki])).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("binding")),
        "{body}"
    );

    let (req, _) = csr("web", &["web.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], binding::report_data).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("binding")),
        "{body}"
    );

    let (mut req, spki) = csr("web", &["web.internal"]);
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(&req.csr)
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 1;
    req.csr = encode_b64(&der);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![spki])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("does not verify"),
        "{body}"
    );

    // A P-384 key whose request is signed with ECDSA-SHA256 (made by OpenSSL): refused, the
    // key would be certified under another curve's name.
    let tmp = tempfile::tempdir().unwrap();
    let der = tmp.path().join("p384.der");
    let made = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-sha256",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=web",
            "-addext",
            "subjectAltName=DNS:web.internal",
            "-outform",
            "DER",
            "-out",
        ])
        .arg(&der)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let mismatched = CertificateRequest {
        profile: "web".into(),
        csr: encode_b64(&std::fs::read(&der).unwrap()),
    };
    let (status, body) = attest(&b, &guest, vec![mismatched], v2(vec![vec![0]])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("another algorithm"),
        "{body}"
    );

    let (req, spki) = csr("web", &["web.internal", "evil.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![spki])).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("certificate")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("DNS name \"evil.internal\" is not granted"),
        "{body}"
    );

    let (req, spki) = csr("nope", &["web.internal"]);
    let (status, body) = attest(&b, &guest, vec![req], v2(vec![spki])).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("policy")),
        "{body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("certificate:nope"),
        "{body}"
    );

    let other = Guest::new(&amd, |f| f.measurement = [0x11; 48]);
    let (req, spki) = csr("web", &["web.internal"]);
    let (status, body) = attest(&b, &other, vec![req], v2(vec![spki])).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("policy")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("measurement"),
        "{body}"
    );
}
