//! The engine for several replicas: one PostgreSQL database shared by every broker replica.
//! TLS to the database through rustls; migrations once, under an advisory lock, however many
//! replicas start together.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::sql::{to_i64, to_u64};
use super::{AuditQuery, AuditRecord, PolicyVersion, SecretInfo, StoreError, StoredSecret};

/// Schema migrations, applied in order; the index + 1 is the schema version. The same
/// versions as the SQLite engine's, in PostgreSQL's types.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE secrets (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        kind TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        deleted_at BIGINT,
        sealed BYTEA,
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
        digest BYTEA PRIMARY KEY,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX used_nonces_expiry ON used_nonces (expires_at);
    CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE TABLE kds_cache (
        key TEXT PRIMARY KEY,
        bytes BYTEA NOT NULL,
        fetched_at BIGINT NOT NULL
    );",
    // 2: a row that readiness probes write, to prove the store can commit.
    "CREATE TABLE heartbeat (
        id BIGINT PRIMARY KEY,
        at BIGINT NOT NULL
    );",
    // 3: the generation of secrets and policies (random, replaced by every write to
    // either), which release decisions' cached inputs are checked against at commit.
    "CREATE TABLE generation (
        id BIGINT PRIMARY KEY,
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
        sealed BYTEA NOT NULL,
        PRIMARY KEY (purpose, version)
    );",
    // 5: which provider holds the master key, its check value, and (pkcs11) the key wrapped
    // by the token's key. One row.
    "CREATE TABLE master_key (
        id INTEGER PRIMARY KEY,
        provider TEXT NOT NULL,
        wrapped BYTEA,
        key_check BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    );",
    // 6: data-key versions (version 1 is the master key itself, not stored): each wrapped
    // by the master key; every sealed record names the version it is sealed under.
    "CREATE TABLE data_keys (
        version BIGINT PRIMARY KEY,
        wrapped BYTEA NOT NULL,
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
        certificate BYTEA NOT NULL,
        revoked_at BIGINT,
        revocation_reason TEXT
    );
    CREATE INDEX issued_certificates_issued_at ON issued_certificates (issued_at);
    CREATE INDEX issued_certificates_not_after ON issued_certificates (not_after);",
];

/// The advisory lock key that serialises migrations across replicas ("snpkbmig").
const MIGRATION_LOCK: i64 = 0x736e_706b_626d_6967;

/// How to reach the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSettings {
    /// `postgres://user@host:port/db?sslmode=verify-full` (a password in it is accepted, a
    /// `password_file` is better).
    pub url: String,
    /// CA certificates (PEM) that issue the database server's certificate.
    pub ca_file: Option<PathBuf>,
    /// A file (0600) holding the password.
    pub password_file: Option<PathBuf>,
    /// Connections per replica.
    pub pool_size: u32,
    /// Longest time one statement may run (PostgreSQL `statement_timeout`).
    pub statement_timeout: Duration,
    /// Longest wait for a connection (connecting included); then the store is unavailable.
    pub connect_timeout: Duration,
}

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Release decisions: the input cache and the group-commit writer.
    decisions: super::group::Decisions,
}

impl PgStore {
    /// Connects and migrates (once across replicas, under an advisory lock). Refuses a
    /// database whose schema is newer than this broker knows.
    pub async fn open(settings: &PgSettings) -> Result<PgStore, StoreError> {
        let mut options = PgConnectOptions::from_str(&settings.url)
            .map_err(|e| StoreError::Unavailable(format!("store.postgres: {e}")))?
            .application_name("snp-key-broker")
            .options([
                (
                    "statement_timeout",
                    format!("{}ms", settings.statement_timeout.as_millis()),
                ),
                // A replica that dies mid-decision (or loses the network) must not hold its
                // nonce row and locks until TCP gives up: the server ends the session.
                (
                    "idle_in_transaction_session_timeout",
                    format!("{}ms", (settings.statement_timeout * 6).as_millis()),
                ),
            ]);
        if let Some(ca) = &settings.ca_file {
            options = options.ssl_root_cert(ca);
        }
        if let Some(file) = &settings.password_file {
            crate::keys::check_private_file(file)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let password = zeroize::Zeroizing::new(
                std::fs::read_to_string(file)
                    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", file.display())))?,
            );
            options = options.password(password.trim_end_matches(['\n', '\r']));
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size)
            .acquire_timeout(settings.connect_timeout)
            .connect_with(options)
            .await?;
        let mut store = PgStore {
            pool,
            decisions: super::group::Decisions::detached(),
        };
        store.migrate().await?;
        // The writer task holds a copy without a queue of its own, so it ends when the
        // last handle is dropped.
        let engine = store.clone();
        store.decisions = store.decisions.clone().start(move |work| {
            let engine = engine.clone();
            async move { engine.commit_group(work).await }
        });
        Ok(store)
    }

    /// Commits a group of decisions in one transaction: each on the current
    /// generation spends its nonce (the first of a nonce in the group; a spent one
    /// is a replay) and appends its audit record.
    async fn commit_group(
        &self,
        work: Vec<(crate::store::Spend, AuditRecord)>,
    ) -> Result<Vec<crate::store::Committed>, StoreError> {
        use crate::store::Committed;
        let (mut tx, _writer) = self.begin_write().await?;
        let current: i64 = sqlx::query_scalar(Self::GENERATION_FOR_COMMIT)
            .fetch_one(&mut *tx)
            .await?;
        let mut outcomes = vec![Committed::Stale; work.len()];
        let mut seen = std::collections::HashSet::new();
        let mut candidates = Vec::with_capacity(work.len());
        let mut done = Vec::with_capacity(work.len());
        for (i, (spend, _)) in work.iter().enumerate() {
            if spend.generation != current {
                continue;
            }
            match spend.nonce {
                None => {
                    outcomes[i] = Committed::Done;
                    done.push(i);
                }
                Some(nonce) if seen.insert(nonce) => candidates.push((i, nonce)),
                Some(_) => outcomes[i] = Committed::Replay,
            }
        }
        if !candidates.is_empty() {
            let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO used_nonces (digest, expires_at) ",
            );
            insert.push_values(&candidates, |mut b, (i, nonce)| {
                b.push_bind(nonce.to_vec()).push_bind(work[*i].0.expires_at);
            });
            insert.push(" ON CONFLICT DO NOTHING RETURNING digest");
            let spent: std::collections::HashSet<Vec<u8>> = insert
                .build()
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| row.try_get::<Vec<u8>, _>(0))
                .collect::<Result<_, _>>()?;
            for (i, nonce) in &candidates {
                if spent.contains(&nonce[..]) {
                    outcomes[*i] = Committed::Done;
                    done.push(*i);
                } else {
                    outcomes[*i] = Committed::Replay;
                }
            }
        }
        done.sort_unstable();
        if !done.is_empty() {
            let mut audit = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO audit (at, actor, action, outcome, detail) ",
            );
            audit.push_values(&done, |mut b, &i| {
                let r = &work[i].1;
                b.push_bind(r.at)
                    .push_bind(r.actor.clone())
                    .push_bind(r.action.clone())
                    .push_bind(r.outcome.clone())
                    .push_bind(r.detail.to_string());
            });
            audit.build().execute(&mut *tx).await?;
            let issued: Vec<&crate::store::IssuedRecord> =
                done.iter().flat_map(|&i| work[i].0.issued.iter()).collect();
            if !issued.is_empty() {
                let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                    "INSERT INTO issued_certificates (serial, ca_version, profile, subject, names,
                     claims_digest, claims, not_before, not_after, issued_at, certificate) ",
                );
                insert.push_values(&issued, |mut b, c| {
                    b.push_bind(c.serial.clone())
                        .push_bind(to_i64(c.ca_version))
                        .push_bind(c.profile.clone())
                        .push_bind(c.subject.clone())
                        .push_bind(serde_json::json!(c.names).to_string())
                        .push_bind(c.claims_digest.clone())
                        .push_bind(c.claims.to_string())
                        .push_bind(c.not_before)
                        .push_bind(c.not_after)
                        .push_bind(c.issued_at)
                        .push_bind(c.certificate.clone());
                });
                insert.build().execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // PostgreSQL's DDL is transactional: every migration and its version row commit
        // together, and the transaction-scoped advisory lock makes the other replicas wait
        // and then find the work done.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
        // No DDL at all when the schema is current: a role without CREATE on the schema
        // (docs/operations.md) still starts (PostgreSQL checks CREATE before IF NOT EXISTS).
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('schema_version') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await?;
        if !exists {
            sqlx::query("CREATE TABLE schema_version (version BIGINT NOT NULL)")
                .execute(&mut *tx)
                .await?;
        }
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&mut *tx)
            .await?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "database schema version {current} is newer than this broker ({}): upgrade the broker",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            // One statement at a time (the migrations hold no ';' inside a statement).
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(i64::try_from(i + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// PostgreSQL serialises conflicting writers itself: no writer turn.
    async fn writer_turn(&self) -> Option<super::sql::Writer> {
        None
    }

    /// A transaction; PostgreSQL serialises conflicting writers itself (no writer turn).
    #[allow(clippy::type_complexity)]
    async fn begin_write(
        &self,
    ) -> Result<
        (
            sqlx::Transaction<'static, sqlx::Postgres>,
            Option<super::sql::Writer>,
        ),
        StoreError,
    > {
        Ok((self.pool.begin().await?, None))
    }

    /// Nothing to do: a deleted record's old row version stays in the table file until
    /// VACUUM reclaims it (docs/operations.md).
    async fn after_delete(&self) {}

    /// The readiness probe's committed write.
    async fn heartbeat(&self, at: i64) -> Result<(), StoreError> {
        sqlx::query(super::sql::HEARTBEAT)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl PgStore {
    /// The generation, read in the group's transaction under a share lock: a write to
    /// secrets or policies (which replaces the generation) waits for the group to commit,
    /// and a group waits for such a write in progress and then reads its new generation.
    const GENERATION_FOR_COMMIT: &str = "SELECT value FROM generation WHERE id = 1 FOR SHARE";

    /// A transaction-scoped advisory lock on a hash of the key: held until the returned
    /// transaction is dropped (rolled back), whatever happens to the fetch.
    async fn fetch_lock(
        &self,
        key: &str,
    ) -> Result<super::sql::HeldTx<sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Another replica's fetch (with AMD's backoff) can outlast the statement timeout.
        sqlx::query("SET LOCAL statement_timeout = '90s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("snp-key-broker kds {key}"))
            .execute(&mut *tx)
            .await?;
        Ok(super::sql::HeldTx { _tx: tx })
    }
}

super::sql::sql_store!(PgStore, sqlx::Postgres, super::sql::HeldTx<sqlx::Postgres>);
