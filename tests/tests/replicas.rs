//! Several `broker serve` replicas on one real PostgreSQL: any replica serves any step, a nonce
//! is released once whichever replicas it is sent to, and a policy set at one replica decides
//! at the others at once (each decision reads the active policy's version in its own
//! transaction).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use attestation::protocol::{ChallengeResponse, EphemeralKey, Kem};
use e2e::postgres::PgServer;
use e2e::{Broker, Guest};

async fn challenge(client: &reqwest::Client, url: String) -> String {
    let r = client.post(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<ChallengeResponse>().await.unwrap().nonce
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_postgres() {
    let mut pg = PgServer::start();
    let url = pg.create_database("replicas");
    let mut b = Broker::start_on(Some(&url));
    assert_eq!(b.add_replica(), 1);
    assert_eq!(b.add_replica(), 2);
    b.provision(&b.dir.join("policy.json"));
    let client = b.guest_client(None);
    let guest = Guest::new(&b.simulated_amd(), |_| {});
    let key = EphemeralKey::generate(Kem::X25519);

    // The same attestation sent to all three at once: one release, two replays; 100 times,
    // with the challenge taken from each replica in turn.
    let mut released = 0;
    for round in 0..100 {
        let nonce = challenge(&client, b.replica_url(round % 3, "/v1/challenge")).await;
        let request = guest.request(&nonce, &key, &["db-key"], None);
        let sends: Vec<_> = (0..3)
            .map(|i| {
                client
                    .post(b.replica_url(i, "/v1/attest"))
                    .json(&request)
                    .send()
            })
            .collect();
        let mut statuses = Vec::new();
        for s in sends {
            statuses.push(s.await.unwrap().status().as_u16());
        }
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409, 409], "round {round}");
        released += 1;
    }

    // A policy set through replica 0 decides at replica 2 at once.
    let refusing = b.dir.join("refusing.json");
    let mut policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.dir.join("policy.json")).unwrap()).unwrap();
    for condition in policy["rules"]["simulated-guest"]["allOf"]
        .as_array_mut()
        .unwrap()
    {
        if condition["claim"] == "vmpl" {
            condition["equals"] = 1.into();
        }
    }
    std::fs::write(&refusing, policy.to_string()).unwrap();
    let out = b.cli(&["policy", "set", refusing.to_str().unwrap()]);
    assert!(out.status.success(), "{}", e2e::stderr(&out));
    let nonce = challenge(&client, b.replica_url(1, "/v1/challenge")).await;
    let r = client
        .post(b.replica_url(2, "/v1/attest"))
        .json(&guest.request(&nonce, &key, &["db-key"], None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Every release is in the shared audit log, once; replays (two per round) are recorded
    // within one source's budget at each replica, the rest counted for the minute's summary.
    let out = b.cli(&["audit", "--json", "--action", "attest", "--limit", "1000"]);
    assert!(out.status.success(), "{}", e2e::stderr(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = audit["records"].as_array().unwrap();
    let count = |outcome: &str, reason: Option<&str>| {
        records
            .iter()
            .filter(|r| {
                r["outcome"] == outcome
                    && reason.is_none_or(|x| r["detail"]["reason"].as_str() == Some(x))
            })
            .count()
    };
    assert_eq!(count("released", None), released);
    let replays = count("refused", Some("nonce_replay"));
    assert!(
        (1..=3 * broker::audit::SampleBudget::default().per_source as usize).contains(&replays),
        "{replays} replay records"
    );
    assert_eq!(count("refused", Some("policy")), 1);

    // The database goes away (as a crash): every replica answers 503 with Retry-After, never
    // a 500 or a hang; when it is back, they recover without a restart.
    let out = b.cli(&["policy", "set", b.dir.join("policy.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", e2e::stderr(&out));
    let nonce = challenge(&client, b.replica_url(0, "/v1/challenge")).await;
    let pending = guest.request(&nonce, &key, &["db-key"], None);
    pg.stop_immediate();
    for i in 0..3 {
        let r = client
            .get(b.replica_url(i, "/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "replica {i}");
        let r = client
            .post(b.replica_url(i, "/v1/attest"))
            .json(&pending)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "replica {i}");
        assert!(r.headers().get("retry-after").is_some());
    }
    pg.start_again();
    let back = std::time::Instant::now();
    loop {
        let r = client
            .post(b.replica_url(2, "/v1/attest"))
            .json(&pending)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        // Issue #11: recovery within 5 s of the database's return, without a restart.
        assert!(
            back.elapsed() < std::time::Duration::from_secs(5),
            "no recovery within 5 s: {}",
            pg.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The refused attempts spent nothing: the same nonce was released once, just now.
    for i in 0..3 {
        let r = client
            .get(b.replica_url(i, "/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "replica {i}");
    }
}
