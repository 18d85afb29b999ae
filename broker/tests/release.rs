//! Release decisions against changes that land between reading a decision's inputs and its
//! group commit: a secret deleted, or a policy replaced, at that moment is not released on
//! the old state. The store here is the real SQLite store; a wrapper makes the admin change
//! right before the decision's commit, which is where a concurrent operator's change can
//! land.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use attestation::protocol::{AttestRequest, CertificateEntry, EphemeralKey, Evidence, Kem};
use attestation::sim::{ReportFields, SimulatedAmd};
use attestation::{Product, TrustAnchors, Verifier, binding};
use base64::Engine;
use broker::keys::MasterKey;
use broker::release::{Broker, Refusal};
use broker::secrets::SecretKind;
use broker::store::{
    AuditQuery, AuditRecord, BrokerKey, CommitMetrics, Committed, DecisionInputs, IssuedRecord,
    PolicyVersion, SecretInfo, Spend, SqliteStore, Store, StoreError, StoredSecret,
};

/// What the wrapper does once, right before the next decision's commit.
enum Change {
    DeleteSecret(String),
    SetPolicy(String),
}

/// The SQLite store, with one admin change armed to land before the next commit.
struct Racing {
    inner: SqliteStore,
    armed: Mutex<Option<Change>>,
    commits: std::sync::atomic::AtomicUsize,
}

fn admin(action: &str) -> AuditRecord {
    AuditRecord {
        id: 0,
        at: 1,
        actor: "operator racing".into(),
        action: action.into(),
        outcome: "ok".into(),
        detail: serde_json::json!({}),
    }
}

impl Store for Racing {
    type FetchLock = ();

    async fn lock_fetch(&self, key: &str) -> Result<(), StoreError> {
        self.inner.lock_fetch(key).await
    }
    async fn decision_inputs(
        &self,
        names: &[String],
        cached_policy: Option<u64>,
    ) -> Result<DecisionInputs, StoreError> {
        self.inner.decision_inputs(names, cached_policy).await
    }
    async fn commit_decision(
        &self,
        spend: Spend,
        audit: AuditRecord,
    ) -> Result<Committed, StoreError> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let change = self.armed.lock().unwrap().take();
        match change {
            Some(Change::DeleteSecret(name)) => {
                assert!(
                    self.inner
                        .delete_secret(&name, 2, &admin("secret.delete"))
                        .await?
                );
            }
            Some(Change::SetPolicy(document)) => {
                self.inner
                    .insert_policy(&document, 2, "racing", &admin("policy.set"))
                    .await?;
            }
            None => {}
        }
        self.inner.commit_decision(spend, audit).await
    }
    fn commit_metrics(&self) -> &CommitMetrics {
        self.inner.commit_metrics()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn last_secret_version(&self, name: &str) -> Result<u64, StoreError> {
        self.inner.last_secret_version(name).await
    }
    async fn insert_secret(
        &self,
        secret: &StoredSecret,
        created_at: i64,
        created_by: &str,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.inner
            .insert_secret(secret, created_at, created_by, audit)
            .await
    }
    async fn current_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        self.inner.current_secret(name).await
    }
    async fn list_secrets(&self) -> Result<Vec<SecretInfo>, StoreError> {
        self.inner.list_secrets().await
    }
    async fn delete_secret(
        &self,
        name: &str,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<bool, StoreError> {
        self.inner.delete_secret(name, at, audit).await
    }
    async fn insert_policy(
        &self,
        document: &str,
        at: i64,
        by: &str,
        audit: &AuditRecord,
    ) -> Result<u64, StoreError> {
        self.inner.insert_policy(document, at, by, audit).await
    }
    async fn active_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
        self.inner.active_policy().await
    }
    async fn policy_history(&self) -> Result<Vec<PolicyVersion>, StoreError> {
        self.inner.policy_history().await
    }
    async fn purge_nonces(&self, now: i64) -> Result<u64, StoreError> {
        self.inner.purge_nonces(now).await
    }
    async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.inner.append_audit(record).await
    }
    async fn prune_audit(&self, before: i64, record: &AuditRecord) -> Result<u64, StoreError> {
        self.inner.prune_audit(before, record).await
    }
    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.query_audit(query).await
    }
    async fn master_key(&self) -> Result<Option<broker::store::MasterKeyRecord>, StoreError> {
        self.inner.master_key().await
    }
    async fn put_master_key(
        &self,
        record: &broker::store::MasterKeyRecord,
        replace: bool,
        data_keys: &[broker::store::DataKeyRecord],
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.inner
            .put_master_key(record, replace, data_keys, audit)
            .await
    }
    async fn sealed_records(&self) -> Result<u64, StoreError> {
        self.inner.sealed_records().await
    }
    async fn data_keys(&self) -> Result<Vec<broker::store::DataKeyRecord>, StoreError> {
        self.inner.data_keys().await
    }
    async fn insert_data_key(
        &self,
        key: &broker::store::DataKeyRecord,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.inner.insert_data_key(key, audit).await
    }
    async fn records_under_old_keys(
        &self,
        current: u64,
        limit: u32,
    ) -> Result<Vec<broker::store::SealedRecord>, StoreError> {
        self.inner.records_under_old_keys(current, limit).await
    }
    async fn reseal(
        &self,
        records: &[(broker::store::SealedRecord, Vec<u8>, u64)],
    ) -> Result<u64, StoreError> {
        self.inner.reseal(records).await
    }
    async fn retire_data_keys(
        &self,
        current: u64,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<u64, StoreError> {
        self.inner.retire_data_keys(current, at, audit).await
    }
    async fn broker_keys(&self, purpose: &str) -> Result<Vec<BrokerKey>, StoreError> {
        self.inner.broker_keys(purpose).await
    }
    async fn insert_broker_key(
        &self,
        key: &BrokerKey,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.inner.insert_broker_key(key, audit).await
    }
    async fn issued_certificates(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
        self.inner.issued_certificates(limit).await
    }
    async fn issued_certificate(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        self.inner.issued_certificate(serial).await
    }
    async fn unexpired_certificates(&self, now: i64) -> Result<Vec<IssuedRecord>, StoreError> {
        self.inner.unexpired_certificates(now).await
    }
    async fn revoked_certificates(
        &self,
        ca_version: u64,
        now: i64,
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        self.inner.revoked_certificates(ca_version, now).await
    }
    async fn revoke_certificate(
        &self,
        serial: &str,
        at: i64,
        reason: &str,
        audit: &AuditRecord,
    ) -> Result<bool, StoreError> {
        self.inner
            .revoke_certificate(serial, at, reason, audit)
            .await
    }
    async fn set_broker_key_public(
        &self,
        purpose: &str,
        version: u64,
        expected: &serde_json::Value,
        public: &serde_json::Value,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.inner
            .set_broker_key_public(purpose, version, expected, public, audit)
            .await
    }
    async fn cache_get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        self.inner.cache_get(key).await
    }
    async fn cache_put(&self, key: &str, bytes: &[u8], at: i64) -> Result<(), StoreError> {
        self.inner.cache_put(key, bytes, at).await
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: Broker<Racing>,
    sim: SimulatedAmd,
    vcek: attestation::sim::SimulatedKey,
    fields: ReportFields,
}

fn policy(fields: &ReportFields, secrets: &[&str]) -> String {
    let grants: serde_json::Map<String, serde_json::Value> = secrets
        .iter()
        .map(|s| (s.to_string(), serde_json::json!(["sim"])))
        .collect();
    serde_json::json!({
        "rules": { "sim": { "allOf": [
            { "claim": "measurement", "equals": hex::encode(fields.measurement) },
            { "claim": "policy.debug_allowed", "equals": false }
        ] } },
        "secrets": grants
    })
    .to_string()
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let sim = SimulatedAmd::generate(Product::Genoa, now).unwrap();
    let fields = ReportFields::new(Product::Genoa);
    let vcek = sim
        .issue_vcek(&fields.chip_id, fields.tcb, now - Duration::from_secs(60))
        .unwrap();
    let master = MasterKey::generate().unwrap();
    let store = Racing {
        inner: SqliteStore::open(&dir.path().join("r.db")).await.unwrap(),
        armed: Mutex::new(None),
        commits: std::sync::atomic::AtomicUsize::new(0),
    };
    let anchors = TrustAnchors::amd()
        .unwrap()
        .dangerous_trust_simulated_root(sim.ark_der())
        .unwrap();
    let broker = Broker::new(
        store,
        Verifier::new(anchors),
        std::sync::Arc::new(
            broker::keyring::Keyring::new(master, Duration::from_secs(60)).unwrap(),
        ),
        Duration::from_secs(60),
    );
    broker
        .set_policy(&policy(&fields, &["db-key", "other"]), "test", now)
        .await
        .unwrap();
    for name in ["db-key", "other"] {
        broker
            .put_secret(name, SecretKind::Opaque, &[7u8; 32], "test", now)
            .await
            .unwrap();
    }
    Setup {
        _dir: dir,
        broker,
        sim,
        vcek,
        fields,
    }
}

impl Setup {
    fn request(&self, secrets: &[&str]) -> AttestRequest {
        let nonce = self.broker.challenge(SystemTime::now()).unwrap().nonce;
        let key = EphemeralKey::generate(Kem::X25519);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&nonce)
            .unwrap();
        let mut f = self.fields.clone();
        f.report_data = binding::report_data(&raw, &key.public_key().binding_bytes().unwrap());
        AttestRequest {
            nonce,
            evidence: Evidence::Snp {
                report: attestation::protocol::encode_b64(&self.vcek.sign_report(&f).unwrap()),
                certificates: vec![
                    CertificateEntry {
                        kind: "vcek".into(),
                        der: attestation::protocol::encode_b64(self.vcek.cert_der()),
                    },
                    CertificateEntry {
                        kind: "ask".into(),
                        der: attestation::protocol::encode_b64(self.sim.ask_der()),
                    },
                ],
            },
            public_key: key.public_key(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            certificates: Vec::new(),
        }
    }

    fn arm(&self, change: Change) {
        *self.broker.store().armed.lock().unwrap() = Some(change);
    }

    async fn attest(&self, secrets: &[&str]) -> Result<(), Refusal> {
        self.broker
            .attest(self.request(secrets), "127.0.0.1", SystemTime::now())
            .await
            .map(|_| ())
    }

    async fn outcomes(&self) -> Vec<String> {
        self.broker
            .store()
            .query_audit(&AuditQuery {
                action: Some("attest".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.outcome)
            .collect()
    }
}

#[tokio::test]
async fn a_secret_deleted_before_the_commit_is_not_released() {
    let s = setup().await;
    // Warm: the inputs are cached, as on a busy broker.
    s.attest(&["db-key"]).await.unwrap();
    s.arm(Change::DeleteSecret("db-key".into()));
    let refusal = s.attest(&["db-key"]).await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::UnknownSecret(name) if name == "db-key"),
        "{refusal:?}"
    );
    // The stale decision wrote nothing; the second, on fresh inputs, recorded the refusal.
    assert_eq!(s.outcomes().await, ["refused", "released"]);
    // Others are still served.
    s.attest(&["other"]).await.unwrap();
}

#[tokio::test]
async fn a_policy_replaced_before_the_commit_decides() {
    let s = setup().await;
    s.attest(&["db-key"]).await.unwrap();
    s.arm(Change::SetPolicy(policy(&s.fields, &["other"])));
    let refusal = s.attest(&["db-key"]).await.unwrap_err();
    assert!(
        matches!(&refusal, Refusal::Policy { secret, .. } if secret == "db-key"),
        "{refusal:?}"
    );
    assert_eq!(s.outcomes().await, ["refused", "released"]);
    s.attest(&["other"]).await.unwrap();
}

#[tokio::test]
async fn an_unrelated_change_costs_one_more_decision_and_releases() {
    let s = setup().await;
    s.attest(&["db-key"]).await.unwrap();
    s.arm(Change::DeleteSecret("other".into()));
    s.attest(&["db-key"]).await.unwrap();
    assert_eq!(s.outcomes().await, ["released", "released"]);
}

/// A replay to the broker that released is refused before it is decided, sealed or sent to
/// the store (the store's spend still decides across replicas).
#[tokio::test]
async fn a_replay_is_refused_before_it_is_decided() {
    let s = setup().await;
    let request = s.request(&["db-key"]);
    s.broker
        .attest(request.clone(), "127.0.0.1", SystemTime::now())
        .await
        .unwrap();
    let commits = || {
        s.broker
            .store()
            .commits
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(commits(), 1);
    let refusal = s
        .broker
        .attest(request, "127.0.0.1", SystemTime::now())
        .await
        .unwrap_err();
    assert!(matches!(refusal, Refusal::NonceReplay), "{refusal:?}");
    assert_eq!(commits(), 1, "the replay reached the store");
    // Audited like every replay (sampled, within the verified-evidence budget).
    assert_eq!(s.outcomes().await, ["refused", "released"]);
}
