//! Issuance: a guest's certificate signing request checked (possession, key type, names) and
//! certified by the newest active CA version under a policy profile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use attestation::csr::{VerifiedCsr, verify_request};
use attestation::policy::{CertificateProfile, RequestedName, Usage};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use super::ca::{CaPublic, PURPOSE, random_serial};
use crate::Error;
use crate::keyring::Keyring;
use crate::store::{BrokerKey, broker_key_sealed_name};

/// The newest active CA version, ready to sign.
pub struct Signer {
    /// Its version.
    pub version: u64,
    /// SHA-256 of its certificate (hex).
    pub fingerprint: String,
    /// Its certificate and those above it, the root last (PEM).
    pub chain: Vec<String>,
    not_after: i64,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("version", &self.version)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The newest active version among `records` (the store's `pki-ca` broker keys, newest
    /// first), or `None`. `cached` is reused when it is that version.
    pub fn newest(
        records: &[BrokerKey],
        keyring: &Arc<Keyring>,
        cached: Option<&Arc<Signer>>,
    ) -> Result<Option<Arc<Signer>>, Error> {
        for record in records {
            let public: CaPublic = match serde_json::from_value(record.public.clone()) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let CaPublic::Active {
                certificate,
                chain,
                not_after,
                fingerprint,
                ..
            } = public
            else {
                continue;
            };
            if let Some(c) = cached
                && c.version == record.version
                && c.fingerprint == fingerprint
            {
                return Ok(Some(c.clone()));
            }
            let pkcs8 = keyring.open(
                record.key_version,
                &broker_key_sealed_name(PURPOSE),
                record.version,
                &record.sealed,
            )?;
            let key = KeyPair::try_from(pkcs8.as_slice())
                .map_err(|e| Error::Crypto(format!("CA key v{}: {e}", record.version)))?;
            let der = attestation::certs::decode_pem_or_der(certificate.as_bytes(), "CA")?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Crypto("CA record without a certificate".into()))?;
            let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(der.as_slice()), key)
                .map_err(|e| Error::Crypto(format!("CA certificate v{}: {e}", record.version)))?;
            let mut full = vec![certificate];
            full.extend(chain);
            return Ok(Some(Arc::new(Signer {
                version: record.version,
                fingerprint,
                chain: full,
                not_after,
                issuer,
            })));
        }
        Ok(None)
    }
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The profile.
    pub profile: String,
    /// The serial number (hex, lowercase).
    pub serial: String,
    /// The certificate (DER).
    pub der: Vec<u8>,
    /// Its subject common name.
    pub subject: String,
    /// The names it certifies, as the policy shows them.
    pub names: Vec<String>,
    /// Validity (seconds since the epoch).
    pub not_before: i64,
    /// Validity (seconds since the epoch).
    pub not_after: i64,
    /// The CA version that issued it.
    pub ca_version: u64,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn name_text(n: &RequestedName) -> String {
    match n {
        RequestedName::Dns(d) => format!("dns:{d}"),
        RequestedName::Ip(a) => format!("ip:{a}"),
        RequestedName::Uri(u) => format!("uri:{u}"),
    }
}

/// Certifies `csr` under `profile` with `signer` at `now`: every name asked must be granted
/// (the error names the first that is not); the usages are the profile's; the lifetime is
/// the profile's longest, never past the CA certificate's own end.
pub fn issue(
    signer: &Signer,
    csr: &VerifiedCsr,
    profile: &CertificateProfile,
    now: SystemTime,
) -> Result<Issued, IssueError> {
    if let Some(name) = csr.names.iter().find(|n| !profile.permits(n)) {
        return Err(IssueError::NameNotGranted(format!(
            "{name} is not granted by certificate profile {:?}",
            csr.profile
        )));
    }
    let not_before = now - Duration::from_secs(60);
    let wanted = now + Duration::from_secs(profile.max_lifetime_secs());
    let ca_end =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(signer.not_after).unwrap_or(0));
    let not_after = wanted.min(ca_end);
    if not_after <= now {
        return Err(IssueError::Internal(format!(
            "CA version {} has expired",
            signer.version
        )));
    }
    let mut params = CertificateParams::default();
    let subject = csr.names.first().map(|n| match n {
        RequestedName::Dns(d) => d.to_ascii_lowercase(),
        RequestedName::Ip(a) => a.to_string(),
        RequestedName::Uri(u) => u.clone(),
    });
    let subject = subject.unwrap_or_else(|| csr.profile.clone());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject.clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = profile
        .usages()
        .iter()
        .map(|u| match u {
            Usage::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
        })
        .collect();
    params.use_authority_key_identifier_extension = true;
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    let serial = random_serial().map_err(|e| IssueError::Internal(e.to_string()))?;
    let serial_hex = hex::encode(serial.as_ref());
    params.serial_number = Some(serial);
    params.subject_alt_names = csr
        .names
        .iter()
        .map(|n| -> Result<SanType, IssueError> {
            Ok(match n {
                RequestedName::Dns(d) => SanType::DnsName(
                    d.to_ascii_lowercase()
                        .try_into()
                        .map_err(|e| IssueError::Internal(format!("{e}")))?,
                ),
                RequestedName::Ip(a) => SanType::IpAddress(*a),
                RequestedName::Uri(u) => SanType::URI(
                    u.clone()
                        .try_into()
                        .map_err(|e| IssueError::Internal(format!("{e}")))?,
                ),
            })
        })
        .collect::<Result<_, _>>()?;
    let cert = params
        .signed_by(csr.public_key(), &signer.issuer)
        .map_err(|e| IssueError::Internal(format!("issuing: {e}")))?;
    Ok(Issued {
        profile: csr.profile.clone(),
        serial: serial_hex,
        der: cert.der().to_vec(),
        subject,
        names: csr.names.iter().map(name_text).collect(),
        not_before: unix(not_before),
        not_after: unix(not_after),
        ca_version: signer.version,
    })
}

/// Why a certificate was not issued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// A name asked for is not granted by the profile (the message names it).
    #[error("{0}")]
    NameNotGranted(String),
    /// Issuance failed (logged; the guest sees an internal error).
    #[error("{0}")]
    Internal(String),
}
