//! The store: secrets (encrypted records), policies, used nonces, the audit log and the AMD
//! certificate cache, behind one trait. SQLite is the embedded engine; a PostgreSQL engine
//! implements the same trait (the SQL here sticks to what both dialects share).

use std::future::Future;

use serde::Serialize;

mod sqlite;

pub use sqlite::SqliteStore;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or answered with an error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A concurrent writer took the same key; try again.
    #[error("store conflict: {0}")]
    Conflict(String),
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
}

/// The operations the broker needs from its store.
pub trait Store: Send + Sync + 'static {
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

    /// Records a nonce as used. False if it was used before.
    fn use_nonce(
        &self,
        digest: &[u8; 32],
        expires_at: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
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
