//! The embedded engine: one SQLite file, WAL journal, schema migrations at open.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::sql::{to_i64, to_u64};
use super::{AuditQuery, AuditRecord, PolicyVersion, SecretInfo, StoreError, StoredSecret};

/// Schema migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE secrets (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        deleted_at BIGINT,
        sealed BLOB,
        meta TEXT NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE policies (
        version BIGINT PRIMARY KEY,
        document TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL
    );
    CREATE TABLE used_nonces (
        digest BLOB PRIMARY KEY,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX used_nonces_expiry ON used_nonces (expires_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE TABLE kds_cache (
        key TEXT PRIMARY KEY,
        bytes BLOB NOT NULL,
        fetched_at BIGINT NOT NULL
    );",
    // 2: a row that readiness probes write, to prove the store can commit.
    "CREATE TABLE heartbeat (
        id INTEGER PRIMARY KEY,
        at BIGINT NOT NULL
    );",
    // 3: the generation of secrets and policies (random, replaced by every write to
    // either), which release decisions' cached inputs are checked against at commit.
    "CREATE TABLE generation (
        id INTEGER PRIMARY KEY,
        value BIGINT NOT NULL
    );
    INSERT INTO generation (id, value) VALUES (1, 0);",
    // 4: the broker's own keys (the attestation-token signing key), encrypted like secrets,
    // with their public half in the clear for key sets.
    "CREATE TABLE broker_keys (
        purpose TEXT NOT NULL,
        version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        public TEXT NOT NULL,
        sealed BLOB NOT NULL,
        PRIMARY KEY (purpose, version)
    );",
    // 5: which provider holds the master key, its check value, and (pkcs11) the key wrapped
    // by the token's key. One row.
    "CREATE TABLE master_key (
        id INTEGER PRIMARY KEY,
        provider TEXT NOT NULL,
        wrapped BLOB,
        key_check BLOB NOT NULL,
        created_at BIGINT NOT NULL
    );",
    // 6: data-key versions (version 1 is the master key itself, not stored): each wrapped
    // by the master key; every sealed record names the version it is sealed under.
    "CREATE TABLE data_keys (
        version BIGINT PRIMARY KEY,
        wrapped BLOB NOT NULL,
        created_at BIGINT NOT NULL,
        retired_at BIGINT
    );
    ALTER TABLE secrets ADD COLUMN key_version BIGINT NOT NULL DEFAULT 1;
    ALTER TABLE broker_keys ADD COLUMN key_version BIGINT NOT NULL DEFAULT 1;
    CREATE INDEX secrets_key_version ON secrets (key_version) WHERE sealed IS NOT NULL;",
    // 7: certificates the private CA issued (public: the certificate itself, its names, the
    // claims it was issued on), for listing, revocation, CRLs and OCSP.
    "CREATE TABLE issued_certificates (
        serial TEXT PRIMARY KEY,
        ca_version BIGINT NOT NULL,
        profile TEXT NOT NULL,
        subject TEXT NOT NULL,
        names TEXT NOT NULL,
        claims_digest TEXT NOT NULL,
        claims TEXT NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        certificate BLOB NOT NULL,
        revoked_at BIGINT,
        revocation_reason TEXT
    );
    CREATE INDEX issued_certificates_issued_at ON issued_certificates (issued_at);
    CREATE INDEX issued_certificates_not_after ON issued_certificates (not_after);",
];

/// The SQLite store.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One writer at a time: SQLite allows no more, and waiting here (in order, woken when
    /// the previous writer is done) beats SQLite's busy handler, which sleeps in steps of up
    /// to 100 ms.
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Release decisions: the input cache and the group-commit writer.
    decisions: super::group::Decisions,
    /// The thread that commits release decisions and the readiness heartbeat
    /// (sqlite_writer.rs); `None` only while `open` migrates.
    committer: Option<std::sync::Arc<super::sqlite_writer::GroupWriter>>,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database at `path` and migrates it. The
    /// database, its WAL and shared-memory files must not be accessible to group or others,
    /// and its directory not writable by them.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        prepare_files(path)?;
        let url = format!("sqlite://{}", path.display());
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .create_if_missing(true)
            // Deleted content is overwritten with zeros in the database file.
            .pragma("secure_delete", "ON")
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        let mut store = SqliteStore {
            pool,
            writer: std::sync::Arc::new(tokio::sync::Mutex::new(())),
            decisions: super::group::Decisions::detached(),
            committer: None,
        };
        store.migrate().await?;
        // Release decisions commit on a thread of their own (sqlite_writer.rs), in the
        // writer turn every other write takes too. The writer task's closure holds no store
        // handle, so it ends when the last handle is dropped, and the thread with it.
        let writer = std::sync::Arc::new(super::sqlite_writer::GroupWriter::open(path)?);
        store.committer = Some(writer.clone());
        let turn = store.writer.clone();
        store.decisions = store.decisions.clone().start(move |work| {
            let (writer, turn) = (writer.clone(), turn.clone());
            async move {
                let _turn = turn.lock_owned().await;
                writer.commit(work).await
            }
        });
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // Each migration runs as one script (statements and version bump in one transaction)
        // on the pool, so this future stays Send for callers that spawn the service.
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&self.pool)
            .await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&self.pool)
            .await?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "database schema version {current} is newer than this broker ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            let script = format!(
                "BEGIN IMMEDIATE;\n{sql}\nINSERT INTO schema_version (version) VALUES ({});\nCOMMIT;",
                i + 1
            );
            sqlx::raw_sql(&script).execute(&self.pool).await?;
        }
        Ok(())
    }
}

/// Creates the database file with mode 0600 (SQLite gives its WAL and shared-memory files
/// the database file's mode) and refuses files and a directory that others can reach.
#[cfg(unix)]
fn prepare_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |what: String| StoreError::Unavailable(what);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    use std::os::unix::fs::MetadataExt;
    let dir_mode = std::fs::metadata(&dir)
        .map_err(|e| fail(format!("{}: {e}", dir.display())))?
        .permissions()
        .mode();
    if dir_mode & 0o022 != 0 {
        return Err(fail(format!(
            "{} has mode {:o}: the store's directory must not be writable by group or others (chmod go-w)",
            dir.display(),
            dir_mode & 0o7777
        )));
    }
    if std::fs::symlink_metadata(path).is_err() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    }
    // The user this process runs as (the owner of its /proc entry).
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            return Err(fail(format!(
                "{} is a symbolic link: point store.sqlite at the file itself",
                file.display()
            )));
        }
        if let Some(me) = me
            && meta.uid() != me
        {
            return Err(fail(format!(
                "{} belongs to user {}, not to the broker's user {me}",
                file.display(),
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "{} has mode {mode:o}: the store holds encrypted secrets and the audit log; \
                 it must be 0600 or stricter (chmod 600)",
                file.display()
            )));
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn prepare_files(_path: &Path) -> Result<(), StoreError> {
    Ok(())
}

impl SqliteStore {
    /// A write transaction that takes SQLite's write lock at once (`BEGIN IMMEDIATE`), so
    /// that it never fails later on upgrading a read lock.
    /// The writer turn for a single write outside `begin_write` (it waits in line like the
    /// others instead of in SQLite's busy handler).
    async fn writer_turn(&self) -> Option<super::sql::Writer> {
        Some(self.writer.clone().lock_owned().await)
    }

    async fn begin_write(
        &self,
    ) -> Result<
        (
            sqlx::Transaction<'static, sqlx::Sqlite>,
            Option<super::sql::Writer>,
        ),
        StoreError,
    > {
        let turn = self.writer.clone().lock_owned().await;
        Ok((self.pool.begin_with("BEGIN IMMEDIATE").await?, Some(turn)))
    }

    /// After a delete: secure_delete zeroed the old records in the pages written to the WAL;
    /// a truncating checkpoint copies those pages over the database file and empties the
    /// WAL, so the old ciphertext is in neither file. If a reader holds the WAL, the
    /// checkpoint is partial and the next one finishes it (docs/operations.md).
    async fn after_delete(&self) {
        for attempt in 0..10 {
            // (busy, WAL frames, frames checkpointed): busy means a reader held the WAL.
            match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&self.pool)
                .await
            {
                Ok((0, _, _)) => return,
                Ok(_) => {
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(5))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint after delete failed");
                    return;
                }
            }
        }
        tracing::warn!(
            "checkpoint after delete incomplete: a reader holds the WAL; deleted ciphertext stays in it until the next truncating checkpoint"
        );
    }
}

impl SqliteStore {
    /// The readiness probe's committed write, on the connection release decisions commit on.
    async fn heartbeat(&self, at: i64) -> Result<(), StoreError> {
        match &self.committer {
            Some(writer) => writer.heartbeat(at).await,
            None => Err(StoreError::Unavailable("the store is still opening".into())),
        }
    }

    /// One broker per SQLite file: the KDS client's own single flight is enough.
    async fn fetch_lock(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

super::sql::sql_store!(SqliteStore, sqlx::Sqlite, ());

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::Store;

    /// A store in a temporary directory of its own, there while the directory is kept.
    pub(crate) async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("b.db")).await.unwrap();
        (dir, s)
    }

    fn audit(action: &str) -> AuditRecord {
        AuditRecord {
            id: 0,
            at: 1,
            actor: "operator op".into(),
            action: action.into(),
            outcome: "ok".into(),
            detail: serde_json::json!({}),
        }
    }

    async fn actions(s: &SqliteStore) -> Vec<String> {
        s.query_audit(&AuditQuery::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect()
    }

    fn secret(name: &str, version: u64) -> StoredSecret {
        StoredSecret {
            name: name.into(),
            version,
            kind: "opaque".into(),
            meta: serde_json::json!({"bytes": 3}),
            sealed: vec![version as u8; 40],
            key_version: 1,
        }
    }

    // Versions, deletes, nonces, decisions and paging are checked on both engines alike by
    // tests/tests/store_engines.rs; here what is SQLite's own.

    #[tokio::test]
    async fn policy_history_and_audit_queries() {
        let (dir, s) = store().await;
        let set = audit("policy.set");
        assert_eq!(s.insert_policy("{1}", 1, "a", &set).await.unwrap(), 1);
        assert_eq!(s.insert_policy("{2}", 2, "b", &set).await.unwrap(), 2);
        let recorded = s.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(recorded[0].detail["version"], 2, "{recorded:?}");
        assert_eq!(s.active_policy().await.unwrap().unwrap().document, "{2}");
        assert_eq!(s.policy_history().await.unwrap().len(), 2);
        for (i, outcome) in ["released", "refused", "refused"].iter().enumerate() {
            s.append_audit(&AuditRecord {
                id: 0,
                at: i as i64,
                actor: "guest 127.0.0.1".into(),
                action: "attest".into(),
                outcome: (*outcome).into(),
                detail: serde_json::json!({"i": i}),
            })
            .await
            .unwrap();
        }
        let refused = s
            .query_audit(&AuditQuery {
                action: Some("attest".into()),
                outcome: Some("refused".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(refused.len(), 2);
        assert!(refused[0].id > refused[1].id, "newest first");
        s.cache_put("k", b"v1", 1).await.unwrap();
        s.cache_put("k", b"v2", 2).await.unwrap();
        assert_eq!(s.cache_get("k").await.unwrap(), Some((b"v2".to_vec(), 2)));
        // Reopening keeps everything and does not re-run migrations.
        drop(s);
        let s = SqliteStore::open(&dir.path().join("b.db")).await.unwrap();
        assert_eq!(s.policy_history().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn deleted_ciphertext_leaves_the_database_and_wal_files() {
        let (dir, s) = store().await;
        let marker: Vec<u8> = b"CIPHERTEXT-MARKER-".repeat(8);
        let mut sec = secret("gone", 1);
        sec.sealed = marker.clone();
        s.insert_secret(&sec, 1, "op", &audit("secret.put"))
            .await
            .unwrap();
        let on_disk = || {
            ["b.db", "b.db-wal"].iter().any(|f| {
                std::fs::read(dir.path().join(f))
                    .unwrap_or_default()
                    .windows(marker.len())
                    .any(|w| w == marker.as_slice())
            })
        };
        assert!(on_disk(), "the record was written");
        assert!(
            s.delete_secret("gone", 2, &audit("secret.delete"))
                .await
                .unwrap()
        );
        assert!(!on_disk(), "ciphertext still on disk after delete");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn files_are_private_and_loose_modes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, s) = store().await;
        s.ping().await.unwrap();
        for f in ["b.db", "b.db-wal", "b.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} has mode {mode:o}");
        }
        drop(s);
        let db = dir.path().join("b.db");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SqliteStore::open(&db).await.unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
        for mode in [0o777, 0o1777, 0o770] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let e = SqliteStore::open(&db).await.unwrap_err();
            assert!(e.to_string().contains("directory"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A link planted where the database should be is refused.
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let e = SqliteStore::open(&link).await.unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[tokio::test]
    async fn ping_fails_while_the_store_cannot_write() {
        use sqlx::Connection;
        let (dir, s) = store().await;
        s.ping().await.unwrap();
        // Another process holds the write lock (as a stuck writer or a backup tool would).
        let mut other = sqlx::SqliteConnection::connect(&format!(
            "sqlite://{}",
            dir.path().join("b.db").display()
        ))
        .await
        .unwrap();
        sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(30), s.ping()).await;
        assert!(matches!(r, Ok(Err(StoreError::Unavailable(_)))), "{r:?}");
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
        s.ping().await.unwrap();
    }

    #[tokio::test]
    async fn prune_deletes_old_records_and_records_itself() {
        let (_d, s) = store().await;
        for at in [10, 20, 30] {
            let mut r = audit("attest");
            r.at = at;
            s.append_audit(&r).await.unwrap();
        }
        let mut prune = audit("audit.prune");
        prune.at = 40;
        assert_eq!(s.prune_audit(25, &prune).await.unwrap(), 2);
        let left = s.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].action, "audit.prune");
        assert_eq!(left[0].detail["deleted"], 2);
        assert_eq!(left[1].at, 30);
    }

    #[tokio::test]
    async fn an_admin_change_never_exists_without_its_audit_record() {
        let (_d, s) = store().await;
        s.insert_secret(&secret("a", 1), 1, "op", &audit("secret.put"))
            .await
            .unwrap();
        // From now on every audit insert fails (as a full disk or a crash between the two
        // statements would make it): the change must not happen either.
        sqlx::raw_sql(
            "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit refused'); END",
        )
        .execute(&s.pool)
        .await
        .unwrap();
        assert!(
            s.insert_secret(&secret("a", 2), 2, "op", &audit("secret.put"))
                .await
                .is_err()
        );
        assert_eq!(s.current_secret("a").await.unwrap().unwrap().version, 1);
        assert!(
            s.delete_secret("a", 3, &audit("secret.delete"))
                .await
                .is_err()
        );
        assert!(s.current_secret("a").await.unwrap().is_some());
        assert!(
            s.insert_policy("{}", 4, "op", &audit("policy.set"))
                .await
                .is_err()
        );
        assert!(s.active_policy().await.unwrap().is_none());
        assert!(
            s.prune_audit(i64::MAX, &audit("audit.prune"))
                .await
                .is_err()
        );
        assert_eq!(actions(&s).await, ["secret.put"]);
    }
}
