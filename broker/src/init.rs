//! `broker init`: the files a broker needs, written into a new directory.
//!
//! - `broker init --dir DIR` ([`production`]): a production layout. A server key and either a
//!   certificate signing request for the operator's CA or a server CA of its own, an operator
//!   CA and a first operator certificate, the master-key provider's settings (`file`,
//!   `pkcs11` or `snp-sealed`), a configuration that trusts AMD's roots only, and the
//!   operator CLI's `admin.toml`.
//! - `broker init --dev DIR` ([`dev`], feature `simulator`): a complete local setup for
//!   trying the broker on one machine, with a simulated AMD hierarchy (trusted through a
//!   `dangerous_` setting) and a sample policy.
//!
//! Private keys are written 0600 and never overwritten.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[cfg(feature = "simulator")]
use attestation::Product;
#[cfg(feature = "simulator")]
use attestation::sim::{ReportFields, SimulatedAmd};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;
use crate::keys::{MasterKey, write_private_file};

/// What `init --dev` wrote.
#[derive(Debug)]
pub struct DevSetup {
    /// The directory.
    pub dir: PathBuf,
    /// `broker.toml`.
    pub config: PathBuf,
    /// `admin.toml`.
    pub admin_config: PathBuf,
    /// The sample policy.
    pub policy: PathBuf,
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn rc(e: rcgen::Error) -> Error {
    Error::Crypto(format!("certificate generation: {e}"))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "snp-key-broker dev");
    d.push(DnType::CommonName, cn);
    d
}

/// A self-signed CA (its key is not kept: a development setup issues everything at once).
#[cfg(feature = "simulator")]
fn ca(cn: &str) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>), Error> {
    let key = KeyPair::generate().map_err(rc)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok((cert, Issuer::new(params, key)))
}

/// Certificate parameters of an operator certificate for `name`: the clientAuth extended
/// key usage and the URI SAN `urn:snp-key-broker:operator:<name>`, which together make a
/// certificate from the operator CA an admin credential.
pub fn operator_params(name: &str) -> Result<CertificateParams, Error> {
    if !crate::server::tls::valid_operator_name(name) {
        return Err(Error::Input(format!(
            "{name:?} is not a valid operator name"
        )));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let uri = format!("{}{name}", crate::server::tls::OPERATOR_SAN_PREFIX);
    params.subject_alt_names =
        vec![SanType::URI(uri.try_into().map_err(|e| {
            Error::Input(format!("operator URI SAN: {e}"))
        })?)];
    Ok(params)
}

/// Refuses a directory that exists and is not empty: init never overwrites.
fn check_fresh(dir: &Path) -> Result<(), Error> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|source| Error::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .next()
            .is_some()
    {
        return Err(Error::Input(format!(
            "{} is not empty; init writes into a new or empty directory",
            dir.display()
        )));
    }
    Ok(())
}

fn mkdir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p).map_err(|source| Error::Write {
        path: p.to_path_buf(),
        source,
    })
}

/// Writes a development setup into `dir` (created; must be empty if it exists), listening on
/// `listen`.
#[cfg(feature = "simulator")]
pub fn dev(dir: &Path, listen: &str) -> Result<DevSetup, Error> {
    check_fresh(dir)?;
    mkdir(dir)?;
    mkdir(&dir.join("sim"))?;
    let url_host = if listen.starts_with('[') || !listen.contains(':') {
        listen.to_string()
    } else {
        listen.replacen("0.0.0.0", "127.0.0.1", 1)
    };

    // Three CAs (ECDSA P-256), so that no certificate can stand in for another's role: the
    // server CA (guests and operators pin it), the operator CA (admin API client
    // certificates) and a workload CA (certificates of the TLS keys the broker releases).
    let (ca_cert, issuer) = ca("snp-key-broker dev CA")?;
    let (operator_ca_cert, operator_issuer) = ca("snp-key-broker dev operator CA")?;
    let (workload_ca_cert, workload_issuer) = ca("snp-key-broker dev workload CA")?;

    let server_key = KeyPair::generate().map_err(rc)?;
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).map_err(rc)?;
    server.subject_alt_names.push(SanType::IpAddress(
        "127.0.0.1".parse().map_err(|_| Error::Input("ip".into()))?,
    ));
    server.subject_alt_names.push(SanType::IpAddress(
        "::1".parse().map_err(|_| Error::Input("ip".into()))?,
    ));
    server.distinguished_name = dn("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).map_err(rc)?;

    let op_key = KeyPair::generate().map_err(rc)?;
    let op = operator_params("operator")?;
    let op_cert = op.signed_by(&op_key, &operator_issuer).map_err(rc)?;

    write(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
    write(
        &dir.join("operator-ca.pem"),
        operator_ca_cert.pem().as_bytes(),
    )?;
    write(
        &dir.join("workload-ca.pem"),
        workload_ca_cert.pem().as_bytes(),
    )?;
    // A sample TLS key secret for the quick start: a key and certificate for a workload.
    let web_key = KeyPair::generate().map_err(rc)?;
    let mut web = CertificateParams::new(vec!["web.internal".to_string()]).map_err(rc)?;
    web.distinguished_name = dn("web.internal");
    web.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let web_cert = web.signed_by(&web_key, &workload_issuer).map_err(rc)?;
    write_private_file(
        &dir.join("web-tls.pem"),
        format!("{}{}", web_key.serialize_pem(), web_cert.pem()).as_bytes(),
    )?;
    write(&dir.join("server.pem"), server_cert.pem().as_bytes())?;
    write_private_file(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
    )?;
    write(&dir.join("operator.pem"), op_cert.pem().as_bytes())?;
    write_private_file(&dir.join("operator.key"), op_key.serialize_pem().as_bytes())?;
    write_private_file(
        &dir.join("master.key"),
        MasterKey::generate()?.to_hex().as_bytes(),
    )?;

    // A simulated AMD hierarchy, for simulated guests.
    let product = Product::Genoa;
    let sim = SimulatedAmd::generate(product, SystemTime::now())?;
    write(
        &dir.join("sim/ark.pem"),
        attestation::sim::to_pem(sim.ark_der()).as_bytes(),
    )?;
    write(
        &dir.join("sim/ask.pem"),
        attestation::sim::to_pem(sim.ask_der()).as_bytes(),
    )?;
    write(
        &dir.join("sim/asvk.pem"),
        attestation::sim::to_pem(sim.asvk_der()).as_bytes(),
    )?;
    let [ark_k, ask_k, asvk_k] = sim.private_keys_pkcs8()?;
    for (name, key) in [("ark", ark_k), ("ask", ask_k), ("asvk", asvk_k)] {
        let pem = der::pem::encode_string("PRIVATE KEY", der::pem::LineEnding::LF, &key)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        write_private_file(&dir.join(format!("sim/{name}.key")), pem.as_bytes())?;
    }

    let config = format!(
        r#"# Development broker: trusts a SIMULATED AMD root. Never use this configuration in production.
listen = "{listen}"

[tls]
cert = "server.pem"
key = "server.key"
operator_ca = "operator-ca.pem"

[store]
sqlite = "broker.db"

[master_key]
file = "master.key"

[attestation]
nonce_ttl_secs = 60
dangerous_trust_simulated_root = "sim/ark.pem"

# Confidential Containers KBS clients (/kbs/v0, docs/kbs.md).
[kbs]
enabled = true

# Where relying parties reach the private CA's OCSP responder and CRLs (docs/pki.md).
[pki]
base_url = "https://{url_host}"
"#
    );
    let config_path = dir.join("broker.toml");
    write(&config_path, config.as_bytes())?;

    let admin = format!(
        r#"# Operator CLI configuration (broker secret|policy|audit --config FILE, or BROKER_ADMIN_CONFIG).
url = "https://{url_host}"
ca = "ca.pem"
cert = "operator.pem"
key = "operator.key"
"#
    );
    let admin_path = dir.join("admin.toml");
    write(&admin_path, admin.as_bytes())?;

    let measurement = hex::encode(ReportFields::new(product).measurement);
    let policy = serde_json::json!({
        "description": "Development policy: simulated guests with the default simulated measurement.",
        "rules": {
            "simulated-guest": { "allOf": [
                { "claim": "root", "equals": "simulated" },
                { "claim": "measurement", "equals": measurement },
                { "claim": "policy.debug_allowed", "equals": false },
                { "claim": "policy.migrate_ma_allowed", "equals": false },
                { "claim": "vmpl", "equals": 0 },
                { "claim": "tcb.reported.snp", "greaterOrEquals": 23 }
            ] }
        },
        "secrets": {
            "web-tls": ["simulated-guest"],
            "db-key": ["simulated-guest"]
        }
    });
    let policy_path = dir.join("policy.json");
    write(
        &policy_path,
        serde_json::to_string_pretty(&policy)
            .map_err(|e| Error::Input(e.to_string()))?
            .as_bytes(),
    )?;
    Ok(DevSetup {
        dir: dir.to_path_buf(),
        config: config_path,
        admin_config: admin_path,
        policy: policy_path,
    })
}

/// How a production broker gets its server certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCertificate {
    /// A certificate signing request (`server.csr`) for the operator's own CA, which issues
    /// `server.pem`; its certificate is installed as `ca.pem`.
    Csr,
    /// A server CA of the broker's own (`ca.pem`, its key `ca.key` to be moved offline) that
    /// issues `server.pem` at once.
    OwnCa,
}

/// Where a `pkcs11` provider's PIN comes from (never the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file (mode 0600).
    File(PathBuf),
    /// A systemd credential of the broker's unit (`LoadCredential=`).
    Credential(String),
}

/// The master-key provider of a production setup (docs/operations.md, "The master key").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    /// A random key in `master.key` (0600) beside the configuration.
    File,
    /// A non-extractable AES key in a PKCS#11 token wraps the master key.
    Pkcs11 {
        /// The PKCS#11 module (`.so`).
        module: PathBuf,
        /// The token's label.
        token: String,
        /// The wrapping key's label (`broker keys create-kek` makes it).
        key: String,
        /// The PIN.
        pin: PinSource,
    },
    /// Sealed to the broker's own SEV-SNP VM (its measurement and policy).
    SnpSealed,
}

/// The store of a production setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// An SQLite file (relative paths are taken from the setup directory).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by replicas.
    Postgres {
        /// `postgres://…` without a password.
        url: String,
        /// The password, read from this file.
        password_file: Option<PathBuf>,
        /// The CA of the database server's certificate.
        ca_file: Option<PathBuf>,
    },
}

/// What `broker init --dir` is asked for.
#[derive(Clone, Debug)]
pub struct ProductionOptions {
    /// The address the broker listens on.
    pub listen: String,
    /// The broker's DNS names and IP addresses (the server certificate's names; the first is
    /// the operator CLI's URL).
    pub server_names: Vec<String>,
    /// CSR or own CA.
    pub server_certificate: ServerCertificate,
    /// The first operator's name (`urn:snp-key-broker:operator:<name>`).
    pub operator: String,
    /// The master-key provider.
    pub provider: Provider,
    /// The store.
    pub store: StoreChoice,
    /// Start of the certificates' validity.
    pub now: SystemTime,
}

/// What `broker init --dir` wrote, and what the operator does next.
#[derive(Debug)]
pub struct ProductionSetup {
    /// The directory.
    pub dir: PathBuf,
    /// `broker.toml`.
    pub config: PathBuf,
    /// `admin.toml`.
    pub admin_config: PathBuf,
    /// The next steps, in order, as lines for the operator.
    pub next_steps: Vec<String>,
}

/// Validity of the CAs init makes (10 years), the server certificate its own CA issues (397
/// days, the public-CA ceiling) and the first operator certificate (1 year).
const CA_DAYS: u64 = 3650;
const SERVER_DAYS: u64 = 397;
const OPERATOR_DAYS: u64 = 365;

/// A name for the server certificate: an IP address or a DNS name.
fn server_san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = rustls_pki_types::DnsName::try_from(name).is_ok() && !name.ends_with('.');
    if !valid || name.contains('*') {
        return Err(Error::Input(format!(
            "--server-name {name:?}: not a DNS name or an IP address"
        )));
    }
    Ok(SanType::DnsName(name.try_into().map_err(|e| {
        Error::Input(format!("--server-name {name:?}: {e}"))
    })?))
}

/// Sets a certificate's validity from `now` for `days`, and a random 16-byte serial.
fn validity(params: &mut CertificateParams, now: SystemTime, days: u64) -> Result<(), Error> {
    // Five minutes back, for clocks slightly behind the broker's.
    let from = now - Duration::from_secs(300);
    params.not_before = time::OffsetDateTime::from(from);
    params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(days * 86_400));
    params.serial_number = Some(crate::pki::random_serial()?);
    Ok(())
}

fn production_dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "snp-key-broker");
    d.push(DnType::CommonName, cn);
    d
}

/// A CA certificate, its issuer and its key in PEM (written 0600 beside it, to be moved
/// offline).
type OwnCa = (
    rcgen::Certificate,
    Issuer<'static, KeyPair>,
    zeroize::Zeroizing<String>,
);

fn production_ca(cn: &str, now: SystemTime) -> Result<OwnCa, Error> {
    let key = KeyPair::generate().map_err(rc)?;
    let pem = zeroize::Zeroizing::new(key.serialize_pem());
    let mut params = CertificateParams::default();
    params.distinguished_name = production_dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, now, CA_DAYS)?;
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok((cert, Issuer::new(params, key), pem))
}

fn toml_string(s: &str) -> String {
    // A TOML basic string through the TOML serializer: quotes and escapes done right.
    toml::Value::String(s.to_string()).to_string()
}

fn toml_path(p: &Path) -> Result<String, Error> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Input(format!("{}: not UTF-8", p.display())))?;
    Ok(toml_string(s))
}

/// The `[master_key]` section and the `[platform]` one for `provider`.
fn provider_config(provider: &Provider) -> Result<String, Error> {
    Ok(match provider {
        Provider::File => "[master_key]\n\
             # A random key in a 0600 file. Anyone who reads this host's disk or its backups\n\
             # reads every secret: prefer pkcs11 or snp-sealed (docs/operations.md).\n\
             file = \"master.key\"\n"
            .to_string(),
        Provider::Pkcs11 {
            module,
            token,
            key,
            pin,
        } => {
            let pin_line = match pin {
                PinSource::File(path) => format!("pkcs11_pin_file = {}", toml_path(path)?),
                PinSource::Credential(name) => {
                    format!("pkcs11_pin_credential = {}", toml_string(name))
                }
            };
            format!(
                "[master_key]\n\
                 # The master key is stored only wrapped by a non-extractable AES key in this\n\
                 # token (make it once: broker keys create-kek --config broker.toml).\n\
                 pkcs11_module = {}\n\
                 pkcs11_token = {}\n\
                 pkcs11_key = {}\n\
                 {pin_line}\n",
                toml_path(module)?,
                toml_string(token),
                toml_string(key),
            )
        }
        Provider::SnpSealed => "[master_key]\n\
             # Sealed to this broker VM's measurement and policy, on its chip. Before an image\n\
             # upgrade, move the key (broker keys rotate --from-config): docs/operations.md.\n\
             snp_sealed = [\"measurement\", \"policy\"]\n\
             \n\
             [platform]\n\
             # Serve this VM's own SNP report, bound to the TLS key, at /v1/broker/evidence\n\
             # (the CLI's --require-attested-broker and the agent's broker_attested_policy).\n\
             publish_evidence = true\n"
            .to_string(),
    })
}

fn store_config(store: &StoreChoice) -> Result<String, Error> {
    Ok(match store {
        StoreChoice::Sqlite(path) => format!("[store]\nsqlite = {}\n", toml_path(path)?),
        StoreChoice::Postgres {
            url,
            password_file,
            ca_file,
        } => {
            let parsed =
                url::Url::parse(url).map_err(|e| Error::Input(format!("--postgres: {e}")))?;
            if parsed.password().is_some() {
                return Err(Error::Input(
                    "--postgres: the URL carries a password; put it in a 0600 file and pass --postgres-password-file"
                        .into(),
                ));
            }
            let mut s = format!("[store]\npostgres = {}\n", toml_string(url));
            if let Some(p) = password_file {
                s.push_str(&format!("password_file = {}\n", toml_path(p)?));
            }
            if let Some(p) = ca_file {
                s.push_str(&format!("ca_file = {}\n", toml_path(p)?));
            }
            s
        }
    })
}

/// The URL the operator CLI uses: the first server name and the listening port.
fn admin_url(options: &ProductionOptions) -> Result<String, Error> {
    let listen: std::net::SocketAddr = options.listen.parse().map_err(|_| {
        Error::Input(format!(
            "--listen {:?}: not an address:port",
            options.listen
        ))
    })?;
    let name = options
        .server_names
        .first()
        .ok_or_else(|| Error::Input("--server-name: at least one".into()))?;
    let host = match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => name.clone(),
    };
    Ok(format!("https://{host}:{}", listen.port()))
}

/// Writes a production setup into `dir` (created; must be empty if it exists). The
/// configuration is checked by the same parser `broker serve` uses before anything is written.
pub fn production(dir: &Path, options: &ProductionOptions) -> Result<ProductionSetup, Error> {
    check_fresh(dir)?;
    if options.server_names.is_empty() {
        return Err(Error::Input(
            "--server-name: at least one DNS name or IP address of the broker".into(),
        ));
    }
    let sans = options
        .server_names
        .iter()
        .map(|n| server_san(n))
        .collect::<Result<Vec<_>, _>>()?;
    let operator = operator_params(&options.operator)?;
    let url = admin_url(options)?;

    let config = format!(
        "# Broker configuration written by `broker init --dir` (docs/operations.md).\n\
         # It trusts AMD's roots only.\n\
         listen = {listen}\n\
         \n\
         [tls]\n\
         cert = \"server.pem\"\n\
         key = \"server.key\"\n\
         # Issues the operator certificates of the admin API (never the server or workload CA).\n\
         operator_ca = \"operator-ca.pem\"\n\
         # operator_names = [{operator}]   # only these operators\n\
         \n\
         {store}\n\
         {provider}\n\
         [attestation]\n\
         nonce_ttl_secs = 60\n\
         \n\
         # Confidential Containers KBS clients (/kbs/v0, docs/kbs.md).\n\
         # [kbs]\n\
         # enabled = true\n\
         \n\
         # Where relying parties reach the private CA's OCSP responder and CRLs (docs/pki.md).\n\
         [pki]\n\
         base_url = {pki_url}\n",
        listen = toml_string(&options.listen),
        pki_url = toml_string(&url),
        operator = toml_string(&options.operator),
        store = store_config(&options.store)?,
        provider = provider_config(&options.provider)?,
    );
    // The same checks as `broker serve` (without touching the files it names).
    crate::config::Settings::parse(&config, dir)
        .map_err(|e| Error::Config(format!("the configuration init would write: {e}")))?;

    mkdir(dir)?;
    let mut next_steps = Vec::new();
    let d = dir.display();

    // The server key and its certificate (own CA) or request (operator's CA).
    let server_key = KeyPair::generate().map_err(rc)?;
    let mut server = CertificateParams::default();
    server.distinguished_name = production_dn(&options.server_names[0]);
    server.subject_alt_names = sans;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    write_private_file(
        &dir.join("server.key"),
        zeroize::Zeroizing::new(server_key.serialize_pem()).as_bytes(),
    )?;
    match options.server_certificate {
        ServerCertificate::Csr => {
            let csr = server
                .serialize_request(&server_key)
                .map_err(rc)?
                .pem()
                .map_err(rc)?;
            write(&dir.join("server.csr"), csr.as_bytes())?;
            next_steps.push(format!(
                "Have your CA sign {d}/server.csr (serverAuth; names {}); install the certificate as {d}/server.pem (with any intermediates after it) and the CA's certificate as {d}/ca.pem.",
                options.server_names.join(", ")
            ));
        }
        ServerCertificate::OwnCa => {
            let (ca_cert, issuer, ca_key) = production_ca("snp-key-broker server CA", options.now)?;
            validity(&mut server, options.now, SERVER_DAYS)?;
            let cert = server.signed_by(&server_key, &issuer).map_err(rc)?;
            write(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
            write_private_file(&dir.join("ca.key"), ca_key.as_bytes())?;
            write(&dir.join("server.pem"), cert.pem().as_bytes())?;
            next_steps.push(format!(
                "Move {d}/ca.key off this host (offline storage): it issues the server certificate, which expires in {SERVER_DAYS} days. Guests and the operator CLI pin {d}/ca.pem."
            ));
        }
    }

    // The operator CA and the first operator's certificate.
    let (operator_ca, operator_issuer, operator_ca_key) =
        production_ca("snp-key-broker operator CA", options.now)?;
    let op_key = KeyPair::generate().map_err(rc)?;
    let mut op = operator;
    op.distinguished_name = production_dn(&options.operator);
    validity(&mut op, options.now, OPERATOR_DAYS)?;
    let op_cert = op.signed_by(&op_key, &operator_issuer).map_err(rc)?;
    write(&dir.join("operator-ca.pem"), operator_ca.pem().as_bytes())?;
    write_private_file(&dir.join("operator-ca.key"), operator_ca_key.as_bytes())?;
    write(&dir.join("operator.pem"), op_cert.pem().as_bytes())?;
    write_private_file(
        &dir.join("operator.key"),
        zeroize::Zeroizing::new(op_key.serialize_pem()).as_bytes(),
    )?;
    next_steps.push(format!(
        "Move {d}/operator.key, operator.pem, ca.pem and admin.toml to the operator's machine, and {d}/operator-ca.key offline: it issues further operator certificates (docs/operations.md)."
    ));

    match &options.provider {
        Provider::File => {
            write_private_file(
                &dir.join("master.key"),
                MasterKey::generate()?.to_hex().as_bytes(),
            )?;
            next_steps.push(format!(
                "{d}/master.key opens every secret: keep it on an encrypted disk, out of backups of the database, or move it under an HSM later (broker keys wrap)."
            ));
        }
        Provider::Pkcs11 { .. } => next_steps.push(format!(
            "Create the wrapping key in the token once: broker keys create-kek --config {d}/broker.toml"
        )),
        Provider::SnpSealed => next_steps.push(
            "Run the broker in its SEV-SNP VM: the first start seals a new master key to the VM's measurement and policy. Before an image upgrade, move the key (docs/operations.md, snp-sealed).".into(),
        ),
    }

    let config_path = dir.join("broker.toml");
    write(&config_path, config.as_bytes())?;
    let admin = format!(
        "# Operator CLI configuration (broker secret|policy|audit --config FILE, or BROKER_ADMIN_CONFIG).\n\
         url = {}\n\
         ca = \"ca.pem\"\n\
         cert = \"operator.pem\"\n\
         key = \"operator.key\"\n",
        toml_string(&url)
    );
    let admin_path = dir.join("admin.toml");
    write(&admin_path, admin.as_bytes())?;
    next_steps.push(format!("Start it: broker serve --config {d}/broker.toml"));
    next_steps.push(
        "Write a policy from computed measurements (broker measure, broker policy suggest) and set it: broker policy set POLICY.json"
            .into(),
    );
    Ok(ProductionSetup {
        dir: dir.to_path_buf(),
        config: config_path,
        admin_config: admin_path,
        next_steps,
    })
}
