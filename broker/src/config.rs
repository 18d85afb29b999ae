//! `broker.toml`: parsed with unknown keys rejected into a checked [`Settings`].
//!
//! Relative paths are resolved against the directory of the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    tls: RawTls,
    store: RawStore,
    master_key: RawMasterKey,
    #[serde(default)]
    attestation: RawAttestation,
    #[serde(default)]
    kds: RawKds,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    kbs: RawKbs,
    #[serde(default)]
    platform: RawPlatform,
    #[serde(default)]
    pki: RawPki,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPki {
    base_url: Option<String>,
}

/// `[pki] base_url`: an https URL of scheme, host and port only, without a trailing slash.
fn pki_base_url(raw: RawPki) -> Result<Option<String>, String> {
    let Some(text) = raw.base_url else {
        return Ok(None);
    };
    let url = reqwest::Url::parse(&text).map_err(|e| format!("pki.base_url: {e}"))?;
    if url.scheme() != "https"
        || url.host_str().is_none()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(
            "pki.base_url: https://host[:port] only (the broker's address as relying parties reach it)"
                .into(),
        );
    }
    Ok(Some(text.trim_end_matches('/').to_string()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatform {
    publish_evidence: Option<bool>,
    dangerous_simulated: Option<PathBuf>,
    simulated_measurement: Option<String>,
    simulated_chip_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKbs {
    enabled: Option<bool>,
    token_ttl_secs: Option<u64>,
    issuer: Option<String>,
    #[serde(default)]
    resources: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    retention_days: Option<u64>,
    unauthenticated_rows_per_minute: Option<u32>,
    unauthenticated_rows_per_source_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    operator_ca: PathBuf,
    ocsp: Option<PathBuf>,
    #[serde(default = "yes")]
    staple_ocsp: bool,
    operator_names: Option<Vec<String>>,
    #[serde(default = "default_reload")]
    reload_interval_secs: u64,
}

fn yes() -> bool {
    true
}

fn default_reload() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite: Option<PathBuf>,
    postgres: Option<String>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    password_file: Option<PathBuf>,
    pool_size: Option<u32>,
    statement_timeout_secs: Option<u64>,
    connect_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasterKey {
    file: Option<PathBuf>,
    env: Option<String>,
    pkcs11_module: Option<PathBuf>,
    pkcs11_token: Option<String>,
    pkcs11_key: Option<String>,
    pkcs11_pin_file: Option<PathBuf>,
    pkcs11_pin_credential: Option<String>,
    snp_sealed: Option<Vec<String>>,
    snp_sealed_vmpl: Option<u32>,
    snp_sealed_guest_svn: Option<u32>,
    snp_sealed_tcb_version: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    nonce_ttl_secs: Option<u64>,
    dangerous_trust_simulated_root: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKds {
    base_url: Option<String>,
    offline: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    body_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    max_connection_age_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    max_inflight_attestations: Option<usize>,
}

/// Where the master key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file holding 64 hex digits; its mode must be 0600 or stricter (development).
    File(PathBuf),
    /// An environment variable holding 64 hex digits.
    Env(String),
    /// The store holds the key wrapped by a non-extractable AES key in a PKCS#11 token.
    Pkcs11(crate::hsm::Pkcs11Settings),
    /// The store holds the key sealed to the SEV-SNP VM the broker runs in (a key the AMD
    /// secure processor derives from the chip and the selected launch fields).
    SnpSealed {
        /// What the key is sealed to.
        sealing: crate::platform::Sealing,
        /// Where the broker runs (`[platform]`).
        platform: crate::platform::PlatformChoice,
    },
}

impl MasterKeySource {
    /// The provider's name, as the store records it.
    pub fn provider(&self) -> &'static str {
        match self {
            MasterKeySource::File(_) | MasterKeySource::Env(_) => "file",
            MasterKeySource::Pkcs11(_) => "pkcs11",
            MasterKeySource::SnpSealed { .. } => "snp-sealed",
        }
    }
}

/// Where the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSettings {
    /// An SQLite database file (created if missing, WAL journal).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by several replicas.
    Postgres(crate::store::PgSettings),
}

/// TLS material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that issues operator client certificates for the admin API. It must not be
    /// the CA that issues the server certificate or workload certificates: only certificates
    /// with the clientAuth extended key usage and an operator URI SAN are accepted, and the
    /// broker refuses to start when its own certificate would be.
    pub operator_ca: PathBuf,
    /// When set, only these operator names (from `urn:snp-key-broker:operator:<name>`) may
    /// use the admin API.
    pub operator_names: Option<Vec<String>>,
    /// A DER OCSP response to staple, kept current by the operator (when set, the broker
    /// does not fetch one itself).
    pub ocsp: Option<PathBuf>,
    /// Fetch and staple the OCSP response for the server certificate from the responder its
    /// AuthorityInfoAccess names (in the background; default on, unless `ocsp` is set).
    pub staple_ocsp: bool,
    /// How often certificate, key and OCSP files are checked for changes.
    pub reload_interval: Duration,
}

/// AMD KDS access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KdsSettings {
    /// Base URL (AMD's, or a mirror).
    pub base_url: String,
    /// Use only supplied and cached certificates.
    pub offline: bool,
}

/// Request and connection limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body.
    pub body_bytes: usize,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Most concurrent connections from one source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_source: usize,
    /// Time allowed to receive request headers.
    pub header_timeout: Duration,
    /// Idle time after which a connection is closed.
    pub idle_timeout: Duration,
    /// Age after which a connection is asked to close (after its requests in flight), so no
    /// client keeps a connection slot forever.
    pub max_connection_age: Duration,
    /// Time allowed for one request.
    pub request_timeout: Duration,
    /// Attestations processed at once; more are answered 429 with Retry-After.
    pub max_inflight_attestations: usize,
}

/// The audit log's bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// Records older than this are deleted once a day (with an `audit.prune` record);
    /// `None` keeps every record.
    pub retention: Option<Duration>,
    /// Audit rows for refusals of unauthenticated requests, per minute.
    pub budget: crate::audit::SampleBudget,
}

/// The Confidential Containers KBS front end (`/kbs/v0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KbsSettings {
    /// Whether `/kbs/v0` is served.
    pub enabled: bool,
    /// Lifetime of an attestation token (and of the attested session cookie).
    pub token_ttl: Duration,
    /// The tokens' `iss`.
    pub issuer: String,
    /// Resource paths (`repo/type/tag`) served from a differently named secret.
    pub resources: std::collections::BTreeMap<String, String>,
}

/// `[platform]`: where the broker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSettings {
    /// The platform (`/dev/sev-guest`, or the simulated one).
    pub choice: crate::platform::PlatformChoice,
    /// Serve `GET /v1/broker/evidence` (the broker's own report, bound to its TLS key).
    pub publish_evidence: bool,
}

/// Checked broker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// TLS.
    pub tls: TlsSettings,
    /// Store.
    pub store: StoreSettings,
    /// Master key.
    pub master_key: MasterKeySource,
    /// Where the broker runs, and whether it serves its own evidence.
    pub platform: PlatformSettings,
    /// `[pki] base_url`: where relying parties reach the broker's OCSP responder, CA
    /// certificates and CRLs (named in the certificates it issues).
    pub pki_base_url: Option<String>,
    /// Lifetime of challenge nonces.
    pub nonce_ttl: Duration,
    /// A simulated ARK to trust (tests and demos only).
    pub dangerous_trust_simulated_root: Option<PathBuf>,
    /// KDS.
    pub kds: KdsSettings,
    /// Limits.
    pub limits: Limits,
    /// Audit log.
    pub audit: AuditSettings,
    /// The KBS front end.
    pub kbs: KbsSettings,
}

fn platform_choice(p: RawPlatform, base: &Path) -> Result<crate::platform::PlatformChoice, String> {
    use crate::platform::PlatformChoice;
    let hex_field =
        |value: Option<String>, what: &str, len: usize| -> Result<Option<Vec<u8>>, String> {
            value
                .map(|h| {
                    hex::decode(h.trim())
                        .ok()
                        .filter(|b| b.len() == len)
                        .ok_or_else(|| format!("platform.{what}: {} hex digits", 2 * len))
                })
                .transpose()
        };
    match p.dangerous_simulated {
        None if p.simulated_measurement.is_some() || p.simulated_chip_id.is_some() => Err(
            "platform: simulated_measurement and simulated_chip_id need dangerous_simulated".into(),
        ),
        None => Ok(PlatformChoice::SevGuest),
        Some(dir) => Ok(PlatformChoice::DangerousSimulated {
            dir: resolve(base, dir),
            measurement: hex_field(p.simulated_measurement, "simulated_measurement", 48)?,
            chip_id: hex_field(p.simulated_chip_id, "simulated_chip_id", 64)?,
        }),
    }
}

fn sealing(m: &RawMasterKey) -> Result<Option<crate::platform::Sealing>, String> {
    use crate::platform::{SealField, Sealing};
    let Some(names) = &m.snp_sealed else {
        if m.snp_sealed_vmpl.is_some()
            || m.snp_sealed_guest_svn.is_some()
            || m.snp_sealed_tcb_version.is_some()
        {
            return Err("master_key: snp_sealed_* settings need snp_sealed (the fields)".into());
        }
        return Ok(None);
    };
    let mut fields = Vec::new();
    for name in names {
        let field = SealField::ALL
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                format!(
                    "master_key.snp_sealed: unknown field {name:?} (policy, image_id, family_id, measurement, guest_svn, tcb_version)"
                )
            })?;
        fields.push(field);
    }
    fields.sort_unstable();
    fields.dedup();
    if fields.is_empty() {
        return Err(
            "master_key.snp_sealed: name at least one field (e.g. [\"measurement\", \"policy\"]): \
             with none, any VM on the chip derives the key"
                .into(),
        );
    }
    if !fields.contains(&SealField::Measurement) {
        // Every other field is chosen by whoever launches the VM (policy, SVN, TCB) or by
        // any ID key (family and image ids): without the measurement, the host could launch
        // its own image on the chip with the same values and derive the key.
        return Err(
            "master_key.snp_sealed: include \"measurement\": the other fields are chosen by \
             whoever launches the VM, so without it another image could derive the key"
                .into(),
        );
    }
    let vmpl = m.snp_sealed_vmpl.unwrap_or(0);
    if vmpl > 3 {
        return Err("master_key.snp_sealed_vmpl: 0 to 3".into());
    }
    Ok(Some(Sealing {
        fields,
        vmpl,
        guest_svn: m.snp_sealed_guest_svn.unwrap_or(0),
        tcb_version: m.snp_sealed_tcb_version.unwrap_or(0),
    }))
}

fn master_key_source(
    m: RawMasterKey,
    base: &Path,
    platform: crate::platform::PlatformChoice,
) -> Result<MasterKeySource, String> {
    let pkcs11 = m.pkcs11_module.is_some()
        || m.pkcs11_token.is_some()
        || m.pkcs11_key.is_some()
        || m.pkcs11_pin_file.is_some()
        || m.pkcs11_pin_credential.is_some();
    if let Some(sealing) = sealing(&m)? {
        if m.file.is_some() || m.env.is_some() || pkcs11 {
            return Err(
                "master_key: set exactly one provider: file, env, pkcs11_module or snp_sealed"
                    .into(),
            );
        }
        return Ok(MasterKeySource::SnpSealed { sealing, platform });
    }
    match (m.file, m.env, pkcs11) {
        (Some(f), None, false) => Ok(MasterKeySource::File(resolve(base, f))),
        (None, Some(e), false) => Ok(MasterKeySource::Env(e)),
        (None, None, true) => {
            let missing = |what: &str| format!("master_key: pkcs11 needs {what}");
            let pin = match (m.pkcs11_pin_file, m.pkcs11_pin_credential) {
                (Some(f), None) => crate::hsm::PinSource::File(resolve(base, f)),
                (None, Some(c)) if !c.is_empty() && !c.contains('/') => {
                    crate::hsm::PinSource::Credential(c)
                }
                (None, Some(_)) => {
                    return Err(
                        "master_key.pkcs11_pin_credential: a credential name (no '/')".into(),
                    );
                }
                _ => {
                    return Err(
                        "master_key: pkcs11 needs exactly one of pkcs11_pin_file or pkcs11_pin_credential \
                         (the PIN is never taken from the command line or the environment)"
                            .into(),
                    );
                }
            };
            Ok(MasterKeySource::Pkcs11(crate::hsm::Pkcs11Settings {
                module: m.pkcs11_module.ok_or_else(|| missing("pkcs11_module"))?,
                token: m.pkcs11_token.ok_or_else(|| missing("pkcs11_token"))?,
                key: m.pkcs11_key.ok_or_else(|| missing("pkcs11_key"))?,
                pin,
            }))
        }
        _ => Err(
            "master_key: set exactly one provider: file, env, pkcs11_module (with pkcs11_token, \
             pkcs11_key and a PIN source), or snp_sealed"
                .into(),
        ),
    }
}

fn kbs_settings(raw: RawKbs) -> Result<KbsSettings, String> {
    let ttl = raw.token_ttl_secs.unwrap_or(300);
    if !(30..=86_400).contains(&ttl) {
        return Err("kbs.token_ttl_secs: must be between 30 and 86400".into());
    }
    let issuer = raw.issuer.unwrap_or_else(|| "snp-key-broker".into());
    if issuer.is_empty() || issuer.len() > 256 || issuer.chars().any(char::is_control) {
        return Err("kbs.issuer: 1 to 256 printable characters".into());
    }
    for (path, secret) in &raw.resources {
        if crate::kbs::resource_path(path).is_none() {
            return Err(format!(
                "kbs.resources: {path:?} is not a resource path (repo/type/tag)"
            ));
        }
        if !attestation::policy::valid_name(secret) {
            return Err(format!(
                "kbs.resources.{path:?}: {secret:?} is not a valid secret name"
            ));
        }
    }
    Ok(KbsSettings {
        enabled: raw.enabled.unwrap_or(false),
        token_ttl: Duration::from_secs(ttl),
        issuer,
        resources: raw.resources,
    })
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

impl Settings {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Settings, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::parse(&text, base).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and checks configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Settings, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        #[cfg(not(feature = "simulator"))]
        {
            let asks = [
                (
                    raw.attestation.dangerous_trust_simulated_root.is_some(),
                    "attestation.dangerous_trust_simulated_root",
                ),
                (
                    raw.platform.dangerous_simulated.is_some(),
                    "platform.dangerous_simulated",
                ),
            ];
            if let Some((_, setting)) = asks.iter().find(|(set, _)| *set) {
                return Err(Error::NoSimulator { setting }.to_string());
            }
        }
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| format!("listen: {:?} is not an address:port", raw.listen))?;
        let store = store_settings(raw.store, base)?;
        let publish_evidence = raw.platform.publish_evidence.unwrap_or(false);
        let platform = platform_choice(raw.platform, base)?;
        let master_key = master_key_source(raw.master_key, base, platform.clone())?;
        let pki_base_url = pki_base_url(raw.pki)?;
        let platform = PlatformSettings {
            choice: platform,
            publish_evidence,
        };
        let nonce_ttl = raw.attestation.nonce_ttl_secs.unwrap_or(60);
        if !(5..=3600).contains(&nonce_ttl) {
            return Err("attestation.nonce_ttl_secs: must be between 5 and 3600".into());
        }
        let base_url = raw
            .kds
            .base_url
            .unwrap_or_else(|| "https://kdsintf.amd.com".to_string());
        check_kds_url(&base_url)?;
        let l = raw.limits;
        let max_connections = l.max_connections.unwrap_or(1024);
        let secs = |v: Option<u64>, default: u64, name: &str| -> Result<Duration, String> {
            let v = v.unwrap_or(default);
            if !(1..=3600).contains(&v) {
                return Err(format!("limits.{name}: must be between 1 and 3600 seconds"));
            }
            Ok(Duration::from_secs(v))
        };
        let limits = Limits {
            body_bytes: l.body_bytes.unwrap_or(64 * 1024),
            max_connections,
            max_connections_per_source: l
                .max_connections_per_source
                .unwrap_or((max_connections / 16).max(8))
                .min(max_connections),
            header_timeout: secs(l.header_timeout_secs, 10, "header_timeout_secs")?,
            idle_timeout: secs(l.idle_timeout_secs, 60, "idle_timeout_secs")?,
            max_connection_age: secs(l.max_connection_age_secs, 600, "max_connection_age_secs")?,
            request_timeout: secs(l.request_timeout_secs, 30, "request_timeout_secs")?,
            max_inflight_attestations: l.max_inflight_attestations.unwrap_or(256).max(1),
        };
        if limits.body_bytes < 4096 || limits.max_connections == 0 {
            return Err(
                "limits: body_bytes must be at least 4096 and max_connections above 0".into(),
            );
        }
        if limits.max_connections_per_source == 0 {
            return Err("limits.max_connections_per_source: must be above 0".into());
        }
        let a = raw.audit;
        let defaults = crate::audit::SampleBudget::default();
        let audit = AuditSettings {
            retention: match a.retention_days {
                Some(d) if !(1..=36_500).contains(&d) => {
                    return Err(
                        "audit.retention_days: 1 to 36500 (leave it out to keep every record)"
                            .into(),
                    );
                }
                Some(d) => Some(Duration::from_secs(d * 86_400)),
                None => None,
            },
            budget: crate::audit::SampleBudget {
                per_source: a
                    .unauthenticated_rows_per_source_per_minute
                    .unwrap_or(defaults.per_source),
                global: a.unauthenticated_rows_per_minute.unwrap_or(defaults.global),
            },
        };
        let kbs = kbs_settings(raw.kbs)?;
        Ok(Settings {
            kbs,
            listen,
            tls: TlsSettings {
                cert: resolve(base, raw.tls.cert),
                key: resolve(base, raw.tls.key),
                operator_ca: resolve(base, raw.tls.operator_ca),
                operator_names: match raw.tls.operator_names {
                    Some(names) => {
                        if names.is_empty() {
                            return Err(
                                "tls.operator_names: list at least one operator, or leave it out"
                                    .into(),
                            );
                        }
                        if let Some(bad) = names
                            .iter()
                            .find(|n| !crate::server::tls::valid_operator_name(n))
                        {
                            return Err(format!(
                                "tls.operator_names: {bad:?} is not a valid operator name (1 to 64 letters, digits, '.', '_', '-', '@')"
                            ));
                        }
                        Some(names)
                    }
                    None => None,
                },
                staple_ocsp: raw.tls.staple_ocsp && raw.tls.ocsp.is_none(),
                ocsp: raw.tls.ocsp.map(|p| resolve(base, p)),
                reload_interval: Duration::from_secs(raw.tls.reload_interval_secs.max(1)),
            },
            store,
            master_key,
            platform,
            pki_base_url,
            nonce_ttl: Duration::from_secs(nonce_ttl),
            dangerous_trust_simulated_root: raw
                .attestation
                .dangerous_trust_simulated_root
                .map(|p| resolve(base, p)),
            kds: KdsSettings {
                base_url: base_url.trim_end_matches('/').to_string(),
                offline: raw.kds.offline.unwrap_or(false),
            },
            limits,
            audit,
        })
    }
}

fn store_settings(raw: RawStore, base: &Path) -> Result<StoreSettings, String> {
    let url = match (raw.postgres, raw.url) {
        (Some(_), Some(_)) => return Err("store: set postgres or url, not both".into()),
        (a, b) => a.or(b),
    };
    match (raw.sqlite, url) {
        (Some(path), None) => {
            if raw.ca_file.is_some()
                || raw.password_file.is_some()
                || raw.pool_size.is_some()
                || raw.statement_timeout_secs.is_some()
                || raw.connect_timeout_secs.is_some()
            {
                return Err(
                    "store: ca_file, password_file, pool_size and the timeouts are PostgreSQL settings"
                        .into(),
                );
            }
            Ok(StoreSettings::Sqlite(resolve(base, path)))
        }
        (None, Some(url)) => {
            check_postgres_url(&url)?;
            let secs = |v: Option<u64>, default: u64, name: &str| -> Result<Duration, String> {
                let v = v.unwrap_or(default);
                if !(1..=600).contains(&v) {
                    return Err(format!("store.{name}: must be between 1 and 600 seconds"));
                }
                Ok(Duration::from_secs(v))
            };
            let pool_size = raw.pool_size.unwrap_or(16);
            if !(1..=1000).contains(&pool_size) {
                return Err("store.pool_size: must be between 1 and 1000".into());
            }
            Ok(StoreSettings::Postgres(crate::store::PgSettings {
                url,
                ca_file: raw.ca_file.map(|p| resolve(base, p)),
                password_file: raw.password_file.map(|p| resolve(base, p)),
                pool_size,
                statement_timeout: secs(raw.statement_timeout_secs, 10, "statement_timeout_secs")?,
                connect_timeout: secs(raw.connect_timeout_secs, 5, "connect_timeout_secs")?,
            }))
        }
        _ => Err(
            "store: set exactly one engine: sqlite = \"PATH\" or postgres = \"postgres://…\""
                .into(),
        ),
    }
}

/// A PostgreSQL URL: TLS with the server's certificate and name verified
/// (`sslmode=verify-full`), unless the server is on this machine (a loopback address or a
/// unix socket). Checked on what sqlx will use: the URL as sqlx parses it (the last of a
/// repeated parameter, `host=` and `hostaddr=` parameters) over the `PG*` environment.
fn check_postgres_url(url: &str) -> Result<(), String> {
    use std::str::FromStr;
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("store.postgres: {e}"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err("store.postgres: a postgres:// URL".into());
    }
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| format!("store.postgres: {e}"))?;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let verified = matches!(
        options.get_ssl_mode(),
        sqlx::postgres::PgSslMode::VerifyFull
    );
    if !local && !verified {
        return Err(format!(
            "store.postgres: a database on another machine ({host}) needs sslmode=verify-full; add it to the URL, with store.ca_file for a private CA"
        ));
    }
    Ok(())
}

/// AMD's KDS (or a mirror) over https; plain http only to a loopback address or exactly
/// `localhost` (a local mirror, tests).
fn check_kds_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("kds.base_url: {e}"))?;
    if !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err("kds.base_url: no credentials, query or fragment".into());
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => match parsed.host() {
            Some(url::Host::Domain("localhost")) => Ok(()),
            Some(url::Host::Ipv4(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Ipv6(ip)) if ip.is_loopback() => Ok(()),
            _ => Err("kds.base_url: must be https (plain http only on loopback)".into()),
        },
        _ => Err("kds.base_url: must be https (plain http only on loopback)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8443"
[tls]
cert = "server.pem"
key = "server.key"
operator_ca = "ca.pem"
[store]
sqlite = "broker.db"
[master_key]
file = "master.key"
"#;

    #[test]
    fn parses_with_defaults_and_resolves_paths() {
        let s = Settings::parse(GOOD, Path::new("/etc/broker")).unwrap();
        assert_eq!(s.tls.cert, PathBuf::from("/etc/broker/server.pem"));
        assert_eq!(
            s.store,
            StoreSettings::Sqlite("/etc/broker/broker.db".into())
        );
        assert_eq!(s.nonce_ttl, Duration::from_secs(60));
        assert_eq!(s.kds.base_url, "https://kdsintf.amd.com");
        assert!(!s.kds.offline);
        assert_eq!(s.dangerous_trust_simulated_root, None);
    }

    #[test]
    fn master_key_providers_and_kbs_settings() {
        let with = |section: &str| GOOD.replace("[master_key]\nfile = \"master.key\"", section);
        let s = Settings::parse(
            &with(
                "[master_key]\npkcs11_module = \"/usr/lib/softhsm/libsofthsm2.so\"\npkcs11_token = \"broker\"\n\
                 pkcs11_key = \"kek\"\npkcs11_pin_file = \"hsm.pin\"",
            ),
            Path::new("/etc/broker"),
        )
        .unwrap();
        assert_eq!(
            s.master_key,
            MasterKeySource::Pkcs11(crate::hsm::Pkcs11Settings {
                module: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token: "broker".into(),
                key: "kek".into(),
                pin: crate::hsm::PinSource::File("/etc/broker/hsm.pin".into()),
            })
        );
        assert_eq!(s.master_key.provider(), "pkcs11");
        for (section, error) in [
            ("[master_key]", "exactly one provider"),
            (
                "[master_key]\nfile = \"a\"\nenv = \"B\"",
                "exactly one provider",
            ),
            (
                "[master_key]\nfile = \"a\"\npkcs11_token = \"t\"",
                "exactly one provider",
            ),
            (
                "[master_key]\npkcs11_module = \"m\"\npkcs11_token = \"t\"\npkcs11_key = \"k\"",
                "exactly one of pkcs11_pin_file or pkcs11_pin_credential",
            ),
            (
                "[master_key]\npkcs11_module = \"m\"\npkcs11_key = \"k\"\npkcs11_pin_file = \"p\"",
                "pkcs11 needs pkcs11_token",
            ),
            (
                "[master_key]\npkcs11_module = \"m\"\npkcs11_token = \"t\"\npkcs11_key = \"k\"\npkcs11_pin_credential = \"../p\"",
                "a credential name",
            ),
            ("[master_key]\npkcs11_pin = \"1234\"", "unknown field"),
            ("[master_key]\nsnp_sealed = []", "name at least one field"),
            (
                "[master_key]\nsnp_sealed = [\"measurment\"]",
                "unknown field \"measurment\"",
            ),
            (
                "[master_key]\nsnp_sealed = [\"measurement\"]\nfile = \"k\"",
                "exactly one provider",
            ),
            (
                "[master_key]\nsnp_sealed_vmpl = 1\nfile = \"k\"",
                "need snp_sealed",
            ),
            (
                "[master_key]\nsnp_sealed = [\"measurement\"]\nsnp_sealed_vmpl = 4",
                "0 to 3",
            ),
            (
                "[master_key]\nsnp_sealed = [\"policy\", \"family_id\", \"image_id\"]",
                "include \"measurement\"",
            ),
        ] {
            let e = Settings::parse(&with(section), Path::new("/")).unwrap_err();
            assert!(e.contains(error), "{section}: {e}");
        }
        // snp-sealed: the fields sorted, the real platform unless a simulated one is named.
        let s = Settings::parse(
            &with("[master_key]\nsnp_sealed = [\"measurement\", \"policy\", \"measurement\"]\nsnp_sealed_vmpl = 1"),
            Path::new("/etc/broker"),
        )
        .unwrap();
        assert_eq!(
            s.master_key,
            MasterKeySource::SnpSealed {
                sealing: crate::platform::Sealing {
                    fields: vec![
                        crate::platform::SealField::Policy,
                        crate::platform::SealField::Measurement
                    ],
                    vmpl: 1,
                    guest_svn: 0,
                    tcb_version: 0,
                },
                platform: crate::platform::PlatformChoice::SevGuest,
            }
        );
        assert_eq!(s.master_key.provider(), "snp-sealed");
        let s = Settings::parse(
            &format!(
                "{}[platform]\ndangerous_simulated = \"sim\"\nsimulated_measurement = \"{}\"\n",
                with("[master_key]\nsnp_sealed = [\"measurement\"]"),
                "ab".repeat(48)
            ),
            Path::new("/etc/broker"),
        )
        .unwrap();
        assert!(matches!(
            s.master_key,
            MasterKeySource::SnpSealed {
                platform: crate::platform::PlatformChoice::DangerousSimulated { ref dir, .. },
                ..
            } if dir == Path::new("/etc/broker/sim")
        ));
        for platform in [
            "[platform]\nsimulated_measurement = \"ab\"",
            "[platform]\ndangerous_simulated = \"sim\"\nsimulated_chip_id = \"ab\"",
        ] {
            assert!(Settings::parse(&format!("{GOOD}{platform}\n"), Path::new("/")).is_err());
        }
        // KBS: off by default; its settings checked.
        let s = Settings::parse(GOOD, Path::new("/")).unwrap();
        assert!(!s.kbs.enabled);
        assert_eq!(s.kbs.token_ttl, Duration::from_secs(300));
        for (kbs, error) in [
            ("[kbs]\ntoken_ttl_secs = 5", "token_ttl_secs"),
            (
                "[kbs]\n[kbs.resources]\n\"a/b\" = \"x\"",
                "not a resource path",
            ),
            (
                "[kbs]\n[kbs.resources]\n\"a/b/c\" = \"x/y\"",
                "not a valid secret name",
            ),
            ("[kbs]\nissuer = \"\"", "kbs.issuer"),
        ] {
            let e = Settings::parse(&format!("{GOOD}{kbs}\n"), Path::new("/")).unwrap_err();
            assert!(e.contains(error), "{kbs}: {e}");
        }
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let typo = GOOD.replace("[store]", "[store]\nsqlit = \"x\"");
        assert!(
            Settings::parse(&typo, Path::new("/"))
                .unwrap_err()
                .contains("unknown field")
        );
        for (store, ok) in [
            (
                "postgres = \"postgres://kb@db.example/kb?sslmode=verify-full\"",
                true,
            ),
            ("postgres = \"postgres://kb@127.0.0.1:5432/kb\"", true),
            (
                "postgres = \"postgres:///kb?host=/run/postgresql&user=kb\"",
                true,
            ),
            (
                "url = \"postgres://kb@db.example/kb?sslmode=require\"",
                false,
            ),
            ("postgres = \"postgres://kb@db.example/kb\"", false),
            ("postgres = \"postgres://kb@10.0.0.5/kb\"", false),
            ("postgres = \"postgres://kb@127.0.0.1.example/kb\"", false),
            ("postgres = \"postgres://kb@[::1]:5432/kb\"", true),
            (
                "postgres = \"postgres://kb@localhost/kb?host=db.example\"",
                false,
            ),
            (
                "postgres = \"postgres://kb@db.example/kb?sslmode=verify-full&sslmode=disable\"",
                false,
            ),
            ("postgres = \"mysql://kb@127.0.0.1/kb\"", false),
            (
                "postgres = \"postgres://kb@127.0.0.1/kb\"\npool_size = 0",
                false,
            ),
            ("sqlite = \"b.db\"\npool_size = 4", false),
            (
                "sqlite = \"b.db\"\npostgres = \"postgres://127.0.0.1/kb\"",
                false,
            ),
        ] {
            let text = GOOD.replace("sqlite = \"broker.db\"", store);
            assert_eq!(
                Settings::parse(&text, Path::new("/")).is_ok(),
                ok,
                "{store}"
            );
        }
        let both = GOOD.replace("file = \"master.key\"", "file = \"m\"\nenv = \"E\"");
        assert!(Settings::parse(&both, Path::new("/")).is_err());
        let http = format!("{GOOD}\n[kds]\nbase_url = \"http://kds.example\"\n");
        assert!(Settings::parse(&http, Path::new("/")).is_err());
        let listen = GOOD.replace("127.0.0.1:8443", "localhost");
        assert!(Settings::parse(&listen, Path::new("/")).is_err());
        for (section, bad) in [
            ("kds", "base_url = \"http://localhost.attacker.example\""),
            ("kds", "base_url = \"http://127.0.0.1.attacker.example\""),
            ("kds", "base_url = \"http://user@localhost:8080\""),
            ("kds", "base_url = \"ftp://localhost\""),
            ("limits", "header_timeout_secs = 0"),
            ("limits", "idle_timeout_secs = 0"),
            ("limits", "request_timeout_secs = 0"),
            ("limits", "max_connections_per_source = 0"),
            ("audit", "retention_days = 0"),
            ("audit", "retention_days = 18446744073709551615"),
            ("tls", "operator_names = []"),
            ("tls", "operator_names = [\"a b\"]"),
        ] {
            let text = if section == "tls" {
                GOOD.replace("[tls]\n", &format!("[tls]\n{bad}\n"))
            } else {
                format!("{GOOD}\n[{section}]\n{bad}\n")
            };
            let e = Settings::parse(&text, Path::new("/")).unwrap_err();
            assert!(e.contains(section), "{bad}: {e}");
        }
        for good in [
            "http://localhost:8080",
            "http://127.0.0.1:9",
            "http://[::1]:9",
            "https://kds.mirror.example/",
        ] {
            let text = format!("{GOOD}\n[kds]\nbase_url = \"{good}\"\n");
            assert!(Settings::parse(&text, Path::new("/")).is_ok(), "{good}");
        }
        let s = Settings::parse(GOOD, Path::new("/")).unwrap();
        assert_eq!(s.limits.max_connections_per_source, 64);
        assert_eq!(s.audit.retention, None);
    }
}
