//! `/etc/guest-agent/config.toml`: parsed with unknown keys rejected into checked [`Settings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::AgentError;

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/guest-agent/config.toml";
/// The default directory for secrets: systemd's credentials convention, on a tmpfs.
pub const DEFAULT_SECRETS_DIR: &str = "/run/credstore";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    broker_url: Option<String>,
    brokers: Option<Vec<String>>,
    broker_ca: Option<PathBuf>,
    #[serde(default)]
    use_system_roots: bool,
    broker_attested_policy: Option<PathBuf>,
    dangerous_broker_simulated_root: Option<PathBuf>,
    #[serde(default = "auto")]
    platform: String,
    #[serde(default)]
    key: Option<String>,
    deadline_secs: Option<u64>,
    #[serde(default)]
    retry: RawRetry,
    secrets_dir: Option<PathBuf>,
    #[serde(default)]
    secrets: Vec<RawSecret>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
    simulated: Option<RawSimulated>,
    azure: Option<RawAzure>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAzure {
    tcti: Option<String>,
    #[serde(default = "yes")]
    thim: bool,
    thim_url: Option<String>,
    report_timeout_ms: Option<u64>,
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial_ms: Option<u64>,
    max_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    profile: String,
    name: Option<String>,
    #[serde(default)]
    dns: Vec<String>,
    #[serde(default)]
    ip: Vec<String>,
    #[serde(default)]
    uri: Vec<String>,
    dir: Option<PathBuf>,
    owner: Option<String>,
    group: Option<String>,
    key_mode: Option<String>,
    #[serde(default = "yes")]
    ocsp: bool,
    #[serde(default)]
    reload: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    path: Option<PathBuf>,
    owner: Option<String>,
    group: Option<String>,
    mode: Option<String>,
    #[serde(default = "yes")]
    required: bool,
}

fn yes() -> bool {
    true
}

// Parsed in every build, so that a production build names the setting it refuses.
#[cfg_attr(not(feature = "simulator"), allow(dead_code))]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulated {
    dir: PathBuf,
    product: Option<String>,
    measurement: Option<String>,
    policy: Option<u64>,
    vmpl: Option<u32>,
    chip_id: Option<String>,
    host_data: Option<String>,
    bootloader: Option<u8>,
    tee: Option<u8>,
    snp: Option<u8>,
    microcode: Option<u8>,
    fmc: Option<u8>,
}

/// Where evidence comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Probe configfs-tsm, then /dev/sev-guest. Never picks the simulator.
    Auto,
    /// Linux configfs-tsm (`/sys/kernel/config/tsm/report`).
    ConfigfsTsm,
    /// `/dev/sev-guest` through the sev crate.
    SevGuest,
    /// Azure vTPM: HCL report and TPM quote.
    AzureVtpm,
    /// The simulated platform (tests and demos only).
    Simulated,
}

/// The HPKE KEM of the ephemeral key.
pub use attestation::protocol::Kem;

/// One secret to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretSpec {
    /// Name at the broker.
    pub name: String,
    /// Absolute target path.
    pub path: PathBuf,
    /// Owner (user name or numeric id).
    pub owner: Option<String>,
    /// Group (group name or numeric id).
    pub group: Option<String>,
    /// File mode.
    pub mode: u32,
    /// Whether the agent fails without it.
    pub required: bool,
}

/// A certificate to obtain from the broker's CA (`[[certificate]]`), for a key made here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateSpec {
    /// The broker policy's certificate profile.
    pub profile: String,
    /// Base name of the files: `<name>.key`, `<name>.pem` (certificate and the CA
    /// certificates below the root), `<name>.ca.pem` (the CA chain with its root).
    pub name: String,
    /// The names asked for.
    pub names: Vec<attestation::policy::RequestedName>,
    /// Directory of the files (created 0700).
    pub dir: PathBuf,
    /// Owner of the files (user name or numeric id).
    pub owner: Option<String>,
    /// Group of the files.
    pub group: Option<String>,
    /// Mode of the key file (the certificate files are 0644, in the private directory).
    pub key_mode: u32,
    /// Fetch the certificate's OCSP response (from its AuthorityInfoAccess) and keep it
    /// beside the certificate as `<name>.ocsp.der`, for servers to staple.
    pub ocsp: bool,
    /// Run after the certificate or its OCSP response changed (program by absolute path, then
    /// its arguments; no shell), e.g. `["/usr/bin/systemctl", "reload", "nginx"]`.
    pub reload: Vec<String>,
}

impl CertificateSpec {
    /// The key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(format!("{}.key", self.name))
    }
    /// The certificate file (leaf, then the CA certificates below the root).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }
    /// The CA chain with its root (what peers verify against).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}.ca.pem", self.name))
    }
    /// The certificate's OCSP response (DER), for servers to staple.
    pub fn ocsp_path(&self) -> PathBuf {
        self.dir.join(format!("{}.ocsp.der", self.name))
    }
}

/// Simulated report fields (feature `simulator`).
#[cfg(feature = "simulator")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatedSettings {
    /// The directory written by `broker init --dev` under `sim/`.
    pub dir: PathBuf,
    /// The fields to report.
    pub fields: attestation::sim::ReportFields,
}

/// Azure vTPM settings (`[azure]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureSettings {
    /// The TSS TCTI that reaches the vTPM (`device:/dev/tpmrm0`; `swtpm:host=...,port=...`
    /// for an emulator).
    pub tcti: String,
    /// Where to fetch the VCEK (Azure's THIM endpoint); `None` leaves it to the broker.
    pub thim_url: Option<String>,
    /// How long to wait for the paravisor to regenerate the HCL report.
    pub report_timeout: Duration,
}

/// Checked agent settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Broker base URLs (https): one, or every replica's (tried in a random order, the next
    /// one after a transient failure).
    pub brokers: Vec<String>,
    /// The broker CA to pin.
    pub broker_ca: Option<PathBuf>,
    /// Also trust the Mozilla root set.
    pub use_system_roots: bool,
    /// Require each broker to prove itself first: its own evidence, bound to its TLS key,
    /// must satisfy this policy's `broker` grant before anything is sent to it.
    pub broker_attested_policy: Option<PathBuf>,
    /// A simulated AMD root to trust for the broker's evidence (tests and demos only).
    pub dangerous_broker_simulated_root: Option<PathBuf>,
    /// Evidence source.
    pub platform: Platform,
    /// Ephemeral key type.
    pub kem: Kem,
    /// Give up after this long.
    pub deadline: Duration,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Directory created (0700) for secrets without an explicit path.
    pub secrets_dir: PathBuf,
    /// Secrets.
    pub secrets: Vec<SecretSpec>,
    /// Certificates from the broker's CA.
    pub certificates: Vec<CertificateSpec>,
    /// Simulated platform settings.
    #[cfg(feature = "simulator")]
    pub simulated: Option<SimulatedSettings>,
    /// Azure vTPM settings (defaults unless `[azure]` says otherwise).
    pub azure: AzureSettings,
}

fn mode_of(text: &str, what: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{what}: {text:?} is not octal"))?;
    if mode > 0o777 || mode & 0o007 != 0 {
        return Err(format!(
            "{what}: {text} gives access to others; use at most 0770"
        ));
    }
    Ok(mode)
}

fn certificate_specs(
    raw: Vec<RawCertificate>,
    base: &Path,
    secrets_dir: &Path,
) -> Result<Vec<CertificateSpec>, String> {
    use attestation::policy::RequestedName;
    if raw.len() > attestation::protocol::MAX_CERTIFICATE_REQUESTS {
        return Err(format!(
            "certificate: at most {} entries",
            attestation::protocol::MAX_CERTIFICATE_REQUESTS
        ));
    }
    let mut specs: Vec<CertificateSpec> = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let at = format!("certificate[{i}]");
        if !attestation::policy::valid_name(&c.profile) {
            return Err(format!("{at}.profile: letters, digits, '.', '_', '-'"));
        }
        let name = c.name.unwrap_or_else(|| c.profile.clone());
        if !attestation::policy::valid_name(&name) {
            return Err(format!("{at}.name: letters, digits, '.', '_', '-'"));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("{at}.name: {name} is listed twice"));
        }
        let mut names = Vec::new();
        for d in c.dns {
            if !attestation::policy::certificates::valid_dns_name(&d) {
                return Err(format!("{at}.dns: {d:?} is not a lowercase DNS name"));
            }
            names.push(RequestedName::Dns(d));
        }
        for a in c.ip {
            names
                .push(RequestedName::Ip(a.parse().map_err(|_| {
                    format!("{at}.ip: {a:?} is not an IP address")
                })?));
        }
        for u in c.uri {
            if !attestation::policy::certificates::valid_uri(&u) {
                return Err(format!("{at}.uri: {u:?} is not a URI"));
            }
            names.push(RequestedName::Uri(u));
        }
        if names.is_empty() {
            return Err(format!("{at}: ask for at least one name (dns, ip or uri)"));
        }
        if let Some(program) = c.reload.first()
            && !Path::new(program).is_absolute()
        {
            return Err(format!(
                "{at}.reload: the program must be an absolute path (no shell, no PATH lookup), not {program:?}"
            ));
        }
        specs.push(CertificateSpec {
            profile: c.profile,
            name,
            names,
            dir: c
                .dir
                .map(|d| resolve(base, d))
                .unwrap_or_else(|| secrets_dir.to_path_buf()),
            owner: c.owner,
            group: c.group,
            key_mode: mode_of(
                c.key_mode.as_deref().unwrap_or("0400"),
                &format!("{at}.key_mode"),
            )?,
            ocsp: c.ocsp,
            reload: c.reload,
        });
    }
    Ok(specs)
}

/// The refusal of a simulated-platform setting by a build without the `simulator` feature.
#[cfg(not(feature = "simulator"))]
fn no_simulator(setting: &str) -> String {
    format!(
        "{setting}: this guest agent was built without the `simulator` feature (a production build), which cannot act as a simulated platform or trust a simulated AMD root"
    )
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

#[cfg(feature = "simulator")]
fn hex_field<const N: usize>(s: &str, what: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(s).map_err(|_| format!("simulated.{what}: not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("simulated.{what}: must be {N} bytes"))
}

impl Settings {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Settings, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("/"));
        Settings::parse(&text, base)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses and checks configuration text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Settings, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        let brokers = match (raw.broker_url, raw.brokers) {
            (Some(url), None) => vec![url],
            (None, Some(list)) if !list.is_empty() && list.len() <= 32 => list,
            (None, Some(_)) => return Err("brokers: list 1 to 32 broker URLs".into()),
            (Some(_), Some(_)) => {
                return Err("broker_url and brokers: set one of them (brokers for several)".into());
            }
            (None, None) => {
                return Err("broker_url: the broker's https:// URL (or brokers = [...])".into());
            }
        };
        let mut checked: Vec<String> = Vec::new();
        for url in brokers {
            if !url.starts_with("https://") {
                return Err(format!("brokers: {url:?} must be https://"));
            }
            let url = url.trim_end_matches('/').to_string();
            if checked.contains(&url) {
                return Err(format!("brokers: {url:?} is listed twice"));
            }
            checked.push(url);
        }
        if raw.broker_ca.is_none() && !raw.use_system_roots {
            return Err("broker_ca: set the broker's CA (or use_system_roots = true)".into());
        }
        let platform = match raw.platform.as_str() {
            "auto" => Platform::Auto,
            "configfs-tsm" => Platform::ConfigfsTsm,
            "sev-guest" => Platform::SevGuest,
            "azure-vtpm" => Platform::AzureVtpm,
            #[cfg(feature = "simulator")]
            "simulated" => Platform::Simulated,
            #[cfg(not(feature = "simulator"))]
            "simulated" => return Err(no_simulator("platform = \"simulated\"")),
            other => {
                return Err(format!(
                    "platform: {other:?} is not auto, configfs-tsm, sev-guest, azure-vtpm or simulated"
                ));
            }
        };
        let kem = match raw.key.as_deref().unwrap_or("x25519") {
            "x25519" => Kem::X25519,
            "p384" => Kem::P384,
            other => return Err(format!("key: {other:?} is not x25519 or p384")),
        };
        let secrets_dir = raw
            .secrets_dir
            .map(|p| resolve(base, p))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SECRETS_DIR));
        if raw.secrets.is_empty() && raw.certificate.is_empty() {
            return Err("secrets: name at least one secret (or a [[certificate]])".into());
        }
        let certificates = certificate_specs(raw.certificate, base, &secrets_dir)?;
        let mut secrets = Vec::new();
        for (i, s) in raw.secrets.into_iter().enumerate() {
            if !attestation::policy::valid_name(&s.name) {
                return Err(format!("secrets[{i}].name: letters, digits, '.', '_', '-'"));
            }
            if secrets.iter().any(|x: &SecretSpec| x.name == s.name) {
                return Err(format!("secrets[{i}].name: {} is listed twice", s.name));
            }
            let mode_text = s.mode.unwrap_or_else(|| "0400".into());
            let mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
                .map_err(|_| format!("secrets[{i}].mode: {mode_text:?} is not octal"))?;
            if mode > 0o777 || mode & 0o007 != 0 {
                return Err(format!(
                    "secrets[{i}].mode: {mode_text} gives access to others; use at most 0770"
                ));
            }
            let path = match s.path {
                Some(p) if p.is_absolute() => p,
                Some(p) => {
                    return Err(format!(
                        "secrets[{i}].path: {} is not absolute",
                        p.display()
                    ));
                }
                None => secrets_dir.join(&s.name),
            };
            secrets.push(SecretSpec {
                name: s.name,
                path,
                owner: s.owner,
                group: s.group,
                mode,
                required: s.required,
            });
        }
        if !secrets.iter().any(|s| s.required) && certificates.is_empty() {
            return Err("secrets: at least one secret must be required".into());
        }
        #[cfg(not(feature = "simulator"))]
        if raw.simulated.is_some() {
            return Err(no_simulator("[simulated]"));
        }
        #[cfg(feature = "simulator")]
        let simulated = match (raw.simulated, &platform) {
            (Some(sim), Platform::Simulated) => {
                let product = match sim.product.as_deref() {
                    None => attestation::Product::Genoa,
                    Some(p) => attestation::Product::from_name(p).ok_or_else(|| {
                        format!("simulated.product: {p:?} is not Milan, Genoa or Turin")
                    })?,
                };
                let mut f = attestation::sim::ReportFields::new(product);
                if let Some(m) = &sim.measurement {
                    f.measurement = hex_field(m, "measurement")?;
                }
                if let Some(c) = &sim.chip_id {
                    f.chip_id = hex_field(c, "chip_id")?;
                }
                if let Some(h) = &sim.host_data {
                    f.host_data = hex_field(h, "host_data")?;
                }
                if let Some(p) = sim.policy {
                    f.policy = p;
                }
                if let Some(v) = sim.vmpl {
                    f.vmpl = v;
                }
                f.tcb.bootloader = sim.bootloader.unwrap_or(f.tcb.bootloader);
                f.tcb.tee = sim.tee.unwrap_or(f.tcb.tee);
                f.tcb.snp = sim.snp.unwrap_or(f.tcb.snp);
                f.tcb.microcode = sim.microcode.unwrap_or(f.tcb.microcode);
                if product == attestation::Product::Turin {
                    f.tcb.fmc = Some(sim.fmc.unwrap_or(f.tcb.fmc.unwrap_or(0)));
                }
                Some(SimulatedSettings {
                    dir: resolve(base, sim.dir),
                    fields: f,
                })
            }
            (None, Platform::Simulated) => {
                return Err("platform = \"simulated\" needs a [simulated] section".into());
            }
            (Some(_), _) => {
                return Err("[simulated] is only allowed with platform = \"simulated\"".into());
            }
            (None, _) => None,
        };
        if raw.azure.is_some() && !matches!(platform, Platform::AzureVtpm | Platform::Auto) {
            return Err(
                "[azure] is only allowed with platform = \"azure-vtpm\" or \"auto\"".into(),
            );
        }
        let azure = match raw.azure {
            None => AzureSettings {
                tcti: crate::azure::DEFAULT_TCTI.into(),
                thim_url: Some(crate::azure::DEFAULT_THIM_URL.into()),
                report_timeout: Duration::from_secs(10),
            },
            Some(a) => {
                let tcti = a.tcti.unwrap_or_else(|| crate::azure::DEFAULT_TCTI.into());
                if !["device:", "swtpm:", "mssim:", "tabrmd"]
                    .iter()
                    .any(|p| tcti.starts_with(p))
                {
                    return Err(format!(
                        "azure.tcti: {tcti:?} is not device:..., swtpm:..., mssim:... or tabrmd"
                    ));
                }
                let url = a
                    .thim_url
                    .unwrap_or_else(|| crate::azure::DEFAULT_THIM_URL.into());
                if !url.starts_with("http://") && !url.starts_with("https://") {
                    return Err(format!("azure.thim_url: {url:?} is not an http(s) URL"));
                }
                AzureSettings {
                    tcti,
                    thim_url: a.thim.then_some(url),
                    report_timeout: Duration::from_millis(
                        a.report_timeout_ms.unwrap_or(10_000).clamp(100, 120_000),
                    ),
                }
            }
        };
        let initial = Duration::from_millis(raw.retry.initial_ms.unwrap_or(500).max(10));
        #[cfg(not(feature = "simulator"))]
        if raw.dangerous_broker_simulated_root.is_some() {
            return Err(no_simulator("dangerous_broker_simulated_root"));
        }
        if raw.dangerous_broker_simulated_root.is_some() && raw.broker_attested_policy.is_none() {
            return Err("dangerous_broker_simulated_root: only with broker_attested_policy".into());
        }
        Ok(Settings {
            brokers: checked,
            broker_ca: raw.broker_ca.map(|p| resolve(base, p)),
            use_system_roots: raw.use_system_roots,
            broker_attested_policy: raw.broker_attested_policy.map(|p| resolve(base, p)),
            dangerous_broker_simulated_root: raw
                .dangerous_broker_simulated_root
                .map(|p| resolve(base, p)),
            platform,
            kem,
            deadline: Duration::from_secs(raw.deadline_secs.unwrap_or(300).max(1)),
            retry_initial: initial,
            retry_max: Duration::from_millis(raw.retry.max_ms.unwrap_or(30_000)).max(initial),
            secrets_dir,
            secrets,
            certificates,
            #[cfg(feature = "simulator")]
            simulated,
            azure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
broker_url = "https://broker.internal:8443"
broker_ca = "ca.pem"
[[secrets]]
name = "web-tls"
owner = "www-data"
mode = "0440"
[[secrets]]
name = "extra"
path = "/run/app/extra.key"
required = false
"#;

    #[test]
    fn one_broker_or_a_list() {
        let list = GOOD.replace(
            "broker_url = \"https://broker.internal:8443\"",
            "brokers = [\"https://b1.internal:8443/\", \"https://b2.internal:8443\"]",
        );
        let s = Settings::parse(&list, Path::new("/etc/guest-agent")).unwrap();
        assert_eq!(
            s.brokers,
            ["https://b1.internal:8443", "https://b2.internal:8443"]
        );
        for (bad, needle) in [
            (
                GOOD.replace("broker_url", "brokers = [\"https://x\"]\nbroker_url"),
                "set one of them",
            ),
            (
                GOOD.replace("broker_url = \"https://broker.internal:8443\"", ""),
                "broker_url",
            ),
            (
                GOOD.replace(
                    "broker_url = \"https://broker.internal:8443\"",
                    "brokers = []",
                ),
                "1 to 32",
            ),
            (
                GOOD.replace(
                    "broker_url = \"https://broker.internal:8443\"",
                    "brokers = [\"https://a\", \"http://b\"]",
                ),
                "https://",
            ),
            (
                GOOD.replace(
                    "broker_url = \"https://broker.internal:8443\"",
                    "brokers = [\"https://a\", \"https://a/\"]",
                ),
                "twice",
            ),
        ] {
            let e = Settings::parse(&bad, Path::new("/")).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_paths() {
        let s = Settings::parse(GOOD, Path::new("/etc/guest-agent")).unwrap();
        assert_eq!(s.platform, Platform::Auto);
        assert_eq!(s.kem, Kem::X25519);
        assert_eq!(s.broker_ca, Some(PathBuf::from("/etc/guest-agent/ca.pem")));
        assert_eq!(s.secrets[0].path, PathBuf::from("/run/credstore/web-tls"));
        assert_eq!(s.secrets[0].mode, 0o440);
        assert_eq!(s.secrets[1].mode, 0o400);
        assert!(!s.secrets[1].required);
        assert_eq!(s.deadline, Duration::from_secs(300));
        assert_eq!(s.azure.tcti, "device:/dev/tpmrm0");
        assert_eq!(
            s.azure.thim_url.as_deref(),
            Some("http://169.254.169.254/metadata/THIM/amd/certification")
        );
        let az = Settings::parse(
            &format!(
                "platform = \"azure-vtpm\"\n{GOOD}\n[azure]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\nthim = false\n"
            ),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(az.platform, Platform::AzureVtpm);
        assert_eq!(az.azure.thim_url, None);
        assert_eq!(az.azure.tcti, "swtpm:host=127.0.0.1,port=2321");
    }

    #[test]
    fn refusals() {
        for (bad, why) in [
            (GOOD.replace("https://", "http://"), "https"),
            (GOOD.replace("broker_ca = \"ca.pem\"", ""), "broker_ca"),
            (GOOD.replace("0440", "0444"), "others"),
            (GOOD.replace("0440", "9"), "octal"),
            (GOOD.replace("/run/app/extra.key", "relative"), "absolute"),
            (format!("{GOOD}\nsurprise = 1\n"), "unknown field"),
            (format!("platform = \"simulated\"\n{GOOD}"), "[simulated]"),
            (
                format!("platform = \"sev-guest\"\n{GOOD}\n[azure]\nthim = false\n"),
                "[azure]",
            ),
            (
                format!("{GOOD}\n[azure]\ntcti = \"/dev/tpm0\"\n"),
                "azure.tcti",
            ),
            (
                format!("{GOOD}\n[azure]\nthim_url = \"ftp://x\"\n"),
                "azure.thim_url",
            ),
            (
                GOOD.replace("name = \"extra\"", "name = \"web-tls\""),
                "twice",
            ),
        ] {
            let e = Settings::parse(&bad, Path::new("/")).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
