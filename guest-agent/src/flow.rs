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
use crate::config::Settings;
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
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("brokers", &self.settings.brokers)
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

fn tls_config(settings: &Settings) -> Result<rustls::ClientConfig, AgentError> {
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
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AgentError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth())
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
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(&settings)?)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            // Requests are small writes after the handshake: never held back by Nagle.
            .tcp_nodelay(true)
            .build()
            .map_err(|e| AgentError::Config(format!("HTTP client: {e}")))?;
        Ok(Agent {
            settings,
            http,
            source: source.into(),
            thim: tokio::sync::Mutex::new(None),
        })
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
    pub async fn attempt(&self, base: &str, names: &[String]) -> Result<Vec<Opened>, Failure> {
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
        let report_data = binding::report_data(&nonce, &bound);
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
        Ok(out)
    }

    /// Attests for `names`, retrying transient failures until `deadline`: on the next broker
    /// of the list (in a random order, so agents spread over the replicas) at once, and with
    /// backoff and jitter once every broker failed in turn.
    pub async fn fetch(
        &self,
        names: &[String],
        deadline: Instant,
    ) -> Result<Vec<Opened>, AgentError> {
        let brokers = shuffled(&self.settings.brokers);
        let mut delay = self.settings.retry_initial;
        let mut attempt = 1u32;
        loop {
            let base = &brokers[(attempt as usize - 1) % brokers.len()];
            // No attempt outlives the deadline (a broker that accepts and then stalls).
            let bounded = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                self.attempt(base, names),
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
