//! Azure confidential VMs: the HCL report read from the vTPM (NV index 0x01400001).
//!
//! Layout: a 32-byte header ("HCLA", version, report size, request type, status, reserved),
//! the 1184-byte SNP report at 0x20, IGVM request data at 0x4C0 (data size, version, report
//! type, hash type, variable-data size: five little-endian u32) and the variable data at
//! 0x4D4. The paravisor puts `hash(variable data)` in REPORT_DATA, zero-padded.

use aws_lc_rs::digest;
use serde::Serialize;

use crate::error::Error;
use crate::report::REPORT_LEN;

const MAGIC: &[u8; 4] = b"HCLA";
const HEADER_LEN: usize = 0x20;
const IGVM_OFFSET: usize = HEADER_LEN + REPORT_LEN;
const IGVM_HEADER_LEN: usize = 20;
const VAR_DATA_OFFSET: usize = IGVM_OFFSET + IGVM_HEADER_LEN;
/// Largest HCL report accepted (the vTPM NV index is a few KiB).
pub const MAX_HCL_LEN: usize = 64 * 1024;
/// IGVM report type of an SNP report.
const REPORT_TYPE_SNP: u32 = 2;

/// A structurally valid HCL report. Authenticity comes from verifying it with
/// [`crate::Verifier::verify_hcl`].
#[derive(Clone, Debug)]
pub struct HclReport {
    raw: Vec<u8>,
    hash_type: u32,
    var_data_len: usize,
}

/// Whether `bytes` look like an HCL report (by its magic), for input detection.
pub fn is_hcl(bytes: &[u8]) -> bool {
    bytes.len() > REPORT_LEN && bytes.starts_with(MAGIC)
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(offset..offset + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

impl HclReport {
    /// Parses an HCL report with bounds checks. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<HclReport, Error> {
        let err = |detail: &str| Error::HclMalformed {
            detail: detail.to_string(),
        };
        if bytes.len() > MAX_HCL_LEN {
            return Err(err("larger than 64 KiB"));
        }
        if bytes.len() < VAR_DATA_OFFSET {
            return Err(err("shorter than header, report and request data"));
        }
        if !bytes.starts_with(MAGIC) {
            return Err(err("missing HCLA signature"));
        }
        let read = |offset| u32_at(bytes, offset).ok_or_else(|| err("truncated"));
        let report_size = read(0x08)? as usize;
        let data_size = read(IGVM_OFFSET)? as usize;
        let report_type = read(IGVM_OFFSET + 8)?;
        let hash_type = read(IGVM_OFFSET + 12)?;
        let var_data_len = read(IGVM_OFFSET + 16)? as usize;
        if report_type != REPORT_TYPE_SNP {
            return Err(Error::HclMalformed {
                detail: format!("report type {report_type} is not SNP"),
            });
        }
        if !matches!(hash_type, 1..=3) {
            return Err(Error::HclMalformed {
                detail: format!("unsupported hash type {hash_type}"),
            });
        }
        if IGVM_HEADER_LEN.checked_add(var_data_len) != Some(data_size) {
            return Err(err("request data size disagrees with variable data size"));
        }
        let end = VAR_DATA_OFFSET
            .checked_add(var_data_len)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| err("variable data runs past the end"))?;
        if report_size != end {
            return Err(err("header report size disagrees with its contents"));
        }
        Ok(HclReport {
            raw: bytes.to_vec(),
            hash_type,
            var_data_len,
        })
    }

    /// The wrapped SNP attestation report (1184 bytes).
    pub fn snp_report(&self) -> &[u8] {
        self.raw.get(HEADER_LEN..IGVM_OFFSET).unwrap_or(&[])
    }

    /// The variable data (JSON) exactly as received.
    pub fn var_data(&self) -> &[u8] {
        self.raw
            .get(VAR_DATA_OFFSET..VAR_DATA_OFFSET + self.var_data_len)
            .unwrap_or(&[])
    }

    /// Checks that REPORT_DATA starts with the hash of the variable data and is zero after it.
    pub fn check_var_data_digest(&self, report_data: &[u8; 64]) -> Result<(), Error> {
        let algorithm = match self.hash_type {
            1 => &digest::SHA256,
            2 => &digest::SHA384,
            _ => &digest::SHA512,
        };
        let d = digest::digest(algorithm, self.var_data());
        let n = d.as_ref().len();
        let (head, tail) = report_data.split_at(n.min(64));
        if head != d.as_ref() || tail.iter().any(|b| *b != 0) {
            return Err(Error::HclVarDataDigest);
        }
        Ok(())
    }

    /// The variable data's fields, decoded. Call after [`HclReport::check_var_data_digest`].
    pub fn var_data_claims(&self) -> Result<AzureVarData, Error> {
        AzureVarData::parse(self.var_data())
    }
}

/// An RSA public key in JWK form, as the HCL variable data carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RsaJwk {
    /// Key id ("HCLAkPub", "HCLEkPub").
    pub kid: String,
    /// Modulus, base64url.
    pub n: String,
    /// Exponent, base64url.
    pub e: String,
}

/// The claims carried by the HCL variable data.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AzureVarData {
    /// The vTPM attestation key (HCLAkPub), which signs TPM quotes.
    pub attestation_key: Option<RsaJwk>,
    /// The vTPM endorsement key (HCLEkPub).
    pub endorsement_key: Option<RsaJwk>,
    /// Secure boot enabled.
    pub secure_boot: Option<bool>,
    /// vTPM enabled.
    pub tpm_enabled: Option<bool>,
    /// Serial console enabled.
    pub console_enabled: Option<bool>,
    /// vTPM state persisted.
    pub tpm_persisted: Option<bool>,
    /// The VM's unique id.
    pub vm_id: Option<String>,
    /// The user data written to NV index 0x01400002 (hex, as Azure writes it).
    pub user_data: Option<String>,
}

impl AzureVarData {
    /// Decodes the variable data JSON. Only its being JSON is required: a field of an
    /// unexpected type is treated as absent (policies on it then fail closed).
    pub fn parse(json: &[u8]) -> Result<AzureVarData, Error> {
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| Error::HclMalformed {
                detail: format!("variable data is not JSON: {e}"),
            })?;
        let key = |kid: &str| {
            v.get("keys")?
                .as_array()?
                .iter()
                .find(|k| {
                    k.get("kid").and_then(|x| x.as_str()) == Some(kid)
                        && k.get("kty").and_then(|x| x.as_str()) == Some("RSA")
                })
                .and_then(|k| {
                    Some(RsaJwk {
                        kid: kid.to_string(),
                        n: k.get("n")?.as_str()?.to_string(),
                        e: k.get("e")?.as_str()?.to_string(),
                    })
                })
        };
        let vm = v.get("vm-configuration");
        let flag = |name: &str| {
            vm.and_then(|c| c.get(name))
                .and_then(serde_json::Value::as_bool)
        };
        Ok(AzureVarData {
            attestation_key: key("HCLAkPub"),
            endorsement_key: key("HCLEkPub"),
            secure_boot: flag("secure-boot"),
            tpm_enabled: flag("tpm-enabled"),
            console_enabled: flag("console-enabled"),
            tpm_persisted: flag("tpm-persisted"),
            vm_id: vm
                .and_then(|c| c.get("vmUniqueId"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            user_data: v
                .get("user-data")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::AttestationReport;

    const GENOA: &[u8] = include_bytes!("../tests/data/trustee-azure-genoa-v3/hcl-report.bin");
    const GENOA_REPORT: &[u8] = include_bytes!("../tests/data/trustee-azure-genoa-v3/report.bin");

    #[test]
    fn parses_genuine_hcl() {
        assert!(is_hcl(GENOA));
        let hcl = HclReport::parse(GENOA).unwrap();
        assert_eq!(hcl.snp_report(), GENOA_REPORT);
        let report = AttestationReport::parse(hcl.snp_report()).unwrap();
        hcl.check_var_data_digest(&report.report_data()).unwrap();
        let claims = hcl.var_data_claims().unwrap();
        assert_eq!(claims.secure_boot, Some(true));
        assert_eq!(
            claims.vm_id.as_deref(),
            Some("390CBCF5-6C67-4D9B-98EF-C3F1699CC8FC")
        );
        assert_eq!(claims.attestation_key.unwrap().e, "AQAB");
    }

    #[test]
    fn tampered_var_data_is_refused() {
        let mut bytes = GENOA.to_vec();
        // "secure-boot":true → "secure-boot":fals… changes the hashed bytes.
        let pos = bytes.windows(4).position(|w| w == b"true").unwrap();
        bytes[pos] = b'T';
        let hcl = HclReport::parse(&bytes).unwrap();
        let report = AttestationReport::parse(hcl.snp_report()).unwrap();
        assert_eq!(
            hcl.check_var_data_digest(&report.report_data()),
            Err(Error::HclVarDataDigest)
        );
    }

    #[test]
    fn malformed_headers_are_errors_not_panics() {
        for len in 0..VAR_DATA_OFFSET + 8 {
            assert!(HclReport::parse(&GENOA[..len]).is_err());
        }
        for (offset, value) in [
            (IGVM_OFFSET + 12, 9u32),     // hash type
            (IGVM_OFFSET + 8, 4),         // report type (TDX)
            (IGVM_OFFSET + 16, u32::MAX), // var data size
            (IGVM_OFFSET, 0),             // data size
            (0x08, 1),                    // header report size
        ] {
            let mut bytes = GENOA.to_vec();
            bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            assert!(matches!(
                HclReport::parse(&bytes),
                Err(Error::HclMalformed { .. })
            ));
        }
    }
}
