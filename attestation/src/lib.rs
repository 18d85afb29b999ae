//! Verification of AMD SEV-SNP attestation evidence.
//!
//! This crate decides whether a piece of evidence is genuine. It parses the raw report with
//! bounds checks, verifies AMD's endorsement chain against pinned roots, checks the
//! VCEK/VLEK extensions against the report, verifies the ECDSA P-384 signature over the
//! received bytes, and produces typed [`Claims`]. It reads no clock, network or file: the
//! verification time is a parameter.
//!
//! ```no_run
//! # fn main() -> Result<(), attestation::Error> {
//! use attestation::{Endorsements, TrustAnchors, Verifier};
//! let verifier = Verifier::new(TrustAnchors::amd()?);
//! let report = std::fs::read("report.bin").unwrap_or_default();
//! let vcek = std::fs::read("vcek.der").unwrap_or_default();
//! let endorsements = Endorsements { vek: vcek, ..Default::default() };
//! let verified = verifier.verify(&report, &endorsements, std::time::SystemTime::now())?;
//! println!("{}", verified.claims().measurement);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod binding;
pub mod broker_evidence;
pub mod cert_table;
pub mod certs;
pub mod chain;
pub mod claims;
pub mod csr;
pub mod error;
pub mod hcl;
pub mod kbs;
pub mod ocsp;
pub mod ovmf;
pub mod policy;
pub mod protocol;
pub mod report;
#[cfg(feature = "simulator")]
pub mod sim;
pub mod tpm;
mod verify;

pub use chain::{Endorsements, RootKind, TrustAnchors, VerifiedChain};
pub use claims::Claims;
pub use error::{CertRole, Error, TcbComponent};
pub use hcl::HclReport;
pub use report::{AttestationReport, Product, SigningKeyKind};
pub use verify::{VerifiedReport, Verifier};
