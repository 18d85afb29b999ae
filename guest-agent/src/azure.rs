//! Azure confidential VMs: evidence from the vTPM that Azure's paravisor (HCL) provides.
//!
//! On an Azure CVM the guest has no `/dev/sev-guest`. The paravisor keeps an HCL report
//! (the SNP report plus JSON "variable data" whose SHA-256 is REPORT_DATA[0..32]) in vTPM NV
//! index 0x01400001, and regenerates it when the guest writes user data to NV index
//! 0x01400002. The variable data carries the public part of the vTPM attestation key
//! (persistent handle 0x81000003), which signs TPM quotes.
//!
//! The agent writes the 64-byte binding as user data, waits until the HCL report carries it,
//! and takes a quote over the SHA-256 PCRs 0-23 with the same binding as qualifying data.
//! The broker checks both, so neither the SNP report nor the quote can be replayed.
//!
//! This talks to the TPM through `tss-esapi` with a configurable TCTI (default
//! `device:/dev/tpmrm0`, the kernel's resource manager), so the same code runs against an
//! emulated vTPM (`swtpm:...`) in tests.

use std::str::FromStr;
use std::time::{Duration, Instant};

use attestation::HclReport;
use attestation::protocol::CertificateEntry;
use attestation::tpm::{PCR_COUNT, Quote, QuoteInfo};
use tss_esapi::Context;
use tss_esapi::abstraction::nv;
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Attest, AttestInfo, Data, MaxNvBuffer, NvPublicBuilder, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Signature, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use crate::AgentError;
use crate::evidence::{Evidence, EvidenceSource};

/// NV index holding the HCL report.
pub const HCL_REPORT_INDEX: u32 = 0x0140_0001;
/// NV index the guest writes user data to; the paravisor then regenerates the HCL report.
pub const USER_DATA_INDEX: u32 = 0x0140_0002;
/// Persistent handle of the vTPM attestation key.
pub const AK_HANDLE: u32 = 0x8100_0003;
/// The TCTI used when none is configured: the kernel's TPM resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Azure's IMDS endpoint for the VCEK of the host (THIM).
pub const DEFAULT_THIM_URL: &str = "http://169.254.169.254/metadata/THIM/amd/certification";

const PCR_SLOTS: [PcrSlot; PCR_COUNT] = [
    PcrSlot::Slot0,
    PcrSlot::Slot1,
    PcrSlot::Slot2,
    PcrSlot::Slot3,
    PcrSlot::Slot4,
    PcrSlot::Slot5,
    PcrSlot::Slot6,
    PcrSlot::Slot7,
    PcrSlot::Slot8,
    PcrSlot::Slot9,
    PcrSlot::Slot10,
    PcrSlot::Slot11,
    PcrSlot::Slot12,
    PcrSlot::Slot13,
    PcrSlot::Slot14,
    PcrSlot::Slot15,
    PcrSlot::Slot16,
    PcrSlot::Slot17,
    PcrSlot::Slot18,
    PcrSlot::Slot19,
    PcrSlot::Slot20,
    PcrSlot::Slot21,
    PcrSlot::Slot22,
    PcrSlot::Slot23,
];

fn tpm_err(what: &str) -> impl Fn(tss_esapi::Error) -> AgentError + '_ {
    move |e| AgentError::Evidence(format!("vTPM {what}: {e}"))
}

/// Opens a TPM context on `tcti` with an empty-password session (what Azure's vTPM uses
/// for the owner hierarchy and its NV indices).
pub fn open(tcti: &str) -> Result<Context, AgentError> {
    let conf = TctiNameConf::from_str(tcti)
        .map_err(|e| AgentError::Config(format!("azure.tcti {tcti:?}: {e}")))?;
    let mut ctx = Context::new(conf).map_err(tpm_err("open"))?;
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    Ok(ctx)
}

fn nv_handle(index: u32) -> Result<NvIndexTpmHandle, AgentError> {
    NvIndexTpmHandle::new(index).map_err(tpm_err("NV handle"))
}

/// The size of NV index `index`, or `None` if it is not defined.
pub fn nv_size(ctx: &mut Context, index: u32) -> Result<Option<usize>, AgentError> {
    let handle = nv_handle(index)?;
    let list = nv::list(ctx).map_err(tpm_err("NV list"))?;
    Ok(list
        .iter()
        .find(|(public, _)| public.nv_index() == handle)
        .map(|(public, _)| public.data_size()))
}

fn resolve(ctx: &mut Context, index: u32) -> Result<NvIndexHandle, AgentError> {
    let handle = nv_handle(index)?;
    ctx.execute_without_session(|c| c.tr_from_tpm_public(handle.into()))
        .map(NvIndexHandle::from)
        .map_err(tpm_err("NV resolve"))
}

/// Writes `data` to NV index `index` (owner auth), first defining it with exactly that size
/// (owner read and write) if it is absent or of another size.
pub fn nv_write_all(ctx: &mut Context, index: u32, data: &[u8]) -> Result<(), AgentError> {
    match nv_size(ctx, index)? {
        Some(size) if size == data.len() => {}
        existing => {
            if existing.is_some() {
                let handle = resolve(ctx, index)?;
                ctx.nv_undefine_space(Provision::Owner, handle)
                    .map_err(tpm_err("NV undefine"))?;
            }
            let attributes = NvIndexAttributesBuilder::new()
                .with_owner_write(true)
                .with_owner_read(true)
                .build()
                .map_err(tpm_err("NV attributes"))?;
            let public = NvPublicBuilder::new()
                .with_nv_index(nv_handle(index)?)
                .with_index_name_algorithm(HashingAlgorithm::Sha256)
                .with_index_attributes(attributes)
                .with_data_area_size(data.len())
                .build()
                .map_err(tpm_err("NV public"))?;
            ctx.nv_define_space(Provision::Owner, None, public)
                .map_err(tpm_err("NV define"))?;
        }
    }
    let handle = resolve(ctx, index)?;
    // A TPM takes at most TPM2_PT_NV_BUFFER_MAX bytes per write; 1024 is the common value
    // and Azure's and swtpm's.
    for (i, chunk) in data.chunks(1024).enumerate() {
        let buffer = MaxNvBuffer::try_from(chunk).map_err(tpm_err("NV buffer"))?;
        let offset = u16::try_from(i * 1024)
            .map_err(|_| AgentError::Evidence("NV data larger than 64 KiB".into()))?;
        ctx.nv_write(NvAuth::Owner, handle, buffer, offset)
            .map_err(tpm_err("NV write"))?;
    }
    Ok(())
}

/// Reads NV index `index` whole (owner auth).
pub fn nv_read_all(ctx: &mut Context, index: u32) -> Result<Vec<u8>, AgentError> {
    nv::read_full(ctx, NvAuth::Owner, nv_handle(index)?).map_err(tpm_err("NV read"))
}

fn selection() -> Result<PcrSelectionList, AgentError> {
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &PCR_SLOTS)
        .build()
        .map_err(tpm_err("PCR selection"))
}

/// Reads the SHA-256 PCRs 0-23.
pub fn read_pcrs(ctx: &mut Context) -> Result<[[u8; 32]; PCR_COUNT], AgentError> {
    let list = selection()?;
    let data = ctx
        .execute_without_session(|c| tss_esapi::abstraction::pcr::read_all(c, list))
        .map_err(tpm_err("PCR read"))?;
    let bank = data
        .pcr_bank(HashingAlgorithm::Sha256)
        .ok_or_else(|| AgentError::Evidence("vTPM has no SHA-256 PCR bank".into()))?;
    let mut out = [[0u8; 32]; PCR_COUNT];
    let mut seen = 0;
    for (slot, digest) in bank.into_iter() {
        let i = PCR_SLOTS
            .iter()
            .position(|s| s == slot)
            .ok_or_else(|| AgentError::Evidence(format!("unexpected PCR {slot:?}")))?;
        out[i] = digest
            .value()
            .try_into()
            .map_err(|_| AgentError::Evidence(format!("PCR {i} is not 32 bytes")))?;
        seen += 1;
    }
    if seen != PCR_COUNT {
        return Err(AgentError::Evidence(format!(
            "vTPM returned {seen} SHA-256 PCRs, expected {PCR_COUNT}"
        )));
    }
    Ok(out)
}

/// A quote by the attestation key over the SHA-256 PCRs 0-23 with `qualifying_data`, and
/// the PCR values it covers. A PCR extended between the quote and the read is detected
/// (the digest would not match) and the quote taken again.
pub fn quote(ctx: &mut Context, qualifying_data: &[u8]) -> Result<Quote, AgentError> {
    let ak = TpmHandle::try_from(AK_HANDLE).map_err(tpm_err("AK handle"))?;
    let ak = ctx
        .execute_without_session(|c| c.tr_from_tpm_public(ak))
        .map_err(tpm_err("attestation key at 0x81000003"))?;
    for _ in 0..3 {
        let data = Data::try_from(qualifying_data).map_err(tpm_err("qualifying data"))?;
        let (attest, signature): (Attest, Signature) = ctx
            .quote(ak.into(), data, SignatureScheme::Null, selection()?)
            .map_err(tpm_err("quote"))?;
        if !matches!(attest.attested(), AttestInfo::Quote { .. }) {
            return Err(AgentError::Evidence("vTPM returned no quote".into()));
        }
        let Signature::RsaSsa(sig) = signature else {
            return Err(AgentError::Evidence(
                "the attestation key did not sign with RSASSA".into(),
            ));
        };
        let message = attest.marshall().map_err(tpm_err("marshal quote"))?;
        let pcrs = read_pcrs(ctx)?;
        let quote = Quote {
            message,
            signature: sig.signature().to_vec(),
            pcrs,
        };
        let info = QuoteInfo::parse(&quote.message)
            .map_err(|e| AgentError::Evidence(format!("vTPM quote: {e}")))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pcrs.concat());
        if info.pcr_digest == digest.as_ref() {
            return Ok(quote);
        }
        tracing::info!("a PCR changed while quoting; quoting again");
    }
    Err(AgentError::Evidence(
        "PCRs kept changing while quoting".into(),
    ))
}

/// The vTPM of an Azure confidential VM.
#[derive(Debug)]
pub struct AzureVtpm {
    tcti: String,
    report_timeout: Duration,
}

impl AzureVtpm {
    /// A source on `tcti`, waiting up to `report_timeout` for the paravisor to regenerate the
    /// HCL report.
    pub fn new(tcti: impl Into<String>, report_timeout: Duration) -> AzureVtpm {
        AzureVtpm {
            tcti: tcti.into(),
            report_timeout,
        }
    }

    /// Whether `tcti` reaches a vTPM holding an HCL report (an Azure CVM).
    pub fn available(tcti: &str) -> bool {
        if let Some(path) = tcti.strip_prefix("device:")
            && !std::path::Path::new(path).exists()
        {
            return false;
        }
        open(tcti)
            .and_then(|mut ctx| nv_size(&mut ctx, HCL_REPORT_INDEX))
            .map(|size| size.is_some())
            .unwrap_or(false)
    }
}

impl EvidenceSource for AzureVtpm {
    fn name(&self) -> &'static str {
        "azure-vtpm"
    }

    fn report(&self, report_data: [u8; 64]) -> Result<Evidence, AgentError> {
        let mut ctx = open(&self.tcti)?;
        nv_write_all(&mut ctx, USER_DATA_INDEX, &report_data)?;
        // The paravisor regenerates the HCL report asynchronously: poll until it carries our
        // user data rather than sleeping a fixed time.
        let want = hex::encode_upper(report_data);
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut previous: Option<Vec<u8>> = None;
        let hcl = loop {
            let bytes = nv_read_all(&mut ctx, HCL_REPORT_INDEX)?;
            // The index is read in ~1 KiB chunks, so a read that overlaps the paravisor's
            // rewrite can join an old SNP report to new variable data. A report whose
            // REPORT_DATA does not hash its variable data is read again; only if two reads in
            // a row return the same such bytes is it not torn, and it goes to the broker,
            // which refuses and audits it.
            let state = match read_user_data(&bytes) {
                Ok((Some(u), consistent)) if u.eq_ignore_ascii_case(&want) => {
                    if consistent || previous.as_deref() == Some(bytes.as_slice()) {
                        break bytes;
                    }
                    "its SNP report and variable data disagree".to_string()
                }
                Ok((Some(_), _)) => "it still carries other user data".to_string(),
                Ok((None, _)) => "its variable data has no user-data".to_string(),
                Err(e) => e,
            };
            if started.elapsed() >= self.report_timeout {
                return Err(AgentError::Evidence(format!(
                    "the paravisor did not regenerate the HCL report with our user data \
                     within {:?} ({state})",
                    self.report_timeout
                )));
            }
            previous = Some(bytes);
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        };
        let quote = quote(&mut ctx, &report_data)?;
        Ok(Evidence {
            report: hcl,
            quote: Some(quote),
            certificates: Vec::new(),
        })
    }
}

/// The `user-data` of an HCL report, and whether the report is internally consistent (its
/// REPORT_DATA is the hash of its variable data).
fn read_user_data(bytes: &[u8]) -> Result<(Option<String>, bool), String> {
    let hcl = HclReport::parse(bytes).map_err(|e| e.to_string())?;
    let report =
        attestation::AttestationReport::parse(hcl.snp_report()).map_err(|e| e.to_string())?;
    let consistent = hcl.check_var_data_digest(&report.report_data()).is_ok();
    Ok((
        hcl.var_data_claims().ok().and_then(|c| c.user_data),
        consistent,
    ))
}

/// The JSON THIM answers with.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThimResponse {
    vcek_cert: String,
    certificate_chain: String,
    tcbm: Option<String>,
}

/// Largest THIM answer read (a VCEK and two RSA-4096 certificates in PEM are ~6 KiB).
const MAX_THIM: usize = 64 * 1024;

/// Fetches the VCEK and its chain from Azure's THIM endpoint. Returns nothing (and logs why)
/// when it is unreachable, answers badly, or certifies another TCB than the report's: the
/// broker then fetches the VCEK from AMD's KDS itself.
pub async fn thim_certificates(url: &str, hcl_report: &[u8]) -> Vec<CertificateEntry> {
    match fetch_thim(url, hcl_report).await {
        Ok(entries) => entries,
        Err(why) => {
            tracing::warn!(url, "THIM: {why}; the broker will use AMD's KDS");
            Vec::new()
        }
    }
}

async fn fetch_thim(url: &str, hcl_report: &[u8]) -> Result<Vec<CertificateEntry>, String> {
    // IMDS is plain HTTP on a link-local address; an https mirror is checked against the
    // Mozilla roots.
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut resp = client
        .get(url)
        .header("Metadata", "true")
        .send()
        .await
        .map_err(|e| format!("unreachable ({e})"))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_THIM {
            return Err("answer larger than 64 KiB".into());
        }
    }
    let thim: ThimResponse =
        serde_json::from_slice(&body).map_err(|e| format!("malformed answer: {e}"))?;
    let hcl = HclReport::parse(hcl_report).map_err(|e| e.to_string())?;
    let report =
        attestation::AttestationReport::parse(hcl.snp_report()).map_err(|e| e.to_string())?;
    // A VCEK for another TCB than the report's would be refused by the broker without a
    // fallback to the KDS: send only one that THIM says is for this TCB.
    let tcbm = thim
        .tcbm
        .as_deref()
        .ok_or("no tcbm: cannot tell which TCB its VCEK is for")?;
    // Milan and Genoa share a TCB layout; Turin reports name their product.
    let product = report
        .cpuid_product()
        .unwrap_or(attestation::Product::Milan);
    let reported = u64::from_le_bytes(report.reported_tcb(product).encode(product));
    if u64::from_str_radix(tcbm, 16).ok() != Some(reported) {
        return Err(format!(
            "its VCEK is for TCB {tcbm}, the report's is {reported:016X}"
        ));
    }
    let der = |pem: &str, what: &str| {
        attestation::certs::decode_pem_or_der(pem.as_bytes(), what).map_err(|e| e.to_string())
    };
    let vcek = der(&thim.vcek_cert, "vcekCert")?;
    let chain = der(&thim.certificate_chain, "certificateChain")?;
    let [vcek] = vcek.as_slice() else {
        return Err("vcekCert holds more than one certificate".into());
    };
    let mut entries = vec![CertificateEntry {
        kind: "vcek".into(),
        der: attestation::protocol::encode_b64(vcek),
    }];
    // THIM's chain is the ASK then the ARK; the broker pins the ARK itself and identifies
    // each certificate by its issuer, so both are sent as chain members.
    for (i, c) in chain.iter().enumerate().take(2) {
        entries.push(CertificateEntry {
            kind: if i == 0 { "ask" } else { "ark" }.into(),
            der: attestation::protocol::encode_b64(c),
        });
    }
    Ok(entries)
}
