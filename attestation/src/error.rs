//! The one error type of this crate: every refusal, with the context an auditor needs.

use std::fmt;

use crate::report::{Product, SigningKeyKind};

/// The role a certificate plays in AMD's endorsement hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// AMD Root Key: self-signed, pinned per product.
    Ark,
    /// AMD SEV Key: issued by the ARK, issues VCEKs.
    Ask,
    /// AMD SEV VLEK Key: issued by the ARK, issues VLEKs.
    Asvk,
    /// Versioned Chip Endorsement Key: signs reports of one chip at one TCB.
    Vcek,
    /// Versioned Loaded Endorsement Key: signs reports on a cloud provider's hosts.
    Vlek,
    /// A certificate whose role is not known yet (for example a malformed one).
    Unknown,
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Ark => "ARK",
            CertRole::Ask => "ASK",
            CertRole::Asvk => "ASVK",
            CertRole::Vcek => "VCEK",
            CertRole::Vlek => "VLEK",
            CertRole::Unknown => "certificate",
        })
    }
}

/// One component of a TCB version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcbComponent {
    /// Firmware (FMC) SPL, Turin and later.
    Fmc,
    /// Boot loader SPL.
    Bootloader,
    /// PSP OS (TEE) SPL.
    Tee,
    /// SNP firmware SPL.
    Snp,
    /// CPU microcode SPL.
    Microcode,
}

impl fmt::Display for TcbComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcbComponent::Fmc => "fmcSPL",
            TcbComponent::Bootloader => "blSPL",
            TcbComponent::Tee => "teeSPL",
            TcbComponent::Snp => "snpSPL",
            TcbComponent::Microcode => "ucodeSPL",
        })
    }
}

/// Why a piece of evidence was refused. Every variant names the check that failed; none of
/// them carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The report is not exactly 1184 bytes long.
    #[error("report is {actual} bytes, expected {expected}")]
    ReportLength {
        /// The required length.
        expected: usize,
        /// The length received.
        actual: usize,
    },
    /// The report version is not one this verifier understands (2, 3 or 5).
    #[error("unsupported report version {version}")]
    UnsupportedVersion {
        /// The version field of the report.
        version: u32,
    },
    /// The report is signed with an algorithm other than ECDSA P-384 with SHA-384.
    #[error("unsupported report signature algorithm {algorithm}")]
    UnsupportedSignatureAlgorithm {
        /// The SIGNATURE_ALGO field.
        algorithm: u32,
    },
    /// A byte the specification reserves is not zero.
    #[error("reserved field {field} is not zero (offset {offset:#x})")]
    ReservedNonZero {
        /// Name of the reserved field.
        field: &'static str,
        /// Offset of the first non-zero byte within the report.
        offset: usize,
    },
    /// The signature's R or S has a non-zero byte above the 48 that P-384 uses.
    #[error("signature component {component} is not canonically zero-padded")]
    NonCanonicalSignature {
        /// "R" or "S".
        component: &'static str,
    },
    /// The report's key-selection field names a key this verifier cannot check.
    #[error("report signing key field {value} is not VCEK or VLEK")]
    UnsupportedSigningKey {
        /// The SIGNING_KEY bits of the report.
        value: u8,
    },
    /// CPUID family/model in the report are not a known SEV-SNP product.
    #[error("unknown CPU family {family:#x} model {model:#x}")]
    UnknownProduct {
        /// CPUID family.
        family: u8,
        /// CPUID model.
        model: u8,
    },
    /// The product in the report and the product of the endorsement chain disagree.
    #[error("report is from a {report} CPU but the endorsement chain is for {certificate}")]
    ProductMismatch {
        /// Product from the report's CPUID fields.
        report: Product,
        /// Product from the endorsement certificates.
        certificate: Product,
    },
    /// CHIP_ID is masked (all zero) but the report is signed by a VCEK, which needs it.
    #[error("CHIP_ID is masked but the report is signed by a VCEK")]
    MaskedChipId,
    /// The report's key-selection field and the endorsement certificate disagree.
    #[error("report says it is signed by a {report} but the certificate is a {certificate}")]
    SigningKeyMismatch {
        /// The kind named by the report.
        report: SigningKeyKind,
        /// The kind of the supplied certificate.
        certificate: SigningKeyKind,
    },
    /// The report's ECDSA P-384 signature does not verify over the received bytes.
    #[error("report signature does not verify with the {key}")]
    ReportSignature {
        /// The key that was tried.
        key: SigningKeyKind,
    },
    /// A certificate could not be decoded.
    #[error("malformed {role} certificate: {detail}")]
    CertificateMalformed {
        /// Which certificate.
        role: CertRole,
        /// What was wrong.
        detail: String,
    },
    /// A certificate the chain needs was not supplied and is not built in.
    #[error("no {role} certificate available")]
    MissingCertificate {
        /// Which certificate is missing.
        role: CertRole,
    },
    /// A root certificate was supplied that is not one of the pinned roots.
    #[error("supplied root is not a pinned AMD root (SHA-256 {fingerprint})")]
    UntrustedRoot {
        /// SHA-256 fingerprint (hex) of the supplied root.
        fingerprint: String,
    },
    /// No pinned root issued the intermediate certificate.
    #[error("no trusted root issued the {role} ({issuer})")]
    UnknownIssuer {
        /// The certificate that has no trusted issuer.
        role: CertRole,
        /// Its issuer name.
        issuer: String,
    },
    /// A certificate's signature algorithm is not RSASSA-PSS with SHA-384 as AMD uses it.
    #[error("{role} is signed with an unexpected algorithm")]
    UnexpectedSignatureAlgorithm {
        /// Which certificate.
        role: CertRole,
    },
    /// A certificate's signature does not verify with its issuer's key.
    #[error("{role} signature does not verify with the {issuer} key")]
    ChainSignature {
        /// The certificate whose signature failed.
        role: CertRole,
        /// The issuer whose key was used.
        issuer: CertRole,
    },
    /// A certificate is not valid at the verification time.
    #[error(
        "{role} is not valid at {} (valid from {} to {})",
        rfc3339(.at),
        rfc3339(.not_before),
        rfc3339(.not_after)
    )]
    CertificateNotValidAt {
        /// Which certificate.
        role: CertRole,
        /// Start of validity, seconds since the Unix epoch.
        not_before: u64,
        /// End of validity, seconds since the Unix epoch.
        not_after: u64,
        /// Verification time, seconds since the Unix epoch.
        at: u64,
    },
    /// A certificate appears on the ARK's certificate revocation list.
    #[error("{role} (serial {serial}) is revoked")]
    Revoked {
        /// Which certificate.
        role: CertRole,
        /// Its serial number (hex).
        serial: String,
    },
    /// A certificate revocation list is malformed, not signed by the ARK, or out of date.
    #[error("certificate revocation list refused: {detail}")]
    Crl {
        /// What was wrong.
        detail: String,
    },
    /// A required AMD extension is missing from the endorsement certificate.
    #[error("{role} lacks extension {oid}")]
    MissingExtension {
        /// Which certificate.
        role: CertRole,
        /// The missing extension's OID.
        oid: &'static str,
    },
    /// An AMD extension could not be decoded.
    #[error("{role} extension {oid} is malformed")]
    MalformedExtension {
        /// Which certificate.
        role: CertRole,
        /// The malformed extension's OID.
        oid: String,
    },
    /// The VCEK's hwID extension is not the report's CHIP_ID.
    #[error("VCEK hwID does not match CHIP_ID")]
    HwIdMismatch,
    /// A TCB component certified by the VCEK/VLEK differs from the report's REPORTED_TCB.
    #[error("{component} mismatch: report has {reported}, certificate has {certified}")]
    TcbMismatch {
        /// The component that differs.
        component: TcbComponent,
        /// The value in REPORTED_TCB.
        reported: u8,
        /// The value in the certificate.
        certified: u64,
    },
    /// The endorsement key is not an ECDSA P-384 key.
    #[error("{role} public key is not ECDSA P-384")]
    UnexpectedKeyType {
        /// Which certificate.
        role: CertRole,
    },
    /// A verified chain was produced under other trust anchors than this verifier's.
    #[error("the endorsement chain was verified under other trust anchors")]
    ForeignChain,
    /// A certificate table (GHCB extended-report format) is malformed.
    #[error("malformed certificate table: {detail}")]
    CertTable {
        /// What was wrong.
        detail: String,
    },
    /// An Azure HCL report is malformed.
    #[error("malformed Azure HCL report: {detail}")]
    HclMalformed {
        /// What was wrong.
        detail: String,
    },
    /// The HCL report's variable data does not hash to REPORT_DATA[0..32].
    #[error("HCL variable data does not match REPORT_DATA")]
    HclVarDataDigest,
    /// REPORT_DATA is not the expected binding of the challenge and the guest's key.
    #[error("REPORT_DATA does not bind the challenge and the ephemeral key")]
    BindingMismatch,
    /// A TPM quote (TPMS_ATTEST, signature or PCR list) is malformed.
    #[error("malformed TPM quote: {detail}")]
    QuoteMalformed {
        /// What was wrong.
        detail: String,
    },
    /// The HCL variable data carries no usable vTPM attestation key (HCLAkPub).
    #[error("HCL variable data has no usable attestation key: {detail}")]
    AttestationKey {
        /// What was wrong.
        detail: String,
    },
    /// The TPM quote is not signed by the attestation key the HCL report carries.
    #[error("TPM quote signature does not verify with the HCL attestation key")]
    QuoteSignature,
    /// The quote does not cover exactly the SHA-256 PCR bank 0-23.
    #[error("TPM quote PCR selection: {detail}")]
    PcrSelection {
        /// What was selected instead.
        detail: String,
    },
    /// The PCR values sent do not hash to the quote's PCR digest.
    #[error("PCR values do not match the quote's PCR digest")]
    PcrDigestMismatch,
    /// The quote's qualifying data is not the binding of the challenge and the guest's key.
    #[error("TPM quote qualifying data does not bind the challenge and the ephemeral key")]
    QuoteBindingMismatch,
    /// The HCL report's user data is not the binding of the challenge and the guest's key.
    #[error("HCL user-data does not bind the challenge and the ephemeral key")]
    UserDataMismatch,
    /// An HCL report without a TPM quote carries no freshness: it cannot be bound.
    #[error("an HCL report needs a TPM quote to be bound to a challenge")]
    QuoteMissing,
    /// KBS evidence JSON does not map onto a report (or a vTPM bundle) one way only.
    #[error("KBS evidence: {detail}")]
    KbsEvidence {
        /// What is wrong.
        detail: String,
    },
    /// A broker's own evidence did not prove it (`broker_evidence`): not verifiable, not
    /// bound to the connection's TLS key and the caller's nonce, or refused by the policy.
    #[error("{detail}")]
    UntrustedBroker {
        /// Why.
        detail: String,
    },
    /// An input (PEM, time, trust anchor) given by the caller is not usable.
    #[error("invalid input: {detail}")]
    InvalidInput {
        /// What was wrong.
        detail: String,
    },
    /// A firmware image is not an OVMF image with an OVMF table.
    #[error("not an OVMF image with an SEV table ({detail})")]
    FirmwareNotOvmf {
        /// What is missing or wrong.
        detail: String,
    },
    /// The firmware has no SEV metadata (built without SEV-SNP support).
    #[error("the firmware has no SEV metadata table (build OVMF with SEV-SNP support)")]
    FirmwareNoSevMetadata,
    /// The firmware's SEV metadata is malformed.
    #[error("malformed SEV metadata: {detail}")]
    FirmwareSevMetadata {
        /// What is wrong.
        detail: String,
    },
    /// A metadata section lies outside guest memory below the firmware, or is malformed.
    #[error("SEV metadata section {index} (type {kind:#x}, {gpa:#x}+{size:#x}) {reason}")]
    FirmwareSectionOutOfRange {
        /// The section's position in the metadata.
        index: usize,
        /// Its type.
        kind: u32,
        /// Its guest physical address.
        gpa: u32,
        /// Its size.
        size: u32,
        /// Why it is out of range.
        reason: &'static str,
    },
    /// Two metadata sections overlap.
    #[error("SEV metadata sections {first} and {second} overlap")]
    FirmwareSectionsOverlap {
        /// One section's position.
        first: usize,
        /// The other's.
        second: usize,
    },
    /// An OCSP responder did not answer `successful` (e.g. `unauthorized`, `tryLater`).
    #[error("OCSP responder answered {status}")]
    OcspNotSuccessful {
        /// The responseStatus it sent.
        status: String,
    },
    /// An OCSP response could not be decoded.
    #[error("malformed OCSP response: {detail}")]
    OcspMalformed {
        /// What was wrong.
        detail: String,
    },
    /// A signed OCSP response says nothing about the certificate asked about.
    #[error("the OCSP response has no status for serial {serial}")]
    OcspNoAnswer {
        /// The serial asked about (hex).
        serial: String,
    },
    /// An OCSP response is not signed by the certificate's issuer or by a responder the
    /// issuer delegated (id-kp-OCSPSigning).
    #[error("OCSP response signature: {detail}")]
    OcspSignature {
        /// Why it is not accepted.
        detail: String,
    },
    /// An OCSP response is not current: produced in the future, or past its nextUpdate (or
    /// without one).
    #[error(
        "the OCSP response is not current at {}: thisUpdate {}, nextUpdate {}",
        rfc3339(now),
        rfc3339(this_update),
        next_update.as_ref().map(rfc3339).unwrap_or_else(|| "absent".into())
    )]
    OcspNotCurrent {
        /// Its thisUpdate (seconds since the epoch).
        this_update: u64,
        /// Its nextUpdate, if any.
        next_update: Option<u64>,
        /// The time of the check.
        now: u64,
    },
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: &u64) -> String {
    i64::try_from(*secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s after the epoch"))
}

impl Error {
    /// A short, stable identifier of the failed check, for audit logs and metrics labels.
    pub fn check(&self) -> &'static str {
        match self {
            Error::ReportLength { .. } => "report_length",
            Error::UnsupportedVersion { .. } => "report_version",
            Error::UnsupportedSignatureAlgorithm { .. } => "report_signature_algorithm",
            Error::ReservedNonZero { .. } => "report_reserved",
            Error::NonCanonicalSignature { .. } => "report_signature_encoding",
            Error::UnsupportedSigningKey { .. } => "report_signing_key",
            Error::UnknownProduct { .. } => "product_unknown",
            Error::ProductMismatch { .. } => "product_mismatch",
            Error::MaskedChipId => "masked_chip_id",
            Error::SigningKeyMismatch { .. } => "signing_key_mismatch",
            Error::ReportSignature { .. } => "report_signature",
            Error::CertificateMalformed { .. } => "certificate_malformed",
            Error::MissingCertificate { .. } => "certificate_missing",
            Error::UntrustedRoot { .. } => "untrusted_root",
            Error::UnknownIssuer { .. } => "unknown_issuer",
            Error::UnexpectedSignatureAlgorithm { .. } => "certificate_algorithm",
            Error::ChainSignature { .. } => "chain_signature",
            Error::CertificateNotValidAt { .. } => "certificate_validity",
            Error::Revoked { .. } => "revoked",
            Error::Crl { .. } => "crl",
            Error::MissingExtension { .. } => "extension_missing",
            Error::MalformedExtension { .. } => "extension_malformed",
            Error::HwIdMismatch => "hwid_mismatch",
            Error::TcbMismatch { .. } => "tcb_mismatch",
            Error::UnexpectedKeyType { .. } => "key_type",
            Error::ForeignChain => "foreign_chain",
            Error::CertTable { .. } => "cert_table",
            Error::HclMalformed { .. } => "hcl_malformed",
            Error::HclVarDataDigest => "hcl_var_data_digest",
            Error::BindingMismatch => "binding",
            Error::QuoteMalformed { .. } => "tpm_quote_malformed",
            Error::AttestationKey { .. } => "tpm_attestation_key",
            Error::QuoteSignature => "tpm_quote_signature",
            Error::PcrSelection { .. } => "tpm_pcr_selection",
            Error::PcrDigestMismatch => "tpm_pcr_digest",
            Error::QuoteBindingMismatch => "tpm_quote_binding",
            Error::UserDataMismatch => "hcl_user_data",
            Error::QuoteMissing => "tpm_quote_missing",
            Error::InvalidInput { .. } => "invalid_input",
            Error::KbsEvidence { .. } => "kbs_evidence",
            Error::UntrustedBroker { .. } => "untrusted_broker",
            Error::OcspNotSuccessful { .. } => "ocsp_status",
            Error::OcspMalformed { .. } => "ocsp_malformed",
            Error::OcspNoAnswer { .. } => "ocsp_no_answer",
            Error::OcspSignature { .. } => "ocsp_signature",
            Error::OcspNotCurrent { .. } => "ocsp_not_current",
            Error::FirmwareNotOvmf { .. } => "firmware_not_ovmf",
            Error::FirmwareNoSevMetadata => "firmware_no_sev_metadata",
            Error::FirmwareSevMetadata { .. } => "firmware_sev_metadata",
            Error::FirmwareSectionOutOfRange { .. } => "firmware_section_range",
            Error::FirmwareSectionsOverlap { .. } => "firmware_sections_overlap",
        }
    }
}
