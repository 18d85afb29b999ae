//! Certificate signing requests from guests (PKCS#10): parsed with bounds, their signature
//! verified (proof that the sender holds the key), their key type and names checked. The
//! broker's CA issues only for what passes ([`verify_request`]).

use rcgen::{CertificateSigningRequestParams, SanType};
use rustls_pki_types::CertificateSigningRequestDer;

use crate::policy::RequestedName;
use crate::protocol::{CertificateRequest, MAX_CSR_BYTES};

/// A certificate signing request whose signature verified: the key holder asked.
pub struct VerifiedCsr {
    /// The policy profile it asks under.
    pub profile: String,
    /// Its SubjectPublicKeyInfo as the request carries it (DER): what REPORT_DATA binds.
    pub spki: Vec<u8>,
    /// The names it asks for (its subjectAltName extension request).
    pub names: Vec<RequestedName>,
    public_key: rcgen::SubjectPublicKeyInfo,
}

impl VerifiedCsr {
    /// The key to certify.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }
}

impl std::fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("profile", &self.profile)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";

/// Parses `request` and verifies its signature (proof of possession of the key it names).
/// Only ECDSA P-256, P-384 and Ed25519 keys are certified; only DNS, IP and URI names asked.
/// The error is a one-line reason for the guest.
pub fn verify_request(request: &CertificateRequest) -> Result<VerifiedCsr, String> {
    use der::{Decode, Encode};
    let profile = request.profile.clone();
    if !crate::policy::valid_name(&profile) {
        return Err(format!("certificate profile {profile:?}: not a valid name"));
    }
    let der_bytes = crate::protocol::decode_b64(&request.csr, "csr")
        .map_err(|e| format!("certificate {profile}: {e}"))?;
    if der_bytes.len() > MAX_CSR_BYTES {
        return Err(format!(
            "certificate {profile}: the request is larger than {MAX_CSR_BYTES} bytes"
        ));
    }
    let parsed = x509_cert::request::CertReq::from_der(&der_bytes)
        .map_err(|e| format!("certificate {profile}: not a PKCS#10 request: {e}"))?;
    let spki_info = &parsed.info.public_key;
    let algorithm = spki_info.algorithm.oid.to_string();
    let curve = spki_info
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    // The signature algorithm a key of that type signs with: the key is certified as its
    // SubjectPublicKeyInfo says, so the two must agree.
    let signs_with = match (algorithm.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => OID_ECDSA_SHA256,
        (OID_EC_PUBLIC_KEY, Some(OID_P384)) => OID_ECDSA_SHA384,
        (OID_ED25519, None) => OID_ED25519,
        _ => {
            return Err(format!(
                "certificate {profile}: the key is not ECDSA P-256, P-384 or Ed25519"
            ));
        }
    };
    if parsed.algorithm.oid.to_string() != signs_with {
        return Err(format!(
            "certificate {profile}: the request is signed with another algorithm than its key's \
             (P-256 with ECDSA-SHA256, P-384 with ECDSA-SHA384, Ed25519)"
        ));
    }
    let spki = spki_info
        .to_der()
        .map_err(|e| format!("certificate {profile}: {e}"))?;
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
        der_bytes.as_slice(),
    ))
    .map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            format!("certificate {profile}: the request's signature does not verify")
        }
        other => format!(
            "certificate {profile}: the request cannot be used ({other}): only the \
             subjectAltName, key usage, extended key usage and basic constraints extensions \
             are accepted"
        ),
    })?;
    // What is certified is exactly the key the request carries (and REPORT_DATA binds).
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(&spki)
        .ok()
        .filter(|k| rcgen::PublicKeyData::subject_public_key_info(k) == spki)
        .ok_or_else(|| format!("certificate {profile}: the key cannot be certified as sent"))?;
    let mut names = Vec::new();
    for san in &csr.params.subject_alt_names {
        names.push(match san {
            SanType::DnsName(n) => RequestedName::Dns(n.as_str().to_string()),
            SanType::IpAddress(a) => RequestedName::Ip(*a),
            SanType::URI(u) => RequestedName::Uri(u.as_str().to_string()),
            _ => {
                return Err(format!(
                    "certificate {profile}: only DNS names, IP addresses and URIs can be asked for"
                ));
            }
        });
    }
    if names.is_empty() {
        return Err(format!(
            "certificate {profile}: the request asks for no name (subjectAltName)"
        ));
    }
    Ok(VerifiedCsr {
        profile,
        spki,
        names,
        public_key,
    })
}
