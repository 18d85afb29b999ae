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

use super::ca::{CaPublic, PURPOSE};
use super::{random_serial, unix};
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
    /// Its certificate (DER).
    pub ca_der: Vec<u8>,
    /// What OCSP CertIDs name it by (hashes of its name and key), computed once.
    pub hashes: super::ocsp::IssuerHashes,
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
    /// The CA version of `record` ready to sign, or `None` while it waits for its
    /// certificate; `cached` is reused while it is that version with that certificate.
    pub fn load(
        record: &BrokerKey,
        keyring: &Keyring,
        cached: Option<&Arc<Signer>>,
    ) -> Result<Option<Arc<Signer>>, Error> {
        let Ok(public) = serde_json::from_value::<CaPublic>(record.public.clone()) else {
            return Ok(None);
        };
        let CaPublic::Active {
            certificate,
            chain,
            not_after,
            fingerprint,
            ..
        } = public
        else {
            return Ok(None);
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
        let hashes = super::ocsp::IssuerHashes::of(&der).map_err(Error::Crypto)?;
        let mut full = vec![certificate];
        full.extend(chain);
        Ok(Some(Arc::new(Signer {
            version: record.version,
            fingerprint,
            chain: full,
            ca_der: der,
            hashes,
            not_after,
            issuer,
        })))
    }

    /// The subjectKeyIdentifier of its certificate, if it has one.
    pub fn subject_key_identifier(&self) -> Option<Vec<u8>> {
        use der::Decode;
        use x509_cert::ext::pkix::SubjectKeyIdentifier;
        let cert = x509_cert::Certificate::from_der(&self.ca_der).ok()?;
        let (_, ski) = cert
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
            .ok()??;
        Some(ski.0.as_bytes().to_vec())
    }

    /// The end of its certificate's validity.
    pub fn end(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0))
    }

    /// Signs a CRL of this CA version.
    pub fn sign_crl(
        &self,
        params: &rcgen::CertificateRevocationListParams,
    ) -> Result<Vec<u8>, Error> {
        Ok(params
            .signed_by(&self.issuer)
            .map_err(|e| Error::Crypto(format!("CRL of CA version {}: {e}", self.version)))?
            .der()
            .to_vec())
    }

    /// Certifies a new delegated OCSP responder key for this CA version, valid from a minute
    /// back for `validity` (never past the CA certificate's end): extended key usage
    /// OCSPSigning and id-pkix-ocsp-nocheck (RFC 6960 §4.2.2.2.1).
    pub fn certify_responder(
        &self,
        now: SystemTime,
        validity: Duration,
    ) -> Result<super::ocsp::Responder, Error> {
        let rc = |e: rcgen::Error| Error::Crypto(format!("OCSP responder: {e}"));
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "snp-key-broker");
        dn.push(
            DnType::CommonName,
            format!("OCSP responder for CA version {}", self.version),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
        params.use_authority_key_identifier_extension = true;
        // id-pkix-ocsp-nocheck, value NULL.
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 5, 5, 7, 48, 1, 5],
            vec![0x05, 0x00],
        )];
        let not_after = (now + validity).min(self.end());
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
        params.not_after = time::OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok(super::ocsp::Responder::new(
            self.version,
            key,
            cert.der().to_vec(),
            not_after,
        ))
    }
}

/// Where issued certificates point relying parties: the broker's public base URL, from which
/// the OCSP responder (`/v1/pki/ocsp`), the issuing CA certificate (`/v1/pki/ca/<v>.der`)
/// and its CRL (`/v1/pki/crl/<v>`) are reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiUrls {
    /// `https://host[:port]`, without a trailing slash.
    pub base: String,
}

/// The AuthorityInfoAccess extension (OCSP and caIssuers URIs), DER.
fn authority_info_access(ocsp: &str, ca_issuers: &str) -> Result<Vec<u8>, String> {
    use der::Encode;
    use der::asn1::Ia5String;
    use x509_cert::ext::pkix::AccessDescription;
    use x509_cert::ext::pkix::AuthorityInfoAccessSyntax;
    use x509_cert::ext::pkix::name::GeneralName;
    let uri = |u: &str| -> Result<GeneralName, String> {
        Ok(GeneralName::UniformResourceIdentifier(
            Ia5String::new(u).map_err(|e| e.to_string())?,
        ))
    };
    AuthorityInfoAccessSyntax(vec![
        AccessDescription {
            access_method: const_oid::db::rfc5280::ID_AD_OCSP,
            access_location: uri(ocsp)?,
        },
        AccessDescription {
            access_method: const_oid::db::rfc5280::ID_AD_CA_ISSUERS,
            access_location: uri(ca_issuers)?,
        },
    ])
    .to_der()
    .map_err(|e| e.to_string())
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

fn name_text(n: &RequestedName) -> String {
    match n {
        RequestedName::Dns(d) => format!("dns:{}", d.to_ascii_lowercase()),
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
    urls: Option<&PkiUrls>,
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
    // A common name is at most 64 characters (RFC 5280 ub-common-name); the names are in the
    // subjectAltName whatever it is.
    let subject = subject
        .filter(|s| s.len() <= 64)
        .unwrap_or_else(|| csr.profile.chars().take(64).collect());
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
    if let Some(urls) = urls {
        let aia = authority_info_access(
            &format!("{}/v1/pki/ocsp", urls.base),
            &format!("{}/v1/pki/ca/{}.der", urls.base, signer.version),
        )
        .map_err(IssueError::Internal)?;
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 5, 5, 7, 1, 1],
            aia,
        )];
        params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
            uris: vec![format!("{}/v1/pki/crl/{}", urls.base, signer.version)],
        }];
    }
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
    // What was signed certifies exactly the key REPORT_DATA bound.
    let certified = {
        use der::{Decode, Encode};
        x509_cert::Certificate::from_der(cert.der())
            .ok()
            .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der().ok())
    };
    if certified.as_deref() != Some(csr.spki.as_slice()) {
        return Err(IssueError::Internal(
            "the issued certificate's key differs from the request's".into(),
        ));
    }
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
