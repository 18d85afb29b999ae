//! The core of the broker, independent of any HTTP front end: challenge, then
//! verify → decide → seal, with every outcome audited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::policy::Policy;
use attestation::protocol::{
    AttestRequest, AttestResponse, ChallengeResponse, Evidence, SealedSecret, decode_b64,
};
use attestation::{AttestationReport, Endorsements, HclReport, VerifiedChain, Verifier};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde_json::json;

use crate::Error;
use crate::kds::{Kds, KdsError};
use crate::keys::RecordCipher;
use crate::nonce::{NonceAuthority, NonceError};
use crate::secrets::{self, SecretKind};
use crate::store::{AuditRecord, Store, StoreError, StoredSecret};

/// Most secrets one attestation may ask for.
pub const MAX_SECRETS_PER_REQUEST: usize = 32;
/// Most certificates one request may carry.
pub const MAX_CERTIFICATES: usize = 8;
const CHAIN_CACHE_ENTRIES: usize = 4096;

/// Why an attestation released nothing. Each maps to one HTTP status and problem type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request is not well formed (400).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The nonce is not acceptable (403).
    #[error("{0}")]
    Nonce(NonceError),
    /// The nonce was used before (409).
    #[error("nonce has already been used")]
    NonceReplay,
    /// Verification refused the evidence (403).
    #[error("verification failed: {0}")]
    Verification(attestation::Error),
    /// No release policy is set (403).
    #[error("no release policy is set")]
    NoPolicy,
    /// The policy refused a secret (403).
    #[error("policy refused {secret}: {reason}")]
    Policy {
        /// The secret refused.
        secret: String,
        /// The failed rules.
        reason: String,
    },
    /// A secret asked for does not exist (404).
    #[error("unknown secret {0}")]
    UnknownSecret(String),
    /// The store is unavailable (503).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// AMD's KDS is unavailable and the certificate is not cached (503).
    #[error("{0}")]
    Kds(String),
    /// Something that should not happen (500); details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl Refusal {
    /// A stable identifier for metrics and audit.
    pub fn reason(&self) -> String {
        match self {
            Refusal::Malformed(_) => "malformed".into(),
            Refusal::Nonce(NonceError::Expired) => "nonce_expired".into(),
            Refusal::Nonce(NonceError::NotIssuedHere) => "nonce_not_issued_here".into(),
            Refusal::Nonce(NonceError::Malformed) => "nonce_malformed".into(),
            Refusal::NonceReplay => "nonce_replay".into(),
            Refusal::Verification(e) => e.check().into(),
            Refusal::NoPolicy => "no_policy".into(),
            Refusal::Policy { .. } => "policy".into(),
            Refusal::UnknownSecret(_) => "unknown_secret".into(),
            Refusal::Store(_) => "store_unavailable".into(),
            Refusal::Kds(_) => "kds_unavailable".into(),
            Refusal::Internal(_) => "internal".into(),
        }
    }
}

/// The broker's release engine.
pub struct Broker<S: Store> {
    store: S,
    verifier: Verifier,
    nonces: NonceAuthority,
    cipher: RecordCipher,
    nonce_ttl: Duration,
    chains: Mutex<HashMap<[u8; 32], VerifiedChain>>,
    policy: RwLock<Option<(u64, Arc<Policy>)>>,
    kds: Option<Kds>,
    /// Until when a failed CRL fetch is not retried (per product and key kind).
    crl_backoff: Mutex<HashMap<String, SystemTime>>,
}

impl<S: Store> std::fmt::Debug for Broker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_i64(t: SystemTime) -> i64 {
    i64::try_from(unix(t)).unwrap_or(i64::MAX)
}

fn rfc3339(secs: u64) -> String {
    attestation::error::rfc3339(&secs)
}

impl<S: Store> Broker<S> {
    /// A broker over `store`.
    pub fn new(
        store: S,
        verifier: Verifier,
        nonces: NonceAuthority,
        cipher: RecordCipher,
        nonce_ttl: Duration,
    ) -> Broker<S> {
        Broker {
            store,
            verifier,
            nonces,
            cipher,
            nonce_ttl,
            chains: Mutex::new(HashMap::new()),
            policy: RwLock::new(None),
            kds: None,
            crl_backoff: Mutex::new(HashMap::new()),
        }
    }

    /// Checks AMD's CRL, from the cache or the KDS, for a chain that ends in an AMD root.
    /// When no CRL can be had, the chain is used without one (logged and audited as
    /// `crl: "unavailable"`); a CRL that is obtained is enforced.
    async fn revocation(
        &self,
        chain: VerifiedChain,
        now: SystemTime,
    ) -> Result<(VerifiedChain, &'static str), Refusal> {
        let Some(kds) = &self.kds else {
            return Ok((chain, "not configured"));
        };
        if chain.root_kind() != attestation::RootKind::Amd {
            return Ok((chain, "not applicable"));
        }
        let key = format!("{}/{}", chain.product(), chain.signing_key());
        if let Ok(b) = self.crl_backoff.lock()
            && b.get(&key).is_some_and(|until| *until > now)
        {
            return Ok((chain, "unavailable"));
        }
        match kds
            .crl(&self.store, chain.product(), chain.signing_key())
            .await
        {
            Ok(der) => {
                let checked = self
                    .verifier
                    .check_revocation(&chain, &der, now)
                    .map_err(Refusal::Verification)?;
                Ok((checked, "checked"))
            }
            Err(KdsError::Store(e)) => Err(Refusal::Store(e)),
            Err(e) => {
                tracing::warn!(error = %e, "no CRL for {key}; verifying without revocation data");
                if let Ok(mut b) = self.crl_backoff.lock() {
                    b.insert(key, now + Duration::from_secs(600));
                }
                Ok((chain, "unavailable"))
            }
        }
    }

    /// Fetches VCEKs that guests do not send from AMD's KDS (through the store's cache).
    pub fn with_kds(mut self, kds: Kds) -> Broker<S> {
        self.kds = Some(kds);
        self
    }

    /// The VCEK for a report whose guest sent none: from the cache or AMD's KDS.
    async fn fetch_vcek(&self, report: &AttestationReport) -> Result<Vec<u8>, Refusal> {
        let missing = |role| Refusal::Verification(attestation::Error::MissingCertificate { role });
        if report.signing_key() == attestation::SigningKeyKind::Vlek {
            // VLEKs are not on the KDS by chip: they come with the guest's certificate table.
            return Err(missing(attestation::CertRole::Vlek));
        }
        let Some(kds) = &self.kds else {
            return Err(missing(attestation::CertRole::Vcek));
        };
        let products = match report.cpuid_product() {
            Some(p) => vec![p],
            // Version 2 reports do not name their product; Turin never sends them.
            None => vec![attestation::Product::Milan, attestation::Product::Genoa],
        };
        for product in products {
            let chip = report.chip_id();
            let hwid = chip.get(..product.hwid_len()).unwrap_or(&[]);
            match kds
                .vcek(&self.store, product, hwid, &report.reported_tcb(product))
                .await
            {
                Ok(der) => return Ok(der),
                Err(KdsError::NotFound(_)) => continue,
                Err(KdsError::Offline(what)) => {
                    tracing::info!(%what, "VCEK not cached and KDS offline");
                    return Err(missing(attestation::CertRole::Vcek));
                }
                Err(KdsError::Store(e)) => return Err(Refusal::Store(e)),
                Err(e @ KdsError::Unavailable(_)) => return Err(Refusal::Kds(e.to_string())),
            }
        }
        Err(missing(attestation::CertRole::Vcek))
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Mints a challenge valid for the configured time from `now`.
    pub fn challenge(&self, now: SystemTime) -> Result<ChallengeResponse, Error> {
        let expires_at = unix(now) + self.nonce_ttl.as_secs();
        Ok(ChallengeResponse {
            nonce: self.nonces.mint(expires_at)?,
            expires_at: rfc3339(expires_at),
        })
    }

    /// The active policy, parsed once per version.
    async fn active_policy(&self) -> Result<Option<Arc<Policy>>, Refusal> {
        let Some(current) = self.store.active_policy().await? else {
            return Ok(None);
        };
        if let Ok(guard) = self.policy.read()
            && let Some((version, policy)) = guard.as_ref()
            && *version == current.version
        {
            return Ok(Some(policy.clone()));
        }
        let policy = Arc::new(Policy::from_json(&current.document).map_err(|e| {
            Refusal::Internal(format!(
                "stored policy v{} does not load: {e}",
                current.version
            ))
        })?);
        if let Ok(mut guard) = self.policy.write() {
            *guard = Some((current.version, policy.clone()));
        }
        Ok(Some(policy))
    }

    fn chain(&self, endorsements: &Endorsements, at: SystemTime) -> Result<VerifiedChain, Refusal> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in std::iter::once(&endorsements.vek)
            .chain(endorsements.chain.iter())
            .chain(endorsements.crls.iter())
        {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        if let Ok(cache) = self.chains.lock()
            && let Some(chain) = cache.get(&key)
        {
            // Validity is re-checked when the chain is used.
            return Ok(chain.clone());
        }
        let chain = self
            .verifier
            .verify_chain(endorsements, at)
            .map_err(Refusal::Verification)?;
        if let Ok(mut cache) = self.chains.lock() {
            if cache.len() >= CHAIN_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, chain.clone());
        }
        Ok(chain)
    }

    /// The verified endorsement chain of a parsed report (from the evidence, or the VCEK
    /// from the KDS), with revocation applied; and how the CRL was had, for the audit.
    async fn endorse(
        &self,
        parsed: &AttestationReport,
        certificates: &[attestation::protocol::CertificateEntry],
        now: SystemTime,
    ) -> Result<(VerifiedChain, &'static str), Refusal> {
        let mut endorsements = endorsements(certificates)?;
        if endorsements.vek.is_empty() {
            endorsements.vek = self.fetch_vcek(parsed).await?;
        }
        let chain = self.chain(&endorsements, now)?;
        self.revocation(chain, now).await
    }

    /// Handles an attestation: verify → decide → seal. Every outcome is audited under `peer`.
    pub async fn attest(
        &self,
        request: AttestRequest,
        peer: &str,
        now: SystemTime,
    ) -> Result<AttestResponse, Refusal> {
        let secrets_asked = request.secrets.clone();
        let evidence = match &request.evidence {
            Evidence::Snp { .. } => "snp",
            Evidence::AzSnpVtpm { .. } => "az-snp-vtpm",
        };
        let outcome = self.attest_inner(request, now).await;
        let (result, detail) = match outcome {
            Ok((response, released, claims_digest, crl)) => (
                "released",
                (
                    Ok(response),
                    json!({ "evidence": evidence, "secrets": released, "claims_sha256": claims_digest, "crl": crl }),
                ),
            ),
            Err((refusal, claims_digest)) => {
                let detail = json!({
                    "evidence": evidence,
                    "secrets": secrets_asked,
                    "reason": refusal.reason(),
                    "detail": refusal.to_string(),
                    "claims_sha256": claims_digest,
                });
                ("refused", (Err(refusal), detail))
            }
        };
        let (response, detail) = detail;
        let record = AuditRecord {
            id: 0,
            at: unix_i64(now),
            actor: format!("guest {peer}"),
            action: "attest".into(),
            outcome: result.into(),
            detail,
        };
        if let Err(e) = self.store.append_audit(&record).await {
            // Nothing is released that is not audited.
            tracing::error!(error = %e, "audit append failed; refusing the release");
            return Err(Refusal::Store(e));
        }
        response
    }

    #[allow(clippy::type_complexity)]
    async fn attest_inner(
        &self,
        request: AttestRequest,
        now: SystemTime,
    ) -> Result<
        (AttestResponse, Vec<serde_json::Value>, String, &'static str),
        (Refusal, Option<String>),
    > {
        let bare = |r: Refusal| (r, None);
        check_secret_names(&request.secrets).map_err(bare)?;
        let nonce = self
            .nonces
            .check(&request.nonce, unix(now))
            .map_err(|e| bare(Refusal::Nonce(e)))?;

        // Decode the evidence: a bare report, or an HCL report wrapping one and its quote.
        let malformed = |e: attestation::Error| bare(Refusal::Malformed(e.to_string()));
        let refused = |e: attestation::Error| bare(Refusal::Verification(e));
        let (azure, report, certificates) = match &request.evidence {
            Evidence::Snp {
                report,
                certificates,
            } => (
                None,
                decode_b64(report, "evidence.report").map_err(malformed)?,
                certificates,
            ),
            Evidence::AzSnpVtpm {
                hcl_report,
                quote,
                certificates,
            } => {
                let hcl = decode_b64(hcl_report, "evidence.hcl_report").map_err(malformed)?;
                let hcl = HclReport::parse(&hcl).map_err(refused)?;
                let quote = quote.decode().map_err(refused)?;
                let report = hcl.snp_report().to_vec();
                (Some((hcl, quote)), report, certificates)
            }
        };
        // Structure first: a malformed report is refused for that.
        let parsed = AttestationReport::parse(&report).map_err(refused)?;
        let (chain, crl) = self
            .endorse(&parsed, certificates, now)
            .await
            .map_err(bare)?;
        let verified = match &azure {
            None => self.verifier.verify_report(&report, &chain, now),
            Some((hcl, quote)) => self.verifier.verify_az_snp_vtpm(hcl, quote, &chain, now),
        }
        .map_err(refused)?;
        let claims = verified.claims();
        let claims_json = claims.to_json();
        let claims_digest = hex::encode(digest::digest(
            &digest::SHA256,
            claims_json.to_string().as_bytes(),
        ));
        let with_digest = |r: Refusal| (r, Some(claims_digest.clone()));

        let binding_key = request
            .public_key
            .binding_bytes()
            .map_err(|e| with_digest(Refusal::Malformed(e.to_string())))?;
        verified
            .check_binding(&nonce.bytes, &binding_key)
            .map_err(|e| with_digest(Refusal::Verification(e)))?;

        // Re-check expiry now: verification may have taken time (a KDS fetch with backoff),
        // and spent nonces are purged only well after they expire.
        if unix(SystemTime::now()) > nonce.expires_at {
            return Err(with_digest(Refusal::Nonce(NonceError::Expired)));
        }
        let expires = i64::try_from(nonce.expires_at).unwrap_or(i64::MAX);
        if !self
            .store
            .use_nonce(&nonce.digest(), expires)
            .await
            .map_err(|e| with_digest(e.into()))?
        {
            return Err(with_digest(Refusal::NonceReplay));
        }

        let policy = self
            .active_policy()
            .await
            .map_err(&with_digest)?
            .ok_or_else(|| with_digest(Refusal::NoPolicy))?;
        let mut records: Vec<StoredSecret> = Vec::new();
        for name in &request.secrets {
            let record = self
                .store
                .current_secret(name)
                .await
                .map_err(|e| with_digest(e.into()))?
                .ok_or_else(|| with_digest(Refusal::UnknownSecret(name.clone())))?;
            records.push(record);
        }
        for name in &request.secrets {
            let decision = policy.decide(name, &claims);
            if !decision.released {
                return Err(with_digest(Refusal::Policy {
                    secret: name.clone(),
                    reason: decision.reason,
                }));
            }
        }

        let mut sealed: Vec<SealedSecret> = Vec::new();
        let mut released = Vec::new();
        for record in &records {
            let plaintext = self
                .cipher
                .open(&record.name, record.version, &record.sealed)
                .map_err(|e| with_digest(Refusal::Internal(e.to_string())))?;
            let s = attestation::protocol::seal(
                &request.public_key,
                &record.name,
                record.version,
                &record.kind,
                &plaintext,
            )
            .map_err(|e| with_digest(Refusal::Malformed(e.to_string())))?;
            sealed.push(s);
            released.push(json!({ "name": record.name, "version": record.version }));
        }
        Ok((
            AttestResponse {
                claims: claims_json,
                secrets: sealed,
            },
            released,
            claims_digest,
            crl,
        ))
    }

    /// Stores a new version of a secret (operator action, audited).
    pub async fn put_secret(
        &self,
        name: &str,
        kind: SecretKind,
        value: &[u8],
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        if !attestation::policy::valid_name(name) {
            return Err(Error::Input(
                "secret names use letters, digits, '.', '_', '-' (1 to 128)".into(),
            ));
        }
        let meta = secrets::validate(kind, value)?;
        let mut last_err = None;
        for _ in 0..3 {
            let version = self.store.last_secret_version(name).await? + 1;
            let record = StoredSecret {
                name: name.to_string(),
                version,
                kind: kind.as_str().to_string(),
                meta: meta.clone(),
                sealed: self.cipher.seal(name, version, value)?,
            };
            match self
                .store
                .insert_secret(&record, unix_i64(now), actor)
                .await
            {
                Ok(()) => {
                    self.audit_admin(
                        actor,
                        "secret.put",
                        json!({"name": name, "version": version, "kind": kind.as_str()}),
                        now,
                    )
                    .await?;
                    return Ok(version);
                }
                Err(StoreError::Conflict(e)) => last_err = Some(StoreError::Conflict(e)),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err
            .map(Error::from)
            .unwrap_or_else(|| Error::Input("could not store the secret".into())))
    }

    /// Generates a data key of `bytes` random bytes as a new version of `name`.
    pub async fn generate_secret(
        &self,
        name: &str,
        bytes: usize,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        if !(16..=1024).contains(&bytes) {
            return Err(Error::Input("a data key is 16 to 1024 bytes".into()));
        }
        let mut value = zeroize::Zeroizing::new(vec![0u8; bytes]);
        SystemRandom::new()
            .fill(&mut value)
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        self.put_secret(name, SecretKind::DataKey, &value, actor, now)
            .await
    }

    /// Rotates a data key: a new random version of the same length.
    pub async fn rotate_secret(
        &self,
        name: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        let current = self
            .store
            .current_secret(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("secret {name}")))?;
        if current.kind != SecretKind::DataKey.as_str() {
            return Err(Error::Input(format!(
                "{name} is a {} secret: upload its new value with `broker secret put`",
                current.kind
            )));
        }
        let bytes = current.meta["bytes"].as_u64().unwrap_or(32) as usize;
        self.generate_secret(name, bytes, actor, now).await
    }

    /// Deletes every version of a secret.
    pub async fn delete_secret(
        &self,
        name: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<(), Error> {
        if !self.store.delete_secret(name, unix_i64(now)).await? {
            return Err(Error::NotFound(format!("secret {name}")));
        }
        self.audit_admin(actor, "secret.delete", json!({"name": name}), now)
            .await
    }

    /// Sets the policy (checked first) as a new version.
    pub async fn set_policy(
        &self,
        document: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        Policy::from_json(document).map_err(|e| Error::Input(e.to_string()))?;
        let version = self
            .store
            .insert_policy(document, unix_i64(now), actor)
            .await?;
        self.audit_admin(actor, "policy.set", json!({"version": version}), now)
            .await?;
        Ok(version)
    }

    async fn audit_admin(
        &self,
        actor: &str,
        action: &str,
        detail: serde_json::Value,
        now: SystemTime,
    ) -> Result<(), Error> {
        self.store
            .append_audit(&AuditRecord {
                id: 0,
                at: unix_i64(now),
                actor: actor.to_string(),
                action: action.to_string(),
                outcome: "ok".into(),
                detail,
            })
            .await?;
        Ok(())
    }
}

fn check_secret_names(names: &[String]) -> Result<(), Refusal> {
    if names.is_empty() || names.len() > MAX_SECRETS_PER_REQUEST {
        return Err(Refusal::Malformed(format!(
            "ask for 1 to {MAX_SECRETS_PER_REQUEST} secrets"
        )));
    }
    for (i, n) in names.iter().enumerate() {
        if !attestation::policy::valid_name(n) {
            return Err(Refusal::Malformed(format!(
                "secrets[{i}] is not a valid name"
            )));
        }
        if names[..i].contains(n) {
            return Err(Refusal::Malformed(format!("secrets[{i}] repeats {n}")));
        }
    }
    Ok(())
}

fn endorsements(
    entries: &[attestation::protocol::CertificateEntry],
) -> Result<Endorsements, Refusal> {
    if entries.len() > MAX_CERTIFICATES {
        return Err(Refusal::Malformed(format!(
            "at most {MAX_CERTIFICATES} certificates"
        )));
    }
    let mut e = Endorsements::default();
    for (i, c) in entries.iter().enumerate() {
        let der = decode_b64(&c.der, &format!("evidence.certificates[{i}].der"))
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        match c.kind.as_str() {
            "vcek" | "vlek" if e.vek.is_empty() => e.vek = der,
            "vcek" | "vlek" => {
                return Err(Refusal::Malformed("more than one VCEK/VLEK".into()));
            }
            "ask" | "asvk" | "ark" => e.chain.push(der),
            "crl" => e.crls.push(der),
            other => {
                return Err(Refusal::Malformed(format!(
                    "evidence.certificates[{i}].kind {other:?} is not vcek, vlek, ask, asvk, ark or crl"
                )));
            }
        }
    }
    Ok(e)
}
