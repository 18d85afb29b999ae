//! The `broker` command: server and operator CLI in one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use broker::policy_cmd;
use broker::store::Store;
use broker::verify_cmd::{self, VerifyRequest};

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "Key broker for AMD SEV-SNP confidential VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify SEV-SNP evidence offline against AMD's pinned roots and print its claims.
    ///
    /// Exit status: 0 verified, 1 refused (one line naming the failed check), 2 unusable input.
    Verify {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// Print the claims as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release policies: set, get, history, schema, explanation of a decision, drafting.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Compute a guest's expected SEV-SNP launch measurement from its firmware, kernel and
    /// platform, before it ever boots (docs/measurement.md).
    Measure {
        /// The OVMF firmware image the guest boots (read for its SEV metadata).
        #[arg(long)]
        ovmf: PathBuf,
        /// The firmware pages' launch digest, when already known (96 hex digits).
        #[arg(long)]
        ovmf_hash: Option<String>,
        /// Direct-boot kernel (needs firmware with a kernel-hashes section).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd of the direct-boot kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        append: Option<String>,
        /// Number of vCPUs.
        #[arg(long, required_unless_present = "find")]
        vcpus: Option<u32>,
        /// vCPU model (EPYC-Milan, EPYC-Genoa-v1, EPYC-Turin, …) or CPUID signature (0x…).
        #[arg(long, required_unless_present = "find")]
        vcpu_type: Option<String>,
        /// Instead of computing one measurement, find which vCPU counts (1 to --max-vcpus),
        /// CPU families and common guest features give this one (a refused report's) with
        /// these firmware and kernel inputs. Exit status 1 if none does.
        #[arg(long = "match", id = "find", value_name = "MEASUREMENT")]
        find: Option<String>,
        /// The largest vCPU count --match tries.
        #[arg(long, default_value_t = 64)]
        max_vcpus: u32,
        /// The VMM: qemu, ec2 or gce (docs/measurement.md).
        #[arg(long, default_value = "qemu")]
        vmm_type: String,
        /// The guest's SEV features (VMSA SEV_FEATURES), hex or decimal.
        #[arg(long, default_value = "0x1", value_parser = parse_u64)]
        guest_features: u64,
        /// Print JSON: the measurement and every input's digest.
        #[arg(long)]
        json: bool,
    },
    /// Run the broker service.
    Serve {
        /// The broker configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a broker's files into a new directory and print the next steps: a production
    /// layout (--dir: server key and CSR or own CA, operator CA and certificate, master-key
    /// provider, configuration trusting AMD's roots only) or a development setup (--dev:
    /// everything on one machine with a SIMULATED AMD root and a sample policy).
    Init(InitArgs),
    /// Secrets (admin API over mutual TLS).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The master key's provider: create a PKCS#11 token's wrapping key, move a key file's
    /// master key under it, show how the store's key is held (docs/operations.md).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Attestation tokens (EAR JWTs from the KBS front end): verify one offline, rotate the
    /// signing key.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The private CA for measured workloads (admin API; docs/pki.md): make it (self-signed,
    /// or a request for your offline root), install its certificate, show it, rotate its key.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates the private CA issued (admin API; docs/pki.md).
    #[command(subcommand)]
    Cert(CertCommand),
    /// The audit log (admin API over mutual TLS): list records, or `audit prune`.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this action (attest, secret.put, policy.set, admin.denied, …).
        #[arg(long)]
        action: Option<String>,
        /// Only this outcome (released, refused, ok).
        #[arg(long)]
        outcome: Option<String>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// At most this many records (default 100, at most 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Only records older than this id (the `next_before_id` of the previous page).
        #[arg(long)]
        before_id: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the wrapping key in the PKCS#11 token that `[master_key]` names (AES-256,
    /// sensitive, never extractable). The token must exist (e.g. `softhsm2-util --init-token`).
    CreateKek {
        /// The broker configuration (its `[master_key]` names the module, token, key, PIN).
        #[arg(long)]
        config: PathBuf,
    },
    /// Move the store's master key from a key file under the PKCS#11 token's key that
    /// `[master_key]` names. The key stays the same (no record is re-encrypted); afterwards
    /// the store opens only through the token, and the key file can be destroyed.
    Wrap {
        /// The broker configuration, already naming the pkcs11 provider.
        #[arg(long)]
        config: PathBuf,
        /// The key file the store was opened with until now.
        #[arg(long)]
        from_file: PathBuf,
    },
    /// Rotate the data key online: make a new version (wrapped by the master key), re-encrypt
    /// every sealed record under it in small transactions while brokers keep serving, then
    /// retire the older versions. Interrupted (even by SIGKILL), run it again: it resumes.
    Rotate {
        /// The broker configuration (its `[store]` and `[master_key]`).
        #[arg(long)]
        config: PathBuf,
        /// Records re-encrypted per transaction.
        #[arg(long, default_value_t = broker::keyring::DEFAULT_BATCH, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
        /// Move to a new master key first: the configuration the store was opened with until
        /// now (its `[master_key]`: a key file, or a token). `--config`'s `[master_key]` names
        /// the new one (a new token key makes a new random master key). Only re-wraps the data
        /// keys; restart every replica with `--config`, then run `keys rotate` again to
        /// re-encrypt every record under a new data key.
        #[arg(long)]
        from_config: Option<PathBuf>,
    },
    /// Show which provider holds the store's master key.
    Status {
        /// The broker configuration.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Args)]
struct NewCaArgs {
    /// The CA's common name.
    #[arg(long, default_value = "snp-key-broker workload CA")]
    subject: String,
    /// Self-signed validity in days.
    #[arg(long, default_value_t = 3650, conflicts_with = "csr")]
    days: u32,
    /// Instead of a self-signed root: write a certificate signing request here for your
    /// offline root, then `broker ca import` what it issues.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
}

impl NewCaArgs {
    fn request(&self) -> serde_json::Value {
        match &self.csr {
            Some(_) => serde_json::json!({ "mode": "csr", "subject": self.subject }),
            None => serde_json::json!({
                "mode": "self-signed", "subject": self.subject, "days": self.days
            }),
        }
    }
}

#[derive(Subcommand)]
enum CertCommand {
    /// Revoke a certificate: its OCSP status becomes revoked and its CA's CRL lists it.
    Revoke {
        /// The serial (hex, as `openssl x509 -serial` prints it).
        serial: String,
        /// unspecified, keyCompromise, affiliationChanged, superseded, cessationOfOperation
        /// or privilegeWithdrawn.
        #[arg(long, default_value = "unspecified")]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The certificates issued, newest first: serial, profile, names, validity, the claims
    /// digest they were issued on, revocation.
    List {
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make the CA: an ECDSA P-256 key made and kept (sealed) in the broker, and a
    /// self-signed certificate or a request (--csr) for your offline root.
    Init {
        #[command(flatten)]
        new: NewCaArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Install the certificate your root issued for the pending request: FILE holds it, then
    /// the certificates above it, the root last (PEM).
    Import {
        /// The certificate chain (PEM).
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every CA version: state, certificate or request, expiry.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A new issuing key (self-signed or --csr). Older versions stay published: what they
    /// issued verifies until it expires.
    Rotate {
        #[command(flatten)]
        new: NewCaArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Verify a token offline against the broker's published key set and print its claims.
    ///
    /// Exit status: 0 valid, 1 refused (one line saying why), 2 unusable input.
    Verify {
        /// The token (a compact JWT), or `-` to read it from standard input.
        token: String,
        /// The key set: a file holding the JSON of `GET /.well-known/jwks.json`.
        #[arg(long)]
        jwks: PathBuf,
        /// Check expiry at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Make a new version of the token signing key (admin API). Tokens signed by older
    /// versions stay verifiable until they expire.
    RotateKey {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Delete records older than a time; the deletion is itself recorded (who, the cut-off,
    /// how many). Retention can also be automatic: `[audit] retention_days` in broker.toml.
    Prune {
        /// Delete records before this time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long)]
        before: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// Admin configuration (url, ca, cert, key); default: $BROKER_ADMIN_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Before sending anything, verify the broker's own SEV-SNP evidence (bound to the TLS
    /// key of this connection) against this policy's `broker` grant; refuse otherwise, and
    /// accept no other server key afterwards (docs/operations.md).
    #[arg(long, value_name = "POLICY.json")]
    require_attested_broker: Option<PathBuf>,
    /// Trust this simulated AMD root for the broker's evidence (tests and demos ONLY).
    #[arg(long, value_name = "ARK.pem", requires = "require_attested_broker")]
    dangerous_broker_simulated_root: Option<PathBuf>,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<broker::client::AdminClient> {
        let path = broker::client::AdminClient::locate(self.config.as_deref())?;
        let client = broker::client::AdminClient::from_config(&path)?;
        Ok(match &self.require_attested_broker {
            Some(policy) => client.require_attested_broker(broker::attested::BrokerPolicy::load(
                policy,
                self.dangerous_broker_simulated_root.as_deref(),
            )?),
            None => client,
        })
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("layout").required(true).args(["dir", "dev"])))]
struct InitArgs {
    /// A production setup in this directory (docs/operations.md, "Production set-up").
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// A development setup in this directory, with a SIMULATED AMD root (builds with the
    /// `simulator` feature only).
    #[arg(long, value_name = "DIR")]
    dev: Option<PathBuf>,
    /// Address to listen on [--dir: 0.0.0.0:8443; --dev: 127.0.0.1:8443].
    #[arg(long)]
    listen: Option<String>,
    /// A DNS name or IP address of the broker, as guests and operators reach it; repeat for
    /// several. The first is the operator CLI's URL.
    #[arg(long = "server-name", value_name = "NAME", requires = "dir")]
    server_names: Vec<String>,
    /// The server certificate: a CSR for your CA (csr) or a server CA of the broker's own
    /// (own-ca).
    #[arg(long, value_enum, default_value_t = ServerCertArg::Csr, requires = "dir")]
    server_cert: ServerCertArg,
    /// Where the master key lives (docs/operations.md, "The master key").
    #[arg(long, value_enum, requires = "dir")]
    master_key: Option<MasterKeyArg>,
    /// pkcs11: the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long, value_name = "SO")]
    pkcs11_module: Option<PathBuf>,
    /// pkcs11: the token's label.
    #[arg(long, value_name = "LABEL")]
    pkcs11_token: Option<String>,
    /// pkcs11: the wrapping key's label.
    #[arg(long, value_name = "LABEL", default_value = "broker-kek")]
    pkcs11_key: String,
    /// pkcs11: a file (mode 0600) holding the token's PIN.
    #[arg(long, value_name = "FILE", conflicts_with = "pkcs11_pin_credential")]
    pkcs11_pin_file: Option<PathBuf>,
    /// pkcs11: the name of the broker unit's systemd credential holding the PIN.
    #[arg(long, value_name = "NAME")]
    pkcs11_pin_credential: Option<String>,
    /// The SQLite store [default: broker.db in the directory].
    #[arg(long, value_name = "PATH", conflicts_with = "postgres")]
    sqlite: Option<PathBuf>,
    /// A PostgreSQL store shared by replicas: postgres://… without a password.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// The PostgreSQL password, read from this file.
    #[arg(long, value_name = "FILE", requires = "postgres")]
    postgres_password_file: Option<PathBuf>,
    /// The CA of the PostgreSQL server's certificate.
    #[arg(long, value_name = "FILE", requires = "postgres")]
    postgres_ca_file: Option<PathBuf>,
    /// The first operator's name (its certificate's URI SAN
    /// urn:snp-key-broker:operator:<NAME>).
    #[arg(long, value_name = "NAME", default_value = "admin")]
    operator: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ServerCertArg {
    /// A certificate signing request for your CA.
    Csr,
    /// A server CA of the broker's own.
    OwnCa,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MasterKeyArg {
    /// A key file beside the configuration.
    File,
    /// Wrapped by a non-extractable key in a PKCS#11 token (HSM).
    Pkcs11,
    /// Sealed to the broker's own SEV-SNP VM.
    SnpSealed,
}

impl InitArgs {
    fn production_options(&self) -> anyhow::Result<broker::init::ProductionOptions> {
        use broker::init::{PinSource, Provider, ServerCertificate, StoreChoice};
        let provider = match self.master_key {
            None => anyhow::bail!(
                "--master-key: choose file, pkcs11 or snp-sealed (docs/operations.md, \"The master key\")"
            ),
            Some(MasterKeyArg::File) => Provider::File,
            Some(MasterKeyArg::SnpSealed) => Provider::SnpSealed,
            Some(MasterKeyArg::Pkcs11) => {
                let (Some(module), Some(token)) = (&self.pkcs11_module, &self.pkcs11_token) else {
                    anyhow::bail!("--master-key pkcs11 needs --pkcs11-module and --pkcs11-token");
                };
                let pin = match (&self.pkcs11_pin_file, &self.pkcs11_pin_credential) {
                    (Some(file), None) => PinSource::File(std::path::absolute(file)?),
                    (None, Some(name)) => PinSource::Credential(name.clone()),
                    _ => anyhow::bail!(
                        "--master-key pkcs11 needs --pkcs11-pin-file or --pkcs11-pin-credential (never the PIN itself)"
                    ),
                };
                Provider::Pkcs11 {
                    module: module.clone(),
                    token: token.clone(),
                    key: self.pkcs11_key.clone(),
                    pin,
                }
            }
        };
        if !matches!(self.master_key, Some(MasterKeyArg::Pkcs11))
            && (self.pkcs11_module.is_some()
                || self.pkcs11_token.is_some()
                || self.pkcs11_pin_file.is_some()
                || self.pkcs11_pin_credential.is_some())
        {
            anyhow::bail!("--pkcs11-* options need --master-key pkcs11");
        }
        let absolute = |p: &Option<PathBuf>| p.as_deref().map(std::path::absolute).transpose();
        let store = match &self.postgres {
            Some(url) => StoreChoice::Postgres {
                url: url.clone(),
                password_file: absolute(&self.postgres_password_file)?,
                ca_file: absolute(&self.postgres_ca_file)?,
            },
            None => StoreChoice::Sqlite(match &self.sqlite {
                Some(p) => std::path::absolute(p)?,
                None => PathBuf::from("broker.db"),
            }),
        };
        Ok(broker::init::ProductionOptions {
            listen: self
                .listen
                .clone()
                .unwrap_or_else(|| "0.0.0.0:8443".to_string()),
            server_names: self.server_names.clone(),
            server_certificate: match self.server_cert {
                ServerCertArg::Csr => ServerCertificate::Csr,
                ServerCertArg::OwnCa => ServerCertificate::OwnCa,
            },
            operator: self.operator.clone(),
            provider,
            store,
            now: SystemTime::now(),
        })
    }
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Upload a new version of a secret from a file.
    Put {
        /// Secret name.
        name: String,
        /// The value (a PEM key and certificate chain for tls-key).
        #[arg(long)]
        file: PathBuf,
        /// tls-key or opaque.
        #[arg(long)]
        kind: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Generate a data key (random bytes, never shown to operators).
    Generate {
        /// Secret name.
        name: String,
        /// Length in bytes (16 to 1024, default 32).
        #[arg(long)]
        bytes: Option<usize>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Rotate a data key: a new random version.
    Rotate {
        /// Secret name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete every version of a secret.
    Delete {
        /// Secret name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List secrets (metadata only).
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set the active policy from a file (checked before it is stored; versions are kept).
    Set {
        /// The policy (JSON).
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the active policy.
    Get {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List every policy version.
    History {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the JSON Schema of release policies.
    Schema,
    /// Verify evidence and explain, condition by condition, what the policy decides.
    ///
    /// Exit status: 0 every secret checked would be released, 1 refused, 2 unusable input.
    Check {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// The policy file to evaluate (default: the broker's active policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        admin: AdminArgs,
        /// Secret to decide on (repeatable; default: every secret the policy names).
        #[arg(long)]
        secret: Vec<String>,
        /// Print the decisions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draft a strict policy from verified evidence: its measurement, debugging and migration
    /// agent off, its VMPL, and its reported TCB as the floor.
    Suggest {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// Secret the drafted rule may receive (repeatable).
        #[arg(long)]
        secret: Vec<String>,
        /// A certificate profile the drafted rule grants, as PROFILE=dns:NAME,uri:URI,ip:ADDR
        /// (repeatable; docs/pki.md).
        #[arg(long, value_name = "PROFILE=NAMES")]
        certificate: Vec<String>,
    },
    /// Draft a policy from a measurement computed with `broker measure`, before any guest
    /// boots (docs/measurement.md).
    SuggestMeasured {
        /// The expected launch measurement (96 hex digits).
        #[arg(long)]
        measurement: String,
        /// The EPYC generation of the hosts: Milan, Genoa or Turin.
        #[arg(long)]
        product: String,
        /// The lowest platform TCB to accept: bootloader=N,tee=N,snp=N,microcode=N (and fmc=N
        /// on Turin), e.g. from AMD's security bulletins.
        #[arg(long)]
        min_tcb: String,
        /// The VMPL the guest requests its reports at (0 without an SVSM).
        #[arg(long, default_value_t = 0)]
        vmpl: u32,
        /// Secret the drafted rule may receive (repeatable).
        #[arg(long)]
        secret: Vec<String>,
        /// A certificate profile the drafted rule grants, as PROFILE=dns:NAME,uri:URI,ip:ADDR
        /// (repeatable; docs/pki.md).
        #[arg(long, value_name = "PROFILE=NAMES")]
        certificate: Vec<String>,
    },
}

#[derive(Args)]
struct EvidenceArgs {
    /// Raw 1184-byte attestation report, or an Azure vTPM HCL report (detected).
    #[arg(long)]
    report: PathBuf,
    /// VCEK or VLEK certificate, DER or PEM (a PEM bundle: VCEK first, then its chain).
    #[arg(long)]
    vek: Option<PathBuf>,
    /// AMD KDS cert_chain PEM: ASK or ASVK, then ARK (optional: AMD's are built in).
    #[arg(long)]
    chain: Option<PathBuf>,
    /// CRL signed by the ARK, DER or PEM (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// With an HCL report: the vTPM quote (JSON, as `guest-agent report` writes it), verified
    /// against the report's attestation key; its PCRs become claims.
    #[arg(long)]
    quote: Option<PathBuf>,
    /// DANGEROUS: also trust this simulated ARK (from `broker init --dev`'s `sim/ark.pem`),
    /// to inspect simulated evidence. Never for real guests.
    #[arg(long, value_name = "ARK_PEM")]
    dangerous_trust_simulated_root: Option<PathBuf>,
    /// Verification time, RFC 3339 (default: now).
    #[arg(long)]
    at: Option<String>,
}

impl EvidenceArgs {
    fn request(self) -> anyhow::Result<VerifyRequest> {
        let at = match &self.at {
            Some(s) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| anyhow::anyhow!("--at {s:?} is not an RFC 3339 time: {e}"))?;
                SystemTime::from(t)
            }
            None => SystemTime::now(),
        };
        Ok(VerifyRequest {
            report: self.report,
            vek: self.vek,
            chain: self.chain,
            crls: self.crl,
            quote: self.quote,
            dangerous_simulated_root: self.dangerous_trust_simulated_root,
            at,
        })
    }
}

/// What a command ended with: success, a refusal (exit 1), or unusable input (exit 2).
enum Outcome {
    Done,
    Refused,
}

/// Prints a refusal: one line on stderr, and with `--json` an object on stdout.
#[allow(clippy::print_stdout)]
fn refused(e: &attestation::Error, json: bool) -> Outcome {
    if json {
        let refusal = serde_json::json!({
            "verified": false,
            "check": e.check(),
            "reason": e.to_string(),
        });
        println!("{refusal}");
    }
    eprintln!("refused: {e}");
    Outcome::Refused
}

#[allow(clippy::print_stdout)]
fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time_arg(s: &str) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("{s:?} is not an RFC 3339 time: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

async fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Serve { config } => serve(config).await,
        Command::Init(args) => init(args),
        Command::Ca(cmd) => ca(cmd).await,
        Command::Cert(CertCommand::Revoke {
            serial,
            reason,
            admin,
        }) => {
            print_json(&admin.client()?.revoke_certificate(&serial, &reason).await?)?;
            Ok(Outcome::Done)
        }
        Command::Cert(CertCommand::List { limit, admin }) => {
            print_json(&admin.client()?.issued_certificates(limit).await?)?;
            Ok(Outcome::Done)
        }
        Command::Secret(cmd) => secret(cmd).await,
        Command::Policy(cmd) => policy(cmd).await,
        Command::Audit {
            command: Some(AuditCommand::Prune { before, admin }),
            ..
        } => audit_prune(before, admin).await,
        Command::Audit {
            command: None,
            admin,
            action,
            outcome,
            since,
            limit,
            before_id,
            json,
        } => {
            audit_list(
                admin,
                audit_query(action, outcome, since, limit, before_id)?,
                json,
            )
            .await
        }
        Command::Keys(cmd) => keys(cmd).await,
        Command::Token(cmd) => token(cmd).await,
        Command::Verify { evidence, json } => verify(evidence, json),
        Command::Measure {
            ovmf,
            ovmf_hash,
            kernel,
            initrd,
            append,
            vcpus,
            vcpu_type,
            find,
            max_vcpus,
            vmm_type,
            guest_features,
            json,
        } => {
            let inputs = broker::measure::MeasureInputs {
                ovmf,
                ovmf_hash,
                kernel,
                initrd,
                append,
                vcpus: vcpus.unwrap_or(1),
                vcpu_type: vcpu_type.unwrap_or_else(|| "EPYC".into()),
                vmm: vmm_type,
                guest_features,
            };
            measure(inputs, find, max_vcpus, json)
        }
    }
}

/// `broker serve`.
async fn serve(config: PathBuf) -> anyhow::Result<Outcome> {
    let settings = broker::config::Settings::load(&config)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
    broker::server::run(listener, settings, shutdown_signal()).await?;
    Ok(Outcome::Done)
}

/// `broker init`.
#[allow(clippy::print_stdout)]
fn init(args: InitArgs) -> anyhow::Result<Outcome> {
    let Some(dev) = args.dev else {
        let dir = args
            .dir
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--dir or --dev"))?;
        let setup = broker::init::production(&dir, &args.production_options()?)?;
        println!(
            "Wrote a production setup to {} (AMD's roots only).",
            setup.dir.display()
        );
        println!();
        println!("Next:");
        for (i, step) in setup.next_steps.iter().enumerate() {
            println!("  {}. {step}", i + 1);
        }
        return Ok(Outcome::Done);
    };
    init_dev(dev, args.listen.unwrap_or_else(|| "127.0.0.1:8443".into()))
}

/// `broker init --dev`.
#[cfg(not(feature = "simulator"))]
fn init_dev(_dev: PathBuf, _listen: String) -> anyhow::Result<Outcome> {
    Err(broker::Error::NoSimulator {
        setting: "init --dev",
    }
    .into())
}

/// `broker init --dev`.
#[cfg(feature = "simulator")]
#[allow(clippy::print_stdout)]
fn init_dev(dev: PathBuf, listen: String) -> anyhow::Result<Outcome> {
    let setup = broker::init::dev(&dev, &listen)?;
    let d = setup.dir.display();
    println!(
        "Wrote a development setup to {d} (it trusts a SIMULATED AMD root: never use it in production)."
    );
    println!();
    println!("Next:");
    println!("  broker serve --config {d}/broker.toml &");
    println!("  export BROKER_ADMIN_CONFIG={d}/admin.toml");
    println!("  broker secret put web-tls --file {d}/web-tls.pem --kind tls-key");
    println!("  broker secret generate db-key --bytes 32");
    println!("  broker policy set {d}/policy.json");
    println!("  broker secret list");
    println!("  broker audit");
    Ok(Outcome::Done)
}

/// `broker secret …` (admin API).
#[allow(clippy::print_stdout)]
async fn secret(cmd: SecretCommand) -> anyhow::Result<Outcome> {
    let v = match cmd {
        SecretCommand::Put {
            name,
            file,
            kind,
            admin,
        } => {
            let value = zeroize::Zeroizing::new(
                std::fs::read(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
            );
            admin.client()?.put_secret(&name, &kind, &value).await?
        }
        SecretCommand::Generate { name, bytes, admin } => {
            admin.client()?.generate_secret(&name, bytes).await?
        }
        SecretCommand::Rotate { name, admin } => admin.client()?.rotate_secret(&name).await?,
        SecretCommand::Delete { name, admin } => {
            admin.client()?.delete_secret(&name).await?;
            println!("deleted {name}");
            return Ok(Outcome::Done);
        }
        SecretCommand::List { admin, json } => {
            let v = admin.client()?.list_secrets().await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{:<24} {:>7}  {:<9} {:<25} created by",
                    "NAME", "VERSION", "KIND", "CREATED"
                );
                for s in v["secrets"].as_array().into_iter().flatten() {
                    let at = s["created_at"]
                        .as_u64()
                        .map(|t| attestation::error::rfc3339(&t))
                        .unwrap_or_default();
                    println!(
                        "{:<24} {:>7}  {:<9} {:<25} {}",
                        s["name"].as_str().unwrap_or(""),
                        s["version"],
                        s["kind"].as_str().unwrap_or(""),
                        at,
                        s["created_by"].as_str().unwrap_or("")
                    );
                }
            }
            return Ok(Outcome::Done);
        }
    };
    println!(
        "{} version {}",
        v["name"].as_str().unwrap_or(""),
        v["version"]
    );
    Ok(Outcome::Done)
}

/// `broker policy …`: the admin API's set/get/history, and the offline schema, check and
/// drafts.
#[allow(clippy::print_stdout)]
async fn policy(cmd: PolicyCommand) -> anyhow::Result<Outcome> {
    match cmd {
        PolicyCommand::Set { file, admin } => {
            // Checked locally first, for an error that names the file and the JSON path.
            policy_cmd::load(&file)?;
            let doc = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let v = admin.client()?.set_policy(doc).await?;
            println!("policy version {}", v["version"]);
            let revoked = v["revoked"].as_array().cloned().unwrap_or_default();
            if !revoked.is_empty() {
                println!(
                    "revoked {} certificate(s) it no longer grants (privilegeWithdrawn): {}",
                    revoked.len(),
                    revoked
                        .iter()
                        .filter_map(serde_json::Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(Outcome::Done)
        }
        PolicyCommand::Get { admin } => {
            let v = admin.client()?.get_policy().await?;
            let doc: serde_json::Value =
                serde_json::from_str(v["document"].as_str().unwrap_or("null")).unwrap_or_default();
            eprintln!(
                "policy version {} set by {}",
                v["version"],
                v["created_by"].as_str().unwrap_or("")
            );
            print_json(&doc)?;
            Ok(Outcome::Done)
        }
        PolicyCommand::History { admin } => {
            let v = admin.client()?.policy_history().await?;
            for p in v["versions"].as_array().into_iter().flatten() {
                let at = p["created_at"]
                    .as_u64()
                    .map(|t| attestation::error::rfc3339(&t))
                    .unwrap_or_default();
                println!(
                    "{:>4}  {}  {}",
                    p["version"],
                    at,
                    p["created_by"].as_str().unwrap_or("")
                );
            }
            Ok(Outcome::Done)
        }
        PolicyCommand::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&attestation::policy::json_schema())?
            );
            Ok(Outcome::Done)
        }
        PolicyCommand::Check {
            evidence,
            policy,
            admin,
            secret,
            json,
        } => {
            let policy = match policy {
                Some(path) => policy_cmd::load(&path)?,
                None => {
                    let active = admin.client()?.get_policy().await?;
                    let doc = active["document"].as_str().unwrap_or_default();
                    attestation::policy::Policy::from_json(doc)
                        .map_err(|e| anyhow::anyhow!("active policy: {e}"))?
                }
            };
            match policy_cmd::check(&evidence.request()?, &policy, &secret) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", policy_cmd::render(&report));
                    }
                    let all = report.decisions.iter().all(|d| d.released);
                    Ok(if all { Outcome::Done } else { Outcome::Refused })
                }
                Err(broker::Error::Refused(e)) => Ok(refused(&e, json)),
                Err(e) => Err(e.into()),
            }
        }
        PolicyCommand::SuggestMeasured {
            measurement,
            product,
            min_tcb,
            vmpl,
            secret,
            certificate,
        } => {
            let mut draft =
                policy_cmd::suggest_measured(&measurement, &product, &min_tcb, vmpl, &secret)?;
            policy_cmd::add_certificate_profiles(&mut draft, "measured", &certificate)?;
            println!("{}", serde_json::to_string_pretty(&draft)?);
            Ok(Outcome::Done)
        }
        PolicyCommand::Suggest {
            evidence,
            secret,
            certificate,
        } => match policy_cmd::suggest(&evidence.request()?, &secret) {
            Ok(mut draft) => {
                policy_cmd::add_certificate_profiles(&mut draft, "suggested", &certificate)?;
                println!("{}", serde_json::to_string_pretty(&draft)?);
                if secret.is_empty() {
                    eprintln!(
                        "note: the draft maps no secrets; add them under \"secrets\" or pass --secret NAME"
                    );
                }
                Ok(Outcome::Done)
            }
            Err(broker::Error::Refused(e)) => Ok(refused(&e, false)),
            Err(e) => Err(e.into()),
        },
    }
}

/// `broker audit prune`.
#[allow(clippy::print_stdout)]
async fn audit_prune(before: String, admin: AdminArgs) -> anyhow::Result<Outcome> {
    let before = time_arg(&before)?.unix_timestamp();
    let v = admin.client()?.prune_audit(before).await?;
    println!(
        "deleted {} audit records before {}",
        v["deleted"],
        attestation::error::rfc3339(&u64::try_from(before).unwrap_or(0))
    );
    Ok(Outcome::Done)
}

/// The query string of `broker audit`.
fn audit_query(
    action: Option<String>,
    outcome: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
    before_id: Option<i64>,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut q = Vec::new();
    if let Some(a) = action {
        q.push(("action", a));
    }
    if let Some(o) = outcome {
        q.push(("outcome", o));
    }
    if let Some(s) = since {
        q.push(("since", time_arg(&s)?.unix_timestamp().to_string()));
    }
    if let Some(l) = limit {
        q.push(("limit", l.to_string()));
    }
    if let Some(b) = before_id {
        q.push(("before_id", b.to_string()));
    }
    Ok(q)
}

/// `broker audit` (list).
#[allow(clippy::print_stdout)]
async fn audit_list(
    admin: AdminArgs,
    q: Vec<(&'static str, String)>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let v = admin.client()?.audit(&q).await?;
    if json {
        print_json(&v)?;
    } else {
        for r in v["records"].as_array().into_iter().flatten() {
            let at = r["at"]
                .as_u64()
                .map(|t| attestation::error::rfc3339(&t))
                .unwrap_or_default();
            println!(
                "{:>6}  {}  {:<14} {:<9} {}  {}",
                r["id"],
                at,
                r["action"].as_str().unwrap_or(""),
                r["outcome"].as_str().unwrap_or(""),
                r["actor"].as_str().unwrap_or(""),
                r["detail"]
            );
        }
    }
    Ok(Outcome::Done)
}

/// `broker keys …`: the master key's provider.
async fn keys(cmd: KeysCommand) -> anyhow::Result<Outcome> {
    let config = match &cmd {
        KeysCommand::CreateKek { config }
        | KeysCommand::Wrap { config, .. }
        | KeysCommand::Rotate { config, .. }
        | KeysCommand::Status { config } => config.clone(),
    };
    let settings = broker::config::Settings::load(&config)?;
    let pkcs11 = match &settings.master_key {
        broker::config::MasterKeySource::Pkcs11(p) => Some(p.clone()),
        _ => None,
    };
    let needs_pkcs11 = || {
        pkcs11.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: [master_key] does not name a pkcs11 provider (pkcs11_module, pkcs11_token, pkcs11_key, pkcs11_pin_file)",
                    config.display()
                )
            })
    };
    match cmd {
        KeysCommand::CreateKek { .. } => {
            broker::keys::create_token_key(&needs_pkcs11()?).await?;
            eprintln!("created the wrapping key in the token");
        }
        KeysCommand::Wrap { from_file, .. } => {
            let to = needs_pkcs11()?;
            let store = broker::store::AnyStore::open(&settings.store).await?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            broker::keys::wrap_master_key(
                &broker::config::MasterKeySource::File(from_file.clone()),
                &to,
                &store,
                &format!(
                    "operator (local: broker keys wrap --from-file {})",
                    from_file.display()
                ),
                now,
            )
            .await?;
            eprintln!(
                "the master key is now held wrapped by the token's key {:?}; {} is no longer needed: destroy it (and its backups) once every replica runs with the pkcs11 configuration",
                to.key,
                from_file.display()
            );
        }
        KeysCommand::Rotate {
            from_config: Some(from),
            ..
        } => {
            let store = broker::store::AnyStore::open(&settings.store).await?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let old_settings = broker::config::Settings::load(&from)?;
            let old = broker::keys::open_master_key(&old_settings.master_key, &store, now).await?;
            let moved = broker::keyring::move_master_key(
                &store,
                old,
                &settings.master_key,
                &format!(
                    "operator (local: broker keys rotate --from-config {})",
                    from.display()
                ),
                now,
            )
            .await?;
            print_json(&serde_json::to_value(&moved)?)?;
            eprintln!(
                "the store's master key is now held by the {} provider and wraps every data key; \
                 restart every replica with {}, then run `broker keys rotate --config {}` to \
                 re-encrypt every record under a new data key (until then, the old master key \
                 still opens records sealed under the versions it wrapped)",
                moved.to,
                config.display(),
                config.display()
            );
        }
        KeysCommand::Rotate { batch, .. } => {
            let store = broker::store::AnyStore::open(&settings.store).await?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let master = broker::keys::open_master_key(&settings.master_key, &store, now).await?;
            let mut last_shown: Option<std::time::Instant> = None;
            let rotation = broker::keyring::rotate(
                &store,
                master,
                "operator (local: broker keys rotate)",
                now,
                batch,
                |done, total| {
                    // Progress on standard error: after the first batch, then about twice a
                    // second.
                    if last_shown
                        .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(500))
                    {
                        last_shown = Some(std::time::Instant::now());
                        eprintln!("re-encrypted {done} of {total} records");
                    }
                },
            )
            .await?;
            print_json(&serde_json::to_value(&rotation)?)?;
        }
        KeysCommand::Status { .. } => {
            let store = broker::store::AnyStore::open(&settings.store).await?;
            let recorded = store.master_key().await?;
            print_json(&serde_json::json!({
                "configured": settings.master_key.provider(),
                "recorded": recorded.as_ref().map(|r| r.provider.clone()),
                "recorded_at": recorded.as_ref().map(|r| r.created_at),
                "sealed_records": store.sealed_records().await?,
                "data_keys": store.data_keys().await?.iter().map(|k| serde_json::json!({
                    "version": k.version,
                    "created_at": k.created_at,
                    "retired_at": k.retired_at,
                })).collect::<Vec<_>>(),
                "records_under_older_keys": !store
                    .records_under_old_keys(
                        store.data_keys().await?.last().map_or(1, |k| k.version),
                        1,
                    )
                    .await?
                    .is_empty(),
            }))?;
        }
    }
    Ok(Outcome::Done)
}

/// `broker token …`.
/// `broker ca …` (admin API).
#[allow(clippy::print_stdout)]
async fn ca(cmd: CaCommand) -> anyhow::Result<Outcome> {
    let (new, admin, rotate) = match cmd {
        CaCommand::Show { admin } => {
            print_json(&admin.client()?.ca_show().await?)?;
            return Ok(Outcome::Done);
        }
        CaCommand::Import { file, admin } => {
            let pem = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            print_json(&admin.client()?.ca_import(pem).await?)?;
            return Ok(Outcome::Done);
        }
        CaCommand::Init { new, admin } => (new, admin, false),
        CaCommand::Rotate { new, admin } => (new, admin, true),
    };
    // A request file is never overwritten.
    if let Some(path) = new.csr.as_ref().filter(|p| p.exists()) {
        anyhow::bail!("{} exists; choose another --csr file", path.display());
    }
    let made = admin.client()?.ca_create(new.request(), rotate).await?;
    if let Some(path) = &new.csr {
        let csr = made
            .get("csr")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| anyhow::anyhow!("the broker answered without a request"))?;
        std::fs::write(path, csr)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        println!(
            "Wrote the CA's certificate request to {}: have your root sign it (CA:TRUE, keyCertSign), then broker ca import CHAIN.pem",
            path.display()
        );
    }
    print_json(&made)?;
    Ok(Outcome::Done)
}

async fn token(cmd: TokenCommand) -> anyhow::Result<Outcome> {
    match cmd {
        TokenCommand::RotateKey { admin } => {
            print_json(&admin.client()?.rotate_token_key().await?)?;
            Ok(Outcome::Done)
        }
        TokenCommand::Verify { token, jwks, at } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s.trim().to_string()
            } else {
                token
            };
            let text = std::fs::read_to_string(&jwks)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", jwks.display()))?;
            let set: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", jwks.display()))?;
            let keys = broker::kbs::token::jwks_keys(&set)
                .map_err(|e| anyhow::anyhow!("{}: {e}", jwks.display()))?;
            let now = match at {
                Some(t) => u64::try_from(time_arg(&t)?.unix_timestamp()).unwrap_or(0),
                None => SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            match broker::kbs::token::verify_with(&token, &keys, now) {
                Ok(claims) => {
                    print_json(&claims)?;
                    Ok(Outcome::Done)
                }
                Err(e) => {
                    eprintln!("refused: {e}");
                    Ok(Outcome::Refused)
                }
            }
        }
    }
}

/// `broker verify`.
#[allow(clippy::print_stdout)]
fn verify(evidence: EvidenceArgs, json: bool) -> anyhow::Result<Outcome> {
    match verify_cmd::run(&evidence.request()?) {
        Ok(claims) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&claims.to_json())?);
            } else {
                print!("{}", verify_cmd::summary(&claims));
            }
            Ok(Outcome::Done)
        }
        Err(broker::Error::Refused(e)) => Ok(refused(&e, json)),
        Err(e) => Err(e.into()),
    }
}

/// `broker measure`.
#[allow(clippy::print_stdout)]
fn measure(
    inputs: broker::measure::MeasureInputs,
    find: Option<String>,
    max_vcpus: u32,
    json: bool,
) -> anyhow::Result<Outcome> {
    if let Some(target) = find {
        let found = broker::measure::find_platform(&inputs, &target, max_vcpus)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&found)?);
        } else if found.is_empty() {
            println!(
                "no match: no vCPU count from 1 to {max_vcpus}, CPU family or common guest \
                     features gives this measurement with this firmware and kernel; the \
                     firmware, kernel, initrd or command line differ (or the VMM)"
            );
        }
        for m in &found {
            if !json {
                println!(
                    "match: {} vCPUs, {} (signature {}), guest features {}",
                    m.vcpus,
                    m.vcpu_types.join(" / "),
                    m.vcpu_signature,
                    m.guest_features
                );
            }
        }
        return Ok(if found.is_empty() {
            Outcome::Refused
        } else {
            Outcome::Done
        });
    }
    let m = broker::measure::measure(&inputs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("{}", m.measurement);
    }
    Ok(Outcome::Done)
}

/// A number in hex (`0x…`) or decimal.
fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli.command).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
