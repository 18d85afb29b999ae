//! The store's guarantees on both engines, SQLite and a real PostgreSQL server: versions,
//! single-use nonces under concurrency, one transaction per decision and per admin change,
//! migrations once across replicas, and a refusal of a schema newer than the broker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use broker::store::{
    AuditQuery, AuditRecord, Committed, PgSettings, PgStore, Spend, SqliteStore, Store, StoreError,
    StoredSecret,
};
use e2e::postgres::PgServer;

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

async fn actions(s: &impl Store) -> Vec<String> {
    s.query_audit(&AuditQuery {
        limit: Some(1000),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|r| r.action)
    .collect()
}

fn pg_settings(url: String) -> PgSettings {
    PgSettings {
        url,
        ca_file: None,
        password_file: None,
        pool_size: 32,
        statement_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
    }
}

/// What both engines must do alike.
async fn conformance(s: impl Store + Clone) {
    // Versions, never reused.
    let put = audit("secret.put");
    s.insert_secret(&secret("a", 1), 10, "op", &put)
        .await
        .unwrap();
    s.insert_secret(&secret("a", 2), 11, "op", &put)
        .await
        .unwrap();
    assert!(matches!(
        s.insert_secret(&secret("a", 2), 12, "op", &put).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.current_secret("a").await.unwrap().unwrap().version, 2);
    assert!(
        s.delete_secret("a", 20, &audit("secret.delete"))
            .await
            .unwrap()
    );
    assert!(s.current_secret("a").await.unwrap().is_none());
    assert_eq!(s.last_secret_version("a").await.unwrap(), 2);
    assert_eq!(
        actions(&s).await,
        ["secret.delete", "secret.put", "secret.put"]
    );

    // Policies, audit detail from the store, the KDS cache, the readiness write.
    assert_eq!(
        s.insert_policy("{1}", 1, "a", &audit("policy.set"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.insert_policy("{2}", 2, "b", &audit("policy.set"))
            .await
            .unwrap(),
        2
    );
    assert_eq!(s.active_policy().await.unwrap().unwrap().document, "{2}");
    // The broker's own keys: versions newest first, a version taken twice is a conflict
    // (two replicas making the first key at once), each insert audited.
    let key = |version: u64| broker::store::BrokerKey {
        purpose: "ear-es256".into(),
        version,
        created_at: 5,
        public: serde_json::json!({"kty": "EC", "kid": format!("k{version}")}),
        sealed: vec![version as u8; 48],
        key_version: 1,
    };
    assert!(s.broker_keys("ear-es256").await.unwrap().is_empty());
    s.insert_broker_key(&key(1), &audit("token-key.create"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_broker_key(&key(1), &audit("token-key.create"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    s.insert_broker_key(&key(2), &audit("token-key.create"))
        .await
        .unwrap();
    let keys = s.broker_keys("ear-es256").await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(keys[1].public["kid"], "k1");
    assert_eq!(keys[1].sealed, vec![1u8; 48]);
    assert!(s.broker_keys("other").await.unwrap().is_empty());
    // The public part changes only from what the caller last read (a CA's request becoming
    // its certificate), with its audit record.
    let certified = serde_json::json!({"kty": "EC", "kid": "k1", "certified": true});
    s.set_broker_key_public(
        "ear-es256",
        1,
        &keys[1].public,
        &certified,
        &audit("pki.ca.import"),
    )
    .await
    .unwrap();
    for (version, expected) in [(1, &keys[1].public), (9, &certified)] {
        assert!(matches!(
            s.set_broker_key_public("ear-es256", version, expected, &certified, &audit("x"))
                .await,
            Err(StoreError::Conflict(_))
        ));
    }
    let keys = s.broker_keys("ear-es256").await.unwrap();
    assert_eq!(keys[1].public, certified);
    assert_eq!(keys[1].sealed, vec![1u8; 48]);
    assert_eq!(keys[0].public["kid"], "k2");
    assert!(actions(&s).await.iter().any(|a| a == "pki.ca.import"));
    assert!(!actions(&s).await.iter().any(|a| a == "x"));

    assert_eq!(
        actions(&s)
            .await
            .iter()
            .filter(|a| *a == "token-key.create")
            .count(),
        2
    );
    // How the master key is held: one record, a second insert is a conflict (two replicas
    // at their first start), a re-wrap replaces it; sealed records are counted.
    assert_eq!(s.master_key().await.unwrap(), None);
    let record = |provider: &str, wrapped: Option<Vec<u8>>| broker::store::MasterKeyRecord {
        provider: provider.into(),
        wrapped,
        check: vec![7; 32],
        created_at: 9,
    };
    assert!(matches!(
        s.put_master_key(
            &record("pkcs11", None),
            true,
            &[],
            &audit("master-key.wrap")
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    s.put_master_key(
        &record("file", None),
        false,
        &[],
        &audit("master-key.adopt"),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.put_master_key(
            &record("file", None),
            false,
            &[],
            &audit("master-key.adopt")
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    s.put_master_key(
        &record("pkcs11", Some(vec![1; 60])),
        true,
        &[],
        &audit("master-key.wrap"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.master_key().await.unwrap(),
        Some(record("pkcs11", Some(vec![1; 60])))
    );
    // Two broker keys so far, and the secrets inserted above.
    assert!(s.sealed_records().await.unwrap() >= 2);
    s.cache_put("k", b"v1", 1).await.unwrap();
    s.cache_put("k", b"v2", 2).await.unwrap();
    assert_eq!(s.cache_get("k").await.unwrap(), Some((b"v2".to_vec(), 2)));
    s.ping().await.unwrap();

    // A decision: its inputs read as of a generation, then its nonce spent and its audit
    // record appended together.
    s.insert_secret(&secret("db-key", 1), 30, "op", &put)
        .await
        .unwrap();
    let names = vec!["db-key".to_string(), "nope".to_string()];
    let inputs = s.decision_inputs(&names, None).await.unwrap();
    assert_eq!(inputs.policy.as_ref().unwrap().version, 2);
    assert_eq!(
        inputs.policy.as_ref().unwrap().document.as_deref(),
        Some("{2}")
    );
    assert_eq!(inputs.secrets[0].as_ref().unwrap().version, 1);
    assert!(inputs.secrets[1].is_none());
    let g = inputs.generation;
    let spend = |n: u8, generation: i64| Spend {
        nonce: Some([n; 32]),
        expires_at: 100,
        generation,
        issued: Vec::new(),
    };
    let before = actions(&s).await.len();
    assert_eq!(
        s.commit_decision(spend(7, g), audit("attest"))
            .await
            .unwrap(),
        Committed::Done
    );
    assert_eq!(actions(&s).await.len(), before + 1);
    // Spent: a replay writes nothing.
    assert_eq!(
        s.commit_decision(spend(7, g), audit("attest"))
            .await
            .unwrap(),
        Committed::Replay
    );
    assert_eq!(actions(&s).await.len(), before + 1);
    // Certificates a decision issued are recorded with it, and only when it commits.
    let issued = |serial: &str| broker::store::IssuedRecord {
        serial: serial.into(),
        ca_version: 1,
        profile: "web".into(),
        subject: "web.internal".into(),
        names: vec!["dns:web.internal".into()],
        claims_digest: "ab".repeat(32),
        claims: serde_json::json!({"measurement": "5a"}),
        not_before: 10,
        not_after: 20,
        issued_at: 11,
        certificate: vec![0x30, 0x00],
        revoked_at: None,
        revocation_reason: None,
    };
    let mut with_certificate = spend(0xa8, g);
    with_certificate.issued = vec![issued("01aa"), issued("01bb")];
    assert_eq!(
        s.commit_decision(with_certificate.clone(), audit("attest"))
            .await
            .unwrap(),
        Committed::Done
    );
    assert_eq!(
        s.commit_decision(with_certificate, audit("attest"))
            .await
            .unwrap(),
        Committed::Replay
    );
    let mut stale = spend(0xa9, g - 1);
    stale.issued = vec![issued("01cc")];
    assert_eq!(
        s.commit_decision(stale, audit("attest")).await.unwrap(),
        Committed::Stale
    );
    let recorded = s.issued_certificates(10).await.unwrap();
    assert_eq!(
        recorded
            .iter()
            .map(|r| r.serial.as_str())
            .collect::<Vec<_>>(),
        vec!["01aa", "01bb"]
    );
    assert_eq!(recorded[0], issued("01aa"));
    assert_eq!(s.issued_certificates(1).await.unwrap().len(), 1);
    // Revocation: once, with its audit record; listed for the CRL while unexpired.
    assert_eq!(
        s.issued_certificate("01bb").await.unwrap(),
        Some(issued("01bb"))
    );
    assert_eq!(s.issued_certificate("01cc").await.unwrap(), None);
    assert_eq!(s.unexpired_certificates(15).await.unwrap().len(), 2);
    assert!(
        s.revoke_certificate("01aa", 16, "keyCompromise", &audit("pki.cert.revoke"))
            .await
            .unwrap()
    );
    for serial in ["01aa", "01cc"] {
        assert!(
            !s.revoke_certificate(serial, 17, "superseded", &audit("x"))
                .await
                .unwrap()
        );
    }
    let revoked = s.issued_certificate("01aa").await.unwrap().unwrap();
    assert_eq!(
        (revoked.revoked_at, revoked.revocation_reason.as_deref()),
        (Some(16), Some("keyCompromise"))
    );
    let unexpired = s.unexpired_certificates(15).await.unwrap();
    assert_eq!(unexpired.len(), 1);
    assert_eq!(
        unexpired[0].claims,
        serde_json::json!({"measurement": "5a"})
    );
    assert_eq!(s.revoked_certificates(1, 15).await.unwrap().len(), 1);
    assert!(s.revoked_certificates(1, 20).await.unwrap().is_empty());
    assert!(s.revoked_certificates(2, 15).await.unwrap().is_empty());
    let acts = actions(&s).await;
    assert_eq!(acts.iter().filter(|a| *a == "pki.cert.revoke").count(), 1);
    assert!(!acts.iter().any(|a| a == "x"));
    // (Counted from here on as if only the first decision had been audited.)
    let before = acts.len() - 1;
    // A decision that spends no nonce (a KBS resource request on an attestation whose nonce
    // was spent) is audited every time, and is stale like any other on older inputs.
    let unspent = |generation: i64| Spend {
        nonce: None,
        expires_at: 100,
        generation,
        issued: Vec::new(),
    };
    for n in 2..=3 {
        assert_eq!(
            s.commit_decision(unspent(g), audit("attest.resource"))
                .await
                .unwrap(),
            Committed::Done
        );
        assert_eq!(actions(&s).await.len(), before + n);
    }
    assert_eq!(
        s.commit_decision(unspent(g ^ 1), audit("attest.resource"))
            .await
            .unwrap(),
        Committed::Stale
    );
    assert_eq!(actions(&s).await.len(), before + 3);
    // From the cache: the same generation, no document for the version the caller has.
    let cached = s.decision_inputs(&names, Some(2)).await.unwrap();
    assert_eq!(cached.generation, g);
    assert!(cached.policy.unwrap().document.is_none());

    // A write to secrets makes a decision on older inputs stale: nothing spent or recorded,
    // and fresh inputs see the write.
    s.insert_secret(&secret("db-key", 2), 31, "op", &put)
        .await
        .unwrap();
    let before = actions(&s).await.len();
    assert_eq!(
        s.commit_decision(spend(8, g), audit("attest"))
            .await
            .unwrap(),
        Committed::Stale
    );
    assert_eq!(actions(&s).await.len(), before);
    let fresh = s.decision_inputs(&names, Some(2)).await.unwrap();
    assert_ne!(fresh.generation, g);
    assert_eq!(fresh.secrets[0].as_ref().unwrap().version, 2);
    assert_eq!(
        s.commit_decision(spend(8, fresh.generation), audit("attest"))
            .await
            .unwrap(),
        Committed::Done,
        "the stale decision spent nothing"
    );
    // So does a policy write, and a delete.
    s.insert_policy("{3}", 3, "b", &audit("policy.set"))
        .await
        .unwrap();
    assert_eq!(
        s.commit_decision(spend(10, fresh.generation), audit("attest"))
            .await
            .unwrap(),
        Committed::Stale
    );
    let inputs = s.decision_inputs(&names, Some(2)).await.unwrap();
    assert_eq!(inputs.policy.unwrap().document.as_deref(), Some("{3}"));
    s.insert_secret(&secret("gone", 1), 32, "op", &put)
        .await
        .unwrap();
    let gone = vec!["gone".to_string()];
    let inputs = s.decision_inputs(&gone, Some(3)).await.unwrap();
    assert!(inputs.secrets[0].is_some());
    assert!(
        s.delete_secret("gone", 33, &audit("secret.delete"))
            .await
            .unwrap()
    );
    assert_eq!(
        s.commit_decision(spend(10, inputs.generation), audit("attest"))
            .await
            .unwrap(),
        Committed::Stale
    );
    assert!(
        s.decision_inputs(&gone, Some(3)).await.unwrap().secrets[0].is_none(),
        "a deleted secret is gone from the cache too"
    );

    // The same nonce from many tasks at once: exactly one spends it.
    let g = s.decision_inputs(&names, Some(3)).await.unwrap().generation;
    let outcomes: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.commit_decision(spend(9, g), audit("attest")).await })
        })
        .collect();
    let mut done = 0;
    for t in outcomes {
        match t.await.unwrap().unwrap() {
            Committed::Done => done += 1,
            Committed::Replay => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, 1);
    // Nonces 7, 0xa8 (the decision that issued certificates), 8 and 9.
    assert_eq!(s.purge_nonces(101).await.unwrap(), 4);

    // Paging, newest first: each page continues before the previous page's oldest id.
    let all = s
        .query_audit(&AuditQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut paged = Vec::new();
    let mut before_id = None;
    loop {
        let page = s
            .query_audit(&AuditQuery {
                limit: Some(3),
                before_id,
                ..Default::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before_id = page.last().map(|r| r.id);
        paged.extend(page);
    }
    assert_eq!(paged, all);

    // Data keys: versions in order, a version taken twice is a conflict (two rotations at
    // once); once version 2 exists a record sealed under 1 is refused; re-encryption is a
    // compare-and-set on the record's key version; retiring waits for the last record.
    use broker::store::{DataKeyRecord, SealedTable};
    assert!(s.data_keys().await.unwrap().is_empty());
    let dk = DataKeyRecord {
        version: 2,
        wrapped: vec![2; 60],
        created_at: 7,
        retired_at: None,
    };
    s.insert_data_key(&dk, &audit("data-key.create"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_data_key(&dk, &audit("data-key.create")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.data_keys().await.unwrap()[0].wrapped, vec![2; 60]);
    let e = s
        .insert_secret(&secret("late", 1), 1, "a", &audit("secret.put"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::OldDataKey {
                sealed_under: 1,
                current: 2
            }
        ),
        "{e}"
    );
    assert!(matches!(
        s.insert_broker_key(&key(3), &audit("token-key.create"))
            .await,
        Err(StoreError::OldDataKey { .. })
    ));
    let old = s.records_under_old_keys(2, 1_000).await.unwrap();
    let secrets_old = old
        .iter()
        .filter(|r| r.table == SealedTable::Secret)
        .count();
    let keys_old = old
        .iter()
        .filter(|r| r.table == SealedTable::BrokerKey)
        .count();
    assert_eq!(
        (keys_old, old.len() as u64),
        (2, s.sealed_records().await.unwrap())
    );
    assert!(secrets_old > 0);
    assert_eq!(s.records_under_old_keys(2, 1).await.unwrap().len(), 1);
    assert!(matches!(
        s.retire_data_keys(2, 8, &audit("data-key.retire")).await,
        Err(StoreError::Conflict(_))
    ));
    let resealed: Vec<_> = old.iter().map(|r| (r.clone(), vec![9u8; 44], 2)).collect();
    // A record re-encrypted meanwhile (its key version no longer 1) is left alone.
    let mut moved = old[0].clone();
    moved.key_version = 5;
    assert_eq!(s.reseal(&[(moved, vec![1], 2)]).await.unwrap(), 0);
    // A secret deleted between the read and the re-encryption stays deleted.
    let gone = old
        .iter()
        .find(|r| r.table == SealedTable::Secret)
        .unwrap()
        .name
        .clone();
    let gone_versions = old.iter().filter(|r| r.name == gone).count() as u64;
    assert!(
        s.delete_secret(&gone, 30, &audit("secret.delete"))
            .await
            .unwrap()
    );
    let sealed_before = s.sealed_records().await.unwrap();
    let before_reseal = s.decision_inputs(&[], None).await.unwrap().generation;
    assert_eq!(
        s.reseal(&resealed).await.unwrap(),
        old.len() as u64 - gone_versions
    );
    assert_eq!(s.sealed_records().await.unwrap(), sealed_before);
    // Re-encryption changes no plaintext: a decision made before it is not stale.
    assert_eq!(
        s.commit_decision(spend(40, before_reseal), audit("attest"))
            .await
            .unwrap(),
        Committed::Done
    );
    assert!(s.current_secret(&gone).await.unwrap().is_none());
    assert!(s.records_under_old_keys(2, 1_000).await.unwrap().is_empty());
    assert_eq!(s.broker_keys("ear-es256").await.unwrap()[0].key_version, 2);
    assert_eq!(
        s.retire_data_keys(2, 8, &audit("data-key.retire"))
            .await
            .unwrap(),
        0,
        "version 1 is the master key, not a stored row"
    );
    // The retirement does start a new generation: replicas re-read their cached old bytes.
    assert_eq!(
        s.commit_decision(spend(41, before_reseal), audit("attest"))
            .await
            .unwrap(),
        Committed::Stale
    );
    let mut late = secret("late", 1);
    late.key_version = 2;
    s.insert_secret(&late, 1, "a", &audit("secret.put"))
        .await
        .unwrap();
    assert_eq!(
        s.current_secret("late").await.unwrap().unwrap().key_version,
        2
    );
    // A new master key: its record and the data keys re-wrapped under it, in one transaction
    // (version 1, the old master key itself, becomes a stored row).
    let rekeyed = |version: u64, byte: u8| DataKeyRecord {
        version,
        wrapped: vec![byte; 60],
        created_at: 0,
        retired_at: None,
    };
    // One that misses a stored version (a rotation made it meanwhile) changes nothing.
    assert!(matches!(
        s.put_master_key(
            &record("file", None),
            true,
            &[rekeyed(1, 0xa1)],
            &audit("master-key.rekey"),
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.data_keys().await.unwrap().len(), 1);
    s.put_master_key(
        &record("file", None),
        true,
        &[rekeyed(1, 0xa1), rekeyed(2, 0xa2)],
        &audit("master-key.rekey"),
    )
    .await
    .unwrap();
    let keys = s.data_keys().await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.version, k.wrapped[0], k.created_at))
            .collect::<Vec<_>>(),
        [(1, 0xa1, 0), (2, 0xa2, 7)]
    );

    // Pruning records itself.
    let n = s
        .prune_audit(i64::MAX, &audit("audit.prune"))
        .await
        .unwrap();
    assert!(n > 0);
    assert_eq!(actions(&s).await, ["audit.prune"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_engine() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("b.db")).await.unwrap();
    conformance(s).await;
}

/// (groups committed, decisions in them) from the store's group-commit histogram.
fn groups(s: &impl Store) -> (u64, u64) {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("g", "group sizes", s.commit_metrics().group_size.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or_else(|| panic!("{key} in {text}"))
    };
    (value("g_count "), value("g_sum "))
}

/// Audit records of `action`.
async fn count(s: &impl Store, action: &str) -> usize {
    s.query_audit(&AuditQuery {
        action: Some(action.into()),
        limit: Some(1000),
        ..Default::default()
    })
    .await
    .unwrap()
    .len()
}

/// Group commit: decisions that queue while the database is busy commit together, each
/// answered; a purge of many expired nonces goes in small transactions and forgets them all.
/// `hold` blocks the store's next write transaction until the returned guard is dropped.
async fn group_commit<S, H, F>(s: S, hold: H)
where
    S: Store + Clone,
    H: Fn() -> F,
    F: std::future::Future<Output = Box<dyn std::any::Any + Send>>,
{
    let g = s.decision_inputs(&[], None).await.unwrap().generation;
    // Queues a decision from a task of its own, as concurrent requests do.
    let queue = |d: Spend, action: &'static str| {
        let s = s.clone();
        tokio::spawn(async move { s.commit_decision(d, audit(action)).await })
    };
    let spend = move |n: u16| Spend {
        nonce: Some({
            let mut d = [0xee; 32];
            d[..2].copy_from_slice(&n.to_be_bytes());
            d
        }),
        expires_at: 50,
        generation: g,
        issued: Vec::new(),
    };
    let (groups_before, sum_before) = groups(&s);
    let guard = hold().await;
    let tasks: Vec<_> = (0..20).map(|n| queue(spend(n), "attest")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(guard);
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Committed::Done);
    }
    let (groups_after, sum_after) = groups(&s);
    assert_eq!(sum_after - sum_before, 20);
    assert!(
        groups_after - groups_before <= 2,
        "20 decisions queued behind one blocked group commit in {} groups",
        groups_after - groups_before
    );

    // Many expired nonces: purged in several small transactions, every one of them.
    let tasks: Vec<_> = (20..1220).map(|n| queue(spend(n), "attest")).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Committed::Done);
    }
    let (groups_now, _) = groups(&s);
    assert!(
        groups_now - groups_after < 1200,
        "1200 decisions, one group each"
    );
    assert_eq!(s.purge_nonces(51).await.unwrap(), 1220);
    assert_eq!(s.purge_nonces(51).await.unwrap(), 0);

    // One group of mixed outcomes: a nonce twice (one spends it, the other is a replay), a
    // decision on another generation (stale), a fresh one; only the two done are audited.
    let audited = count(&s, "attest.group").await;
    let guard = hold().await;
    let mixed = [
        spend(5000),
        spend(5000),
        Spend {
            generation: g ^ 1,
            ..spend(5001)
        },
        spend(5002),
    ];
    let tasks: Vec<_> = mixed
        .into_iter()
        .map(|d| queue(d, "attest.group"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(guard);
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    assert_eq!(outcomes[2], Committed::Stale);
    assert_eq!(outcomes[3], Committed::Done);
    let mut twice = [outcomes[0], outcomes[1]];
    twice.sort_by_key(|c| *c == Committed::Replay);
    assert_eq!(twice, [Committed::Done, Committed::Replay]);
    assert_eq!(count(&s, "attest.group").await, audited + 2);

    // A group that fails (two decisions issued the same serial) writes nothing of anyone in
    // it: both are refused, and the nonces stay unspent. The first decision queued while the
    // database is held commits on its own (it is the writer's when the others queue).
    let serial = |n: u16| broker::store::IssuedRecord {
        serial: "0dd1".into(),
        ca_version: 1,
        profile: "web".into(),
        subject: format!("w{n}.internal"),
        names: vec![format!("dns:w{n}.internal")],
        claims_digest: "cd".repeat(32),
        claims: serde_json::json!({}),
        not_before: 10,
        not_after: 20,
        issued_at: 11,
        certificate: vec![0x30, 0x00],
        revoked_at: None,
        revocation_reason: None,
    };
    let issuing = move |n: u16| Spend {
        issued: vec![serial(n)],
        ..spend(n)
    };
    let audited = count(&s, "attest.group").await;
    let guard = hold().await;
    let first = queue(spend(6000), "attest.group");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let clashing: Vec<_> = [6001, 6002]
        .into_iter()
        .map(|n| queue(issuing(n), "attest.group"))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(guard);
    assert_eq!(first.await.unwrap().unwrap(), Committed::Done);
    for t in clashing {
        let refused = t.await.unwrap();
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
    }
    assert_eq!(count(&s, "attest.group").await, audited + 1);
    assert!(
        s.issued_certificates(100)
            .await
            .unwrap()
            .iter()
            .all(|c| c.serial != "0dd1")
    );
    // Unspent: decided again alone, it commits.
    assert_eq!(
        s.commit_decision(issuing(6001), audit("attest.group"))
            .await
            .unwrap(),
        Committed::Done
    );
}

/// A connection to `url` that has run `sql` (which takes a lock) and holds it while alive.
async fn holding<C>(url: String, sql: &'static str) -> Box<dyn std::any::Any + Send>
where
    C: sqlx::Connection + 'static,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
{
    let mut c = C::connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    Box::new(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let s = SqliteStore::open(&path).await.unwrap();
    let url = format!("sqlite://{}", path.display());
    // Another connection holds SQLite's write lock.
    group_commit(s, || {
        holding::<sqlx::SqliteConnection>(url.clone(), "BEGIN IMMEDIATE")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_commit() {
    let mut pg = PgServer::start();
    let url = pg.create_database("group");
    let s = PgStore::open(&pg_settings(url.clone())).await.unwrap();
    // Another session holds the generation row, as a write to secrets would.
    group_commit(s, || {
        holding::<sqlx::PgConnection>(
            url.clone(),
            "BEGIN; SELECT value FROM generation WHERE id = 1 FOR UPDATE",
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_engine() {
    let mut pg = PgServer::start();
    let url = pg.create_database("conformance");
    let s = PgStore::open(&pg_settings(url)).await.unwrap();
    conformance(s).await;

    // Replicas starting together migrate once.
    let url = pg.create_database("together");
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let settings = pg_settings(url.clone());
            tokio::spawn(async move { PgStore::open(&settings).await })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
    // A schema newer than this broker: a one-line refusal.
    let s = PgStore::open(&pg_settings(url.clone())).await.unwrap();
    drop(s);
    {
        use sqlx_helper::exec;
        exec(&url, "INSERT INTO schema_version (version) VALUES (99)").await;
        let versions = sqlx_helper::count(&url, "SELECT COUNT(*) FROM schema_version").await;
        assert_eq!(
            versions, 8,
            "seven migrations, each applied once, and the planted 99"
        );
    }
    let e = PgStore::open(&pg_settings(url)).await.unwrap_err();
    assert!(e.to_string().contains("newer than this broker"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

/// Raw SQL against a test database.
mod sqlx_helper {
    use sqlx::Connection;

    pub async fn exec(url: &str, sql: &str) {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    }

    pub async fn scalar_bool(url: &str, sql: &str) -> bool {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    }

    pub async fn count(url: &str, sql: &str) -> i64 {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
    }
}

/// Two brokers on one PostgreSQL that miss the KDS cache at the same moment ask AMD once: the
/// lookup is locked across replicas, and the one that waited finds the certificate cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kds_lookups_are_single_flight_across_replicas() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let app = {
        let hits = hits.clone();
        axum::Router::new().route(
            "/vcek/v1/Genoa/{hwid}",
            axum::routing::get(move || {
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    b"vcek-der".to_vec()
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut pg = PgServer::start();
    let url = pg.create_database("kds");
    let settings = broker::config::KdsSettings {
        base_url: base,
        offline: false,
    };
    let tcb = attestation::sim::ReportFields::new(attestation::Product::Genoa).tcb;
    let mut lookups = Vec::new();
    for _replica in 0..2 {
        let store = Arc::new(PgStore::open(&pg_settings(url.clone())).await.unwrap());
        let kds = broker::kds::Kds::new(&settings).unwrap();
        for _ in 0..3 {
            let (store, kds) = (store.clone(), kds.clone());
            lookups.push(tokio::spawn(async move {
                kds.vcek(&*store, attestation::Product::Genoa, &[0xab; 64], &tcb)
                    .await
                    .unwrap()
            }));
        }
    }
    for l in lookups {
        assert_eq!(l.await.unwrap(), b"vcek-der");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "six lookups on two replicas, one request"
    );
}

/// TLS to the database (rustls): `sslmode=verify-full` with the CA in `store.ca_file`
/// connects; without the CA, or to a name the certificate does not carry, it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut pg = PgServer::start_tls(&cert.pem(), &key.serialize_pem());
    pg.create_database("tls");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let url = |host: &str| format!("postgres://kb@{host}:{}/tls?sslmode=verify-full", pg.port);
    let mut settings = pg_settings(url("localhost"));
    settings.ca_file = Some(ca_file.clone());
    let s = PgStore::open(&settings).await.unwrap();
    s.ping().await.unwrap();
    // The connection is TLS indeed.
    let ssl: bool = sqlx_helper::scalar_bool(
        &format!("{}&sslrootcert={}", url("localhost"), ca_file.display()),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await;
    assert!(ssl);
    // Not without the CA (the server's certificate is not from a public root) ...
    let mut no_ca = pg_settings(url("localhost"));
    no_ca.connect_timeout = Duration::from_secs(2);
    assert!(PgStore::open(&no_ca).await.is_err());
    // ... nor to a name its certificate does not carry.
    let mut wrong_name = pg_settings(url("127.0.0.1"));
    wrong_name.ca_file = Some(ca_file);
    wrong_name.connect_timeout = Duration::from_secs(2);
    assert!(PgStore::open(&wrong_name).await.is_err());
}
