//! Real `broker` and `guest-agent` processes over TLS on 127.0.0.1 with the SQLite store: the
//! measured guest gets its secrets; unmeasured, debug and out-of-date guests get nothing and
//! the agent says why; a broker restarted while the agent retries still serves it; an agent
//! pinned to another CA refuses to talk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{Broker, agent, binary, stderr};

/// Sets up the broker's secrets and the dev policy as an operator would.
fn provision(b: &Broker) {
    b.provision(&b.dir.join("policy.json"));
}

/// Writes an agent configuration for a simulated guest; `simulated` adds report fields.
fn agent_config(b: &Broker, out: &Path, ca: &Path, simulated: &str, deadline: u64) -> PathBuf {
    let cfg = out.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"broker_url = "https://127.0.0.1:{port}"
broker_ca = "{ca}"
platform = "simulated"
deadline_secs = {deadline}
secrets_dir = "{dir}"

[retry]
initial_ms = 100
max_ms = 500

[[secrets]]
name = "web-tls"
mode = "0440"
owner = "0"
group = "0"

[[secrets]]
name = "db-key"

[simulated]
dir = "{sim}"
{simulated}
"#,
            port = b.port,
            ca = ca.display(),
            dir = out.join("credstore").display(),
            sim = b.dir.join("sim").display(),
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn measured_guest_gets_its_secrets_and_others_get_nothing() {
    let b = Broker::start();
    provision(&b);
    let tmp = tempfile::tempdir().unwrap();

    // The measured guest.
    let cfg = agent_config(&b, tmp.path(), &b.dir.join("ca.pem"), "", 30);
    let out = agent(&cfg, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = tmp.path().join("credstore");
    let tls = std::fs::read(store.join("web-tls")).unwrap();
    assert_eq!(
        tls,
        std::fs::read(b.dir.join("web-tls.pem")).unwrap(),
        "byte-exact"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store.join("web-tls")), 0o440);
    assert_eq!(mode(&store.join("db-key")), 0o400);
    assert_eq!(mode(&store), 0o700);
    let key = std::fs::read(store.join("db-key")).unwrap();
    assert_eq!(key.len(), 32);
    // A second boot gets the same data key (same version), and `check` writes nothing.
    std::fs::remove_dir_all(&store).unwrap();
    let out = agent(&cfg, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would write db-key v1 (32 bytes)"));
    assert!(!store.join("db-key").exists());
    assert!(agent(&cfg, &[]).status.success());
    assert_eq!(std::fs::read(store.join("db-key")).unwrap(), key);

    // `report` saves the raw report and its certificates, VCEK first.
    let saved = tmp.path().join("report.bin");
    let out = agent(&cfg, &["report", "--out", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&saved).unwrap().len(), 1184);
    let certs = std::fs::read(tmp.path().join("report.bin.certs.pem")).unwrap();
    let ders = attestation::certs::decode_pem_or_der(&certs, "certs").unwrap();
    assert_eq!(ders.len(), 2);

    // Guests the policy refuses: non-zero exit, the reason on stderr, nothing written.
    for (fields, reason) in [
        (
            "measurement = \"111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111\"",
            "measurement ==",
        ),
        (
            "policy = 0xB0000",
            "policy.debug_allowed == false (actual true)",
        ),
        ("snp = 22", "tcb.reported.snp >= 23 (actual 22)"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = agent_config(&b, dir.path(), &b.dir.join("ca.pem"), fields, 30);
        let started = Instant::now();
        let out = agent(&cfg, &[]);
        assert_eq!(out.status.code(), Some(1), "{fields}");
        let err = stderr(&out);
        assert!(
            err.contains("guest-agent: refused: attest: HTTP 403"),
            "{err}"
        );
        assert!(err.contains(reason), "{fields}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a refusal is final, not retried"
        );
        assert!(!dir.path().join("credstore/web-tls").exists());
    }
}

#[test]
fn agent_survives_a_broker_restart_and_refuses_another_ca() {
    let mut b = Broker::start();
    provision(&b);
    let tmp = tempfile::tempdir().unwrap();

    // Pinned to another CA: refuses to talk, at once.
    let other = tempfile::tempdir().unwrap();
    let other_setup = Command::new(binary("broker").unwrap())
        .args(["init", "--dev"])
        .arg(other.path().join("x"))
        .output()
        .unwrap();
    assert!(other_setup.status.success());
    let cfg = agent_config(&b, tmp.path(), &other.path().join("x/ca.pem"), "", 30);
    let started = Instant::now();
    let out = agent(&cfg, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not issued by the pinned broker CA"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // The broker goes down; the agent retries until it is back.
    b.stop();
    let cfg = agent_config(&b, tmp.path(), &b.dir.join("ca.pem"), "", 60);
    let child = Command::new(binary("guest-agent").unwrap())
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    b.serve();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("retrying"),
        "the agent retried: {}",
        stderr(&out)
    );
    assert!(tmp.path().join("credstore/db-key").exists());

    // With the broker gone past the deadline, the agent gives up with the last reason.
    b.stop();
    let cfg = agent_config(&b, tmp.path(), &b.dir.join("ca.pem"), "", 2);
    let out = agent(&cfg, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("deadline reached"),
        "{}",
        stderr(&out)
    );
}

/// With several brokers listed, an agent whose first pick is down (nothing listens there)
/// moves on to the next and gets its secrets, whatever order it drew.
#[test]
fn agent_fails_over_to_the_next_broker() {
    let b = Broker::start();
    provision(&b);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = agent_config(&b, tmp.path(), &b.dir.join("ca.pem"), "", 30);
    let dead = e2e::free_port();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("broker_url = \"https://127.0.0.1:{}\"", b.port),
        &format!(
            "brokers = [\"https://127.0.0.1:{dead}\", \"https://127.0.0.1:{}\"]",
            b.port
        ),
    );
    assert!(text.contains("brokers = ["));
    std::fs::write(&cfg, text).unwrap();
    for _ in 0..4 {
        let out = agent(&cfg, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::remove_dir_all(tmp.path().join("credstore")).unwrap();
    }
}
