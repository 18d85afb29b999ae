//! A broker's own evidence: an SNP report of the VM the broker runs in, with REPORT_DATA
//! binding the public key of its TLS server certificate and the caller's nonce. Callers (the
//! operator CLI, the guest agent) verify it with the same verifier and policy grammar guests
//! are judged by, against the key of the TLS connection they hold, before sending anything.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::protocol::Evidence;
use crate::{Claims, Endorsements, Error, TrustAnchors, Verifier};

/// The domain-separation label of the binding.
pub const BINDING_LABEL: &[u8] = b"snp-key-broker/v1 broker evidence\0";
/// The grant in the caller's policy that the broker's claims must satisfy.
pub const POLICY_GRANT: &str = "broker";
/// The evidence route, with `?nonce=<64 hex digits>`.
pub const PATH: &str = "/v1/broker/evidence";

/// REPORT_DATA of the broker's evidence: SHA-512 over the label, SHA-256 of the server
/// certificate's SubjectPublicKeyInfo (DER) and the caller's 32-byte nonce.
pub fn report_data(spki_der: &[u8], nonce: &[u8; 32]) -> [u8; 64] {
    use aws_lc_rs::digest;
    let spki = digest::digest(&digest::SHA256, spki_der);
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(BINDING_LABEL);
    ctx.update(spki.as_ref());
    ctx.update(nonce);
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The SubjectPublicKeyInfo (DER) of a DER certificate.
pub fn spki_of(cert_der: &[u8]) -> Result<Vec<u8>, Error> {
    use der::{Decode, Encode};
    let invalid = |detail: String| Error::InvalidInput { detail };
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| invalid(format!("server certificate: {e}")))?;
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| invalid(format!("server certificate key: {e}")))
}

/// What `GET /v1/broker/evidence` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerEvidence {
    /// The format (1).
    pub version: u32,
    /// The caller's nonce, hex.
    pub nonce: String,
    /// SHA-256 of the server certificate's SubjectPublicKeyInfo the report binds, hex.
    pub spki_sha256: String,
    /// The report and the certificates that endorse it.
    pub evidence: Evidence,
}

/// Verifies `evidence` as the broker's: the report and its endorsements against `anchors`,
/// the binding to `spki_der` (the key of the connection the caller holds) and `nonce` (the
/// caller's), then `policy`'s `broker` grant. The claims, or [`Error::UntrustedBroker`].
pub fn verify(
    evidence: &BrokerEvidence,
    anchors: &TrustAnchors,
    policy: &Policy,
    spki_der: &[u8],
    nonce: &[u8; 32],
    now: SystemTime,
) -> Result<Claims, Error> {
    let untrusted = |detail: String| Error::UntrustedBroker { detail };
    if evidence.version != 1 {
        return Err(untrusted(format!(
            "evidence format {} (this client knows 1)",
            evidence.version
        )));
    }
    let Evidence::Snp {
        report,
        certificates,
    } = &evidence.evidence
    else {
        return Err(untrusted(
            "the broker's evidence must be a bare SEV-SNP report".into(),
        ));
    };
    let decode = |b64: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| untrusted(format!("its evidence is not base64: {e}")))
    };
    let report = decode(report)?;
    let mut endorsements = Endorsements::default();
    for entry in certificates {
        let der = decode(&entry.der)?;
        match entry.kind.as_str() {
            "vcek" | "vlek" => endorsements.vek = der,
            "crl" => endorsements.crls.push(der),
            _ => endorsements.chain.push(der),
        }
    }
    if endorsements.vek.is_empty() {
        return Err(untrusted(
            "the broker's evidence carries no VCEK or VLEK".into(),
        ));
    }
    let verifier = Verifier::new(anchors.clone());
    let verified = verifier
        .verify_chain(&endorsements, now)
        .and_then(|chain| verifier.verify_report(&report, &chain, now))
        .map_err(|e| untrusted(format!("its evidence does not verify: {e}")))?;
    let expected = report_data(spki_der, nonce);
    verified
        .check_report_data(&expected, &expected)
        .map_err(|_| {
            untrusted(
                "its evidence is not bound to this connection's TLS key and this request's nonce \
             (another server's evidence, or an old one)"
                    .into(),
            )
        })?;
    let claims = verified.claims();
    let decision = policy.decide(POLICY_GRANT, &claims);
    if !decision.released {
        return Err(untrusted(format!(
            "its claims do not satisfy the policy's `{POLICY_GRANT}` grant: {}",
            decision.reason
        )));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_covers_key_and_nonce() {
        let a = report_data(b"k", &[0; 32]);
        assert_ne!(a, report_data(b"k2", &[0; 32]));
        assert_ne!(a, report_data(b"k", &[1; 32]));
        assert!(spki_of(b"not a certificate").is_err());
    }
}
