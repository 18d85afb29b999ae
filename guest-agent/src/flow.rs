//! The boot flow: challenge → ephemeral key → binding → evidence → attest → open, retried with
//! exponential backoff and jitter until a deadline. Refusals by verification or policy are
//! final.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attestation::binding;
use attestation::protocol::{AttestRequest, AttestResponse, ChallengeResponse, EphemeralKey};
use base64::Engine;
use zeroize::Zeroizing;

use crate::AgentError;
use crate::config::{CertificateSpec, Settings};
use crate::evidence::EvidenceSource;

/// Why one attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// Worth retrying (network, TLS transport, 5xx, 429), with the broker's Retry-After.
    Transient(String, Option<Duration>),
    /// Retrying cannot help: refused by verification or policy, wrong CA, tampered response.
    Final(String),
}

/// A released secret, opened.
pub struct Opened {
    /// Name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// The value; zeroized on drop.
    pub value: Zeroizing<Vec<u8>>,
}

/// A certificate the broker's CA issued for a key made here.
pub struct Certified {
    /// The `[[certificate]]` entry's file name.
    pub name: String,
    /// The key (PKCS#8 PEM); zeroized on drop.
    pub key_pem: Zeroizing<String>,
    /// The certificate, then the CA certificates below the root (PEM).
    pub certificate_pem: String,
    /// The CA certificates with the root (PEM).
    pub ca_pem: String,
    /// Its serial (hex).
    pub serial: String,
    /// The end of its validity (seconds since the epoch).
    pub not_after: i64,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("name", &self.name)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// What one attestation obtained.
#[derive(Debug, Default)]
pub struct Released {
    /// The secrets, in the order asked.
    pub secrets: Vec<Opened>,
    /// The certificates, in the order asked.
    pub certificates: Vec<Certified>,
}

/// A key made for a `[[certificate]]` entry and its signing request.
struct Pending {
    key: rcgen::KeyPair,
    spki: Vec<u8>,
    request: attestation::protocol::CertificateRequest,
}

fn certificate_request(spec: &CertificateSpec) -> Result<Pending, Failure> {
    use attestation::policy::RequestedName;
    use rcgen::{CertificateParams, DistinguishedName, DnType, PublicKeyData, SanType};
    let fail = |e: rcgen::Error| Failure::Final(format!("certificate {}: {e}", spec.name));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.name.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = spec
        .names
        .iter()
        .map(|n| -> Result<SanType, Failure> {
            Ok(match n {
                RequestedName::Dns(d) => SanType::DnsName(d.clone().try_into().map_err(fail)?),
                RequestedName::Ip(a) => SanType::IpAddress(*a),
                RequestedName::Uri(u) => SanType::URI(u.clone().try_into().map_err(fail)?),
            })
        })
        .collect::<Result<_, _>>()?;
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok(Pending {
        spki: key.subject_public_key_info(),
        request: attestation::protocol::CertificateRequest {
            profile: spec.profile.clone(),
            csr: attestation::protocol::encode_b64(csr.der()),
        },
        key,
    })
}

/// Checks an issued certificate is for `pending`'s key and assembles the files' contents.
fn certified(
    spec: &CertificateSpec,
    pending: &Pending,
    issued: &attestation::protocol::IssuedCertificate,
) -> Result<Certified, Failure> {
    use der::{Decode, Encode};
    let tampered = |what: &str| {
        Failure::Final(format!(
            "tampered response: certificate {}: {what}",
            spec.name
        ))
    };
    let der = attestation::certs::decode_pem_or_der(issued.certificate.as_bytes(), "certificate")
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| tampered("not a certificate"))?;
    let cert = x509_cert::Certificate::from_der(&der).map_err(|_| tampered("not a certificate"))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|_| tampered("not a certificate"))?;
    if spki != pending.spki {
        return Err(tampered("it is for another key"));
    }
    if issued.profile != spec.profile || issued.chain.is_empty() {
        return Err(tampered("another profile, or no chain"));
    }
    // The leaf and the CA certificates below the root (servers send these); the root only
    // in the CA file (peers trust it).
    let below_root = &issued.chain[..issued.chain.len() - 1];
    let mut certificate_pem = attestation::certs::to_pem(&der);
    for c in below_root {
        certificate_pem.push_str(c);
    }
    Ok(Certified {
        name: spec.name.clone(),
        key_pem: Zeroizing::new(pending.key.serialize_pem()),
        certificate_pem,
        ca_pem: issued.chain.concat(),
        serial: issued.serial.clone(),
        not_after: issued.not_after,
    })
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The protocol client.
pub struct Agent {
    settings: Settings,
    http: reqwest::Client,
    source: std::sync::Arc<dyn EvidenceSource>,
    thim: tokio::sync::Mutex<Option<Vec<attestation::protocol::CertificateEntry>>>,
    attested: Option<AttestedBrokers>,
    /// For OCSP responders (signed answers; the pinned CA and, if configured, system roots).
    ocsp_http: reqwest::Client,
}

/// `broker_attested_policy`: what each broker must prove, a client that only fetches its
/// evidence (and sees the server certificate of that connection), and the keys proven.
struct AttestedBrokers {
    policy: attestation::policy::Policy,
    anchors: attestation::TrustAnchors,
    probe: reqwest::Client,
    keys: Arc<ProvenKeys>,
    proven: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

/// The server certificate check of the protocol client under `broker_attested_policy`: the
/// pinned CA's, and a key some broker proved to be its own.
#[derive(Debug)]
struct ProvenKeys {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    spkis: std::sync::RwLock<Vec<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for ProvenKeys {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let spki = attestation::broker_evidence::spki_of(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let proven = self
            .spkis
            .read()
            .map_err(|_| rustls::Error::General("lock poisoned".into()))?;
        if !proven.iter().any(|p| p == &spki) {
            return Err(rustls::Error::General(
                "the server's key is not one a broker proved to be its own".into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("brokers", &self.settings.brokers)
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

fn roots(settings: &Settings) -> Result<rustls::RootCertStore, AgentError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &settings.broker_ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
            roots
                .add(c)
                .map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
        }
    }
    if settings.use_system_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if roots.is_empty() {
        return Err(AgentError::Config("no CA to trust for the broker".into()));
    }
    Ok(roots)
}

fn tls_config(settings: &Settings) -> Result<rustls::ClientConfig, AgentError> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AgentError::Config(e.to_string()))?
    .with_root_certificates(roots(settings)?)
    .with_no_client_auth())
}

/// The protocol client's TLS under `broker_attested_policy`: only proven keys.
fn proven_tls_config(
    settings: &Settings,
) -> Result<(rustls::ClientConfig, Arc<ProvenKeys>), AgentError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let keys = Arc::new(ProvenKeys {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(settings)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| AgentError::Config(format!("broker CA: {e}")))?,
        spkis: std::sync::RwLock::new(Vec::new()),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(keys.clone())
        .with_no_client_auth();
    Ok((config, keys))
}

fn client(tls: rustls::ClientConfig, tls_info: bool) -> Result<reqwest::Client, AgentError> {
    let builder = reqwest::Client::builder();
    // The evidence probe opens a fresh connection each time, so that the key it sees is the
    // one the broker serves (and binds) now, not a pooled connection's from before a reload.
    let builder = if tls_info {
        builder.pool_max_idle_per_host(0)
    } else {
        builder
    };
    builder
        .tls_backend_preconfigured(tls)
        .tls_info(tls_info)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        // Requests are small writes after the handshake: never held back by Nagle.
        .tcp_nodelay(true)
        .build()
        .map_err(|e| AgentError::Config(format!("HTTP client: {e}")))
}

fn read_text(path: &std::path::Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path)
        .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", path.display())))
}

impl AttestedBrokers {
    fn load(settings: &Settings) -> Result<Option<(AttestedBrokers, reqwest::Client)>, AgentError> {
        let Some(policy_path) = &settings.broker_attested_policy else {
            return Ok(None);
        };
        let policy = attestation::policy::Policy::from_json(&read_text(policy_path)?)
            .map_err(|e| AgentError::Config(format!("{}: {e}", policy_path.display())))?;
        #[cfg_attr(not(feature = "simulator"), allow(unused_mut))]
        let mut anchors =
            attestation::TrustAnchors::amd().map_err(|e| AgentError::Config(e.to_string()))?;
        #[cfg(feature = "simulator")]
        if let Some(root) = &settings.dangerous_broker_simulated_root {
            tracing::warn!(path = %root.display(), "DANGEROUS: trusting a SIMULATED root for the broker's evidence");
            let ark = attestation::certs::decode_pem_or_der(read_text(root)?.as_bytes(), "root")
                .map_err(|e| AgentError::Config(e.to_string()))?
                .into_iter()
                .next()
                .ok_or_else(|| AgentError::Config(format!("{}: no certificate", root.display())))?;
            anchors = anchors
                .dangerous_trust_simulated_root(&ark)
                .map_err(|e| AgentError::Config(e.to_string()))?;
        }
        let (tls, keys) = proven_tls_config(settings)?;
        let attested = AttestedBrokers {
            policy,
            anchors,
            probe: client(tls_config(settings)?, true)?,
            keys,
            proven: tokio::sync::Mutex::new(std::collections::HashSet::new()),
        };
        Ok(Some((attested, client(tls, false)?)))
    }

    /// Makes sure the broker at `base` proved itself (once per run, again after a failure).
    async fn ensure(&self, base: &str) -> Result<(), Failure> {
        let mut proven = self.proven.lock().await;
        if proven.contains(base) {
            return Ok(());
        }
        let mut nonce = [0u8; 32];
        aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| Failure::Final("no randomness".into()))?;
        let url = format!(
            "{base}{}?nonce={}",
            attestation::broker_evidence::PATH,
            hex::encode(nonce)
        );
        let resp = self
            .probe
            .get(&url)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let leaf = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Failure::Final("no server certificate on the connection".into()))?;
        if !resp.status().is_success() {
            return Err(problem(resp, "the broker's own evidence").await);
        }
        let evidence: attestation::broker_evidence::BrokerEvidence = resp
            .json()
            .await
            .map_err(|e| Failure::Final(format!("the broker's evidence is malformed: {e}")))?;
        let spki = attestation::broker_evidence::spki_of(&leaf)
            .map_err(|e| Failure::Final(e.to_string()))?;
        let claims = attestation::broker_evidence::verify(
            &evidence,
            &self.anchors,
            &self.policy,
            &spki,
            &nonce,
            std::time::SystemTime::now(),
        )
        .map_err(|e| Failure::Final(format!("the broker at {base} is not trusted: {e}")))?;
        if let Ok(mut keys) = self.keys.spkis.write()
            && !keys.contains(&spki)
        {
            keys.push(spki);
        }
        tracing::info!(broker = base, measurement = %claims.measurement, "the broker proved itself");
        proven.insert(base.to_string());
        Ok(())
    }

    async fn forget(&self, base: &str) {
        self.proven.lock().await.remove(base);
    }
}

/// Classifies a transport error: certificate problems are final, the rest transient.
fn transport(e: &reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        // rustls errors reach here wrapped in io::Error, whose source() skips the wrapped error.
        let tls = s.downcast_ref::<rustls::Error>().or_else(|| {
            s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(c)) = tls {
            return Failure::Final(format!(
                "the broker's TLS certificate is not trusted ({c:?}): it is not issued by the pinned broker CA"
            ));
        }
        source = s.source();
    }
    let mut text = e.to_string();
    let mut s = std::error::Error::source(e);
    while let Some(inner) = s {
        text.push_str(&format!(": {inner}"));
        s = inner.source();
    }
    // The connector may box the rustls error so that it cannot be downcast; its message is
    // rustls's own Display of InvalidCertificate.
    if text.contains("invalid peer certificate") {
        return Failure::Final(format!(
            "the broker's TLS certificate is not trusted: it is not issued by the pinned broker CA ({text})"
        ));
    }
    Failure::Transient(text, None)
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(300)))
}

async fn problem(resp: reqwest::Response, what: &str) -> Failure {
    let status = resp.status();
    let wait = retry_after(&resp);
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let detail = body["detail"].as_str().unwrap_or("").to_string();
    let check = body["check"]
        .as_str()
        .map(|c| format!(" [{c}]"))
        .unwrap_or_default();
    let text = format!("{what}: HTTP {} {detail}{check}", status.as_u16());
    if status.is_server_error() || status == 429 || status == 409 || status == 408 {
        Failure::Transient(text, wait)
    } else {
        Failure::Final(text)
    }
}

impl Agent {
    /// An agent for `settings` getting evidence from `source`.
    pub fn new(settings: Settings, source: Box<dyn EvidenceSource>) -> Result<Agent, AgentError> {
        let (attested, http, ocsp_http) = match AttestedBrokers::load(&settings)? {
            // The protocol client only accepts keys a broker proved: responders get the
            // pinned CA's client.
            Some((attested, http)) => {
                let ocsp_http = client(tls_config(&settings)?, false)?;
                (Some(attested), http, ocsp_http)
            }
            None => {
                let http = client(tls_config(&settings)?, false)?;
                (None, http.clone(), http)
            }
        };
        Ok(Agent {
            settings,
            http,
            source: source.into(),
            thim: tokio::sync::Mutex::new(None),
            attested,
            ocsp_http,
        })
    }

    /// Asks the OCSP responder at `url` about one certificate (POST of the DER request, RFC
    /// 6960 appendix A). The answer is checked by the caller: it is signed, so the transport
    /// only has to deliver it.
    pub async fn ocsp(&self, url: &str, request: Vec<u8>) -> Result<Vec<u8>, String> {
        let mut resp = self
            .ocsp_http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/ocsp-request")
            .body(request)
            .send()
            .await
            .map_err(|e| match transport(&e) {
                Failure::Transient(t, _) | Failure::Final(t) => format!("{url}: {t}"),
            })?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            let max = attestation::ocsp::status::MAX_RESPONSE_BYTES;
            if body.len() + chunk.len() > max {
                return Err(format!("{url}: response larger than {max} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The VCEK and chain from Azure's THIM endpoint, fetched once per run.
    async fn thim(
        &self,
        url: &str,
        hcl_report: &[u8],
    ) -> Vec<attestation::protocol::CertificateEntry> {
        let mut cached = self.thim.lock().await;
        if let Some(entries) = cached.as_ref() {
            return entries.clone();
        }
        let entries = crate::azure::thim_certificates(url, hcl_report).await;
        // A failure is not kept: the next attempt asks THIM again.
        if !entries.is_empty() {
            *cached = Some(entries.clone());
        }
        entries
    }

    /// The evidence source in use.
    pub fn source(&self) -> &dyn EvidenceSource {
        self.source.as_ref()
    }

    /// One attestation for `names` at the broker at `base` (challenge and attestation at the
    /// same one, though any replica serves either).
    pub async fn attempt(
        &self,
        base: &str,
        names: &[String],
        certificates: &[CertificateSpec],
    ) -> Result<Released, Failure> {
        let Some(attested) = &self.attested else {
            return self.attempt_inner(base, names, certificates).await;
        };
        attested.ensure(base).await?;
        let result = self.attempt_inner(base, names, certificates).await;
        if result.is_err() {
            // Its key may have changed: prove it again before the next attempt.
            attested.forget(base).await;
        }
        result
    }

    async fn attempt_inner(
        &self,
        base: &str,
        names: &[String],
        certificates: &[CertificateSpec],
    ) -> Result<Released, Failure> {
        let url = |p: &str| format!("{base}{p}");
        let resp = self
            .http
            .post(url("/v1/challenge"))
            .send()
            .await
            .map_err(|e| transport(&e))?;
        if !resp.status().is_success() {
            return Err(problem(resp, "challenge").await);
        }
        let challenge: ChallengeResponse = resp
            .json()
            .await
            .map_err(|e| Failure::Final(format!("malformed challenge from the broker: {e}")))?;
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&challenge.nonce)
            .map_err(|_| Failure::Final("malformed nonce from the broker".into()))?;

        let key = EphemeralKey::generate(self.settings.kem);
        let public = key.public_key();
        let bound = public
            .binding_bytes()
            .map_err(|e| Failure::Final(e.to_string()))?;
        // A fresh key per certificate and attempt, made here and never sent.
        let pending = certificates
            .iter()
            .map(certificate_request)
            .collect::<Result<Vec<_>, _>>()?;
        let report_data = if pending.is_empty() {
            binding::report_data(&nonce, &bound)
        } else {
            let spkis: Vec<&[u8]> = pending.iter().map(|p| p.spki.as_slice()).collect();
            binding::report_data_v2(&nonce, &bound, &spkis)
        };
        // Platform calls block (ioctl, configfs, TPM commands and the wait for Azure's
        // paravisor): run them off the runtime's thread.
        let source = self.source.clone();
        let name = source.name();
        let mut evidence = tokio::task::spawn_blocking(move || source.report(report_data))
            .await
            .map_err(|e| Failure::Final(format!("evidence ({name}): {e}")))?
            .map_err(|e| Failure::Transient(format!("evidence ({name}): {e}"), None))?;
        if evidence.quote.is_some()
            && evidence.certificates.is_empty()
            && let Some(url) = &self.settings.azure.thim_url
        {
            evidence.certificates = self.thim(url, &evidence.report).await;
        }

        let request = AttestRequest {
            nonce: challenge.nonce,
            evidence: evidence.into_wire(),
            public_key: public,
            secrets: names.to_vec(),
            certificates: pending.iter().map(|p| p.request.clone()).collect(),
        };
        let resp = self
            .http
            .post(url("/v1/attest"))
            .json(&request)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        if !resp.status().is_success() {
            return Err(problem(resp, "attest").await);
        }
        let body: AttestResponse = resp
            .json()
            .await
            .map_err(|e| Failure::Final(format!("malformed response from the broker: {e}")))?;
        if body.secrets.len() != names.len() {
            return Err(Failure::Final(format!(
                "tampered response: asked for {} secrets, got {}",
                names.len(),
                body.secrets.len()
            )));
        }
        let mut out = Vec::new();
        for (want, sealed) in names.iter().zip(&body.secrets) {
            if &sealed.name != want {
                return Err(Failure::Final(format!(
                    "tampered response: expected {want}, got {}",
                    sealed.name
                )));
            }
            let value = key.open(sealed).map_err(|e| {
                Failure::Final(format!(
                    "tampered response: {} does not open: {e}",
                    sealed.name
                ))
            })?;
            out.push(Opened {
                name: sealed.name.clone(),
                version: sealed.version,
                value,
            });
        }
        if body.certificates.len() != pending.len() {
            return Err(Failure::Final(format!(
                "tampered response: asked for {} certificates, got {}",
                pending.len(),
                body.certificates.len()
            )));
        }
        let certified = certificates
            .iter()
            .zip(&pending)
            .zip(&body.certificates)
            .map(|((spec, p), issued)| certified(spec, p, issued))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Released {
            secrets: out,
            certificates: certified,
        })
    }

    /// Attests for `names`, retrying transient failures until `deadline`: on the next broker
    /// of the list (in a random order, so agents spread over the replicas) at once, and with
    /// backoff and jitter once every broker failed in turn.
    pub async fn fetch(
        &self,
        names: &[String],
        certificates: &[CertificateSpec],
        deadline: Instant,
    ) -> Result<Released, AgentError> {
        let brokers = shuffled(&self.settings.brokers);
        let mut delay = self.settings.retry_initial;
        let mut attempt = 1u32;
        loop {
            let base = &brokers[(attempt as usize - 1) % brokers.len()];
            // No attempt outlives the deadline (a broker that accepts and then stalls).
            let bounded = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                self.attempt(base, names, certificates),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Transient(
                    format!("{base}: no answer before the deadline"),
                    None,
                ))
            });
            if Instant::now() >= deadline
                && let Err(Failure::Transient(reason, _)) = &bounded
            {
                return Err(AgentError::Deadline(format!(
                    "gave up after {attempt} attempts: {reason}"
                )));
            }
            match bounded {
                Ok(opened) => return Ok(opened),
                Err(Failure::Final(reason)) => return Err(AgentError::Refused(reason)),
                Err(Failure::Transient(reason, _))
                    if !(attempt as usize).is_multiple_of(brokers.len()) =>
                {
                    // More brokers to try in this round: the next one now.
                    tracing::warn!(attempt, broker = %base, "attempt failed, trying the next broker: {reason}");
                    if Instant::now() >= deadline {
                        return Err(AgentError::Deadline(format!(
                            "gave up after {attempt} attempts: {reason}"
                        )));
                    }
                    attempt += 1;
                }
                Err(Failure::Transient(reason, wait)) => {
                    let jittered = jitter(delay);
                    let sleep = wait.map_or(jittered, |w| w.max(jittered));
                    if Instant::now() + sleep >= deadline {
                        return Err(AgentError::Deadline(format!(
                            "gave up after {attempt} attempts: {reason}"
                        )));
                    }
                    tracing::warn!(
                        attempt,
                        retry_in_ms = sleep.as_millis() as u64,
                        "attempt failed, retrying: {reason}"
                    );
                    tokio::time::sleep(sleep).await;
                    delay = (delay * 2).min(self.settings.retry_max);
                    attempt += 1;
                }
            }
        }
    }
}

/// `list` in a random order.
fn shuffled(list: &[String]) -> Vec<String> {
    let mut out = list.to_vec();
    for i in (1..out.len()).rev() {
        let mut b = [0u8; 4];
        let _ = aws_lc_rs::rand::fill(&mut b);
        let j = usize::try_from(u32::from_le_bytes(b)).unwrap_or(0) % (i + 1);
        out.swap(i, j);
    }
    out
}

/// 50–100 % of `d`, so agents restarted together do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let frac = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(frac)
}
