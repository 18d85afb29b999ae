//! The broker as a private CA for measured workloads (docs/pki.md).
//!
//! This part is the issuing CA itself: its key is a broker key (`pki-ca`), sealed at rest
//! under the data key like every secret and re-encrypted by `keys rotate`; its certificate is
//! either self-signed or issued by the operator's offline root from a request the broker
//! writes. `ca rotate` makes a new issuing key; older versions stay published so that what
//! they issued keeps verifying until it expires.

pub mod authority;
pub mod ca;
pub mod issue;
pub mod ocsp;
pub mod revoke;

pub use ca::{CaInfo, CaPublic, NewCa};

use std::time::SystemTime;

use crate::Error;

/// Seconds since the epoch (0 before it, saturating).
pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A random positive 16-byte serial.
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, Error> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error::Crypto("random serial".into()))?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01; // never a shorter encoding
    Ok(rcgen::SerialNumber::from_slice(&serial))
}
