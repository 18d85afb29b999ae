//! The key broker: verifies SEV-SNP evidence and, from the broker service on, releases
//! secrets to guests whose evidence the operator's policy accepts.
//!
//! This crate holds the `broker` binary's library parts. Today: loading evidence files and
//! the `broker verify` command.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod evidence;
pub mod keys;
pub mod nonce;
pub mod policy_cmd;
pub mod release;
pub mod secrets;
pub mod server;
pub mod store;
pub mod verify_cmd;

pub use error::Error;
