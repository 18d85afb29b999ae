//! Backups that restore: a PostgreSQL store dumped with `pg_dump` and restored with
//! `pg_restore`, and an SQLite store copied online with `VACUUM INTO` while the broker runs.
//! A broker started on the restored copy (with the same master key) releases the same secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use e2e::Broker;
use e2e::postgres::PgServer;

/// The value of `db-key` as a measured guest receives it.
async fn released_db_key(b: &Broker) -> Vec<u8> {
    b.attest_once("db-key").await.unwrap()
}

fn point_store_at(b: &Broker, line: &str) {
    let config = b.dir.join("broker.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let start = text.find("[store]\n").unwrap() + "[store]\n".len();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!("{}{line}{}", &text[..start], &text[end..]);
    std::fs::write(&config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dump_restores_into_a_working_broker() {
    let mut pg = PgServer::start();
    let url = pg.create_database("live");
    let mut b = Broker::start_on(Some(&url));
    b.provision(&b.dir.join("policy.json"));
    let before = released_db_key(&b).await;
    let dump = pg.dump("live");
    let restored = pg.restore(&dump, "restored");
    b.stop();
    point_store_at(&b, &format!("postgres = \"{restored}\""));
    b.serve();
    assert_eq!(released_db_key(&b).await, before);
    // The restored audit log holds the release made before the dump.
    let out = b.cli(&[
        "audit",
        "--json",
        "--action",
        "attest",
        "--outcome",
        "released",
    ]);
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(audit["records"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_online_copy_restores_into_a_working_broker() {
    use sqlx::Connection;
    let mut b = Broker::start();
    b.provision(&b.dir.join("policy.json"));
    let before = released_db_key(&b).await;
    // While the broker runs: a consistent copy (what `sqlite3 broker.db "VACUUM INTO …"` does).
    let backup = b.dir.join("backup.db");
    let mut c =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", b.dir.join("broker.db").display()))
            .await
            .unwrap();
    sqlx::query("VACUUM INTO $1")
        .bind(backup.to_str().unwrap())
        .execute(&mut c)
        .await
        .unwrap();
    drop(c);
    b.stop();
    // Restore: the copy replaces the database (and its WAL and shared memory go).
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(b.dir.join(format!("broker.db{suffix}")));
    }
    std::fs::rename(&backup, b.dir.join("broker.db")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        b.dir.join("broker.db"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    b.serve();
    assert_eq!(released_db_key(&b).await, before);
}
