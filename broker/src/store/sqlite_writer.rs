//! The SQLite store's group-commit writer: one thread with a connection of its own that
//! commits each group of release decisions in one transaction, start to finish.
//!
//! sqlx runs every statement of a transaction on its connection's worker thread and hands the
//! result back to the runtime, so a group commit of five statements (begin, the generation,
//! the spends, the audit records, commit) cost about twelve context switches on the broker's
//! core; measured at half the maximum load they were a quarter of the broker's CPU time. Here
//! a group is one hand-off there and one answer back, with the statements prepared once.
//! Everything else (reads, admin writes, migrations) stays on the sqlx pool; this writer
//! takes the same writer turn as the pool's writes. The readiness heartbeat is written here
//! too, so `/readyz` fails when release decisions cannot commit.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{AuditRecord, Committed, Spend, StoreError};

/// What the writer thread does.
enum Job {
    /// Commit a group of decisions.
    Group(
        Vec<(Spend, AuditRecord)>,
        oneshot::Sender<Result<Vec<Committed>, StoreError>>,
    ),
    /// Write the readiness heartbeat (seconds since the epoch).
    Heartbeat(i64, oneshot::Sender<Result<(), StoreError>>),
}

impl Job {
    /// Answers `e` without doing the job.
    fn refuse(self, e: StoreError) {
        let _ = match self {
            Job::Group(_, reply) => reply.send(Err(e)).map_err(drop),
            Job::Heartbeat(_, reply) => reply.send(Err(e)).map_err(drop),
        };
    }
}

/// The handle to the writer thread; the thread ends when the last handle is dropped.
pub(super) struct GroupWriter {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for GroupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupWriter(..)")
    }
}

impl GroupWriter {
    /// Opens a second connection to the (migrated) database at `path`, with the pool's
    /// durability settings, and starts the thread.
    pub(super) fn open(path: &Path) -> Result<GroupWriter, StoreError> {
        let path = path.to_path_buf();
        let conn = connect(&path)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || serve(&path, conn, &queue))
            .map_err(|e| StoreError::Unavailable(format!("store writer thread: {e}")))?;
        Ok(GroupWriter { jobs })
    }

    /// Commits `work` in one transaction (answers in its order).
    pub(super) async fn commit(
        &self,
        work: Vec<(Spend, AuditRecord)>,
    ) -> Result<Vec<Committed>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Group(work, reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Writes the readiness heartbeat on the writer's connection.
    pub(super) async fn heartbeat(&self, at: i64) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Heartbeat(at, reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store's writer thread stopped".into())
}

/// A connection with the pool's settings (SqliteStore::open): WAL, an fsync per commit,
/// deleted content zeroed; checked, since a pragma that does not apply says nothing.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         PRAGMA foreign_keys = ON;",
    )
    .map_err(unavailable)?;
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(unavailable)?;
    // FULL is 2.
    let synchronous: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(unavailable)?;
    if !journal.eq_ignore_ascii_case("wal") || synchronous != 2 {
        return Err(StoreError::Unavailable(format!(
            "the store writer's connection is not durable as configured \
             (journal_mode {journal}, synchronous {synchronous})"
        )));
    }
    Ok(conn)
}

/// The thread: one job after another until every handle is gone. A connection left inside
/// a transaction by a failure is rolled back, or replaced when that fails too.
fn serve(path: &Path, conn: Connection, queue: &mpsc::Receiver<Job>) {
    let mut conn = Some(conn);
    while let Ok(job) = queue.recv() {
        if conn.is_none() {
            conn = connect(path)
                .inspect_err(|e| tracing::error!(error = %e, "store writer cannot reconnect"))
                .ok();
        }
        let Some(c) = conn.as_mut() else {
            job.refuse(StoreError::Unavailable(
                "the store's writer has no connection".into(),
            ));
            continue;
        };
        match job {
            Job::Group(work, reply) => {
                let _ = reply.send(commit_group(c, &work).map_err(unavailable));
            }
            Job::Heartbeat(at, reply) => {
                let done = c
                    .execute(super::sql::HEARTBEAT, params![at])
                    .map(|_| ())
                    .map_err(unavailable);
                let _ = reply.send(done);
            }
        }
        if !c.is_autocommit() && c.execute_batch("ROLLBACK").is_err() {
            tracing::error!("store writer's connection stuck in a transaction; reconnecting");
            conn = None;
        }
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    match &e {
        // As sqlx's errors map: a unique key taken (a serial issued twice, say) is a conflict.
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::Conflict(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// One group in one transaction: each decision made on the current generation spends its
/// nonce (a nonce spent already, earlier or in this group, is a replay: nothing written) and
/// appends its audit record and the certificates it issued; a decision on another generation
/// is stale (nothing written). Any error rolls the whole group back.
fn commit_group(
    conn: &mut Connection,
    work: &[(Spend, AuditRecord)],
) -> Result<Vec<Committed>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // SQLite has one writer: no write to secrets or policies comes between this read and
    // the commit.
    let current: i64 = tx.query_row("SELECT value FROM generation WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    let mut outcomes = vec![Committed::Stale; work.len()];
    {
        let mut spend_nonce = tx.prepare_cached(
            "INSERT INTO used_nonces (digest, expires_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        let mut append_audit = tx.prepare_cached(
            "INSERT INTO audit (at, actor, action, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut record_issued = tx.prepare_cached(
            "INSERT INTO issued_certificates (serial, ca_version, profile, subject, names,
             claims_digest, claims, not_before, not_after, issued_at, certificate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for ((spend, audit), outcome) in work.iter().zip(outcomes.iter_mut()) {
            if spend.generation != current {
                continue;
            }
            if let Some(nonce) = &spend.nonce
                && spend_nonce.execute(params![&nonce[..], spend.expires_at])? == 0
            {
                *outcome = Committed::Replay;
                continue;
            }
            append_audit.execute(params![
                audit.at,
                audit.actor,
                audit.action,
                audit.outcome,
                audit.detail.to_string()
            ])?;
            for c in &spend.issued {
                record_issued.execute(params![
                    c.serial,
                    super::sql::to_i64(c.ca_version),
                    c.profile,
                    c.subject,
                    serde_json::json!(c.names).to_string(),
                    c.claims_digest,
                    c.claims.to_string(),
                    c.not_before,
                    c.not_after,
                    c.issued_at,
                    c.certificate,
                ])?;
            }
            *outcome = Committed::Done;
        }
    }
    tx.commit()?;
    Ok(outcomes)
}
