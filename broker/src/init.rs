//! `broker init --dev DIR`: a complete local setup for trying the broker on one machine.
//!
//! It writes a CA, a localhost server certificate, an operator client certificate, a master
//! key, a simulated AMD hierarchy (trusted through a `dangerous_` setting), a configuration
//! and a sample policy. Private keys are written 0600 and never overwritten.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use attestation::Product;
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

/// Writes a development setup into `dir` (created; must be empty if it exists), listening on
/// `listen`.
pub fn dev(dir: &Path, listen: &str) -> Result<DevSetup, Error> {
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
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::Write {
            path: p.to_path_buf(),
            source,
        })
    };
    mkdir(dir)?;
    mkdir(&dir.join("sim"))?;

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
"#
    );
    let config_path = dir.join("broker.toml");
    write(&config_path, config.as_bytes())?;

    let url_host = if listen.starts_with('[') || !listen.contains(':') {
        listen.to_string()
    } else {
        listen.replacen("0.0.0.0", "127.0.0.1", 1)
    };
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
