//! A broker that proves itself (`[platform] publish_evidence`, on the simulated platform): the
//! operator CLI with `--require-attested-broker` verifies the broker's own evidence, bound to
//! the TLS key of its connection, before sending anything. Twins: a policy pinning another
//! measurement, the simulated root not trusted, a broker that publishes nothing, and a relay
//! that terminates TLS with a certificate the CLI would otherwise accept and forwards to the
//! real broker (its evidence is genuine but bound to the broker's key, not the relay's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use e2e::{Broker, stderr};

fn publishing(config: String) -> String {
    format!("{config}\n[platform]\npublish_evidence = true\ndangerous_simulated = \"sim\"\n")
}

/// The operator's expectation of the broker, in the release-policy grammar: grant `broker`.
fn broker_policy(dir: &Path, measurement: &str) -> PathBuf {
    let path = dir.join(format!("broker-policy-{}.json", &measurement[..4]));
    std::fs::write(
        &path,
        serde_json::json!({
            "rules": { "our-broker-image": { "allOf": [
                { "claim": "root", "equals": "simulated" },
                { "claim": "measurement", "equals": measurement },
                { "claim": "policy.debug_allowed", "equals": false },
                { "claim": "vmpl", "equals": 0 }
            ]}},
            "secrets": { "broker": ["our-broker-image"] }
        })
        .to_string(),
    )
    .unwrap();
    path
}

fn attested_cli(b: &Broker, policy: &Path, args: &[&str]) -> std::process::Output {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend([
        "--require-attested-broker".into(),
        policy.display().to_string(),
        "--dangerous-broker-simulated-root".into(),
        b.dir.join("sim/ark.pem").display().to_string(),
    ]);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    b.cli(&refs)
}

fn secret_names(b: &Broker) -> String {
    let out = b.cli(&["secret", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_nothing_to_a_broker_that_does_not_prove_itself() {
    let b = Broker::start_configured(None, |_, c| publishing(c));
    let default_measurement = "5a".repeat(48);
    let good = broker_policy(&b.dir, &default_measurement);

    // The broker proves itself: the secret is stored.
    let out = attested_cli(
        &b,
        &good,
        &["secret", "generate", "attested", "--bytes", "16"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(secret_names(&b).contains("attested"));

    let admin_before = requests(&b, "/v1/admin").await;
    assert!(admin_before > 0, "the attested run reached the admin API");
    // Another measurement pinned: refused, nothing sent.
    let other = broker_policy(&b.dir, &"a5".repeat(48));
    let out = attested_cli(
        &b,
        &other,
        &["secret", "generate", "refused-1", "--bytes", "16"],
    );
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("not trusted") && e.contains("measurement"),
        "{e}"
    );
    assert!(e.contains("nothing was sent"), "{e}");
    // The simulated root not trusted: its chain does not verify.
    let out = b.cli(&[
        "secret",
        "generate",
        "refused-2",
        "--require-attested-broker",
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not verify"), "{}", stderr(&out));
    assert_eq!(requests(&b, "/v1/admin").await, admin_before);
    let names = secret_names(&b);
    assert!(!names.contains("refused-"), "{names}");

    // The endpoint: a nonce is required, and the evidence binds it.
    let client = b.guest_client(None);
    let r = client
        .get(b.url("/v1/broker/evidence?nonce=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let nonce = "11".repeat(32);
    let r = client
        .get(b.url(&format!("/v1/broker/evidence?nonce={nonce}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["nonce"], nonce);
    assert_eq!(v["evidence"]["kind"], "snp");

    // A relay with a certificate the CLI would otherwise accept: refused, nothing sent.
    let relay = Relay::start(&b).await;
    let admin = std::fs::read_to_string(b.dir.join("admin.toml")).unwrap();
    let relayed = b.dir.join("admin-relay.toml");
    std::fs::write(
        &relayed,
        admin
            .replace(
                &format!("127.0.0.1:{}", b.port),
                &format!("127.0.0.1:{}", relay.port),
            )
            .replace(
                "ca = \"ca.pem\"",
                &format!("ca = {:?}", relay.ca_bundle.display().to_string()),
            ),
    )
    .unwrap();
    // (Without the requirement the relay is accepted: its certificate is trusted.)
    let out = b.cli(&["secret", "list", "--config", relayed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = attested_cli(
        &b,
        &good,
        &[
            "secret",
            "generate",
            "refused-3",
            "--bytes",
            "16",
            "--config",
            relayed.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not bound to this connection's TLS key"),
        "{}",
        stderr(&out)
    );
    assert!(!secret_names(&b).contains("refused-3"));
    drop(relay);

    // A broker that publishes no evidence: refused.
    let plain = Broker::start();
    let plain_policy = broker_policy(&plain.dir, &default_measurement);
    let out = attested_cli(&plain, &plain_policy, &["secret", "list"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("serves no evidence (404"),
        "{}",
        stderr(&out)
    );
}

/// A TLS-terminating relay on loopback: its own CA and certificate for 127.0.0.1 (the CLI is
/// given a CA bundle with both CAs), forwarding every decrypted byte to the broker over TLS
/// (with the operator's client certificate, as a relay holding one could).
struct Relay {
    port: u16,
    ca_bundle: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(b: &Broker) -> Relay {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // The relay's CA and certificate.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let bundle = b.dir.join("ca-with-relay.pem");
        std::fs::write(
            &bundle,
            format!(
                "{}{}",
                std::fs::read_to_string(b.dir.join("ca.pem")).unwrap(),
                ca.pem()
            ),
        )
        .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        // Towards the broker: its CA, and the operator's certificate.
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(b.dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(b.dir.join("operator.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                chain,
                PrivateKeyDer::from_pem_file(b.dir.join("operator.key")).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = b.port;
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, connector) = (acceptor.clone(), connector.clone());
                tokio::spawn(async move {
                    let Ok(mut down) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                    let Ok(mut up) = connector.connect(name, tcp).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
            }
        });
        Relay {
            port,
            ca_bundle: bundle,
            task,
        }
    }
}

/// The guest agent with `broker_attested_policy`: it verifies the broker's evidence before
/// sending its own, and fetches nothing from a broker that does not satisfy the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_requires_the_broker_to_prove_itself() {
    let b = Broker::start_configured(None, |_, c| publishing(c));
    b.provision(&b.dir.join("policy.json"));
    let out_dir = tempfile::tempdir().unwrap();
    let config = |policy: &Path| {
        let cfg = out_dir.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"broker_url = "https://127.0.0.1:{port}"
broker_ca = "{ca}"
broker_attested_policy = "{policy}"
dangerous_broker_simulated_root = "{root}"
platform = "simulated"
deadline_secs = 5
secrets_dir = "{dir}"

[retry]
initial_ms = 100
max_ms = 500

[[secrets]]
name = "db-key"

[simulated]
dir = "{sim}"
"#,
                port = b.port,
                ca = b.dir.join("ca.pem").display(),
                policy = policy.display(),
                root = b.dir.join("sim/ark.pem").display(),
                dir = out_dir.path().join("credstore").display(),
                sim = b.dir.join("sim").display(),
            ),
        )
        .unwrap();
        cfg
    };
    let good = broker_policy(&b.dir, &"5a".repeat(48));
    let out = e2e::agent(&config(&good), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out_dir.path().join("credstore/db-key").exists());
    assert!(
        stderr(&out).contains("the broker proved itself"),
        "{}",
        stderr(&out)
    );

    std::fs::remove_dir_all(out_dir.path().join("credstore")).unwrap();
    let other = broker_policy(&b.dir, &"a5".repeat(48));
    let out = e2e::agent(&config(&other), &[]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("is not trusted") && e.contains("measurement"),
        "{e}"
    );
    assert!(!out_dir.path().join("credstore/db-key").exists());
    // It sent nothing past the evidence request: no challenge.
    let before = requests(&b, "/v1/challenge").await;
    assert!(before > 0, "the good run asked for a challenge");
    let _ = e2e::agent(&config(&other), &[]);
    assert_eq!(requests(&b, "/v1/challenge").await, before);
    assert!(requests(&b, "/v1/broker/evidence").await >= 3);
}

/// How many requests the broker counted on routes containing `route` (its /metrics).
async fn requests(b: &Broker, route: &str) -> u64 {
    let text = b
        .guest_client(None)
        .get(b.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("broker_http_requests_total{") && l.contains(route))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
