//! Measurements for several replicas (not a pass/fail test; run by hand, ideally in release):
//!
//! ```sh
//! cargo build --release --bins && \
//!   cargo test --release -p e2e --test measure_replicas -- --ignored --nocapture
//! ```
//!
//! Prints, from one run on this machine: challenge+attest flows per second with one broker on
//! SQLite, one replica on PostgreSQL and two replicas on PostgreSQL (4 concurrent guests each;
//! both engines durable: SQLite synchronous=FULL, PostgreSQL fsync on),
//! their ratios to the SQLite figure, the p99 latency while a replica is killed every second,
//! and the time from PostgreSQL's return to the first 200.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use attestation::protocol::{ChallengeResponse, EphemeralKey, Kem};
use e2e::postgres::PgServer;
use e2e::{Broker, Guest};

struct Run {
    ok: usize,
    failed: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&mut self, q: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// A simulated guest of `b` and an HTTPS client pinning its CA.
fn guest_of(b: &Broker) -> (Arc<Guest>, reqwest::Client) {
    (
        Arc::new(Guest::new(&b.simulated_amd(), |_| {})),
        b.guest_client(None),
    )
}

/// `clients` guests doing challenge + attest flows against `bases` (round robin) for `for_`.
async fn load(
    (guest, client): (Arc<Guest>, reqwest::Client),
    bases: Vec<String>,
    clients: usize,
    for_: Duration,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (guest, client, bases, stop) =
                (guest.clone(), client.clone(), bases.clone(), stop.clone());
            tokio::spawn(async move {
                let key = EphemeralKey::generate(Kem::X25519);
                let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
                let mut i = c;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let base = &bases[i % bases.len()];
                    let t = Instant::now();
                    let flow = async {
                        let nonce = client
                            .post(format!("{base}/v1/challenge"))
                            .send()
                            .await
                            .ok()?
                            .json::<ChallengeResponse>()
                            .await
                            .ok()?
                            .nonce;
                        let r = client
                            .post(format!("{base}/v1/attest"))
                            .json(&guest.request(&nonce, &key, &["db-key"], None))
                            .send()
                            .await
                            .ok()?;
                        (r.status() == 200 && r.bytes().await.is_ok()).then_some(())
                    };
                    match flow.await {
                        Some(()) => {
                            ok += 1;
                            lat.push(t.elapsed());
                        }
                        None => failed += 1,
                    }
                }
                (ok, failed, lat)
            })
        })
        .collect();
    tokio::time::sleep(for_).await;
    stop.store(true, Ordering::SeqCst);
    let mut run = Run {
        ok: 0,
        failed: 0,
        latencies: Vec::new(),
        elapsed: started.elapsed(),
    };
    for t in tasks {
        let (ok, failed, lat) = t.await.unwrap();
        run.ok += ok;
        run.failed += failed;
        run.latencies.extend(lat);
    }
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand (see the file's documentation)"]
async fn measure_replicas() {
    let window = Duration::from_secs(10);
    let clients = 4;

    let sqlite = Broker::start();
    sqlite.provision(&sqlite.dir.join("policy.json"));
    let mut base = load(guest_of(&sqlite), vec![sqlite.url("")], clients, window).await;
    drop(sqlite);

    let mut pg = PgServer::start_durable();
    let url = pg.create_database("measure");
    let mut b = Broker::start_on(Some(&url));
    b.provision(&b.dir.join("policy.json"));
    let mut one = load(guest_of(&b), vec![b.url("")], clients, window).await;
    b.add_replica();
    let both = vec![b.replica_url(0, ""), b.replica_url(1, "")];
    let mut two = load(guest_of(&b), both.clone(), clients, window).await;

    // p99 while replica 1 is killed (SIGKILL) and restarted every second; flows cut by a kill
    // count as failed.
    let view = guest_of(&b);
    let killer = {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = tokio::task::spawn_blocking(move || {
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(700));
                b.kill_replica(1);
                std::thread::sleep(Duration::from_millis(300));
                b.serve_replica(1);
            }
            b
        });
        (stop, handle)
    };
    let mut killed = load(view, both.clone(), clients, window).await;
    killer.0.store(true, Ordering::SeqCst);
    let b = killer.1.await.unwrap();

    // Time from PostgreSQL's return to the first 200.
    pg.stop_immediate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again();
    let back = Instant::now();
    while b.attest_once("db-key").await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = back.elapsed();

    println!("flows/s with {clients} concurrent guests, {window:?} each, one run:");
    for (label, run) in [
        ("1 broker, SQLite", &mut base),
        ("1 replica, PostgreSQL", &mut one),
        ("2 replicas, PostgreSQL", &mut two),
    ] {
        println!(
            "  {label:<24} {:>8.1}/s  p50 {:?}  p99 {:?}  failed {}",
            run.per_second(),
            run.p(0.5),
            run.p(0.99),
            run.failed
        );
    }
    println!(
        "  ratios to SQLite: 1 PostgreSQL replica {:.2}x, 2 replicas {:.2}x",
        one.per_second() / base.per_second(),
        two.per_second() / base.per_second()
    );
    println!(
        "while a replica is killed every second: {:.1}/s, p99 {:?} (vs {:?} undisturbed), {} flows cut",
        killed.per_second(),
        killed.p(0.99),
        two.p(0.99),
        killed.failed
    );
    println!("from PostgreSQL's return to the first 200: {recovery:?}");
}
