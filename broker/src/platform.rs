//! The SEV-SNP platform the broker itself runs on, for the `snp-sealed` master-key provider:
//! a key the AMD secure processor derives for this VM (`MSG_KEY_REQ` through
//! `/dev/sev-guest`), from the chip's VCEK secret mixed with the fields of the VM's launch the
//! operator selects. Only a VM with the same values of those fields, on the same chip, derives
//! the same key. The derivation is a trait so that tests and demos run it on the simulated
//! platform (`dangerous_simulated_platform`).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::Error;
use crate::keys::MasterKey;

/// A field of the VM's launch that can be mixed into the derived key (the firmware's
/// GUEST_FIELD_SELECT bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SealField {
    /// The guest policy (bit 0).
    Policy,
    /// The ID block's IMAGE_ID (bit 1).
    ImageId,
    /// The ID block's FAMILY_ID (bit 2).
    FamilyId,
    /// The launch measurement (bit 3).
    Measurement,
    /// The guest SVN given (bit 4): a VM whose ID block says a lower SVN cannot derive it.
    GuestSvn,
    /// The TCB version given (bit 5): a platform whose committed TCB is lower cannot.
    TcbVersion,
}

impl SealField {
    /// Every field, by its configuration name.
    pub const ALL: [(&'static str, SealField); 6] = [
        ("policy", SealField::Policy),
        ("image_id", SealField::ImageId),
        ("family_id", SealField::FamilyId),
        ("measurement", SealField::Measurement),
        ("guest_svn", SealField::GuestSvn),
        ("tcb_version", SealField::TcbVersion),
    ];

    fn bit(self) -> u64 {
        1 << (self as u32)
    }

    /// Its configuration name.
    pub fn name(self) -> &'static str {
        SealField::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }
}

/// What a sealed master key is bound to: the fields mixed in and the values the request
/// gives for the VMPL, guest SVN and TCB version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealing {
    /// The fields mixed in (sorted, no duplicates, at least one).
    pub fields: Vec<SealField>,
    /// The VMPL mixed in (the broker's own, or higher).
    pub vmpl: u32,
    /// The guest SVN mixed in when `guest_svn` is selected.
    pub guest_svn: u32,
    /// The TCB version mixed in when `tcb_version` is selected.
    pub tcb_version: u64,
}

const HEADER_MAGIC: &[u8; 4] = b"SNS1";
const HEADER_LEN: usize = 4 + 8 + 4 + 4 + 8;
const AAD_LABEL: &[u8] = b"snp-key-broker/v1 sealed master key";

impl Sealing {
    /// The GUEST_FIELD_SELECT value.
    pub fn field_select(&self) -> u64 {
        self.fields.iter().fold(0, |acc, f| acc | f.bit())
    }

    fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(HEADER_MAGIC);
        h[4..12].copy_from_slice(&self.field_select().to_le_bytes());
        h[12..16].copy_from_slice(&self.vmpl.to_le_bytes());
        h[16..20].copy_from_slice(&self.guest_svn.to_le_bytes());
        h[20..28].copy_from_slice(&self.tcb_version.to_le_bytes());
        h
    }

    fn describe(header: &[u8]) -> String {
        let u64_at = |at: usize| {
            header
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or_default()
        };
        let u32_at = |at: usize| {
            header
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or_default()
        };
        let select = u64_at(4);
        let names: Vec<&str> = SealField::ALL
            .iter()
            .filter(|(_, f)| select & f.bit() != 0)
            .map(|(n, _)| *n)
            .collect();
        format!(
            "fields [{}], vmpl {}, guest_svn {}, tcb_version {:#x}",
            names.join(", "),
            u32_at(12),
            u32_at(16),
            u64_at(20)
        )
    }
}

/// Which platform the broker runs on (`[platform]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformChoice {
    /// A SEV-SNP guest with `/dev/sev-guest` (the default).
    SevGuest,
    /// The simulated platform of `broker init --dev`'s `sim/` directory (tests and demos).
    DangerousSimulated {
        /// The simulated AMD hierarchy.
        dir: std::path::PathBuf,
        /// The simulated VM's measurement (the simulator's default if absent).
        measurement: Option<Vec<u8>>,
        /// Its chip id (the simulator's default if absent).
        chip_id: Option<Vec<u8>>,
    },
}

impl PlatformChoice {
    /// The platform.
    pub fn open(&self) -> Result<Box<dyn Platform>, Error> {
        match self {
            PlatformChoice::SevGuest => Ok(Box::new(SevGuest)),
            PlatformChoice::DangerousSimulated {
                dir,
                measurement,
                chip_id,
            } => {
                tracing::warn!(
                    "the broker runs on the SIMULATED SEV-SNP platform (platform.dangerous_simulated): tests and demos only"
                );
                #[cfg(feature = "simulator")]
                {
                    let mut fields =
                        attestation::sim::ReportFields::new(attestation::Product::Genoa);
                    if let Some(m) = measurement {
                        fields.measurement.copy_from_slice(m);
                    }
                    if let Some(c) = chip_id {
                        fields.chip_id.copy_from_slice(c);
                    }
                    Ok(Box::new(Simulated::load(dir, fields)?))
                }
                #[cfg(not(feature = "simulator"))]
                {
                    let _ = (dir, measurement, chip_id);
                    Err(Error::NoSimulator {
                        setting: "platform.dangerous_simulated",
                    })
                }
            }
        }
    }
}

/// Where the broker runs: what derives its sealing key.
pub trait Platform: Send + Sync {
    /// A short name for messages (`sev-guest`, `simulated`).
    fn name(&self) -> &'static str;
    /// The key the platform derives for `sealing`.
    fn derived_key(&self, sealing: &Sealing) -> Result<Zeroizing<[u8; 32]>, Error>;
    /// An attestation report of this VM with `report_data`, and the certificates the
    /// platform hands out with it (the host's certificate table).
    fn report(&self, report_data: [u8; 64]) -> Result<attestation::protocol::Evidence, Error>;
}

/// The real platform: `/dev/sev-guest` in a SEV-SNP guest.
#[derive(Debug, Default)]
pub struct SevGuest;

impl Platform for SevGuest {
    fn name(&self) -> &'static str {
        "sev-guest"
    }

    fn derived_key(&self, sealing: &Sealing) -> Result<Zeroizing<[u8; 32]>, Error> {
        use sev::firmware::guest::{DerivedKey, Firmware, GuestFieldSelect};
        let mut fw = Firmware::open().map_err(|e| {
            Error::Config(format!(
                "snp-sealed: cannot open /dev/sev-guest ({e}); the broker must run in a SEV-SNP VM with the sev-guest driver"
            ))
        })?;
        let request = DerivedKey::new(
            false, // the VCEK, not the VM root key (which needs a migration agent)
            GuestFieldSelect(sealing.field_select()),
            sealing.vmpl,
            sealing.guest_svn,
            sealing.tcb_version,
            None,
        );
        // Message version 1: the launch mitigation vector (version 2) is not mixed in.
        let key = fw
            .get_derived_key(Some(1), request)
            .map_err(|e| Error::Crypto(format!("snp-sealed: MSG_KEY_REQ refused: {e}")))?;
        Ok(Zeroizing::new(key))
    }

    fn report(&self, report_data: [u8; 64]) -> Result<attestation::protocol::Evidence, Error> {
        use sev::firmware::host::CertType;
        let mut fw = sev::firmware::guest::Firmware::open()
            .map_err(|e| Error::Config(format!("/dev/sev-guest: {e}")))?;
        let (report, table) = fw
            .get_ext_report(None, Some(report_data), None)
            .map_err(|e| Error::Crypto(format!("SNP_GET_EXT_REPORT: {e}")))?;
        let certificates = table
            .unwrap_or_default()
            .into_iter()
            .filter_map(|entry| {
                let kind = match entry.cert_type {
                    CertType::VCEK => "vcek",
                    CertType::VLEK => "vlek",
                    CertType::ASK => "ask",
                    CertType::ARK => "ark",
                    CertType::CRL => "crl",
                    _ => return None,
                };
                Some(entry_of(kind, &entry.data))
            })
            .collect();
        Ok(attestation::protocol::Evidence::Snp {
            report: b64(&report),
            certificates,
        })
    }
}

#[cfg(feature = "simulator")]
mod simulated;
#[cfg(feature = "simulator")]
pub use simulated::Simulated;

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn entry_of(kind: &str, der: &[u8]) -> attestation::protocol::CertificateEntry {
    attestation::protocol::CertificateEntry {
        kind: kind.into(),
        der: b64(der),
    }
}

fn aead(key: &[u8; 32]) -> Result<LessSafeKey, Error> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| Error::Crypto("AES-256-GCM key".into()))?,
    ))
}

/// The master key sealed to this VM: `header || nonce || ciphertext || tag`, the header (what
/// it is sealed to) as associated data.
pub fn seal(
    platform: &dyn Platform,
    sealing: &Sealing,
    master: &MasterKey,
) -> Result<Vec<u8>, Error> {
    let key = platform.derived_key(sealing)?;
    let header = sealing.header();
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::Crypto("no randomness".into()))?;
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&header);
    // Room for the tag, so that appending it does not leave a freed plaintext copy.
    let mut buf = Zeroizing::new(Vec::with_capacity(master.expose().len() + 16));
    buf.extend_from_slice(master.expose());
    aead(&key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut *buf,
        )
        .map_err(|_| Error::Crypto("sealing the master key".into()))?;
    let mut out = header.to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    Ok(out)
}

/// Opens a master key sealed by [`seal`] on this VM.
pub fn unseal(
    platform: &dyn Platform,
    sealing: &Sealing,
    sealed: &[u8],
) -> Result<MasterKey, Error> {
    if sealed.len() < HEADER_LEN + NONCE_LEN + 16 || &sealed[..4] != HEADER_MAGIC {
        return Err(Error::Crypto(
            "snp-sealed: the stored master key is not a sealed key".into(),
        ));
    }
    let (header, rest) = sealed.split_at(HEADER_LEN);
    if header != sealing.header() {
        return Err(Error::Config(format!(
            "snp-sealed: the store's master key is sealed to {}, but [master_key] asks for {}; \
             configure what it was sealed to",
            Sealing::describe(header),
            Sealing::describe(&sealing.header())
        )));
    }
    let key = platform.derived_key(sealing)?;
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| Error::Crypto("sealed key nonce".into()))?;
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(header);
    let mut buf = Zeroizing::new(ct.to_vec());
    let plain = aead(&key)?
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| {
            Error::Config(format!(
                "snp-sealed: the key this VM derives does not open the store's master key: this \
                 VM's {} differ from those of the VM that sealed it, or it runs on another chip \
                 (see docs/operations.md: move the key out through another provider before an \
                 upgrade)",
                sealing
                    .fields
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    MasterKey::from_bytes(plain)
}

/// A simulated AMD hierarchy in a temporary directory, laid out as `init --dev`'s `sim/`.
#[cfg(test)]
#[cfg(feature = "simulator")]
pub(crate) fn test_sim_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let amd = attestation::sim::SimulatedAmd::generate(
        attestation::Product::Genoa,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let keys = amd.private_keys_pkcs8().unwrap();
    let certs = [amd.ark_der(), amd.ask_der(), amd.asvk_der()];
    for (i, name) in ["ark", "ask", "asvk"].iter().enumerate() {
        let pem =
            der::pem::encode_string("PRIVATE KEY", der::pem::LineEnding::LF, &keys[i]).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), pem).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.pem")),
            attestation::sim::to_pem(certs[i]),
        )
        .unwrap();
    }
    dir
}

#[cfg(test)]
#[cfg(feature = "simulator")]
mod tests {
    use super::*;
    use attestation::Product;
    use attestation::sim::ReportFields;

    fn sealing(fields: &[SealField]) -> Sealing {
        Sealing {
            fields: fields.to_vec(),
            vmpl: 0,
            guest_svn: 0,
            tcb_version: 0,
        }
    }

    #[test]
    fn a_sealed_key_opens_only_on_the_same_vm_and_chip() {
        let dir = test_sim_dir();
        let fields = ReportFields::new(Product::Genoa);
        let vm = Simulated::load(dir.path(), fields.clone()).unwrap();
        let s = sealing(&[SealField::Policy, SealField::Measurement]);
        let master = MasterKey::generate().unwrap();
        let sealed = seal(&vm, &s, &master).unwrap();
        let opened = unseal(&vm, &s, &sealed).unwrap();
        assert_eq!(opened.expose(), master.expose());

        // Another measurement (an upgraded image): refused, naming the fields.
        let mut upgraded = fields.clone();
        upgraded.measurement[0] ^= 1;
        let other = Simulated::load(dir.path(), upgraded.clone()).unwrap();
        let e = unseal(&other, &s, &sealed).err().unwrap().to_string();
        assert!(e.contains("policy, measurement"), "{e}");
        // Unless the measurement is not mixed in.
        let by_policy = sealing(&[SealField::Policy]);
        let sealed_by_policy = seal(&vm, &by_policy, &master).unwrap();
        assert!(unseal(&other, &by_policy, &sealed_by_policy).is_ok());
        // Another chip: refused.
        let mut chip = fields.clone();
        chip.chip_id[0] ^= 1;
        let moved = Simulated::load(dir.path(), chip).unwrap();
        assert!(unseal(&moved, &s, &sealed).is_err());
        // Another selection than the one sealed with: refused before deriving, saying both.
        let e = unseal(&vm, &by_policy, &sealed).err().unwrap().to_string();
        assert!(e.contains("sealed to fields [policy, measurement]"), "{e}");
        // A tampered header: refused.
        let mut tampered = sealed.clone();
        tampered[4] ^= 8;
        assert!(unseal(&vm, &s, &tampered).is_err());
        assert!(unseal(&vm, &s, &sealed[..20]).is_err());
    }

    #[test]
    fn the_firmware_refusals_are_simulated() {
        let dir = test_sim_dir();
        let mut fields = ReportFields::new(Product::Genoa);
        fields.vmpl = 2;
        fields.guest_svn = 3;
        let vm = Simulated::load(dir.path(), fields).unwrap();
        let mut s = sealing(&[SealField::GuestSvn]);
        assert!(vm.derived_key(&s).is_err(), "VMPL 0 below the VM's 2");
        s.vmpl = 2;
        s.guest_svn = 3;
        assert!(vm.derived_key(&s).is_ok());
        s.guest_svn = 4;
        assert!(vm.derived_key(&s).is_err());
    }
}
