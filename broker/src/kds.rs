//! AMD Key Distribution Service client: VCEKs, `cert_chain` and CRLs by product, hwID and
//! TCB, cached in the store, with backoff on 429 and 5xx, and an offline mode that uses only
//! the cache.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestation::report::Tcb;
use attestation::{Product, SigningKeyKind};

use crate::config::KdsSettings;
use crate::store::sql::now as now_i64;
use crate::store::{Store, StoreError};

/// How long a cached CRL is used before it is fetched again.
pub const CRL_REFRESH: Duration = Duration::from_secs(12 * 3600);
const ATTEMPTS: u32 = 4;
const MAX_BACKOFF: Duration = Duration::from_secs(8);
const MAX_BODY: usize = 256 * 1024;

/// Why a KDS lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KdsError {
    /// Offline mode and nothing cached.
    #[error("{0} is not cached and the KDS client is offline")]
    Offline(String),
    /// The KDS has no such certificate (404).
    #[error("the KDS has no {0}")]
    NotFound(String),
    /// Every lookup slot stayed taken (other lookups in flight); not remembered as a failure.
    #[error("too many KDS lookups in flight")]
    Busy,
    /// The KDS could not be reached or kept failing.
    #[error("KDS unavailable: {0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a 404 is remembered: a chip ID and TCB the KDS does not know is not asked again.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(3600);
/// How long a lookup that kept failing (429, 5xx, unreachable) is not retried.
pub const UNAVAILABLE_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_ENTRIES: usize = 10_000;

/// Lookups that failed recently, by path: answered from memory until they expire.
#[derive(Debug, Default)]
struct Negative {
    entries: std::collections::HashMap<String, (tokio::time::Instant, bool)>,
}

/// One caller's part in a path's single flight; the path's entry goes when its last caller
/// does, however it ends (a cancelled request included).
struct Flight {
    flights: Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    path: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.flights.lock()
            // The map's reference and this one: no other caller waits on the path.
            && Arc::strong_count(&self.lock) <= 2
        {
            flights.remove(&self.path);
        }
    }
}

/// A KDS client.
#[derive(Debug, Clone)]
pub struct Kds {
    base: String,
    offline: bool,
    http: reqwest::Client,
    /// Network fetches at once: guests without certificates drive them, so they are bounded.
    slots: Arc<tokio::sync::Semaphore>,
    /// One fetch per path at a time; the others wait for it and read the cache.
    flights: Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    negative: Arc<Mutex<Negative>>,
    /// First backoff delay (doubled per retry).
    pub backoff: Duration,
    /// How long a 404 is remembered.
    pub not_found_ttl: Duration,
    /// How long a lookup that kept failing is not retried.
    pub unavailable_ttl: Duration,
}

impl Kds {
    /// Paths with a lookup in flight or waiting (for tests: cancelled lookups leave none).
    pub fn flights_in_progress(&self) -> usize {
        self.flights.lock().map(|f| f.len()).unwrap_or(0)
    }
}

fn kind_path(kind: SigningKeyKind) -> &'static str {
    match kind {
        SigningKeyKind::Vcek => "vcek",
        SigningKeyKind::Vlek => "vlek",
    }
}

impl Kds {
    /// A client for `settings`. TLS to AMD uses the Mozilla root set (webpki-roots).
    pub fn new(settings: &KdsSettings) -> Result<Kds, crate::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("snp-key-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| crate::Error::Config(format!("KDS client: {e}")))?;
        Ok(Kds {
            base: settings.base_url.clone(),
            offline: settings.offline,
            http,
            slots: Arc::new(tokio::sync::Semaphore::new(4)),
            flights: Arc::new(Mutex::new(std::collections::HashMap::new())),
            negative: Arc::new(Mutex::new(Negative::default())),
            backoff: Duration::from_millis(500),
            not_found_ttl: NOT_FOUND_TTL,
            unavailable_ttl: UNAVAILABLE_TTL,
        })
    }

    /// The VCEK of chip `hwid` at `tcb` (DER).
    pub async fn vcek(
        &self,
        store: &impl Store,
        product: Product,
        hwid: &[u8],
        tcb: &Tcb,
    ) -> Result<Vec<u8>, KdsError> {
        let mut query = format!(
            "blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}",
            tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
        );
        if let Some(fmc) = tcb.fmc {
            query.push_str(&format!("&fmcSPL={fmc}"));
        }
        let path = format!("/vcek/v1/{}/{}?{query}", product.name(), hex::encode(hwid));
        self.cached(store, &path, None).await
    }

    /// AMD's `cert_chain` for VCEKs (ASK, ARK) or VLEKs (ASVK, ARK), PEM.
    pub async fn cert_chain(
        &self,
        store: &impl Store,
        product: Product,
        kind: SigningKeyKind,
    ) -> Result<Vec<u8>, KdsError> {
        let path = format!("/{}/v1/{}/cert_chain", kind_path(kind), product.name());
        self.cached(store, &path, None).await
    }

    /// The ARK-signed CRL for VCEKs or VLEKs (DER). Refetched every [`CRL_REFRESH`]; a failed
    /// refresh falls back to the cached copy (the verifier refuses it once stale).
    pub async fn crl(
        &self,
        store: &impl Store,
        product: Product,
        kind: SigningKeyKind,
    ) -> Result<Vec<u8>, KdsError> {
        let path = format!("/{}/v1/{}/crl", kind_path(kind), product.name());
        self.cached(store, &path, Some(CRL_REFRESH)).await
    }

    async fn cached(
        &self,
        store: &impl Store,
        path: &str,
        refresh: Option<Duration>,
    ) -> Result<Vec<u8>, KdsError> {
        let key = format!("kds:{path}");
        let cached = store.cache_get(&key).await?;
        if let Some((bytes, fetched_at)) = &cached {
            let fresh = match refresh {
                None => true,
                Some(r) => now_i64() - fetched_at < i64::try_from(r.as_secs()).unwrap_or(i64::MAX),
            };
            if fresh || self.offline {
                return Ok(bytes.clone());
            }
        }
        if self.offline {
            return Err(KdsError::Offline(path.to_string()));
        }
        // Single flight: whoever holds the path's lock fetches; the others find its result.
        let flight = self.flight(path);
        let _turn = flight.lock.lock().await;
        // One of the few lookup slots before anything else: a slot bounds the store
        // connections lookups hold (the cross-replica lock holds one while the fetch runs).
        let _slot = match tokio::time::timeout(Duration::from_secs(5), self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => return Err(KdsError::Busy),
        };
        // And across replicas: one broker on the store fetches, the others wait for the
        // cache (AMD's KDS answers bursts with 429).
        let _shared = store.lock_fetch(&key).await?;
        self.fetch_once(store, &key, path, cached).await
    }

    fn flight(&self, path: &str) -> Flight {
        let lock = match self.flights.lock() {
            Ok(mut flights) => flights.entry(path.to_string()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        };
        Flight {
            flights: self.flights.clone(),
            path: path.to_string(),
            lock,
        }
    }

    fn remembered_failure(&self, path: &str) -> Option<KdsError> {
        let mut n = self.negative.lock().ok()?;
        let (until, not_found) = *n.entries.get(path)?;
        if until <= tokio::time::Instant::now() {
            n.entries.remove(path);
            return None;
        }
        Some(if not_found {
            KdsError::NotFound(path.to_string())
        } else {
            KdsError::Unavailable(format!(
                "{path}: failed recently; not retried before {}s",
                self.unavailable_ttl.as_secs()
            ))
        })
    }

    fn remember_failure(&self, path: &str, not_found: bool) {
        if let Ok(mut n) = self.negative.lock() {
            let now = tokio::time::Instant::now();
            if n.entries.len() >= NEGATIVE_ENTRIES {
                n.entries.retain(|_, (until, _)| *until > now);
                if n.entries.len() >= NEGATIVE_ENTRIES {
                    n.entries.clear();
                }
            }
            let ttl = if not_found {
                self.not_found_ttl
            } else {
                self.unavailable_ttl
            };
            n.entries.insert(path.to_string(), (now + ttl, not_found));
        }
    }

    async fn fetch_once(
        &self,
        store: &impl Store,
        key: &str,
        path: &str,
        cached: Option<(Vec<u8>, i64)>,
    ) -> Result<Vec<u8>, KdsError> {
        // Another flight may have filled the cache while this one waited.
        if let Some((bytes, fetched_at)) = store.cache_get(key).await?
            && cached.as_ref().is_none_or(|(_, t)| fetched_at > *t)
        {
            return Ok(bytes);
        }
        if let Some(e) = self.remembered_failure(path) {
            return match (e, cached) {
                (KdsError::Unavailable(_), Some((bytes, _))) => Ok(bytes),
                (e, _) => Err(e),
            };
        }
        match self.fetch(path).await {
            Ok(bytes) => {
                store.cache_put(key, &bytes, now_i64()).await?;
                Ok(bytes)
            }
            Err(e @ KdsError::Unavailable(_)) => {
                self.remember_failure(path, false);
                match cached {
                    Some((bytes, _)) => {
                        tracing::warn!(error = %e, path, "KDS refresh failed; using the cached copy");
                        Ok(bytes)
                    }
                    None => Err(e),
                }
            }
            Err(e @ KdsError::NotFound(_)) => {
                self.remember_failure(path, true);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn fetch(&self, path: &str) -> Result<Vec<u8>, KdsError> {
        // The caller holds a lookup slot.
        let url = format!("{}{path}", self.base);
        let mut delay = self.backoff;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.http.get(&url).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        let bytes = resp
                            .bytes()
                            .await
                            .map_err(|e| KdsError::Unavailable(format!("{url}: {e}")))?;
                        if bytes.len() > MAX_BODY {
                            return Err(KdsError::Unavailable(format!(
                                "{url}: response too large"
                            )));
                        }
                        return Ok(bytes.to_vec());
                    }
                    if status == reqwest::StatusCode::NOT_FOUND {
                        return Err(KdsError::NotFound(path.to_string()));
                    }
                    if !(status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error())
                    {
                        return Err(KdsError::Unavailable(format!("{url}: HTTP {status}")));
                    }
                    // Honour Retry-After (seconds), within bounds.
                    if let Some(secs) = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        delay = Duration::from_secs(secs).min(MAX_BACKOFF);
                    }
                    last = format!("HTTP {status}");
                }
                Err(e) => last = e.to_string(),
            }
            if attempt < ATTEMPTS {
                tracing::info!(%url, attempt, reason = %last, "KDS request failed; backing off");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
        Err(KdsError::Unavailable(format!(
            "{url}: {last} after {ATTEMPTS} attempts"
        )))
    }
}
