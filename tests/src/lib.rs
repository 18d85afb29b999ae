//! Helpers for the end-to-end tests: locating the workspace's built binaries and test data,
//! running a broker and the guest agent, and talking to the broker as a guest.

#![forbid(unsafe_code)]
// Test-support code: a failed set-up step should stop the test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(missing_docs)]

pub mod azure;
pub mod kbs;
pub mod postgres;
pub mod softhsm;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use attestation::protocol::{AttestRequest, CertificateEntry, EphemeralKey, Evidence, encode_b64};
use attestation::sim::{ReportFields, SimulatedAmd, SimulatedKey};
use attestation::{Product, binding};
use base64::Engine;

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

/// The standard output of a process that must have succeeded; both streams in the panic
/// otherwise.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `openssl` with `args`.
pub fn openssl(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().unwrap()
}

/// `openssl req` with a new EC key on `curve` (e.g. `P-256`) written to `key`, and a request
/// (or, with `-x509` in `extra`, a self-signed certificate) for `subject` written to `out`.
pub fn openssl_ec_req(curve: &str, key: &Path, out: &Path, subject: &str, extra: &[&str]) {
    let curve = format!("ec_paramgen_curve:{curve}");
    let mut args = vec!["req", "-newkey", "ec", "-pkeyopt", &curve, "-nodes"];
    args.extend(["-keyout", arg(key), "-out", arg(out), "-subj", subject]);
    args.extend(extra);
    ok(&openssl(&args));
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

/// A binary of the production build (no `simulator` feature), which `make build` copies to
/// `target/production/` before building the workspace with every feature.
pub fn production_binary(name: &str) -> Result<PathBuf, String> {
    let debug = binary(name)?;
    let path = debug
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("production").join(name))
        .ok_or_else(|| "no target directory".to_string())?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built: run `make build` (it builds broker and guest-agent without the simulator feature and copies them there)",
            path.display()
        ))
    }
}

/// A `broker serve` process on 127.0.0.1 with a fresh `init --dev` setup, and optionally
/// more replicas of it (same setup, other ports) on a shared PostgreSQL store.
pub struct Broker {
    /// The dev setup directory.
    pub dir: PathBuf,
    /// The port.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    replicas: Vec<(u16, Option<Child>)>,
    /// Environment of the server and CLI processes (e.g. `SOFTHSM2_CONF`).
    pub env: Vec<(String, PathBuf)>,
    _tmp: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        for i in 1..=self.replicas.len() {
            self.kill_replica(i);
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// Sets up and starts a broker on the embedded store.
    pub fn start() -> Broker {
        Broker::start_on(None)
    }

    /// Sets up and starts a broker on the PostgreSQL database at `postgres` (or SQLite).
    pub fn start_on(postgres: Option<&str>) -> Broker {
        Broker::start_configured(postgres, |_, c| c)
    }

    /// Sets up a broker, changes its `broker.toml` with `edit` (given the setup directory,
    /// to write files the new configuration names), and starts it.
    pub fn start_configured(
        postgres: Option<&str>,
        edit: impl FnOnce(&Path, String) -> String,
    ) -> Broker {
        Broker::start_with_env(postgres, Vec::new(), edit)
    }

    /// [`Broker::start_configured`] with `env` in the server's and the CLI's environment.
    pub fn start_with_env(
        postgres: Option<&str>,
        env: Vec<(String, PathBuf)>,
        edit: impl FnOnce(&Path, String) -> String,
    ) -> Broker {
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
        let config = dir.join("broker.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        if let Some(url) = postgres {
            text = text.replace("sqlite = \"broker.db\"", &format!("postgres = \"{url}\""));
        }
        std::fs::write(&config, edit(&dir, text)).unwrap();
        let log = tmp.path().join("broker.log");
        let mut b = Broker {
            dir,
            port,
            child: None,
            log,
            replicas: Vec::new(),
            env,
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

    /// Starts another replica (same setup and store, another port); returns its index (1, 2,
    /// …; the first broker is replica 0).
    pub fn add_replica(&mut self) -> usize {
        let port = free_port();
        let config = std::fs::read_to_string(self.dir.join("broker.toml"))
            .unwrap()
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!("listen = \"127.0.0.1:{port}\""),
            );
        let i = self.replicas.len() + 1;
        std::fs::write(self.dir.join(format!("broker-{i}.toml")), config).unwrap();
        self.replicas.push((port, None));
        self.serve_replica(i);
        i
    }

    /// Starts (or restarts) replica `i` (1, 2, …) and waits until it accepts connections.
    pub fn serve_replica(&mut self, i: usize) {
        self.kill_replica(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log.with_extension(format!("{i}.log")))
            .unwrap();
        let child = Command::new(binary("broker").unwrap())
            .args(["serve", "--config"])
            .arg(self.dir.join(format!("broker-{i}.toml")))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let port = self.replicas[i - 1].0;
        self.replicas[i - 1].1 = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "replica {i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills replica `i` (1, 2, …) with SIGKILL.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some((_, child)) = self.replicas.get_mut(i - 1)
            && let Some(mut c) = child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A URL on replica `i` (0 is the first broker).
    pub fn replica_url(&self, i: usize, path: &str) -> String {
        let port = if i == 0 {
            self.port
        } else {
            self.replicas[i - 1].0
        };
        format!("https://127.0.0.1:{port}{path}")
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

    /// The dev setup's policy with `certificates` (certificate profiles) added, written as
    /// `name` in the setup directory.
    pub fn policy_with_certificates(&self, name: &str, certificates: serde_json::Value) -> PathBuf {
        let text = std::fs::read_to_string(self.dir.join("policy.json")).unwrap();
        let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        doc["certificates"] = certificates;
        let path = self.dir.join(name);
        std::fs::write(&path, doc.to_string()).unwrap();
        path
    }

    /// A guest agent configuration in `dir` (`agent.toml`) for this broker on the simulated
    /// platform, files into `dir/credstore`: the common settings, then `body` (`[[secrets]]`
    /// and `[[certificate]]` tables), then `[simulated]` with `simulated` added.
    pub fn agent_config(&self, dir: &Path, body: &str, simulated: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "broker_url = \"{}\"\nbroker_ca = \"{}\"\nplatform = \"simulated\"\ndeadline_secs = 20\n\
                 secrets_dir = \"{}\"\n{body}\n[simulated]\ndir = \"{}\"\n{simulated}\n",
                self.url(""),
                arg(&self.dir.join("ca.pem")),
                arg(&dir.join("credstore")),
                arg(&self.dir.join("sim")),
            ),
        )
        .unwrap();
        path
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

    /// One guest flow at this broker (challenge, simulated evidence with the default
    /// measurement, attestation) for `secret`: the opened value, or the status that refused
    /// it (0: no answer).
    pub async fn attest_once(&self, secret: &str) -> Result<Vec<u8>, u16> {
        let client = self.guest_client(None);
        let guest = Guest::new(&self.simulated_amd(), |_| {});
        let key = EphemeralKey::generate(attestation::protocol::Kem::X25519);
        let r = client
            .post(self.url("/v1/challenge"))
            .send()
            .await
            .map_err(|_| 0u16)?;
        if !r.status().is_success() {
            return Err(r.status().as_u16());
        }
        let nonce = r
            .json::<attestation::protocol::ChallengeResponse>()
            .await
            .map_err(|_| 0u16)?
            .nonce;
        let r = client
            .post(self.url("/v1/attest"))
            .json(&guest.request(&nonce, &key, &[secret], None))
            .send()
            .await
            .map_err(|_| 0u16)?;
        if r.status() != 200 {
            return Err(r.status().as_u16());
        }
        let response: attestation::protocol::AttestResponse = r.json().await.map_err(|_| 0u16)?;
        let sealed = response.secrets.first().ok_or(0u16)?;
        key.open(sealed).map(|v| v.to_vec()).map_err(|_| 0u16)
    }

    /// Runs an operator command against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("broker").unwrap())
            .args(args)
            .env("BROKER_ADMIN_CONFIG", self.dir.join("admin.toml"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }
}

/// A simulated guest: report fields and a VCEK for its chip and TCB.
pub struct Guest {
    /// The report fields.
    pub fields: ReportFields,
    vcek: SimulatedKey,
    ask: Vec<u8>,
}

impl Guest {
    /// A guest of the simulated hierarchy `amd`, its report fields changed by `tweak`.
    pub fn new(amd: &SimulatedAmd, tweak: impl FnOnce(&mut ReportFields)) -> Guest {
        let mut fields = ReportFields::new(Product::Genoa);
        tweak(&mut fields);
        let vcek = amd
            .issue_vcek(
                &fields.chip_id,
                fields.tcb,
                SystemTime::now() - Duration::from_secs(3600),
            )
            .unwrap();
        Guest {
            fields,
            vcek,
            ask: amd.ask_der().to_vec(),
        }
    }

    /// A report with these fields and `report_data`, signed by the guest's VCEK.
    pub fn sign(&self, report_data: [u8; 64]) -> Vec<u8> {
        let mut fields = self.fields.clone();
        fields.report_data = report_data;
        self.vcek.sign_report(&fields).unwrap()
    }

    /// The guest's VCEK (to sign an HCL report with).
    pub fn vcek(&self) -> &SimulatedKey {
        &self.vcek
    }

    /// The DER of the guest's VCEK and of its ASK.
    pub fn certificates(&self) -> (&[u8], &[u8]) {
        (self.vcek.cert_der(), &self.ask)
    }

    /// Builds an attest request for `nonce`; `bind_to` overrides the key bound in REPORT_DATA.
    pub fn request(
        &self,
        nonce: &str,
        key: &EphemeralKey,
        secrets: &[&str],
        bind_to: Option<&EphemeralKey>,
    ) -> AttestRequest {
        let nonce_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(nonce)
            .unwrap();
        let bound = bind_to.unwrap_or(key).public_key().binding_bytes().unwrap();
        let mut fields = self.fields.clone();
        fields.report_data = binding::report_data(&nonce_bytes, &bound);
        let report = self.vcek.sign_report(&fields).unwrap();
        AttestRequest {
            nonce: nonce.to_string(),
            evidence: Evidence::Snp {
                report: encode_b64(&report),
                certificates: vec![
                    CertificateEntry {
                        kind: "vcek".into(),
                        der: encode_b64(self.vcek.cert_der()),
                    },
                    CertificateEntry {
                        kind: "ask".into(),
                        der: encode_b64(&self.ask),
                    },
                ],
            },
            public_key: key.public_key(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            certificates: Vec::new(),
        }
    }
}
