//! Expected SEV-SNP launch measurements, computed before any guest boots: the launch digest
//! AMD's firmware will produce for a guest from its firmware (OVMF), optional direct-boot
//! kernel, initrd and command line, vCPU count and type, VMM and guest features.
//!
//! The firmware file is parsed first with bounds checks (`attestation::ovmf`: its OVMF table,
//! SEV metadata and sections, present, in range, not overlapping; a fuzz target of its own)
//! so that a broken file gets a one-line error rather than reaching code that assumes a
//! well-formed image. The `sev` crate's measurement module computes the firmware pages'
//! digest and the kernel hashes page; the rest of the chain (metadata pages and one VMSA per
//! vCPU, as the SNP firmware ABI defines them) is `launch`, the broker's own model of QEMU,
//! EC2 and GCE, because the crate has no GCE, an outdated EC2, and re-reads the kernel and
//! initrd for every platform it is asked about. `tests/tests/measure.rs` checks every result
//! byte for byte against `sev-snp-measure`, an independent implementation, and a unit test
//! below against the crate's own QEMU computation.

mod launch;

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
    /// The VMM: `qemu`, `ec2` or `gce`.
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

/// Inputs checked and read once, ready to be measured on any number of platforms.
struct Prepared {
    vmm: launch::Vmm,
    firmware: attestation::ovmf::Firmware,
    /// The firmware pages' launch digest, hex.
    ovmf_hash: String,
    /// The kernel hashes page, when a kernel is given.
    kernel_hashes_page: Option<Vec<u8>>,
    /// SHA-256 of each input.
    files: serde_json::Map<String, serde_json::Value>,
}

impl Prepared {
    /// The launch digest (hex) on one platform, chained by the broker's own model
    /// (`launch`) from the prepared firmware digest and kernel hashes page: one read of
    /// each input, however many platforms are tried. (The `sev` crate's
    /// `snp_calc_launch_digest` reads and hashes the kernel and initrd again on every call,
    /// and it has no GCE and an outdated EC2; the tests hold this model to it on QEMU and to
    /// sev-snp-measure on every VMM.)
    fn digest(
        &self,
        vcpu_type: sev::measurement::vcpu_types::CpuType,
        vcpus: u32,
        guest_features: u64,
    ) -> Result<String, MeasureError> {
        let mut firmware_digest = [0u8; 48];
        hex::decode_to_slice(&self.ovmf_hash, &mut firmware_digest)
            .map_err(|_| MeasureError::BadOvmfHash)?;
        let cpu_signature = u32::try_from(vcpu_type.sig())
            .map_err(|_| MeasureError::UnknownCpuType(format!("{:#x}", vcpu_type.sig())))?;
        let digest = launch::Launch {
            firmware: &self.firmware,
            firmware_digest,
            kernel_hashes_page: self.kernel_hashes_page.as_deref(),
            vmm: self.vmm,
            vcpus,
            cpu_signature,
            features: guest_features,
        }
        .digest();
        Ok(hex::encode(digest))
    }
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
    let prepared = prepare(inputs)?;
    let mut features = vec![inputs.guest_features, 0x1, 0x21];
    features.sort_unstable();
    features.dedup();
    let mut found = Vec::new();
    for family in FAMILIES {
        let cpu = cpu_type(family[0])?;
        for vcpus in 1..=max_vcpus.clamp(1, MAX_VCPUS) {
            for &f in &features {
                if prepared.digest(cpu, vcpus, f)? == target {
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
    let vcpu_type = cpu_type(&inputs.vcpu_type)?;
    let prepared = prepare(inputs)?;
    let digest = prepared.digest(vcpu_type, inputs.vcpus, inputs.guest_features)?;
    Ok(Measurement {
        measurement: digest,
        ovmf_hash: prepared.ovmf_hash,
        inputs: prepared.files.into(),
        platform: serde_json::json!({
            "vcpus": inputs.vcpus,
            "vcpu_type": inputs.vcpu_type,
            "vcpu_signature": format!("{:#x}", vcpu_type.sig()),
            "vmm": inputs.vmm.to_ascii_lowercase(),
            "guest_features": format!("{:#x}", inputs.guest_features),
        }),
    })
}

/// Checks every input, parses the firmware and computes the firmware pages' digest.
fn prepare(inputs: &MeasureInputs) -> Result<Prepared, MeasureError> {
    use sev::measurement::snp::calc_snp_ovmf_hash;

    if inputs.vcpus == 0 || inputs.vcpus > MAX_VCPUS {
        return Err(MeasureError::VcpuCount(inputs.vcpus));
    }
    cpu_type(&inputs.vcpu_type)?;
    let vmm = match inputs.vmm.to_ascii_lowercase().as_str() {
        "qemu" => launch::Vmm::Qemu,
        // Not the crate's EC2: its reset state (RDX 0) predates EC2's current one (RDX 0x600,
        // as live c6a guests report).
        "ec2" => launch::Vmm::Ec2,
        "gce" => launch::Vmm::Gce,
        _ => {
            return Err(MeasureError::UnsupportedVmm {
                vmm: inputs.vmm.clone(),
                reason: "unknown; use qemu, ec2 or gce",
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
    // Two passes over the (large) kernel and initrd, one per core: the `sev` crate's for
    // the hashes page, and ours for `--json`'s input digests, with the firmware's digest.
    let (kernel_hashes_page, files, ovmf_hash) = std::thread::scope(|scope| {
        let page = scope.spawn(|| {
            inputs
                .kernel
                .as_deref()
                .map(|kernel| kernel_hashes_page(inputs, &firmware, kernel))
                .transpose()
        });
        let digests = input_digests(inputs);
        let ovmf_hash = match &inputs.ovmf_hash {
            Some(h) => Ok(h.to_ascii_lowercase()),
            None => calc_snp_ovmf_hash(inputs.ovmf.clone())
                .map(|d| d.get_hex_ld())
                .map_err(computation),
        };
        let page = page.join().unwrap_or_else(|_| {
            Err(MeasureError::Computation(
                "hashing the kernel failed".into(),
            ))
        });
        (page, digests, ovmf_hash)
    });
    let (kernel_hashes_page, files, ovmf_hash) = (kernel_hashes_page?, files?, ovmf_hash?);
    Ok(Prepared {
        vmm,
        firmware,
        ovmf_hash,
        kernel_hashes_page,
        files,
    })
}

/// SHA-256 of each input, for `--json`.
fn input_digests(
    inputs: &MeasureInputs,
) -> Result<serde_json::Map<String, serde_json::Value>, MeasureError> {
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
    Ok(files)
}

/// The page holding the kernel, initrd and command-line hashes table, as QEMU fills it. The
/// section must be that one page (the `sev` crate would otherwise stop on an assertion).
fn kernel_hashes_page(
    inputs: &MeasureInputs,
    firmware: &attestation::ovmf::Firmware,
    kernel: &Path,
) -> Result<Vec<u8>, MeasureError> {
    let firmware_error = |error| MeasureError::Firmware {
        path: inputs.ovmf.clone(),
        error,
    };
    let (index, section) = firmware
        .sections
        .iter()
        .enumerate()
        .find(|(_, s)| s.kind == 0x10)
        .ok_or_else(|| MeasureError::KernelWithoutHashes {
            path: inputs.ovmf.clone(),
        })?;
    if section.size != 4096 {
        return Err(firmware_error(
            attestation::Error::FirmwareSectionOutOfRange {
                index,
                kind: section.kind,
                gpa: section.gpa,
                size: section.size,
                reason: "is not the one page a kernel hashes table is measured in",
            },
        ));
    }
    let offset = firmware.hash_table_gpa.unwrap_or_default() & 0xfff;
    let hashes = sev::measurement::sev_hashes::SevHashes::new(
        kernel.to_path_buf(),
        inputs.initrd.clone(),
        inputs.append.as_deref(),
    )
    .map_err(computation)?;
    hashes.construct_page(offset as usize).map_err(computation)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's own VMSA and section model, run as QEMU, agrees with the `sev` crate's
    /// (which agrees with sev-snp-measure: tests/tests/measure.rs) on Debian's OVMF, which
    /// `make measure-deps` unpacks into target/ovmf.
    #[test]
    fn own_qemu_model_agrees_with_the_sev_crate() {
        use sev::measurement::snp::{SnpMeasurementArgs, snp_calc_launch_digest};
        use sev::measurement::vmsa::{GuestFeatures, VMMType};
        let ovmf =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ovmf/usr/share/ovmf/OVMF.fd");
        assert!(ovmf.exists(), "{}: run `make measure-deps`", ovmf.display());
        let inputs = MeasureInputs {
            ovmf,
            ovmf_hash: None,
            kernel: None,
            initrd: None,
            append: None,
            vcpus: 1,
            vcpu_type: "EPYC-Milan".into(),
            vmm: "qemu".into(),
            guest_features: DEFAULT_GUEST_FEATURES,
        };
        let prepared = prepare(&inputs).unwrap();
        for family in FAMILIES {
            let cpu = cpu_type(family[0]).unwrap();
            for vcpus in [1, 2, 5] {
                for features in [0x1, 0x21, 0x3f] {
                    let own = prepared.digest(cpu, vcpus, features).unwrap();
                    let by_crate = snp_calc_launch_digest(SnpMeasurementArgs {
                        vcpus,
                        vcpu_type: cpu,
                        ovmf_file: inputs.ovmf.clone(),
                        guest_features: GuestFeatures(features),
                        kernel_file: None,
                        initrd_file: None,
                        append: None,
                        ovmf_hash_str: Some(&prepared.ovmf_hash),
                        vmm_type: Some(VMMType::QEMU),
                    })
                    .unwrap()
                    .get_hex_ld();
                    assert_eq!(own, by_crate, "{} {vcpus} {features:#x}", family[0]);
                }
            }
        }
    }
}
