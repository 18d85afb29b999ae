//! `broker verify`: verify one piece of evidence offline and print its claims.

use std::path::PathBuf;
use std::time::SystemTime;

use attestation::{
    AttestationReport, Claims, Endorsements, TrustAnchors, VerifiedReport, Verifier,
};

use crate::Error;
use crate::evidence::{self, ReportInput};

/// What `broker verify` was asked to do.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// Raw report or Azure HCL report.
    pub report: PathBuf,
    /// VCEK or VLEK (DER or PEM).
    pub vek: Option<PathBuf>,
    /// AMD `cert_chain` PEM (ASK or ASVK, then ARK).
    pub chain: Option<PathBuf>,
    /// CRLs signed by the ARK (DER or PEM).
    pub crls: Vec<PathBuf>,
    /// The vTPM quote that goes with an HCL report (JSON, the wire form).
    pub quote: Option<PathBuf>,
    /// A simulated ARK to trust besides AMD's (`--dangerous-trust-simulated-root`).
    pub dangerous_simulated_root: Option<PathBuf>,
    /// Verification time.
    pub at: SystemTime,
}

/// Verifies evidence against AMD's pinned roots and returns its claims.
pub fn run(request: &VerifyRequest) -> Result<Claims, Error> {
    Ok(verify(request)?.claims())
}

/// Verifies evidence against AMD's pinned roots (and a simulated one only when
/// `--dangerous-trust-simulated-root` names it).
pub fn verify(request: &VerifyRequest) -> Result<VerifiedReport, Error> {
    let report = evidence::read_report(&request.report)?;
    // The report's own structure first, so a malformed report is refused for that.
    match &report {
        ReportInput::Raw(bytes) => AttestationReport::parse(bytes)?,
        ReportInput::Hcl(hcl) => AttestationReport::parse(hcl.snp_report())?,
    };
    let Some(vek_path) = &request.vek else {
        return Err(Error::Input(
            "no VCEK/VLEK given: pass --vek FILE (the certificate from AMD's KDS, or from the \
             guest's certificate table)"
                .into(),
        ));
    };
    // A PEM bundle (VCEK, ASK, ARK, as Azure's THIM and some tools hand out) is accepted:
    // the first certificate is the VCEK/VLEK, the rest join the chain.
    let mut bundle = evidence::read_certificates(vek_path)?.into_iter();
    let mut endorsements = Endorsements {
        vek: bundle.next().unwrap_or_default(),
        chain: bundle.collect(),
        ..Default::default()
    };
    if let Some(chain) = &request.chain {
        endorsements
            .chain
            .extend(evidence::read_certificates(chain)?);
    }
    for crl in &request.crls {
        endorsements.crls.extend(evidence::read_certificates(crl)?);
    }
    let quote = match (&request.quote, &report) {
        (None, _) => None,
        (Some(_), ReportInput::Raw(_)) => {
            return Err(Error::Input(
                "--quote goes with an Azure HCL report, not a raw SNP report".into(),
            ));
        }
        (Some(path), ReportInput::Hcl(_)) => {
            let bytes = evidence::read_bounded(path)?;
            let wire: attestation::protocol::TpmQuote = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Input(format!("{}: not a quote: {e}", path.display())))?;
            Some(wire.decode()?)
        }
    };
    let mut anchors = TrustAnchors::amd()?;
    if let Some(path) = &request.dangerous_simulated_root {
        tracing::warn!(
            path = %path.display(),
            "DANGEROUS: trusting a SIMULATED root; claims from it prove nothing about real hardware"
        );
        anchors =
            evidence::trust_simulated_root(anchors, path, "--dangerous-trust-simulated-root")?;
    }
    let verifier = Verifier::new(anchors);
    let chain = verifier.verify_chain(&endorsements, request.at)?;
    Ok(match (&report, quote) {
        (ReportInput::Raw(bytes), _) => verifier.verify_report(bytes, &chain, request.at)?,
        (ReportInput::Hcl(hcl), None) => verifier.verify_hcl(hcl, &chain, request.at)?,
        (ReportInput::Hcl(hcl), Some(q)) => {
            verifier.verify_az_snp_vtpm(hcl, &q, &chain, request.at)?
        }
    })
}

/// A short human summary of verified claims.
pub fn summary(claims: &Claims) -> String {
    let tcb = &claims.tcb.reported;
    let fmc = tcb.fmc.map(|f| format!("fmc={f} ")).unwrap_or_default();
    let mut out = format!(
        "verified: {} report v{} signed by the {} ({} root)\n",
        claims.product,
        claims.report_version,
        claims.signing_key.to_string().to_uppercase(),
        match claims.root {
            attestation::RootKind::Amd => "AMD",
            attestation::RootKind::Simulated => "SIMULATED",
        }
    );
    let p = &claims.policy;
    let on_off = |b: bool| if b { "allowed" } else { "off" };
    out.push_str(&format!("  measurement   {}\n", claims.measurement));
    out.push_str(&format!(
        "  policy        {:#x} (debug {}, migration agent {}, SMT {})\n",
        p.raw,
        on_off(p.debug_allowed),
        on_off(p.migrate_ma_allowed),
        on_off(p.smt_allowed)
    ));
    out.push_str(&format!("  vmpl          {}\n", claims.vmpl));
    out.push_str(&format!(
        "  reported tcb  {fmc}bl={} tee={} snp={} ucode={}\n",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    ));
    out.push_str(&format!("  chip id       {}\n", claims.chip_id));
    out.push_str(&format!("  host data     {}\n", claims.host_data));
    out.push_str(&format!("  report data   {}\n", claims.report_data));
    if let Some(csp) = &claims.csp_id {
        out.push_str(&format!("  csp           {csp}\n"));
    }
    if let Some(azure) = &claims.azure {
        let flag = |b: Option<bool>| match b {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        };
        out.push_str(&format!(
            "  azure         secure boot {}, vTPM {}, console {}, vm id {}\n",
            flag(azure.secure_boot),
            flag(azure.tpm_enabled),
            flag(azure.console_enabled),
            azure.vm_id.as_deref().unwrap_or("-")
        ));
    }
    if let Some(tpm) = &claims.tpm {
        out.push_str(&format!(
            "  vTPM quote    verified with attestation key {} (offline: freshness not checked)\n",
            tpm.ak_fingerprint
        ));
        for i in 0..attestation::tpm::PCR_COUNT {
            if let Some(v) = tpm.pcr.get(&i.to_string()) {
                out.push_str(&format!("  pcr {i:<2}        {v}\n"));
            }
        }
    }
    out
}
