//! Expected SEV-SNP launch measurements, computed before any guest boots: the launch digest
//! AMD's firmware will produce for a guest from its firmware (OVMF), optional direct-boot
//! kernel, initrd and command line, vCPU count and type, VMM and guest features.
//!
//! The firmware file is parsed first with bounds checks (`attestation::ovmf`: its OVMF table,
//! SEV metadata and sections, present, in range, not overlapping; a fuzz target of its own)
//! so that a broken file gets a one-line error rather than reaching code that assumes a
//! well-formed image; the digest itself is computed by the `sev` crate's measurement module
//! (page-by-page SHA-384 chaining of the firmware pages, metadata pages and VMSAs, as the SNP
//! firmware specification defines it). `tests/tests/measure.rs` checks every result byte for
//! byte against `sev-snp-measure`, an independent implementation.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Most vCPUs a guest may have here (QEMU's limit for SNP guests is far lower).
pub const MAX_VCPUS: u32 = 512;

/// Why a measurement cannot be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// A file could not be read.
    #[error("{path}: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The firmware image is not usable: no OVMF table, no SEV metadata, or malformed,
    /// out-of-range or overlapping sections.
    #[error("{path}: {error}")]
    Firmware {
        /// The file.
        path: PathBuf,
        /// What is wrong, as the parser found it.
        error: attestation::Error,
    },
    /// A kernel (or initrd, or command line) was given for firmware without the kernel
    /// hashes section, which is the only way such a guest measures them.
    #[error(
        "{path}: this firmware has no kernel-hashes section, so a direct-boot kernel, initrd or command line is not measured (use an OVMF built for measured direct boot, e.g. OvmfPkg/AmdSev)"
    )]
    KernelWithoutHashes {
        /// The firmware file.
        path: PathBuf,
    },
    /// An initrd or command line without a kernel.
    #[error("an initrd or a kernel command line needs --kernel")]
    InitrdWithoutKernel,
    /// Zero or too many vCPUs.
    #[error("vCPU count {0}: give 1 to {MAX_VCPUS}")]
    VcpuCount(u32),
    /// A vCPU type that is not known.
    #[error(
        "unknown vCPU type {0:?}: use a QEMU model (EPYC, EPYC-v1 … EPYC-v4, EPYC-IBPB, EPYC-Rome[-v1…v3], EPYC-Milan[-v1,-v2], EPYC-Genoa[-v1], EPYC-Turin[-v1,-v2]) or a CPUID signature of one of these families (e.g. 0xa10f10 for Genoa)"
    )]
    UnknownCpuType(String),
    /// A VMM type that is not supported (yet).
    #[error("VMM type {vmm:?}: {reason}")]
    UnsupportedVmm {
        /// The type given.
        vmm: String,
        /// Why, and what is.
        reason: &'static str,
    },
    /// A precomputed firmware digest that is not 48 bytes of hex.
    #[error("--ovmf-hash: 96 hex digits (a SHA-384 launch digest of the firmware pages)")]
    BadOvmfHash,
    /// A sought measurement that is not 48 bytes of hex.
    #[error("--match: 96 hex digits (the measurement of the report to explain)")]
    BadMeasurement,
    /// The `sev` crate refused the inputs after our checks passed.
    #[error("measurement: {0}")]
    Computation(String),
}

/// What a guest's launch measurement is computed from.
#[derive(Clone, Debug)]
pub struct MeasureInputs {
    /// The OVMF image.
    pub ovmf: PathBuf,
    /// The firmware pages' launch digest, if already computed (the file is still read for
    /// its metadata).
    pub ovmf_hash: Option<String>,
    /// Direct-boot kernel.
    pub kernel: Option<PathBuf>,
    /// Its initrd.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub append: Option<String>,
    /// vCPU count.
    pub vcpus: u32,
    /// vCPU type: a QEMU model name or a CPUID signature (`0x…`).
    pub vcpu_type: String,
    /// The VMM: `qemu` (`ec2` and `gce` are refused for now).
    pub vmm: String,
    /// SEV_FEATURES of the guest's VMSAs (what the guest kernel enables).
    pub guest_features: u64,
}

/// The default guest features: SNP active (bit 0) and restricted injection off; what
/// current Linux guests under QEMU run with (`sev-snp-measure`'s default too).
pub const DEFAULT_GUEST_FEATURES: u64 = 0x1;

/// A computed measurement and what it covers.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// The 48-byte launch digest, hex: the report's `measurement` field.
    pub measurement: String,
    /// The firmware's launch digest alone (its pages), hex.
    pub ovmf_hash: String,
    /// SHA-256 of each input file, hex.
    pub inputs: serde_json::Value,
    /// vCPU count, the vCPU type as given and its CPUID signature, VMM, guest features.
    pub platform: serde_json::Value,
}

/// The `sev` crate's vCPU type for a model name or a CPUID signature.
fn cpu_type(name: &str) -> Result<sev::measurement::vcpu_types::CpuType, MeasureError> {
    use sev::measurement::vcpu_types::CpuType;
    let unknown = || MeasureError::UnknownCpuType(name.to_string());
    if let Some(hex) = name.strip_prefix("0x").or_else(|| name.strip_prefix("0X")) {
        let sig = i32::from_str_radix(hex, 16).map_err(|_| unknown())?;
        return CpuType::try_from(sig).map_err(|_| unknown());
    }
    CpuType::try_from(name).map_err(|_| unknown())
}

fn sha256_file(path: &Path) -> Result<String, MeasureError> {
    let bytes = std::fs::read(path).map_err(|e| MeasureError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    )))
}

fn computation(e: sev::error::MeasurementError) -> MeasureError {
    MeasureError::Computation(e.to_string())
}

/// The launch digest (hex) of `inputs`' firmware and kernel on one platform.
fn launch_digest(
    inputs: &MeasureInputs,
    ovmf_hash: &str,
    vmm: sev::measurement::vmsa::VMMType,
    vcpu_type: sev::measurement::vcpu_types::CpuType,
    vcpus: u32,
    guest_features: u64,
) -> Result<String, MeasureError> {
    use sev::measurement::snp::{SnpMeasurementArgs, snp_calc_launch_digest};
    use sev::measurement::vmsa::GuestFeatures;
    Ok(snp_calc_launch_digest(SnpMeasurementArgs {
        vcpus,
        vcpu_type,
        ovmf_file: inputs.ovmf.clone(),
        guest_features: GuestFeatures(guest_features),
        kernel_file: inputs.kernel.clone(),
        initrd_file: inputs.initrd.clone(),
        append: inputs.append.as_deref(),
        ovmf_hash_str: Some(ovmf_hash),
        vmm_type: Some(vmm),
    })
    .map_err(computation)?
    .get_hex_ld())
}

/// A platform that gives a sought measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlatformMatch {
    /// vCPU count.
    pub vcpus: u32,
    /// The CPU models with this signature (they measure alike).
    pub vcpu_types: Vec<String>,
    /// The CPUID signature.
    pub vcpu_signature: String,
    /// The guest features.
    pub guest_features: String,
}

/// The CPU models, one list per CPUID signature (models of one family measure alike).
const FAMILIES: [&[&str]; 5] = [
    &[
        "EPYC",
        "EPYC-v1",
        "EPYC-v2",
        "EPYC-IBPB",
        "EPYC-v3",
        "EPYC-v4",
    ],
    &["EPYC-Rome", "EPYC-Rome-v1", "EPYC-Rome-v2", "EPYC-Rome-v3"],
    &["EPYC-Milan", "EPYC-Milan-v1", "EPYC-Milan-v2"],
    &["EPYC-Genoa", "EPYC-Genoa-v1"],
    &["EPYC-Turin", "EPYC-Turin-v1", "EPYC-Turin-v2"],
];

/// Which platforms give `target` (a report's measurement) for `inputs`' firmware, kernel,
/// initrd and command line: every CPU family, 1 to `max_vcpus` vCPUs, and the guest
/// features given plus the common ones (0x1, 0x21). Empty: none does, so the firmware,
/// kernel, initrd or command line differ (or the VMM, or uncommon features).
pub fn find_platform(
    inputs: &MeasureInputs,
    target: &str,
    max_vcpus: u32,
) -> Result<Vec<PlatformMatch>, MeasureError> {
    let target = target.trim().to_ascii_lowercase();
    if target.len() != 96 || hex::decode(&target).is_err() {
        return Err(MeasureError::BadMeasurement);
    }
    // Validates every input and yields the firmware digest once.
    let base = measure(inputs)?;
    let vmm = sev::measurement::vmsa::VMMType::QEMU;
    let mut features = vec![inputs.guest_features, 0x1, 0x21];
    features.sort_unstable();
    features.dedup();
    let mut found = Vec::new();
    for family in FAMILIES {
        let cpu = cpu_type(family[0])?;
        for vcpus in 1..=max_vcpus.clamp(1, MAX_VCPUS) {
            for &f in &features {
                if launch_digest(inputs, &base.ovmf_hash, vmm, cpu, vcpus, f)? == target {
                    found.push(PlatformMatch {
                        vcpus,
                        vcpu_types: family.iter().map(|s| s.to_string()).collect(),
                        vcpu_signature: format!("{:#x}", cpu.sig()),
                        guest_features: format!("{f:#x}"),
                    });
                }
            }
        }
    }
    Ok(found)
}

/// Computes the launch measurement of `inputs`.
pub fn measure(inputs: &MeasureInputs) -> Result<Measurement, MeasureError> {
    use sev::measurement::snp::calc_snp_ovmf_hash;
    use sev::measurement::vmsa::VMMType;

    if inputs.vcpus == 0 || inputs.vcpus > MAX_VCPUS {
        return Err(MeasureError::VcpuCount(inputs.vcpus));
    }
    let vcpu_type = cpu_type(&inputs.vcpu_type)?;
    let vmm = match inputs.vmm.to_ascii_lowercase().as_str() {
        "qemu" => VMMType::QEMU,
        // The sev crate's EC2 VMSA (RDX 0 at reset) predates EC2's current one (RDX 0x600,
        // as sev-snp-measure 0.0.13 computes and live c6a instances report), and it has no
        // GCE type: until the broker computes those VMSAs itself, refuse rather than print
        // a measurement no guest will have.
        "ec2" | "gce" => {
            return Err(MeasureError::UnsupportedVmm {
                vmm: inputs.vmm.clone(),
                reason: "not supported yet (qemu is); see docs/measurement.md",
            });
        }
        _ => {
            return Err(MeasureError::UnsupportedVmm {
                vmm: inputs.vmm.clone(),
                reason: "unknown; use qemu",
            });
        }
    };
    if inputs.kernel.is_none() && (inputs.initrd.is_some() || inputs.append.is_some()) {
        return Err(MeasureError::InitrdWithoutKernel);
    }
    if let Some(h) = &inputs.ovmf_hash
        && (h.len() != 96 || hex::decode(h).is_err())
    {
        return Err(MeasureError::BadOvmfHash);
    }
    let image = std::fs::read(&inputs.ovmf).map_err(|e| MeasureError::Unreadable {
        path: inputs.ovmf.clone(),
        reason: e.to_string(),
    })?;
    let firmware = attestation::ovmf::parse(&image).map_err(|error| MeasureError::Firmware {
        path: inputs.ovmf.clone(),
        error,
    })?;
    if inputs.kernel.is_some() && !firmware.kernel_hashes {
        return Err(MeasureError::KernelWithoutHashes {
            path: inputs.ovmf.clone(),
        });
    }
    let mut files = serde_json::Map::new();
    files.insert("ovmf".into(), sha256_file(&inputs.ovmf)?.into());
    for (key, file) in [("kernel", &inputs.kernel), ("initrd", &inputs.initrd)] {
        if let Some(f) = file {
            files.insert(key.into(), sha256_file(f)?.into());
        }
    }
    if let Some(append) = &inputs.append {
        files.insert(
            "append".into(),
            hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                append.as_bytes(),
            ))
            .into(),
        );
    }
    let ovmf_hash = match &inputs.ovmf_hash {
        Some(h) => h.to_ascii_lowercase(),
        None => calc_snp_ovmf_hash(inputs.ovmf.clone())
            .map_err(computation)?
            .get_hex_ld(),
    };
    let digest = launch_digest(
        inputs,
        &ovmf_hash,
        vmm,
        vcpu_type,
        inputs.vcpus,
        inputs.guest_features,
    )?;
    Ok(Measurement {
        measurement: digest,
        ovmf_hash,
        inputs: files.into(),
        platform: serde_json::json!({
            "vcpus": inputs.vcpus,
            "vcpu_type": inputs.vcpu_type,
            "vcpu_signature": format!("{:#x}", vcpu_type.sig()),
            "vmm": inputs.vmm.to_ascii_lowercase(),
            "guest_features": format!("{:#x}", inputs.guest_features),
        }),
    })
}
