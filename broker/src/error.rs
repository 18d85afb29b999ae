//! The broker's error type.

use std::path::PathBuf;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An input file is larger than the broker accepts.
    #[error("{path} is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// A cryptographic operation failed (never carries key material).
    #[error("crypto: {0}")]
    Crypto(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// An argument or input is not usable.
    #[error("{0}")]
    Input(String),
    /// The broker answered an admin call with an error.
    #[error("broker: {0}")]
    Remote(String),
    /// The request conflicts with the current state (e.g. a CA exists already).
    #[error("{0}")]
    Conflict(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The evidence was refused by verification.
    #[error("refused: {0}")]
    Refused(attestation::Error),
    /// The broker did not prove itself (`--require-attested-broker`): nothing was sent.
    #[error("the broker is not trusted: {0}; nothing was sent")]
    UntrustedBroker(String),
    /// A simulated-platform setting in a build without the `simulator` feature: a production
    /// binary cannot trust a simulated AMD root or run on a simulated platform.
    #[error(
        "{setting}: this broker was built without the `simulator` feature (a production build), which cannot trust a simulated AMD root or act as a simulated platform"
    )]
    NoSimulator {
        /// The setting or option that asked for the simulator.
        setting: &'static str,
    },
}

impl From<attestation::Error> for Error {
    /// Unusable input (bad PEM, a bad time) is an input error; everything else is a refusal
    /// of the evidence.
    fn from(e: attestation::Error) -> Self {
        match e {
            attestation::Error::InvalidInput { detail } => Error::Input(detail),
            other => Error::Refused(other),
        }
    }
}
