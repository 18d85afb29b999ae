//! The master key, its providers (`file`, `env`, `pkcs11`) and what is derived from it: the
//! record and nonce keys of data-key version 1 (the master key itself, see `keyring`), the key
//! that wraps later data-key versions, and the KBS session key. Every replica that shares the
//! master key can read the store and check any replica's nonces.

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::Error;
use crate::config::MasterKeySource;

/// The 32-byte master key. Never printed; zeroized on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn parse_hex_key(text: &str, origin: &str) -> Result<MasterKey, Error> {
    let trimmed = Zeroizing::new(text.trim().to_string());
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(trimmed.as_bytes(), &mut key[..])
        .map_err(|_| Error::Config(format!("{origin}: the master key must be 64 hex digits")))?;
    // A placeholder, not a key: all bytes the same (all zeros, "ffff…", "1111…").
    if key.iter().all(|b| *b == key[0]) {
        return Err(Error::Config(format!(
            "{origin}: the master key repeats one byte; generate one (e.g. `openssl rand -hex 32`)"
        )));
    }
    Ok(MasterKey(key))
}

impl MasterKey {
    /// Loads the key from a file or environment source. A key file must not be readable or
    /// writable by group or others (mode 0600 or stricter). A `pkcs11` key lives in the
    /// store, wrapped: see [`open_master_key`].
    pub fn load(source: &MasterKeySource) -> Result<MasterKey, Error> {
        match source {
            MasterKeySource::Pkcs11(_) | MasterKeySource::SnpSealed { .. } => {
                Err(Error::Config(format!(
                    "a {} master key is unwrapped from the store (open_master_key)",
                    source.provider()
                )))
            }
            MasterKeySource::File(path) => {
                check_private_file(path)?;
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    Error::Read {
                        path: path.clone(),
                        source,
                    }
                })?);
                parse_hex_key(&text, &path.display().to_string())
            }
            MasterKeySource::Env(var) => {
                let text = Zeroizing::new(std::env::var(var).map_err(|_| {
                    Error::Config(format!("environment variable {var} is not set"))
                })?);
                parse_hex_key(&text, var)
            }
        }
    }

    /// A fresh random key (for `broker init`).
    pub fn generate() -> Result<MasterKey, Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut key[..])
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        Ok(MasterKey(key))
    }

    /// A key from its 32 bytes (unwrapped by a provider).
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(Error::Crypto(format!(
                "a master key is 32 bytes, not {}",
                bytes.len()
            )));
        }
        key.copy_from_slice(bytes);
        Ok(MasterKey(key))
    }

    /// The key's bytes, for a provider to wrap.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.0[..]
    }

    /// A value that identifies this key to the store without revealing it or any key derived
    /// for another purpose (an HKDF output of its own label).
    pub fn check_value(&self) -> Result<Vec<u8>, Error> {
        Ok(self.derive(b"key check")?.to_vec())
    }

    /// The key as hex, for writing it to a 0600 file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }

    fn derive(&self, label: &[u8]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"snp-key-broker/v1 master");
        let prk = salt.extract(&self.0[..]);
        let info = [label];
        let okm = prk
            .expand(&info, hkdf::HKDF_SHA256)
            .map_err(|_| Error::Crypto("HKDF expand".into()))?;
        let mut out = Zeroizing::new([0u8; 32]);
        okm.fill(&mut out[..])
            .map_err(|_| Error::Crypto("HKDF fill".into()))?;
        Ok(out)
    }

    /// The AEAD that encrypts secrets at rest.
    pub fn record_cipher(&self) -> Result<RecordCipher, Error> {
        self.cipher_for(b"secrets at rest")
    }

    /// An AEAD over records, keyed by the derivation `label`.
    pub(crate) fn cipher_for(&self, label: &[u8]) -> Result<RecordCipher, Error> {
        let k = self.derive(label)?;
        let key = UnboundKey::new(&AES_256_GCM, &k[..])
            .map_err(|_| Error::Crypto("AES-256-GCM key".into()))?;
        Ok(RecordCipher {
            key: LessSafeKey::new(key),
        })
    }

    /// The AEAD key that seals KBS session cookies (of a data-key version: the keyring
    /// derives one per version, `Keyring::session_key`).
    pub fn kbs_session_key(&self) -> Result<LessSafeKey, Error> {
        let k = self.derive(b"kbs sessions")?;
        let key = UnboundKey::new(&AES_256_GCM, &k[..])
            .map_err(|_| Error::Crypto("AES-256-GCM key".into()))?;
        Ok(LessSafeKey::new(key))
    }

    /// The HMAC key that authenticates nonces.
    pub fn nonce_key(&self) -> Result<aws_lc_rs::hmac::Key, Error> {
        let k = self.derive(b"challenge nonces")?;
        Ok(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &k[..],
        ))
    }
}

/// A provider that holds the master key wrapped in the store: a PKCS#11 token, or the
/// SEV-SNP VM the broker runs in.
#[derive(Clone)]
enum Wrapper {
    Token(std::sync::Arc<crate::hsm::Hsm>),
    Sealed(std::sync::Arc<(Box<dyn crate::platform::Platform>, crate::platform::Sealing)>),
}

impl Wrapper {
    async fn open(source: &MasterKeySource) -> Result<Option<Wrapper>, Error> {
        Ok(match source {
            MasterKeySource::Pkcs11(settings) => Some(Wrapper::Token(std::sync::Arc::new(
                open_hsm(settings).await?,
            ))),
            MasterKeySource::SnpSealed { sealing, platform } => Some(Wrapper::Sealed(
                std::sync::Arc::new((platform.open()?, sealing.clone())),
            )),
            MasterKeySource::File(_) | MasterKeySource::Env(_) => None,
        })
    }

    async fn wrap(&self, key: &MasterKey) -> Result<Vec<u8>, Error> {
        let copy = MasterKey::from_bytes(key.expose())?;
        match self.clone() {
            Wrapper::Token(hsm) => blocking(move || hsm.wrap(&copy)).await,
            Wrapper::Sealed(s) => blocking(move || crate::platform::seal(&*s.0, &s.1, &copy)).await,
        }
    }

    async fn unwrap(&self, wrapped: Vec<u8>) -> Result<MasterKey, Error> {
        match self.clone() {
            Wrapper::Token(hsm) => blocking(move || hsm.unwrap(&wrapped)).await,
            Wrapper::Sealed(s) => {
                blocking(move || crate::platform::unseal(&*s.0, &s.1, &wrapped)).await
            }
        }
    }
}

/// The master key of a store, from its configured provider, checked against what the store
/// recorded:
///
/// - `file` / `env`: the key is read from its source. The first start on a store records the
///   provider and the key's check value (a store written before that record existed is
///   adopted); later starts refuse a key whose check value differs, and a store whose key is
///   wrapped by another provider.
/// - `pkcs11` / `snp-sealed`: the store holds the key wrapped by the token's key (sealed to
///   the VM) and it is unwrapped there. The first start on an empty store makes a random key
///   and stores it wrapped; a store with records sealed under another provider's key is
///   refused until that key is moved (`broker keys wrap`, `broker keys rotate --from-config`).
pub async fn open_master_key<S: crate::store::Store>(
    source: &MasterKeySource,
    store: &S,
    now: i64,
) -> Result<MasterKey, Error> {
    let recorded = store.master_key().await?;
    let Some(wrapper) = Wrapper::open(source).await? else {
        return open_file_key(source, recorded, store, now).await;
    };
    let provider = source.provider();
    // `keys wrap` moves a key file under a token; anything else moves with `keys rotate`.
    let from_file = recorded.as_ref().is_none_or(|r| r.provider == "file");
    let move_hint = if provider == "pkcs11" && from_file {
        "move it under the token first: broker keys wrap --config <this config> --from-file <the current key file>"
    } else {
        "move it first: broker keys rotate --config <this config> --from-config <the current config>"
    };
    match recorded {
        Some(r) if r.provider == provider => {
            let key = wrapper
                .unwrap(r.wrapped.clone().unwrap_or_default())
                .await?;
            verify_check(&key, &r)?;
            Ok(key)
        }
        Some(r) => Err(Error::Config(format!(
            "this store's master key is held by the {} provider; {move_hint}",
            r.provider
        ))),
        None => {
            if store.sealed_records().await? > 0 {
                return Err(Error::Config(format!(
                    "this store has records sealed under a master key that is not recorded \
                     (written before providers were); {move_hint}"
                )));
            }
            let key = MasterKey::generate()?;
            let record = record(provider, Some(wrapper.wrap(&key).await?), &key, now)?;
            match store
                .put_master_key(
                    &record,
                    false,
                    &[],
                    &key_audit("master-key.create", &record, now),
                )
                .await
            {
                Ok(()) => Ok(key),
                // Another replica made one first: use that one.
                Err(crate::store::StoreError::Conflict(_)) => {
                    let r = recorded_by_another(store).await?;
                    let key = wrapper
                        .unwrap(r.wrapped.clone().unwrap_or_default())
                        .await?;
                    verify_check(&key, &r)?;
                    Ok(key)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// [`open_master_key`] for a key read from a file or the environment.
async fn open_file_key<S: crate::store::Store>(
    source: &MasterKeySource,
    recorded: Option<crate::store::MasterKeyRecord>,
    store: &S,
    now: i64,
) -> Result<MasterKey, Error> {
    let key = MasterKey::load(source)?;
    match recorded {
        Some(r) if r.provider == "file" => {
            verify_check(&key, &r)?;
            Ok(key)
        }
        Some(r) => Err(Error::Config(format!(
            "this store's master key is wrapped by the {} provider: configure it in [master_key] \
             (a key file no longer opens this store)",
            r.provider
        ))),
        None => {
            let record = record("file", None, &key, now)?;
            match store
                .put_master_key(
                    &record,
                    false,
                    &[],
                    &key_audit("master-key.adopt", &record, now),
                )
                .await
            {
                Ok(()) => Ok(key),
                Err(crate::store::StoreError::Conflict(_)) => {
                    let r = recorded_by_another(store).await?;
                    verify_check(&key, &r)?;
                    Ok(key)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// `broker keys wrap`: moves a store's master key from a file under a PKCS#11 token's key.
/// The key, and so every record, stays the same; the store then records the wrapped key and
/// a broker configured with the key file no longer opens it. Refused when the file's key is
/// not the store's.
pub async fn wrap_master_key<S: crate::store::Store>(
    from: &MasterKeySource,
    to: &crate::hsm::Pkcs11Settings,
    store: &S,
    actor: &str,
    now: i64,
) -> Result<(), Error> {
    let key = MasterKey::load(from)?;
    let recorded = store.master_key().await?;
    match &recorded {
        Some(r) if r.provider == "file" => verify_check(&key, r)?,
        Some(r) => {
            return Err(Error::Input(format!(
                "this store's master key is already held by the {} provider",
                r.provider
            )));
        }
        None => {}
    }
    let hsm = open_hsm(to).await?;
    let copy = MasterKey::from_bytes(key.expose())?;
    let wrapped = blocking(move || hsm.wrap(&copy)).await?;
    let record = record("pkcs11", Some(wrapped), &key, now)?;
    let mut audit = key_audit("master-key.wrap", &record, now);
    audit.actor = actor.to_string();
    Ok(store
        .put_master_key(&record, recorded.is_some(), &[], &audit)
        .await?)
}

/// A new master key from `source` and the record that says how the store will hold it: a
/// `pkcs11` (`snp-sealed`) provider makes a random key and wraps it in the token (seals it to
/// the VM); a `file` or `env` source is read. For moving a store to another master key (`broker keys rotate --from-config`).
pub async fn new_master_key(
    source: &MasterKeySource,
    now: i64,
) -> Result<(MasterKey, crate::store::MasterKeyRecord), Error> {
    match Wrapper::open(source).await? {
        Some(wrapper) => {
            let key = MasterKey::generate()?;
            let record = record(
                source.provider(),
                Some(wrapper.wrap(&key).await?),
                &key,
                now,
            )?;
            Ok((key, record))
        }
        None => {
            let key = MasterKey::load(source)?;
            let record = record("file", None, &key, now)?;
            Ok((key, record))
        }
    }
}

/// `broker keys create-kek`: makes the token's wrapping key.
pub async fn create_token_key(settings: &crate::hsm::Pkcs11Settings) -> Result<(), Error> {
    let hsm = open_hsm(settings).await?;
    blocking(move || hsm.create_key()).await
}

async fn open_hsm(settings: &crate::hsm::Pkcs11Settings) -> Result<crate::hsm::Hsm, Error> {
    let settings = settings.clone();
    blocking(move || crate::hsm::Hsm::open(&settings)).await
}

/// Runs blocking PKCS#11 work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Crypto(format!("PKCS#11 task failed: {e}")))?
}

fn record(
    provider: &str,
    wrapped: Option<Vec<u8>>,
    key: &MasterKey,
    now: i64,
) -> Result<crate::store::MasterKeyRecord, Error> {
    Ok(crate::store::MasterKeyRecord {
        provider: provider.into(),
        wrapped,
        check: key.check_value()?,
        created_at: now,
    })
}

/// The record another replica made while this one tried to (a conflicting insert).
async fn recorded_by_another<S: crate::store::Store>(
    store: &S,
) -> Result<crate::store::MasterKeyRecord, Error> {
    store
        .master_key()
        .await?
        .ok_or_else(|| Error::Crypto("the master key record vanished".into()))
}

fn verify_check(key: &MasterKey, r: &crate::store::MasterKeyRecord) -> Result<(), Error> {
    aws_lc_rs::constant_time::verify_slices_are_equal(&key.check_value()?, &r.check).map_err(|_| {
        Error::Config(format!(
            "the master key ({} provider) is not this store's: its check value differs",
            r.provider
        ))
    })
}

fn key_audit(
    action: &str,
    r: &crate::store::MasterKeyRecord,
    now: i64,
) -> crate::store::AuditRecord {
    crate::store::AuditRecord {
        id: 0,
        at: now,
        actor: "broker".into(),
        action: action.into(),
        outcome: "ok".into(),
        detail: serde_json::json!({ "provider": r.provider }),
    }
}

/// Refuses a secret file that group or others can access.
#[cfg(unix)]
pub fn check_private_file(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{} has mode {mode:o}; a key file must be 0600 or stricter (chmod 600)",
            path.display()
        )));
    }
    Ok(())
}

/// Writes a secret file with mode 0600, refusing to overwrite.
#[cfg(unix)]
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|source| Error::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// AES-256-GCM over secret records, a fresh random nonce per record, the record's identity
/// (name and version) as associated data.
pub struct RecordCipher {
    key: LessSafeKey,
}

impl std::fmt::Debug for RecordCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordCipher(..)")
    }
}

fn record_aad(name: &str, version: u64) -> Vec<u8> {
    let mut aad = b"snp-key-broker/v1 record\0".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

impl RecordCipher {
    /// Encrypts a secret: returns `nonce || ciphertext || tag`.
    pub fn seal(&self, name: &str, version: u64, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(record_aad(name, version)),
                &mut buf,
            )
            .map_err(|_| Error::Crypto("record encryption".into()))?;
        let mut out = nonce.to_vec();
        out.append(&mut buf);
        Ok(out)
    }

    /// Decrypts a record sealed for this name and version.
    pub fn open(
        &self,
        name: &str,
        version: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        if sealed.len() < NONCE_LEN {
            return Err(Error::Crypto("record too short".into()));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::Crypto("record nonce".into()))?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(record_aad(name, version)), &mut buf)
            .map_err(|_| Error::Crypto(format!("record {name} v{version} does not decrypt")))?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_bound_to_name_and_version() {
        let k = MasterKey::generate().unwrap();
        let c = k.record_cipher().unwrap();
        let sealed = c.seal("db", 2, b"hunter2").unwrap();
        assert_eq!(&c.open("db", 2, &sealed).unwrap()[..], b"hunter2");
        assert!(c.open("db", 3, &sealed).is_err());
        assert!(c.open("dc", 2, &sealed).is_err());
        let other = MasterKey::generate().unwrap().record_cipher().unwrap();
        assert!(other.open("db", 2, &sealed).is_err());
        // Fresh nonce each time.
        assert_ne!(
            c.seal("db", 2, b"x").unwrap(),
            c.seal("db", 2, b"x").unwrap()
        );
        assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
    }

    #[tokio::test]
    async fn a_store_opens_only_with_its_own_key_file() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("b.db"))
            .await
            .unwrap();
        let write = |name: &str, key: &MasterKey| {
            let p = dir.path().join(name);
            write_private_file(&p, key.to_hex().as_bytes()).unwrap();
            MasterKeySource::File(p)
        };
        let (a, b) = (
            MasterKey::generate().unwrap(),
            MasterKey::generate().unwrap(),
        );
        let (source_a, source_b) = (write("a.key", &a), write("b.key", &b));
        // The first start records the key (adopting the store), later ones check it.
        let opened = open_master_key(&source_a, &store, 1).await.unwrap();
        assert_eq!(opened.to_hex(), a.to_hex());
        let record = store.master_key().await.unwrap().unwrap();
        assert_eq!(record.provider, "file");
        assert_eq!(record.wrapped, None);
        assert_eq!(record.check, a.check_value().unwrap());
        assert!(open_master_key(&source_a, &store, 2).await.is_ok());
        let e = open_master_key(&source_b, &store, 3).await.unwrap_err();
        assert!(e.to_string().contains("not this store's"), "{e}");
        // The check value is no derived key of any other purpose.
        assert_ne!(
            a.check_value().unwrap(),
            a.derive(b"secrets at rest").unwrap().to_vec()
        );
    }

    #[test]
    fn key_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        let k = MasterKey::generate().unwrap();
        write_private_file(&p, k.to_hex().as_bytes()).unwrap();
        let loaded = MasterKey::load(&MasterKeySource::File(p.clone())).unwrap();
        assert_eq!(loaded.to_hex(), k.to_hex());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::load(&MasterKeySource::File(p.clone())).unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
        assert!(
            write_private_file(&p, b"again").is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn placeholder_keys_are_refused() {
        for text in ["0".repeat(64), "f".repeat(64), "ab".repeat(32)] {
            let e = parse_hex_key(&text, "test").unwrap_err();
            assert!(e.to_string().contains("repeats one byte"), "{e}");
        }
        assert!(parse_hex_key(&"0".repeat(63), "test").is_err());
        assert!(parse_hex_key(&format!("{}1", "0".repeat(63)), "test").is_ok());
    }
}
