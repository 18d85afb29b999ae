//! TLS: the server configuration (rustls, aws-lc), operator client certificates, reloading
//! certificate, key and OCSP response when their files change, and the stapled OCSP response
//! (swapped by [`super::stapler`]).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::Error;
use crate::config::TlsSettings;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The URI SAN namespace that marks a certificate as an operator certificate: an operator
/// certificate carries exactly one `urn:snp-key-broker:operator:<name>` URI SAN, and `<name>`
/// is the operator's identity in the audit log.
pub const OPERATOR_SAN_PREFIX: &str = "urn:snp-key-broker:operator:";

/// id-kp-clientAuth (RFC 5280).
const ID_KP_CLIENT_AUTH: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// Why a client certificate is not an operator credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorDenied {
    /// No client certificate was presented.
    #[error("no client certificate")]
    NoCertificate,
    /// The chain does not verify against the operator CA (or has expired).
    #[error("not issued by the operator CA: {0}")]
    Untrusted(String),
    /// The leaf has no extended key usage extension, or one without clientAuth.
    #[error("no clientAuth extended key usage")]
    NoClientAuth,
    /// The leaf has no `urn:snp-key-broker:operator:<name>` URI SAN (or several).
    #[error("no operator name (a single URI SAN {OPERATOR_SAN_PREFIX}<name>)")]
    NotOperator,
    /// The operator name is not in the configured allow-list.
    #[error("operator {0:?} is not in tls.operator_names")]
    NotAllowed(String),
    /// The certificate does not parse.
    #[error("unparseable certificate")]
    Unparseable,
}

impl OperatorDenied {
    /// A stable identifier for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorDenied::NoCertificate => "no client certificate",
            OperatorDenied::Untrusted(_) => "untrusted certificate",
            OperatorDenied::NoClientAuth => "no clientAuth",
            OperatorDenied::NotOperator => "not an operator certificate",
            OperatorDenied::NotAllowed(_) => "operator not allowed",
            OperatorDenied::Unparseable => "unparseable certificate",
        }
    }
}

/// Checks operator client certificates: the chain must verify against the operator CA, and
/// the leaf must be explicitly an operator certificate: the clientAuth extended key usage
/// *and* one URI SAN `urn:snp-key-broker:operator:<name>` (and `<name>` in
/// `tls.operator_names` when that list is set). A certificate without an extended key usage
/// extension, which X.509 treats as good for any purpose, is not an operator certificate.
///
/// During the handshake a client certificate is optional and, when presented, only its proof
/// of possession is checked; the chain is checked by the admin API's authorization extractor.
/// That way a refused certificate gets an HTTP 403 and an audit record instead of a bare TLS
/// alert. Guest routes never look at it.
#[derive(Debug)]
pub struct OperatorVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    names: Option<Vec<String>>,
}

impl OperatorVerifier {
    /// Loads the operator CA (PEM, one or more certificates); `names` is the optional
    /// allow-list of operator names.
    pub fn load(ca: &Path, names: Option<Vec<String>>) -> Result<OperatorVerifier, Error> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
        }
        if roots.is_empty() {
            return Err(Error::Config(format!(
                "{}: no CA certificate",
                ca.display()
            )));
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Error::Config(format!("operator CA: {e}")))?;
        Ok(OperatorVerifier { inner, names })
    }

    /// Authorizes a presented chain (leaf first) at `now`: the operator's name, or why the
    /// chain is not an operator credential.
    pub fn authorize(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<String, OperatorDenied> {
        let (leaf, intermediates) = chain.split_first().ok_or(OperatorDenied::NoCertificate)?;
        let unix = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.inner
            .verify_client_cert(leaf, intermediates, unix)
            .map_err(|e| OperatorDenied::Untrusted(e.to_string()))?;
        let name = operator_name(leaf)?;
        if let Some(allowed) = &self.names
            && !allowed.contains(&name)
        {
            return Err(OperatorDenied::NotAllowed(name));
        }
        Ok(name)
    }

    /// Whether a certificate chain (leaf first, e.g. a server certificate or a workload's
    /// certificate the broker releases) is or could become an operator credential: accepted
    /// now, or a leaf marked as an operator certificate whatever its issuer and validity (a
    /// guest that receives it could add the intermediate that chains it to the operator CA,
    /// or wait until it is valid).
    pub fn accepts(&self, chain: &[CertificateDer<'_>], now: SystemTime) -> bool {
        self.authorize(chain, now).is_ok()
            || chain
                .first()
                .is_some_and(|leaf| operator_name(leaf).is_ok())
    }
}

/// The operator name of a leaf certificate that has the clientAuth extended key usage and
/// exactly one `urn:snp-key-broker:operator:<name>` URI SAN.
pub fn operator_name(leaf: &CertificateDer<'_>) -> Result<String, OperatorDenied> {
    use der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
    let cert =
        x509_cert::Certificate::from_der(leaf.as_ref()).map_err(|_| OperatorDenied::Unparseable)?;
    let tbs = cert.tbs_certificate();
    let eku = tbs
        .get_extension::<ExtendedKeyUsage>()
        .map_err(|_| OperatorDenied::Unparseable)?;
    if !eku.is_some_and(|(_, eku)| eku.0.contains(&ID_KP_CLIENT_AUTH)) {
        return Err(OperatorDenied::NoClientAuth);
    }
    let san = tbs
        .get_extension::<SubjectAltName>()
        .map_err(|_| OperatorDenied::Unparseable)?;
    let mut names = san
        .map(|(_, san)| san.0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(uri) => uri
                .as_str()
                .strip_prefix(OPERATOR_SAN_PREFIX)
                .map(str::to_string),
            _ => None,
        });
    match (names.next(), names.next()) {
        (Some(name), None) if valid_operator_name(&name) => Ok(name),
        _ => Err(OperatorDenied::NotOperator),
    }
}

/// Operator names: 1 to 64 letters, digits, '.', '_', '-', '@'.
pub fn valid_operator_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

#[derive(Debug)]
struct HandshakeVerifier(Arc<OperatorVerifier>);

impl ClientCertVerifier for HandshakeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Checked per request by the admin API (see OperatorVerifier).
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.inner.supported_verify_schemes()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The server certificate and key every handshake gets, with the OCSP response stapled now:
/// the response is swapped (by the stapler) without rebuilding the configuration, so
/// sessions and tickets survive a refresh and a handshake never waits for one.
#[derive(Debug)]
pub struct Stapled {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Stapled {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key.read().ok().map(|k| k.clone())
    }
}

/// What connections are served with now, swapped as one when the files change.
#[derive(Debug, Clone)]
struct Current {
    config: Arc<ServerConfig>,
    /// The certificate chain (leaf first), as in the certificate file.
    chain: Vec<CertificateDer<'static>>,
    stapled: Arc<Stapled>,
}

/// The live server configuration, swapped when the certificate files change.
#[derive(Debug)]
pub struct TlsState {
    settings: TlsSettings,
    operator: Arc<OperatorVerifier>,
    current: RwLock<Current>,
    stamps: RwLock<Vec<Option<(SystemTime, u64)>>>,
    /// Signalled when a new certificate was loaded (the stapler starts over for it).
    reloaded: tokio::sync::Notify,
}

impl TlsState {
    /// Loads certificate, key, OCSP response and operator CA.
    pub fn load(settings: &TlsSettings) -> Result<TlsState, Error> {
        let operator = Arc::new(OperatorVerifier::load(
            &settings.operator_ca,
            settings.operator_names.clone(),
        )?);
        let current = build(settings, operator.clone())?;
        Ok(TlsState {
            settings: settings.clone(),
            operator,
            current: RwLock::new(current),
            stamps: RwLock::new(stamps(settings)),
            reloaded: tokio::sync::Notify::new(),
        })
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current.read().ok().map(|c| c.config.clone())
    }

    /// The server certificate connections are served with now.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.chain.first().cloned())
    }

    /// The server certificate chain (leaf first), as in the certificate file.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .read()
            .map(|c| c.chain.clone())
            .unwrap_or_default()
    }

    /// Whether the broker fetches the OCSP response to staple itself (`tls.staple_ocsp`, and
    /// no `tls.ocsp` file).
    pub fn staples_itself(&self) -> bool {
        self.settings.staple_ocsp
    }

    /// Staples `response` (or nothing) from the next handshake on, if `leaf` is still the
    /// certificate served; returns whether it was.
    pub fn set_staple(&self, leaf: &CertificateDer<'_>, response: Option<Vec<u8>>) -> bool {
        let Ok(current) = self.current.read() else {
            return false;
        };
        if current.chain.first().map(|c| c.as_ref()) != Some(leaf.as_ref()) {
            return false;
        }
        let Ok(mut key) = current.stapled.key.write() else {
            return false;
        };
        let mut next = CertifiedKey::clone(&key);
        next.ocsp = response;
        *key = Arc::new(next);
        true
    }

    /// Waits until a new certificate is loaded (a notification sent while nobody waited is
    /// kept for the next wait).
    pub async fn reloaded(&self) {
        self.reloaded.notified().await;
    }

    /// The operator CA verifier.
    pub fn operator(&self) -> Arc<OperatorVerifier> {
        self.operator.clone()
    }

    /// Reloads when a file changed. Returns whether it did; on error the old configuration
    /// stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, Error> {
        let now = stamps(&self.settings);
        let changed = self.stamps.read().map(|s| *s != now).unwrap_or(false);
        if !changed {
            return Ok(false);
        }
        let next = build(&self.settings, self.operator.clone())?;
        if let Ok(mut c) = self.current.write() {
            // The same certificate again (a touched file, a new key file with the same
            // certificate, …): the fetched OCSP response still speaks for it.
            if self.settings.staple_ocsp
                && c.chain.first() == next.chain.first()
                && let (Ok(old), Ok(mut new)) = (c.stapled.key.read(), next.stapled.key.write())
                && old.ocsp.is_some()
            {
                let mut carried = CertifiedKey::clone(&new);
                carried.ocsp = old.ocsp.clone();
                *new = Arc::new(carried);
            }
            *c = next;
        }
        if let Ok(mut s) = self.stamps.write() {
            *s = now;
        }
        self.reloaded.notify_one();
        Ok(true)
    }
}

fn stamps(s: &TlsSettings) -> Vec<Option<(SystemTime, u64)>> {
    let mut v = vec![stamp(&s.cert), stamp(&s.key)];
    if let Some(o) = &s.ocsp {
        v.push(stamp(o));
    }
    v
}

fn build(settings: &TlsSettings, operator: Arc<OperatorVerifier>) -> Result<Current, Error> {
    let cfg = |p: &Path, e: &dyn std::fmt::Display| Error::Config(format!("{}: {e}", p.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&settings.cert)
        .map_err(|e| cfg(&settings.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| cfg(&settings.cert, &e))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{}: no certificate",
            settings.cert.display()
        )));
    }
    if operator.accepts(&certs, SystemTime::now()) {
        return Err(Error::Config(format!(
            "{}: the server certificate would be accepted as an operator certificate \
             (issued by the operator CA, with clientAuth and an operator URI SAN); \
             issue server certificates from another CA or without those",
            settings.cert.display()
        )));
    }
    crate::keys::check_private_file(&settings.key)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| cfg(&settings.key, &e))?;
    let ocsp = match &settings.ocsp {
        // An empty file staples nothing (an empty CertificateStatus would break clients).
        Some(p) => Some(std::fs::read(p).map_err(|e| cfg(p, &e))?).filter(|r| !r.is_empty()),
        None => None,
    };
    let provider = provider();
    let mut certified = CertifiedKey::from_der(certs.clone(), key, &provider)
        .map_err(|e| Error::Config(format!("TLS certificate and key: {e}")))?;
    certified.ocsp = ocsp;
    let stapled = Arc::new(Stapled {
        key: RwLock::new(Arc::new(certified)),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_client_cert_verifier(Arc::new(HandshakeVerifier(operator)))
        .with_cert_resolver(stapled.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // TLS 1.3 resumption: stateless tickets (and the default in-memory session cache).
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::Config(format!("TLS tickets: {e}")))?;
    Ok(Current {
        config: Arc::new(config),
        chain: certs,
        stapled,
    })
}

/// The SHA-256 fingerprint of a DER certificate (hex), for audit records.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert.as_ref(),
    ))
}

/// The subject of a DER certificate, for audit records.
pub fn subject(cert: &CertificateDer<'_>) -> String {
    use der::Decode;
    x509_cert::Certificate::from_der(cert.as_ref())
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_else(|_| "unparseable certificate".into())
}
