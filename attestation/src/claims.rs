//! Typed claims: what a release policy decides on, with a stable JSON form.
//!
//! Byte strings are lower-case hex. Field names are part of the policy language and of the
//! protocol; they change only with a new protocol version.

use serde::Serialize;

use crate::chain::RootKind;
use crate::hcl::AzureVarData;
use crate::report::{FirmwareVersion, Product, SigningKeyKind, Tcb};
use crate::verify::VerifiedReport;

/// The guest policy the VM was launched with (POLICY, offset 0x08).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestPolicy {
    /// Minimum ABI major version.
    pub abi_major: u8,
    /// Minimum ABI minor version.
    pub abi_minor: u8,
    /// SMT allowed (bit 16).
    pub smt_allowed: bool,
    /// Association with a migration agent allowed (bit 18).
    pub migrate_ma_allowed: bool,
    /// Debugging allowed (bit 19): the hypervisor can read and write guest memory.
    pub debug_allowed: bool,
    /// Single socket only (bit 20).
    pub single_socket: bool,
    /// CXL memory allowed (bit 21).
    pub cxl_allowed: bool,
    /// AES-256-XTS required for memory encryption (bit 22).
    pub mem_aes_256_xts: bool,
    /// RAPL must be disabled (bit 23).
    pub rapl_disabled: bool,
    /// Ciphertext hiding required (bit 24).
    pub ciphertext_hiding: bool,
    /// Guest page swapping disabled (bit 25).
    pub page_swap_disabled: bool,
    /// The raw 64-bit value.
    pub raw: u64,
}

impl GuestPolicy {
    /// Decodes the POLICY field.
    pub fn from_raw(raw: u64) -> GuestPolicy {
        let bit = |n: u32| raw & (1 << n) != 0;
        GuestPolicy {
            abi_major: ((raw >> 8) & 0xff) as u8,
            abi_minor: (raw & 0xff) as u8,
            smt_allowed: bit(16),
            migrate_ma_allowed: bit(18),
            debug_allowed: bit(19),
            single_socket: bit(20),
            cxl_allowed: bit(21),
            mem_aes_256_xts: bit(22),
            rapl_disabled: bit(23),
            ciphertext_hiding: bit(24),
            page_swap_disabled: bit(25),
            raw,
        }
    }
}

/// The platform's state (PLATFORM_INFO, offset 0x40).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlatformInfo {
    /// SMT enabled on the host.
    pub smt_enabled: bool,
    /// Transparent SME enabled.
    pub tsme_enabled: bool,
    /// ECC memory in use.
    pub ecc_enabled: bool,
    /// RAPL disabled.
    pub rapl_disabled: bool,
    /// Ciphertext hiding enabled.
    pub ciphertext_hiding_enabled: bool,
    /// The DRAM alias check completed (BadRAM mitigation).
    pub alias_check_complete: bool,
    /// The raw 64-bit value.
    pub raw: u64,
}

impl PlatformInfo {
    /// Decodes the PLATFORM_INFO field.
    pub fn from_raw(raw: u64) -> PlatformInfo {
        let bit = |n: u32| raw & (1 << n) != 0;
        PlatformInfo {
            smt_enabled: bit(0),
            tsme_enabled: bit(1),
            ecc_enabled: bit(2),
            rapl_disabled: bit(3),
            ciphertext_hiding_enabled: bit(4),
            alias_check_complete: bit(5),
            raw,
        }
    }
}

/// The four TCB versions a report carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcbClaims {
    /// REPORTED_TCB: the TCB the signing key is derived from.
    pub reported: Tcb,
    /// COMMITTED_TCB: the platform cannot roll back below it.
    pub committed: Tcb,
    /// LAUNCH_TCB: committed TCB when the guest launched.
    pub launch: Tcb,
    /// CURRENT_TCB: the TCB running now.
    pub current: Tcb,
}

/// Everything a policy may ask about a verified report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Claims {
    /// Report format version.
    pub report_version: u32,
    /// CPU generation.
    pub product: Product,
    /// Key that signed the report.
    pub signing_key: SigningKeyKind,
    /// Root of the endorsement chain ("amd" or "simulated").
    pub root: RootKind,
    /// SHA-256 of the VCEK/VLEK certificate.
    pub vek_fingerprint: String,
    /// Cloud provider named by a VLEK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csp_id: Option<String>,
    /// Launch measurement (48 bytes, hex).
    pub measurement: String,
    /// HOST_DATA (32 bytes, hex).
    pub host_data: String,
    /// REPORT_DATA (64 bytes, hex).
    pub report_data: String,
    /// Guest policy.
    pub policy: GuestPolicy,
    /// Platform information.
    pub platform_info: PlatformInfo,
    /// TCB versions.
    pub tcb: TcbClaims,
    /// Firmware running now.
    pub current_firmware: FirmwareVersion,
    /// Firmware committed.
    pub committed_firmware: FirmwareVersion,
    /// CHIP_ID (64 bytes, hex; zero when masked).
    pub chip_id: String,
    /// The VMPL that requested the report.
    pub vmpl: u32,
    /// FAMILY_ID (16 bytes, hex).
    pub family_id: String,
    /// IMAGE_ID (16 bytes, hex).
    pub image_id: String,
    /// SHA-384 of the ID key (48 bytes, hex; zero without an ID block).
    pub id_key_digest: String,
    /// SHA-384 of the author key (48 bytes, hex).
    pub author_key_digest: String,
    /// Whether the ID block was signed by an author key.
    pub author_key_enabled: bool,
    /// Guest security version number.
    pub guest_svn: u32,
    /// REPORT_ID (32 bytes, hex).
    pub report_id: String,
    /// REPORT_ID of the migration agent (32 bytes, hex).
    pub report_id_ma: String,
    /// CPUID family, model and stepping (version 3 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<Cpuid>,
    /// Mitigation vectors (version 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mitigation_vector: Option<MitigationVectors>,
    /// Azure vTPM claims, for reports delivered in an HCL report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureVarData>,
    /// Azure vTPM quote claims.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmClaims>,
}

/// What a verified TPM quote attests.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TpmClaims {
    /// SHA-256 PCR values by index ("0" to "23"), hex.
    pub pcr: std::collections::BTreeMap<String, String>,
    /// SHA-256 of the attestation key's modulus, hex.
    pub ak_fingerprint: String,
}

/// CPUID identification of the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cpuid {
    /// Family.
    pub family: u8,
    /// Model.
    pub model: u8,
    /// Stepping.
    pub stepping: u8,
}

/// Verified mitigation vectors (version 5 reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MitigationVectors {
    /// At launch.
    pub launch: u64,
    /// Now.
    pub current: u64,
}

impl Claims {
    pub(crate) fn from_verified(v: &VerifiedReport) -> Claims {
        let r = v.report();
        let p = v.product();
        Claims {
            report_version: r.version(),
            product: p,
            signing_key: r.signing_key(),
            root: v.root(),
            vek_fingerprint: v.vek_fingerprint().to_string(),
            csp_id: v.csp_id().map(str::to_string),
            measurement: hex::encode(r.measurement()),
            host_data: hex::encode(r.host_data()),
            report_data: hex::encode(r.report_data()),
            policy: GuestPolicy::from_raw(r.policy()),
            platform_info: PlatformInfo::from_raw(r.platform_info()),
            tcb: TcbClaims {
                reported: r.reported_tcb(p),
                committed: r.committed_tcb(p),
                launch: r.launch_tcb(p),
                current: r.current_tcb(p),
            },
            current_firmware: r.current_firmware(),
            committed_firmware: r.committed_firmware(),
            chip_id: hex::encode(r.chip_id()),
            vmpl: r.vmpl(),
            family_id: hex::encode(r.family_id()),
            image_id: hex::encode(r.image_id()),
            id_key_digest: hex::encode(r.id_key_digest()),
            author_key_digest: hex::encode(r.author_key_digest()),
            author_key_enabled: r.author_key_enabled(),
            guest_svn: r.guest_svn(),
            report_id: hex::encode(r.report_id()),
            report_id_ma: hex::encode(r.report_id_ma()),
            cpuid: r.cpuid().map(|(family, model, stepping)| Cpuid {
                family,
                model,
                stepping,
            }),
            mitigation_vector: r
                .launch_mitigation_vector()
                .zip(r.current_mitigation_vector())
                .map(|(launch, current)| MitigationVectors { launch, current }),
            azure: v.azure().cloned(),
            tpm: v.tpm().map(|q| TpmClaims {
                pcr: q
                    .pcrs()
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i.to_string(), hex::encode(p)))
                    .collect(),
                ak_fingerprint: q.ak_fingerprint().to_string(),
            }),
        }
    }

    /// The claims as a JSON value (the form policies and the protocol use).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
