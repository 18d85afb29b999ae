//! The KDS client against a real HTTP server on 127.0.0.1 serving simulator-made
//! certificates: fetch, cache, backoff on 429/5xx, 404, offline mode.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use attestation::sim::{ReportFields, SimulatedAmd};
use attestation::{Product, SigningKeyKind};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use broker::config::KdsSettings;
use broker::kds::{Kds, KdsError};
use broker::store::SqliteStore;

struct Amd {
    sim: SimulatedAmd,
    vcek: Vec<u8>,
    hwid: String,
    query: String,
    hits: AtomicUsize,
    /// Answer this many requests with 429 (then 200).
    throttle: AtomicUsize,
}

async fn vcek(
    State(amd): State<Arc<Amd>>,
    Path((product, hwid)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    amd.hits.fetch_add(1, Ordering::SeqCst);
    if hwid == "cafe" {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if amd
        .throttle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")]).into_response();
    }
    if product == "Genoa" && hwid == amd.hwid && query.as_deref() == Some(amd.query.as_str()) {
        amd.vcek.clone().into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn chain(State(amd): State<Arc<Amd>>) -> String {
    amd.sim.cert_chain_pem(SigningKeyKind::Vcek)
}

async fn crl(State(amd): State<Arc<Amd>>) -> Vec<u8> {
    let now = SystemTime::now();
    amd.sim
        .crl(
            &[],
            now - Duration::from_secs(60),
            now + Duration::from_secs(86400),
        )
        .unwrap()
}

#[tokio::test]
async fn fetch_cache_backoff_and_offline() {
    let sim = SimulatedAmd::generate(Product::Genoa, SystemTime::now()).unwrap();
    let fields = ReportFields::new(Product::Genoa);
    let key = sim
        .issue_vcek(&fields.chip_id, fields.tcb, SystemTime::now())
        .unwrap();
    let t = fields.tcb;
    let amd = Arc::new(Amd {
        vcek: key.cert_der().to_vec(),
        hwid: hex::encode(fields.chip_id),
        query: format!(
            "blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
            t.bootloader, t.tee, t.snp, t.microcode
        ),
        sim,
        hits: AtomicUsize::new(0),
        throttle: AtomicUsize::new(1),
    });
    let app = axum::Router::new()
        .route("/vcek/v1/{product}/{hwid}", get(vcek))
        .route("/vcek/v1/Genoa/cert_chain", get(chain))
        .route("/vcek/v1/Genoa/crl", get(crl))
        .with_state(amd.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("kds.db")).await.unwrap();
    let settings = KdsSettings {
        base_url: base.clone(),
        offline: false,
    };
    let mut kds = Kds::new(&settings).unwrap();
    kds.backoff = Duration::from_millis(5);

    // First request throttled (429), the retry succeeds.
    let der = kds
        .vcek(&store, Product::Genoa, &fields.chip_id, &fields.tcb)
        .await
        .unwrap();
    assert_eq!(der, amd.vcek);
    assert_eq!(amd.hits.load(Ordering::SeqCst), 2);
    // Cached: no new request.
    kds.vcek(&store, Product::Genoa, &fields.chip_id, &fields.tcb)
        .await
        .unwrap();
    assert_eq!(amd.hits.load(Ordering::SeqCst), 2);

    // 404 is final, not retried.
    let mut other_tcb = fields.tcb;
    other_tcb.snp += 1;
    let e = kds
        .vcek(&store, Product::Genoa, &fields.chip_id, &other_tcb)
        .await
        .unwrap_err();
    assert!(matches!(e, KdsError::NotFound(_)), "{e}");
    assert_eq!(amd.hits.load(Ordering::SeqCst), 3);
    // ...and remembered: asking again for a made-up chip or TCB does not reach AMD.
    let e = kds
        .vcek(&store, Product::Genoa, &fields.chip_id, &other_tcb)
        .await
        .unwrap_err();
    assert!(matches!(e, KdsError::NotFound(_)), "{e}");
    assert_eq!(amd.hits.load(Ordering::SeqCst), 3);

    // 5xx is retried, then reported unavailable, and not retried for a while.
    let e = kds
        .vcek(&store, Product::Genoa, &[0xca, 0xfe], &fields.tcb)
        .await
        .unwrap_err();
    assert!(matches!(e, KdsError::Unavailable(_)), "{e}");
    assert_eq!(amd.hits.load(Ordering::SeqCst), 3 + 4);
    let e = kds
        .vcek(&store, Product::Genoa, &[0xca, 0xfe], &fields.tcb)
        .await
        .unwrap_err();
    assert!(matches!(e, KdsError::Unavailable(_)), "{e}");
    assert_eq!(amd.hits.load(Ordering::SeqCst), 3 + 4, "remembered failure");
    // Once the memory expires, the KDS is asked again.
    let mut short = Kds::new(&settings).unwrap();
    short.backoff = Duration::from_millis(5);
    short.not_found_ttl = Duration::from_millis(1);
    short.unavailable_ttl = Duration::from_millis(1);
    short
        .vcek(&store, Product::Genoa, &fields.chip_id, &other_tcb)
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(20)).await;
    short
        .vcek(&store, Product::Genoa, &fields.chip_id, &other_tcb)
        .await
        .unwrap_err();
    assert_eq!(amd.hits.load(Ordering::SeqCst), 3 + 4 + 2);

    // Single flight: many guests of one chip at once cause one request to AMD.
    let mut third_tcb = fields.tcb;
    third_tcb.bootloader += 1;
    // (This KDS serves one VCEK only: the lookup ends in one shared 404.)
    let hits = amd.hits.load(Ordering::SeqCst);
    let store = Arc::new(store);
    let lookups: Vec<_> = (0..8)
        .map(|_| {
            let kds = kds.clone();
            let store = store.clone();
            let chip = fields.chip_id;
            tokio::spawn(async move { kds.vcek(&*store, Product::Genoa, &chip, &third_tcb).await })
        })
        .collect();
    for l in lookups {
        assert!(matches!(l.await.unwrap(), Err(KdsError::NotFound(_))));
    }
    assert_eq!(
        amd.hits.load(Ordering::SeqCst),
        hits + 1,
        "one request for 8 lookups"
    );
    let store = Arc::try_unwrap(store).unwrap();

    // Chain and CRL parse as what the simulator issued.
    let pem = kds
        .cert_chain(&store, Product::Genoa, SigningKeyKind::Vcek)
        .await
        .unwrap();
    let ders = attestation::certs::decode_pem_or_der(&pem, "chain").unwrap();
    assert_eq!(ders[0], amd.sim.ask_der());
    let crl = kds
        .crl(&store, Product::Genoa, SigningKeyKind::Vcek)
        .await
        .unwrap();
    assert!(!crl.is_empty());

    // Offline: the cache answers; anything else is refused without a request.
    let offline = Kds::new(&KdsSettings {
        base_url: base,
        offline: true,
    })
    .unwrap();
    let hits = amd.hits.load(Ordering::SeqCst);
    assert_eq!(
        offline
            .vcek(&store, Product::Genoa, &fields.chip_id, &fields.tcb)
            .await
            .unwrap(),
        amd.vcek
    );
    assert!(matches!(
        offline
            .vcek(&store, Product::Genoa, &fields.chip_id, &other_tcb)
            .await,
        Err(KdsError::Offline(_))
    ));
    assert_eq!(amd.hits.load(Ordering::SeqCst), hits);
}
