//! Stateless KBS sessions: the `kbs-session-id` cookie is the session itself, sealed
//! (AES-256-GCM under a key derived from the current data key, so it rotates with
//! `broker keys rotate`) and expiring, so any replica serves any step and nothing is stored
//! per session. A cookie sealed under a superseded data key opens for as long as a session
//! lives after the rotation, so clients mid-flow are not refused.
//!
//! `/auth` hands out a *challenge* session (the nonce, the TEE kind, the hash it selected);
//! `/attest` replaces it with an *attested* one (the verified claims and the TEE key the
//! resources are encrypted to). A cookie from another broker (another store's keys), a
//! tampered or truncated one, and an expired one are all simply not a session.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
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
    keyring: Arc<crate::keyring::Keyring>,
    /// How long a superseded data key's cookies still open.
    grace: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(..)")
    }
}

impl Sessions {
    /// Sessions sealed under `keyring`'s current data key; `lifetime` is the longest a
    /// session lives (the nonce's and the token's lifetimes, whichever is longer), for which
    /// a superseded key's cookies still open after a rotation (plus the keyring's refresh
    /// interval, for replicas that have not reloaded yet).
    pub fn new(keyring: Arc<crate::keyring::Keyring>, lifetime: Duration) -> Sessions {
        Sessions {
            keyring,
            grace: lifetime.saturating_add(crate::keyring::REFRESH_INTERVAL),
        }
    }

    /// The cookie value of a session.
    pub fn seal(&self, session: &Session) -> Result<String, crate::Error> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| crate::Error::Crypto("no randomness".into()))?;
        let mut buf = serde_json::to_vec(session)
            .map_err(|e| crate::Error::Crypto(format!("session encoding: {e}")))?;
        self.keyring
            .session_key()?
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
        // The current data key's, then a superseded one's within its grace: the tag says which.
        let session = self
            .keyring
            .session_keys(now, self.grace)
            .iter()
            .find_map(|key| {
                let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
                let mut buf = sealed.to_vec();
                let plain = key.open_in_place(nonce, Aad::from(AAD), &mut buf).ok()?;
                Some(serde_json::from_slice::<Session>(plain).map_err(|_| SessionError::Invalid))
            })
            .ok_or(SessionError::Invalid)??;
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
        let keyring = crate::keyring::Keyring::new(MasterKey::generate().unwrap(), LIFETIME);
        Sessions::new(Arc::new(keyring.unwrap()), LIFETIME)
    }

    const LIFETIME: Duration = Duration::from_secs(300);

    fn challenge(exp: u64) -> Session {
        Session::Challenge {
            exp,
            nonce: "n".into(),
            tee: "snp".into(),
            hash: "sha512".into(),
        }
    }

    #[tokio::test]
    async fn cookies_follow_the_data_key_across_a_rotation() {
        use crate::keyring::{Keyring, REFRESH_INTERVAL, rotate};
        let (_dir, store) = crate::store::temp_sqlite_store().await;
        let master = MasterKey::generate().unwrap();
        let copy = || MasterKey::from_bytes(master.expose()).unwrap();
        let keyring = Arc::new(Keyring::load(copy(), &store, LIFETIME).await.unwrap());
        let (this, other) = (
            Sessions::new(keyring.clone(), LIFETIME),
            // Another replica, which has not reloaded the data keys since the rotation.
            Sessions::new(
                Arc::new(Keyring::load(copy(), &store, LIFETIME).await.unwrap()),
                LIFETIME,
            ),
        );
        let session = challenge(u64::MAX);
        let before = this.seal(&session).unwrap();
        let rotated_at = 1_000;
        let rotation = rotate(&store, copy(), "op", rotated_at, 10, |_, _| {})
            .await
            .unwrap();
        assert_eq!(rotation.version, 2);
        keyring.refresh(&store).await.unwrap();
        let after = this.seal(&session).unwrap();
        // A new key: the replica that has not reloaded cannot open it yet (the KBS front end
        // reloads then), and its own cookies, under the old key, still open here.
        assert_eq!(other.open(Some(&after), 0), Err(SessionError::Invalid));
        let other_cookie = other.seal(&session).unwrap();
        assert_eq!(this.open(Some(&other_cookie), 0).unwrap(), session);
        // A cookie sealed before the rotation opens for a session's lifetime (plus the
        // refresh interval) after it, then no more; one sealed after it keeps opening.
        let end = 1_000 + LIFETIME.as_secs() + REFRESH_INTERVAL.as_secs();
        assert_eq!(this.open(Some(&before), end).unwrap(), session);
        assert_eq!(
            this.open(Some(&before), end + 1),
            Err(SessionError::Invalid)
        );
        assert_eq!(this.open(Some(&after), end + 1).unwrap(), session);
    }

    #[test]
    fn sessions_round_trip_and_refuse_others() {
        let s = sessions();
        let session = challenge(100);
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
