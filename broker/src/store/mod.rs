//! The store: secrets (encrypted records), policies, used nonces, the audit log and the AMD
//! certificate cache, behind one trait. SQLite is the embedded engine; a PostgreSQL engine
//! implements the same trait (the SQL here sticks to what both dialects share).

use std::future::Future;

use serde::Serialize;

pub(crate) mod group;
mod postgres;
pub(crate) mod sql;
mod sqlite;
mod sqlite_writer;

pub use group::{CommitMetrics, Committed, DecisionInputs, IssuedRecord, Spend};
pub use postgres::{PgSettings, PgStore};
pub use sql::HeldTx;
pub use sqlite::SqliteStore;
#[cfg(test)]
pub(crate) use sqlite::tests::store as temp_sqlite_store;

/// Why the store failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A concurrent writer took the same key; try again.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// A record sealed under an older data key than the store's current one (a rotation
    /// began): reload the data keys and seal again.
    #[error("record sealed under data key {sealed_under}, the store's current one is {current}")]
    OldDataKey {
        /// The version the record was sealed under.
        sealed_under: u64,
        /// The store's current data-key version.
        current: u64,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// A secret version as stored: metadata and the encrypted record.
#[derive(Clone)]
pub struct StoredSecret {
    /// Name.
    pub name: String,
    /// Version (1, 2, …).
    pub version: u64,
    /// Kind (`tls-key`, `data-key`, `opaque`).
    pub kind: String,
    /// Public metadata (JSON): sizes, certificate subject and expiry; never secret bytes.
    pub meta: serde_json::Value,
    /// `nonce || ciphertext || tag` under the record key.
    pub sealed: Vec<u8>,
    /// The data-key version it is sealed under.
    pub key_version: u64,
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSecret")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// One version of one of the broker's own keys (for example the attestation-token signing
/// key): the private half sealed under the record key, the public half in the clear.
#[derive(Clone)]
pub struct BrokerKey {
    /// What the key is for (`ear-es256`).
    pub purpose: String,
    /// Version (1, 2, …).
    pub version: u64,
    /// When it was made (seconds since the epoch).
    pub created_at: i64,
    /// The public key (a JWK, JSON).
    pub public: serde_json::Value,
    /// The sealed private key.
    pub sealed: Vec<u8>,
    /// The data-key version it is sealed under.
    pub key_version: u64,
}

/// A data-key version as stored: wrapped by the master key.
#[derive(Clone)]
pub struct DataKeyRecord {
    /// Version (2, 3, …; 1 is the master key itself).
    pub version: u64,
    /// The key, wrapped by the master key.
    pub wrapped: Vec<u8>,
    /// When it was made.
    pub created_at: i64,
    /// When every record had moved to a newer version, if they have.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for DataKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeyRecord")
            .field("version", &self.version)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// Which table a sealed record lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedTable {
    /// `secrets`: keyed by name and version.
    Secret,
    /// `broker_keys`: keyed by purpose and version.
    BrokerKey,
}

/// A sealed record, for re-encryption under a new data key.
#[derive(Clone)]
pub struct SealedRecord {
    /// Its table.
    pub table: SealedTable,
    /// The secret's name or the broker key's purpose.
    pub name: String,
    /// The record's version.
    pub version: u64,
    /// The data-key version it is sealed under.
    pub key_version: u64,
    /// The sealed bytes.
    pub sealed: Vec<u8>,
}

impl SealedRecord {
    /// The name its seal is bound to (associated data): a secret's name, or
    /// `broker-key/<purpose>` for the broker's own keys.
    pub fn sealed_name(&self) -> String {
        match self.table {
            SealedTable::Secret => self.name.clone(),
            SealedTable::BrokerKey => broker_key_sealed_name(&self.name),
        }
    }
}

/// The name a broker key of `purpose` is sealed under.
pub fn broker_key_sealed_name(purpose: &str) -> String {
    format!("broker-key/{purpose}")
}

impl std::fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRecord")
            .field("table", &self.table)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for BrokerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerKey")
            .field("purpose", &self.purpose)
            .field("version", &self.version)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// How the store's master key is held: which provider, a check value, and (pkcs11) the key
/// wrapped by the token's key.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKeyRecord {
    /// `file` or `pkcs11`.
    pub provider: String,
    /// The wrapped key (pkcs11 only).
    pub wrapped: Option<Vec<u8>>,
    /// [`crate::keys::MasterKey::check_value`].
    pub check: Vec<u8>,
    /// When it was recorded (seconds since the epoch).
    pub created_at: i64,
}

impl std::fmt::Debug for MasterKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeyRecord")
            .field("provider", &self.provider)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Metadata of a secret's current version, for listings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SecretInfo {
    /// Name.
    pub name: String,
    /// Current version.
    pub version: u64,
    /// Kind.
    pub kind: String,
    /// Creation time of the current version (seconds since the epoch).
    pub created_at: i64,
    /// Operator who created it.
    pub created_by: String,
    /// Public metadata.
    pub meta: serde_json::Value,
}

/// One version of the policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyVersion {
    /// Version (1, 2, …).
    pub version: u64,
    /// The document.
    pub document: String,
    /// When it was set (seconds since the epoch).
    pub created_at: i64,
    /// Who set it.
    pub created_by: String,
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Sequence number (assigned by the store).
    pub id: i64,
    /// Time (seconds since the epoch).
    pub at: i64,
    /// Who: an operator's certificate subject, or `guest <address>`.
    pub actor: String,
    /// What: `attest`, `secret.put`, `secret.generate`, `secret.delete`, `policy.set`, …
    pub action: String,
    /// `released`, `refused`, `ok`, `error`.
    pub outcome: String,
    /// Details (JSON): reasons, secret names and versions, the claims digest.
    pub detail: serde_json::Value,
}

/// Which audit records to return, newest first.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only this action.
    pub action: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Only records at or after this time.
    pub since: Option<i64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only records older than this one (by id): the next page after a page whose oldest
    /// record had this id.
    pub before_id: Option<i64>,
}

/// The active policy's version, and its document unless the caller has that version already.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyRef {
    /// Version.
    pub version: u64,
    /// The document; `None` when it is the version the caller said it has parsed.
    pub document: Option<String>,
}

/// The operations the broker needs from its store.
pub trait Store: Send + Sync + 'static {
    /// A lock on one AMD KDS lookup across every broker on this store; released on drop.
    type FetchLock: Send;

    /// Takes the cross-replica lock of the KDS lookup `key`, waiting while another broker
    /// holds it (that broker is fetching the same thing: the caller then finds it cached).
    /// On SQLite, with one broker, there is nothing to lock.
    fn lock_fetch(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Self::FetchLock, StoreError>> + Send;

    /// What a release decision on the secrets `names` reads: the active policy (its
    /// document only if its version is not `cached_policy`) and the current version of each
    /// secret, as of a store generation; from the store's cache when it has them.
    fn decision_inputs(
        &self,
        names: &[String],
        cached_policy: Option<u64>,
    ) -> impl Future<Output = Result<DecisionInputs, StoreError>> + Send;

    /// Makes a decision durable: spends its nonce and appends `audit`, in the next group of
    /// decisions that commits together (one transaction), unless the nonce was spent
    /// already ([`Committed::Replay`]) or secrets or policies changed since the inputs'
    /// generation ([`Committed::Stale`]); then nothing is written. Returns once the group
    /// is durable.
    fn commit_decision(
        &self,
        spend: Spend,
        audit: AuditRecord,
    ) -> impl Future<Output = Result<Committed, StoreError>> + Send;

    /// The group commit's metrics.
    fn commit_metrics(&self) -> &CommitMetrics;

    /// Checks the store answers and can commit a write.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The newest version number ever used for `name` (deleted ones included), 0 if none.
    fn last_secret_version(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Inserts a secret version and its audit record in one transaction; `Conflict` if that
    /// version exists.
    fn insert_secret(
        &self,
        secret: &StoredSecret,
        created_at: i64,
        created_by: &str,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The current (newest, not deleted) version of a secret.
    fn current_secret(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredSecret>, StoreError>> + Send;
    /// Current versions of every secret, metadata only.
    fn list_secrets(&self) -> impl Future<Output = Result<Vec<SecretInfo>, StoreError>> + Send;
    /// Deletes every version of a secret: records erased (and overwritten on disk where the
    /// engine can), metadata kept, the audit record written in the same transaction. False
    /// (and nothing written) if unknown.
    fn delete_secret(
        &self,
        name: &str,
        at: i64,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Stores a new policy version and makes it active, with its audit record (whose
    /// `detail.version` the store sets) in the same transaction; returns the version.
    fn insert_policy(
        &self,
        document: &str,
        at: i64,
        by: &str,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The active (newest) policy.
    fn active_policy(
        &self,
    ) -> impl Future<Output = Result<Option<PolicyVersion>, StoreError>> + Send;
    /// Every policy version, newest first.
    fn policy_history(&self)
    -> impl Future<Output = Result<Vec<PolicyVersion>, StoreError>> + Send;

    /// Forgets used nonces that expired before `now`.
    fn purge_nonces(&self, now: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Appends an audit record (its `id` is ignored and assigned).
    fn append_audit(
        &self,
        record: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes audit records older than `before` and appends `record` (whose
    /// `detail.deleted` the store sets) in one transaction; returns how many were deleted.
    fn prune_audit(
        &self,
        before: i64,
        record: &AuditRecord,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Audit records, newest first.
    fn query_audit(
        &self,
        query: &AuditQuery,
    ) -> impl Future<Output = Result<Vec<AuditRecord>, StoreError>> + Send;

    /// The certificates the private CA issued, newest first, at most `limit`.
    fn issued_certificates(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<IssuedRecord>, StoreError>> + Send;
    /// The certificate with this serial (lowercase hex), if the CA issued it.
    fn issued_certificate(
        &self,
        serial: &str,
    ) -> impl Future<Output = Result<Option<IssuedRecord>, StoreError>> + Send;
    /// Certificates not revoked whose validity ends after `now`.
    fn unexpired_certificates(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<Vec<IssuedRecord>, StoreError>> + Send;
    /// Revoked certificates of CA version `ca_version` whose validity ends after `now` (what
    /// its CRL lists).
    fn revoked_certificates(
        &self,
        ca_version: u64,
        now: i64,
    ) -> impl Future<Output = Result<Vec<IssuedRecord>, StoreError>> + Send;
    /// Revokes the certificate `serial` at `at` for `reason`, with its audit record, in one
    /// transaction; false (and nothing written) if it is unknown or revoked already.
    fn revoke_certificate(
        &self,
        serial: &str,
        at: i64,
        reason: &str,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every version of the broker's keys for `purpose`, newest first.
    fn broker_keys(
        &self,
        purpose: &str,
    ) -> impl Future<Output = Result<Vec<BrokerKey>, StoreError>> + Send;
    /// Inserts a version of a broker key with its audit record in one transaction;
    /// `Conflict` if that version exists (another replica made it first).
    fn insert_broker_key(
        &self,
        key: &BrokerKey,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Replaces the public part of a broker key's version with its audit record in one
    /// transaction, if it is still `expected`; `Conflict` otherwise (another request changed
    /// it first, or there is no such version).
    fn set_broker_key_public(
        &self,
        purpose: &str,
        version: u64,
        expected: &serde_json::Value,
        public: &serde_json::Value,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// How the master key is held, once recorded.
    fn master_key(
        &self,
    ) -> impl Future<Output = Result<Option<MasterKeyRecord>, StoreError>> + Send;
    /// Records how the master key is held, with its audit record: `Conflict` if a record
    /// exists (another replica recorded it first) unless `replace` (a re-wrap), and in the
    /// same transaction stores `data_keys` (re-wrapped under a new master key: each row's
    /// wrapped bytes are replaced, or the row added).
    fn put_master_key(
        &self,
        record: &MasterKeyRecord,
        replace: bool,
        data_keys: &[DataKeyRecord],
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// How many records are sealed under the master key (secret versions and broker keys).
    fn sealed_records(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The data-key versions, oldest first (version 1, the master key itself, is not stored).
    fn data_keys(&self) -> impl Future<Output = Result<Vec<DataKeyRecord>, StoreError>> + Send;
    /// Adds a data-key version (a conflict if it exists), with its audit record.
    fn insert_data_key(
        &self,
        key: &DataKeyRecord,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Up to `limit` sealed records under a data key older than `current`.
    fn records_under_old_keys(
        &self,
        current: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<SealedRecord>, StoreError>> + Send;
    /// Replaces records with their re-encryption, in one transaction; a record whose key
    /// version changed meanwhile is left alone. No new generation: the plaintexts, so the
    /// decisions, are unchanged. How many were replaced.
    fn reseal(
        &self,
        records: &[(SealedRecord, Vec<u8>, u64)],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Marks every data key older than `current` retired, if no record is sealed under one
    /// any more (a conflict otherwise), with its audit record. How many were retired.
    fn retire_data_keys(
        &self,
        current: u64,
        at: i64,
        audit: &AuditRecord,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A cached AMD certificate or CRL.
    fn cache_get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(Vec<u8>, i64)>, StoreError>> + Send;
    /// Caches an AMD certificate or CRL.
    fn cache_put(
        &self,
        key: &str,
        bytes: &[u8],
        at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store a broker runs on, chosen by its configuration.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// The embedded engine.
    Sqlite(SqliteStore),
    /// The engine for several replicas.
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens (and migrates) the configured store.
    pub async fn open(settings: &crate::config::StoreSettings) -> Result<AnyStore, StoreError> {
        Ok(match settings {
            crate::config::StoreSettings::Sqlite(path) => {
                AnyStore::Sqlite(SqliteStore::open(path).await?)
            }
            crate::config::StoreSettings::Postgres(pg) => {
                AnyStore::Postgres(PgStore::open(pg).await?)
            }
        })
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
        }
    };
}

/// [`AnyStore`]'s KDS lookup lock.
#[derive(Debug)]
pub enum AnyFetchLock {
    /// SQLite: none needed.
    Sqlite(()),
    /// PostgreSQL: a transaction holding an advisory lock.
    Postgres(HeldTx<sqlx::Postgres>),
}

impl Store for AnyStore {
    type FetchLock = AnyFetchLock;

    async fn lock_fetch(&self, key: &str) -> Result<AnyFetchLock, StoreError> {
        match self {
            AnyStore::Sqlite(s) => Ok(AnyFetchLock::Sqlite(s.lock_fetch(key).await?)),
            AnyStore::Postgres(s) => Ok(AnyFetchLock::Postgres(s.lock_fetch(key).await?)),
        }
    }

    async fn decision_inputs(
        &self,
        names: &[String],
        cached_policy: Option<u64>,
    ) -> Result<DecisionInputs, StoreError> {
        dispatch!(self, s => s.decision_inputs(names, cached_policy).await)
    }
    async fn commit_decision(
        &self,
        spend: Spend,
        audit: AuditRecord,
    ) -> Result<Committed, StoreError> {
        dispatch!(self, s => s.commit_decision(spend, audit).await)
    }
    fn commit_metrics(&self) -> &CommitMetrics {
        dispatch!(self, s => s.commit_metrics())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }
    async fn last_secret_version(&self, name: &str) -> Result<u64, StoreError> {
        dispatch!(self, s => s.last_secret_version(name).await)
    }
    async fn insert_secret(
        &self,
        secret: &StoredSecret,
        created_at: i64,
        created_by: &str,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_secret(secret, created_at, created_by, audit).await)
    }
    async fn current_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        dispatch!(self, s => s.current_secret(name).await)
    }
    async fn list_secrets(&self) -> Result<Vec<SecretInfo>, StoreError> {
        dispatch!(self, s => s.list_secrets().await)
    }
    async fn delete_secret(
        &self,
        name: &str,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete_secret(name, at, audit).await)
    }
    async fn insert_policy(
        &self,
        document: &str,
        at: i64,
        by: &str,
        audit: &AuditRecord,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.insert_policy(document, at, by, audit).await)
    }
    async fn active_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
        dispatch!(self, s => s.active_policy().await)
    }
    async fn policy_history(&self) -> Result<Vec<PolicyVersion>, StoreError> {
        dispatch!(self, s => s.policy_history().await)
    }
    async fn purge_nonces(&self, now: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.purge_nonces(now).await)
    }
    async fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.append_audit(record).await)
    }
    async fn prune_audit(&self, before: i64, record: &AuditRecord) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_audit(before, record).await)
    }
    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        dispatch!(self, s => s.query_audit(query).await)
    }
    async fn broker_keys(&self, purpose: &str) -> Result<Vec<BrokerKey>, StoreError> {
        dispatch!(self, s => s.broker_keys(purpose).await)
    }
    async fn issued_certificates(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
        dispatch!(self, s => s.issued_certificates(limit).await)
    }
    async fn issued_certificate(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        dispatch!(self, s => s.issued_certificate(serial).await)
    }
    async fn unexpired_certificates(&self, now: i64) -> Result<Vec<IssuedRecord>, StoreError> {
        dispatch!(self, s => s.unexpired_certificates(now).await)
    }
    async fn revoked_certificates(
        &self,
        ca_version: u64,
        now: i64,
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        dispatch!(self, s => s.revoked_certificates(ca_version, now).await)
    }
    async fn revoke_certificate(
        &self,
        serial: &str,
        at: i64,
        reason: &str,
        audit: &AuditRecord,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.revoke_certificate(serial, at, reason, audit).await)
    }
    async fn insert_broker_key(
        &self,
        key: &BrokerKey,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_broker_key(key, audit).await)
    }
    async fn set_broker_key_public(
        &self,
        purpose: &str,
        version: u64,
        expected: &serde_json::Value,
        public: &serde_json::Value,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.set_broker_key_public(purpose, version, expected, public, audit).await)
    }
    async fn master_key(&self) -> Result<Option<MasterKeyRecord>, StoreError> {
        dispatch!(self, s => s.master_key().await)
    }
    async fn put_master_key(
        &self,
        record: &MasterKeyRecord,
        replace: bool,
        data_keys: &[DataKeyRecord],
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_master_key(record, replace, data_keys, audit).await)
    }
    async fn sealed_records(&self) -> Result<u64, StoreError> {
        dispatch!(self, s => s.sealed_records().await)
    }
    async fn data_keys(&self) -> Result<Vec<DataKeyRecord>, StoreError> {
        dispatch!(self, s => s.data_keys().await)
    }
    async fn insert_data_key(
        &self,
        key: &DataKeyRecord,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_data_key(key, audit).await)
    }
    async fn records_under_old_keys(
        &self,
        current: u64,
        limit: u32,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        dispatch!(self, s => s.records_under_old_keys(current, limit).await)
    }
    async fn reseal(&self, records: &[(SealedRecord, Vec<u8>, u64)]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.reseal(records).await)
    }
    async fn retire_data_keys(
        &self,
        current: u64,
        at: i64,
        audit: &AuditRecord,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.retire_data_keys(current, at, audit).await)
    }
    async fn cache_get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        dispatch!(self, s => s.cache_get(key).await)
    }
    async fn cache_put(&self, key: &str, bytes: &[u8], at: i64) -> Result<(), StoreError> {
        dispatch!(self, s => s.cache_put(key, bytes, at).await)
    }
}
