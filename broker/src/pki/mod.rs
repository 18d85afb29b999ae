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
