//! The SQL both engines share: statements written once (`$n` parameters, `ON CONFLICT`,
//! `RETURNING` are valid SQLite and PostgreSQL alike) and expanded for each engine's types by
//! [`sql_store!`]. What differs (schema types, migrations, locking, what follows a delete) is
//! in the engine modules, behind the hooks `begin_write` and `after_delete`.

use std::time::{SystemTime, UNIX_EPOCH};

/// A decision's open transaction: the nonce spent, its inputs read. Dropped without
/// [`Decision::commit`](super::Decision::commit), it rolls back: nothing spent, nothing
/// recorded.
pub struct SqlDecision<DB: sqlx::Database> {
    pub(crate) tx: sqlx::Transaction<'static, DB>,
    /// The engine's writer turn, if it has one (SQLite: one writer at a time, queued here
    /// rather than in SQLite's busy handler). Dropped after the transaction ends.
    pub(crate) _writer: Option<Writer>,
}

/// A turn as the engine's single writer.
pub(crate) type Writer = tokio::sync::OwnedMutexGuard<()>;

impl<DB: sqlx::Database> std::fmt::Debug for SqlDecision<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqlDecision(..)")
    }
}

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

/// Implements [`Store`](super::Store) for `$store` (with a `pool` field and the hooks
/// `begin_write`, `writer_turn`, `after_delete` and `fetch_lock`, which returns a `$lock`)
/// over database `$db`.
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
            })
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
            type Decision = $crate::store::sql::SqlDecision<$db>;
            type FetchLock = $lock;

            async fn lock_fetch(&self, key: &str) -> Result<$lock, StoreError> {
                self.fetch_lock(key).await
            }

            async fn ping(&self) -> Result<(), StoreError> {
                // A committed write, not a read: a store that answers reads but cannot write (disk
                // full, locked, read-only) is not ready.
                let _writer = self.writer_turn().await;
                sqlx::query(
                    "INSERT INTO heartbeat (id, at) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                )
                .bind($crate::store::sql::now())
                .execute(&self.pool)
                .await?;
                Ok(())
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
                sqlx::query(
                    "INSERT INTO secrets (name, version, kind, created_at, created_by, sealed, meta)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&s.name)
                .bind(to_i64(s.version))
                .bind(&s.kind)
                .bind(created_at)
                .bind(created_by)
                .bind(&s.sealed)
                .bind(s.meta.to_string())
                .execute(&mut *tx)
                .await?;
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn current_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
                let row = sqlx::query(
                    "SELECT name, version, kind, sealed, meta FROM secrets
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
                insert_audit(&mut tx, audit).await?;
                tx.commit().await?;
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
                let _writer = self.writer_turn().await;
                let done = sqlx::query("DELETE FROM used_nonces WHERE expires_at < $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
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

            async fn begin_decision(
                &self,
                nonce: &[u8; 32],
                expires_at: i64,
                names: &[String],
                cached_policy: Option<u64>,
            ) -> Result<(DecisionInputs, Self::Decision), StoreError> {
                let (mut tx, _writer) = self.begin_write().await?;
                // The spend comes first: on PostgreSQL a concurrent spend of the same nonce waits here
                // for this transaction and then finds the row (exactly one release per nonce).
                let spent = sqlx::query(
                    "INSERT INTO used_nonces (digest, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&nonce[..])
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
                let mut inputs = DecisionInputs {
                    fresh: spent.rows_affected() == 1,
                    policy: None,
                    secrets: Vec::new(),
                };
                if inputs.fresh {
                    let version: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM policies")
                        .fetch_one(&mut *tx)
                        .await?;
                    if let Some(v) = version {
                        let document = if cached_policy == Some(to_u64(v)) {
                            None
                        } else {
                            Some(
                                sqlx::query_scalar::<_, String>(
                                    "SELECT document FROM policies WHERE version = $1",
                                )
                                .bind(v)
                                .fetch_one(&mut *tx)
                                .await?,
                            )
                        };
                        inputs.policy = Some(PolicyRef {
                            version: to_u64(v),
                            document,
                        });
                    }
                    for name in names {
                        let row = sqlx::query(
                            "SELECT name, version, kind, sealed, meta FROM secrets
                             WHERE name = $1 AND deleted_at IS NULL ORDER BY version DESC LIMIT 1",
                        )
                        .bind(name)
                        .fetch_optional(&mut *tx)
                        .await?;
                        inputs
                            .secrets
                            .push(row.as_ref().map(secret_from_row).transpose()?);
                    }
                }
                Ok((
            inputs,
            $crate::store::sql::SqlDecision {
                tx,
                _writer,
            },
        ))
            }
        }

        impl $crate::store::Decision for $crate::store::sql::SqlDecision<$db> {
            async fn commit(mut self, audit: &AuditRecord) -> Result<(), StoreError> {
                insert_audit(&mut self.tx, audit).await?;
                self.tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(crate) use sql_store;
