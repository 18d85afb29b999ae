//! TLS: the server configuration (rustls, aws-lc), operator client certificates, and reloading
//! certificate, key and OCSP response when their files change.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::Error;
use crate::config::TlsSettings;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks operator client certificates against the operator CA.
///
/// During the handshake a client certificate is optional and, when presented, only its proof
/// of possession is checked; the chain is checked against the operator CA by the admin API's
/// authorization extractor. That way a certificate from another CA is refused with an HTTP 403
/// and an audit record instead of a bare TLS alert. Guest routes never look at it.
#[derive(Debug)]
pub struct OperatorVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl OperatorVerifier {
    /// Loads the operator CA (PEM, one or more certificates).
    pub fn load(ca: &Path) -> Result<OperatorVerifier, Error> {
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
        Ok(OperatorVerifier { inner })
    }

    /// Verifies a presented chain (leaf first) against the operator CA at `now`.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<(), String> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.inner
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
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

/// The live server configuration, swapped when the certificate files change.
#[derive(Debug)]
pub struct TlsState {
    settings: TlsSettings,
    operator: Arc<OperatorVerifier>,
    current: RwLock<Arc<ServerConfig>>,
    stamps: RwLock<Vec<Option<(SystemTime, u64)>>>,
}

impl TlsState {
    /// Loads certificate, key, OCSP response and operator CA.
    pub fn load(settings: &TlsSettings) -> Result<TlsState, Error> {
        let operator = Arc::new(OperatorVerifier::load(&settings.operator_ca)?);
        let config = build(settings, operator.clone())?;
        Ok(TlsState {
            settings: settings.clone(),
            operator,
            current: RwLock::new(config),
            stamps: RwLock::new(stamps(settings)),
        })
    }

    /// The configuration for the next connection.
    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.current.read().ok().map(|c| c.clone())
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
        let config = build(&self.settings, self.operator.clone())?;
        if let Ok(mut c) = self.current.write() {
            *c = config;
        }
        if let Ok(mut s) = self.stamps.write() {
            *s = now;
        }
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

fn build(
    settings: &TlsSettings,
    operator: Arc<OperatorVerifier>,
) -> Result<Arc<ServerConfig>, Error> {
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
    crate::keys::check_private_file(&settings.key)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| cfg(&settings.key, &e))?;
    let ocsp = match &settings.ocsp {
        Some(p) => std::fs::read(p).map_err(|e| cfg(p, &e))?,
        None => Vec::new(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_client_cert_verifier(Arc::new(HandshakeVerifier(operator)))
        .with_single_cert_with_ocsp(certs, key, ocsp)
        .map_err(|e| Error::Config(format!("TLS certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // TLS 1.3 resumption: stateless tickets (and the default in-memory session cache).
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::Config(format!("TLS tickets: {e}")))?;
    Ok(Arc::new(config))
}

/// The subject of a DER certificate, for audit records.
pub fn subject(cert: &CertificateDer<'_>) -> String {
    use der::Decode;
    x509_cert::Certificate::from_der(cert.as_ref())
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_else(|_| "unparseable certificate".into())
}
