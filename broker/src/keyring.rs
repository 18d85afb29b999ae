//! Data-key versions: what seals records and KBS session cookies and authenticates challenge
//! nonces, and their
//! online rotation.
//!
//! Version 1 is the master key itself (what every store written before rotation existed is
//! sealed under). `broker keys rotate` makes version *n + 1*: 32 random bytes, stored only
//! wrapped by the master key (AES-256-GCM under a key derived from it, the version as
//! associated data), then re-encrypts every sealed record (secret versions, the broker's own
//! keys) in small transactions, each a compare-and-set on the record's key version, and
//! finally retires the older versions once no record is sealed under one. Killed half-way,
//! the next run resumes: the records still under an old version say what is left.
//!
//! Every replica holds a [`Keyring`]: all versions, the newest current. New records are sealed
//! under the current version; the store refuses one sealed under an older version than its
//! newest, so a replica that has not yet seen a rotation reloads and seals again. A record or
//! nonce under a version a replica does not know makes it reload (at most every
//! [`RELOAD_PROMPT_INTERVAL`]), and every replica reloads every [`REFRESH_INTERVAL`]. A
//! superseded version's nonce key is accepted for one nonce lifetime (plus the refresh
//! interval, for replicas that had not reloaded yet) after its successor was made, and its
//! KBS session key for the longest a session lives (plus that interval).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::aead::LessSafeKey;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::Error;
use crate::keys::{MasterKey, RecordCipher};
use crate::store::{AuditRecord, DataKeyRecord, Store, StoreError};

/// How often every replica reloads the data keys.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// The least time between reloads prompted by an unknown version.
pub const RELOAD_PROMPT_INTERVAL: Duration = Duration::from_secs(2);
/// Records re-encrypted per transaction by default.
pub const DEFAULT_BATCH: u32 = 200;

/// What a data-key version derives.
struct Version {
    records: RecordCipher,
    nonces: aws_lc_rs::hmac::Key,
    /// Seals KBS session cookies (`crate::kbs::session`).
    sessions: Arc<LessSafeKey>,
    /// When its successor was made, if it has one.
    superseded_at: Option<i64>,
}

struct Ring {
    versions: BTreeMap<u64, Version>,
    current: u64,
}

/// The data keys of one broker.
pub struct Keyring {
    master: MasterKey,
    /// How long a superseded version's nonces stay acceptable.
    nonce_grace: Duration,
    ring: RwLock<Ring>,
    last_prompted: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

/// A record sealed under the current data key.
pub struct Sealed {
    /// `nonce || ciphertext || tag`.
    pub bytes: Vec<u8>,
    /// The data-key version.
    pub key_version: u64,
}

/// The key that wraps data keys, derived from the master key.
fn wrapping(master: &MasterKey) -> Result<RecordCipher, Error> {
    master.cipher_for(b"data keys")
}

const WRAP_NAME: &str = "data-key";

impl Keyring {
    /// A keyring with version 1 only (a store with no data keys yet, and tests).
    pub fn new(master: MasterKey, nonce_ttl: Duration) -> Result<Keyring, Error> {
        let ring = Ring {
            versions: BTreeMap::from([(1, derive(&master, None)?)]),
            current: 1,
        };
        Ok(Keyring {
            master,
            nonce_grace: nonce_ttl + REFRESH_INTERVAL,
            ring: RwLock::new(ring),
            last_prompted: Mutex::new(None),
        })
    }

    /// The keyring of a store: every data-key version it holds, unwrapped.
    pub async fn load<S: Store>(
        master: MasterKey,
        store: &S,
        nonce_ttl: Duration,
    ) -> Result<Keyring, Error> {
        let keyring = Keyring::new(master, nonce_ttl)?;
        keyring.refresh(store).await?;
        Ok(keyring)
    }

    /// Reloads the data keys from the store.
    pub async fn refresh<S: Store>(&self, store: &S) -> Result<(), Error> {
        let records = store.data_keys().await?;
        self.install(&records)
    }

    /// Reloads because a record or nonce named a version this replica does not know (or did
    /// not verify), at most every [`RELOAD_PROMPT_INTERVAL`]. Whether it reloaded.
    pub async fn refresh_prompted<S: Store>(&self, store: &S) -> Result<bool, Error> {
        {
            let mut last = self
                .last_prompted
                .lock()
                .map_err(|_| Error::Crypto("keyring lock poisoned".into()))?;
            if last.is_some_and(|t| t.elapsed() < RELOAD_PROMPT_INTERVAL) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        self.refresh(store).await?;
        Ok(true)
    }

    fn install(&self, records: &[DataKeyRecord]) -> Result<(), Error> {
        let wrap = wrapping(&self.master)?;
        let mut versions = BTreeMap::new();
        // Version 1 is the master key itself, unless the store moved to another master key
        // (then the old one is a stored row like the others).
        if records.first().is_none_or(|r| r.version != 1) {
            let successor = records.first().map(|r| r.created_at);
            versions.insert(1, derive(&self.master, successor)?);
        }
        for (i, r) in records.iter().enumerate() {
            let key = wrap.open(WRAP_NAME, r.version, &r.wrapped).map_err(|_| {
                Error::Crypto(format!(
                    "data key version {} does not unwrap under this master key",
                    r.version
                ))
            })?;
            let dek = MasterKey::from_bytes(&key)?;
            let successor = records.get(i + 1).map(|n| n.created_at);
            versions.insert(r.version, derive(&dek, successor)?);
        }
        let current = versions.keys().next_back().copied().unwrap_or(1);
        let mut ring = self
            .ring
            .write()
            .map_err(|_| Error::Crypto("keyring lock poisoned".into()))?;
        *ring = Ring { versions, current };
        Ok(())
    }

    /// The current version.
    pub fn current(&self) -> u64 {
        self.ring.read().map(|r| r.current).unwrap_or(0)
    }

    /// Seals a record (`name`, `version`) under the current data key.
    pub fn seal(&self, name: &str, version: u64, plaintext: &[u8]) -> Result<Sealed, Error> {
        self.of_current(|key_version, v| {
            Ok(Sealed {
                bytes: v.records.seal(name, version, plaintext)?,
                key_version,
            })
        })?
    }

    /// Opens a record sealed under `key_version`, if this keyring has that version.
    pub fn open(
        &self,
        key_version: u64,
        name: &str,
        version: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let ring = self
            .ring
            .read()
            .map_err(|_| Error::Crypto("keyring lock poisoned".into()))?;
        let v = ring.versions.get(&key_version).ok_or_else(|| {
            Error::Crypto(format!(
                "record {name} v{version} is sealed under data key {key_version}, which this broker does not hold"
            ))
        })?;
        v.records.open(name, version, sealed)
    }

    /// Opens a record, reloading the data keys first when it names a newer version than
    /// this replica holds (another replica or `broker keys rotate` made it).
    pub async fn open_fresh<S: Store>(
        &self,
        store: &S,
        key_version: u64,
        name: &str,
        version: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        if key_version > self.current() {
            self.refresh(store).await?;
        }
        self.open(key_version, name, version, sealed)
    }

    /// The nonce key to mint with.
    pub fn nonce_key(&self) -> Result<aws_lc_rs::hmac::Key, Error> {
        self.of_current(|_, v| v.nonces.clone())
    }

    /// The nonce keys a nonce is checked against at `now`: the current version's, then each
    /// superseded one's for its grace period.
    pub fn nonce_keys(&self, now: u64) -> Vec<aws_lc_rs::hmac::Key> {
        self.in_grace(now, self.nonce_grace, |v| v.nonces.clone())
    }

    /// The key to seal a KBS session cookie with: the current version's.
    pub fn session_key(&self) -> Result<Arc<LessSafeKey>, Error> {
        self.of_current(|_, v| v.sessions.clone())
    }

    /// `take` of the current version (its number and what it derives).
    fn of_current<T>(&self, take: impl FnOnce(u64, &Version) -> T) -> Result<T, Error> {
        let ring = self
            .ring
            .read()
            .map_err(|_| Error::Crypto("keyring lock poisoned".into()))?;
        ring.versions
            .get(&ring.current)
            .map(|v| take(ring.current, v))
            .ok_or_else(|| Error::Crypto("no current data key".into()))
    }

    /// The keys a session cookie is opened with at `now`: the current version's, then each
    /// superseded one's for `grace` (the longest a session lives, plus the refresh interval)
    /// after its successor was made.
    pub fn session_keys(&self, now: u64, grace: Duration) -> Vec<Arc<LessSafeKey>> {
        self.in_grace(now, grace, |v| v.sessions.clone())
    }

    /// `take` of the current version, then of each superseded one still within `grace` of
    /// its successor at `now`; newest first.
    fn in_grace<T>(&self, now: u64, grace: Duration, take: impl Fn(&Version) -> T) -> Vec<T> {
        let Ok(ring) = self.ring.read() else {
            return Vec::new();
        };
        let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        ring.versions
            .values()
            .rev()
            .filter(|v| {
                v.superseded_at
                    .is_none_or(|at| now <= at.saturating_add(grace))
            })
            .map(take)
            .collect()
    }
}

fn derive(key: &MasterKey, superseded_at: Option<i64>) -> Result<Version, Error> {
    Ok(Version {
        records: key.record_cipher()?,
        nonces: key.nonce_key()?,
        sessions: Arc::new(key.kbs_session_key()?),
        superseded_at,
    })
}

/// What `broker keys rotate --from-config` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MasterKeyMove {
    /// The provider that held the store's master key.
    pub from: String,
    /// The provider that holds the new one.
    pub to: String,
    /// Data-key versions re-wrapped under the new master key.
    pub rewrapped: Vec<u64>,
}

/// Moves the store to a new master key (from `to`: a new random key wrapped in a token, or
/// another key file): every data-key version is re-wrapped under it, version 1 (the old
/// master key itself) included as a stored row, in one transaction with the new master key
/// record (audited `master-key.rekey`). Nothing is re-encrypted yet: the old master key
/// still opens what is sealed under the versions it wraps until a rotation
/// ([`rotate`]) moves every record to a new version, which the command does next once every
/// replica runs with the new configuration.
pub async fn move_master_key<S: Store>(
    store: &S,
    old: MasterKey,
    to: &crate::config::MasterKeySource,
    actor: &str,
    now: i64,
) -> Result<MasterKeyMove, Error> {
    let recorded = store.master_key().await?.ok_or_else(|| {
        Error::Config("this store records no master key yet: start a broker on it first".into())
    })?;
    let (new, record) = crate::keys::new_master_key(to, now).await?;
    if aws_lc_rs::constant_time::verify_slices_are_equal(&new.check_value()?, &recorded.check)
        .is_ok()
    {
        return Err(Error::Input(
            "the new configuration's master key is the store's current one: nothing to move".into(),
        ));
    }
    let (old_wrap, new_wrap) = (wrapping(&old)?, wrapping(&new)?);
    let mut rows = store.data_keys().await?;
    if rows.first().is_none_or(|r| r.version != 1) {
        rows.insert(
            0,
            DataKeyRecord {
                version: 1,
                wrapped: old_wrap.seal(WRAP_NAME, 1, old.expose())?,
                created_at: 0,
                retired_at: None,
            },
        );
    }
    let mut rewrapped = Vec::with_capacity(rows.len());
    for row in &mut rows {
        let key = old_wrap
            .open(WRAP_NAME, row.version, &row.wrapped)
            .map_err(|_| {
                Error::Crypto(format!(
                    "data key version {} does not unwrap under the old master key",
                    row.version
                ))
            })?;
        row.wrapped = new_wrap.seal(WRAP_NAME, row.version, &key)?;
        rewrapped.push(row.version);
    }
    let audit = AuditRecord {
        id: 0,
        at: now,
        actor: actor.to_string(),
        action: "master-key.rekey".into(),
        outcome: "ok".into(),
        detail: serde_json::json!({
            "from": recorded.provider,
            "to": record.provider,
            "rewrapped": rewrapped,
        }),
    };
    store.put_master_key(&record, true, &rows, &audit).await?;
    Ok(MasterKeyMove {
        from: recorded.provider,
        to: record.provider,
        rewrapped,
    })
}

/// What `broker keys rotate` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rotation {
    /// The data-key version every record is now sealed under.
    pub version: u64,
    /// Whether it finished a rotation an earlier run began.
    pub resumed: bool,
    /// Records re-encrypted by this run.
    pub resealed: u64,
    /// Older versions retired.
    pub retired: u64,
}

/// Rotates the data key: a new version (or the one an interrupted run made), every sealed
/// record re-encrypted under it in transactions of `batch`, the older versions retired.
/// `progress` is told the records done so far and the total. Audited: `data-key.create`
/// (or `data-key.resume`) and `data-key.retire`.
pub async fn rotate<S: Store>(
    store: &S,
    master: MasterKey,
    actor: &str,
    now: i64,
    batch: u32,
    mut progress: impl FnMut(u64, u64),
) -> Result<Rotation, Error> {
    let keyring = Keyring::load(master, store, Duration::ZERO).await?;
    let current = keyring.current();
    let left = store.records_under_old_keys(current, 1).await?;
    let resumed = !left.is_empty();
    let audit = |action: &str, detail: serde_json::Value| AuditRecord {
        id: 0,
        at: now,
        actor: actor.to_string(),
        action: action.into(),
        outcome: "ok".into(),
        detail,
    };
    if resumed {
        store
            .append_audit(&audit(
                "data-key.resume",
                serde_json::json!({ "version": current }),
            ))
            .await?;
    } else {
        let version = current + 1;
        let mut dek = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut dek[..])
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        let record = DataKeyRecord {
            version,
            wrapped: wrapping(&keyring.master)?.seal(WRAP_NAME, version, &dek[..])?,
            created_at: now,
            retired_at: None,
        };
        match store
            .insert_data_key(
                &record,
                &audit("data-key.create", serde_json::json!({ "version": version })),
            )
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(Error::Input(format!(
                    "another rotation made data key {version} first; run `broker keys rotate` again to finish it"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        keyring.refresh(store).await?;
    }
    let target = keyring.current();
    let total = store.sealed_records().await?;
    let mut resealed = 0u64;
    loop {
        let records = store.records_under_old_keys(target, batch.max(1)).await?;
        if records.is_empty() {
            break;
        }
        let mut batch_out = Vec::with_capacity(records.len());
        for r in records {
            let name = r.sealed_name();
            let plaintext = keyring.open(r.key_version, &name, r.version, &r.sealed)?;
            let sealed = keyring.seal(&name, r.version, &plaintext)?;
            batch_out.push((r, sealed.bytes, sealed.key_version));
        }
        resealed += store.reseal(&batch_out).await?;
        progress(resealed, total);
    }
    let retired = store
        .retire_data_keys(
            target,
            now,
            &audit(
                "data-key.retire",
                serde_json::json!({ "version": target, "resealed": resealed, "resumed": resumed }),
            ),
        )
        .await?;
    Ok(Rotation {
        version: target,
        resumed,
        resealed,
        retired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(master: &MasterKey, version: u64, created_at: i64) -> (DataKeyRecord, MasterKey) {
        let dek = MasterKey::generate().unwrap();
        let wrapped = wrapping(master)
            .unwrap()
            .seal(WRAP_NAME, version, dek.expose())
            .unwrap();
        (
            DataKeyRecord {
                version,
                wrapped,
                created_at,
                retired_at: None,
            },
            dek,
        )
    }

    #[test]
    fn seals_under_the_newest_and_opens_every_version() {
        let master = MasterKey::generate().unwrap();
        let copy = MasterKey::from_bytes(master.expose()).unwrap();
        let ring = Keyring::new(master, Duration::from_secs(60)).unwrap();
        let old = ring.seal("db", 1, b"one").unwrap();
        assert_eq!(old.key_version, 1);
        let (r2, _) = record(&copy, 2, 1_000);
        ring.install(&[r2]).unwrap();
        let new = ring.seal("db", 2, b"two").unwrap();
        assert_eq!(new.key_version, 2);
        assert_eq!(&ring.open(1, "db", 1, &old.bytes).unwrap()[..], b"one");
        assert_eq!(&ring.open(2, "db", 2, &new.bytes).unwrap()[..], b"two");
        // The version is the key: a record opened under another fails.
        assert!(ring.open(1, "db", 2, &new.bytes).is_err());
        assert!(ring.open(3, "db", 2, &new.bytes).is_err());
    }

    #[test]
    fn a_data_key_under_another_master_key_is_refused() {
        let ring = Keyring::new(MasterKey::generate().unwrap(), Duration::from_secs(60)).unwrap();
        let (foreign, _) = record(&MasterKey::generate().unwrap(), 2, 1_000);
        let e = ring.install(&[foreign]).unwrap_err();
        assert!(e.to_string().contains("does not unwrap"), "{e}");
        // A wrapped key moved to another version number does not unwrap either.
        let master = MasterKey::generate().unwrap();
        let copy = MasterKey::from_bytes(master.expose()).unwrap();
        let ring = Keyring::new(master, Duration::from_secs(60)).unwrap();
        let (mut moved, _) = record(&copy, 2, 1_000);
        moved.version = 3;
        assert!(ring.install(&[moved]).is_err());
    }

    #[test]
    fn a_superseded_nonce_key_is_accepted_for_its_grace_only() {
        let master = MasterKey::generate().unwrap();
        let copy = MasterKey::from_bytes(master.expose()).unwrap();
        let ring = Keyring::new(master, Duration::from_secs(60)).unwrap();
        let old = aws_lc_rs::hmac::sign(&ring.nonce_key().unwrap(), b"n");
        let (r2, _) = record(&copy, 2, 1_000);
        ring.install(&[r2]).unwrap();
        let verifies_at = |now| {
            ring.nonce_keys(now)
                .iter()
                .any(|k| aws_lc_rs::hmac::verify(k, b"n", old.as_ref()).is_ok())
        };
        let grace = 60 + REFRESH_INTERVAL.as_secs();
        assert!(verifies_at(1_000));
        assert!(verifies_at(1_000 + grace));
        assert!(!verifies_at(1_000 + grace + 1));
        // The current key always verifies its own nonces.
        let fresh = aws_lc_rs::hmac::sign(&ring.nonce_key().unwrap(), b"n");
        assert!(
            ring.nonce_keys(u64::MAX / 2)
                .iter()
                .any(|k| aws_lc_rs::hmac::verify(k, b"n", fresh.as_ref()).is_ok())
        );
    }
}
