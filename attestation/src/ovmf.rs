//! OVMF firmware images as the SEV-SNP launch measures them: the OVMF table at the end of the
//! image (entries running backwards from a footer 32 bytes before the end) and the SEV
//! metadata it points to (the sections the VMM adds to the launch: secure memory, secrets,
//! CPUID, SVSM calling area, kernel hashes). Parsed with bounds checks on untrusted bytes;
//! `broker measure` checks a firmware file with this before computing its measurement.

use crate::Error;

/// Largest firmware image accepted (OVMF builds are 2-4 MiB).
const MAX_FIRMWARE: usize = 64 << 20;
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
    /// Where the kernel hashes table sits (guest physical address), when there is one.
    pub hash_table_gpa: Option<u32>,
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

/// Parses and checks an OVMF image's table and SEV metadata: every offset and size is
/// bounds-checked, sections must be page-aligned, below the firmware and not overlap.
pub fn parse(image: &[u8]) -> Result<Firmware, Error> {
    let not_ovmf = |detail: &str| Error::FirmwareNotOvmf {
        detail: detail.to_string(),
    };
    let bad = |detail: String| Error::FirmwareSevMetadata { detail };
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

    let meta = entry(&SEV_METADATA_GUID).ok_or(Error::FirmwareNoSevMetadata)?;
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
        let out = |reason: &'static str| Error::FirmwareSectionOutOfRange {
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
                return Err(Error::FirmwareSectionsOverlap {
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
        hash_table_gpa: hash_table.filter(|&g| g != 0),
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
            Err(Error::FirmwareNotOvmf { .. })
        ));
        assert!(matches!(
            parse(&ok[..ok.len() - 1]),
            Err(Error::FirmwareNotOvmf { .. })
        ));
        let mut no_footer = ok.clone();
        let at = no_footer.len() - TAIL - 16;
        no_footer[at] ^= 1;
        assert!(matches!(
            parse(&no_footer),
            Err(Error::FirmwareNotOvmf { .. })
        ));
        // No SEV metadata entry: the GUID changed.
        let mut no_meta = ok.clone();
        let pos = no_meta
            .windows(16)
            .position(|w| w == SEV_METADATA_GUID)
            .unwrap();
        no_meta[pos] ^= 1;
        assert!(matches!(parse(&no_meta), Err(Error::FirmwareNoSevMetadata)));
        // Bad signature.
        let mut sig = ok.clone();
        sig[0x1000] = b'X';
        assert!(matches!(
            parse(&sig),
            Err(Error::FirmwareSevMetadata { .. })
        ));
        // Sections: overlapping, out of range, over the firmware, empty.
        assert!(matches!(
            parse(&image(
                &[(0x80_0000, 0x2000, 1), (0x80_1000, 0x1000, 2)],
                false
            )),
            Err(Error::FirmwareSectionsOverlap {
                first: 0,
                second: 1,
                ..
            })
        ));
        assert!(matches!(
            parse(&image(&[(0xffff_0000, 0x1000, 1)], false)),
            Err(Error::FirmwareSectionOutOfRange { index: 0, .. })
        ));
        assert!(matches!(
            parse(&image(&[(0x80_0000, 0, 1)], false)),
            Err(Error::FirmwareSectionOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&image(&[(0x80_0000, 0x1000, 7)], false)),
            Err(Error::FirmwareSevMetadata { .. })
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
