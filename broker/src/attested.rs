//! A broker that proves itself: when it runs in a SEV-SNP VM it serves its own attestation
//! report at `GET /v1/broker/evidence?nonce=<64 hex digits>`, with REPORT_DATA binding the
//! public key of its TLS server certificate and the caller's nonce. An operator CLI (or a
//! guest agent) that requires it verifies that evidence with the same verifier and policy
//! grammar guests are judged by, checks the binding against the key of the TLS connection it
//! is using, and only then sends anything; from then on its connections accept no other server
//! key.

use std::time::SystemTime;

use attestation::policy::Policy;
use attestation::{Claims, TrustAnchors};

pub use attestation::broker_evidence::{
    BINDING_LABEL, BrokerEvidence, POLICY_GRANT, report_data, spki_of,
};

use crate::Error;

/// The evidence for `nonce`, bound to `spki_der`, from `platform`.
pub fn make_evidence(
    platform: &dyn crate::platform::Platform,
    spki_der: &[u8],
    nonce: &[u8; 32],
) -> Result<BrokerEvidence, Error> {
    use aws_lc_rs::digest;
    Ok(BrokerEvidence {
        version: 1,
        nonce: hex::encode(nonce),
        spki_sha256: hex::encode(digest::digest(&digest::SHA256, spki_der)),
        evidence: platform.report(report_data(spki_der, nonce))?,
    })
}

/// What the caller trusts the broker to be: a policy whose grant `broker` the broker's
/// claims must satisfy, and AMD's roots (plus a simulated one in tests and demos).
pub struct BrokerPolicy {
    policy: Policy,
    anchors: TrustAnchors,
}

impl std::fmt::Debug for BrokerPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerPolicy").finish_non_exhaustive()
    }
}

impl BrokerPolicy {
    /// Loads `policy` (the release-policy grammar; its grant `broker` is what is checked) and
    /// AMD's roots, plus the simulated root in `dangerous_simulated_root`.
    pub fn load(
        policy: &std::path::Path,
        dangerous_simulated_root: Option<&std::path::Path>,
    ) -> Result<BrokerPolicy, Error> {
        let text = std::fs::read_to_string(policy).map_err(|source| Error::Read {
            path: policy.to_path_buf(),
            source,
        })?;
        let policy_doc = Policy::from_json(&text)
            .map_err(|e| Error::Input(format!("{}: {e}", policy.display())))?;
        let mut anchors = TrustAnchors::amd()?;
        if let Some(root) = dangerous_simulated_root {
            tracing::warn!(
                path = %root.display(),
                "DANGEROUS: trusting a SIMULATED root for the broker's evidence"
            );
            anchors = crate::evidence::trust_simulated_root(
                anchors,
                root,
                "--dangerous-broker-simulated-root",
            )?;
        }
        Ok(BrokerPolicy {
            policy: policy_doc,
            anchors,
        })
    }

    /// Verifies `evidence` as the broker's: the report and its endorsements, the binding to
    /// `spki_der` (the key of the connection the caller holds) and `nonce` (the caller's),
    /// then the policy's `broker` grant. The claims, or why not.
    pub fn verify(
        &self,
        evidence: &BrokerEvidence,
        spki_der: &[u8],
        nonce: &[u8; 32],
        now: SystemTime,
    ) -> Result<Claims, Error> {
        attestation::broker_evidence::verify(
            evidence,
            &self.anchors,
            &self.policy,
            spki_der,
            nonce,
            now,
        )
        .map_err(|e| match e {
            attestation::Error::UntrustedBroker { detail } => Error::UntrustedBroker(detail),
            other => Error::UntrustedBroker(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attestation::Product;
    use attestation::sim::ReportFields;

    struct Setup {
        _dir: tempfile::TempDir,
        platform: crate::platform::Simulated,
        root: std::path::PathBuf,
        policy: std::path::PathBuf,
    }

    fn setup(measurement: [u8; 48], pinned: [u8; 48]) -> Setup {
        let dir = crate::platform::test_sim_dir();
        let mut fields = ReportFields::new(Product::Genoa);
        fields.measurement = measurement;
        let platform = crate::platform::Simulated::load(dir.path(), fields).unwrap();
        let policy = dir.path().join("broker-policy.json");
        std::fs::write(
            &policy,
            serde_json::json!({
                "rules": { "our-broker": { "allOf": [
                    { "claim": "root", "equals": "simulated" },
                    { "claim": "measurement", "equals": hex::encode(pinned) },
                    { "claim": "policy.debug_allowed", "equals": false }
                ]}},
                "secrets": { "broker": ["our-broker"] }
            })
            .to_string(),
        )
        .unwrap();
        Setup {
            root: dir.path().join("ark.pem"),
            _dir: dir,
            platform,
            policy,
        }
    }

    #[test]
    fn the_broker_is_trusted_only_bound_fresh_and_measured() {
        let s = setup([0x11; 48], [0x11; 48]);
        let policy = BrokerPolicy::load(&s.policy, Some(&s.root)).unwrap();
        let (spki, other_spki) = (b"spki of the server".to_vec(), b"another server".to_vec());
        let nonce = [7u8; 32];
        let ev = make_evidence(&s.platform, &spki, &nonce).unwrap();
        let now = SystemTime::now();
        let claims = policy.verify(&ev, &spki, &nonce, now).unwrap();
        assert_eq!(claims.measurement, hex::encode([0x11; 48]));

        // Bound to another key (a relay that terminates TLS with its own certificate).
        let e = policy.verify(&ev, &other_spki, &nonce, now).unwrap_err();
        assert!(
            matches!(e, Error::UntrustedBroker(ref m) if m.contains("not bound")),
            "{e}"
        );
        // A stale report: made for another nonce.
        let e = policy.verify(&ev, &spki, &[8u8; 32], now).unwrap_err();
        assert!(
            matches!(e, Error::UntrustedBroker(ref m) if m.contains("not bound")),
            "{e}"
        );
        // Without its VCEK.
        let mut bare = ev.clone();
        if let attestation::protocol::Evidence::Snp { certificates, .. } = &mut bare.evidence {
            certificates.retain(|c| c.kind != "vcek");
        }
        assert!(policy.verify(&bare, &spki, &nonce, now).is_err());
        // Another format.
        let mut v2 = ev.clone();
        v2.version = 2;
        assert!(policy.verify(&v2, &spki, &nonce, now).is_err());

        // Another measurement than the policy pins.
        let other = setup([0x22; 48], [0x11; 48]);
        let policy = BrokerPolicy::load(&other.policy, Some(&other.root)).unwrap();
        let ev = make_evidence(&other.platform, &spki, &nonce).unwrap();
        let e = policy.verify(&ev, &spki, &nonce, now).unwrap_err();
        assert!(
            matches!(e, Error::UntrustedBroker(ref m) if m.contains("measurement")),
            "{e}"
        );
        // A simulated broker without the simulated root trusted: its chain does not verify.
        let amd_only = BrokerPolicy::load(&other.policy, None).unwrap();
        let e = amd_only.verify(&ev, &spki, &nonce, now).unwrap_err();
        assert!(
            matches!(e, Error::UntrustedBroker(ref m) if m.contains("does not verify")),
            "{e}"
        );
    }
}
