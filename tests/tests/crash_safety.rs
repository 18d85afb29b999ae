//! Nothing released twice, nothing lost: brokers killed with SIGKILL in a loop (replicas on
//! PostgreSQL, and the embedded SQLite store), and PostgreSQL stopped as by a crash, while
//! guests attest and an operator writes secrets. Afterwards the audit log must account for
//! every answer the clients received ([`e2e::workload::check_invariants`]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use e2e::postgres::PgServer;
use e2e::workload::{self, Observed};
use e2e::{Broker, Guest};

/// Starts the workload against every replica of `b`.
fn start_workload(
    b: &Broker,
    replicas: usize,
    max: usize,
) -> (
    tokio::task::JoinHandle<Observed>,
    Arc<AtomicBool>,
    reqwest::Client,
    String,
) {
    b.provision(&b.dir.join("policy.json"));
    let bases: Vec<String> = (0..replicas).map(|i| b.replica_url(i, "")).collect();
    let operator = b.guest_client(Some((
        &b.dir.join("operator.pem"),
        &b.dir.join("operator.key"),
    )));
    let guest = Arc::new(Guest::new(&b.simulated_amd(), |_| {}));
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(workload::run(
        bases.clone(),
        b.guest_client(None),
        operator.clone(),
        guest,
        2,
        max,
        stop.clone(),
    ));
    (task, stop, operator, bases[0].clone())
}

async fn finish(
    task: tokio::task::JoinHandle<Observed>,
    stop: Arc<AtomicBool>,
    operator: &reqwest::Client,
    base: &str,
) -> Observed {
    stop.store(true, Ordering::SeqCst);
    let observed = task.await.unwrap();
    assert!(
        !observed.released.is_empty(),
        "no release at all: {observed:?}"
    );
    workload::check_invariants(base, operator, &observed).await;
    observed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_in_a_loop_lose_nothing() {
    let mut pg = PgServer::start();
    let url = pg.create_database("killed");
    let mut b = Broker::start_on(Some(&url));
    b.add_replica();
    b.add_replica();
    let (task, stop, operator, base) = start_workload(&b, 3, 250);
    let b = tokio::task::spawn_blocking(move || {
        for round in 0..21 {
            let i = round % 3;
            if i == 0 {
                b.stop();
            } else {
                b.kill_replica(i);
            }
            std::thread::sleep(Duration::from_millis(150));
            if i == 0 {
                b.serve();
            } else {
                b.serve_replica(i);
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        b
    })
    .await
    .unwrap();
    let observed = finish(task, stop, &operator, &base).await;
    eprintln!(
        "after 21 kills: {} released, others {:?}",
        observed.released.len(),
        observed.other
    );
    assert!(
        observed.other.get(&0).copied().unwrap_or(0) > 0,
        "no flow was cut by a kill: the test did not test anything"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_under_load_then_recovery() {
    let mut pg = PgServer::start();
    let url = pg.create_database("crashed");
    let mut b = Broker::start_on(Some(&url));
    b.add_replica();
    let (task, stop, operator, base) = start_workload(&b, 2, 250);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop_immediate();
        // Longer than the store's connect timeout (5 s): requests that arrive meanwhile
        // get their 503 rather than waiting the outage out.
        std::thread::sleep(Duration::from_secs(7));
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    let back = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !task.is_finished(),
        "the load ended before the database came back"
    );
    let observed = finish(task, stop, &operator, &base).await;
    // Full recovery: a guest is served again.
    let again = b.attest_once("db-key").await;
    assert!(
        again.is_ok(),
        "no release after the database came back: {again:?}"
    );
    assert!(
        observed.other.get(&503).copied().unwrap_or(0) > 0,
        "no 503 while the database was down: {observed:?}"
    );
    eprintln!(
        "database crash: {} released, others {:?}, {:?} since restart",
        observed.released.len(),
        observed.other,
        back.elapsed()
    );
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_broker_killed_in_a_loop_stays_consistent() {
    let b = Broker::start();
    let (task, stop, operator, base) = start_workload(&b, 1, 250);
    let b = tokio::task::spawn_blocking(move || {
        let mut b = b;
        for _ in 0..20 {
            b.stop();
            std::thread::sleep(Duration::from_millis(100));
            b.serve();
            std::thread::sleep(Duration::from_millis(250));
        }
        b
    })
    .await
    .unwrap();
    finish(task, stop, &operator, &base).await;
    // The database file is sound.
    use sqlx::Connection;
    let mut c =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", b.dir.join("broker.db").display()))
            .await
            .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(check, "ok");
}
