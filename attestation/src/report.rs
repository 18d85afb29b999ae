//! The SEV-SNP attestation report: a bounds-checked parser over the raw 1184 bytes.
//!
//! The parser keeps the bytes it was given. The signature is later verified over exactly
//! those bytes (`[0x000, 0x2A0)`), never over a re-encoding of the parsed fields.

use std::fmt;

use crate::error::Error;

/// Length of an SNP attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// End of the signed part of the report.
pub const SIGNED_LEN: usize = 0x2A0;

const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
const SIG_COMPONENT_LEN: usize = 72;
const P384_SCALAR_LEN: usize = 48;
const SIG_RESERVED: usize = 0x330;

/// The AMD EPYC generation a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Product {
    /// EPYC 7003 (Zen 3).
    Milan,
    /// EPYC 9004/8004 (Zen 4), including Bergamo and Siena.
    Genoa,
    /// EPYC 9005 (Zen 5).
    Turin,
}

impl Product {
    /// All products this verifier knows, in KDS naming.
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// The product name as AMD's KDS and certificates spell it.
    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }

    /// Parses a KDS product name, ignoring a stepping suffix such as `-B0`.
    pub fn from_name(name: &str) -> Option<Product> {
        let base = name.split('-').next().unwrap_or(name);
        Product::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(base))
    }

    /// Maps CPUID family and model to a product.
    pub fn from_cpuid(family: u8, model: u8) -> Option<Product> {
        match (family, model) {
            (0x19, 0x00..=0x0F) => Some(Product::Milan),
            (0x19, 0x10..=0x1F) | (0x19, 0xA0..=0xAF) => Some(Product::Genoa),
            (0x1A, 0x00..=0x11) => Some(Product::Turin),
            _ => None,
        }
    }

    /// Length of the hwID extension of this product's VCEKs (a prefix of CHIP_ID).
    pub fn hwid_len(self) -> usize {
        match self {
            Product::Turin => 8,
            Product::Milan | Product::Genoa => 64,
        }
    }

    fn tcb_layout(self) -> TcbLayout {
        match self {
            Product::Turin => TcbLayout::Turin,
            Product::Milan | Product::Genoa => TcbLayout::MilanGenoa,
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which key signed a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SigningKeyKind {
    /// Versioned Chip Endorsement Key (per chip and TCB).
    Vcek,
    /// Versioned Loaded Endorsement Key (per cloud provider).
    Vlek,
}

impl fmt::Display for SigningKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SigningKeyKind::Vcek => "VCEK",
            SigningKeyKind::Vlek => "VLEK",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcbLayout {
    MilanGenoa,
    Turin,
}

impl TcbLayout {
    /// Byte positions of the reserved bytes of a TCB_VERSION.
    fn reserved(self) -> std::ops::Range<usize> {
        match self {
            TcbLayout::MilanGenoa => 2..6,
            TcbLayout::Turin => 4..7,
        }
    }
}

/// A TCB_VERSION, decoded for its product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Tcb {
    /// Firmware SPL (Turin and later only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    /// Boot loader SPL.
    pub bootloader: u8,
    /// PSP OS SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

impl Tcb {
    /// Encodes this TCB as the 8 bytes of a TCB_VERSION for `product`. `fmc` is used on
    /// Turin only.
    pub fn encode(&self, product: Product) -> [u8; 8] {
        match product.tcb_layout() {
            TcbLayout::MilanGenoa => [
                self.bootloader,
                self.tee,
                0,
                0,
                0,
                0,
                self.snp,
                self.microcode,
            ],
            TcbLayout::Turin => [
                self.fmc.unwrap_or(0),
                self.bootloader,
                self.tee,
                self.snp,
                0,
                0,
                0,
                self.microcode,
            ],
        }
    }

    fn decode(bytes: [u8; 8], layout: TcbLayout) -> Tcb {
        let [b0, b1, b2, b3, _, _, b6, b7] = bytes;
        match layout {
            TcbLayout::MilanGenoa => Tcb {
                fmc: None,
                bootloader: b0,
                tee: b1,
                snp: b6,
                microcode: b7,
            },
            TcbLayout::Turin => Tcb {
                fmc: Some(b0),
                bootloader: b1,
                tee: b2,
                snp: b3,
                microcode: b7,
            },
        }
    }
}

/// A firmware version triple (CURRENT_* or COMMITTED_* fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FirmwareVersion {
    /// Major version.
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// Build number.
    pub build: u8,
}

/// A parsed attestation report. It holds the received bytes; fields are decoded views.
///
/// Parsing checks structure only (length, version, reserved bytes, signature encoding).
/// It says nothing about authenticity: that is [`crate::Verifier`]'s job.
#[derive(Clone)]
pub struct AttestationReport {
    raw: Box<[u8; REPORT_LEN]>,
    version: u32,
    cpuid_product: Option<Product>,
    signing_key: SigningKeyKind,
}

impl fmt::Debug for AttestationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttestationReport")
            .field("version", &self.version)
            .field("product", &self.cpuid_product)
            .field("signing_key", &self.signing_key)
            .field("measurement", &hex::encode(self.measurement()))
            .finish_non_exhaustive()
    }
}

/// Reads fixed-size arrays out of a report whose length has been checked.
struct Bytes<'a>(&'a [u8; REPORT_LEN]);

impl Bytes<'_> {
    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        // Offsets are constants of the report layout and always lie inside REPORT_LEN; the
        // fallback keeps this total should a layout constant ever be wrong.
        if let Some(src) = self.0.get(offset..offset + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u8(&self, offset: usize) -> u8 {
        self.0.get(offset).copied().unwrap_or(0)
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.array(offset))
    }
    fn u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.array(offset))
    }
    fn zero(&self, range: std::ops::Range<usize>, field: &'static str) -> Result<(), Error> {
        let start = range.start;
        match self.0.get(range) {
            Some(slice) => match slice.iter().position(|b| *b != 0) {
                None => Ok(()),
                Some(i) => Err(Error::ReservedNonZero {
                    field,
                    offset: start + i,
                }),
            },
            None => Err(Error::ReservedNonZero {
                field,
                offset: start,
            }),
        }
    }
}

const TCB_FIELDS: [(usize, &str); 4] = [
    (0x38, "current_tcb"),
    (0x180, "reported_tcb"),
    (0x1E0, "committed_tcb"),
    (0x1F0, "launch_tcb"),
];

impl AttestationReport {
    /// Parses a raw report. Never panics; every refusal is an [`Error`].
    pub fn parse(bytes: &[u8]) -> Result<AttestationReport, Error> {
        let raw: Box<[u8; REPORT_LEN]> = match <[u8; REPORT_LEN]>::try_from(bytes) {
            Ok(array) => Box::new(array),
            Err(_) => {
                return Err(Error::ReportLength {
                    expected: REPORT_LEN,
                    actual: bytes.len(),
                });
            }
        };
        let b = Bytes(&raw);

        let version = b.u32(0x00);
        if !matches!(version, 2 | 3 | 5) {
            return Err(Error::UnsupportedVersion { version });
        }
        let algorithm = b.u32(0x34);
        if algorithm != 1 {
            return Err(Error::UnsupportedSignatureAlgorithm { algorithm });
        }

        // Key info: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 2..4 SIGNING_KEY, rest reserved.
        let key_info = b.u32(0x48);
        if key_info >> 5 != 0 {
            return Err(Error::ReservedNonZero {
                field: "key_info",
                offset: 0x48,
            });
        }
        b.zero(0x4C..0x50, "reserved_0x4c")?;
        let signing_key = match (key_info >> 2) & 0b111 {
            0 => SigningKeyKind::Vcek,
            1 => SigningKeyKind::Vlek,
            other => {
                return Err(Error::UnsupportedSigningKey { value: other as u8 });
            }
        };

        let cpuid_product = if version >= 3 {
            let (family, model) = (b.u8(0x188), b.u8(0x189));
            let product = Product::from_cpuid(family, model)
                .ok_or(Error::UnknownProduct { family, model })?;
            b.zero(0x18B..0x1A0, "reserved_after_cpuid")?;
            Some(product)
        } else {
            b.zero(0x188..0x1A0, "reserved_after_reported_tcb")?;
            None
        };

        // Version 2 reports only come from Milan and Genoa, which share a TCB layout.
        let layout = cpuid_product.map_or(TcbLayout::MilanGenoa, Product::tcb_layout);
        for (offset, field) in TCB_FIELDS {
            let reserved = layout.reserved();
            b.zero(offset + reserved.start..offset + reserved.end, field)?;
        }

        b.zero(0x1EB..0x1EC, "reserved_after_current_version")?;
        b.zero(0x1EF..0x1F0, "reserved_after_committed_version")?;
        if version >= 5 {
            b.zero(0x208..SIGNED_LEN, "reserved_after_mitigation_vectors")?;
        } else {
            b.zero(0x1F8..SIGNED_LEN, "reserved_after_launch_tcb")?;
        }

        for (start, component) in [(SIG_R, "R"), (SIG_S, "S")] {
            let pad = start + P384_SCALAR_LEN..start + SIG_COMPONENT_LEN;
            if b.zero(pad, "signature").is_err() {
                return Err(Error::NonCanonicalSignature { component });
            }
        }
        b.zero(SIG_RESERVED..REPORT_LEN, "signature_reserved")?;

        Ok(AttestationReport {
            raw,
            version,
            cpuid_product,
            signing_key,
        })
    }

    fn b(&self) -> Bytes<'_> {
        Bytes(&self.raw)
    }

    /// The bytes exactly as received.
    pub fn raw(&self) -> &[u8; REPORT_LEN] {
        &self.raw
    }
    /// The signed part of the received bytes, `[0x000, 0x2A0)`.
    pub fn signed_bytes(&self) -> &[u8] {
        self.raw.get(..SIGNED_LEN).unwrap_or(&[])
    }
    /// The signature as fixed-width big-endian `r || s` (96 bytes), as ECDSA verifiers expect.
    pub fn signature_fixed(&self) -> [u8; 2 * P384_SCALAR_LEN] {
        let mut out = [0u8; 2 * P384_SCALAR_LEN];
        let r: [u8; P384_SCALAR_LEN] = self.b().array(SIG_R);
        let s: [u8; P384_SCALAR_LEN] = self.b().array(SIG_S);
        for (i, byte) in r.iter().rev().chain(s.iter().rev()).enumerate() {
            if let Some(slot) = out.get_mut(i) {
                *slot = *byte;
            }
        }
        out
    }
    /// Report format version (2, 3 or 5).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Product from the CPUID fields (versions 3 and later).
    pub fn cpuid_product(&self) -> Option<Product> {
        self.cpuid_product
    }
    /// CPUID family, model and stepping (versions 3 and later).
    pub fn cpuid(&self) -> Option<(u8, u8, u8)> {
        (self.version >= 3).then(|| (self.b().u8(0x188), self.b().u8(0x189), self.b().u8(0x18A)))
    }
    /// Which key the report says signed it.
    pub fn signing_key(&self) -> SigningKeyKind {
        self.signing_key
    }
    /// GUEST_SVN.
    pub fn guest_svn(&self) -> u32 {
        self.b().u32(0x04)
    }
    /// The guest policy the VM was launched with.
    pub fn policy(&self) -> u64 {
        self.b().u64(0x08)
    }
    /// FAMILY_ID from the ID block.
    pub fn family_id(&self) -> [u8; 16] {
        self.b().array(0x10)
    }
    /// IMAGE_ID from the ID block.
    pub fn image_id(&self) -> [u8; 16] {
        self.b().array(0x20)
    }
    /// The VMPL that requested the report.
    pub fn vmpl(&self) -> u32 {
        self.b().u32(0x30)
    }
    /// PLATFORM_INFO.
    pub fn platform_info(&self) -> u64 {
        self.b().u64(0x40)
    }
    /// AUTHOR_KEY_EN: whether the ID block was signed by an author key.
    pub fn author_key_enabled(&self) -> bool {
        self.b().u32(0x48) & 1 != 0
    }
    /// MASK_CHIP_KEY: whether the VCEK was masked by the guest's policy.
    pub fn mask_chip_key(&self) -> bool {
        self.b().u32(0x48) & 2 != 0
    }
    /// REPORT_DATA supplied by the guest.
    pub fn report_data(&self) -> [u8; 64] {
        self.b().array(0x50)
    }
    /// The launch measurement.
    pub fn measurement(&self) -> [u8; 48] {
        self.b().array(0x90)
    }
    /// HOST_DATA supplied by the host at launch.
    pub fn host_data(&self) -> [u8; 32] {
        self.b().array(0xC0)
    }
    /// SHA-384 digest of the ID key that signed the ID block.
    pub fn id_key_digest(&self) -> [u8; 48] {
        self.b().array(0xE0)
    }
    /// SHA-384 digest of the author key that certified the ID key.
    pub fn author_key_digest(&self) -> [u8; 48] {
        self.b().array(0x110)
    }
    /// REPORT_ID of the guest.
    pub fn report_id(&self) -> [u8; 32] {
        self.b().array(0x140)
    }
    /// REPORT_ID of the guest's migration agent.
    pub fn report_id_ma(&self) -> [u8; 32] {
        self.b().array(0x160)
    }
    /// CHIP_ID (all zero when masked).
    pub fn chip_id(&self) -> [u8; 64] {
        self.b().array(0x1A0)
    }
    /// Whether CHIP_ID is masked (all zero).
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id().iter().all(|b| *b == 0)
    }
    fn tcb_at(&self, offset: usize, product: Product) -> Tcb {
        Tcb::decode(self.b().array(offset), product.tcb_layout())
    }
    /// CURRENT_TCB, decoded for `product`.
    pub fn current_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(0x38, product)
    }
    /// REPORTED_TCB (the TCB the VCEK is derived from), decoded for `product`.
    pub fn reported_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(0x180, product)
    }
    /// COMMITTED_TCB, decoded for `product`.
    pub fn committed_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(0x1E0, product)
    }
    /// LAUNCH_TCB, decoded for `product`.
    pub fn launch_tcb(&self, product: Product) -> Tcb {
        self.tcb_at(0x1F0, product)
    }
    /// The running firmware's version.
    pub fn current_firmware(&self) -> FirmwareVersion {
        FirmwareVersion {
            build: self.b().u8(0x1E8),
            minor: self.b().u8(0x1E9),
            major: self.b().u8(0x1EA),
        }
    }
    /// The committed firmware's version.
    pub fn committed_firmware(&self) -> FirmwareVersion {
        FirmwareVersion {
            build: self.b().u8(0x1EC),
            minor: self.b().u8(0x1ED),
            major: self.b().u8(0x1EE),
        }
    }
    /// LAUNCH_MIT_VECTOR (version 5).
    pub fn launch_mitigation_vector(&self) -> Option<u64> {
        (self.version >= 5).then(|| self.b().u64(0x1F8))
    }
    /// CURRENT_MIT_VECTOR (version 5).
    pub fn current_mitigation_vector(&self) -> Option<u64> {
        (self.version >= 5).then(|| self.b().u64(0x200))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MILAN_V2: &[u8] = include_bytes!("../tests/data/virtee-sev-milan-v2/report.bin");

    #[test]
    fn parses_a_genuine_report() {
        let r = AttestationReport::parse(MILAN_V2).unwrap();
        assert_eq!(r.version(), 2);
        assert_eq!(r.signing_key(), SigningKeyKind::Vcek);
        assert_eq!(r.cpuid_product(), None);
        let tcb = r.reported_tcb(Product::Milan);
        assert_eq!(
            (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode),
            (3, 0, 8, 115)
        );
        assert_eq!(
            hex::encode(r.measurement()),
            "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
        );
    }

    #[test]
    fn refuses_wrong_lengths() {
        for len in [0, 1, REPORT_LEN - 1, REPORT_LEN + 1] {
            let bytes = vec![0u8; len];
            assert_eq!(
                AttestationReport::parse(&bytes).unwrap_err(),
                Error::ReportLength {
                    expected: REPORT_LEN,
                    actual: len
                }
            );
        }
    }

    #[test]
    fn refuses_versions_other_than_2_3_5() {
        for v in [0u32, 1, 4, 6, u32::MAX] {
            let mut bytes = MILAN_V2.to_vec();
            bytes[..4].copy_from_slice(&v.to_le_bytes());
            assert_eq!(
                AttestationReport::parse(&bytes).unwrap_err(),
                Error::UnsupportedVersion { version: v }
            );
        }
    }

    #[test]
    fn refuses_every_reserved_byte() {
        // Every byte the layout reserves, for a v2 report.
        let mut reserved: Vec<usize> = vec![0x4C, 0x4D, 0x4E, 0x4F, 0x1EB, 0x1EF];
        reserved.extend(0x188..0x1A0);
        reserved.extend(0x1F8..SIGNED_LEN);
        reserved.extend(SIG_RESERVED..REPORT_LEN);
        for (base, _) in TCB_FIELDS {
            reserved.extend(base + 2..base + 6);
        }
        for offset in reserved {
            let mut bytes = MILAN_V2.to_vec();
            bytes[offset] ^= 0x01;
            match AttestationReport::parse(&bytes) {
                Err(Error::ReservedNonZero { offset: o, .. }) => assert_eq!(o, offset),
                other => panic!("offset {offset:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_non_canonical_signature_padding() {
        for (start, component) in [(SIG_R, "R"), (SIG_S, "S")] {
            for offset in start + 48..start + 72 {
                let mut bytes = MILAN_V2.to_vec();
                bytes[offset] = 0x80;
                assert_eq!(
                    AttestationReport::parse(&bytes).unwrap_err(),
                    Error::NonCanonicalSignature { component }
                );
            }
        }
    }

    #[test]
    fn refuses_unknown_signing_key_and_algorithm() {
        let mut bytes = MILAN_V2.to_vec();
        bytes[0x48] = 7 << 2;
        assert_eq!(
            AttestationReport::parse(&bytes).unwrap_err(),
            Error::UnsupportedSigningKey { value: 7 }
        );
        let mut bytes = MILAN_V2.to_vec();
        bytes[0x34] = 2;
        assert_eq!(
            AttestationReport::parse(&bytes).unwrap_err(),
            Error::UnsupportedSignatureAlgorithm { algorithm: 2 }
        );
    }

    #[test]
    fn unknown_cpuid_is_refused() {
        let genoa = include_bytes!("../tests/data/trustee-e2e-genoa-v3/report.bin");
        let mut bytes = genoa.to_vec();
        bytes[0x188] = 0x17; // Zen 2: no SEV-SNP
        assert_eq!(
            AttestationReport::parse(&bytes).unwrap_err(),
            Error::UnknownProduct {
                family: 0x17,
                model: genoa[0x189]
            }
        );
    }

    #[test]
    fn product_from_cpuid() {
        assert_eq!(Product::from_cpuid(0x19, 0x01), Some(Product::Milan));
        assert_eq!(Product::from_cpuid(0x19, 0x11), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x19, 0xA0), Some(Product::Genoa));
        assert_eq!(Product::from_cpuid(0x1A, 0x02), Some(Product::Turin));
        assert_eq!(Product::from_cpuid(0x1A, 0x12), None);
        assert_eq!(Product::from_cpuid(0x17, 0x31), None);
        assert_eq!(Product::from_name("Milan-B0"), Some(Product::Milan));
        assert_eq!(Product::from_name("Turin"), Some(Product::Turin));
        assert_eq!(Product::from_name("Rome"), None);
    }

    #[test]
    fn signature_is_reordered_big_endian() {
        let r = AttestationReport::parse(MILAN_V2).unwrap();
        let sig = r.signature_fixed();
        assert_eq!(sig[0], MILAN_V2[SIG_R + 47]);
        assert_eq!(sig[47], MILAN_V2[SIG_R]);
        assert_eq!(sig[48], MILAN_V2[SIG_S + 47]);
        assert_eq!(sig[95], MILAN_V2[SIG_S]);
    }
}
