//! The master key and what is derived from it: the key that encrypts secrets at rest and
//! the key that authenticates challenge nonces. Every replica that shares the master key
//! can read the store and check any replica's nonces.

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
    /// Loads the key from its configured source. A key file must not be readable or
    /// writable by group or others (mode 0600 or stricter).
    pub fn load(source: &MasterKeySource) -> Result<MasterKey, Error> {
        match source {
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
        let k = self.derive(b"secrets at rest")?;
        let key = UnboundKey::new(&AES_256_GCM, &k[..])
            .map_err(|_| Error::Crypto("AES-256-GCM key".into()))?;
        Ok(RecordCipher {
            key: LessSafeKey::new(key),
        })
    }

    /// The AEAD key that seals KBS session cookies.
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
