//! Helpers for the end-to-end tests: locating the workspace's built binaries and test data,
//! running a broker and the guest agent, and talking to the broker as a guest.

#![forbid(unsafe_code)]
// Test-support code: a failed set-up step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(missing_docs)]

pub mod azure;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attestation::sim::SimulatedAmd;

/// Runs the built `guest-agent` with `--config cfg` and `args`.
pub fn agent(cfg: &Path, args: &[&str]) -> Output {
    Command::new(binary("guest-agent").unwrap())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

/// A process's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Real evidence shipped with the attestation crate.
pub fn vectors() -> PathBuf {
    workspace().join("attestation/tests/data")
}

/// Path of a binary built from this workspace, next to the running test executable's
/// directory (`target/<profile>/`). `make test` builds every binary before the tests run;
/// run `cargo build --workspace --bins` first when calling `cargo test` directly.
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| "test executable has no profile directory".to_string())?;
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built: run `cargo build --workspace --bins` (make test does)",
            path.display()
        ))
    }
}

/// A `broker serve` process on 127.0.0.1 with a fresh `init --dev` setup.
pub struct Broker {
    /// The dev setup directory.
    pub dir: PathBuf,
    /// The port.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// Sets up and starts a broker.
    pub fn start() -> Broker {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let port = free_port();
        let out = Command::new(binary("broker").unwrap())
            .args(["init", "--dev"])
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = tmp.path().join("broker.log");
        let mut b = Broker {
            dir,
            port,
            child: None,
            log,
            _tmp: tmp,
        };
        b.serve();
        b
    }

    /// Starts (or restarts) the server process and waits until it accepts connections.
    pub fn serve(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary("broker").unwrap())
            .args(["serve", "--config"])
            .arg(self.dir.join("broker.toml"))
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server process.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A URL on this broker.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// Everything the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sets up the broker's secrets and policy as an operator would: `web-tls` (the dev TLS
    /// key), a generated 32-byte `db-key`, and the policy at `policy`.
    pub fn provision(&self, policy: &Path) {
        for args in [
            vec![
                "secret",
                "put",
                "web-tls",
                "--file",
                self.dir.join("web-tls.pem").to_str().unwrap(),
                "--kind",
                "tls-key",
            ],
            vec!["secret", "generate", "db-key", "--bytes", "32"],
            vec!["policy", "set", policy.to_str().unwrap()],
        ] {
            let out = self.cli(&args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        }
    }

    /// The simulated (Genoa) AMD hierarchy of this broker's dev setup.
    pub fn simulated_amd(&self) -> SimulatedAmd {
        guest_agent::evidence::load_simulated_amd(
            &self.dir.join("sim"),
            attestation::Product::Genoa,
        )
        .unwrap()
    }

    /// An HTTPS client that pins this broker's CA, with a client certificate if given.
    pub fn guest_client(&self, identity: Option<(&Path, &Path)>) -> reqwest::Client {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(self.dir.join("ca.pem")).unwrap();
        for c in attestation::certs::decode_pem_or_der(&ca, "ca").unwrap() {
            roots.add(c.into()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let tls = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                use rustls::pki_types::pem::PemObject;
                let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    /// Runs an operator command against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("broker").unwrap())
            .args(args)
            .env("BROKER_ADMIN_CONFIG", self.dir.join("admin.toml"))
            .output()
            .unwrap()
    }
}
