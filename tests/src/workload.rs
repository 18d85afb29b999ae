//! A workload for crash tests, and the invariants they check afterwards: guests attesting
//! against any replica, an operator writing secrets, each recording what it was told; then the
//! audit log, read through the admin API, must account for every acknowledged answer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use attestation::protocol::{ChallengeResponse, EphemeralKey, Kem};
use aws_lc_rs::digest;
use base64::Engine;

use crate::Guest;

/// What the clients were told.
#[derive(Debug, Default)]
pub struct Observed {
    /// SHA-256 (hex) of every nonce a guest got a 200 for.
    pub released: Vec<String>,
    /// Attestations answered otherwise, by status (0: no answer).
    pub other: BTreeMap<u16, usize>,
    /// (secret, version) of every admin write answered 201.
    pub written: Vec<(String, u64)>,
}

/// The SHA-256 (hex) of a nonce as the broker records it.
pub fn nonce_sha256(nonce: &str) -> String {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(nonce)
        .unwrap_or_default();
    hex::encode(digest::digest(&digest::SHA256, &bytes))
}

/// A small deterministic generator for picking replicas.
struct Pick(u64);

impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).unwrap_or(0)
    }
}

/// Runs `guests` guest loops and one operator loop against `bases` (replica base URLs)
/// until `stop` is set or each has made `max` attempts.
pub async fn run(
    bases: Vec<String>,
    guest_client: reqwest::Client,
    operator_client: reqwest::Client,
    guest: Arc<Guest>,
    guests: usize,
    max: usize,
    stop: Arc<AtomicBool>,
) -> Observed {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let mut tasks = Vec::new();
    for g in 0..guests {
        let (bases, client, guest, stop, observed) = (
            bases.clone(),
            guest_client.clone(),
            guest.clone(),
            stop.clone(),
            observed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut pick = Pick(0x9e37_79b9_7f4a_7c15 ^ (g as u64 + 1));
            let key = EphemeralKey::generate(Kem::X25519);
            for _ in 0..max {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let challenge = async {
                    let r = client
                        .post(format!("{}/v1/challenge", bases[pick.next(bases.len())]))
                        .send()
                        .await
                        .ok()?;
                    r.json::<ChallengeResponse>().await.ok()
                };
                let Some(c) = challenge.await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let request = guest.request(&c.nonce, &key, &["db-key"], None);
                let status = match client
                    .post(format!("{}/v1/attest", bases[pick.next(bases.len())]))
                    .json(&request)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        // A 200 counts only once its body (the sealed secrets) arrived.
                        if status == 200 && r.bytes().await.is_err() {
                            0
                        } else {
                            status
                        }
                    }
                    Err(_) => 0,
                };
                {
                    let mut o = observed.lock().unwrap();
                    if status == 200 {
                        o.released.push(nonce_sha256(&c.nonce));
                    } else {
                        *o.other.entry(status).or_default() += 1;
                    }
                }
                // Paced, so the load lasts through the faults the tests inject.
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
            }
        }));
    }
    {
        let (bases, client, stop, observed) = (
            bases.clone(),
            operator_client,
            stop.clone(),
            observed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut pick = Pick(0x2545_f491_4f6c_dd1d);
            for i in 0..max / 2 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(80)).await;
                let name = format!("written-{}", i % 5);
                let r = client
                    .post(format!(
                        "{}/v1/admin/secrets/{name}/generate",
                        bases[pick.next(bases.len())]
                    ))
                    .json(&serde_json::json!({ "bytes": 16 }))
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 201
                    && let Ok(v) = r.json::<serde_json::Value>().await
                {
                    let version = v["version"].as_u64().unwrap_or(0);
                    observed.lock().unwrap().written.push((name, version));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(observed)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// Checks the audit log (every record, through the admin API of `base`) against what the
/// clients were told:
/// - every nonce a guest got a 200 for has exactly one `released` record;
/// - no nonce has two `released` records (nothing released twice);
/// - every admin write answered 201 has its `secret.put` record, and each secret's current
///   version is the newest version its records name (nothing half there).
pub async fn check_invariants(base: &str, operator: &reqwest::Client, observed: &Observed) {
    let records = all_records(base, operator).await;
    let mut releases: HashMap<String, usize> = HashMap::new();
    let mut puts: HashMap<String, u64> = HashMap::new();
    let mut put_set: HashSet<(String, u64)> = HashSet::new();
    for r in &records {
        match (r["action"].as_str(), r["outcome"].as_str()) {
            (Some("attest"), Some("released")) => {
                let nonce = r["detail"]["nonce_sha256"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                *releases.entry(nonce).or_default() += 1;
            }
            (Some("secret.put"), _) => {
                let name = r["detail"]["name"].as_str().unwrap_or("").to_string();
                let version = r["detail"]["version"].as_u64().unwrap_or(0);
                let newest = puts.entry(name.clone()).or_default();
                *newest = (*newest).max(version);
                put_set.insert((name, version));
            }
            _ => {}
        }
    }
    for (nonce, n) in &releases {
        assert_eq!(*n, 1, "nonce {nonce} released {n} times");
    }
    for nonce in &observed.released {
        assert_eq!(
            releases.get(nonce),
            Some(&1),
            "a 200 the guest received has no audit record (nonce {nonce})"
        );
    }
    for w in &observed.written {
        assert!(
            put_set.contains(w),
            "acknowledged write {w:?} has no audit record"
        );
    }
    let list = get_json(operator, &format!("{base}/v1/admin/secrets")).await;
    for s in list["secrets"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let newest = puts
            .get(name)
            .unwrap_or_else(|| panic!("{name} exists without any secret.put record"));
        assert_eq!(
            s["version"].as_u64(),
            Some(*newest),
            "{name}: current version without its audit record, or the reverse"
        );
    }
}

/// A GET through the admin API, as JSON.
async fn get_json(operator: &reqwest::Client, url: &str) -> serde_json::Value {
    operator
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Every audit record, page by page through the admin API (newest first, 1000 a page).
async fn all_records(base: &str, operator: &reqwest::Client) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut before = String::new();
    loop {
        let page = get_json(
            operator,
            &format!("{base}/v1/admin/audit?limit=1000{before}"),
        )
        .await;
        out.extend(page["records"].as_array().cloned().unwrap_or_default());
        match page["next_before_id"].as_i64() {
            Some(id) => before = format!("&before_id={id}"),
            None => return out,
        }
    }
}
