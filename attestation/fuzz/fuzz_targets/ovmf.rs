//! The OVMF table and SEV metadata parser (`broker measure`'s firmware check) on arbitrary
//! bytes: as a whole image, and framed as the table of an image with a valid footer, so that
//! the fuzzer reaches the table entries, the metadata offset and the sections.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The OVMF table footer's GUID, on disk (96b582de-1fb2-45f7-baea-a366c55a082d).
const FOOTER: [u8; 16] = [
    0xde, 0x82, 0xb5, 0x96, 0xb2, 0x1f, 0xf7, 0x45, 0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d,
];

fuzz_target!(|data: &[u8]| {
    let _ = attestation::ovmf::parse(data);
    // An image whose table is `data`: footer 32 bytes before the end, its size covering it.
    let len = 64 * 1024;
    let table = &data[..data.len().min(16 * 1024)];
    let mut image = vec![0u8; len];
    let footer = len - 32 - 18;
    image[footer - table.len()..footer].copy_from_slice(table);
    let size = u16::try_from(table.len() + 18).unwrap_or(u16::MAX);
    image[footer..footer + 2].copy_from_slice(&size.to_le_bytes());
    image[footer + 2..footer + 18].copy_from_slice(&FOOTER);
    if let Ok(firmware) = attestation::ovmf::parse(&image) {
        assert!(!firmware.sections.is_empty());
    }
});
