//! Reading evidence from files: reports (raw or Azure HCL), certificates, chains and CRLs.

use std::io::Read;
use std::path::Path;

use attestation::certs::decode_pem_or_der;
use attestation::{HclReport, hcl};

use crate::Error;

/// Largest evidence file read (HCL reports and certificate chains are a few KiB).
pub const MAX_FILE: u64 = 1024 * 1024;

/// Reads a whole file, refusing files over [`MAX_FILE`].
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_FILE,
        });
    }
    Ok(bytes)
}

/// A report as found in a file.
#[derive(Debug)]
pub enum ReportInput {
    /// A raw SNP attestation report.
    Raw(Vec<u8>),
    /// An Azure vTPM HCL report wrapping one.
    Hcl(HclReport),
}

/// Reads a report file, detecting an Azure HCL report by its signature.
pub fn read_report(path: &Path) -> Result<ReportInput, Error> {
    let bytes = read_bounded(path)?;
    if hcl::is_hcl(&bytes) {
        Ok(ReportInput::Hcl(HclReport::parse(&bytes)?))
    } else {
        Ok(ReportInput::Raw(bytes))
    }
}

/// Reads one or more certificates or CRLs (DER, or PEM with several blocks).
pub fn read_certificates(path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let bytes = read_bounded(path)?;
    Ok(decode_pem_or_der(&bytes, &path.display().to_string())?)
}
