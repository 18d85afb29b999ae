//! `broker init --dir`: the production layout, checked with OpenSSL and by serving from it with
//! the production build (no `simulator` feature), and the production build's refusal of every
//! simulator setting, beside the development build that accepts them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::{
    arg as p, binary, free_port, ok, openssl, openssl_ec_req, production_binary, softhsm::SoftHsm,
    stderr,
};

fn broker(args: &[&str]) -> Output {
    Command::new(production_binary("broker").unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// A `broker serve` of the production build, killed on drop.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(config: &Path, port: u16, env: &[(&str, &Path)]) -> Server {
        let log = config.with_file_name("serve.log");
        let mut child = Command::new(production_binary("broker").unwrap())
            .args(["serve", "--config", p(config)])
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "broker did not start ({exited:?}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, log }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// What every production layout shares: keys 0600, AMD's roots only, an operator certificate
/// that OpenSSL chains to the operator CA with the operator URI SAN.
fn check_layout(dir: &Path) {
    for key in ["server.key", "operator.key", "operator-ca.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    let config = std::fs::read_to_string(dir.join("broker.toml")).unwrap();
    assert!(!config.contains("dangerous"), "{config}");
    assert!(!dir.join("sim").exists());
    ok(&openssl(&[
        "verify",
        "-CAfile",
        p(&dir.join("operator-ca.pem")),
        "-purpose",
        "sslclient",
        p(&dir.join("operator.pem")),
    ]));
    let text = ok(&openssl(&[
        "x509",
        "-in",
        p(&dir.join("operator.pem")),
        "-noout",
        "-ext",
        "subjectAltName,extendedKeyUsage",
    ]));
    assert!(
        text.contains("URI:urn:snp-key-broker:operator:alice") && text.contains("Client"),
        "{text}"
    );
}

/// The operator CLI of the production build reaches the admin API with what init wrote.
fn admin_round_trip(dir: &Path, env: &[(&str, &Path)]) {
    let admin = dir.join("admin.toml");
    let run = |args: &[&str]| {
        ok(&Command::new(production_binary("broker").unwrap())
            .args(args)
            .args(["--config", p(&admin)])
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .output()
            .unwrap())
    };
    run(&["secret", "generate", "db-key", "--bytes", "32"]);
    let list = run(&["secret", "list"]);
    assert!(list.contains("db-key"), "{list}");
}

#[test]
fn a_csr_signed_by_the_operators_openssl_ca_serves_the_admin_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let out = broker(&[
        "init",
        "--dir",
        p(&dir),
        "--server-name",
        "127.0.0.1",
        "--server-name",
        "broker.internal",
        "--listen",
        &listen,
        "--master-key",
        "file",
        "--operator",
        "alice",
    ]);
    let printed = ok(&out);
    assert!(printed.contains("server.csr"), "{printed}");
    check_layout(&dir);
    assert_eq!(mode(&dir.join("master.key")), 0o600);
    assert!(!dir.join("server.pem").exists() && !dir.join("ca.key").exists());

    // The request proves possession and names what was asked.
    let csr = p(&dir.join("server.csr")).to_string();
    let text = ok(&openssl(&[
        "req", "-in", &csr, "-verify", "-noout", "-text",
    ]));
    assert!(
        text.contains("IP Address:127.0.0.1") && text.contains("DNS:broker.internal"),
        "{text}"
    );

    // The operator's own CA, made and used by OpenSSL.
    let ca_key = tmp.path().join("their-ca.key");
    openssl_ec_req(
        "P-256",
        &ca_key,
        &dir.join("ca.pem"),
        "/CN=Their CA",
        &["-x509", "-days", "2"],
    );
    ok(&openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        p(&dir.join("ca.pem")),
        "-CAkey",
        p(&ca_key),
        "-copy_extensions",
        "copy",
        "-days",
        "1",
        "-out",
        p(&dir.join("server.pem")),
    ]));
    let _server = Server::start(&dir.join("broker.toml"), port, &[]);
    admin_round_trip(&dir, &[]);
    // Guests reach it over the certificate OpenSSL issued.
    let out = Command::new("curl")
        .args(["-sS", "--cacert", p(&dir.join("ca.pem"))])
        .arg(format!("https://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    ok(&out);
}

#[test]
fn an_own_server_ca_chains_for_openssl_and_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    let port = free_port();
    ok(&broker(&[
        "init",
        "--dir",
        p(&dir),
        "--server-name",
        "127.0.0.1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--server-cert",
        "own-ca",
        "--master-key",
        "file",
        "--operator",
        "alice",
    ]));
    check_layout(&dir);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    ok(&openssl(&[
        "verify",
        "-CAfile",
        p(&dir.join("ca.pem")),
        "-purpose",
        "sslserver",
        "-verify_ip",
        "127.0.0.1",
        p(&dir.join("server.pem")),
    ]));
    // The server certificate is no operator credential: OpenSSL refuses it as a client
    // certificate of the operator CA.
    let out = openssl(&[
        "verify",
        "-CAfile",
        p(&dir.join("operator-ca.pem")),
        p(&dir.join("server.pem")),
    ]);
    assert!(!out.status.success());
    let _server = Server::start(&dir.join("broker.toml"), port, &[]);
    admin_round_trip(&dir, &[]);
}

#[test]
fn a_pkcs11_layout_serves_once_its_wrapping_key_exists() {
    let hsm = SoftHsm::new("broker", "1234-init");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    let port = free_port();
    let printed = ok(&broker(&[
        "init",
        "--dir",
        p(&dir),
        "--server-name",
        "127.0.0.1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--server-cert",
        "own-ca",
        "--master-key",
        "pkcs11",
        "--pkcs11-module",
        e2e::softhsm::MODULE,
        "--pkcs11-token",
        "broker",
        "--pkcs11-pin-file",
        p(&hsm.pin_file),
        "--operator",
        "alice",
    ]));
    assert!(printed.contains("keys create-kek"), "{printed}");
    assert!(!dir.join("master.key").exists());
    let env = [("SOFTHSM2_CONF", hsm.conf.as_path())];
    let config = dir.join("broker.toml");
    // Before the wrapping key exists the broker refuses to start, naming it.
    let out = Command::new(production_binary("broker").unwrap())
        .args(["serve", "--config", p(&config)])
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("broker-kek"), "{}", stderr(&out));
    ok(&Command::new(production_binary("broker").unwrap())
        .args(["keys", "create-kek", "--config", p(&config)])
        .envs(env)
        .output()
        .unwrap());
    let server = Server::start(&config, port, &env);
    admin_round_trip(&dir, &env);
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("1234-init"), "the PIN is never logged");
}

#[test]
fn an_snp_sealed_layout_needs_the_broker_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    ok(&broker(&[
        "init",
        "--dir",
        p(&dir),
        "--server-name",
        "127.0.0.1",
        "--server-cert",
        "own-ca",
        "--master-key",
        "snp-sealed",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]));
    let config = std::fs::read_to_string(dir.join("broker.toml")).unwrap();
    assert!(
        config.contains("snp_sealed = [\"measurement\", \"policy\"]")
            && config.contains("publish_evidence = true"),
        "{config}"
    );
    // Not in a SEV-SNP VM here: the broker says so and does not start.
    let out = broker(&["serve", "--config", p(&dir.join("broker.toml"))]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/dev/sev-guest"), "{}", stderr(&out));
}

#[test]
fn bad_requests_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broker");
    let d = p(&dir).to_string();
    let base = ["init", "--dir", &d, "--server-name", "broker.internal"];
    let cases: [(&[&str], &str); 7] = [
        (
            &["--master-key", "file", "--server-name", "exa mple"],
            "exa mple",
        ),
        (
            &["--master-key", "file", "--server-name", "*.example"],
            "*.example",
        ),
        (&[], "--master-key"),
        (
            &[
                "--master-key",
                "pkcs11",
                "--pkcs11-module",
                "/x.so",
                "--pkcs11-token",
                "t",
            ],
            "--pkcs11-pin-file",
        ),
        (
            &["--master-key", "file", "--pkcs11-token", "t"],
            "need --master-key pkcs11",
        ),
        (
            &[
                "--master-key",
                "file",
                "--postgres",
                "postgres://kb:hunter2@127.0.0.1/kb",
            ],
            "password",
        ),
        (
            &[
                "--master-key",
                "file",
                "--postgres",
                "postgres://kb@db.example/kb",
            ],
            "verify-full",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = broker(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!dir.exists(), "{args:?} wrote {}", dir.display());
    }
    // A directory that is not empty is never written into.
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("broker.db"), b"keep").unwrap();
    let mut args = base.to_vec();
    args.extend_from_slice(&["--master-key", "file"]);
    let out = broker(&args);
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

/// The production build refuses each simulator setting, naming it; the development build
/// (the twin) accepts the same.
#[test]
fn the_production_build_cannot_trust_a_simulated_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    ok(&Command::new(binary("broker").unwrap())
        .args(["init", "--dev", p(&dev)])
        .output()
        .unwrap());
    let refused = |out: Output, setting: &str| {
        assert!(!out.status.success(), "{setting}");
        let e = stderr(&out);
        assert!(
            e.contains(setting) && e.contains("without the `simulator` feature"),
            "{setting}: {e}"
        );
    };

    // init --dev.
    refused(
        broker(&["init", "--dev", p(&tmp.path().join("dev2"))]),
        "init --dev",
    );
    assert!(!tmp.path().join("dev2").exists());

    // The broker's configuration: the dev setup trusts a simulated root.
    refused(
        broker(&["serve", "--config", p(&dev.join("broker.toml"))]),
        "attestation.dangerous_trust_simulated_root",
    );
    let config = std::fs::read_to_string(dev.join("broker.toml")).unwrap();
    let platform = dev.join("platform.toml");
    std::fs::write(
        &platform,
        config.replace(
            "dangerous_trust_simulated_root = \"sim/ark.pem\"",
            "\n[platform]\ndangerous_simulated = \"sim\"",
        ),
    )
    .unwrap();
    refused(
        broker(&["serve", "--config", p(&platform)]),
        "platform.dangerous_simulated",
    );

    // Offline verification of simulated evidence.
    let report = tmp.path().join("report.bin");
    let vek = tmp.path().join("vcek.pem");
    let amd =
        guest_agent::evidence::load_simulated_amd(&dev.join("sim"), attestation::Product::Genoa)
            .unwrap();
    let guest = e2e::Guest::new(&amd, |_| {});
    std::fs::write(&report, guest.sign([7; 64])).unwrap();
    let (vcek, ask) = guest.certificates();
    std::fs::write(
        &vek,
        attestation::certs::to_pem(vcek) + &attestation::certs::to_pem(ask),
    )
    .unwrap();
    let verify_args = |ark: &Path| {
        vec![
            "verify".to_string(),
            "--report".into(),
            p(&report).into(),
            "--vek".into(),
            p(&vek).into(),
            "--dangerous-trust-simulated-root".into(),
            p(ark).into(),
        ]
    };
    let ark = dev.join("sim/ark.pem");
    refused(
        Command::new(production_binary("broker").unwrap())
            .args(verify_args(&ark))
            .output()
            .unwrap(),
        "--dangerous-trust-simulated-root",
    );
    // The twin: the development build verifies the same evidence.
    ok(&Command::new(binary("broker").unwrap())
        .args(verify_args(&ark))
        .output()
        .unwrap());

    // The guest agent: the simulated platform, and a simulated root for the broker's own
    // evidence.
    let agent_config = |extra: &str| {
        let path = tmp.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "broker_url = \"https://127.0.0.1:1\"\nbroker_ca = \"{}\"\nsecrets_dir = \"{}\"\n{extra}\n[[secrets]]\nname = \"db-key\"\n",
                p(&dev.join("ca.pem")),
                p(&tmp.path().join("credstore")),
            ),
        )
        .unwrap();
        path
    };
    let sim = format!(
        "platform = \"simulated\"\n[simulated]\ndir = \"{}\"",
        p(&dev.join("sim"))
    );
    let attested = format!(
        "broker_attested_policy = \"{}\"\ndangerous_broker_simulated_root = \"{}\"\nplatform = \"sev-guest\"",
        p(&dev.join("policy.json")),
        p(&ark)
    );
    for (extra, setting) in [
        (sim.as_str(), "platform = \"simulated\""),
        (attested.as_str(), "dangerous_broker_simulated_root"),
    ] {
        let config = agent_config(extra);
        let run = |bin: PathBuf| {
            Command::new(bin)
                .args(["--config", p(&config), "config-check"])
                .output()
                .unwrap()
        };
        refused(run(production_binary("guest-agent").unwrap()), setting);
        ok(&run(binary("guest-agent").unwrap()));
    }
}
