//! Keeping the certificates from the broker's CA current (`guest-agent renew`, run by
//! `guest-agent-renew.timer`): each certificate is renewed, with fresh evidence, once two
//! thirds of its lifetime have passed (up to a tenth of the lifetime earlier, a spread fixed
//! per certificate so a fleet does not renew at once), when it is missing, unusable, expired
//! or revoked. Its OCSP response is fetched on every run and kept beside it for servers to
//! staple; a response is only ever kept while it is current and says `good`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::ocsp::status::{self, CertificateStatus, Checked, Subject};
use der::{Decode, Encode};

use crate::AgentError;
use crate::config::{CertificateSpec, Settings};
use crate::flow::Agent;
use crate::sink;

/// How long a reload command may run.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// A certificate an earlier run installed.
#[derive(Debug)]
pub struct Installed {
    der: Vec<u8>,
    /// Its serial (hex).
    pub serial: String,
    /// The start of its validity (seconds since the epoch).
    pub not_before: u64,
    /// The end of its validity.
    pub not_after: u64,
    /// The certificate with its issuer, for OCSP; `None` when the issuer is not in the files.
    subject: Option<Subject>,
}

/// Why a certificate is renewed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No certificate yet.
    Missing,
    /// The files are there but not usable (unreadable, or the key does not match).
    Unusable(String),
    /// Past its not-after.
    Expired,
    /// Two thirds of its lifetime (less the spread) have passed.
    Scheduled,
    /// Its OCSP responder says it is revoked.
    Revoked,
    /// `--force`.
    Forced,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Missing => f.write_str("missing"),
            Reason::Unusable(why) => write!(f, "unusable: {why}"),
            Reason::Expired => f.write_str("expired"),
            Reason::Scheduled => f.write_str("two thirds of its lifetime passed"),
            Reason::Revoked => f.write_str("revoked"),
            Reason::Forced => f.write_str("forced"),
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    attestation::error::rfc3339(&secs)
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two thirds of
/// its lifetime, earlier by a spread of up to a tenth of it derived from its serial.
pub fn renew_at(not_before: u64, not_after: u64, serial: &str) -> u64 {
    let lifetime = not_after.saturating_sub(not_before);
    let spread = lifetime / 10;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, serial.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    let jitter = u64::from_be_bytes(first).checked_rem(spread).unwrap_or(0);
    (not_before + lifetime / 3 * 2).saturating_sub(jitter)
}

fn pem_certificates(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    attestation::certs::decode_pem_or_der(&text, "certificate")
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the certificate `spec` names, if an earlier run wrote it: `Ok(None)` when it is
/// not there, an error when it is there but unusable (unparseable, or not for the key beside
/// it).
pub fn installed(spec: &CertificateSpec) -> Result<Option<Installed>, String> {
    let cert_path = spec.cert_path();
    if !cert_path.exists() {
        return Ok(None);
    }
    let chain = pem_certificates(&cert_path)?;
    let der = chain
        .first()
        .cloned()
        .ok_or_else(|| format!("{}: no certificate", cert_path.display()))?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let tbs = cert.tbs_certificate();
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(spec.key_path())
            .map_err(|e| format!("{}: {e}", spec.key_path().display()))?,
    );
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .map_err(|e| format!("{}: {e}", spec.key_path().display()))?;
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| e.to_string())?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != spki {
        return Err("the key file is not the certificate's key".into());
    }
    let validity = tbs.validity();
    let mut candidates: Vec<Vec<u8>> = chain[1..].to_vec();
    if let Ok(ca) = pem_certificates(&spec.ca_path()) {
        candidates.extend(ca);
    }
    let subject = status::find_issuer(&der, &candidates).and_then(|i| Subject::new(&der, i).ok());
    Ok(Some(Installed {
        serial: hex::encode(tbs.serial_number().as_bytes()),
        not_before: validity.not_before.to_unix_duration().as_secs(),
        not_after: validity.not_after.to_unix_duration().as_secs(),
        der,
        subject,
    }))
}

/// Whether `installed` must be renewed at `now` (before looking at its OCSP status).
pub fn due(installed: &Installed, now: SystemTime, force: bool) -> Option<Reason> {
    let now = unix(now);
    if force {
        Some(Reason::Forced)
    } else if now >= installed.not_after {
        Some(Reason::Expired)
    } else if now >= renew_at(installed.not_before, installed.not_after, &installed.serial) {
        Some(Reason::Scheduled)
    } else {
        None
    }
}

/// What became of a certificate's OCSP response.
#[derive(Debug, PartialEq, Eq)]
pub enum Staple {
    /// `ocsp = false`.
    Disabled,
    /// The certificate names no OCSP responder.
    NoResponder,
    /// The response on disk is current and good, and not yet half way through its validity.
    Kept(Checked),
    /// A fresh good response was written.
    Written(Checked),
    /// The responder says the certificate is revoked: no response is kept.
    Revoked(Checked),
}

fn current_on_disk(spec: &CertificateSpec, subject: &Subject, now: SystemTime) -> Option<Checked> {
    let der = std::fs::read(spec.ocsp_path()).ok()?;
    subject
        .check(&der, now)
        .ok()
        .filter(|c| c.status == CertificateStatus::Good)
}

fn remove_staple(spec: &CertificateSpec) {
    match std::fs::remove_file(spec.ocsp_path()) {
        Ok(()) => {
            tracing::warn!(certificate = %spec.name, path = %spec.ocsp_path().display(), "OCSP response removed: it is no longer current and good");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(certificate = %spec.name, "cannot remove the OCSP response: {e}");
        }
    }
}

/// Fetches `installed`'s OCSP response and keeps it beside the certificate when it is good:
/// written when there is no current good one on disk or the one there is half way through
/// its validity. A revoked or unknown answer, or a failure with nothing current on disk,
/// removes the file: a server staples nothing rather than something stale or bad.
pub async fn staple(
    agent: &Agent,
    spec: &CertificateSpec,
    installed: &Installed,
    now: SystemTime,
    write: bool,
) -> Result<Staple, String> {
    if !spec.ocsp {
        return Ok(Staple::Disabled);
    }
    let Some(url) = status::responder_url(&installed.der).map_err(|e| e.to_string())? else {
        return Ok(Staple::NoResponder);
    };
    let subject = installed
        .subject
        .as_ref()
        .ok_or("the certificate's issuer is not in its files: cannot ask about it")?;
    let on_disk = current_on_disk(spec, subject, now);
    let fresh = async {
        let request = subject.request().map_err(|e| e.to_string())?;
        let response = agent.ocsp(&url, request).await?;
        let checked = subject.check(&response, now).map_err(|e| e.to_string())?;
        Ok::<_, String>((response, checked))
    }
    .await;
    let (response, checked) = match fresh {
        Ok(r) => r,
        Err(e) => {
            return match on_disk {
                Some(kept) => {
                    tracing::warn!(certificate = %spec.name, "OCSP: {e}; the response on disk stays current until {}", rfc3339(kept.next_update));
                    Ok(Staple::Kept(kept))
                }
                None => {
                    if write {
                        remove_staple(spec);
                    }
                    Err(format!("OCSP: {e}"))
                }
            };
        }
    };
    match checked.status {
        CertificateStatus::Good => {}
        CertificateStatus::Revoked { .. } => {
            if write {
                remove_staple(spec);
            }
            return Ok(Staple::Revoked(checked));
        }
        CertificateStatus::Unknown => {
            if write {
                remove_staple(spec);
            }
            return Err(format!(
                "OCSP: the responder at {url} does not know serial {}",
                installed.serial
            ));
        }
    }
    // Kept when the one on disk is not half way through its validity yet, or when the
    // responder answered with nothing newer (it caches): no rewrite, no reload.
    if let Some(kept) = on_disk
        && (unix(now) < kept.refresh_at() || checked.this_update <= kept.this_update)
    {
        return Ok(Staple::Kept(kept));
    }
    if write {
        sink::write_file(
            &spec.ocsp_path(),
            spec.owner.as_deref(),
            spec.group.as_deref(),
            0o644,
            &response,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(Staple::Written(checked))
}

/// [`staple`] for the certificate `spec` names as it is on disk now (just written).
pub async fn staple_installed(
    agent: &Agent,
    spec: &CertificateSpec,
    write: bool,
) -> Result<Staple, String> {
    match installed(spec)? {
        Some(current) => staple(agent, spec, &current, SystemTime::now(), write).await,
        None => Err(format!("{}: no certificate", spec.cert_path().display())),
    }
}

/// What `renew` did, one line per certificate (and per reload command).
#[derive(Debug, Default)]
pub struct Renewal {
    /// Human-readable lines.
    pub lines: Vec<String>,
    /// What failed (the run exits non-zero when this is not empty).
    pub failures: Vec<String>,
}

/// One line about a certificate's OCSP response, for the summary.
pub fn describe_staple(name: &str, staple: &Result<Staple, String>) -> Option<String> {
    match staple {
        Ok(Staple::Written(c)) => Some(format!(
            "{name}: OCSP response (good) written, current until {}",
            rfc3339(c.next_update)
        )),
        Ok(Staple::Kept(c)) => Some(format!(
            "{name}: OCSP response (good) kept, current until {}",
            rfc3339(c.next_update)
        )),
        Ok(Staple::Revoked(_)) => Some(format!("{name}: revoked, says its OCSP responder")),
        Ok(Staple::NoResponder) => Some(format!("{name}: names no OCSP responder")),
        Ok(Staple::Disabled) => None,
        Err(e) => Some(format!("{name}: {e}")),
    }
}

/// Renews what is due (one attestation for all of it) and refreshes OCSP responses, then runs
/// the reload command of every certificate whose files changed, each command once.
pub async fn renew(
    settings: &Settings,
    agent: &Agent,
    force: bool,
    now: SystemTime,
) -> Result<Renewal, AgentError> {
    let mut out = Renewal::default();
    let mut due_specs: Vec<(&CertificateSpec, Reason)> = Vec::new();
    let mut changed: Vec<&CertificateSpec> = Vec::new();
    for spec in &settings.certificates {
        let current = match installed(spec) {
            Ok(None) => {
                due_specs.push((spec, Reason::Missing));
                continue;
            }
            Err(e) => {
                due_specs.push((spec, Reason::Unusable(e)));
                continue;
            }
            Ok(Some(i)) => i,
        };
        if let Some(reason) = due(&current, now, force) {
            due_specs.push((spec, reason));
            continue;
        }
        let staple = staple(agent, spec, &current, SystemTime::now(), true).await;
        match &staple {
            Ok(Staple::Revoked(_)) => {
                due_specs.push((spec, Reason::Revoked));
                continue;
            }
            Ok(Staple::Written(_)) => changed.push(spec),
            Err(e) => out.failures.push(format!("{}: {e}", spec.name)),
            _ => {}
        }
        out.lines.push(format!(
            "{}: serial {} not due; renews after {} (valid until {})",
            spec.name,
            current.serial,
            rfc3339(renew_at(
                current.not_before,
                current.not_after,
                &current.serial
            )),
            rfc3339(current.not_after)
        ));
        out.lines
            .extend(describe_staple(&spec.name, &staple).filter(|_| staple.is_ok()));
    }
    if !due_specs.is_empty() {
        let specs: Vec<CertificateSpec> = due_specs.iter().map(|(s, _)| (*s).clone()).collect();
        let deadline = std::time::Instant::now() + settings.deadline;
        match agent.fetch(&[], &specs, deadline).await {
            Ok(released) => {
                for c in &released.certificates {
                    let Some(&(spec, ref reason)) =
                        due_specs.iter().find(|(s, _)| s.name == c.name)
                    else {
                        continue;
                    };
                    if let Err(e) = sink::write_certificate(
                        spec,
                        c.key_pem.as_bytes(),
                        &c.certificate_pem,
                        &c.ca_pem,
                    ) {
                        out.failures
                            .push(format!("{}: renewed but not written: {e}", c.name));
                        continue;
                    }
                    tracing::info!(certificate = %c.name, serial = %c.serial, %reason, "certificate renewed");
                    out.lines.push(format!(
                        "{}: renewed ({reason}): serial {}, valid until {}",
                        c.name,
                        c.serial,
                        rfc3339(u64::try_from(c.not_after).unwrap_or(0))
                    ));
                    changed.push(spec);
                    let staple = staple_installed(agent, spec, true).await;
                    if let Err(e) = &staple {
                        out.failures.push(format!("{}: {e}", spec.name));
                    }
                    out.lines.extend(describe_staple(&spec.name, &staple));
                }
            }
            Err(e) => {
                for &(spec, ref reason) in &due_specs {
                    out.failures
                        .push(format!("{}: not renewed ({reason}): {e}", spec.name));
                    // The old certificate stays until it expires: its OCSP response is
                    // refreshed while good, and removed when revoked or no longer current.
                    if let Ok(Some(old)) = installed(spec) {
                        let staple = staple(agent, spec, &old, SystemTime::now(), true).await;
                        if let Ok(Staple::Written(_)) = staple {
                            changed.push(spec);
                        }
                        out.lines.extend(describe_staple(&spec.name, &staple));
                    }
                }
            }
        }
    }
    reload(&changed, &mut out).await;
    Ok(out)
}

/// Runs each distinct reload command of `changed` once.
async fn reload(changed: &[&CertificateSpec], out: &mut Renewal) {
    let mut done: Vec<&Vec<String>> = Vec::new();
    for spec in changed {
        if spec.reload.is_empty() || done.contains(&&spec.reload) {
            continue;
        }
        done.push(&spec.reload);
        let shown = spec.reload.join(" ");
        let mut command = tokio::process::Command::new(&spec.reload[0]);
        command
            .args(&spec.reload[1..])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let result = match tokio::time::timeout(RELOAD_TIMEOUT, command.status()).await {
            Err(_) => Err(format!(
                "did not finish within {}s",
                RELOAD_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("exited with {status}")),
        };
        match result {
            Ok(()) => out.lines.push(format!("ran {shown}")),
            Err(e) => out.failures.push(format!("reload `{shown}`: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_less_a_spread_fixed_per_serial() {
        let (nb, na) = (1_800_000_000, 1_800_000_000 + 86_400);
        let mut seen = std::collections::BTreeSet::new();
        for serial in ["01", "02", "7f3a", "deadbeef", "00ff"] {
            let at = renew_at(nb, na, serial);
            assert!(
                at <= nb + 57_600 && at > nb + 57_600 - 8_640,
                "{serial}: {at}"
            );
            assert_eq!(at, renew_at(nb, na, serial));
            seen.insert(at);
        }
        assert!(seen.len() > 1, "the spread differs between certificates");
        // A zero-length or inverted validity never underflows.
        assert_eq!(renew_at(nb, nb, "01"), nb);
        assert_eq!(renew_at(na, nb, "01"), na);
    }

    fn installed_at(not_before: u64, not_after: u64) -> Installed {
        Installed {
            der: Vec::new(),
            serial: "0a".into(),
            not_before,
            not_after,
            subject: None,
        }
    }

    #[test]
    fn due_when_scheduled_expired_or_forced() {
        let c = installed_at(1000, 1000 + 3000);
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let when = renew_at(1000, 4000, "0a");
        assert_eq!(due(&c, at(when - 1), false), None);
        assert_eq!(due(&c, at(when), false), Some(Reason::Scheduled));
        assert_eq!(due(&c, at(4000), false), Some(Reason::Expired));
        assert_eq!(due(&c, at(1001), true), Some(Reason::Forced));
    }
}
