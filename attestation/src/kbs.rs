//! The Confidential Containers KBS protocol's evidence and binding, decoded strictly.
//!
//! KBS clients (the attestation agent, `kbs-client`) send SNP evidence as the serde JSON of the
//! `sev` crate's report type, not as the bytes the firmware signed. [`snp_evidence`] rebuilds
//! the exact 1184 bytes from that JSON, with the layout of the report's generation, and
//! refuses anything that does not map onto those bytes one way only: an unknown or missing
//! member, a byte array of the wrong length, a TCB member the generation has no byte for,
//! CPUID fields on a version 2 report or mitigation vectors before version 5. The signature
//! is then verified over the rebuilt bytes, so a lost or misplaced field fails it.
//!
//! The binding is `H(JCS({"additional-evidence", "nonce", "tee-pubkey"}))` (RFC 8785
//! canonical JSON), computed here from the members as received.

use aws_lc_rs::digest;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::error::Error;
use crate::protocol::{CertificateEntry, Evidence, TpmQuote, encode_b64};
use crate::report::{Product, REPORT_LEN, SIGNED_LEN, Tcb};

/// The only protocol version KBS clients speak (and Trustee accepts).
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// Most certificate table entries accepted with SNP evidence.
pub const MAX_CERT_ENTRIES: usize = 8;

/// The hash a KBS client binds its runtime data with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// SHA-384, zero-padded to 64 bytes in an SNP report (what clients use when the server
    /// selects nothing).
    Sha384,
    /// SHA-512 (what the broker selects).
    Sha512,
}

impl HashAlgorithm {
    /// The name in `supported-hash-algorithms` and `selected-hash-algorithm`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha384 => "sha384",
            HashAlgorithm::Sha512 => "sha512",
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let algorithm = match self {
            HashAlgorithm::Sha384 => &digest::SHA384,
            HashAlgorithm::Sha512 => &digest::SHA512,
        };
        digest::digest(algorithm, data).as_ref().to_vec()
    }
}

fn evidence_err(detail: impl Into<String>) -> Error {
    Error::KbsEvidence {
        detail: detail.into(),
    }
}

/// The runtime-data digest a KBS client puts in REPORT_DATA (and, on Azure, in the quote's
/// qualifying data and the HCL user data): `H(JCS({"additional-evidence": additional,
/// "nonce": nonce, "tee-pubkey": tee_pubkey}))`, over the `tee-pubkey` JSON as received.
pub fn runtime_digest(
    additional_evidence: &str,
    nonce: &str,
    tee_pubkey: &Value,
    hash: HashAlgorithm,
) -> Result<Vec<u8>, Error> {
    Ok(hash.digest(&runtime_data(additional_evidence, nonce, tee_pubkey)?))
}

/// The runtime data a KBS client binds, in RFC 8785 canonical form (hash it with
/// [`HashAlgorithm::digest`]; canonicalize once for several hashes).
pub fn runtime_data(
    additional_evidence: &str,
    nonce: &str,
    tee_pubkey: &Value,
) -> Result<Vec<u8>, Error> {
    let document = serde_json::json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    });
    serde_json_canonicalizer::to_vec(&document)
        .map_err(|e| evidence_err(format!("runtime data cannot be canonicalized: {e}")))
}

/// A digest as the 64 bytes of REPORT_DATA: SHA-512 fills it, SHA-384 is zero-padded (as
/// the guest components' SNP attester does).
pub fn report_data(runtime_digest: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    let n = runtime_digest.len().min(64);
    out[..n].copy_from_slice(&runtime_digest[..n]);
    out
}

/// A byte array of exactly `N` numbers in JSON.
struct Fixed<const N: usize>([u8; N]);

impl<'de, const N: usize> Deserialize<'de> for Fixed<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        let len = bytes.len();
        <[u8; N]>::try_from(bytes).map(Fixed).map_err(|_| {
            serde::de::Error::custom(format!("expected an array of {N} bytes, got {len}"))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcbJson {
    #[serde(default)]
    fmc: Option<u8>,
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionJson {
    major: u8,
    minor: u8,
    build: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureJson {
    r: Fixed<72>,
    s: Fixed<72>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportJson {
    version: u32,
    guest_svn: u32,
    policy: u64,
    family_id: Fixed<16>,
    image_id: Fixed<16>,
    vmpl: u32,
    sig_algo: u32,
    current_tcb: TcbJson,
    plat_info: u64,
    key_info: u32,
    report_data: Fixed<64>,
    measurement: Fixed<48>,
    host_data: Fixed<32>,
    id_key_digest: Fixed<48>,
    author_key_digest: Fixed<48>,
    report_id: Fixed<32>,
    report_id_ma: Fixed<32>,
    reported_tcb: TcbJson,
    #[serde(default)]
    cpuid_fam_id: Option<u8>,
    #[serde(default)]
    cpuid_mod_id: Option<u8>,
    #[serde(default)]
    cpuid_step: Option<u8>,
    chip_id: Fixed<64>,
    committed_tcb: TcbJson,
    current: VersionJson,
    committed: VersionJson,
    launch_tcb: TcbJson,
    #[serde(default)]
    launch_mit_vector: Option<u64>,
    #[serde(default)]
    current_mit_vector: Option<u64>,
    signature: SignatureJson,
}

#[derive(Deserialize)]
enum CertTypeJson {
    #[serde(rename = "ARK")]
    Ark,
    #[serde(rename = "ASK")]
    Ask,
    #[serde(rename = "VCEK")]
    Vcek,
    #[serde(rename = "VLEK")]
    Vlek,
    #[serde(rename = "CRL")]
    Crl,
    Empty,
    #[serde(rename = "OTHER")]
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertJson {
    cert_type: CertTypeJson,
    data: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnpEvidenceJson {
    attestation_report: ReportJson,
    cert_chain: Option<Vec<CertJson>>,
}

/// Writes the bytes of a report from its JSON form (see the module documentation).
fn rebuild(r: &ReportJson) -> Result<[u8; REPORT_LEN], Error> {
    let cpuid = match (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) {
        (None, None, None) => None,
        (Some(f), Some(m), Some(s)) => Some((f, m, s)),
        _ => {
            return Err(evidence_err(
                "cpuid_fam_id, cpuid_mod_id and cpuid_step are all set or all null",
            ));
        }
    };
    let product = match (r.version, cpuid) {
        (2, None) => Product::Genoa, // Milan and Genoa share the TCB layout.
        (2, Some(_)) => {
            return Err(evidence_err("a version 2 report has no CPUID fields"));
        }
        (3 | 5, Some((family, model, _))) => {
            Product::from_cpuid(family, model).ok_or(Error::UnknownProduct { family, model })?
        }
        (3 | 5, None) => {
            return Err(evidence_err(format!(
                "a version {} report carries its CPUID fields",
                r.version
            )));
        }
        (version, _) => return Err(Error::UnsupportedVersion { version }),
    };
    let mit = match (r.version, r.launch_mit_vector, r.current_mit_vector) {
        (5, Some(l), Some(c)) => Some((l, c)),
        (5, _, _) => {
            return Err(evidence_err(
                "a version 5 report carries launch_mit_vector and current_mit_vector",
            ));
        }
        (_, None, None) => None,
        _ => {
            return Err(evidence_err(format!(
                "a version {} report has no mitigation vectors",
                r.version
            )));
        }
    };
    let tcb = |t: &TcbJson, field: &str| -> Result<[u8; 8], Error> {
        match (product, t.fmc) {
            (Product::Turin, None) => Err(evidence_err(format!("{field}.fmc is missing (Turin)"))),
            (Product::Milan | Product::Genoa, Some(_)) => Err(evidence_err(format!(
                "{field}.fmc is set, but {product} reports have no FMC SPL"
            ))),
            _ => Ok(Tcb {
                fmc: t.fmc,
                bootloader: t.bootloader,
                tee: t.tee,
                snp: t.snp,
                microcode: t.microcode,
            }
            .encode(product)),
        }
    };
    let mut b = [0u8; REPORT_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        if let Some(slot) = b.get_mut(offset..offset + bytes.len()) {
            slot.copy_from_slice(bytes);
        }
    };
    put(0x00, &r.version.to_le_bytes());
    put(0x04, &r.guest_svn.to_le_bytes());
    put(0x08, &r.policy.to_le_bytes());
    put(0x10, &r.family_id.0);
    put(0x20, &r.image_id.0);
    put(0x30, &r.vmpl.to_le_bytes());
    put(0x34, &r.sig_algo.to_le_bytes());
    put(0x38, &tcb(&r.current_tcb, "current_tcb")?);
    put(0x40, &r.plat_info.to_le_bytes());
    put(0x48, &r.key_info.to_le_bytes());
    put(0x50, &r.report_data.0);
    put(0x90, &r.measurement.0);
    put(0xC0, &r.host_data.0);
    put(0xE0, &r.id_key_digest.0);
    put(0x110, &r.author_key_digest.0);
    put(0x140, &r.report_id.0);
    put(0x160, &r.report_id_ma.0);
    put(0x180, &tcb(&r.reported_tcb, "reported_tcb")?);
    if let Some((family, model, stepping)) = cpuid {
        put(0x188, &[family, model, stepping]);
    }
    put(0x1A0, &r.chip_id.0);
    put(0x1E0, &tcb(&r.committed_tcb, "committed_tcb")?);
    put(0x1E8, &[r.current.build, r.current.minor, r.current.major]);
    put(
        0x1EC,
        &[r.committed.build, r.committed.minor, r.committed.major],
    );
    put(0x1F0, &tcb(&r.launch_tcb, "launch_tcb")?);
    if let Some((launch, current)) = mit {
        put(0x1F8, &launch.to_le_bytes());
        put(0x200, &current.to_le_bytes());
    }
    put(SIGNED_LEN, &r.signature.r.0);
    put(SIGNED_LEN + 72, &r.signature.s.0);
    Ok(b)
}

/// Decodes `tee: "snp"` evidence (the `sev` crate's JSON report and certificate table, as
/// the JSON text received) into the broker's evidence: the rebuilt report bytes, parsed once
/// here so that a report that does not parse is refused for that, and its certificates.
pub fn snp_evidence(primary: &str) -> Result<Evidence, Error> {
    // Straight from the text into the typed fields: no JSON tree of some 15 000 numbers.
    let json: SnpEvidenceJson =
        serde_json::from_str(primary).map_err(|e| evidence_err(format!("SNP evidence: {e}")))?;
    let report = rebuild(&json.attestation_report)?;
    crate::AttestationReport::parse(&report)?;
    let mut certificates = Vec::new();
    let entries = json.cert_chain.unwrap_or_default();
    if entries.len() > MAX_CERT_ENTRIES {
        return Err(evidence_err(format!(
            "{} certificate table entries (at most {MAX_CERT_ENTRIES})",
            entries.len()
        )));
    }
    for entry in entries {
        let kind = match entry.cert_type {
            CertTypeJson::Ark => "ark",
            CertTypeJson::Ask => "ask",
            CertTypeJson::Vcek => "vcek",
            CertTypeJson::Vlek => "vlek",
            CertTypeJson::Crl => "crl",
            // The table's terminator, and vendor entries the verifier has no use for.
            CertTypeJson::Empty | CertTypeJson::Other(_) => continue,
        };
        certificates.push(CertificateEntry {
            kind: kind.into(),
            der: encode_b64(&entry.data),
        });
    }
    Ok(Evidence::Snp {
        report: encode_b64(&report),
        certificates,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AzQuoteJson {
    signature: String,
    message: String,
    pcrs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AzEvidenceJson {
    version: u32,
    tpm_quote: AzQuoteJson,
    hcl_report: String,
    vcek: String,
}

/// Decodes `tee: "az-snp-vtpm"` evidence (version 2: hex quote, base64url HCL report and
/// VCEK) into the broker's Azure evidence.
pub fn az_snp_vtpm_evidence(primary: &str) -> Result<Evidence, Error> {
    let json: AzEvidenceJson = serde_json::from_str(primary)
        .map_err(|e| evidence_err(format!("az-snp-vtpm evidence: {e}")))?;
    if json.version != 2 {
        return Err(evidence_err(format!(
            "az-snp-vtpm evidence version {} (only version 2 is understood)",
            json.version
        )));
    }
    let b64url = |s: &str, field: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| evidence_err(format!("{field} is not base64url")))
    };
    let hexed = |s: &str, field: &str| {
        hex::decode(s).map_err(|_| evidence_err(format!("tpm_quote.{field} is not hex")))
    };
    let hcl = b64url(&json.hcl_report, "hcl_report")?;
    let vcek = b64url(&json.vcek, "vcek")?;
    let quote = TpmQuote {
        message: encode_b64(&hexed(&json.tpm_quote.message, "message")?),
        signature: encode_b64(&hexed(&json.tpm_quote.signature, "signature")?),
        pcrs: json.tpm_quote.pcrs,
    };
    // Bounds and shape of the quote are checked by its decoder, as for native evidence.
    quote.decode()?;
    crate::HclReport::parse(&hcl)?;
    Ok(Evidence::AzSnpVtpm {
        hcl_report: encode_b64(&hcl),
        quote,
        certificates: vec![CertificateEntry {
            kind: "vcek".into(),
            der: encode_b64(&vcek),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jcs_digest_matches_trustees_vector() {
        // The vector from the facts file: SHA-384 over JCS of {"b":1,"a":"test","c":{"d":"e"}}.
        let v: Value = serde_json::from_str(r#"{"b":1,"a":"test","c":{"d":"e"}}"#).unwrap();
        let canonical = serde_json_canonicalizer::to_vec(&v).unwrap();
        assert_eq!(
            hex::encode(digest::digest(&digest::SHA384, &canonical)),
            "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3"
        );
    }

    #[test]
    fn runtime_digest_is_over_the_canonical_members() {
        let key: Value = serde_json::from_str(
            r#"{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x":"AA","y":"AQ"}"#,
        )
        .unwrap();
        let reordered: Value = serde_json::from_str(
            r#"{"y":"AQ","x":"AA","alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC"}"#,
        )
        .unwrap();
        let a = runtime_digest("", "n1", &key, HashAlgorithm::Sha512).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            runtime_digest("", "n1", &reordered, HashAlgorithm::Sha512).unwrap()
        );
        assert_ne!(
            a,
            runtime_digest("", "n2", &key, HashAlgorithm::Sha512).unwrap()
        );
        assert_ne!(
            a,
            runtime_digest("x", "n1", &key, HashAlgorithm::Sha512).unwrap()
        );
        let short = runtime_digest("", "n1", &key, HashAlgorithm::Sha384).unwrap();
        assert_eq!(short.len(), 48);
        let padded = report_data(&short);
        assert_eq!(&padded[..48], &short[..]);
        assert_eq!(padded[48..], [0u8; 16]);
    }

    #[test]
    fn malformed_snp_json_is_refused_with_its_reason() {
        let cases = [
            ("{}", "missing field"),
            (
                r#"{"attestation_report": 1, "cert_chain": null}"#,
                "SNP evidence",
            ),
            ("[1, 2]", "SNP evidence"),
            ("{", "SNP evidence"),
        ];
        for (value, expected) in cases {
            match snp_evidence(value) {
                Err(Error::KbsEvidence { detail }) => {
                    assert!(detail.contains(expected), "{detail}")
                }
                other => panic!("{value}: {other:?}"),
            }
        }
    }
}
