//! OCSP (RFC 6960). This module: requests as a responder receives them from anyone, parsed
//! with bounds, their CertIDs matched to the CA certificates a responder answers for.
//! [`status`]: the relying side (a stapler or a client), which asks about one certificate and
//! checks the signed answer.

pub mod status;

use aws_lc_rs::digest;
use der07::{Decode, Encode};
use x509_ocsp::{CertId, OcspRequest};

/// Most certificates one request may ask about.
pub const MAX_REQUESTS: usize = 16;
/// Largest request accepted (DER bytes).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

pub(crate) const OID_SHA1: &str = "1.3.14.3.2.26";
const OID_SHA256: &str = "2.16.840.1.101.3.4.2.1";
const OID_NONCE: &str = "1.3.6.1.5.5.7.48.1.2";

/// What identifies a CA in a CertID: SHA-1 and SHA-256 of its subject name (DER) and of its
/// public key (the subjectPublicKey BIT STRING's bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerHashes {
    sha1: ([u8; 20], [u8; 20]),
    sha256: ([u8; 32], [u8; 32]),
}

impl IssuerHashes {
    /// The hashes of the CA certificate `ca_der`.
    pub fn of(ca_der: &[u8]) -> Result<IssuerHashes, String> {
        let cert = x509_cert02::Certificate::from_der(ca_der).map_err(|e| e.to_string())?;
        let name = cert
            .tbs_certificate
            .subject
            .to_der()
            .map_err(|e| e.to_string())?;
        let key = cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes()
            .to_vec();
        let h = |alg: &'static digest::Algorithm, b: &[u8]| digest::digest(alg, b);
        let mut sha1 = ([0u8; 20], [0u8; 20]);
        sha1.0
            .copy_from_slice(h(&digest::SHA1_FOR_LEGACY_USE_ONLY, &name).as_ref());
        sha1.1
            .copy_from_slice(h(&digest::SHA1_FOR_LEGACY_USE_ONLY, &key).as_ref());
        let mut sha256 = ([0u8; 32], [0u8; 32]);
        sha256.0.copy_from_slice(h(&digest::SHA256, &name).as_ref());
        sha256.1.copy_from_slice(h(&digest::SHA256, &key).as_ref());
        Ok(IssuerHashes { sha1, sha256 })
    }

    pub(crate) fn matches(&self, id: &CertId) -> bool {
        let (name, key) = (
            id.issuer_name_hash.as_bytes(),
            id.issuer_key_hash.as_bytes(),
        );
        match id.hash_algorithm.oid.to_string().as_str() {
            OID_SHA1 => name == self.sha1.0 && key == self.sha1.1,
            OID_SHA256 => name == self.sha256.0 && key == self.sha256.1,
            _ => false,
        }
    }
}

/// A parsed request: each certificate asked about, and the nonce extension to echo.
#[derive(Debug)]
pub struct Query {
    ids: Vec<CertId>,
    nonce: Option<x509_cert02::ext::Extension>,
}

impl Query {
    /// The CertIDs asked about, in order.
    pub fn ids(&self) -> &[CertId] {
        &self.ids
    }

    /// The request's nonce extension, to echo in the response.
    pub fn nonce(&self) -> Option<&x509_cert02::ext::Extension> {
        self.nonce.as_ref()
    }

    /// The serial (lowercase hex, minimal) of each CertID.
    pub fn serials(&self) -> Vec<String> {
        self.ids
            .iter()
            .map(|id| hex::encode(id.serial_number.as_bytes()))
            .collect()
    }

    /// For each CertID, the index in `issuers` of the CA it names, if any.
    pub fn issuers(&self, issuers: &[IssuerHashes]) -> Vec<Option<usize>> {
        self.ids
            .iter()
            .map(|id| issuers.iter().position(|h| h.matches(id)))
            .collect()
    }
}

/// Why a request was not answered: its OCSP status (malformedRequest) goes back with 400.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

/// Parses an OCSP request (DER): at most [`MAX_REQUESTS`] CertIDs, SHA-1 or SHA-256.
pub fn parse(der: &[u8]) -> Result<Query, Malformed> {
    if der.len() > MAX_REQUEST_BYTES {
        return Err(Malformed(format!("larger than {MAX_REQUEST_BYTES} bytes")));
    }
    let request = OcspRequest::from_der(der).map_err(|e| Malformed(e.to_string()))?;
    let list = &request.tbs_request.request_list;
    if list.is_empty() || list.len() > MAX_REQUESTS {
        return Err(Malformed(format!("1 to {MAX_REQUESTS} certificates")));
    }
    let nonce = request
        .tbs_request
        .request_extensions
        .as_ref()
        .and_then(|exts| {
            exts.iter()
                .find(|e| e.extn_id.to_string() == OID_NONCE)
                .cloned()
        });
    if nonce
        .as_ref()
        .is_some_and(|n| n.extn_value.as_bytes().len() > 128)
    {
        return Err(Malformed("nonce longer than 128 bytes".into()));
    }
    Ok(Query {
        ids: list.iter().map(|r| r.req_cert.clone()).collect(),
        nonce,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x30, 0x00]).is_err());
        assert!(parse(&vec![0x30; MAX_REQUEST_BYTES + 1]).is_err());
    }
}
