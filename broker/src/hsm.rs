//! The `pkcs11` key provider: the master key is kept in the store only wrapped (AES-256-GCM)
//! by a non-extractable, sensitive AES key inside a PKCS#11 token (an HSM, or SoftHSM2 for
//! development), through the maintained `cryptoki` crate. The token's PIN comes from a file
//! (mode 0600) or a systemd credential, never from the command line or the environment.
//!
//! PKCS#11 calls block: callers run them off the async runtime (they happen at start-up and
//! in `broker keys` commands only; the unwrapped master key is then kept in memory, zeroized
//! on drop).

use std::path::{Path, PathBuf};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::Error;
use crate::keys::MasterKey;

/// Associated data of the wrapped master key.
const AAD: &[u8] = b"snp-key-broker/v1 wrapped master key";
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// Where the token's PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file (mode 0600 or stricter) holding the PIN.
    File(PathBuf),
    /// A systemd credential of the broker's unit (`LoadCredential=`): the file of that name
    /// in `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

/// The `pkcs11` provider's settings (`[master_key]` in `broker.toml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The wrapping key's label (`CKA_LABEL`).
    pub key: String,
    /// The user PIN.
    pub pin: PinSource,
}

fn hsm_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Crypto(format!("PKCS#11: {what}: {e}"))
}

fn read_pin(source: &PinSource) -> Result<AuthPin, Error> {
    let path = match source {
        PinSource::File(p) => p.clone(),
        PinSource::Credential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                Error::Config(format!(
                    "master_key.pkcs11_pin_credential = {name:?}, but $CREDENTIALS_DIRECTORY is not set \
                     (LoadCredential= in the broker's systemd unit)"
                ))
            })?;
            Path::new(&dir).join(name)
        }
    };
    crate::keys::check_private_file(&path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?,
    );
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(Error::Config(format!(
            "{}: the PIN is empty",
            path.display()
        )));
    }
    Ok(AuthPin::new(pin.into()))
}

/// An open PKCS#11 module with the token and key found.
pub struct Hsm {
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    settings: Pkcs11Settings,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("module", &self.settings.module)
            .field("token", &self.settings.token)
            .field("key", &self.settings.key)
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads the module, finds the token by its label and reads the PIN.
    pub fn open(settings: &Pkcs11Settings) -> Result<Hsm, Error> {
        let pin = read_pin(&settings.pin)?;
        let ctx = Pkcs11::new(&settings.module)
            .map_err(|e| hsm_err(&format!("loading {}", settings.module.display()), e))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| hsm_err("C_Initialize", e))?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| hsm_err("listing slots", e))?;
        let mut found = None;
        for slot in slots {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| hsm_err("reading a token's information", e))?;
            if info.label().trim_end() == settings.token {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| {
            Error::Config(format!(
                "PKCS#11: no token labelled {:?} in {}",
                settings.token,
                settings.module.display()
            ))
        })?;
        Ok(Hsm {
            ctx,
            slot,
            pin,
            settings: settings.clone(),
        })
    }

    fn login(&self, rw: bool) -> Result<Session, Error> {
        let session = if rw {
            self.ctx.open_rw_session(self.slot)
        } else {
            self.ctx.open_ro_session(self.slot)
        }
        .map_err(|e| hsm_err("opening a session", e))?;
        session
            .login(UserType::User, Some(&self.pin))
            .map_err(|e| hsm_err(&format!("logging in to token {:?}", self.settings.token), e))?;
        Ok(session)
    }

    fn key_template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(self.settings.key.as_bytes().to_vec()),
        ]
    }

    /// The wrapping key, checked: exactly one AES key with this label, sensitive and never
    /// extractable, for encryption and decryption.
    fn key(&self, session: &Session) -> Result<ObjectHandle, Error> {
        let found = session
            .find_objects(&self.key_template())
            .map_err(|e| hsm_err("finding the wrapping key", e))?;
        let key = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::Config(format!(
                    "PKCS#11: token {:?} has no secret key labelled {:?} (create it with `broker keys create-kek`)",
                    self.settings.token, self.settings.key
                )));
            }
            _ => {
                return Err(Error::Config(format!(
                    "PKCS#11: token {:?} has {} secret keys labelled {:?}; labels must be unique",
                    self.settings.token,
                    found.len(),
                    self.settings.key
                )));
            }
        };
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(|e| hsm_err("reading the wrapping key's attributes", e))?;
        let mut aes = false;
        let mut protected = (false, true, false);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::Sensitive(s) => protected.0 = s,
                Attribute::Extractable(x) => protected.1 = x,
                Attribute::NeverExtractable(n) => protected.2 = n,
                _ => {}
            }
        }
        if !aes {
            return Err(Error::Config(format!(
                "PKCS#11: key {:?} is not an AES key",
                self.settings.key
            )));
        }
        if protected != (true, false, true) {
            return Err(Error::Config(format!(
                "PKCS#11: key {:?} must be sensitive and never extractable (sensitive {}, extractable {}, never extractable {}): \
                 a key that can leave the token protects nothing",
                self.settings.key, protected.0, protected.1, protected.2
            )));
        }
        Ok(key)
    }

    /// Checks that the wrapping key exists and is protected.
    pub fn check_key(&self) -> Result<(), Error> {
        let session = self.login(false)?;
        self.key(&session).map(|_| ())
    }

    /// Creates the wrapping key: AES-256, on the token, sensitive, not extractable, for
    /// encryption and decryption only. Refuses when a key with the label exists.
    pub fn create_key(&self) -> Result<(), Error> {
        let session = self.login(true)?;
        let existing = session
            .find_objects(&self.key_template())
            .map_err(|e| hsm_err("finding keys", e))?;
        if !existing.is_empty() {
            return Err(Error::Input(format!(
                "PKCS#11: token {:?} already has a key labelled {:?}",
                self.settings.token, self.settings.key
            )));
        }
        let template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Label(self.settings.key.as_bytes().to_vec()),
        ];
        session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| hsm_err("generating the wrapping key", e))?;
        // What the token made must pass the same check as at every start.
        self.key(&session).map(|_| ())
    }

    /// Wraps the master key: `iv || AES-256-GCM(key, master, AAD)` computed inside the token.
    pub fn wrap(&self, master: &MasterKey) -> Result<Vec<u8>, Error> {
        let session = self.login(false)?;
        let key = self.key(&session)?;
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, AAD, TAG_BITS.into())
            .map_err(|e| hsm_err("GCM parameters", e))?;
        let sealed = session
            .encrypt(&Mechanism::AesGcm(params), key, master.expose())
            .map_err(|e| hsm_err("wrapping the master key (CKM_AES_GCM)", e))?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Unwraps a master key wrapped by [`Self::wrap`].
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<MasterKey, Error> {
        if wrapped.len() != IV_LEN + 32 + 16 {
            return Err(Error::Crypto(format!(
                "the wrapped master key is {} bytes, not {}",
                wrapped.len(),
                IV_LEN + 48
            )));
        }
        let session = self.login(false)?;
        let key = self.key(&session)?;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[..IV_LEN]);
        let params = GcmParams::new(&mut iv, AAD, TAG_BITS.into())
            .map_err(|e| hsm_err("GCM parameters", e))?;
        let plain = Zeroizing::new(
            session
                .decrypt(&Mechanism::AesGcm(params), key, &wrapped[IV_LEN..])
                .map_err(|e| {
                    hsm_err(
                        "unwrapping the master key (another token's key, or a damaged record)",
                        e,
                    )
                })?,
        );
        MasterKey::from_bytes(&plain)
    }
}
