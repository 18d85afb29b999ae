//! The CA versions a broker has loaded to sign with: the newest issues, every active one
//! answers OCSP (through a delegated responder it certified) and signs its CRL. Loaded from
//! the store on use, kept while their record is unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::issue::Signer;
use super::ocsp::{IssuerHashes, Responder};
use super::revoke;
use crate::Error;
use crate::keyring::Keyring;
use crate::store::Store;

/// How long a delegated OCSP responder certificate is valid; a new one is made at half.
pub const RESPONDER_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// A CRL signed at `at` for the revocations whose serials are `serials`.
struct CachedCrl {
    at: SystemTime,
    serials: Vec<String>,
    der: Vec<u8>,
}

/// How long the list of active CA versions is used before the store is read again: a CA
/// version made, certified or rotated on another replica is used here within this.
pub const ACTIVE_TTL: Duration = Duration::from_secs(5);

/// What the broker's CA signs with.
#[derive(Default)]
pub struct Authority {
    signers: Mutex<HashMap<u64, Arc<Signer>>>,
    active: Mutex<Option<(std::time::Instant, Vec<Arc<Signer>>)>>,
    responders: Mutex<HashMap<u64, Arc<Responder>>>,
    crls: Mutex<HashMap<u64, CachedCrl>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// An authority with nothing loaded.
    pub fn new() -> Authority {
        Authority::default()
    }

    /// Every active CA version, newest first, loaded (or reused while unchanged).
    pub async fn active<S: Store>(
        &self,
        store: &S,
        keyring: &Keyring,
    ) -> Result<Vec<Arc<Signer>>, Error> {
        if let Ok(g) = self.active.lock()
            && let Some((at, list)) = g.as_ref()
            && at.elapsed() < ACTIVE_TTL
        {
            return Ok(list.clone());
        }
        let records = store.broker_keys(super::ca::PURPOSE).await?;
        if records.iter().any(|r| r.key_version > keyring.current()) {
            keyring.refresh(store).await?;
        }
        let cached: HashMap<u64, Arc<Signer>> =
            self.signers.lock().map(|g| g.clone()).unwrap_or_default();
        let mut active = Vec::new();
        for record in &records {
            if let Some(signer) = Signer::load(record, keyring, cached.get(&record.version))? {
                active.push(signer);
            }
        }
        if let Ok(mut g) = self.signers.lock() {
            *g = active.iter().map(|s| (s.version, s.clone())).collect();
        }
        if let Ok(mut g) = self.active.lock() {
            *g = Some((std::time::Instant::now(), active.clone()));
        }
        Ok(active)
    }

    /// Forgets the list of active versions: the next use reads the store (this replica
    /// changed the CA).
    pub fn invalidate(&self) {
        if let Ok(mut g) = self.active.lock() {
            *g = None;
        }
    }

    /// The responder of `signer`'s CA version, certified anew when none exists or half of
    /// its validity has passed.
    pub fn responder(&self, signer: &Signer, now: SystemTime) -> Result<Arc<Responder>, Error> {
        if signer.end() <= now {
            return Err(Error::Input(format!(
                "CA version {} has expired",
                signer.version
            )));
        }
        // Reused until half its validity has passed, or to the CA's own end when that comes
        // first (a responder never outlives its CA).
        let renew_at = (now + RESPONDER_VALIDITY / 2).min(signer.end());
        if let Ok(g) = self.responders.lock()
            && let Some(r) = g.get(&signer.version)
            && r.not_after >= renew_at
        {
            return Ok(r.clone());
        }
        let responder = Arc::new(signer.certify_responder(now, RESPONDER_VALIDITY)?);
        if let Ok(mut g) = self.responders.lock() {
            g.insert(signer.version, responder.clone());
        }
        Ok(responder)
    }

    /// The CRL of CA version `version` (DER), or `None` if it is not an active version:
    /// signed again when its revocations changed or half of its validity has passed.
    pub async fn crl<S: Store>(
        &self,
        store: &S,
        keyring: &Keyring,
        version: u64,
        now: SystemTime,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Some(signer) = self
            .active(store, keyring)
            .await?
            .into_iter()
            .find(|s| s.version == version)
        else {
            return Ok(None);
        };
        let revoked = store
            .revoked_certificates(version, super::unix(now))
            .await?;
        let serials: Vec<String> = revoked.iter().map(|r| r.serial.clone()).collect();
        if let Ok(g) = self.crls.lock()
            && let Some(c) = g.get(&version)
            && c.serials == serials
            && now < c.at + revoke::CRL_VALIDITY / 2
        {
            return Ok(Some(c.der.clone()));
        }
        let der = revoke::crl(&signer, &revoked, now)?;
        if let Ok(mut g) = self.crls.lock() {
            g.insert(
                version,
                CachedCrl {
                    at: now,
                    serials,
                    der: der.clone(),
                },
            );
        }
        Ok(Some(der))
    }

    /// The issuer hashes of `signers`' certificates, in order (for OCSP CertIDs).
    pub fn hashes(signers: &[Arc<Signer>]) -> Vec<IssuerHashes> {
        signers.iter().map(|s| s.hashes.clone()).collect()
    }
}
