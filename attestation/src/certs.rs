//! Certificate decoding: DER/PEM input, AMD's signature algorithm, and the VCEK/VLEK extensions.

use der::asn1::{AnyRef, BitStringRef, Ia5StringRef};
use der::{Decode, Encode, Sequence};
use spki::AlgorithmIdentifierRef;
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;

use crate::error::{CertRole, Error};

/// Largest certificate or CRL accepted (AMD's are under 2 KiB; CRLs grow slowly).
pub const MAX_DER_LEN: usize = 256 * 1024;

pub(crate) const OID_RSASSA_PSS: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
pub(crate) const OID_RSA_ENCRYPTION: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
pub(crate) const OID_EC_PUBLIC_KEY: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
pub(crate) const OID_SECP384R1: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// RSASSA-PSS parameters as AMD encodes them: SHA-384, MGF1 with SHA-384, salt length 48 and
/// an explicit (default) trailerField of 1.
pub const AMD_PSS_PARAMS: &[u8] = &[
    0x30, 0x39, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
    0x02, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
    0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0xa2, 0x03, 0x02, 0x01, 0x30, 0xa3, 0x03, 0x02, 0x01, 0x01,
];
/// The same parameters in canonical DER, with the default trailerField omitted.
/// (Public for tests that build certificates with either encoding.)
pub const CANONICAL_PSS_PARAMS: &[u8] = &[
    0x30, 0x34, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
    0x02, 0x05, 0x00, 0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
    0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0xa2, 0x03, 0x02, 0x01, 0x30,
];

/// AMD's VCEK/VLEK extension OIDs (under 1.3.6.1.4.1.3704.1).
pub mod oid {
    /// structVersion.
    pub const STRUCT_VERSION: &str = "1.3.6.1.4.1.3704.1.1";
    /// Product name, e.g. "Milan-B0".
    pub const PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
    /// Boot loader SPL.
    pub const BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
    /// TEE SPL.
    pub const TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
    /// SNP SPL.
    pub const SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
    /// Microcode SPL.
    pub const UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
    /// FMC SPL (Turin).
    pub const FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
    /// Hardware ID (raw bytes).
    pub const HWID: &str = "1.3.6.1.4.1.3704.1.4";
    /// Cloud service provider id (VLEK).
    pub const CSP_ID: &str = "1.3.6.1.4.1.3704.1.5";
}

/// A signed X.509 structure (certificate or CRL) split into the exact signed bytes, the
/// signature algorithm and the signature.
#[derive(Sequence)]
struct SignedRaw<'a> {
    tbs: AnyRef<'a>,
    algorithm: AlgorithmIdentifierRef<'a>,
    signature: BitStringRef<'a>,
}

/// The parts of a signed structure a signature check needs, copied out of the input.
#[derive(Clone, Debug)]
pub(crate) struct Signed {
    /// The to-be-signed bytes exactly as received (tag, length and value).
    pub tbs: Vec<u8>,
    /// The signature bits.
    pub signature: Vec<u8>,
    /// Whether the outer algorithm is AMD's RSASSA-PSS/SHA-384.
    pub amd_pss: bool,
}

pub(crate) fn split_signed(der: &[u8]) -> Result<Signed, der::Error> {
    let raw = SignedRaw::from_der(der)?;
    let tbs = raw.tbs.to_der()?;
    let amd_pss = is_amd_pss(&raw.algorithm);
    let signature = raw
        .signature
        .as_bytes()
        .ok_or_else(|| {
            der::Error::from(der::ErrorKind::Noncanonical {
                tag: der::Tag::BitString,
            })
        })?
        .to_vec();
    Ok(Signed {
        tbs,
        signature,
        amd_pss,
    })
}

fn is_amd_pss(alg: &AlgorithmIdentifierRef<'_>) -> bool {
    if alg.oid != OID_RSASSA_PSS {
        return false;
    }
    match alg.parameters.map(|p| p.to_der()) {
        Some(Ok(params)) => params == AMD_PSS_PARAMS || params == CANONICAL_PSS_PARAMS,
        _ => false,
    }
}

/// Whether an algorithm identifier (from a decoded certificate) is AMD's RSASSA-PSS/SHA-384.
pub(crate) fn is_amd_pss_owned(alg: &spki::AlgorithmIdentifierOwned) -> bool {
    match alg.to_der() {
        Ok(der) => match AlgorithmIdentifierRef::from_der(&der) {
            Ok(r) => is_amd_pss(&r),
            Err(_) => false,
        },
        Err(_) => false,
    }
}

/// PEM-encodes a DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// Splits a PEM or DER input into DER certificates (or CRLs). PEM may hold several blocks.
pub fn decode_pem_or_der(input: &[u8], label: &str) -> Result<Vec<Vec<u8>>, Error> {
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(trimmed).map_err(|_| Error::InvalidInput {
            detail: format!("{label}: PEM is not UTF-8"),
        })?;
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("-----BEGIN") {
            let block = rest.get(start..).unwrap_or("");
            let end_marker = block.find("-----END").ok_or_else(|| Error::InvalidInput {
                detail: format!("{label}: unterminated PEM block"),
            })?;
            let after_end = block.get(end_marker + 8..).unwrap_or("");
            let close = after_end.find("-----").ok_or_else(|| Error::InvalidInput {
                detail: format!("{label}: unterminated PEM block"),
            })?;
            let block_len = end_marker + 8 + close + 5;
            let pem_block = block.get(..block_len).unwrap_or("");
            let (_label, der) =
                pem_rfc7468_decode(pem_block.as_bytes()).map_err(|e| Error::InvalidInput {
                    detail: format!("{label}: {e}"),
                })?;
            out.push(der);
            rest = block.get(block_len..).unwrap_or("");
        }
        if out.is_empty() {
            return Err(Error::InvalidInput {
                detail: format!("{label}: no PEM block"),
            });
        }
        Ok(out)
    } else if input.is_empty() {
        Err(Error::InvalidInput {
            detail: format!("{label}: empty"),
        })
    } else {
        Ok(vec![input.to_vec()])
    }
}

fn pem_rfc7468_decode(block: &[u8]) -> Result<(String, Vec<u8>), String> {
    let (label, der) = der::pem::decode_vec(block).map_err(|e| e.to_string())?;
    Ok((label.to_string(), der))
}

/// Decodes one DER certificate, bounded in size.
pub(crate) fn parse_certificate(der: &[u8], role: CertRole) -> Result<Certificate, Error> {
    if der.len() > MAX_DER_LEN {
        return Err(Error::CertificateMalformed {
            role,
            detail: format!("{} bytes is too large", der.len()),
        });
    }
    Certificate::from_der(der).map_err(|e| Error::CertificateMalformed {
        role,
        detail: e.to_string(),
    })
}

/// The common name of a certificate's subject or issuer, if any.
pub(crate) fn common_name(name: &x509_cert::name::Name) -> Option<String> {
    let cn = const_oid::db::rfc4519::CN;
    for atv in name.iter() {
        if atv.oid == cn {
            let value = &atv.value;
            if let Ok(s) = value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                return Some(s.as_str().to_string());
            }
            if let Ok(s) = value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                return Some(s.as_str().to_string());
            }
        }
    }
    None
}

/// The values of AMD's extensions in a VCEK or VLEK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmdExtensions {
    /// Product name ("Milan-B0", "Genoa", "Turin", …).
    pub product_name: Option<String>,
    /// Boot loader SPL.
    pub bl_spl: Option<u64>,
    /// TEE SPL.
    pub tee_spl: Option<u64>,
    /// SNP SPL.
    pub snp_spl: Option<u64>,
    /// Microcode SPL.
    pub ucode_spl: Option<u64>,
    /// FMC SPL (Turin).
    pub fmc_spl: Option<u64>,
    /// Hardware ID (VCEK only).
    pub hwid: Option<Vec<u8>>,
    /// Cloud service provider (VLEK only).
    pub csp_id: Option<String>,
}

impl AmdExtensions {
    /// Reads AMD's extensions from a certificate. Unknown extensions are ignored unless critical.
    pub(crate) fn from_certificate(cert: &Certificate, role: CertRole) -> Result<Self, Error> {
        let mut out = AmdExtensions::default();
        let Some(exts) = cert.tbs_certificate().extensions() else {
            return Ok(out);
        };
        for ext in exts.iter() {
            let id = ext.extn_id.to_string();
            let value = ext.extn_value.as_bytes();
            let malformed = || Error::MalformedExtension {
                role,
                oid: id.clone(),
            };
            let int = || u64::from_der(value).map_err(|_| malformed());
            match id.as_str() {
                oid::PRODUCT_NAME => {
                    let s = Ia5StringRef::from_der(value).map_err(|_| malformed())?;
                    out.product_name = Some(s.as_str().to_string());
                }
                oid::BL_SPL => out.bl_spl = Some(int()?),
                oid::TEE_SPL => out.tee_spl = Some(int()?),
                oid::SNP_SPL => out.snp_spl = Some(int()?),
                oid::UCODE_SPL => out.ucode_spl = Some(int()?),
                oid::FMC_SPL => out.fmc_spl = Some(int()?),
                oid::HWID => out.hwid = Some(value.to_vec()),
                oid::CSP_ID => {
                    let s = Ia5StringRef::from_der(value).map_err(|_| malformed())?;
                    out.csp_id = Some(s.as_str().to_string());
                }
                _ if ext.critical && !is_known_critical(&ext.extn_id) => {
                    return Err(Error::CertificateMalformed {
                        role,
                        detail: format!("unknown critical extension {id}"),
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

fn is_known_critical(id: &der::oid::ObjectIdentifier) -> bool {
    use const_oid::db::rfc5280::{ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE};
    *id == ID_CE_BASIC_CONSTRAINTS || *id == ID_CE_KEY_USAGE
}

/// The CRL distribution point URIs of a certificate (informational).
pub fn crl_distribution_points(cert_der: &[u8]) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let Ok(Some((_, points))) = cert
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::CrlDistributionPoints>()
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for point in points.0.iter() {
        if let Some(x509_cert::ext::pkix::name::DistributionPointName::FullName(names)) =
            &point.distribution_point
        {
            for name in names {
                if let GeneralName::UniformResourceIdentifier(uri) = name {
                    out.push(uri.as_str().to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCEK: &[u8] = include_bytes!("../tests/data/trustee-milan-v2/vek.der");
    const VLEK: &[u8] = include_bytes!("../tests/data/trustee-aws-vlek-milan-v3/vek.der");
    const TURIN: &[u8] =
        include_bytes!("../tests/data/invalid/cross-chip-turin/vcek_turin_other_chip.der");

    #[test]
    fn amd_signature_algorithm_is_recognised() {
        let signed = split_signed(VCEK).unwrap();
        assert!(signed.amd_pss);
        assert_eq!(signed.signature.len(), 512);
        let cert = parse_certificate(VCEK, CertRole::Vcek).unwrap();
        assert!(is_amd_pss_owned(cert.signature_algorithm()));
        // The signed bytes are the received ones.
        assert_eq!(&VCEK[4..4 + signed.tbs.len()], signed.tbs.as_slice());
    }

    #[test]
    fn reads_vcek_extensions() {
        let cert = parse_certificate(VCEK, CertRole::Vcek).unwrap();
        let ext = AmdExtensions::from_certificate(&cert, CertRole::Vcek).unwrap();
        assert_eq!(ext.product_name.as_deref(), Some("Milan-B0"));
        assert_eq!(
            (ext.bl_spl, ext.tee_spl, ext.snp_spl, ext.ucode_spl),
            (Some(3), Some(0), Some(8), Some(115))
        );
        assert_eq!(ext.hwid.as_ref().map(Vec::len), Some(64));
        assert_eq!(ext.csp_id, None);
    }

    #[test]
    fn reads_vlek_and_turin_extensions() {
        let cert = parse_certificate(VLEK, CertRole::Vlek).unwrap();
        let ext = AmdExtensions::from_certificate(&cert, CertRole::Vlek).unwrap();
        assert_eq!(ext.ucode_spl, Some(217), "two-byte INTEGER");
        assert_eq!(ext.csp_id.as_deref(), Some("CN=cc-us-east-2.amazonaws.com"));
        assert_eq!(ext.hwid, None);

        let cert = parse_certificate(TURIN, CertRole::Vcek).unwrap();
        let ext = AmdExtensions::from_certificate(&cert, CertRole::Vcek).unwrap();
        assert_eq!(
            ext.hwid.as_deref(),
            Some(&hex::decode("1e550a8ee5cf9f4d").unwrap()[..])
        );
        assert_eq!(ext.fmc_spl, Some(0));
        assert_eq!(ext.ucode_spl, Some(9));
    }

    #[test]
    fn pem_and_der_inputs() {
        let pem = include_bytes!("../tests/data/trustee-milan-v2/ask_ark.pem");
        let ders = decode_pem_or_der(pem, "chain").unwrap();
        assert_eq!(ders.len(), 2);
        assert_eq!(decode_pem_or_der(VCEK, "vek").unwrap(), vec![VCEK.to_vec()]);
        assert!(decode_pem_or_der(b"", "x").is_err());
        assert!(decode_pem_or_der(b"-----BEGIN CERTIFICATE-----\nAAAA", "x").is_err());
    }

    #[test]
    fn garbage_certificates_are_errors() {
        for len in 0..64 {
            let bytes = &VCEK[..len];
            assert!(parse_certificate(bytes, CertRole::Vcek).is_err());
            assert!(split_signed(bytes).is_err());
        }
    }
}
