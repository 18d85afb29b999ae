//! The GHCB certificate table returned with an extended report (`/dev/sev-guest`
//! SNP_GET_EXT_REPORT, configfs-tsm `auxblob`): entries of (GUID, offset, length) ending with
//! an all-zero entry, offsets relative to the start of the table.

use crate::chain::Endorsements;
use crate::error::Error;

/// Most entries accepted in one table.
pub const MAX_ENTRIES: usize = 64;
const ENTRY_LEN: usize = 24;

/// The certificate a table entry holds, by its GUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    /// AMD Root Key.
    Ark,
    /// AMD SEV Key (or ASVK).
    Ask,
    /// Versioned Chip Endorsement Key.
    Vcek,
    /// Versioned Loaded Endorsement Key.
    Vlek,
    /// Another GUID (kept, not interpreted).
    Other([u8; 16]),
}

/// GUIDs in their standard string form, as the GHCB specification lists them.
const GUIDS: [(CertKind, &str); 4] = [
    (CertKind::Ark, "c0b406a4-a803-4952-9743-3fb6014cd0ae"),
    (CertKind::Ask, "4ab7b379-bbac-4fe4-a02f-05aef327c782"),
    (CertKind::Vcek, "63da758d-e664-4564-adc5-f4b93be8accd"),
    (CertKind::Vlek, "a8074bc2-a25a-483e-aae6-39c045a0b8a1"),
];

/// Encodes a GUID string in the little-endian ("mixed-endian") byte order tables use.
pub fn guid_bytes(guid: &str) -> Option<[u8; 16]> {
    let hex: String = guid.chars().filter(|c| *c != '-').collect();
    let raw = hex::decode(hex).ok()?;
    let raw: [u8; 16] = raw.try_into().ok()?;
    let mut out = raw;
    out[..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Some(out)
}

impl CertKind {
    fn from_guid(guid: [u8; 16]) -> CertKind {
        for (kind, s) in GUIDS {
            if guid_bytes(s) == Some(guid) {
                return kind;
            }
        }
        CertKind::Other(guid)
    }

    /// The GUID of this kind, in table byte order.
    pub fn guid(self) -> [u8; 16] {
        match self {
            CertKind::Other(g) => g,
            kind => GUIDS
                .iter()
                .find(|(k, _)| *k == kind)
                .and_then(|(_, s)| guid_bytes(s))
                .unwrap_or([0; 16]),
        }
    }
}

/// One certificate from a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertEntry {
    /// What the GUID says the entry holds.
    pub kind: CertKind,
    /// The certificate (DER).
    pub der: Vec<u8>,
}

/// Parses a certificate table. Never panics; entries pointing into the header or out of
/// range are errors (entries may share bytes: each is decoded on its own).
pub fn parse(table: &[u8]) -> Result<Vec<CertEntry>, Error> {
    let err = |detail: String| Error::CertTable { detail };
    let mut out = Vec::new();
    for index in 0.. {
        if index >= MAX_ENTRIES {
            return Err(err(format!("more than {MAX_ENTRIES} entries")));
        }
        let start = index * ENTRY_LEN;
        let entry = table
            .get(start..start + ENTRY_LEN)
            .ok_or_else(|| err(format!("entry {index} runs past the end (no terminator)")))?;
        let mut guid = [0u8; 16];
        guid.copy_from_slice(entry.get(..16).unwrap_or(&[0; 16]));
        let word = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(entry.get(at..at + 4).unwrap_or(&[0; 4]));
            u32::from_le_bytes(b) as usize
        };
        let (offset, length) = (word(16), word(20));
        if guid == [0; 16] && offset == 0 && length == 0 {
            break;
        }
        let headers_end = (index + 1) * ENTRY_LEN;
        if offset < headers_end {
            return Err(err(format!("entry {index} points into the header")));
        }
        let der = offset
            .checked_add(length)
            .and_then(|end| table.get(offset..end))
            .ok_or_else(|| err(format!("entry {index} ({offset}+{length}) is out of range")))?;
        if length == 0 {
            return Err(err(format!("entry {index} is empty")));
        }
        out.push(CertEntry {
            kind: CertKind::from_guid(guid),
            der: der.to_vec(),
        });
    }
    Ok(out)
}

/// Builds a table from entries (the inverse of [`parse`]), e.g. for the simulator.
/// Entries beyond [`MAX_ENTRIES`] or 16 MiB in total are not representable and are dropped.
pub fn build(entries: &[CertEntry]) -> Vec<u8> {
    let mut total = 0usize;
    let entries: Vec<&CertEntry> = entries
        .iter()
        .take(MAX_ENTRIES - 1)
        .take_while(|e| {
            total += e.der.len();
            total <= 16 << 20
        })
        .collect();
    let header = (entries.len() + 1) * ENTRY_LEN;
    let mut out = Vec::new();
    let mut offset = header;
    for e in &entries {
        out.extend_from_slice(&e.kind.guid());
        out.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&u32::try_from(e.der.len()).unwrap_or(u32::MAX).to_le_bytes());
        offset += e.der.len();
    }
    out.extend_from_slice(&[0u8; ENTRY_LEN]);
    for e in &entries {
        out.extend_from_slice(&e.der);
    }
    out
}

impl Endorsements {
    /// Endorsements from a certificate table: the VCEK or VLEK, plus ASK and ARK if present.
    pub fn from_cert_table(table: &[u8]) -> Result<Endorsements, Error> {
        let mut out = Endorsements::default();
        for entry in parse(table)? {
            match entry.kind {
                CertKind::Vcek | CertKind::Vlek if out.vek.is_empty() => out.vek = entry.der,
                CertKind::Vcek | CertKind::Vlek => {
                    return Err(Error::CertTable {
                        detail: "more than one VCEK/VLEK".into(),
                    });
                }
                CertKind::Ask | CertKind::Ark => out.chain.push(entry.der),
                CertKind::Other(_) => {}
            }
        }
        if out.vek.is_empty() {
            return Err(Error::CertTable {
                detail: "no VCEK or VLEK entry".into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_byte_order() {
        assert_eq!(
            hex::encode(guid_bytes("63da758d-e664-4564-adc5-f4b93be8accd").unwrap()),
            "8d75da6364e66445adc5f4b93be8accd"
        );
    }

    #[test]
    fn round_trip_and_refusals() {
        let entries = vec![
            CertEntry {
                kind: CertKind::Vcek,
                der: vec![1, 2, 3],
            },
            CertEntry {
                kind: CertKind::Ask,
                der: vec![4, 5],
            },
            CertEntry {
                kind: CertKind::Ark,
                der: vec![6],
            },
        ];
        let table = build(&entries);
        assert_eq!(parse(&table).unwrap(), entries);
        let e = Endorsements::from_cert_table(&table).unwrap();
        assert_eq!(e.vek, vec![1, 2, 3]);
        assert_eq!(e.chain.len(), 2);

        // Truncated anywhere: an error, never a panic.
        for len in 0..table.len() {
            let _ = parse(&table[..len]);
        }
        assert!(parse(&table[..24]).is_err());
        // Out-of-range length.
        let mut bad = table.clone();
        bad[20] = 0xff;
        assert!(matches!(parse(&bad), Err(Error::CertTable { .. })));
        // Offset pointing into the headers.
        let mut bad = table.clone();
        bad[16] = 0;
        assert!(parse(&bad).is_err());
        // Offset + length overflowing.
        let mut bad = table;
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bad).is_err());
        assert!(Endorsements::from_cert_table(&build(&[])).is_err());
    }
}
