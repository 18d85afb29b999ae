//! Expected SEV-SNP launch measurements, computed before any guest boots: the launch digest
//! AMD's firmware will produce for a guest from its firmware (OVMF), optional direct-boot
//! kernel, initrd and command line, vCPU count and type, VMM and guest features.
//!
//! The firmware file is operator input, but it is parsed here with bounds checks first (its
//! footer table, SEV metadata and sections: present, in range, not overlapping) so that a
//! broken file gets a one-line error rather than reaching code that assumes a well-formed
//! image; the digest itself is computed by the `sev` crate's measurement module (page-by-page
//! SHA-384 chaining of the firmware pages, metadata pages and VMSAs, as the SNP firmware
//! specification defines it). `tests/tests/measure.rs` checks every result byte for byte
//! against `sev-snp-measure`, an independent implementation.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Largest firmware image accepted (OVMF builds are 2-4 MiB).
const MAX_FIRMWARE: usize = 64 << 20;
/// Most vCPUs a guest may have here (QEMU's limit for SNP guests is far lower).
pub const MAX_VCPUS: u32 = 512;
/// The bytes after the OVMF table's footer: the reset vector area.
const TAIL: usize = 32;
/// An OVMF table entry's header: a little-endian u16 size, then a GUID.
const ENTRY_HEADER: usize = 18;
/// 4 GiB: the firmware image ends there in guest physical memory.
const FOUR_GB: u64 = 1 << 32;

/// GUIDs in their on-disk (mixed-endian) byte order.
const FOOTER_GUID: [u8; 16] = guid_bytes(
    0x96b5_82de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
const SEV_METADATA_GUID: [u8; 16] = guid_bytes(
    0xdc88_6566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);
const SEV_ES_RESET_BLOCK_GUID: [u8; 16] = guid_bytes(
    0x00f7_71de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
const SEV_HASH_TABLE_GUID: [u8; 16] = guid_bytes(
    0x7255_371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);

const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

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
    /// The firmware is not an OVMF image with an OVMF table.
    #[error("{path}: not an OVMF image with an SEV table ({reason})")]
    NotOvmf {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// The firmware has no SEV metadata (built without SEV-SNP support).
    #[error("{path}: the firmware has no SEV metadata table (build OVMF with SEV-SNP support)")]
    NoSevMetadata {
        /// The file.
        path: PathBuf,
    },
    /// The SEV metadata is malformed.
    #[error("{path}: malformed SEV metadata: {reason}")]
    BadSevMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A metadata section lies outside guest memory below 4 GiB, or over the firmware.
    #[error("{path}: SEV metadata section {index} (type {kind:#x}, {gpa:#x}+{size:#x}) {reason}")]
    SectionOutOfRange {
        /// The file.
        path: PathBuf,
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
    #[error("{path}: SEV metadata sections {first} and {second} overlap")]
    SectionsOverlap {
        /// The file.
        path: PathBuf,
        /// One section's position.
        first: usize,
        /// The other's.
        second: usize,
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

/// A section of the firmware's SEV metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    /// Guest physical address.
    pub gpa: u32,
    /// Size in bytes.
    pub size: u32,
    /// Type (1 secure memory, 2 secrets, 3 CPUID, 4 SVSM CAA, 0x10 kernel hashes).
    pub kind: u32,
}

/// What the firmware's OVMF table says, checked.
#[derive(Clone, Debug)]
pub struct Firmware {
    /// The metadata sections, in order.
    pub sections: Vec<Section>,
    /// The SEV-ES reset EIP of the APs.
    pub reset_eip: u32,
    /// Whether the firmware measures a direct-boot kernel (hash table and its section).
    pub kernel_hashes: bool,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Parses and checks an OVMF image's table and SEV metadata.
pub fn parse_firmware(path: &Path, image: &[u8]) -> Result<Firmware, MeasureError> {
    let not_ovmf = |reason: &str| MeasureError::NotOvmf {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let bad = |reason: String| MeasureError::BadSevMetadata {
        path: path.to_path_buf(),
        reason,
    };
    if image.len() < 4096 || image.len() > MAX_FIRMWARE || !image.len().is_multiple_of(4096) {
        return Err(not_ovmf(
            "size is not a multiple of 4 KiB between 4 KiB and 64 MiB",
        ));
    }
    let footer_at = image.len() - TAIL - ENTRY_HEADER;
    if image.get(footer_at + 2..footer_at + ENTRY_HEADER) != Some(&FOOTER_GUID[..]) {
        return Err(not_ovmf(
            "no OVMF table footer GUID 32 bytes before the end",
        ));
    }
    let table_size = usize::from(le_u16(image, footer_at).ok_or_else(|| not_ovmf("footer"))?);
    if table_size < ENTRY_HEADER || table_size > footer_at + ENTRY_HEADER {
        return Err(not_ovmf("OVMF table size out of range"));
    }
    // Entries run backwards from the footer: data, u16 size (header included), GUID.
    let table = &image[footer_at + ENTRY_HEADER - table_size..footer_at];
    let mut entries: Vec<([u8; 16], &[u8])> = Vec::new();
    let mut end = table.len();
    while end >= ENTRY_HEADER {
        let header = end - ENTRY_HEADER;
        let size = usize::from(le_u16(table, header).ok_or_else(|| not_ovmf("table entry"))?);
        if size < ENTRY_HEADER || size > end {
            return Err(not_ovmf("an OVMF table entry's size is out of range"));
        }
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&table[header + 2..end]);
        entries.push((guid, &table[end - size..header]));
        end -= size;
    }
    let entry = |guid: &[u8; 16]| entries.iter().find(|(g, _)| g == guid).map(|(_, d)| *d);

    let meta = entry(&SEV_METADATA_GUID).ok_or_else(|| MeasureError::NoSevMetadata {
        path: path.to_path_buf(),
    })?;
    let from_end = le_u32(meta, 0).ok_or_else(|| bad("short metadata entry".into()))?;
    let start = usize::try_from(from_end)
        .ok()
        .and_then(|o| image.len().checked_sub(o))
        .ok_or_else(|| bad(format!("header offset {from_end:#x} is outside the image")))?;
    if image.get(start..start + 4) != Some(b"ASEV") {
        return Err(bad("no ASEV signature".into()));
    }
    let size = le_u32(image, start + 4).ok_or_else(|| bad("header".into()))?;
    let version = le_u32(image, start + 8).ok_or_else(|| bad("header".into()))?;
    let count = le_u32(image, start + 12).ok_or_else(|| bad("header".into()))?;
    if version != 1 {
        return Err(bad(format!("version {version}, expected 1")));
    }
    if count == 0 || count > 64 {
        return Err(bad(format!("{count} sections")));
    }
    let count = count as usize;
    let needed = 16 + 12 * count;
    if (size as usize) < needed || start + size as usize > image.len() {
        return Err(bad(format!(
            "size {size} does not hold {count} sections inside the image"
        )));
    }
    let firmware_base = FOUR_GB - image.len() as u64;
    let mut sections = Vec::with_capacity(count);
    for index in 0..count {
        let at = start + 16 + 12 * index;
        let (gpa, size, kind) = (
            le_u32(image, at).ok_or_else(|| bad("section".into()))?,
            le_u32(image, at + 4).ok_or_else(|| bad("section".into()))?,
            le_u32(image, at + 8).ok_or_else(|| bad("section".into()))?,
        );
        let out = |reason: &'static str| MeasureError::SectionOutOfRange {
            path: path.to_path_buf(),
            index,
            kind,
            gpa,
            size,
            reason,
        };
        if !matches!(kind, 1..=4 | 0x10) {
            return Err(bad(format!("section {index} has unknown type {kind:#x}")));
        }
        if size == 0 {
            return Err(out("is empty"));
        }
        if !gpa.is_multiple_of(4096) || !size.is_multiple_of(4096) {
            return Err(out("is not page-aligned"));
        }
        let end = u64::from(gpa) + u64::from(size);
        if end > firmware_base {
            return Err(out("reaches into the firmware image or past 4 GiB"));
        }
        sections.push(Section { gpa, size, kind });
    }
    for (i, a) in sections.iter().enumerate() {
        for (j, b) in sections.iter().enumerate().skip(i + 1) {
            let (a0, a1) = (u64::from(a.gpa), u64::from(a.gpa) + u64::from(a.size));
            let (b0, b1) = (u64::from(b.gpa), u64::from(b.gpa) + u64::from(b.size));
            if a0 < b1 && b0 < a1 {
                return Err(MeasureError::SectionsOverlap {
                    path: path.to_path_buf(),
                    first: i,
                    second: j,
                });
            }
        }
    }
    let reset_eip = entry(&SEV_ES_RESET_BLOCK_GUID)
        .and_then(|d| le_u32(d, 0))
        .ok_or_else(|| bad("no SEV-ES reset block (the APs' start address)".into()))?;
    let hash_table = entry(&SEV_HASH_TABLE_GUID).and_then(|d| le_u32(d, 0));
    let kernel_hashes =
        sections.iter().any(|s| s.kind == 0x10) && hash_table.is_some_and(|g| g != 0);
    Ok(Firmware {
        sections,
        reset_eip,
        kernel_hashes,
    })
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
    features.dedup();
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
    let firmware = parse_firmware(&inputs.ovmf, &image)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal OVMF-shaped image: an OVMF table with the SEV metadata, reset block and
    /// (optionally) hash table entries, and the given sections.
    pub(crate) fn image(sections: &[(u32, u32, u32)], hashes: bool) -> Vec<u8> {
        let len = 64 * 1024;
        let mut img = vec![0u8; len];
        // Metadata header at 0x1000 from the start.
        let start = 0x1000;
        img[start..start + 4].copy_from_slice(b"ASEV");
        let size = 16 + 12 * sections.len() as u32;
        img[start + 4..start + 8].copy_from_slice(&size.to_le_bytes());
        img[start + 8..start + 12].copy_from_slice(&1u32.to_le_bytes());
        img[start + 12..start + 16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, (gpa, sz, kind)) in sections.iter().enumerate() {
            let at = start + 16 + 12 * i;
            img[at..at + 4].copy_from_slice(&gpa.to_le_bytes());
            img[at + 4..at + 8].copy_from_slice(&sz.to_le_bytes());
            img[at + 8..at + 12].copy_from_slice(&kind.to_le_bytes());
        }
        let mut entries: Vec<(Vec<u8>, [u8; 16])> = vec![
            (
                ((len - start) as u32).to_le_bytes().to_vec(),
                SEV_METADATA_GUID,
            ),
            (
                0xffff_f000u32.to_le_bytes().to_vec(),
                SEV_ES_RESET_BLOCK_GUID,
            ),
        ];
        if hashes {
            let mut d = 0x0080_0000u32.to_le_bytes().to_vec();
            d.extend_from_slice(&0x1000u32.to_le_bytes());
            entries.push((d, SEV_HASH_TABLE_GUID));
        }
        let mut table = Vec::new();
        for (data, guid) in entries {
            table.extend_from_slice(&data);
            table.extend_from_slice(&((data.len() + ENTRY_HEADER) as u16).to_le_bytes());
            table.extend_from_slice(&guid);
        }
        let total = table.len() + ENTRY_HEADER;
        table.extend_from_slice(&(total as u16).to_le_bytes());
        table.extend_from_slice(&FOOTER_GUID);
        let end = len - TAIL;
        img[end - table.len()..end].copy_from_slice(&table);
        img
    }

    fn parse(img: &[u8]) -> Result<Firmware, MeasureError> {
        parse_firmware(Path::new("fw.fd"), img)
    }

    #[test]
    fn a_well_formed_image_parses() {
        let fw = parse(&image(
            &[(0x80_0000, 0x1000, 1), (0x80_1000, 0x1000, 2)],
            false,
        ))
        .unwrap();
        assert_eq!(fw.sections.len(), 2);
        assert_eq!(fw.reset_eip, 0xffff_f000);
        assert!(!fw.kernel_hashes);
        let fw = parse(&image(&[(0x80_0000, 0x1000, 0x10)], true)).unwrap();
        assert!(fw.kernel_hashes);
    }

    #[test]
    fn broken_images_get_their_exact_error() {
        let ok = image(&[(0x80_0000, 0x1000, 1)], false);
        // Not OVMF: too small, odd size, no footer.
        assert!(matches!(
            parse(&ok[..100]),
            Err(MeasureError::NotOvmf { .. })
        ));
        assert!(matches!(
            parse(&ok[..ok.len() - 1]),
            Err(MeasureError::NotOvmf { .. })
        ));
        let mut no_footer = ok.clone();
        let at = no_footer.len() - TAIL - 16;
        no_footer[at] ^= 1;
        assert!(matches!(
            parse(&no_footer),
            Err(MeasureError::NotOvmf { .. })
        ));
        // No SEV metadata entry: the GUID changed.
        let mut no_meta = ok.clone();
        let pos = no_meta
            .windows(16)
            .position(|w| w == SEV_METADATA_GUID)
            .unwrap();
        no_meta[pos] ^= 1;
        assert!(matches!(
            parse(&no_meta),
            Err(MeasureError::NoSevMetadata { .. })
        ));
        // Bad signature.
        let mut sig = ok.clone();
        sig[0x1000] = b'X';
        assert!(matches!(
            parse(&sig),
            Err(MeasureError::BadSevMetadata { .. })
        ));
        // Sections: overlapping, out of range, over the firmware, empty.
        assert!(matches!(
            parse(&image(
                &[(0x80_0000, 0x2000, 1), (0x80_1000, 0x1000, 2)],
                false
            )),
            Err(MeasureError::SectionsOverlap {
                first: 0,
                second: 1,
                ..
            })
        ));
        assert!(matches!(
            parse(&image(&[(0xffff_0000, 0x1000, 1)], false)),
            Err(MeasureError::SectionOutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            parse(&image(&[(0x80_0000, 0, 1)], false)),
            Err(MeasureError::SectionOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&image(&[(0x80_0000, 0x1000, 7)], false)),
            Err(MeasureError::BadSevMetadata { .. })
        ));
    }

    #[test]
    fn truncations_and_garbage_never_panic() {
        let ok = image(&[(0x80_0000, 0x1000, 1), (0x80_1000, 0x1000, 3)], true);
        for cut in (0..ok.len()).step_by(509) {
            let _ = parse(&ok[..cut]);
        }
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut img = ok.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = ok.len() - 1 - (x as usize % 256);
                img[at] = (x >> 8) as u8;
                let at = 0x1000 + (x as usize % 64);
                img[at] = (x >> 16) as u8;
            }
            let _ = parse(&img);
        }
    }
}
