//! The broker service as a real process over TLS on 127.0.0.1: a simulated guest receives its
//! secrets; every kind of bad request is refused with its status, releases nothing and is
//! audited; the admin API needs an operator certificate; secrets never reach the log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use attestation::protocol::{AttestResponse, ChallengeResponse, EphemeralKey, Kem, encode_b64};
use attestation::sim::ReportFields;
use serde_json::{Value, json};

use e2e::{Broker, Guest};

async fn challenge(client: &reqwest::Client, b: &Broker) -> String {
    let r = client.post(b.url("/v1/challenge")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<ChallengeResponse>().await.unwrap().nonce
}

async fn post(client: &reqwest::Client, b: &Broker, body: &impl serde::Serialize) -> (u16, Value) {
    let r = client
        .post(b.url("/v1/attest"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

fn expect_problem(status: u16, v: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(
        v["type"],
        format!("urn:snp-key-broker:problem:{want_type}"),
        "{v}"
    );
    assert!(
        v.get("secrets").is_none(),
        "a refusal releases nothing: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_every_refusal_over_real_tls() {
    let b = Broker::start();
    // Operator set-up through the real CLI.
    let tls_pem = {
        let mut s = std::fs::read_to_string(b.dir.join("server.key")).unwrap();
        s.push_str(&std::fs::read_to_string(b.dir.join("server.pem")).unwrap());
        s
    };
    let tls_file = b.dir.join("web-tls.pem");
    std::fs::write(&tls_file, &tls_pem).unwrap();
    b.provision(&b.dir.join("policy.json"));

    let client = b.guest_client(None);
    let guest = Guest::new(&b.simulated_amd(), |_| {});

    // 1. The measured guest receives both secrets, byte-exact, sealed to its key.
    let nonce = challenge(&client, &b).await;
    let key = EphemeralKey::generate(Kem::X25519);
    let request = guest.request(&nonce, &key, &["web-tls", "db-key"], None);
    let (status, v) = post(&client, &b, &request).await;
    assert_eq!(status, 200, "{v}");
    let response: AttestResponse = serde_json::from_value(v).unwrap();
    assert_eq!(response.claims["root"], "simulated");
    let tls = key.open(&response.secrets[0]).unwrap();
    assert_eq!(response.secrets[0].name, "web-tls");
    assert_eq!(response.secrets[0].kind, "tls-key");
    assert_eq!(&tls[..], tls_pem.as_bytes());
    let data_key = key.open(&response.secrets[1]).unwrap();
    assert_eq!(data_key.len(), 32);
    // Another key cannot open what was sealed to this one.
    assert!(
        EphemeralKey::generate(Kem::X25519)
            .open(&response.secrets[1])
            .is_err()
    );

    // P-384 guests get the P-384 suite.
    let nonce = challenge(&client, &b).await;
    let p384 = EphemeralKey::generate(Kem::P384);
    let (status, v) = post(
        &client,
        &b,
        &guest.request(&nonce, &p384, &["db-key"], None),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let r: AttestResponse = serde_json::from_value(v).unwrap();
    assert_eq!(r.secrets[0].suite.kdf, "hkdf-sha384");
    assert_eq!(&p384.open(&r.secrets[0]).unwrap()[..], &data_key[..]);

    // 2. The same request again: the nonce is spent.
    let (status, v) = post(&client, &b, &request).await;
    expect_problem(status, &v, 409, "nonce-replay");

    // 3. An expired nonce, and 4. one minted under another broker's key.
    let master = broker::keys::MasterKey::load(&broker::config::MasterKeySource::File(
        b.dir.join("master.key"),
    ))
    .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ring = |m| {
        std::sync::Arc::new(
            broker::keyring::Keyring::new(m, std::time::Duration::from_secs(60)).unwrap(),
        )
    };
    let ours = broker::nonce::NonceAuthority::new(ring(master));
    let expired = ours.mint(now - 10).unwrap();
    let (status, v) = post(
        &client,
        &b,
        &guest.request(&expired, &key, &["db-key"], None),
    )
    .await;
    expect_problem(status, &v, 403, "nonce-refused");
    assert_eq!(v["check"], "nonce_expired");
    let theirs =
        broker::nonce::NonceAuthority::new(ring(broker::keys::MasterKey::generate().unwrap()));
    let foreign = theirs.mint(now + 60).unwrap();
    let (status, v) = post(
        &client,
        &b,
        &guest.request(&foreign, &key, &["db-key"], None),
    )
    .await;
    expect_problem(status, &v, 403, "nonce-refused");
    assert_eq!(v["check"], "nonce_not_issued_here");

    // 5. REPORT_DATA binds another key than the one the secrets would be sealed to.
    let nonce = challenge(&client, &b).await;
    let other = EphemeralKey::generate(Kem::X25519);
    let (status, v) = post(
        &client,
        &b,
        &guest.request(&nonce, &key, &["db-key"], Some(&other)),
    )
    .await;
    expect_problem(status, &v, 403, "verification-refused");
    assert_eq!(v["check"], "binding");

    // 6-8. Genuine-looking guests the policy refuses.
    for (label, tweak) in [
        (
            "wrong measurement",
            Box::new(|f: &mut ReportFields| f.measurement = [0x11; 48])
                as Box<dyn Fn(&mut ReportFields)>,
        ),
        (
            "debug guest",
            Box::new(|f: &mut ReportFields| f.policy |= 1 << 19),
        ),
        (
            "TCB below the floor",
            Box::new(|f: &mut ReportFields| f.tcb.snp = 22),
        ),
    ] {
        let g = Guest::new(&b.simulated_amd(), |f| tweak(f));
        let nonce = challenge(&client, &b).await;
        let (status, v) = post(&client, &b, &g.request(&nonce, &key, &["db-key"], None)).await;
        expect_problem(status, &v, 403, "policy-refused");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .starts_with("db-key: rule \"simulated-guest\""),
            "{label}: {v}"
        );
    }

    // Unknown secret.
    let nonce = challenge(&client, &b).await;
    let (status, v) = post(&client, &b, &guest.request(&nonce, &key, &["nope"], None)).await;
    expect_problem(status, &v, 404, "unknown-secret");

    // 9. Oversized body, 10. malformed JSON.
    let big = json!({ "padding": "x".repeat(200 * 1024) });
    let (status, v) = post(&client, &b, &big).await;
    expect_problem(status, &v, 413, "too-large");
    let r = client
        .post(b.url("/v1/attest"))
        .header("content-type", "application/json")
        .body("{\"nonce\": ")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    expect_problem(status, &v, 400, "malformed");

    // 11. Admin without a client certificate, and with one from another CA.
    let r = client.get(b.url("/v1/admin/secrets")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (cert, key_file) = foreign_operator(&b.dir);
    let stranger = b.guest_client(Some((&cert, &key_file)));
    let r = stranger
        .get(b.url("/v1/admin/secrets"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["type"],
        "urn:snp-key-broker:problem:client-certificate-refused"
    );
    // The operator's own certificate works.
    let operator = b.guest_client(Some((
        &b.dir.join("operator.pem"),
        &b.dir.join("operator.key"),
    )));
    let r = operator
        .get(b.url("/v1/admin/secrets"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Every refusal above left an audit record with its reason.
    let out = b.cli(&["audit", "--json", "--limit", "1000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = audit["records"].as_array().unwrap();
    let reasons: Vec<String> = records
        .iter()
        .filter(|r| r["outcome"] == "refused")
        .map(|r| r["detail"]["reason"].as_str().unwrap_or("").to_string())
        .collect();
    for reason in [
        "nonce_replay",
        "nonce_expired",
        "nonce_not_issued_here",
        "binding",
        "unknown_secret",
        "too_large",
        "malformed",
        "no client certificate",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no audit record for {reason}: {reasons:?}"
        );
    }
    assert_eq!(reasons.iter().filter(|r| *r == "policy").count(), 3);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["action"] == "admin.denied")
            .count(),
        2,
        "both refused admin calls are audited"
    );
    let released = records
        .iter()
        .filter(|r| r["outcome"] == "released")
        .count();
    assert_eq!(released, 2);

    // (After the audit check: these refusals would exceed one source's budget of audit rows.)
    // What the guest received is no admin credential: not its TLS key and certificate (here
    // the broker's own), nor the dev workload certificate `web-tls.pem`.
    let received = b.dir.join("received.pem");
    std::fs::write(&received, &tls[..]).unwrap();
    let workload = b.dir.join("web-tls.pem");
    for identity in [&received, &workload] {
        let as_guest = b.guest_client(Some((identity, identity)));
        for (method, path) in [
            (reqwest::Method::GET, "/v1/admin/secrets"),
            (reqwest::Method::DELETE, "/v1/admin/secrets/db-key"),
            (reqwest::Method::PUT, "/v1/admin/policy"),
        ] {
            let r = as_guest
                .request(method.clone(), b.url(path))
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{} {method} {path}", identity.display());
        }
    }
    // The CLI does not let a name address another secret.
    let out = b.cli(&["secret", "delete", "nope/../db-key"]);
    assert!(!out.status.success());
    assert!(
        e2e::stderr(&out).contains("not a secret name"),
        "{}",
        e2e::stderr(&out)
    );
    let out = b.cli(&["secret", "list", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("db-key"));

    // Metrics count releases and refusals by reason.
    let m = client
        .get(b.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("broker_attestations_total{outcome=\"released\",reason=\"ok\"} 2"),
        "{m}"
    );
    assert!(m.contains("reason=\"nonce_replay\""));
    assert!(m.contains("broker_attestation_duration_seconds_bucket"));
    assert_eq!(
        client.get(b.url("/readyz")).send().await.unwrap().status(),
        200
    );

    // No secret byte reached the log (the run logged at debug level).
    let log = b.log_text();
    assert!(log.contains("DANGER: this broker trusts a SIMULATED AMD root"));
    let key_body: String = std::fs::read_to_string(b.dir.join("server.key"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for needle in [
        hex::encode(&data_key[..]),
        encode_b64(&data_key[..]),
        key_body.get(..40).unwrap().to_string(),
    ] {
        assert!(!log.contains(&needle), "secret material in the log");
    }
}

/// A client certificate from a CA the broker does not trust.
fn foreign_operator(dir: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::from_params(&ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (c, k) = (dir.join("stranger.pem"), dir.join("stranger.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// The simulated-root warning reaches standard error whatever the log filter says.
#[test]
fn simulated_root_warning_survives_a_quiet_log_filter() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let out = std::process::Command::new(e2e::binary("broker").unwrap())
        .args(["init", "--dev"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut child = std::process::Command::new(e2e::binary("broker").unwrap())
        .args(["serve", "--config"])
        .arg(dir.join("broker.toml"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("Never use this in production") {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = reader.join().unwrap();
    assert!(
        seen.contains("DANGER: this broker trusts a SIMULATED AMD root"),
        "{seen}"
    );
}
