//! The issuing CA's versions: create (self-signed or a request for an offline root), import
//! the certificate of a request, list.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use super::{random_serial, unix};
use crate::Error;

use crate::keyring::Keyring;
use crate::store::{AuditRecord, BrokerKey, Store, StoreError, broker_key_sealed_name};

/// The broker-key purpose of the CA's signing keys.
pub const PURPOSE: &str = "pki-ca";

/// Longest subject common name.
const MAX_SUBJECT: usize = 64;

/// Longest validity of a self-signed CA (20 years).
pub const MAX_DAYS: u32 = 7300;

/// What a CA version's public record holds (stored beside the sealed key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CaPublic {
    /// Waiting for the operator's root to sign `csr` (`broker ca import`).
    Pending {
        /// The subject's common name.
        subject: String,
        /// The certificate signing request (PEM).
        csr: String,
    },
    /// Issuing.
    Active {
        /// The subject's common name.
        subject: String,
        /// The CA certificate (PEM).
        certificate: String,
        /// The certificates above it, the root last (PEM; empty when self-signed).
        chain: Vec<String>,
        /// The end of its validity (seconds since the epoch).
        not_after: i64,
        /// SHA-256 of the certificate (hex).
        fingerprint: String,
    },
}

/// How a new CA version gets its certificate.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum NewCa {
    /// A self-signed root, valid for `days`.
    SelfSigned {
        /// Common name.
        subject: String,
        /// Validity in days (1 to [`MAX_DAYS`]).
        days: u32,
    },
    /// A request for the operator's offline root; the certificate comes with `ca import`.
    Csr {
        /// Common name.
        subject: String,
    },
}

impl NewCa {
    fn subject(&self) -> &str {
        match self {
            NewCa::SelfSigned { subject, .. } | NewCa::Csr { subject } => subject,
        }
    }
}

/// One CA version as operators see it (never the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaInfo {
    /// Version (1, 2, …).
    pub version: u64,
    /// When it was made (seconds since the epoch).
    pub created_at: i64,
    /// Its state and certificate or request.
    #[serde(flatten)]
    pub public: CaPublic,
}

fn rc(e: rcgen::Error) -> Error {
    Error::Crypto(format!("CA certificate: {e}"))
}

fn info(record: &BrokerKey) -> Result<CaInfo, Error> {
    let public: CaPublic = serde_json::from_value(record.public.clone()).map_err(|e| {
        Error::Store(StoreError::Unavailable(format!(
            "CA version {}: stored record: {e}",
            record.version
        )))
    })?;
    Ok(CaInfo {
        version: record.version,
        created_at: record.created_at,
        public,
    })
}

/// Every CA version, newest first.
pub async fn list<S: Store>(store: &S) -> Result<Vec<CaInfo>, Error> {
    store.broker_keys(PURPOSE).await?.iter().map(info).collect()
}

/// The certificates relying parties trust: every active version's certificate and chain
/// (PEM, deduplicated), newest first, whose certificate has not expired at `now`.
pub async fn bundle<S: Store>(store: &S, now: SystemTime) -> Result<String, Error> {
    let mut seen = std::collections::HashSet::new();
    let mut pem = String::new();
    for v in list(store).await? {
        if let CaPublic::Active {
            certificate,
            chain,
            not_after,
            ..
        } = v.public
        {
            if not_after < unix(now) {
                continue;
            }
            for c in std::iter::once(certificate).chain(chain) {
                if seen.insert(c.clone()) {
                    pem.push_str(&c);
                }
            }
        }
    }
    Ok(pem)
}

fn check_subject(subject: &str) -> Result<(), Error> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT || subject.chars().any(|c| c.is_control())
    {
        return Err(Error::Input(format!(
            "CA subject: 1 to {MAX_SUBJECT} printable characters"
        )));
    }
    Ok(())
}

fn ca_params(subject: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "snp-key-broker");
    dn.push(DnType::CommonName, subject);
    params.distinguished_name = dn;
    // It issues end-entity certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Makes a new CA version: the first (`rotate` false: refused if one exists) or the next
/// (`rotate` true: refused if none exists or one still waits for its certificate). The key is
/// made here and leaves the broker only sealed.
pub async fn create<S: Store>(
    store: &S,
    keyring: &Arc<Keyring>,
    new: &NewCa,
    rotate: bool,
    actor: &str,
    now: SystemTime,
) -> Result<CaInfo, Error> {
    check_subject(new.subject())?;
    let existing = list(store).await?;
    match (rotate, existing.first()) {
        (false, Some(_)) => {
            return Err(Error::Conflict(
                "the broker already has a CA; `broker ca rotate` makes a new issuing key".into(),
            ));
        }
        (true, None) => {
            return Err(Error::NotFound("a CA to rotate (broker ca init)".into()));
        }
        (true, Some(v)) if matches!(v.public, CaPublic::Pending { .. }) => {
            return Err(Error::Conflict(format!(
                "CA version {} waits for its certificate (broker ca import)",
                v.version
            )));
        }
        _ => {}
    }
    let version = existing.first().map_or(1, |v| v.version + 1);
    let key = KeyPair::generate().map_err(rc)?;
    let pkcs8 = Zeroizing::new(key.serialize_der());
    let mut params = ca_params(new.subject());
    let (public, mode) = match new {
        NewCa::SelfSigned { days, .. } => {
            if !(1..=MAX_DAYS).contains(days) {
                return Err(Error::Input(format!("CA validity: 1 to {MAX_DAYS} days")));
            }
            let not_after = now + Duration::from_secs(u64::from(*days) * 86_400);
            params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(300));
            params.not_after = time::OffsetDateTime::from(not_after);
            params.serial_number = Some(random_serial()?);
            let cert = params.self_signed(&key).map_err(rc)?;
            (
                CaPublic::Active {
                    subject: new.subject().to_string(),
                    certificate: cert.pem(),
                    chain: Vec::new(),
                    not_after: unix(not_after),
                    fingerprint: attestation::chain::fingerprint(cert.der()),
                },
                "self-signed",
            )
        }
        NewCa::Csr { .. } => {
            let csr = params
                .serialize_request(&key)
                .map_err(rc)?
                .pem()
                .map_err(rc)?;
            (
                CaPublic::Pending {
                    subject: new.subject().to_string(),
                    csr,
                },
                "csr",
            )
        }
    };
    let public_json =
        serde_json::to_value(&public).map_err(|e| Error::Crypto(format!("CA record: {e}")))?;
    let audit = AuditRecord {
        id: 0,
        at: unix(now),
        actor: actor.to_string(),
        action: if rotate {
            "pki.ca.rotate"
        } else {
            "pki.ca.create"
        }
        .into(),
        outcome: "ok".into(),
        detail: json!({
            "version": version,
            "mode": mode,
            "subject": new.subject(),
            "fingerprint": match &public {
                CaPublic::Active { fingerprint, .. } => Some(fingerprint.clone()),
                CaPublic::Pending { .. } => None,
            },
        }),
    };
    let seal = || -> Result<BrokerKey, Error> {
        let sealed = keyring.seal(&broker_key_sealed_name(PURPOSE), version, &pkcs8)?;
        Ok(BrokerKey {
            purpose: PURPOSE.into(),
            version,
            created_at: unix(now),
            public: public_json.clone(),
            sealed: sealed.bytes,
            key_version: sealed.key_version,
        })
    };
    let inserted = match store.insert_broker_key(&seal()?, &audit).await {
        // A data-key rotation began: seal again under the new key.
        Err(StoreError::OldDataKey { .. }) => {
            keyring.refresh(store).await?;
            store.insert_broker_key(&seal()?, &audit).await
        }
        other => other,
    };
    match inserted {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(Error::Conflict(format!(
                "CA version {version} was made meanwhile by another request"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(CaInfo {
        version,
        created_at: unix(now),
        public,
    })
}

/// Installs the certificate the operator's root issued for the pending version's request:
/// `pem` holds that certificate, then the certificates above it, the root last. Refused
/// unless the certificate is for the pending key, is a CA certificate allowed to sign
/// certificates, and a certificate issued under it verifies (rustls/webpki) to that root at
/// `now`.
pub async fn import<S: Store>(
    store: &S,
    keyring: &Arc<Keyring>,
    pem: &[u8],
    actor: &str,
    now: SystemTime,
) -> Result<CaInfo, Error> {
    let certs = attestation::certs::decode_pem_or_der(pem, "CA certificate")?;
    let Some(ca_der) = certs.first() else {
        return Err(Error::Input("no certificate".into()));
    };
    let records = store.broker_keys(PURPOSE).await?;
    let Some(record) = records.first() else {
        return Err(Error::NotFound("a CA (broker ca init --csr)".into()));
    };
    let current = info(record)?;
    let CaPublic::Pending { subject, .. } = &current.public else {
        return Err(Error::Conflict(format!(
            "CA version {} already has its certificate; `broker ca rotate --csr` makes a new request",
            record.version
        )));
    };
    let pkcs8 = keyring.open(
        record.key_version,
        &broker_key_sealed_name(PURPOSE),
        record.version,
        &record.sealed,
    )?;
    let key = KeyPair::try_from(pkcs8.as_slice())
        .map_err(|e| Error::Crypto(format!("CA key v{}: {e}", record.version)))?;
    let not_after = check_ca_certificate(ca_der, &key)?;
    if certs.len() < 2 {
        return Err(Error::Input(
            "give the CA certificate followed by the certificates above it, the root last".into(),
        ));
    }
    probe(&certs, &key, now)?;
    let public = CaPublic::Active {
        subject: subject.clone(),
        certificate: attestation::certs::to_pem(ca_der),
        chain: certs[1..]
            .iter()
            .map(|c| attestation::certs::to_pem(c))
            .collect(),
        not_after,
        fingerprint: attestation::chain::fingerprint(ca_der),
    };
    let public_json =
        serde_json::to_value(&public).map_err(|e| Error::Crypto(format!("CA record: {e}")))?;
    let audit = AuditRecord {
        id: 0,
        at: unix(now),
        actor: actor.to_string(),
        action: "pki.ca.import".into(),
        outcome: "ok".into(),
        detail: json!({
            "version": record.version,
            "fingerprint": attestation::chain::fingerprint(ca_der),
            "root": attestation::chain::fingerprint(certs[certs.len() - 1].as_slice()),
        }),
    };
    match store
        .set_broker_key_public(
            PURPOSE,
            record.version,
            &record.public,
            &public_json,
            &audit,
        )
        .await
    {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(Error::Conflict(format!(
                "CA version {} changed meanwhile",
                record.version
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(CaInfo {
        version: record.version,
        created_at: record.created_at,
        public,
    })
}

/// The CA certificate is for `key`, may sign certificates; its notAfter.
fn check_ca_certificate(der_bytes: &[u8], key: &KeyPair) -> Result<i64, Error> {
    use der::{Decode, Encode};
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
    let cert = x509_cert::Certificate::from_der(der_bytes)
        .map_err(|e| Error::Input(format!("CA certificate: {e}")))?;
    let tbs = cert.tbs_certificate();
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Error::Input(format!("CA certificate: {e}")))?;
    if spki != rcgen::PublicKeyData::subject_public_key_info(key) {
        return Err(Error::Input(
            "the certificate is for another key than the pending CA request's".into(),
        ));
    }
    let is_ca = tbs
        .get_extension::<BasicConstraints>()
        .map_err(|e| Error::Input(format!("CA certificate: basicConstraints: {e}")))?
        .is_some_and(|(_, bc)| bc.ca);
    if !is_ca {
        return Err(Error::Input(
            "the certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
        ));
    }
    let may_sign = tbs
        .get_extension::<KeyUsage>()
        .map_err(|e| Error::Input(format!("CA certificate: keyUsage: {e}")))?
        .is_none_or(|(_, ku)| {
            ku.0.contains(KeyUsages::KeyCertSign) && ku.0.contains(KeyUsages::CRLSign)
        });
    if !may_sign {
        return Err(Error::Input(
            "the certificate's key usage must allow keyCertSign and cRLSign (it signs the CRLs of what it issues)"
                .into(),
        ));
    }
    let not_after = tbs.validity().not_after.to_unix_duration().as_secs();
    Ok(i64::try_from(not_after).unwrap_or(i64::MAX))
}

/// Issues a throwaway certificate under the imported CA and verifies it with rustls/webpki to
/// the root at `now`: what relying parties will do with every certificate the CA issues.
fn probe(certs: &[Vec<u8>], key: &KeyPair, now: SystemTime) -> Result<(), Error> {
    let ca = CertificateDer::from(certs[0].as_slice());
    let issuer = Issuer::from_ca_cert_der(&ca, key)
        .map_err(|e| Error::Input(format!("CA certificate: {e}")))?;
    let probe_key = KeyPair::generate().map_err(rc)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(
        "probe.pki.invalid"
            .try_into()
            .map_err(|e| Error::Crypto(format!("probe name: {e}")))?,
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
    params.not_after = time::OffsetDateTime::from(now + Duration::from_secs(60));
    params.serial_number = Some(random_serial()?);
    let leaf = params.signed_by(&probe_key, &issuer).map_err(rc)?;

    let root = CertificateDer::from(certs[certs.len() - 1].as_slice());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(root.clone())
        .map_err(|e| Error::Input(format!("the root: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| Error::Input(format!("the root: {e}")))?;
    let intermediates: Vec<CertificateDer<'_>> = certs[..certs.len() - 1]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let at = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| Error::Input("time before 1970".into()))?,
    );
    let name = ServerName::try_from("probe.pki.invalid")
        .map_err(|e| Error::Crypto(format!("probe name: {e}")))?;
    verifier
        .verify_server_cert(leaf.der(), &intermediates, &name, &[], at)
        .map_err(|e| {
            Error::Input(format!(
                "certificates issued under this CA certificate would not verify to the root given last: {e}"
            ))
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    async fn setup() -> (tempfile::TempDir, crate::store::SqliteStore, Arc<Keyring>) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("b.db"))
            .await
            .unwrap();
        let ring = Keyring::new(MasterKey::generate().unwrap(), Duration::from_secs(60)).unwrap();
        (dir, store, Arc::new(ring))
    }

    fn self_signed(subject: &str, days: u32) -> NewCa {
        NewCa::SelfSigned {
            subject: subject.into(),
            days,
        }
    }

    #[tokio::test]
    async fn versions_and_their_refusals() {
        let (_dir, store, ring) = setup().await;
        let now = SystemTime::now();
        for (new, expected) in [
            (self_signed("", 10), "subject"),
            (self_signed(&"x".repeat(65), 10), "subject"),
            (self_signed("a\nb", 10), "subject"),
            (self_signed("ok", 0), "validity"),
            (self_signed("ok", MAX_DAYS + 1), "validity"),
        ] {
            let e = create(&store, &ring, &new, false, "op", now)
                .await
                .unwrap_err();
            assert!(matches!(&e, Error::Input(d) if d.contains(expected)), "{e}");
        }
        assert!(matches!(
            create(&store, &ring, &self_signed("ca", 10), true, "op", now).await,
            Err(Error::NotFound(_))
        ));
        let v1 = create(&store, &ring, &self_signed("ca", 10), false, "op", now)
            .await
            .unwrap();
        assert_eq!(v1.version, 1);
        assert!(matches!(
            create(&store, &ring, &self_signed("ca", 10), false, "op", now).await,
            Err(Error::Conflict(_))
        ));
        let pending = NewCa::Csr {
            subject: "next".into(),
        };
        let v2 = create(&store, &ring, &pending, true, "op", now)
            .await
            .unwrap();
        assert!(matches!(v2.public, CaPublic::Pending { .. }));
        // While version 2 waits for its certificate, no version 3.
        assert!(matches!(
            create(&store, &ring, &self_signed("ca", 10), true, "op", now).await,
            Err(Error::Conflict(_))
        ));
        // The key is sealed under its broker-key name and opens to a P-256 PKCS#8 key.
        let records = store.broker_keys(PURPOSE).await.unwrap();
        let pkcs8 = ring
            .open(
                records[1].key_version,
                &broker_key_sealed_name(PURPOSE),
                1,
                &records[1].sealed,
            )
            .unwrap();
        let key = KeyPair::try_from(pkcs8.as_slice()).unwrap();
        let CaPublic::Active { certificate, .. } = &v1.public else {
            panic!("v1 is self-signed")
        };
        let der = attestation::certs::decode_pem_or_der(certificate.as_bytes(), "ca").unwrap();
        assert_eq!(
            check_ca_certificate(&der[0], &key).map(|_| ()).ok(),
            Some(())
        );
        // The bundle holds the active version only, and nothing once it has expired.
        let pem = bundle(&store, now).await.unwrap();
        assert_eq!(pem, *certificate);
        let later = now + Duration::from_secs(11 * 86_400);
        assert_eq!(bundle(&store, later).await.unwrap(), "");
    }

    #[tokio::test]
    async fn an_import_needs_a_pending_request() {
        let (_dir, store, ring) = setup().await;
        let now = SystemTime::now();
        assert!(matches!(
            import(&store, &ring, b"", "op", now).await,
            Err(Error::Input(_))
        ));
        let v1 = create(&store, &ring, &self_signed("ca", 10), false, "op", now)
            .await
            .unwrap();
        let CaPublic::Active { certificate, .. } = v1.public else {
            panic!("self-signed")
        };
        let chain = format!("{certificate}{certificate}");
        assert!(matches!(
            import(&store, &ring, chain.as_bytes(), "op", now).await,
            Err(Error::Conflict(_))
        ));
    }
}
