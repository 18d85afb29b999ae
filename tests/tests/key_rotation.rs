//! Online data-key rotation (`broker keys rotate`): every sealed record re-encrypted under a
//! new data key while replicas keep serving, the replicas picking the new key up, nonces
//! minted before the rotation still accepted, and a rotation killed half-way (SIGKILL)
//! resuming without losing a record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use attestation::protocol::{ChallengeResponse, EphemeralKey, Kem};
use broker::keyring::Keyring;
use broker::store::{AnyStore, AuditQuery, Store, StoredSecret};
use e2e::postgres::PgServer;
use e2e::{Broker, Guest, binary, stderr};

async fn open_store(config: &Path) -> (AnyStore, Keyring) {
    let settings = broker::config::Settings::load(config).unwrap();
    let store = AnyStore::open(&settings.store).await.unwrap();
    let master = broker::keys::open_master_key(&settings.master_key, &store, 0)
        .await
        .unwrap();
    let keyring = Keyring::load(master, &store, Duration::from_secs(60))
        .await
        .unwrap();
    (store, keyring)
}

fn rotate(config: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(binary("broker").unwrap())
        .args(["keys", "rotate", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Counts the sealed records under each data-key version.
async fn versions(store: &AnyStore) -> (usize, usize) {
    let under_old = store
        .records_under_old_keys(2, 1_000_000)
        .await
        .unwrap()
        .len();
    let all = usize::try_from(store.sealed_records().await.unwrap()).unwrap();
    (under_old, all - under_old)
}

async fn actions(store: &AnyStore) -> Vec<String> {
    store
        .query_audit(&AuditQuery {
            limit: Some(1_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .filter(|a| a.starts_with("data-key."))
        .collect()
}

async fn challenge(client: &reqwest::Client, url: String) -> String {
    let r = client.post(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<ChallengeResponse>().await.unwrap().nonce
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_while_two_replicas_serve_on_postgres() {
    let mut pg = PgServer::start();
    let url = pg.create_database("rotation");
    let mut b = Broker::start_on(Some(&url));
    assert_eq!(b.add_replica(), 1);
    b.provision(&b.dir.join("policy.json"));
    let before = b.attest_once("db-key").await.unwrap();
    let config = b.dir.join("broker.toml");

    // A nonce minted under the old key, spent after the rotation.
    let client = b.guest_client(None);
    let early_nonce = challenge(&client, b.replica_url(1, "/v1/challenge")).await;

    // Replica 1 keeps releasing while the rotation runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = client.clone();
        let amd = b.simulated_amd();
        let challenge_url = b.replica_url(1, "/v1/challenge");
        let attest_url = b.replica_url(1, "/v1/attest");
        tokio::spawn(async move {
            let guest = Guest::new(&amd, |_| {});
            let key = EphemeralKey::generate(Kem::X25519);
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let nonce = challenge(&client, challenge_url.clone()).await;
                let r = client
                    .post(&attest_url)
                    .json(&guest.request(&nonce, &key, &["db-key"], None))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    ok += 1;
                } else {
                    failed.push(r.text().await.unwrap_or_default());
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotation = tokio::task::spawn_blocking({
        let config = config.clone();
        move || rotate(&config, &["--batch", "1"])
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "refused during the rotation: {failed:?}");
    assert!(ok > 0);
    assert_eq!(rotation["version"], 2);
    assert_eq!(rotation["resumed"], false);
    // web-tls, db-key and the token signing key (KBS is on in --dev).
    assert_eq!(rotation["resealed"], 3, "{rotation}");

    // Both replicas release the same value, now opened under the new key.
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);
    let guest = Guest::new(&b.simulated_amd(), |_| {});
    let key = EphemeralKey::generate(Kem::X25519);
    let r = client
        .post(b.replica_url(1, "/v1/attest"))
        .json(&guest.request(&early_nonce, &key, &["db-key"], None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a nonce minted before the rotation");
    // A nonce minted at replica 0 after it has the new key is accepted at replica 1.
    let nonce = challenge(&client, b.replica_url(0, "/v1/challenge")).await;
    let r = client
        .post(b.replica_url(1, "/v1/attest"))
        .json(&guest.request(&nonce, &key, &["db-key"], None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A secret written through either replica now is sealed under version 2.
    let out = b.cli(&["secret", "generate", "after", "--bytes", "16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (store, keyring) = open_store(&config).await;
    assert_eq!(keyring.current(), 2);
    assert_eq!(versions(&store).await, (0, 4));
    let after: StoredSecret = store.current_secret("after").await.unwrap().unwrap();
    assert_eq!(after.key_version, 2);
    let keys = store.data_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].retired_at.is_none());
    let actions = actions(&store).await;
    assert!(
        actions.contains(&"data-key.create".to_string()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"data-key.retire".to_string()),
        "{actions:?}"
    );

    // The status command says where the store stands.
    let out = Command::new(binary("broker").unwrap())
        .args(["keys", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["data_keys"][0]["version"], 2, "{status}");
    assert_eq!(status["records_under_older_keys"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rotation_resumes_and_loses_nothing() {
    let mut b = Broker::start();
    b.provision(&b.dir.join("policy.json"));
    let db_key = b.attest_once("db-key").await.unwrap();
    b.stop();
    let config = b.dir.join("broker.toml");

    // 1 200 more records, each with its own value.
    let (store, keyring) = open_store(&config).await;
    let value = |i: usize| format!("value {i} of the bulk").into_bytes();
    for i in 0..1_200 {
        let name = format!("bulk-{i}");
        let sealed = keyring.seal(&name, 1, &value(i)).unwrap();
        let record = StoredSecret {
            name,
            version: 1,
            kind: "opaque".into(),
            meta: serde_json::json!({}),
            sealed: sealed.bytes,
            key_version: sealed.key_version,
        };
        let audit = broker::store::AuditRecord {
            id: 0,
            at: 0,
            actor: "test".into(),
            action: "secret.put".into(),
            outcome: "ok".into(),
            detail: serde_json::json!({}),
        };
        store
            .insert_secret(&record, 0, "test", &audit)
            .await
            .unwrap();
    }
    let total = 1_200 + 3;

    // Killed (SIGKILL) once it has said how far it got.
    let mut child = Command::new(binary("broker").unwrap())
        .args(["keys", "rotate", "--batch", "1", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("re-encrypted "), "{first}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Half-way: some records under each version, every one of them still opens.
    let (store, keyring) = open_store(&config).await;
    let (old, new) = versions(&store).await;
    assert!(
        old > 0 && new > 0,
        "old {old}, new {new}: not interrupted half-way"
    );
    assert_eq!(old + new, total);
    for i in (0..1_200).step_by(7) {
        let r = store
            .current_secret(&format!("bulk-{i}"))
            .await
            .unwrap()
            .unwrap();
        let plain = keyring
            .open(r.key_version, &r.name, r.version, &r.sealed)
            .unwrap();
        assert_eq!(&plain[..], &value(i)[..]);
    }
    // A broker serves in the middle of a rotation.
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), db_key);

    // Run again: it resumes and finishes.
    let rotation = rotate(&config, &[]);
    assert_eq!(rotation["version"], 2, "{rotation}");
    assert_eq!(rotation["resumed"], true);
    assert_eq!(rotation["resealed"], old);
    let (store, keyring) = open_store(&config).await;
    assert_eq!(versions(&store).await, (0, total));
    for i in 0..1_200 {
        let r = store
            .current_secret(&format!("bulk-{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.key_version, 2);
        let plain = keyring
            .open(r.key_version, &r.name, r.version, &r.sealed)
            .unwrap();
        assert_eq!(&plain[..], &value(i)[..], "bulk-{i}");
    }
    assert_eq!(b.attest_once("db-key").await.unwrap(), db_key);
    let actions = actions(&store).await;
    for a in ["data-key.create", "data-key.resume", "data-key.retire"] {
        assert!(actions.contains(&a.to_string()), "{a}: {actions:?}");
    }

    // Another rotation makes version 3 and leaves nothing under 2.
    let rotation = rotate(&config, &[]);
    assert_eq!(rotation["version"], 3);
    assert_eq!(rotation["resealed"], total);
    assert_eq!(b.attest_once("db-key").await.unwrap(), db_key);

    // A configuration with another master key is refused before anything is written.
    let other = b.dir.join("other.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let key_file = b.dir.join("other-master.key");
    std::fs::write(&key_file, "ab".repeat(31) + "cd").unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(&other, with_key_file(&text, &key_file)).unwrap();
    let out = Command::new(binary("broker").unwrap())
        .args(["keys", "rotate", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("check value differs"),
        "{}",
        stderr(&out)
    );
}

/// The configuration with its `[master_key] file` pointing at `key_file`.
fn with_key_file(config: &str, key_file: &Path) -> String {
    config
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("file =") {
                format!("file = {:?}", key_file.display().to_string())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `n` sealed secrets straight into the store's database, 1 000 rows per statement
/// (the store's API writes one transaction, and one fsync, per secret).
async fn bulk_secrets(store: &broker::config::StoreSettings, keyring: &Keyring, n: usize) {
    let rows: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let name = format!("bulk-{i}");
            let sealed = keyring.seal(&name, 1, &[7u8; 32]).unwrap().bytes;
            (name, sealed)
        })
        .collect();
    macro_rules! insert {
        ($conn:expr, $db:ty) => {
            for chunk in rows.chunks(1_000) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO secrets (name, version, kind, created_at, created_by, sealed, meta) ",
                );
                q.push_values(chunk, |mut b, (name, sealed)| {
                    b.push_bind(name)
                        .push_bind(1i64)
                        .push_bind("data-key")
                        .push_bind(0i64)
                        .push_bind("bench")
                        .push_bind(sealed)
                        .push_bind("{}");
                });
                q.build().execute(&mut $conn).await.unwrap();
            }
        };
    }
    use sqlx::Connection;
    match store {
        broker::config::StoreSettings::Sqlite(path) => {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            insert!(c, sqlx::Sqlite);
        }
        broker::config::StoreSettings::Postgres(pg) => {
            let mut c = sqlx::PgConnection::connect(&pg.url).await.unwrap();
            insert!(c, sqlx::Postgres);
        }
    }
}

/// Issue #16's measurement: `broker keys rotate` over 100 000 records, on SQLite and on
/// PostgreSQL (durable: fsync on), in records per second. Run by `make bench`
/// (`ROTATE_BROKER` names the release binary); prints one JSON line per engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a timing, run by make bench"]
async fn rotation_speed_over_100k_records() {
    const N: usize = 100_000;
    let broker_bin = std::env::var_os("ROTATE_BROKER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| binary("broker").unwrap());
    let mut pg = PgServer::start_durable();
    for engine in ["sqlite", "postgres"] {
        let url = (engine == "postgres").then(|| pg.create_database("rotation_speed"));
        let mut b = Broker::start_on(url.as_deref());
        b.stop();
        let config = b.dir.join("broker.toml");
        let settings = broker::config::Settings::load(&config).unwrap();
        let (store, keyring) = open_store(&config).await;
        bulk_secrets(&settings.store, &keyring, N).await;
        let records = store.sealed_records().await.unwrap();
        assert!(records >= N as u64);
        drop(store);
        let start = std::time::Instant::now();
        let out = Command::new(&broker_bin)
            .args(["keys", "rotate", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        assert!(out.status.success(), "{}", stderr(&out));
        let rotation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(rotation["resealed"], records);
        let (store, keyring) = open_store(&config).await;
        let r = store.current_secret("bulk-99999").await.unwrap().unwrap();
        assert_eq!(r.key_version, 2);
        assert_eq!(
            &keyring
                .open(r.key_version, &r.name, r.version, &r.sealed)
                .unwrap()[..],
            &[7u8; 32]
        );
        println!(
            "{}",
            serde_json::json!({
                "kind": "rotation",
                "engine": engine,
                "records": records,
                "batch": broker::keyring::DEFAULT_BATCH,
                "seconds": elapsed,
                "records_per_second": records as f64 / elapsed,
            })
        );
    }
}
