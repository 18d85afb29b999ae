//! The SQL both engines share: statements written once (`$n` parameters, `ON CONFLICT`,
//! `RETURNING` are valid SQLite and PostgreSQL alike) and expanded for each engine's types by
//! [`sql_store!`]. What differs (schema types, migrations, locking, what follows a delete) is
//! in the engine modules, behind the hooks `begin_write` and `after_delete`.

use std::time::{SystemTime, UNIX_EPOCH};

/// A transaction held open for its locks (PostgreSQL's KDS lookup lock); dropping it rolls
/// back and releases them.
pub struct HeldTx<DB: sqlx::Database> {
    pub(crate) _tx: sqlx::Transaction<'static, DB>,
}

/// The readiness probe's committed write (`$1`: seconds since the epoch), on either engine.
pub(crate) const HEARTBEAT: &str = "INSERT INTO heartbeat (id, at) VALUES (1, $1)
     ON CONFLICT (id) DO UPDATE SET at = excluded.at";

/// A turn as the engine's single writer.
pub(crate) type Writer = tokio::sync::OwnedMutexGuard<()>;

impl<DB: sqlx::Database> std::fmt::Debug for HeldTx<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldTx(..)")
    }
}

/// A new store generation: random, so that no two states of the secrets and policies (a
/// database restored from a backup included) share one.
pub(crate) fn new_generation() -> Result<i64, super::StoreError> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| super::StoreError::Unavailable("no randomness for a generation".into()))?;
    Ok(i64::from_le_bytes(bytes))
}

/// Used nonces deleted per purge transaction: small, so writers never wait long.
pub(crate) const PURGE_BATCH: i64 = 500;

/// Seconds since the epoch.
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Implements [`Store`](super::Store) for `$store` (with `pool` and `decisions` fields, the
/// hooks `begin_write`, `writer_turn`, `after_delete`, `heartbeat` and `fetch_lock`, which
/// returns a `$lock`) over database `$db`. Each engine commits release decisions its own way (its
/// `Decisions` writer).
macro_rules! sql_store {
    ($store:ty, $db:ty, $lock:ty) => {
        async fn insert_audit(
            conn: &mut <$db as sqlx::Database>::Connection,
            r: &AuditRecord,
        ) -> Result<(), StoreError> {
            sqlx::query(
                "INSERT INTO audit (at, actor, action, outcome, detail) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(r.at)
            .bind(&r.actor)
            .bind(&r.action)
            .bind(&r.outcome)
            .bind(r.detail.to_string())
            .execute(conn)
            .await?;
            Ok(())
        }

        /// The columns of an issued certificate, as [`issued_record`] reads them.
        const ISSUED_COLUMNS: &str = "serial, ca_version, profile, subject, names, claims_digest, \
            claims, not_before, not_after, issued_at, certificate, revoked_at, revocation_reason";

        fn issued_record(
            r: &<$db as sqlx::Database>::Row,
        ) -> Result<$crate::store::IssuedRecord, StoreError> {
            let names: String = r.try_get("names")?;
            let claims: String = r.try_get("claims")?;
            Ok($crate::store::IssuedRecord {
                serial: r.try_get("serial")?,
                ca_version: to_u64(r.try_get("ca_version")?),
                profile: r.try_get("profile")?,
                subject: r.try_get("subject")?,
                names: serde_json::from_str(&names).unwrap_or_default(),
                claims_digest: r.try_get("claims_digest")?,
                claims: serde_json::from_str(&claims).unwrap_or(serde_json::Value::Null),
                not_before: r.try_get("not_before")?,
                not_after: r.try_get("not_after")?,
                issued_at: r.try_get("issued_at")?,
                certificate: r.try_get("certificate")?,
                revoked_at: r.try_get("revoked_at")?,
                revocation_reason: r.try_get("revocation_reason")?,
            })
        }

        fn secret_from_row(row: &<$db as sqlx::Database>::Row) -> Result<StoredSecret, StoreError> {
            let meta: String = row.try_get("meta")?;
            Ok(StoredSecret {
                name: row.try_get("name")?,
                version: to_u64(row.try_get("version")?),
                kind: row.try_get("kind")?,
                meta: serde_json::from_str(&meta).unwrap_or(serde_json::Value::Null),
                sealed: row
                    .try_get::<Option<Vec<u8>>, _>("sealed")?
                    .unwrap_or_default(),
                key_version: to_u64(row.try_get("key_version")?),
            })
        }

        /// Refuses a record sealed under an older data key than the store's current one.
        async fn check_key_version(
            conn: &mut <$db as sqlx::Database>::Connection,
            sealed_under: u64,
        ) -> Result<(), StoreError> {
            let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM data_keys")
                .fetch_one(conn)
                .await?;
            let current = to_u64(current.unwrap_or(1));
            if sealed_under < current {
                return Err(StoreError::OldDataKey { sealed_under, current });
            }
            Ok(())
        }

        fn policy_from_row(row: &<$db as sqlx::Database>::Row) -> Result<PolicyVersion, StoreError> {
            Ok(PolicyVersion {
                version: to_u64(row.try_get("version")?),
                document: row.try_get("document")?,
                created_at: row.try_get("created_at")?,
                created_by: row.try_get("created_by")?,
            })
        }

        impl $crate::store::Store for $store {
            type FetchLock = $lock;

            async fn lock_fetch(&self, key: &str) -> Result<$lock, StoreError> {
                self.fetch_lock(key).await
            }

            async fn ping(&self) -> Result<(), StoreError> {
                // A committed write, not a read: a store that answers reads but cannot write (disk
                // full, locked, read-only) is not ready.
                let _writer = self.writer_turn().await;
                self.heartbeat($crate::store::sql::now()).await
            }

            async fn last_secret_version(&self, name: &str) -> Result<u64, StoreError> {
                let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM secrets WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(to_u64(v.unwrap_or(0)))
            }

            async fn insert_secret(
                &self,
                s: &StoredSecret,
                created_at: i64,
                created_by: &str,
                audit: &AuditRecord,
            ) -> Result<(), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                // The generation row first: on PostgreSQL its lock orders this insert with
                // data-key inserts and retirements, which take it too.
                bump_generation(&mut tx).await?;
                check_key_version(&mut tx, s.key_version).await?;
                sqlx::query(
                    "INSERT INTO secrets (name, version, kind, created_at, created_by, sealed, meta, key_version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&s.name)
                .bind(to_i64(s.version))
                .bind(&s.kind)
                .bind(created_at)
                .bind(created_by)
                .bind(&s.sealed)
                .bind(s.meta.to_string())
                .bind(to_i64(s.key_version))
                .execute(&mut *tx)
                .await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                self.decisions.cache.invalidate();
                Ok(())
            }

            async fn current_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
                let row = sqlx::query(
                    "SELECT name, version, kind, sealed, meta, key_version FROM secrets
                     WHERE name = $1 AND deleted_at IS NULL ORDER BY version DESC LIMIT 1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(secret_from_row).transpose()
            }

            async fn list_secrets(&self) -> Result<Vec<SecretInfo>, StoreError> {
                let rows = sqlx::query(
                    "SELECT s.name, s.version, s.kind, s.created_at, s.created_by, s.meta FROM secrets s
                     WHERE s.deleted_at IS NULL AND s.version =
                       (SELECT MAX(t.version) FROM secrets t WHERE t.name = s.name AND t.deleted_at IS NULL)
                     ORDER BY s.name",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let meta: String = row.try_get("meta")?;
                        Ok(SecretInfo {
                            name: row.try_get("name")?,
                            version: to_u64(row.try_get("version")?),
                            kind: row.try_get("kind")?,
                            created_at: row.try_get("created_at")?,
                            created_by: row.try_get("created_by")?,
                            meta: serde_json::from_str(&meta).unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .collect()
            }

            async fn delete_secret(
                &self,
                name: &str,
                at: i64,
                audit: &AuditRecord,
            ) -> Result<bool, StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                let done = sqlx::query(
                    "UPDATE secrets SET deleted_at = $1, sealed = NULL WHERE name = $2 AND deleted_at IS NULL",
                )
                .bind(at)
                .bind(name)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                bump_generation(&mut tx).await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                self.decisions.cache.invalidate();
                // Other writers go on while the WAL is checkpointed.
                drop(_writer);
                self.after_delete().await;
                Ok(true)
            }

            async fn insert_policy(
                &self,
                document: &str,
                at: i64,
                by: &str,
                audit: &AuditRecord,
            ) -> Result<u64, StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                bump_generation(&mut tx).await?;
                // One statement: the next version is taken and written atomically.
                let version: i64 = sqlx::query_scalar(
                    "INSERT INTO policies (version, document, created_at, created_by)
                     SELECT COALESCE(MAX(version), 0) + 1, $1, $2, $3 FROM policies
                     RETURNING version",
                )
                .bind(document)
                .bind(at)
                .bind(by)
                .fetch_one(&mut *tx)
                .await?;
                let mut audit = audit.clone();
                audit.detail["version"] = version.into();
                insert_audit(&mut tx, &audit).await?;
                tx.commit().await?;
                self.decisions.cache.invalidate();
                Ok(to_u64(version))
            }

            async fn active_policy(&self) -> Result<Option<PolicyVersion>, StoreError> {
                let row = sqlx::query(
                    "SELECT version, document, created_at, created_by FROM policies ORDER BY version DESC LIMIT 1",
                )
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(policy_from_row).transpose()
            }

            async fn policy_history(&self) -> Result<Vec<PolicyVersion>, StoreError> {
                let rows = sqlx::query(
                    "SELECT version, document, created_at, created_by FROM policies ORDER BY version DESC",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(policy_from_row).collect()
            }

            async fn purge_nonces(&self, now: i64) -> Result<u64, StoreError> {
                // In small transactions, each its own writer turn: decisions go on in between.
                let mut total = 0;
                loop {
                    let writer = self.writer_turn().await;
                    let done = sqlx::query(
                        "DELETE FROM used_nonces WHERE digest IN
                           (SELECT digest FROM used_nonces WHERE expires_at < $1 LIMIT $2)",
                    )
                    .bind(now)
                    .bind($crate::store::sql::PURGE_BATCH)
                    .execute(&self.pool)
                    .await?;
                    drop(writer);
                    total += done.rows_affected();
                    if done.rows_affected() < to_u64($crate::store::sql::PURGE_BATCH) {
                        return Ok(total);
                    }
                    tokio::task::yield_now().await;
                }
            }

            async fn append_audit(&self, r: &AuditRecord) -> Result<(), StoreError> {
                let _writer = self.writer_turn().await;
                let mut conn = self.pool.acquire().await?;
                insert_audit(&mut conn, r).await
            }

            async fn prune_audit(&self, before: i64, record: &AuditRecord) -> Result<u64, StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                let done = sqlx::query("DELETE FROM audit WHERE at < $1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await?;
                let mut record = record.clone();
                record.detail["deleted"] = done.rows_affected().into();
                insert_audit(&mut tx, &record).await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }

            async fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
                let limit = i64::from(q.limit.unwrap_or(100).clamp(1, 1000));
                let rows = sqlx::query(
                    "SELECT id, at, actor, action, outcome, detail FROM audit
                     WHERE ($1 IS NULL OR action = $1) AND ($2 IS NULL OR outcome = $2) AND ($3 IS NULL OR at >= $3)
                       AND ($5 IS NULL OR id < $5)
                     ORDER BY id DESC LIMIT $4",
                )
                .bind(q.action.as_deref())
                .bind(q.outcome.as_deref())
                .bind(q.since)
                .bind(limit)
                .bind(q.before_id)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let detail: String = row.try_get("detail")?;
                        Ok(AuditRecord {
                            id: row.try_get("id")?,
                            at: row.try_get("at")?,
                            actor: row.try_get("actor")?,
                            action: row.try_get("action")?,
                            outcome: row.try_get("outcome")?,
                            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .collect()
            }

            async fn master_key(
                &self,
            ) -> Result<Option<$crate::store::MasterKeyRecord>, StoreError> {
                let row = sqlx::query(
                    "SELECT provider, wrapped, key_check, created_at FROM master_key WHERE id = 1",
                )
                .fetch_optional(&self.pool)
                .await?;
                row.map(|r| {
                    Ok($crate::store::MasterKeyRecord {
                        provider: r.try_get("provider")?,
                        wrapped: r.try_get("wrapped")?,
                        check: r.try_get("key_check")?,
                        created_at: r.try_get("created_at")?,
                    })
                })
                .transpose()
            }

            async fn put_master_key(
                &self,
                record: &$crate::store::MasterKeyRecord,
                replace: bool,
                data_keys: &[$crate::store::DataKeyRecord],
                audit: &AuditRecord,
            ) -> Result<(), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                let sql = if replace {
                    "UPDATE master_key SET provider = $1, wrapped = $2, key_check = $3, created_at = $4
                     WHERE id = 1"
                } else {
                    "INSERT INTO master_key (id, provider, wrapped, key_check, created_at)
                     VALUES (1, $1, $2, $3, $4)"
                };
                let done = sqlx::query(sql)
                    .bind(&record.provider)
                    .bind(&record.wrapped)
                    .bind(&record.check)
                    .bind(record.created_at)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict("no master key record to replace".into()));
                }
                if !data_keys.is_empty() {
                    // Re-wrapped under a new master key: every stored version must be among
                    // them (a rotation that made one meanwhile would leave it unopenable).
                    bump_generation(&mut tx).await?;
                    let stored: Vec<i64> = sqlx::query_scalar("SELECT version FROM data_keys")
                        .fetch_all(&mut *tx)
                        .await?;
                    if let Some(v) = stored
                        .iter()
                        .find(|v| !data_keys.iter().any(|k| to_i64(k.version) == **v))
                    {
                        return Err(StoreError::Conflict(format!(
                            "data key version {v} was made meanwhile (a rotation is running); run the move again"
                        )));
                    }
                }
                for key in data_keys {
                    sqlx::query(
                        "INSERT INTO data_keys (version, wrapped, created_at) VALUES ($1, $2, $3)
                         ON CONFLICT (version) DO UPDATE SET wrapped = excluded.wrapped",
                    )
                    .bind(to_i64(key.version))
                    .bind(&key.wrapped)
                    .bind(key.created_at)
                    .execute(&mut *tx)
                    .await?;
                }
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn sealed_records(&self) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar(
                    "SELECT (SELECT COUNT(*) FROM secrets WHERE sealed IS NOT NULL)
                          + (SELECT COUNT(*) FROM broker_keys)",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(to_u64(n))
            }

            async fn broker_keys(
                &self,
                purpose: &str,
            ) -> Result<Vec<$crate::store::BrokerKey>, StoreError> {
                let rows = sqlx::query(
                    "SELECT purpose, version, created_at, public, sealed, key_version FROM broker_keys
                     WHERE purpose = $1 ORDER BY version DESC",
                )
                .bind(purpose)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let public: String = r.try_get("public")?;
                        Ok($crate::store::BrokerKey {
                            purpose: r.try_get("purpose")?,
                            version: to_u64(r.try_get("version")?),
                            created_at: r.try_get("created_at")?,
                            public: serde_json::from_str(&public).map_err(|e| {
                                StoreError::Unavailable(format!("stored public key: {e}"))
                            })?,
                            sealed: r.try_get("sealed")?,
                            key_version: to_u64(r.try_get("key_version")?),
                        })
                    })
                    .collect()
            }

            async fn insert_broker_key(
                &self,
                key: &$crate::store::BrokerKey,
                audit: &AuditRecord,
            ) -> Result<(), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                bump_generation(&mut tx).await?;
                check_key_version(&mut tx, key.key_version).await?;
                sqlx::query(
                    "INSERT INTO broker_keys (purpose, version, created_at, public, sealed, key_version)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&key.purpose)
                .bind(to_i64(key.version))
                .bind(key.created_at)
                .bind(key.public.to_string())
                .bind(&key.sealed)
                .bind(to_i64(key.key_version))
                .execute(&mut *tx)
                .await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn set_broker_key_public(
                &self,
                purpose: &str,
                version: u64,
                expected: &serde_json::Value,
                public: &serde_json::Value,
                audit: &AuditRecord,
            ) -> Result<(), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                bump_generation(&mut tx).await?;
                let stored: Option<String> = sqlx::query_scalar(
                    "SELECT public FROM broker_keys WHERE purpose = $1 AND version = $2",
                )
                .bind(purpose)
                .bind(to_i64(version))
                .fetch_optional(&mut *tx)
                .await?;
                let Some(stored) = stored else {
                    return Err(StoreError::Conflict(format!("no {purpose} version {version}")));
                };
                let stored: serde_json::Value = serde_json::from_str(&stored)
                    .map_err(|e| StoreError::Unavailable(format!("stored public key: {e}")))?;
                if &stored != expected {
                    return Err(StoreError::Conflict(format!(
                        "{purpose} version {version} changed meanwhile"
                    )));
                }
                sqlx::query(
                    "UPDATE broker_keys SET public = $1 WHERE purpose = $2 AND version = $3",
                )
                .bind(public.to_string())
                .bind(purpose)
                .bind(to_i64(version))
                .execute(&mut *tx)
                .await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn issued_certificates(
                &self,
                limit: u32,
            ) -> Result<Vec<$crate::store::IssuedRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {ISSUED_COLUMNS} FROM issued_certificates
                     ORDER BY issued_at DESC, serial LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(issued_record).collect()
            }

            async fn issued_certificate(
                &self,
                serial: &str,
            ) -> Result<Option<$crate::store::IssuedRecord>, StoreError> {
                let row = sqlx::query(&format!(
                    "SELECT {ISSUED_COLUMNS} FROM issued_certificates WHERE serial = $1"
                ))
                .bind(serial)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(issued_record).transpose()
            }

            async fn unexpired_certificates(
                &self,
                now: i64,
            ) -> Result<Vec<$crate::store::IssuedRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {ISSUED_COLUMNS} FROM issued_certificates
                     WHERE not_after > $1 AND revoked_at IS NULL ORDER BY serial"
                ))
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(issued_record).collect()
            }

            async fn revoked_certificates(
                &self,
                ca_version: u64,
                now: i64,
            ) -> Result<Vec<$crate::store::IssuedRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {ISSUED_COLUMNS} FROM issued_certificates
                     WHERE ca_version = $1 AND revoked_at IS NOT NULL AND not_after > $2
                     ORDER BY serial"
                ))
                .bind(to_i64(ca_version))
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(issued_record).collect()
            }

            async fn revoke_certificate(
                &self,
                serial: &str,
                at: i64,
                reason: &str,
                audit: &AuditRecord,
            ) -> Result<bool, StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                let done = sqlx::query(
                    "UPDATE issued_certificates SET revoked_at = $1, revocation_reason = $2
                     WHERE serial = $3 AND revoked_at IS NULL",
                )
                .bind(at)
                .bind(reason)
                .bind(serial)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if done == 0 {
                    return Ok(false);
                }
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn data_keys(&self) -> Result<Vec<$crate::store::DataKeyRecord>, StoreError> {
                let rows = sqlx::query(
                    "SELECT version, wrapped, created_at, retired_at FROM data_keys ORDER BY version",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok($crate::store::DataKeyRecord {
                            version: to_u64(r.try_get("version")?),
                            wrapped: r.try_get("wrapped")?,
                            created_at: r.try_get("created_at")?,
                            retired_at: r.try_get("retired_at")?,
                        })
                    })
                    .collect()
            }

            async fn insert_data_key(
                &self,
                key: &$crate::store::DataKeyRecord,
                audit: &AuditRecord,
            ) -> Result<(), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                bump_generation(&mut tx).await?;
                sqlx::query(
                    "INSERT INTO data_keys (version, wrapped, created_at) VALUES ($1, $2, $3)",
                )
                .bind(to_i64(key.version))
                .bind(&key.wrapped)
                .bind(key.created_at)
                .execute(&mut *tx)
                .await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn records_under_old_keys(
                &self,
                current: u64,
                limit: u32,
            ) -> Result<Vec<$crate::store::SealedRecord>, StoreError> {
                use $crate::store::{SealedRecord, SealedTable};
                let mut out = Vec::new();
                for (table, sql) in [
                    (
                        SealedTable::Secret,
                        // Any order: the key-version index finds the next batch at once.
                        "SELECT name, version, key_version, sealed FROM secrets
                         WHERE key_version < $1 AND sealed IS NOT NULL LIMIT $2",
                    ),
                    (
                        SealedTable::BrokerKey,
                        "SELECT purpose AS name, version, key_version, sealed FROM broker_keys
                         WHERE key_version < $1 LIMIT $2",
                    ),
                ] {
                    let left = i64::from(limit) - out.len() as i64;
                    if left <= 0 {
                        break;
                    }
                    let rows = sqlx::query(sql)
                        .bind(to_i64(current))
                        .bind(left)
                        .fetch_all(&self.pool)
                        .await?;
                    for r in &rows {
                        out.push(SealedRecord {
                            table,
                            name: r.try_get("name")?,
                            version: to_u64(r.try_get("version")?),
                            key_version: to_u64(r.try_get("key_version")?),
                            sealed: r.try_get("sealed")?,
                        });
                    }
                }
                Ok(out)
            }

            async fn reseal(
                &self,
                records: &[($crate::store::SealedRecord, Vec<u8>, u64)],
            ) -> Result<u64, StoreError> {
                use $crate::store::SealedTable;
                // No new generation: a record re-encrypted under a newer data key holds the
                // same plaintext, so a decision made on its old bytes is the same decision
                // (every replica keeps the older keys). A new generation per batch made
                // decisions on every replica stale once per batch, and a long rotation could
                // refuse a release that went stale every time it was decided again. The
                // retirement that ends a rotation does take a new generation, so each replica
                // drops its cached old bytes when its next decision is found stale.
                let (mut tx, _writer) = self.begin_write().await?;
                let mut replaced = 0;
                for (old, sealed, key_version) in records {
                    let sql = match old.table {
                        // Not a version deleted since it was read (its sealed bytes are gone).
                        SealedTable::Secret => {
                            "UPDATE secrets SET sealed = $1, key_version = $2
                             WHERE name = $3 AND version = $4 AND key_version = $5
                               AND sealed IS NOT NULL AND deleted_at IS NULL"
                        }
                        SealedTable::BrokerKey => {
                            "UPDATE broker_keys SET sealed = $1, key_version = $2
                             WHERE purpose = $3 AND version = $4 AND key_version = $5"
                        }
                    };
                    replaced += sqlx::query(sql)
                        .bind(sealed)
                        .bind(to_i64(*key_version))
                        .bind(&old.name)
                        .bind(to_i64(old.version))
                        .bind(to_i64(old.key_version))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(replaced)
            }

            async fn retire_data_keys(
                &self,
                current: u64,
                at: i64,
                audit: &AuditRecord,
            ) -> Result<u64, StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                bump_generation(&mut tx).await?;
                let left: i64 = sqlx::query_scalar(
                    "SELECT (SELECT COUNT(*) FROM secrets WHERE key_version < $1 AND sealed IS NOT NULL)
                          + (SELECT COUNT(*) FROM broker_keys WHERE key_version < $1)",
                )
                .bind(to_i64(current))
                .fetch_one(&mut *tx)
                .await?;
                if left > 0 {
                    return Err(StoreError::Conflict(format!(
                        "{left} records are still sealed under data keys older than {current}"
                    )));
                }
                let retired = sqlx::query(
                    "UPDATE data_keys SET retired_at = $1 WHERE version < $2 AND retired_at IS NULL",
                )
                .bind(at)
                .bind(to_i64(current))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(retired)
            }

            async fn cache_get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
                let row = sqlx::query("SELECT bytes, fetched_at FROM kds_cache WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(r) => Ok(Some((r.try_get("bytes")?, r.try_get("fetched_at")?))),
                    None => Ok(None),
                }
            }

            async fn cache_put(&self, key: &str, bytes: &[u8], at: i64) -> Result<(), StoreError> {
                let _writer = self.writer_turn().await;
                sqlx::query(
                    "INSERT INTO kds_cache (key, bytes, fetched_at) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO UPDATE SET bytes = excluded.bytes, fetched_at = excluded.fetched_at",
                )
                .bind(key)
                .bind(bytes)
                .bind(at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn decision_inputs(
                &self,
                names: &[String],
                cached_policy: Option<u64>,
            ) -> Result<$crate::store::DecisionInputs, StoreError> {
                if let Some(inputs) = self.decisions.cache.cached(names, cached_policy) {
                    return Ok(inputs);
                }
                let misses = self.decisions.cache.misses(names);
                if let Some(inputs) = self.load_inputs(misses, names, cached_policy).await? {
                    return Ok(inputs);
                }
                // The cache moved on meanwhile: read everything.
                let all = $crate::store::group::Misses {
                    generation: None,
                    policy: true,
                    names: names.to_vec(),
                };
                self.load_inputs(all, names, cached_policy)
                    .await?
                    .ok_or_else(|| StoreError::Unavailable("decision inputs incomplete".into()))
            }

            async fn commit_decision(
                &self,
                spend: $crate::store::Spend,
                audit: AuditRecord,
            ) -> Result<$crate::store::Committed, StoreError> {
                self.decisions.commit(spend, audit).await
            }

            fn commit_metrics(&self) -> &$crate::store::CommitMetrics {
                &self.decisions.metrics
            }
        }

        async fn bump_generation(
            conn: &mut <$db as sqlx::Database>::Connection,
        ) -> Result<(), StoreError> {
            sqlx::query("UPDATE generation SET value = $1 WHERE id = 1")
                .bind($crate::store::sql::new_generation()?)
                .execute(conn)
                .await?;
            Ok(())
        }

        impl $store {
            /// Reads what `misses` lacks (the generation first: whatever is read after it is
            /// at least as new) and answers from the cache.
            async fn load_inputs(
                &self,
                misses: $crate::store::group::Misses,
                names: &[String],
                cached_policy: Option<u64>,
            ) -> Result<Option<$crate::store::DecisionInputs>, StoreError> {
                let mut loaded = $crate::store::group::Loaded {
                    generation: misses.generation.unwrap_or(0),
                    policy: None,
                    secrets: Vec::with_capacity(misses.names.len()),
                };
                if misses.generation.is_some() && !misses.policy && misses.names.is_empty() {
                    return Ok(self.decisions.cache.fill(loaded, names, cached_policy));
                }
                let mut conn = self.pool.acquire().await?;
                if misses.generation.is_none() {
                    loaded.generation = sqlx::query_scalar("SELECT value FROM generation WHERE id = 1")
                        .fetch_one(&mut *conn)
                        .await?;
                }
                if misses.policy {
                    let row = sqlx::query(
                        "SELECT version, document FROM policies ORDER BY version DESC LIMIT 1",
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    loaded.policy = Some(match row {
                        Some(r) => Some((to_u64(r.try_get("version")?), r.try_get("document")?)),
                        None => None,
                    });
                }
                for name in misses.names {
                    let row = sqlx::query(
                        "SELECT name, version, kind, sealed, meta, key_version FROM secrets
                         WHERE name = $1 AND deleted_at IS NULL ORDER BY version DESC LIMIT 1",
                    )
                    .bind(&name)
                    .fetch_optional(&mut *conn)
                    .await?;
                    let secret = row.as_ref().map(secret_from_row).transpose()?;
                    loaded.secrets.push((name, secret));
                }
                Ok(self.decisions.cache.fill(loaded, names, cached_policy))
            }
        }
    };
}

pub(crate) use sql_store;
