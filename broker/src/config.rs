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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    operator_ca: PathBuf,
    ocsp: Option<PathBuf>,
    #[serde(default = "default_reload")]
    reload_interval_secs: u64,
}

fn default_reload() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasterKey {
    file: Option<PathBuf>,
    env: Option<String>,
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
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    max_inflight_attestations: Option<usize>,
}

/// Where the master key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file holding 64 hex digits; its mode must be 0600 or stricter.
    File(PathBuf),
    /// An environment variable holding 64 hex digits.
    Env(String),
}

/// Where the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSettings {
    /// An SQLite database file (created if missing, WAL journal).
    Sqlite(PathBuf),
}

/// TLS material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that issues operator client certificates for the admin API.
    pub operator_ca: PathBuf,
    /// Optional DER OCSP response to staple.
    pub ocsp: Option<PathBuf>,
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
    /// Time allowed to receive request headers.
    pub header_timeout: Duration,
    /// Idle time after which a connection is closed.
    pub idle_timeout: Duration,
    /// Time allowed for one request.
    pub request_timeout: Duration,
    /// Attestations processed at once; more are answered 429 with Retry-After.
    pub max_inflight_attestations: usize,
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
    /// Lifetime of challenge nonces.
    pub nonce_ttl: Duration,
    /// A simulated ARK to trust (tests and demos only).
    pub dangerous_trust_simulated_root: Option<PathBuf>,
    /// KDS.
    pub kds: KdsSettings,
    /// Limits.
    pub limits: Limits,
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
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| format!("listen: {:?} is not an address:port", raw.listen))?;
        let store = match raw.store.sqlite {
            Some(p) => StoreSettings::Sqlite(resolve(base, p)),
            None => return Err("store: set sqlite = \"PATH\"".into()),
        };
        let master_key = match (raw.master_key.file, raw.master_key.env) {
            (Some(f), None) => MasterKeySource::File(resolve(base, f)),
            (None, Some(e)) => MasterKeySource::Env(e),
            _ => return Err("master_key: set exactly one of file or env".into()),
        };
        let nonce_ttl = raw.attestation.nonce_ttl_secs.unwrap_or(60);
        if !(5..=3600).contains(&nonce_ttl) {
            return Err("attestation.nonce_ttl_secs: must be between 5 and 3600".into());
        }
        let base_url = raw
            .kds
            .base_url
            .unwrap_or_else(|| "https://kdsintf.amd.com".to_string());
        if !(base_url.starts_with("https://")
            || base_url.starts_with("http://127.")
            || base_url.starts_with("http://localhost")
            || base_url.starts_with("http://[::1]"))
        {
            return Err("kds.base_url: must be https (plain http only on loopback)".into());
        }
        let l = raw.limits;
        let limits = Limits {
            body_bytes: l.body_bytes.unwrap_or(64 * 1024),
            max_connections: l.max_connections.unwrap_or(1024),
            header_timeout: Duration::from_secs(l.header_timeout_secs.unwrap_or(10)),
            idle_timeout: Duration::from_secs(l.idle_timeout_secs.unwrap_or(60)),
            request_timeout: Duration::from_secs(l.request_timeout_secs.unwrap_or(30)),
            max_inflight_attestations: l.max_inflight_attestations.unwrap_or(256).max(1),
        };
        if limits.body_bytes < 4096 || limits.max_connections == 0 {
            return Err(
                "limits: body_bytes must be at least 4096 and max_connections above 0".into(),
            );
        }
        Ok(Settings {
            listen,
            tls: TlsSettings {
                cert: resolve(base, raw.tls.cert),
                key: resolve(base, raw.tls.key),
                operator_ca: resolve(base, raw.tls.operator_ca),
                ocsp: raw.tls.ocsp.map(|p| resolve(base, p)),
                reload_interval: Duration::from_secs(raw.tls.reload_interval_secs.max(1)),
            },
            store,
            master_key,
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
        })
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
    fn refuses_unknown_keys_and_bad_values() {
        let typo = GOOD.replace("[store]", "[store]\nsqlit = \"x\"");
        assert!(
            Settings::parse(&typo, Path::new("/"))
                .unwrap_err()
                .contains("unknown field")
        );
        let both = GOOD.replace("file = \"master.key\"", "file = \"m\"\nenv = \"E\"");
        assert!(Settings::parse(&both, Path::new("/")).is_err());
        let http = format!("{GOOD}\n[kds]\nbase_url = \"http://kds.example\"\n");
        assert!(Settings::parse(&http, Path::new("/")).is_err());
        let listen = GOOD.replace("127.0.0.1:8443", "localhost");
        assert!(Settings::parse(&listen, Path::new("/")).is_err());
    }
}
