//! Revocation: by an operator (`broker cert revoke`), or automatically when a new policy no
//! longer grants what a certificate was issued for; and the CRL of each CA version.

use std::time::{Duration, SystemTime};

use attestation::policy::{Policy, RequestedName};
use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams};
use serde_json::json;

use super::issue::Signer;
use super::unix;
use crate::Error;
use crate::store::{AuditRecord, IssuedRecord, Store};

/// How long a CRL may be relied on (its nextUpdate); it is signed again when a certificate
/// of its CA is revoked, and by the time half of this has passed.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Why a certificate is revoked (RFC 5280 reason codes an operator may give).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No reason given.
    Unspecified,
    /// Its key is, or may be, known to others.
    KeyCompromise,
    /// Its holder's name or role changed.
    AffiliationChanged,
    /// Replaced by another certificate.
    Superseded,
    /// Its holder no longer runs.
    CessationOfOperation,
    /// What it was issued for is no longer granted (set by the broker on a policy change).
    PrivilegeWithdrawn,
}

impl Reason {
    /// Every reason, with its keyword.
    pub const ALL: [(Reason, &'static str); 6] = [
        (Reason::Unspecified, "unspecified"),
        (Reason::KeyCompromise, "keyCompromise"),
        (Reason::AffiliationChanged, "affiliationChanged"),
        (Reason::Superseded, "superseded"),
        (Reason::CessationOfOperation, "cessationOfOperation"),
        (Reason::PrivilegeWithdrawn, "privilegeWithdrawn"),
    ];

    /// The RFC 5280 keyword.
    pub fn name(self) -> &'static str {
        Reason::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("unspecified", |(_, n)| n)
    }

    /// Parses a keyword.
    pub fn parse(name: &str) -> Option<Reason> {
        Reason::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(r, _)| *r)
    }

    /// The RFC 5280 CRLReason code.
    pub fn code(self) -> u8 {
        match self {
            Reason::Unspecified => 0,
            Reason::KeyCompromise => 1,
            Reason::AffiliationChanged => 3,
            Reason::Superseded => 4,
            Reason::CessationOfOperation => 5,
            Reason::PrivilegeWithdrawn => 9,
        }
    }

    fn rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// A serial as operators type it (hex, any case, optional `0x` and colons) in the store's
/// form (lowercase hex).
pub fn normalize_serial(serial: &str) -> Result<String, Error> {
    let s: String = serial
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if s.is_empty() || s.len() > 40 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Input(format!(
            "{serial:?} is not a certificate serial (hex)"
        )));
    }
    Ok(s)
}

/// Revokes the certificate `serial` (audited as `pki.cert.revoke` with `reason`); the record
/// as it now is. `NotFound` for a serial never issued; a certificate revoked already keeps
/// its first revocation (`Conflict`).
pub async fn revoke<S: Store>(
    store: &S,
    serial: &str,
    reason: Reason,
    actor: &str,
    now: SystemTime,
) -> Result<IssuedRecord, Error> {
    let serial = normalize_serial(serial)?;
    let Some(record) = store.issued_certificate(&serial).await? else {
        return Err(Error::NotFound(format!(
            "a certificate with serial {serial}"
        )));
    };
    if record.revoked_at.is_some() {
        return Err(Error::Conflict(format!(
            "certificate {serial} was revoked already ({})",
            record.revocation_reason.as_deref().unwrap_or("unspecified")
        )));
    }
    let audit = AuditRecord {
        id: 0,
        at: unix(now),
        actor: actor.to_string(),
        action: "pki.cert.revoke".into(),
        outcome: "ok".into(),
        detail: json!({
            "serial": serial,
            "reason": reason.name(),
            "profile": record.profile,
            "names": record.names,
            "ca_version": record.ca_version,
        }),
    };
    if !store
        .revoke_certificate(&serial, unix(now), reason.name(), &audit)
        .await?
    {
        return Err(Error::Conflict(format!(
            "certificate {serial} was revoked meanwhile"
        )));
    }
    store
        .issued_certificate(&serial)
        .await?
        .ok_or_else(|| Error::NotFound(format!("a certificate with serial {serial}")))
}

fn requested(name: &str) -> Option<RequestedName> {
    let (kind, value) = name.split_once(':')?;
    match kind {
        "dns" => Some(RequestedName::Dns(value.to_string())),
        "ip" => value.parse().ok().map(RequestedName::Ip),
        "uri" => Some(RequestedName::Uri(value.to_string())),
        _ => None,
    }
}

/// The extended key usages a certificate carries (those a profile can grant; any other
/// makes it ungranted).
fn usages_of(der_bytes: &[u8]) -> Option<Vec<attestation::policy::Usage>> {
    use attestation::policy::Usage;
    use der::Decode;
    use x509_cert::ext::pkix::ExtendedKeyUsage;
    let cert = x509_cert::Certificate::from_der(der_bytes).ok()?;
    let (_, eku) = cert
        .tbs_certificate()
        .get_extension::<ExtendedKeyUsage>()
        .ok()??;
    eku.0
        .iter()
        .map(|oid| match oid.to_string().as_str() {
            "1.3.6.1.5.5.7.3.1" => Some(Usage::ServerAuth),
            "1.3.6.1.5.5.7.3.2" => Some(Usage::ClientAuth),
            _ => None,
        })
        .collect()
}

/// Whether `policy` still grants what `record` was issued for: a rule of its profile holds
/// for the claims it was issued on, and the profile grants each of its names, each of its
/// extended key usages and a lifetime as long as its own.
pub fn still_granted(policy: &Policy, record: &IssuedRecord) -> bool {
    let Some(profile) = policy.certificate_profile(&record.profile) else {
        return false;
    };
    // Issued from a minute back: that minute is not part of the granted lifetime.
    let lifetime = record.not_after - record.not_before - 60;
    let lifetime_granted = u64::try_from(lifetime).is_ok_and(|l| l <= profile.max_lifetime_secs());
    let usages_granted = usages_of(&record.certificate)
        .is_some_and(|u| u.iter().all(|x| profile.usages().contains(x)));
    policy
        .decide_certificate(&record.profile, &record.claims)
        .released
        && lifetime_granted
        && usages_granted
        && record
            .names
            .iter()
            .all(|n| requested(n).is_some_and(|r| profile.permits(&r)))
}

/// Revokes (reason privilegeWithdrawn, audited) every unexpired certificate that `policy`,
/// just set as version `policy_version` by `actor`, no longer grants; their serials.
pub async fn revoke_withdrawn<S: Store>(
    store: &S,
    policy: &Policy,
    policy_version: u64,
    actor: &str,
    now: SystemTime,
) -> Result<Vec<String>, Error> {
    let mut revoked = Vec::new();
    for record in store.unexpired_certificates(unix(now)).await? {
        if still_granted(policy, &record) {
            continue;
        }
        // A newer policy set meanwhile decides instead (its own pass revokes what it drops):
        // never revoke, finally, on a policy that is no longer the active one.
        if store.active_policy().await?.map(|p| p.version) != Some(policy_version) {
            break;
        }
        let by = format!("{actor} (policy v{policy_version})");
        match revoke(store, &record.serial, Reason::PrivilegeWithdrawn, &by, now).await {
            Ok(_) => revoked.push(record.serial),
            // Revoked meanwhile by someone else: what matters is that it is revoked.
            Err(Error::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(revoked)
}

/// The CRL of `signer`'s CA version at `now`: every revoked certificate it issued that has
/// not expired, numbered by `now` (seconds: increasing), valid for [`CRL_VALIDITY`].
pub fn crl(signer: &Signer, revoked: &[IssuedRecord], now: SystemTime) -> Result<Vec<u8>, Error> {
    let at = |secs: i64| {
        time::OffsetDateTime::from(
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
        )
    };
    let revoked_certs = revoked
        .iter()
        .filter(|r| r.ca_version == signer.version)
        .filter_map(|r| {
            let serial = hex::decode(&r.serial).ok()?;
            let reason = r
                .revocation_reason
                .as_deref()
                .and_then(Reason::parse)
                .unwrap_or(Reason::Unspecified);
            Some(RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&serial),
                revocation_time: at(r.revoked_at?),
                // RFC 5280 §5.3.1: no reason code rather than `unspecified`.
                reason_code: (reason != Reason::Unspecified).then(|| reason.rcgen()),
                invalidity_date: None,
            })
        })
        .collect();
    // Numbered by the signing time in milliseconds: two CRLs of one CA version never share a
    // number (one is signed at most per revocation change or half validity).
    let number = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let params = CertificateRevocationListParams {
        this_update: at(unix(now)),
        next_update: time::OffsetDateTime::from(now + CRL_VALIDITY),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        // The CA certificate's own key identifier (what its certificates' AKI carry), so that
        // relying parties match the CRL to its issuer; SHA-256 of the key if it has none.
        key_identifier_method: signer
            .subject_key_identifier()
            .map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified),
    };
    signer.sign_crl(&params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_serials() {
        for (r, name) in Reason::ALL {
            assert_eq!(Reason::parse(name), Some(r));
            assert_eq!(r.name(), name);
        }
        assert_eq!(Reason::parse("certificateHold"), None);
        assert_eq!(Reason::PrivilegeWithdrawn.code(), 9);
        assert_eq!(normalize_serial("0x0A:bC").unwrap(), "0abc");
        for bad in ["", "xyz", &"a".repeat(41)] {
            assert!(matches!(normalize_serial(bad), Err(Error::Input(_))));
        }
        assert_eq!(
            requested("ip:10.0.0.1"),
            Some(RequestedName::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(requested("email:a@b"), None);
    }
}
