//! Stateless challenge nonces: `version || expiry || random || HMAC`, base64url.
//!
//! Any replica holding the same master key checks any replica's nonce without shared state;
//! single use is enforced separately, in the store.

use aws_lc_rs::digest;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::Error;

const VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 8 + 16;
const TAG_LEN: usize = 32;

/// Why a nonce was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// Not a nonce this broker issues (wrong encoding, length or version).
    #[error("nonce is malformed")]
    Malformed,
    /// The authenticator does not verify: minted under another key, or altered.
    #[error("nonce was not issued by this broker")]
    NotIssuedHere,
    /// Past its expiry.
    #[error("nonce has expired")]
    Expired,
}

/// A nonce whose authenticator and expiry checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedNonce {
    /// The decoded bytes, as bound into REPORT_DATA.
    pub bytes: Vec<u8>,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

impl CheckedNonce {
    /// SHA-256 of the nonce, the key of its single-use record.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, &self.bytes).as_ref());
        out
    }
}

/// Mints and checks nonces with the nonce keys of the broker's data keys: mints under the
/// current one, accepts a superseded one for its grace period (`keyring`).
pub struct NonceAuthority {
    keyring: std::sync::Arc<crate::keyring::Keyring>,
}

impl std::fmt::Debug for NonceAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceAuthority(..)")
    }
}

impl NonceAuthority {
    /// An authority over `keyring`'s nonce keys.
    pub fn new(keyring: std::sync::Arc<crate::keyring::Keyring>) -> NonceAuthority {
        NonceAuthority { keyring }
    }

    /// Mints a nonce that expires at `expires_at` (seconds since the epoch).
    pub fn mint(&self, expires_at: u64) -> Result<String, Error> {
        let mut body = [0u8; BODY_LEN];
        body[0] = VERSION;
        body[1..9].copy_from_slice(&expires_at.to_be_bytes());
        SystemRandom::new()
            .fill(&mut body[9..])
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        let tag = hmac::sign(&self.keyring.nonce_key()?, &body);
        let mut raw = body.to_vec();
        raw.extend_from_slice(tag.as_ref());
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Checks a nonce at time `now` (seconds since the epoch).
    pub fn check(&self, nonce: &str, now: u64) -> Result<CheckedNonce, NonceError> {
        if nonce.len() > 128 {
            return Err(NonceError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| NonceError::Malformed)?;
        if raw.len() != BODY_LEN + TAG_LEN || raw.first() != Some(&VERSION) {
            return Err(NonceError::Malformed);
        }
        let (body, tag) = raw.split_at(BODY_LEN);
        if !self
            .keyring
            .nonce_keys(now)
            .iter()
            .any(|key| hmac::verify(key, body, tag).is_ok())
        {
            return Err(NonceError::NotIssuedHere);
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(body.get(1..9).ok_or(NonceError::Malformed)?);
        let expires_at = u64::from_be_bytes(expiry);
        if now > expires_at {
            return Err(NonceError::Expired);
        }
        Ok(CheckedNonce {
            bytes: raw,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    fn authority() -> NonceAuthority {
        NonceAuthority::new(std::sync::Arc::new(
            crate::keyring::Keyring::new(
                MasterKey::generate().unwrap(),
                std::time::Duration::from_secs(60),
            )
            .unwrap(),
        ))
    }

    #[test]
    fn nonces_check_until_they_expire() {
        let a = authority();
        let n = a.mint(1000).unwrap();
        let c = a.check(&n, 999).unwrap();
        assert_eq!(c.expires_at, 1000);
        assert!(a.check(&n, 1000).is_ok());
        assert_eq!(a.check(&n, 1001), Err(NonceError::Expired));
        assert_ne!(a.mint(1000).unwrap(), n, "random part");
    }

    #[test]
    fn other_keys_and_tampering_are_refused() {
        let a = authority();
        let n = a.mint(1000).unwrap();
        assert_eq!(authority().check(&n, 0), Err(NonceError::NotIssuedHere));
        let mut raw = URL_SAFE_NO_PAD.decode(&n).unwrap();
        raw[8] ^= 1; // extend the expiry
        assert_eq!(
            a.check(&URL_SAFE_NO_PAD.encode(&raw), 0),
            Err(NonceError::NotIssuedHere)
        );
        assert_eq!(a.check("", 0), Err(NonceError::Malformed));
        assert_eq!(a.check("!!!", 0), Err(NonceError::Malformed));
        assert_eq!(a.check(&"A".repeat(500), 0), Err(NonceError::Malformed));
    }
}
