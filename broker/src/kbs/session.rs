//! Stateless KBS sessions: the `kbs-session-id` cookie is the session itself, sealed
//! (AES-256-GCM under a key derived from the master key) and expiring, so any replica serves
//! any step and nothing is stored per session.
//!
//! `/auth` hands out a *challenge* session (the nonce, the TEE kind, the hash it selected);
//! `/attest` replaces it with an *attested* one (the verified claims and the TEE key the
//! resources are encrypted to). A cookie from another broker (another master key), a
//! tampered or truncated one, and an expired one are all simply not a session.

use aws_lc_rs::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The cookie's name.
pub const COOKIE: &str = "kbs-session-id";
const AAD: &[u8] = b"snp-key-broker/v1 kbs-session";
/// Largest cookie value accepted.
const MAX_COOKIE_LEN: usize = 16 * 1024;

/// What a session cookie carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case", deny_unknown_fields)]
pub enum Session {
    /// After `/auth`.
    Challenge {
        /// Expiry (seconds since the epoch): the nonce's.
        exp: u64,
        /// The broker nonce handed out.
        nonce: String,
        /// The TEE kind the client announced.
        tee: String,
        /// The hash algorithm selected (`sha512` or `sha384`).
        hash: String,
    },
    /// After a successful `/attest`.
    Attested {
        /// Expiry (seconds since the epoch): the token's.
        exp: u64,
        /// The TEE key (JWK) resources are encrypted to.
        tee_pubkey: Value,
        /// The verified claims (JSON form).
        claims: Value,
        /// SHA-256 of the claims' JSON text.
        claims_sha256: String,
    },
}

impl Session {
    fn exp(&self) -> u64 {
        match self {
            Session::Challenge { exp, .. } | Session::Attested { exp, .. } => *exp,
        }
    }
}

/// Why there is no session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No cookie.
    #[error("no session: start with /kbs/v0/auth")]
    Missing,
    /// A cookie this broker did not seal (another broker's, tampered, truncated).
    #[error("the session cookie is not one of this broker's: start again with /kbs/v0/auth")]
    Invalid,
    /// Expired.
    #[error("the session expired: start again with /kbs/v0/auth")]
    Expired,
}

/// Seals and opens session cookies.
pub struct Sessions {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(..)")
    }
}

impl Sessions {
    /// Sessions sealed with `key` (from [`crate::keys::MasterKey::kbs_session_key`]).
    pub fn new(key: LessSafeKey) -> Sessions {
        Sessions { key }
    }

    /// The cookie value of a session.
    pub fn seal(&self, session: &Session) -> Result<String, crate::Error> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| crate::Error::Crypto("no randomness".into()))?;
        let mut buf = serde_json::to_vec(session)
            .map_err(|e| crate::Error::Crypto(format!("session encoding: {e}")))?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(AAD),
                &mut buf,
            )
            .map_err(|_| crate::Error::Crypto("session sealing".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(B64URL.encode(out))
    }

    /// The session a cookie value carries, if this broker sealed it and it has not expired
    /// at `now`.
    pub fn open(&self, cookie: Option<&str>, now: u64) -> Result<Session, SessionError> {
        let cookie = cookie.ok_or(SessionError::Missing)?;
        if cookie.len() > MAX_COOKIE_LEN {
            return Err(SessionError::Invalid);
        }
        let raw = B64URL.decode(cookie).map_err(|_| SessionError::Invalid)?;
        if raw.len() < NONCE_LEN {
            return Err(SessionError::Invalid);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SessionError::Invalid)?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(AAD), &mut buf)
            .map_err(|_| SessionError::Invalid)?;
        let session: Session = serde_json::from_slice(plain).map_err(|_| SessionError::Invalid)?;
        if now > session.exp() {
            return Err(SessionError::Expired);
        }
        Ok(session)
    }
}

/// The value of the session cookie in a `Cookie` header, if there is one.
pub fn cookie_value(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    fn sessions() -> Sessions {
        Sessions::new(MasterKey::generate().unwrap().kbs_session_key().unwrap())
    }

    #[test]
    fn sessions_round_trip_and_refuse_others() {
        let s = sessions();
        let session = Session::Challenge {
            exp: 100,
            nonce: "n".into(),
            tee: "snp".into(),
            hash: "sha512".into(),
        };
        let cookie = s.seal(&session).unwrap();
        assert_eq!(s.open(Some(&cookie), 100).unwrap(), session);
        assert_eq!(s.open(Some(&cookie), 101), Err(SessionError::Expired));
        assert_eq!(s.open(None, 0), Err(SessionError::Missing));
        // Another broker's cookie, a tampered one, a truncated one, garbage.
        assert_eq!(
            sessions().open(Some(&cookie), 0),
            Err(SessionError::Invalid)
        );
        let mut raw = B64URL.decode(&cookie).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(
            s.open(Some(&B64URL.encode(&raw)), 0),
            Err(SessionError::Invalid)
        );
        assert_eq!(s.open(Some(&cookie[..20]), 0), Err(SessionError::Invalid));
        assert_eq!(s.open(Some("!!"), 0), Err(SessionError::Invalid));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; kbs-session-id=abc".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h).as_deref(), Some("abc"));
        assert_eq!(cookie_value(&axum::http::HeaderMap::new()), None);
    }
}
