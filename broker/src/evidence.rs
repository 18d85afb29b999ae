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

/// Adds the simulated ARK in `path` (its first certificate; any others, the simulated ASK and
/// ASVK, become intermediates) to `anchors`. `setting` names the option that asked, for the
/// error of a build without the `simulator` feature, which has no way to trust it.
#[cfg(feature = "simulator")]
pub fn trust_simulated_root(
    anchors: attestation::TrustAnchors,
    path: &Path,
    setting: &'static str,
) -> Result<attestation::TrustAnchors, Error> {
    let _ = setting;
    let mut certs = read_certificates(path)?.into_iter();
    let ark = certs
        .next()
        .ok_or_else(|| Error::Input(format!("{}: no certificate", path.display())))?;
    let mut anchors = anchors.dangerous_trust_simulated_root(&ark)?;
    for intermediate in certs {
        anchors = anchors.with_intermediate(&intermediate);
    }
    Ok(anchors)
}

/// Without the `simulator` feature no simulated root can be trusted: always
/// [`Error::NoSimulator`].
#[cfg(not(feature = "simulator"))]
pub fn trust_simulated_root(
    _anchors: attestation::TrustAnchors,
    _path: &Path,
    setting: &'static str,
) -> Result<attestation::TrustAnchors, Error> {
    Err(Error::NoSimulator { setting })
}
