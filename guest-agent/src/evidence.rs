//! Evidence sources: where the SNP report comes from, behind one trait.

use std::path::{Path, PathBuf};
#[cfg(feature = "simulator")]
use std::time::Duration;
use std::time::SystemTime;

use attestation::cert_table::{self, CertKind};
use attestation::protocol::{CertificateEntry, encode_b64};
#[cfg(feature = "simulator")]
use attestation::sim::{ReportFields, SimulatedAmd, SimulatedKey};

use crate::AgentError;
use crate::azure::AzureVtpm;
use crate::config::{Platform, Settings};

/// A report and the certificates that came with it.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// The raw 1184-byte report, or the Azure HCL report when `quote` is set.
    pub report: Vec<u8>,
    /// The vTPM quote (Azure), which makes `report` an HCL report.
    pub quote: Option<attestation::tpm::Quote>,
    /// Certificates from the platform's certificate table, if it has one.
    pub certificates: Vec<CertificateEntry>,
}

impl Evidence {
    /// The wire form of this evidence.
    pub fn into_wire(self) -> attestation::protocol::Evidence {
        use attestation::protocol::{Evidence as Wire, TpmQuote};
        match self.quote {
            None => Wire::Snp {
                report: encode_b64(&self.report),
                certificates: self.certificates,
            },
            Some(quote) => Wire::AzSnpVtpm {
                hcl_report: encode_b64(&self.report),
                quote: TpmQuote::encode(&quote),
                certificates: self.certificates,
            },
        }
    }
}

/// A source of SNP evidence.
pub trait EvidenceSource: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// A fresh report carrying `report_data`.
    fn report(&self, report_data: [u8; 64]) -> Result<Evidence, AgentError>;
}

fn entries_from_table(table: &[u8]) -> Result<Vec<CertificateEntry>, AgentError> {
    if table.is_empty() {
        return Ok(Vec::new());
    }
    let entries = cert_table::parse(table)
        .map_err(|e| AgentError::Evidence(format!("certificate table: {e}")))?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let kind = match e.kind {
                CertKind::Vcek => "vcek",
                CertKind::Vlek => "vlek",
                CertKind::Ask => "ask",
                CertKind::Ark => "ark",
                CertKind::Other(_) => return None,
            };
            Some(CertificateEntry {
                kind: kind.into(),
                der: encode_b64(&e.der),
            })
        })
        .collect())
}

/// Linux configfs-tsm (`/sys/kernel/config/tsm/report`, Linux 6.7 and later).
#[derive(Debug)]
pub struct ConfigfsTsm {
    root: PathBuf,
}

/// Where the kernel exposes configfs-tsm reports.
pub const CONFIGFS_TSM: &str = "/sys/kernel/config/tsm/report";

impl ConfigfsTsm {
    /// A source rooted at `root` (normally [`CONFIGFS_TSM`]).
    pub fn new(root: impl Into<PathBuf>) -> ConfigfsTsm {
        ConfigfsTsm { root: root.into() }
    }

    /// Whether configfs-tsm is available at `root`.
    pub fn available(root: &Path) -> bool {
        root.is_dir()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|e| AgentError::Evidence(format!("{}: {e}", path.display())))
}

impl EvidenceSource for ConfigfsTsm {
    fn name(&self) -> &'static str {
        "configfs-tsm"
    }

    fn report(&self, report_data: [u8; 64]) -> Result<Evidence, AgentError> {
        let entry = self.root.join(format!(
            "guest-agent-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&entry)
            .map_err(|e| AgentError::Evidence(format!("{}: {e}", entry.display())))?;
        let result = (|| {
            if let Ok(provider) = std::fs::read_to_string(entry.join("provider"))
                && provider.trim() != "sev_guest"
            {
                return Err(AgentError::Evidence(format!(
                    "configfs-tsm provider is {:?}, not sev_guest",
                    provider.trim()
                )));
            }
            let generation = std::fs::read_to_string(entry.join("generation")).ok();
            std::fs::write(entry.join("inblob"), report_data)
                .map_err(|e| AgentError::Evidence(format!("inblob: {e}")))?;
            let report = read(&entry.join("outblob"))?;
            let aux = std::fs::read(entry.join("auxblob")).unwrap_or_default();
            // Another writer between our write and read would change the generation.
            let after = std::fs::read_to_string(entry.join("generation")).ok();
            if let (Some(g0), Some(g1)) = (&generation, &after)
                && g0.trim().parse::<u64>().ok().map(|g| g + 1) != g1.trim().parse::<u64>().ok()
            {
                return Err(AgentError::Evidence(
                    "configfs-tsm entry was written concurrently; retrying".into(),
                ));
            }
            Ok(Evidence {
                report,
                quote: None,
                certificates: entries_from_table(&aux)?,
            })
        })();
        let _ = std::fs::remove_dir(&entry);
        result
    }
}

/// `/dev/sev-guest` through the sev crate. Only the plain report is requested: the sev
/// crate's extended-report call parses the certificate table with code that is unsound on
/// untrusted input, so the broker fetches the VCEK from AMD's KDS instead.
#[derive(Debug)]
pub struct SevGuest;

/// The SEV guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

impl EvidenceSource for SevGuest {
    fn name(&self) -> &'static str {
        "sev-guest"
    }

    fn report(&self, report_data: [u8; 64]) -> Result<Evidence, AgentError> {
        let mut fw = sev::firmware::guest::Firmware::open()
            .map_err(|e| AgentError::Evidence(format!("{SEV_GUEST_DEVICE}: {e}")))?;
        let report = fw
            .get_report(None, Some(report_data), None)
            .map_err(|e| AgentError::Evidence(format!("SNP_GET_REPORT: {e}")))?;
        Ok(Evidence {
            report,
            quote: None,
            certificates: Vec::new(),
        })
    }
}

/// Loads the simulated AMD hierarchy (ARK, ASK, ASVK keys and certificates) that
/// `broker init --dev` writes to its `sim/` directory.
#[cfg(feature = "simulator")]
pub fn load_simulated_amd(
    dir: &Path,
    product: attestation::Product,
) -> Result<SimulatedAmd, AgentError> {
    let der = |name: &str| -> Result<Vec<u8>, AgentError> {
        let bytes = read(&dir.join(name))?;
        attestation::certs::decode_pem_or_der(&bytes, name)
            .map_err(|e| AgentError::Config(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| AgentError::Config(format!("{name}: empty")))
    };
    let keys = [der("ark.key")?, der("ask.key")?, der("asvk.key")?];
    let certs = [der("ark.pem")?, der("ask.pem")?, der("asvk.pem")?];
    SimulatedAmd::load(
        product,
        [&keys[0], &keys[1], &keys[2]],
        [&certs[0], &certs[1], &certs[2]],
    )
    .map_err(|e| AgentError::Config(format!("simulated platform: {e}")))
}

/// The simulated platform: reports signed by a simulated VCEK (tests and demos only).
#[cfg(feature = "simulator")]
pub struct Simulated {
    fields: ReportFields,
    vcek: SimulatedKey,
    ask: Vec<u8>,
}

#[cfg(feature = "simulator")]
impl std::fmt::Debug for Simulated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulated").finish_non_exhaustive()
    }
}

#[cfg(feature = "simulator")]
impl Simulated {
    /// Loads the simulated AMD hierarchy written by `broker init --dev` (its `sim/`
    /// directory) and issues a VCEK for the configured chip and TCB.
    pub fn load(dir: &Path, fields: ReportFields) -> Result<Simulated, AgentError> {
        let amd = load_simulated_amd(dir, fields.product)?;
        let vcek = amd
            .issue_vcek(
                &fields.chip_id,
                fields.tcb,
                SystemTime::now() - Duration::from_secs(3600),
            )
            .map_err(|e| AgentError::Config(format!("simulated platform: {e}")))?;
        Ok(Simulated {
            ask: amd.ask_der().to_vec(),
            fields,
            vcek,
        })
    }
}

#[cfg(feature = "simulator")]
impl EvidenceSource for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn report(&self, report_data: [u8; 64]) -> Result<Evidence, AgentError> {
        let mut f = self.fields.clone();
        f.report_data = report_data;
        let report = self
            .vcek
            .sign_report(&f)
            .map_err(|e| AgentError::Evidence(e.to_string()))?;
        // Shaped like a real certificate table, parsed by the same code.
        let table = cert_table::build(&[
            cert_table::CertEntry {
                kind: CertKind::Vcek,
                der: self.vcek.cert_der().to_vec(),
            },
            cert_table::CertEntry {
                kind: CertKind::Ask,
                der: self.ask.clone(),
            },
        ]);
        Ok(Evidence {
            report,
            quote: None,
            certificates: entries_from_table(&table)?,
        })
    }
}

/// Chooses the evidence source the settings name; `auto` probes for an Azure vTPM holding
/// an HCL report (an Azure CVM can also show a configfs-tsm directory without an SNP
/// provider), then configfs-tsm, then `/dev/sev-guest`, and says what it found.
pub fn select(settings: &Settings) -> Result<Box<dyn EvidenceSource>, AgentError> {
    match settings.platform {
        Platform::ConfigfsTsm => Ok(Box::new(ConfigfsTsm::new(CONFIGFS_TSM))),
        Platform::SevGuest => Ok(Box::new(SevGuest)),
        Platform::AzureVtpm => Ok(Box::new(AzureVtpm::new(
            &settings.azure.tcti,
            settings.azure.report_timeout,
        ))),
        #[cfg(not(feature = "simulator"))]
        Platform::Simulated => Err(AgentError::Config(
            "platform = \"simulated\": this guest agent was built without the `simulator` feature"
                .into(),
        )),
        #[cfg(feature = "simulator")]
        Platform::Simulated => {
            let sim = settings
                .simulated
                .as_ref()
                .ok_or_else(|| AgentError::Config("[simulated] section missing".into()))?;
            tracing::warn!("using the SIMULATED platform: for tests and demos only");
            Ok(Box::new(Simulated::load(&sim.dir, sim.fields.clone())?))
        }
        Platform::Auto => {
            if AzureVtpm::available(&settings.azure.tcti) {
                tracing::info!(
                    tcti = settings.azure.tcti,
                    "platform auto: a vTPM with an HCL report (Azure CVM) found, using it"
                );
                Ok(Box::new(AzureVtpm::new(
                    &settings.azure.tcti,
                    settings.azure.report_timeout,
                )))
            } else if ConfigfsTsm::available(Path::new(CONFIGFS_TSM)) {
                tracing::info!(
                    path = CONFIGFS_TSM,
                    "platform auto: configfs-tsm found, using it"
                );
                Ok(Box::new(ConfigfsTsm::new(CONFIGFS_TSM)))
            } else if Path::new(SEV_GUEST_DEVICE).exists() {
                tracing::info!(
                    path = SEV_GUEST_DEVICE,
                    "platform auto: no configfs-tsm; {SEV_GUEST_DEVICE} found, using it"
                );
                Ok(Box::new(SevGuest))
            } else {
                Err(AgentError::Config(format!(
                    "platform auto: no Azure vTPM HCL report on {}, and neither {CONFIGFS_TSM} \
                     nor {SEV_GUEST_DEVICE} exists; is this an SEV-SNP guest?",
                    settings.azure.tcti
                )))
            }
        }
    }
}
