//! The key broker: verifies SEV-SNP evidence and, from the broker service on, releases
//! secrets to guests whose evidence the operator's policy accepts.
//!
//! The library behind the `broker` binary: the release engine ([`release`]), the HTTPS
//! service ([`server`]), the store ([`store`]), the operator CLI's client ([`client`]) and the
//! offline commands (`verify`, `policy`, `init`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod attested;
pub mod audit;
pub mod client;
pub mod config;
pub mod error;
pub mod evidence;
pub mod hsm;
pub mod init;
pub mod kbs;
pub mod kds;
pub mod keyring;
pub mod keys;
pub mod limit;
pub mod measure;
pub mod nonce;
pub mod pki;
pub mod platform;
pub mod policy_cmd;
pub mod release;
pub mod secrets;
pub mod server;
pub mod store;
pub mod verify_cmd;

pub use error::Error;
