//! The core of the broker, independent of any HTTP front end: challenge, then
//! verify → decide → seal, with every outcome audited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attestation::policy::Policy;
use attestation::protocol::{
    AttestRequest, AttestResponse, ChallengeResponse, Evidence, IssuedCertificate, PublicKey,
    SealedSecret, decode_b64,
};
use attestation::{AttestationReport, Endorsements, HclReport, VerifiedChain, Verifier};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde_json::json;

use crate::Error;
use crate::kds::{Kds, KdsError};
use crate::keyring::Keyring;
use crate::nonce::{NonceAuthority, NonceError};
use crate::secrets::{self, SecretKind};
use crate::store::{
    AuditRecord, Committed, DecisionInputs, IssuedRecord, PolicyRef, Spend, Store, StoreError,
    StoredSecret,
};

/// Most secrets one attestation may ask for.
pub const MAX_SECRETS_PER_REQUEST: usize = 32;
/// Most certificates one request may carry.
pub const MAX_CERTIFICATES: usize = 8;
const CHAIN_CACHE_ENTRIES: usize = 4096;
/// A release whose inputs (secrets, policy) changed before its commit is decided again on
/// the new ones: at least this many times...
const STALE_RETRIES: usize = 4;
/// ...and then for as long as this since its first try, so that a burst of admin writes
/// (each a new generation) does not refuse releases that kept losing the race to them.
const STALE_PATIENCE: Duration = Duration::from_secs(2);

/// Whether a release decided `attempts` times, first at `started`, all found stale, is
/// decided again at `now`.
fn decide_again(attempts: usize, started: Instant, now: Instant) -> bool {
    attempts < STALE_RETRIES || now.saturating_duration_since(started) < STALE_PATIENCE
}

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
    /// A certificate asked for cannot be issued under its profile: a name it does not grant,
    /// or no active CA (403).
    #[error("certificate {profile}: {reason}")]
    Certificate {
        /// The profile asked under.
        profile: String,
        /// Why, naming the name.
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
    /// This source has too many attestations of this kind in flight (429).
    #[error("{0}")]
    Busy(String),
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
            Refusal::Certificate { .. } => "certificate".into(),
            Refusal::UnknownSecret(_) => "unknown_secret".into(),
            Refusal::Store(_) => "store_unavailable".into(),
            Refusal::Kds(_) => "kds_unavailable".into(),
            Refusal::Busy(_) => "rate_limited".into(),
            Refusal::Internal(_) => "internal".into(),
        }
    }
}

/// The broker's release engine.
pub struct Broker<S: Store> {
    store: S,
    verifier: Verifier,
    nonces: NonceAuthority,
    keyring: Arc<Keyring>,
    nonce_ttl: Duration,
    chains: Mutex<HashMap<[u8; 32], VerifiedChain>>,
    /// The newest parsed policy versions (at most two: a decision that read the previous
    /// version in its transaction still finds it while a newer one is being cached).
    policy: RwLock<Vec<(u64, Arc<Policy>)>>,
    kds: Option<Kds>,
    /// Until when a failed CRL fetch is not retried (per product and key kind).
    crl_backoff: Mutex<HashMap<String, SystemTime>>,
    /// Which unauthenticated refusals get an audit row of their own.
    sampler: crate::audit::Sampler,
    /// KDS-driven attestations in flight per source: reports without certificates make the
    /// broker ask AMD's KDS for attacker-chosen chip IDs, so one source gets few at once.
    kds_sources: Arc<crate::limit::KeyLimiter<String>>,
    /// Nonces this broker saw spent (digest → expiry): a replay to the same replica is
    /// refused before it is decided and sealed. Only a shortcut: the store's spend is what
    /// makes a nonce single-use, across replicas too.
    spent: Mutex<HashMap<[u8; 32], u64>>,
    /// The private CA's versions, loaded when first needed (and again when the store shows
    /// a change), and the URLs its certificates name.
    pki: crate::pki::authority::Authority,
    pki_urls: Option<crate::pki::issue::PkiUrls>,
}

/// A policy set: its version and the certificates it revoked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicySet {
    /// The new version.
    pub version: u64,
    /// Serials of the certificates revoked because it no longer grants them.
    pub revoked: Vec<String>,
}

/// What a release decision produced: the answer, the audit's list of secrets, and the
/// certificates to record with it.
struct SealedRelease {
    response: AttestResponse,
    released: Vec<serde_json::Value>,
    issued: Vec<IssuedRecord>,
}

/// Spent nonces remembered per broker (about 40 bytes each).
const SPENT_REMEMBERED: usize = 100_000;

/// KDS-driven attestations one source may have in flight.
pub const KDS_LOOKUPS_PER_SOURCE: usize = 2;

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
        keyring: Arc<Keyring>,
        nonce_ttl: Duration,
    ) -> Broker<S> {
        Broker {
            store,
            verifier,
            nonces: NonceAuthority::new(keyring.clone()),
            keyring,
            nonce_ttl,
            chains: Mutex::new(HashMap::new()),
            policy: RwLock::new(Vec::new()),
            kds: None,
            crl_backoff: Mutex::new(HashMap::new()),
            sampler: crate::audit::Sampler::new(crate::audit::SampleBudget::default()),
            kds_sources: crate::limit::KeyLimiter::new(KDS_LOOKUPS_PER_SOURCE),
            spent: Mutex::new(HashMap::new()),
            pki: crate::pki::authority::Authority::new(),
            pki_urls: None,
        }
    }

    /// Certificates the private CA issues name the OCSP responder, CA certificate and CRL
    /// under `base` (`[pki] base_url`).
    pub fn with_pki_urls(mut self, base: Option<String>) -> Broker<S> {
        self.pki_urls = base.map(|base| crate::pki::issue::PkiUrls { base });
        self
    }

    /// The private CA's loaded versions.
    pub fn pki(&self) -> &crate::pki::authority::Authority {
        &self.pki
    }

    /// The private CA's newest active version, for issuing (`profile`: the first profile
    /// asked for, to name in a refusal).
    async fn certificate_signer(
        &self,
        profile: &str,
    ) -> Result<Arc<crate::pki::issue::Signer>, Refusal> {
        let active = self
            .pki
            .active(&self.store, &self.keyring)
            .await
            .map_err(|e| match e {
                Error::Store(e) => Refusal::Store(e),
                other => Refusal::Internal(other.to_string()),
            })?;
        active
            .into_iter()
            .next()
            .ok_or_else(|| Refusal::Certificate {
                profile: profile.to_string(),
                reason: "this broker has no active CA (broker ca init)".into(),
            })
    }

    /// Remembers a spent nonce until it expires (forgetting expired ones, or all of them,
    /// when the table is full: it is only a shortcut).
    fn remember_spent(&self, checked: &Checked, now: u64) {
        if let Ok(mut spent) = self.spent.lock() {
            if spent.len() >= SPENT_REMEMBERED {
                spent.retain(|_, expires| *expires >= now);
                if spent.len() >= SPENT_REMEMBERED {
                    spent.clear();
                }
            }
            spent.insert(checked.nonce_digest, checked.nonce_expires_at);
        }
    }

    fn seen_spent(&self, checked: &Checked) -> bool {
        self.spent
            .lock()
            .map(|s| s.contains_key(&checked.nonce_digest))
            .unwrap_or(false)
    }

    /// Sets the audit budget for unauthenticated refusals.
    pub fn with_audit_budget(mut self, budget: crate::audit::SampleBudget) -> Broker<S> {
        self.sampler = crate::audit::Sampler::new(budget);
        self
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
    /// The VCEK (DER) that signed `report` (raw bytes), from AMD's KDS through the cache: for
    /// the broker's own evidence when its host hands out no certificates.
    pub async fn vcek_for(&self, report: &[u8]) -> Result<Vec<u8>, Error> {
        let parsed = AttestationReport::parse(report)?;
        self.fetch_vcek(&parsed, "self")
            .await
            .map_err(|r| Error::Config(format!("the broker's own VCEK: {r}")))
    }

    async fn fetch_vcek(&self, report: &AttestationReport, peer: &str) -> Result<Vec<u8>, Refusal> {
        let missing = |role| Refusal::Verification(attestation::Error::MissingCertificate { role });
        if report.signing_key() == attestation::SigningKeyKind::Vlek {
            // VLEKs are not on the KDS by chip: they come with the guest's certificate table.
            return Err(missing(attestation::CertRole::Vlek));
        }
        let Some(kds) = &self.kds else {
            return Err(missing(attestation::CertRole::Vcek));
        };
        let Some(_turn) = self.kds_sources.acquire(crate::limit::source_label(peer)) else {
            return Err(Refusal::Busy(format!(
                "{KDS_LOOKUPS_PER_SOURCE} attestations that need AMD's KDS are already in flight from this source"
            )));
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
                Err(e @ (KdsError::Unavailable(_) | KdsError::Busy)) => {
                    return Err(Refusal::Kds(e.to_string()));
                }
            }
        }
        Err(missing(attestation::CertRole::Vcek))
    }

    /// How long challenge nonces live.
    pub fn nonce_ttl(&self) -> Duration {
        self.nonce_ttl
    }

    /// The data keys (for the broker's own keys, sealed like secrets).
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
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
        peer: &str,
        now: SystemTime,
    ) -> Result<(VerifiedChain, &'static str), Refusal> {
        let mut endorsements = endorsements(certificates)?;
        if endorsements.vek.is_empty() {
            endorsements.vek = self.fetch_vcek(parsed, peer).await?;
        }
        let chain = self.chain(&endorsements, now)?;
        self.revocation(chain, now).await
    }

    /// Handles an attestation: [`check`](Self::check) then [`release`](Self::release). Every
    /// outcome is audited under `peer` (refusals before the nonce is spent through the
    /// sampler, see [`crate::audit`]).
    pub async fn attest(
        &self,
        request: AttestRequest,
        peer: &str,
        now: SystemTime,
    ) -> Result<AttestResponse, Refusal> {
        let checked = self.check(request, peer, now).await?;
        self.release(checked, now).await
    }

    /// Everything that can be decided before the nonce is spent: secret names, the nonce's
    /// authenticator and expiry, the evidence's structure, the endorsement chain, the report
    /// and the binding. Writes nothing but the KDS cache, so it may be abandoned at any await
    /// (a client that goes away cancels it). A refusal here is audited through the sampler.
    pub async fn check(
        &self,
        request: AttestRequest,
        peer: &str,
        now: SystemTime,
    ) -> Result<Checked, Refusal> {
        self.check_attempt(Attempt::native(request), peer, now)
            .await
    }

    /// [`Self::check`] for any front end's attempt (the native protocol's, or the KBS
    /// protocol's with its own binding and no secrets named yet).
    pub async fn check_attempt(
        &self,
        attempt: Attempt,
        peer: &str,
        now: SystemTime,
    ) -> Result<Checked, Refusal> {
        let evidence = evidence_kind(&attempt.evidence);
        let front_end = attempt.front_end;
        let asked = attempt.secrets.clone();
        match self.check_inner(attempt, peer, now).await {
            Ok(checked) => Ok(checked),
            Err((refusal, claims_digest)) => {
                let record = AuditRecord {
                    id: 0,
                    at: unix_i64(now),
                    actor: format!("guest {peer}"),
                    action: "attest".into(),
                    outcome: "refused".into(),
                    detail: json!({
                        "front_end": front_end.name(),
                        "evidence": evidence,
                        "secrets": crate::audit::names(&asked),
                        "reason": refusal.reason(),
                        "detail": crate::audit::truncate(&refusal.to_string()),
                        "claims_sha256": claims_digest,
                    }),
                };
                let kind = format!("attest/{}", refusal.reason());
                // Refused after AMD's chain and the report's signature verified (that is,
                // with a claims digest): a genuine platform, on its own budget.
                let class = if record.detail["claims_sha256"].is_string() {
                    crate::audit::Class::Verified
                } else {
                    crate::audit::Class::Anonymous
                };
                self.audit_unauthenticated(class, peer, &kind, &record)
                    .await;
                Err(refusal)
            }
        }
    }

    async fn check_inner(
        &self,
        attempt: Attempt,
        peer: &str,
        now: SystemTime,
    ) -> Result<Checked, (Refusal, Option<String>)> {
        let bare = |r: Refusal| (r, None);
        check_secret_names(
            &attempt.secrets,
            !attempt.appraise_only,
            attempt.certificates.len(),
        )
        .map_err(bare)?;
        if attempt.certificates.len() > attestation::protocol::MAX_CERTIFICATE_REQUESTS {
            return Err(bare(Refusal::Malformed(format!(
                "at most {} certificate requests",
                attestation::protocol::MAX_CERTIFICATE_REQUESTS
            ))));
        }
        let nonce = match self.nonces.check(&attempt.nonce, unix(now)) {
            // Perhaps minted by a replica that has seen a data-key rotation this one has
            // not: reload (rate-limited) and check again.
            Err(NonceError::NotIssuedHere)
                if self
                    .keyring
                    .refresh_prompted(&self.store)
                    .await
                    .unwrap_or(false) =>
            {
                self.nonces.check(&attempt.nonce, unix(now))
            }
            other => other,
        }
        .map_err(|e| bare(Refusal::Nonce(e)))?;
        let evidence = decode_evidence(&attempt.evidence).map_err(bare)?;
        let (chain, crl) = self
            .endorse(&evidence.parsed, evidence.certificates, peer, now)
            .await
            .map_err(bare)?;
        let verified = match &evidence.azure {
            None => self.verifier.verify_report(&evidence.report, &chain, now),
            Some((hcl, quote)) => self.verifier.verify_az_snp_vtpm(hcl, quote, &chain, now),
        }
        .map_err(|e| bare(Refusal::Verification(e)))?;
        let claims = verified.claims();
        let claims_json = claims.to_json();
        let claims_digest = hex::encode(digest::digest(
            &digest::SHA256,
            claims_json.to_string().as_bytes(),
        ));
        let with_digest = |r: Refusal| (r, Some(claims_digest.clone()));
        // Certificate requests: possession proven by their signatures, their keys bound below.
        let certificates = attempt
            .certificates
            .iter()
            .map(crate::pki::issue::verify_request)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| with_digest(Refusal::Malformed(e)))?;
        let bound_by = match &attempt.binding {
            Binding::Hpke(key) => {
                let binding_key = key
                    .binding_bytes()
                    .map_err(|e| with_digest(Refusal::Malformed(e.to_string())))?;
                if certificates.is_empty() {
                    verified.check_binding(&nonce.bytes, &binding_key)
                } else {
                    let spkis: Vec<&[u8]> =
                        certificates.iter().map(|c| c.spki.as_slice()).collect();
                    verified.check_binding_v2(&nonce.bytes, &binding_key, &spkis)
                }
                .map_err(|e| with_digest(Refusal::Verification(e)))?;
                if certificates.is_empty() {
                    "native"
                } else {
                    "native-v2"
                }
            }
            Binding::Digests(_) if !certificates.is_empty() => {
                return Err(with_digest(Refusal::Malformed(
                    "certificate requests need the native binding".into(),
                )));
            }
            Binding::Digests(expected) => {
                // The first that holds; the first's refusal otherwise (the selected hash).
                let mut first_error = None;
                let mut matched = None;
                for e in expected {
                    match verified.check_report_data(&e.report_data, &e.qualifying) {
                        Ok(()) => {
                            matched = Some(e.label);
                            break;
                        }
                        Err(err) => {
                            first_error.get_or_insert(err);
                        }
                    }
                }
                match (matched, first_error) {
                    (Some(label), _) => label,
                    (None, Some(err)) => return Err(with_digest(Refusal::Verification(err))),
                    (None, None) => {
                        return Err(with_digest(Refusal::Internal("no binding to check".into())));
                    }
                }
            }
        };
        Ok(Checked {
            evidence: evidence_kind(&attempt.evidence),
            front_end: attempt.front_end,
            secrets: attempt.secrets,
            certificates,
            binding: attempt.binding,
            bound_by,
            nonce_digest: nonce.digest(),
            nonce_expires_at: nonce.expires_at,
            claims,
            claims_json,
            claims_digest,
            crl,
            peer: peer.to_string(),
        })
    }

    /// Decides and seals on the store's current inputs, then spends the nonce and audits the
    /// outcome in one store transaction (shared with concurrent decisions: group commit):
    /// the answer exists only once the spend and its audit record are durable; a crash
    /// before that leaves the nonce unspent and nothing released. Once started this must run
    /// to completion (spawn it).
    pub async fn release(
        &self,
        checked: Checked,
        now: SystemTime,
    ) -> Result<AttestResponse, Refusal> {
        let signer = match checked.certificates.first() {
            Some(first) => Some(self.certificate_signer(&first.profile).await?),
            None => None,
        };
        self.spend_and_decide(&checked, now, |inputs| {
            let outcome = self.decide_and_seal(&checked, inputs, signer.as_deref(), now);
            match outcome {
                Ok(sealed) => {
                    let mut record = release_record(&checked, Ok(&sealed.released), now);
                    if !sealed.issued.is_empty() {
                        record.detail["certificates"] = sealed
                            .issued
                            .iter()
                            .map(|c| {
                                json!({
                                    "profile": c.profile,
                                    "serial": c.serial,
                                    "names": c.names,
                                    "not_after": c.not_after,
                                    "ca_version": c.ca_version,
                                })
                            })
                            .collect();
                    }
                    (Ok(sealed.response), record, sealed.issued)
                }
                Err(refusal) => {
                    let record = release_record(&checked, Err(&refusal), now);
                    (Err(refusal), record, Vec::new())
                }
            }
        })
        .await
    }

    /// Appraises an attestation that names no secrets yet (the KBS front end's `/attest`):
    /// spends its nonce and audits the appraisal (the policy's rules that hold for the
    /// claims) in one store transaction, like [`Self::release`]. Secrets are then released
    /// one by one with [`Self::release_vouched`] on the claims carried in the front end's
    /// authenticated session.
    pub async fn appraise(&self, checked: Checked, now: SystemTime) -> Result<Appraisal, Refusal> {
        self.spend_and_decide(&checked, now, |inputs| {
            let outcome = inputs.policy.ok_or(Refusal::NoPolicy).and_then(|current| {
                let version = current.version;
                let policy = self.policy_for(current).map_err(Refusal::Internal)?;
                Ok(Appraisal {
                    rules: policy.holding_rules(&checked.claims_json),
                    policy_version: version,
                    claims_json: checked.claims_json.clone(),
                    claims_digest: checked.claims_digest.clone(),
                    evidence: checked.evidence,
                    bound_by: checked.bound_by,
                    nonce_expires_at: checked.nonce_expires_at,
                })
            });
            let record = appraisal_record(&checked, outcome.as_ref(), now);
            (outcome, record, Vec::new())
        })
        .await
    }

    /// Spends the nonce of `checked` with the decision `decide` makes on the store's current
    /// inputs and the audit record it writes, in one (group) transaction, deciding again when
    /// secrets or policies changed under it.
    async fn spend_and_decide<T>(
        &self,
        checked: &Checked,
        now: SystemTime,
        decide: impl Fn(DecisionInputs) -> (Result<T, Refusal>, AuditRecord, Vec<IssuedRecord>),
    ) -> Result<T, Refusal> {
        // Re-check expiry now: verification may have taken time (a KDS fetch with backoff),
        // and spent nonces are purged only well after they expire.
        if unix(SystemTime::now()) > checked.nonce_expires_at {
            let refusal = Refusal::Nonce(NonceError::Expired);
            self.store
                .append_audit(&release_record(checked, Err(&refusal), now))
                .await?;
            return Err(refusal);
        }
        if self.seen_spent(checked) {
            return Err(self.replayed(checked, now).await);
        }
        let expires = i64::try_from(checked.nonce_expires_at).unwrap_or(i64::MAX);
        // A write to secrets or policies between reading the inputs and the commit makes
        // the decision stale: decided again on the new inputs (`decide_again`).
        let started = Instant::now();
        for attempt in 1.. {
            let inputs = self.inputs(&checked.secrets).await?;
            let generation = inputs.generation;
            let (outcome, record, issued) = decide(inputs);
            let spend = Spend {
                nonce: Some(checked.nonce_digest),
                expires_at: expires,
                generation,
                issued,
            };
            match self.store.commit_decision(spend, record).await {
                Ok(Committed::Done) => {
                    self.remember_spent(checked, unix(SystemTime::now()));
                    return outcome;
                }
                Ok(Committed::Stale) if decide_again(attempt, started, Instant::now()) => continue,
                Ok(Committed::Stale) => break,
                Ok(Committed::Replay) => {
                    self.remember_spent(checked, unix(SystemTime::now()));
                    return Err(self.replayed(checked, now).await);
                }
                Err(e) => {
                    // Nothing is released that is not audited (and nothing was spent).
                    tracing::error!(error = %e, "decision commit failed; refusing the release");
                    return Err(Refusal::Store(e));
                }
            }
        }
        Err(stale_refusal())
    }

    /// The store's current inputs for a decision on `secrets` (the policy's document only
    /// when it is not the version parsed already).
    async fn inputs(&self, secrets: &[String]) -> Result<DecisionInputs, Refusal> {
        let cached = self
            .policy
            .read()
            .ok()
            .and_then(|g| g.first().map(|(v, _)| *v));
        let inputs = self.store.decision_inputs(secrets, cached).await?;
        // The decision opens the records without I/O: learn of a newer data key first.
        let newest = inputs
            .secrets
            .iter()
            .flatten()
            .map(|s| s.key_version)
            .max()
            .unwrap_or(0);
        if newest > self.keyring.current() {
            self.keyring
                .refresh(&self.store)
                .await
                .map_err(|e| Refusal::Internal(e.to_string()))?;
        }
        Ok(inputs)
    }

    /// Releases one secret on claims an earlier attestation established and a front end
    /// carried in its authenticated session (the KBS front end's cookie or token): decided
    /// by the current policy on those claims, audited in a group commit (no nonce is spent:
    /// the attestation spent its own), and returned in plaintext for the front end to
    /// encrypt to the session's key.
    pub async fn release_vouched(
        &self,
        vouched: &Vouched,
        secret: &str,
        now: SystemTime,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, Refusal> {
        if !attestation::policy::valid_name(secret) {
            return Err(Refusal::UnknownSecret(secret.to_string()));
        }
        let names = [secret.to_string()];
        let started = Instant::now();
        for attempt in 1.. {
            let inputs = self.inputs(&names).await?;
            let generation = inputs.generation;
            let outcome = self.decide_vouched(vouched, secret, inputs);
            let record = vouched_record(vouched, secret, &outcome, now);
            let spend = Spend {
                nonce: None,
                expires_at: 0,
                generation,
                issued: Vec::new(),
            };
            match self.store.commit_decision(spend, record).await {
                Ok(Committed::Done) => return outcome.map(|(plaintext, _)| plaintext),
                Ok(_) if decide_again(attempt, started, Instant::now()) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, "decision commit failed; refusing the release");
                    return Err(Refusal::Store(e));
                }
            }
        }
        Err(stale_refusal())
    }

    fn decide_vouched(
        &self,
        vouched: &Vouched,
        secret: &str,
        inputs: DecisionInputs,
    ) -> Result<(zeroize::Zeroizing<Vec<u8>>, u64), Refusal> {
        let policy = self
            .policy_for(inputs.policy.ok_or(Refusal::NoPolicy)?)
            .map_err(Refusal::Internal)?;
        let record = inputs
            .secrets
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| Refusal::UnknownSecret(secret.to_string()))?;
        let decision = policy.decide_json(secret, &vouched.claims_json);
        if !decision.released {
            return Err(Refusal::Policy {
                secret: secret.to_string(),
                reason: decision.reason,
            });
        }
        let plaintext = self
            .keyring
            .open(
                record.key_version,
                &record.name,
                record.version,
                &record.sealed,
            )
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        Ok((plaintext, record.version))
    }

    /// A replayed nonce: nothing was spent or written. Anyone holding a captured request can
    /// send it again until the nonce expires, so its record is sampled like other refusals
    /// before a spend (on the budget of evidence that verified).
    async fn replayed(&self, checked: &Checked, now: SystemTime) -> Refusal {
        let refusal = Refusal::NonceReplay;
        let record = release_record(checked, Err(&refusal), now);
        self.audit_unauthenticated(
            crate::audit::Class::Verified,
            &checked.peer,
            "attest/nonce_replay",
            &record,
        )
        .await;
        refusal
    }

    /// The decision on what the store said, and the sealed secrets: no I/O.
    fn decide_and_seal(
        &self,
        checked: &Checked,
        inputs: DecisionInputs,
        signer: Option<&crate::pki::issue::Signer>,
        now: SystemTime,
    ) -> Result<SealedRelease, Refusal> {
        let policy = self
            .policy_for(inputs.policy.ok_or(Refusal::NoPolicy)?)
            .map_err(Refusal::Internal)?;
        let Binding::Hpke(public_key) = &checked.binding else {
            return Err(Refusal::Internal(
                "secrets are sealed only to a natively bound key".into(),
            ));
        };
        let mut records: Vec<StoredSecret> = Vec::new();
        for (name, record) in checked.secrets.iter().zip(inputs.secrets) {
            records.push(record.ok_or_else(|| Refusal::UnknownSecret(name.clone()))?);
        }
        for name in &checked.secrets {
            let decision = policy.decide(name, &checked.claims);
            if !decision.released {
                return Err(Refusal::Policy {
                    secret: name.clone(),
                    reason: decision.reason,
                });
            }
        }
        let (certificates, issued) = self.issue_certificates(checked, &policy, signer, now)?;
        let mut sealed: Vec<SealedSecret> = Vec::new();
        let mut released = Vec::new();
        for record in &records {
            let plaintext = self
                .keyring
                .open(
                    record.key_version,
                    &record.name,
                    record.version,
                    &record.sealed,
                )
                .map_err(|e| Refusal::Internal(e.to_string()))?;
            let s = attestation::protocol::seal(
                public_key,
                &record.name,
                record.version,
                &record.kind,
                &plaintext,
            )
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
            sealed.push(s);
            released.push(json!({ "name": record.name, "version": record.version }));
        }
        Ok(SealedRelease {
            response: AttestResponse {
                claims: checked.claims_json.clone(),
                secrets: sealed,
                certificates,
            },
            released,
            issued,
        })
    }

    /// Decides and issues the certificates `checked` asks for: each profile granted by one
    /// of its rules, each name by the profile. Nothing is issued unless all are.
    fn issue_certificates(
        &self,
        checked: &Checked,
        policy: &Policy,
        signer: Option<&crate::pki::issue::Signer>,
        now: SystemTime,
    ) -> Result<(Vec<IssuedCertificate>, Vec<IssuedRecord>), Refusal> {
        if checked.certificates.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let Some(signer) = signer else {
            return Err(Refusal::Internal("no CA loaded for certificates".into()));
        };
        let mut certificates = Vec::new();
        let mut issued = Vec::new();
        for csr in &checked.certificates {
            let decision = policy.decide_certificate(&csr.profile, &checked.claims_json);
            let profile = match policy.certificate_profile(&csr.profile) {
                Some(p) if decision.released => p,
                _ => {
                    return Err(Refusal::Policy {
                        secret: decision.secret,
                        reason: decision.reason,
                    });
                }
            };
            let cert = crate::pki::issue::issue(signer, csr, profile, self.pki_urls.as_ref(), now)
                .map_err(|e| match e {
                    crate::pki::issue::IssueError::NameNotGranted(reason) => Refusal::Certificate {
                        profile: csr.profile.clone(),
                        reason,
                    },
                    other => Refusal::Internal(other.to_string()),
                })?;
            certificates.push(IssuedCertificate {
                profile: cert.profile.clone(),
                serial: cert.serial.clone(),
                certificate: attestation::certs::to_pem(&cert.der),
                chain: signer.chain.clone(),
                not_after: cert.not_after,
            });
            issued.push(IssuedRecord {
                serial: cert.serial,
                ca_version: cert.ca_version,
                profile: cert.profile,
                subject: cert.subject,
                names: cert.names,
                claims_digest: checked.claims_digest.clone(),
                claims: checked.claims_json.clone(),
                not_before: cert.not_before,
                not_after: cert.not_after,
                issued_at: unix_i64(now),
                certificate: cert.der,
                revoked_at: None,
                revocation_reason: None,
            });
        }
        Ok((certificates, issued))
    }

    /// The parsed policy of `current`: the cached one when its version matches, otherwise
    /// parsed from the document the store sent (and cached).
    fn policy_for(&self, current: PolicyRef) -> Result<Arc<Policy>, String> {
        if let Ok(guard) = self.policy.read()
            && let Some((_, policy)) = guard.iter().find(|(v, _)| *v == current.version)
        {
            return Ok(policy.clone());
        }
        let document = current
            .document
            .ok_or_else(|| format!("policy v{} was not sent and is not cached", current.version))?;
        let policy = Arc::new(
            Policy::from_stored_json(&document)
                .map_err(|e| format!("stored policy v{} does not load: {e}", current.version))?,
        );
        if let Ok(mut guard) = self.policy.write()
            && !guard.iter().any(|(v, _)| *v == current.version)
        {
            guard.push((current.version, policy.clone()));
            guard.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
            guard.truncate(2);
        }
        Ok(policy)
    }

    /// Records a refusal of an unauthenticated request (before any nonce is spent): a row of
    /// its own while the source's and the global budget last, otherwise counted for the
    /// minute's `audit.suppressed` summary (see [`crate::audit`]).
    pub async fn audit_unauthenticated(
        &self,
        class: crate::audit::Class,
        peer: &str,
        kind: &str,
        record: &AuditRecord,
    ) {
        if !self
            .sampler
            .admit(class, &crate::limit::source_label(peer), kind)
        {
            return;
        }
        if let Err(e) = self.store.append_audit(record).await {
            tracing::error!(error = %e, "audit append failed");
        }
    }

    /// Writes the summary row of the audit sampler's window that just ended (called once a
    /// minute by the service).
    pub async fn flush_audit_summary(&self, now: SystemTime, window: Duration) {
        if let Some(record) = self.sampler.roll(unix_i64(now), window.as_secs())
            && let Err(e) = self.store.append_audit(&record).await
        {
            tracing::error!(error = %e, "audit summary append failed");
        }
    }

    /// The certificate chains of the current `tls-key` secrets (decrypted to read them; the
    /// keys are zeroized), for the start-up check that none is an operator credential.
    pub async fn tls_key_chains(
        &self,
    ) -> Result<Vec<(String, Vec<rustls_pki_types::CertificateDer<'static>>)>, Error> {
        let mut out = Vec::new();
        for info in self.store.list_secrets().await? {
            if info.kind != SecretKind::TlsKey.as_str() {
                continue;
            }
            let Some(record) = self.store.current_secret(&info.name).await? else {
                continue;
            };
            let plaintext = self
                .keyring
                .open_fresh(
                    &self.store,
                    record.key_version,
                    &record.name,
                    record.version,
                    &record.sealed,
                )
                .await?;
            out.push((record.name, secrets::certificate_chain(&plaintext)));
        }
        Ok(out)
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
        check_name(name)?;
        let meta = secrets::validate(kind, value)?;
        let mut last_err = None;
        for _ in 0..3 {
            let version = self.store.last_secret_version(name).await? + 1;
            let sealed = self.keyring.seal(name, version, value)?;
            let record = StoredSecret {
                name: name.to_string(),
                version,
                kind: kind.as_str().to_string(),
                meta: meta.clone(),
                sealed: sealed.bytes,
                key_version: sealed.key_version,
            };
            let audit = admin_record(
                actor,
                "secret.put",
                json!({"name": name, "version": version, "kind": kind.as_str()}),
                now,
            );
            match self
                .store
                .insert_secret(&record, unix_i64(now), actor, &audit)
                .await
            {
                Ok(()) => return Ok(version),
                Err(StoreError::Conflict(e)) => last_err = Some(StoreError::Conflict(e)),
                // A data-key rotation began: seal again under the new key.
                Err(e @ StoreError::OldDataKey { .. }) => {
                    self.keyring.refresh(&self.store).await?;
                    last_err = Some(e);
                }
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
        check_name(name)?;
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
        check_name(name)?;
        let audit = admin_record(actor, "secret.delete", json!({"name": name}), now);
        if !self
            .store
            .delete_secret(name, unix_i64(now), &audit)
            .await?
        {
            return Err(Error::NotFound(format!("secret {name}")));
        }
        Ok(())
    }

    /// Sets the policy (checked first) as a new version.
    pub async fn set_policy(
        &self,
        document: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        Ok(self
            .set_policy_revoking(document, actor, now)
            .await?
            .version)
    }

    /// Sets the policy, then revokes (privilegeWithdrawn, audited) every unexpired
    /// certificate of the private CA that it no longer grants: its profile gone, no rule of
    /// it holding for the claims the certificate was issued on, or one of its names no longer
    /// granted. An error after the policy is stored leaves it stored (setting it again
    /// revokes what is left).
    pub async fn set_policy_revoking(
        &self,
        document: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<PolicySet, Error> {
        let policy = Policy::from_json(document).map_err(|e| Error::Input(e.to_string()))?;
        let version = self.insert_policy(document, actor, now).await?;
        let revoked =
            crate::pki::revoke::revoke_withdrawn(&self.store, &policy, version, actor, now).await?;
        Ok(PolicySet { version, revoked })
    }

    async fn insert_policy(
        &self,
        document: &str,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        let audit = admin_record(actor, "policy.set", json!({}), now);
        // Two replicas setting a policy at once take the same next version: one wins, the
        // other tries the next one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .store
                .insert_policy(document, unix_i64(now), actor, &audit)
                .await
            {
                Ok(version) => return Ok(version),
                Err(StoreError::Conflict(_)) if attempt < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes audit records older than `before`, recording that it did (who, the cut-off,
    /// how many) in the same transaction.
    pub async fn prune_audit(
        &self,
        before: SystemTime,
        actor: &str,
        now: SystemTime,
    ) -> Result<u64, Error> {
        if before > now {
            return Err(Error::Input("the cut-off is in the future".into()));
        }
        let cutoff = unix_i64(before);
        let record = admin_record(actor, "audit.prune", json!({ "before": cutoff }), now);
        Ok(self.store.prune_audit(cutoff, &record).await?)
    }
}

/// The audit record of a release decision.
fn release_record(
    checked: &Checked,
    outcome: Result<&Vec<serde_json::Value>, &Refusal>,
    now: SystemTime,
) -> AuditRecord {
    let nonce = hex::encode(checked.nonce_digest);
    let (result, detail) = match outcome {
        Ok(released) => (
            "released",
            json!({ "front_end": checked.front_end.name(), "evidence": checked.evidence, "secrets": released, "claims_sha256": checked.claims_digest, "crl": checked.crl, "nonce_sha256": nonce }),
        ),
        Err(refusal) => (
            "refused",
            json!({
                "front_end": checked.front_end.name(),
                "evidence": checked.evidence,
                "secrets": checked.secrets,
                "reason": refusal.reason(),
                "detail": crate::audit::truncate(&refusal.to_string()),
                "claims_sha256": checked.claims_digest,
                "nonce_sha256": nonce,
            }),
        ),
    };
    AuditRecord {
        id: 0,
        at: unix_i64(now),
        actor: format!("guest {}", checked.peer),
        action: "attest".into(),
        outcome: result.into(),
        detail,
    }
}

/// The audit record of an appraisal (a KBS attestation).
fn appraisal_record(
    checked: &Checked,
    outcome: Result<&Appraisal, &Refusal>,
    now: SystemTime,
) -> AuditRecord {
    match outcome {
        Err(refusal) => release_record(checked, Err(refusal), now),
        Ok(a) => AuditRecord {
            id: 0,
            at: unix_i64(now),
            actor: format!("guest {}", checked.peer),
            action: "attest".into(),
            outcome: "appraised".into(),
            detail: json!({
                "front_end": checked.front_end.name(),
                "evidence": checked.evidence,
                "binding": checked.bound_by,
                "policy_version": a.policy_version,
                "rules": a.rules,
                "claims_sha256": checked.claims_digest,
                "crl": checked.crl,
                "nonce_sha256": hex::encode(checked.nonce_digest),
            }),
        },
    }
}

/// The audit record of a release on vouched claims.
fn vouched_record(
    vouched: &Vouched,
    secret: &str,
    outcome: &Result<(zeroize::Zeroizing<Vec<u8>>, u64), Refusal>,
    now: SystemTime,
) -> AuditRecord {
    let (result, detail) = match outcome {
        Ok((_, version)) => (
            "released",
            json!({
                "front_end": vouched.front_end.name(),
                "session": vouched.session,
                "secrets": [{ "name": secret, "version": version }],
                "claims_sha256": vouched.claims_digest,
            }),
        ),
        Err(refusal) => (
            "refused",
            json!({
                "front_end": vouched.front_end.name(),
                "session": vouched.session,
                "secrets": [secret],
                "reason": refusal.reason(),
                "detail": crate::audit::truncate(&refusal.to_string()),
                "claims_sha256": vouched.claims_digest,
            }),
        ),
    };
    AuditRecord {
        id: 0,
        at: unix_i64(now),
        actor: format!("guest {}", vouched.peer),
        action: "attest.resource".into(),
        outcome: result.into(),
        detail,
    }
}

fn stale_refusal() -> Refusal {
    Refusal::Store(StoreError::Conflict(
        "secrets or policies kept changing while deciding; try again".into(),
    ))
}

fn admin_record(
    actor: &str,
    action: &str,
    detail: serde_json::Value,
    now: SystemTime,
) -> AuditRecord {
    AuditRecord {
        id: 0,
        at: unix_i64(now),
        actor: actor.to_string(),
        action: action.to_string(),
        outcome: "ok".into(),
        detail,
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if attestation::policy::valid_name(name) {
        Ok(())
    } else {
        Err(Error::Input(
            "secret names use letters, digits, '.', '_', '-' (1 to 128, not '.' or '..')".into(),
        ))
    }
}

/// The protocol an attestation came in by (named in its audit records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrontEnd {
    /// The native protocol (`/v1`).
    Native,
    /// The Confidential Containers KBS protocol (`/kbs/v0`).
    Kbs,
}

impl FrontEnd {
    /// The name in audit records.
    pub fn name(self) -> &'static str {
        match self {
            FrontEnd::Native => "v1",
            FrontEnd::Kbs => "kbs",
        }
    }
}

/// How evidence must be bound to the challenge.
#[derive(Clone, Debug)]
pub enum Binding {
    /// The native binding of the nonce and the HPKE key secrets are sealed to.
    Hpke(PublicKey),
    /// Binding values a front end computed (the KBS runtime-data digests), tried in order:
    /// the first is what the broker asked for, later ones tolerated fallbacks.
    Digests(Vec<ExpectedBinding>),
}

/// One acceptable binding: what REPORT_DATA must be (bare SNP reports), or the quote's
/// qualifying data and the HCL user data (Azure vTPM evidence).
#[derive(Clone, Debug)]
pub struct ExpectedBinding {
    /// REPORT_DATA.
    pub report_data: [u8; 64],
    /// Qualifying data and HCL user data.
    pub qualifying: Vec<u8>,
    /// How it was made, for the audit (`sha512`, `sha384-fallback`).
    pub label: &'static str,
}

/// What [`Broker::check_attempt`] checks: a nonce, evidence, the binding and the secrets
/// named (none for a KBS attestation).
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The front end it came in by.
    pub front_end: FrontEnd,
    /// The broker's nonce.
    pub nonce: String,
    /// The evidence, in the native form.
    pub evidence: Evidence,
    /// How the evidence must bind the nonce.
    pub binding: Binding,
    /// The secrets asked for.
    pub secrets: Vec<String>,
    /// The certificates asked for (native attest requests only).
    pub certificates: Vec<attestation::protocol::CertificateRequest>,
    /// An attestation that releases nothing itself: it is appraised ([`Broker::appraise`])
    /// and names no secrets (a KBS attestation, a native token request).
    pub appraise_only: bool,
}

impl Attempt {
    /// A native attest request.
    pub fn native(request: AttestRequest) -> Attempt {
        Attempt {
            front_end: FrontEnd::Native,
            nonce: request.nonce,
            evidence: request.evidence,
            binding: Binding::Hpke(request.public_key),
            secrets: request.secrets,
            certificates: request.certificates,
            appraise_only: false,
        }
    }

    /// A native token request: appraised, nothing released.
    pub fn native_token(request: attestation::protocol::TokenRequest) -> Attempt {
        Attempt {
            front_end: FrontEnd::Native,
            nonce: request.nonce,
            evidence: request.evidence,
            binding: Binding::Hpke(request.public_key),
            secrets: Vec::new(),
            certificates: Vec::new(),
            appraise_only: true,
        }
    }
}

/// The outcome of [`Broker::appraise`]: the verified claims and the policy's rules that
/// hold for them.
#[derive(Clone, Debug)]
pub struct Appraisal {
    /// The claims (JSON form).
    pub claims_json: serde_json::Value,
    /// SHA-256 of the claims' JSON text.
    pub claims_digest: String,
    /// The policy version appraised against.
    pub policy_version: u64,
    /// The rules that hold, in order.
    pub rules: Vec<String>,
    /// The evidence kind.
    pub evidence: &'static str,
    /// Which binding held.
    pub bound_by: &'static str,
    /// When the attestation's nonce expires (seconds since the epoch).
    pub nonce_expires_at: u64,
}

/// Claims an earlier attestation established, carried in a front end's authenticated
/// session: only this crate makes one, after checking the session's seal or signature.
#[derive(Clone, Debug)]
pub struct Vouched {
    pub(crate) front_end: FrontEnd,
    pub(crate) session: &'static str,
    pub(crate) claims_json: serde_json::Value,
    pub(crate) claims_digest: String,
    pub(crate) peer: String,
}

/// An attestation checked up to the point of spending its nonce: only
/// [`Broker::check_attempt`] makes one, and [`Broker::release`] takes nothing else.
pub struct Checked {
    evidence: &'static str,
    front_end: FrontEnd,
    secrets: Vec<String>,
    certificates: Vec<crate::pki::issue::VerifiedCsr>,
    binding: Binding,
    bound_by: &'static str,
    nonce_digest: [u8; 32],
    nonce_expires_at: u64,
    claims: attestation::Claims,
    claims_json: serde_json::Value,
    claims_digest: String,
    crl: &'static str,
    peer: String,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("evidence", &self.evidence)
            .field("claims_sha256", &self.claims_digest)
            .finish_non_exhaustive()
    }
}

fn evidence_kind(evidence: &Evidence) -> &'static str {
    match evidence {
        Evidence::Snp { .. } => "snp",
        Evidence::AzSnpVtpm { .. } => "az-snp-vtpm",
    }
}

/// Decoded evidence: the SNP report (bare or from an HCL report) parsed, and the Azure parts.
struct DecodedEvidence<'a> {
    report: Vec<u8>,
    parsed: AttestationReport,
    azure: Option<(HclReport, attestation::tpm::Quote)>,
    certificates: &'a [attestation::protocol::CertificateEntry],
}

/// Decodes the evidence: a bare report, or an HCL report wrapping one and its quote.
/// Structure first: a malformed report is refused for that.
fn decode_evidence(evidence: &Evidence) -> Result<DecodedEvidence<'_>, Refusal> {
    let malformed = |e: attestation::Error| Refusal::Malformed(e.to_string());
    let (azure, report, certificates) = match evidence {
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
            let hcl = HclReport::parse(&hcl).map_err(Refusal::Verification)?;
            let quote = quote.decode().map_err(Refusal::Verification)?;
            let report = hcl.snp_report().to_vec();
            (Some((hcl, quote)), report, certificates)
        }
    };
    let parsed = AttestationReport::parse(&report).map_err(Refusal::Verification)?;
    Ok(DecodedEvidence {
        report,
        parsed,
        azure,
        certificates,
    })
}

fn check_secret_names(
    names: &[String],
    named_up_front: bool,
    certificates: usize,
) -> Result<(), Refusal> {
    if !named_up_front {
        return if names.is_empty() {
            Ok(())
        } else {
            Err(Refusal::Malformed(
                "an appraisal names no secrets (they are asked for afterwards)".into(),
            ))
        };
    }
    if names.len() > MAX_SECRETS_PER_REQUEST || (names.is_empty() && certificates == 0) {
        return Err(Refusal::Malformed(format!(
            "ask for 1 to {MAX_SECRETS_PER_REQUEST} secrets (or a certificate)"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_decisions_are_decided_again_a_few_times_then_for_a_while() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // However late the first tries end, a few are always made.
        for attempts in 1..STALE_RETRIES {
            assert!(decide_again(attempts, t0, at(10_000)));
        }
        assert!(!decide_again(STALE_RETRIES, t0, at(10_000)));
        // Past those, as many as fit in the patience, and no more.
        let patience = u64::try_from(STALE_PATIENCE.as_millis()).unwrap();
        assert!(decide_again(500, t0, at(patience - 1)));
        assert!(!decide_again(500, t0, at(patience)));
        // A `now` before the start counts as no time spent.
        assert!(decide_again(STALE_RETRIES, at(5), t0));
    }
}
