//! The OCSP responder (RFC 6960): requests parsed with bounds, answered for the CA versions
//! this broker holds, signed by a delegated responder certificate per CA version
//! (`id-kp-OCSPSigning`, `id-pkix-ocsp-nocheck`), the request's nonce echoed.

use std::time::{Duration, SystemTime};

pub use attestation::ocsp::{IssuerHashes, Malformed, Query, parse};
use aws_lc_rs::digest;
use der07::asn1::{BitString, GeneralizedTime, Null, OctetString};
use der07::{Decode, Encode};
use x509_ocsp::{
    BasicOcspResponse, CertStatus, OcspGeneralizedTime, OcspResponse, ResponderId, ResponseData,
    RevokedInfo, SingleResponse, Version,
};

/// How long a response may be relied on (its nextUpdate): clients and staplers refresh
/// within this.
pub const VALIDITY: Duration = Duration::from_secs(3600);

const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// The status of one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Issued by the CA asked about, not revoked.
    Good,
    /// Revoked at (seconds since the epoch), with an RFC 5280 reason code.
    Revoked(i64, u8),
    /// Never issued by that CA (or a CA this broker does not hold).
    Unknown,
}

fn time(t: SystemTime) -> Result<OcspGeneralizedTime, String> {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    // GeneralizedTime has whole seconds.
    let secs = Duration::from_secs(since.as_secs());
    GeneralizedTime::from_unix_duration(secs)
        .map(OcspGeneralizedTime)
        .map_err(|e| e.to_string())
}

fn crl_reason(code: u8) -> Option<x509_cert02::ext::pkix::crl::CrlReason> {
    use x509_cert02::ext::pkix::crl::CrlReason as R;
    Some(match code {
        0 => R::Unspecified,
        1 => R::KeyCompromise,
        3 => R::AffiliationChanged,
        4 => R::Superseded,
        5 => R::CessationOfOperation,
        9 => R::PrivilegeWithdrawn,
        _ => return None,
    })
}

/// A delegated OCSP responder: its key and certificate (issued by one CA version).
pub struct Responder {
    /// The CA version it answers for.
    pub ca_version: u64,
    key: rcgen::KeyPair,
    certificate: Vec<u8>,
    key_hash: [u8; 20],
    /// The end of its certificate's validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("ca_version", &self.ca_version)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder from its key and the certificate its CA issued for it.
    pub fn new(
        ca_version: u64,
        key: rcgen::KeyPair,
        certificate: Vec<u8>,
        not_after: SystemTime,
    ) -> Responder {
        // ResponderID byKey: SHA-1 of the responder's public key bytes.
        let raw = rcgen::PublicKeyData::der_bytes(&key).to_vec();
        let mut key_hash = [0u8; 20];
        key_hash.copy_from_slice(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &raw).as_ref());
        Responder {
            ca_version,
            key,
            certificate,
            key_hash,
            not_after,
        }
    }

    /// The signed response (DER) for `query`, one status per CertID, produced at `now`.
    pub fn answer(
        &self,
        query: &Query,
        statuses: &[Status],
        now: SystemTime,
    ) -> Result<Vec<u8>, String> {
        let this_update = time(now)?;
        let next_update = time(now + VALIDITY)?;
        let responses = query
            .ids()
            .iter()
            .zip(statuses)
            .map(|(id, status)| -> Result<SingleResponse, String> {
                let cert_status = match status {
                    Status::Good => CertStatus::good(),
                    Status::Unknown => CertStatus::Unknown(Null),
                    Status::Revoked(at, reason) => CertStatus::Revoked(RevokedInfo {
                        revocation_time: time(
                            SystemTime::UNIX_EPOCH
                                + Duration::from_secs(u64::try_from(*at).unwrap_or(0)),
                        )?,
                        revocation_reason: crl_reason(*reason),
                    }),
                };
                Ok(SingleResponse {
                    cert_id: id.clone(),
                    cert_status,
                    this_update,
                    next_update: Some(next_update),
                    single_extensions: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tbs = ResponseData {
            version: Version::V1,
            responder_id: ResponderId::ByKey(
                OctetString::new(self.key_hash.to_vec()).map_err(|e| e.to_string())?,
            ),
            produced_at: this_update,
            responses,
            response_extensions: query.nonce().cloned().map(|n| vec![n]),
        };
        let signed = tbs.to_der().map_err(|e| e.to_string())?;
        let signature = rcgen::SigningKey::sign(&self.key, &signed).map_err(|e| e.to_string())?;
        let basic = BasicOcspResponse {
            tbs_response_data: tbs,
            signature_algorithm: spki07::AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA256.parse().map_err(|_| "oid".to_string())?,
                parameters: None,
            },
            signature: BitString::from_bytes(&signature).map_err(|e| e.to_string())?,
            certs: Some(vec![
                x509_cert02::Certificate::from_der(&self.certificate).map_err(|e| e.to_string())?,
            ]),
        };
        OcspResponse::successful(basic)
            .and_then(|r| r.to_der())
            .map_err(|e| e.to_string())
    }
}

/// The response to a malformed request (DER).
pub fn malformed() -> Vec<u8> {
    OcspResponse::malformed_request()
        .to_der()
        .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x01])
}

/// The response when the responder failed (DER): `internalError`.
pub fn internal_error() -> Vec<u8> {
    OcspResponse {
        response_status: x509_ocsp::OcspResponseStatus::InternalError,
        response_bytes: None,
    }
    .to_der()
    .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x02])
}

/// The response for requests about CAs this broker does not hold (DER): `unauthorized`.
pub fn unauthorized() -> Vec<u8> {
    OcspResponse {
        response_status: x509_ocsp::OcspResponseStatus::Unauthorized,
        response_bytes: None,
    }
    .to_der()
    .unwrap_or_else(|_| vec![0x30, 0x03, 0x0a, 0x01, 0x06])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_fixed_encodings() {
        assert_eq!(malformed(), vec![0x30, 0x03, 0x0a, 0x01, 0x01]);
        assert_eq!(unauthorized(), vec![0x30, 0x03, 0x0a, 0x01, 0x06]);
    }
}
