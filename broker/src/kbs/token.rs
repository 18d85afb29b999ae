//! Attestation results as EAR tokens (draft-ietf-rats-ear-04 claim names) in a JWT signed
//! ES256 by the broker's token key: a P-256 key kept in the store sealed under the record key
//! like every secret, versioned, published as a JWKS. Rotation adds a version; older
//! versions stay published, so tokens they signed verify until they expire.

use std::sync::{Arc, RwLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Value, json};

use crate::Error;
use crate::keyring::Keyring;
use crate::store::{AuditRecord, BrokerKey, Store, StoreError};

/// The store purpose of the token signing key.
pub const PURPOSE: &str = "ear-es256";
/// The EAR profile the tokens follow.
pub const EAR_PROFILE: &str = "tag:ietf.org,2026:rats/ear#04";
/// Largest token accepted for verification (bytes).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a compact JWS of the expected shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed by no key in the key set.
    #[error("the token's key {kid:?} is not one of the broker's")]
    UnknownKey {
        /// The header's `kid`.
        kid: String,
    },
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// Expired (or not yet valid).
    #[error("the token expired at {exp} (now {now})")]
    Expired {
        /// `exp`.
        exp: u64,
        /// The time of the check.
        now: u64,
    },
}

fn record_name() -> String {
    crate::store::broker_key_sealed_name(PURPOSE)
}

/// One version of the signing key.
struct SigningKey {
    version: u64,
    kid: String,
    pair: EcdsaKeyPair,
    jwk: Value,
}

/// The public JWK (with `kid`, `alg`, `use`) of an uncompressed P-256 point.
fn public_jwk(point: &[u8]) -> Result<(String, Value), Error> {
    if point.len() != 65 || point.first() != Some(&4) {
        return Err(Error::Crypto("not an uncompressed P-256 point".into()));
    }
    let (x, y) = (B64URL.encode(&point[1..33]), B64URL.encode(&point[33..]));
    // RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
    let thumbprint_input = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = B64URL.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        thumbprint_input.as_bytes(),
    ));
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
    Ok((kid, jwk))
}

fn load_key(cipher: &Keyring, record: &BrokerKey) -> Result<SigningKey, Error> {
    let pkcs8 = cipher.open(
        record.key_version,
        &record_name(),
        record.version,
        &record.sealed,
    )?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
        .map_err(|e| Error::Crypto(format!("token key v{}: {e}", record.version)))?;
    let (kid, jwk) = public_jwk(pair.public_key().as_ref())?;
    Ok(SigningKey {
        version: record.version,
        kid,
        pair,
        jwk,
    })
}

/// Least time between two reloads prompted by a token naming an unknown key: anyone can
/// send such tokens, and each reload is a store query.
const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The broker's token signing keys, newest first.
pub struct TokenKeys {
    keys: RwLock<Vec<Arc<SigningKey>>>,
    last_prompted: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Loads the keys from the store, making the first version when there is none (on
    /// several replicas at once, one insert wins and the others load it).
    pub async fn load<S: Store>(store: &S, cipher: &Keyring, now: i64) -> Result<TokenKeys, Error> {
        let keys = TokenKeys {
            keys: RwLock::new(Vec::new()),
            last_prompted: std::sync::Mutex::new(None),
        };
        if keys.reload(store, cipher).await? == 0 {
            match make_version(store, cipher, 1, "broker", now).await {
                Ok(()) | Err(Error::Store(StoreError::Conflict(_))) => {}
                Err(e) => return Err(e),
            }
            keys.reload(store, cipher).await?;
        }
        Ok(keys)
    }

    /// Re-reads the keys (another replica may have rotated); returns how many there are.
    pub async fn reload<S: Store>(&self, store: &S, cipher: &Keyring) -> Result<usize, Error> {
        let records = store.broker_keys(PURPOSE).await?;
        if records.iter().any(|r| r.key_version > cipher.current()) {
            cipher.refresh(store).await?;
        }
        let loaded = records
            .iter()
            .map(|r| load_key(cipher, r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let n = loaded.len();
        if let Ok(mut keys) = self.keys.write() {
            *keys = loaded;
        }
        Ok(n)
    }

    /// Reloads because a token named a key this replica has not loaded (another replica may
    /// have rotated), at most once per [`RELOAD_INTERVAL`]; whether it reloaded.
    pub async fn reload_prompted<S: Store>(
        &self,
        store: &S,
        cipher: &Keyring,
    ) -> Result<bool, Error> {
        let now = std::time::Instant::now();
        {
            let Ok(mut last) = self.last_prompted.lock() else {
                return Ok(false);
            };
            if last.is_some_and(|t| now.duration_since(t) < RELOAD_INTERVAL) {
                return Ok(false);
            }
            *last = Some(now);
        }
        self.reload(store, cipher).await.map(|_| true)
    }

    /// Makes a new version the signing key; returns it.
    pub async fn rotate<S: Store>(
        &self,
        store: &S,
        cipher: &Keyring,
        actor: &str,
        now: i64,
    ) -> Result<u64, Error> {
        for _ in 0..3 {
            self.reload(store, cipher).await?;
            let next = self.current_version() + 1;
            match make_version(store, cipher, next, actor, now).await {
                Ok(()) => {
                    self.reload(store, cipher).await?;
                    return Ok(next);
                }
                Err(Error::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Store(StoreError::Conflict(
            "token keys kept changing; try again".into(),
        )))
    }

    fn current_version(&self) -> u64 {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.first().map(|k| k.version))
            .unwrap_or(0)
    }

    fn newest(&self) -> Option<Arc<SigningKey>> {
        self.keys.read().ok().and_then(|k| k.first().cloned())
    }

    fn find(&self, kid: &str) -> Option<Arc<SigningKey>> {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.iter().find(|k| k.kid == kid).cloned())
    }

    /// Signs `claims` as a JWT with the newest key.
    pub fn sign(&self, claims: &Value) -> Result<String, Error> {
        let key = self
            .newest()
            .ok_or_else(|| Error::Crypto("no token signing key is loaded".into()))?;
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": key.kid});
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let signature = key
            .pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| Error::Crypto("token signature".into()))?;
        Ok(format!(
            "{signing_input}.{}",
            B64URL.encode(signature.as_ref())
        ))
    }

    /// Verifies a token signed by one of these keys at `now`; returns its claims.
    pub fn verify(&self, token: &str, now: u64) -> Result<Value, TokenError> {
        let keys: Vec<(String, Vec<u8>)> = self
            .keys
            .read()
            .map(|k| {
                k.iter()
                    .map(|k| (k.kid.clone(), k.pair.public_key().as_ref().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        verify_with(token, &keys, now)
    }

    /// Whether `token` names a key this broker does not have loaded (it may be new).
    pub fn knows(&self, kid: &str) -> bool {
        self.find(kid).is_some()
    }

    /// The public keys as a JWKS.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .read()
            .map(|k| k.iter().map(|k| k.jwk.clone()).collect())
            .unwrap_or_default();
        json!({ "keys": keys })
    }
}

async fn make_version<S: Store>(
    store: &S,
    cipher: &Keyring,
    version: u64,
    actor: &str,
    now: i64,
) -> Result<(), Error> {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| Error::Crypto("token key generation".into()))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| Error::Crypto("token key generation".into()))?;
    let (kid, jwk) = public_jwk(pair.public_key().as_ref())?;
    let seal = || -> Result<BrokerKey, Error> {
        let sealed = cipher.seal(&record_name(), version, pkcs8.as_ref())?;
        Ok(BrokerKey {
            purpose: PURPOSE.into(),
            version,
            created_at: now,
            public: jwk.clone(),
            sealed: sealed.bytes,
            key_version: sealed.key_version,
        })
    };
    let audit = AuditRecord {
        id: 0,
        at: now,
        actor: actor.to_string(),
        action: "token-key.create".into(),
        outcome: "ok".into(),
        detail: json!({ "purpose": PURPOSE, "version": version, "kid": kid }),
    };
    match store.insert_broker_key(&seal()?, &audit).await {
        // A data-key rotation began: seal again under the new key.
        Err(crate::store::StoreError::OldDataKey { .. }) => {
            cipher.refresh(store).await?;
            Ok(store.insert_broker_key(&seal()?, &audit).await?)
        }
        other => Ok(other?),
    }
}

/// The `kid` in a token's header, without verifying anything.
pub fn token_kid(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = B64URL.decode(header).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_string)
}

/// Verifies a compact JWS signed ES256 by one of `keys` (`kid`, uncompressed P-256 point)
/// and that it has not expired at `now`; returns its claims. Used by the broker and by
/// `broker token verify` (with the keys of a published JWKS).
pub fn verify_with(token: &str, keys: &[(String, Vec<u8>)], now: u64) -> Result<Value, TokenError> {
    let malformed = |d: &str| TokenError::Malformed(d.to_string());
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three base64url parts"));
    };
    let header: Value = B64URL
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| malformed("the header is not base64url JSON"))?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(malformed("alg is not ES256"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no kid"))?;
    let (_, point) = keys
        .iter()
        .find(|(k, _)| k == kid)
        .ok_or_else(|| TokenError::UnknownKey {
            kid: kid.to_string(),
        })?;
    let signature = B64URL
        .decode(sig)
        .map_err(|_| malformed("the signature is not base64url"))?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| TokenError::Signature)?;
    let claims: Value = B64URL
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| malformed("the payload is not base64url JSON"))?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("no exp"))?;
    if now > exp {
        return Err(TokenError::Expired { exp, now });
    }
    if claims.get("eat_profile").and_then(Value::as_str) != Some(EAR_PROFILE) {
        return Err(malformed("not an EAR of the expected profile"));
    }
    Ok(claims)
}

/// The keys of a JWKS (EC P-256 signing keys with a `kid`), for [`verify_with`].
pub fn jwks_keys(jwks: &Value) -> Result<Vec<(String, Vec<u8>)>, String> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("a JWKS is an object with a keys array")?;
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let field = |name: &str| {
            k.get(name)
                .and_then(Value::as_str)
                .ok_or(format!("keys[{i}].{name} is missing"))
        };
        if field("kty")? != "EC" || field("crv")? != "P-256" {
            continue;
        }
        let coordinate = |name: &str| -> Result<Vec<u8>, String> {
            B64URL
                .decode(field(name)?)
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or(format!("keys[{i}].{name} is not a P-256 coordinate"))
        };
        let mut point = vec![4u8];
        point.extend(coordinate("x")?);
        point.extend(coordinate("y")?);
        out.push((field("kid")?.to_string(), point));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_verify_across_rotation_and_refuse_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("b.db"))
            .await
            .unwrap();
        let cipher = Keyring::new(
            crate::keys::MasterKey::generate().unwrap(),
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let keys = TokenKeys::load(&store, &cipher, 100).await.unwrap();
        let claims = json!({"eat_profile": EAR_PROFILE, "exp": 200, "iat": 100});
        let t1 = keys.sign(&claims).unwrap();
        assert_eq!(keys.verify(&t1, 150).unwrap(), claims);
        assert_eq!(
            keys.verify(&t1, 201),
            Err(TokenError::Expired { exp: 200, now: 201 })
        );
        // A second load (another replica) finds the same key.
        let again = TokenKeys::load(&store, &cipher, 101).await.unwrap();
        assert_eq!(again.verify(&t1, 150).unwrap(), claims);
        // Rotation: new tokens carry the new key; old ones still verify.
        assert_eq!(keys.rotate(&store, &cipher, "op", 120).await.unwrap(), 2);
        let t2 = keys.sign(&claims).unwrap();
        assert_ne!(token_kid(&t1), token_kid(&t2));
        assert!(keys.verify(&t1, 150).is_ok());
        assert!(keys.verify(&t2, 150).is_ok());
        assert!(!again.knows(&token_kid(&t2).unwrap()));
        assert!(matches!(
            again.verify(&t2, 150),
            Err(TokenError::UnknownKey { .. })
        ));
        // A prompted reload happens, then not again right away (anyone can send tokens
        // naming unknown keys).
        assert!(again.reload_prompted(&store, &cipher).await.unwrap());
        assert!(!again.reload_prompted(&store, &cipher).await.unwrap());
        assert!(again.verify(&t2, 150).is_ok());
        // Offline, from the published key set.
        let published = jwks_keys(&keys.jwks()).unwrap();
        assert_eq!(published.len(), 2);
        assert_eq!(verify_with(&t1, &published, 150).unwrap(), claims);
        // Tampered payload, wrong alg, truncated.
        let parts: Vec<&str> = t2.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64URL.encode(json!({"eat_profile": EAR_PROFILE, "exp": 999}).to_string()),
            parts[2]
        );
        assert_eq!(keys.verify(&forged, 150), Err(TokenError::Signature));
        let none = format!("{}.{}.", B64URL.encode(r#"{"alg":"none"}"#), parts[1]);
        assert!(matches!(
            keys.verify(&none, 150),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            keys.verify("a.b", 150),
            Err(TokenError::Malformed(_))
        ));
        // The key is sealed in the store: its record is not the PKCS#8 bytes.
        let stored = store.broker_keys(PURPOSE).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert!(!format!("{:?}", stored[0]).contains("sealed"));
        let other = Keyring::new(
            crate::keys::MasterKey::generate().unwrap(),
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        assert!(TokenKeys::load(&store, &other, 130).await.is_err());
    }
}
