//! The guest agent: runs inside an AMD SEV-SNP confidential VM at boot, attests to the key
//! broker and writes the released secrets to a RAM-only directory before the workload starts.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::time::Instant;

pub mod azure;
pub mod config;
pub mod evidence;
pub mod flow;
pub mod renew;
pub mod sink;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// No evidence could be obtained from the platform.
    #[error("evidence: {0}")]
    Evidence(String),
    /// The broker refused, or its answer cannot be trusted. Final.
    #[error("refused: {0}")]
    Refused(String),
    /// Transient failures until the deadline.
    #[error("deadline reached: {0}")]
    Deadline(String),
    /// A secret could not be written.
    #[error("write: {0}")]
    Write(String),
    /// `renew`: a certificate due was not renewed, an OCSP response could not be kept
    /// current, or a reload command failed (everything else was still done).
    #[error("renew: {0}")]
    Renew(String),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Secrets written (or, for `check`, that would be written): name, version, path, bytes.
    pub written: Vec<(String, u64, std::path::PathBuf, usize)>,
    /// Optional secrets not obtained, with the reason.
    pub missing_optional: Vec<(String, String)>,
    /// Certificates written (or that would be): name, serial, not-after, certificate path.
    pub certificates: Vec<(String, String, i64, std::path::PathBuf)>,
    /// What became of each written certificate's OCSP response (a failure is a warning at
    /// boot: the certificate works without it).
    pub staples: Vec<String>,
}

/// Fetches every configured secret and certificate and, when `write` is set, writes them.
/// Required secrets and every certificate are obtained in one attestation (all or none); each
/// optional secret in its own, so a refusal of one is only a warning.
pub async fn run(
    settings: &config::Settings,
    agent: &flow::Agent,
    write: bool,
) -> Result<Summary, AgentError> {
    let deadline = Instant::now() + settings.deadline;
    let required: Vec<String> = settings
        .secrets
        .iter()
        .filter(|s| s.required)
        .map(|s| s.name.clone())
        .collect();
    let mut summary = Summary::default();
    let released = agent
        .fetch(&required, &settings.certificates, deadline)
        .await?;
    let mut opened = released.secrets;
    for spec in settings.secrets.iter().filter(|s| !s.required) {
        match agent
            .fetch(std::slice::from_ref(&spec.name), &[], deadline)
            .await
        {
            Ok(mut o) => opened.append(&mut o.secrets),
            Err(e) => {
                tracing::warn!(secret = %spec.name, "optional secret not obtained: {e}");
                summary
                    .missing_optional
                    .push((spec.name.clone(), e.to_string()));
            }
        }
    }
    for o in &opened {
        let Some(spec) = settings.secrets.iter().find(|s| s.name == o.name) else {
            continue;
        };
        if write {
            sink::write_secret(spec, &o.value)?;
            tracing::info!(secret = %o.name, version = o.version, path = %spec.path.display(), "secret written");
        }
        summary
            .written
            .push((o.name.clone(), o.version, spec.path.clone(), o.value.len()));
    }
    for c in &released.certificates {
        let Some(spec) = settings.certificates.iter().find(|s| s.name == c.name) else {
            continue;
        };
        if write {
            sink::write_certificate(spec, c.key_pem.as_bytes(), &c.certificate_pem, &c.ca_pem)?;
            tracing::info!(certificate = %c.name, serial = %c.serial, path = %spec.cert_path().display(), "certificate written");
        }
        summary.certificates.push((
            c.name.clone(),
            c.serial.clone(),
            c.not_after,
            spec.cert_path(),
        ));
        if write {
            let staple = renew::staple_installed(agent, spec, true).await;
            if let Err(e) = &staple {
                tracing::warn!(certificate = %c.name, "{e}");
            }
            summary
                .staples
                .extend(renew::describe_staple(&c.name, &staple));
        }
    }
    Ok(summary)
}
