//! The verifier: from bytes and endorsements to a [`VerifiedReport`], or a typed refusal.

use std::time::SystemTime;

use aws_lc_rs::signature;

use crate::chain::{Endorsements, RootKind, TrustAnchors, VerifiedChain};
use crate::claims::Claims;
use crate::error::{Error, TcbComponent};
use crate::hcl::HclReport;
use crate::report::{AttestationReport, Product, SigningKeyKind};
use crate::tpm::{Quote, VerifiedQuote};

/// Verifies SEV-SNP evidence against a set of trust anchors.
///
/// It reads no clock, network or file: the verification time is a parameter.
#[derive(Clone, Debug)]
pub struct Verifier {
    anchors: TrustAnchors,
}

/// A report whose every baseline check passed: AMD chain, extensions, signature over the
/// received bytes. Only the [`Verifier`] builds one; release decisions take nothing else.
#[derive(Clone, Debug)]
pub struct VerifiedReport {
    report: AttestationReport,
    product: Product,
    root: RootKind,
    vek_fingerprint: String,
    csp_id: Option<String>,
    azure: Option<crate::hcl::AzureVarData>,
    tpm: Option<VerifiedQuote>,
}

impl Verifier {
    /// A verifier trusting `anchors`.
    pub fn new(anchors: TrustAnchors) -> Verifier {
        Verifier { anchors }
    }

    /// The anchors this verifier trusts.
    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// Verifies the endorsement chain alone, at time `at`. The result can be cached and
    /// passed to [`Verifier::verify_report`] for every report signed by the same key.
    pub fn verify_chain(
        &self,
        endorsements: &Endorsements,
        at: SystemTime,
    ) -> Result<VerifiedChain, Error> {
        self.anchors.verify_chain(endorsements, at)
    }

    /// Checks a CRL signed by the chain's ARK against an already verified (for example
    /// cached) chain; returns the chain with the CRL's freshness recorded.
    pub fn check_revocation(
        &self,
        chain: &VerifiedChain,
        crl_der: &[u8],
        at: SystemTime,
    ) -> Result<VerifiedChain, Error> {
        self.anchors.check_revocation(chain, crl_der, at)
    }

    /// Parses and verifies a raw report and its endorsements at time `at`.
    pub fn verify(
        &self,
        report: &[u8],
        endorsements: &Endorsements,
        at: SystemTime,
    ) -> Result<VerifiedReport, Error> {
        let report = AttestationReport::parse(report)?;
        let chain = self.verify_chain(endorsements, at)?;
        self.verify_parsed(report, &chain, at)
    }

    /// Verifies a raw report against a chain verified earlier, at time `at`.
    pub fn verify_report(
        &self,
        report: &[u8],
        chain: &VerifiedChain,
        at: SystemTime,
    ) -> Result<VerifiedReport, Error> {
        let report = AttestationReport::parse(report)?;
        self.verify_parsed(report, chain, at)
    }

    /// Verifies an Azure HCL report: the wrapped SNP report passes every check of
    /// [`Verifier::verify_report`], and REPORT_DATA binds the HCL variable data.
    pub fn verify_hcl(
        &self,
        hcl: &HclReport,
        chain: &VerifiedChain,
        at: SystemTime,
    ) -> Result<VerifiedReport, Error> {
        let report = AttestationReport::parse(hcl.snp_report())?;
        // The report first: a forged or wrong-chip HCL report is refused for that, not for
        // its variable data.
        let mut verified = self.verify_parsed(report, chain, at)?;
        hcl.check_var_data_digest(&verified.report.report_data())?;
        verified.azure = Some(hcl.var_data_claims()?);
        Ok(verified)
    }

    /// Verifies Azure vTPM evidence: the HCL report as in [`Verifier::verify_hcl`], then the
    /// TPM quote against the attestation key (`HCLAkPub`) that the verified variable data
    /// carries: its signature, its PCR selection (SHA-256, 0-23) and its PCR digest. The
    /// quote's qualifying data and the HCL user data are checked against a challenge by
    /// [`VerifiedReport::check_binding`].
    pub fn verify_az_snp_vtpm(
        &self,
        hcl: &HclReport,
        quote: &Quote,
        chain: &VerifiedChain,
        at: SystemTime,
    ) -> Result<VerifiedReport, Error> {
        let mut verified = self.verify_hcl(hcl, chain, at)?;
        let ak = verified
            .azure
            .as_ref()
            .and_then(|a| a.attestation_key.as_ref())
            .ok_or_else(|| Error::AttestationKey {
                detail: "no RSA key with kid HCLAkPub".into(),
            })?;
        verified.tpm = Some(crate::tpm::verify_quote(quote, ak)?);
        Ok(verified)
    }

    fn verify_parsed(
        &self,
        report: AttestationReport,
        chain: &VerifiedChain,
        at: SystemTime,
    ) -> Result<VerifiedReport, Error> {
        if !self.anchors.holds(chain) {
            return Err(Error::ForeignChain);
        }
        let at_secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .map_err(|_| Error::InvalidInput {
                detail: "verification time is before 1970".into(),
            })?;
        chain.check_time(at_secs)?;

        let product = chain.product;
        // Turin firmware reports version 3 or later; a version 2 report's reserved bytes were
        // checked with the Milan/Genoa TCB layout, which Turin does not use.
        if report.cpuid_product().is_none() && product == Product::Turin {
            return Err(Error::UnsupportedVersion {
                version: report.version(),
            });
        }
        if let Some(reported) = report.cpuid_product()
            && reported != product
        {
            return Err(Error::ProductMismatch {
                report: reported,
                certificate: product,
            });
        }
        if report.signing_key() != chain.kind {
            return Err(Error::SigningKeyMismatch {
                report: report.signing_key(),
                certificate: chain.kind,
            });
        }
        let ext = &chain.extensions;
        if chain.kind == SigningKeyKind::Vcek {
            if report.chip_id_masked() {
                return Err(Error::MaskedChipId);
            }
            let hwid = ext.hwid.as_deref().ok_or(Error::MissingExtension {
                role: crate::error::CertRole::Vcek,
                oid: crate::certs::oid::HWID,
            })?;
            let chip_id = report.chip_id();
            let expected = chip_id.get(..product.hwid_len()).unwrap_or(&[]);
            if hwid != expected {
                return Err(Error::HwIdMismatch);
            }
        }
        check_tcb(&report, chain)?;

        signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, &chain.leaf_key)
            .verify(report.signed_bytes(), &report.signature_fixed())
            .map_err(|_| Error::ReportSignature { key: chain.kind })?;

        Ok(VerifiedReport {
            report,
            product,
            root: chain.root_kind,
            vek_fingerprint: chain.leaf_fingerprint.clone(),
            csp_id: ext.csp_id.clone(),
            azure: None,
            tpm: None,
        })
    }
}

fn check_tcb(report: &AttestationReport, chain: &VerifiedChain) -> Result<(), Error> {
    let role = match chain.kind {
        SigningKeyKind::Vcek => crate::error::CertRole::Vcek,
        SigningKeyKind::Vlek => crate::error::CertRole::Vlek,
    };
    let tcb = report.reported_tcb(chain.product);
    let ext = &chain.extensions;
    let mut checks = vec![
        (
            TcbComponent::Bootloader,
            tcb.bootloader,
            ext.bl_spl,
            crate::certs::oid::BL_SPL,
        ),
        (
            TcbComponent::Tee,
            tcb.tee,
            ext.tee_spl,
            crate::certs::oid::TEE_SPL,
        ),
        (
            TcbComponent::Snp,
            tcb.snp,
            ext.snp_spl,
            crate::certs::oid::SNP_SPL,
        ),
        (
            TcbComponent::Microcode,
            tcb.microcode,
            ext.ucode_spl,
            crate::certs::oid::UCODE_SPL,
        ),
    ];
    if let Some(fmc) = tcb.fmc {
        checks.insert(
            0,
            (
                TcbComponent::Fmc,
                fmc,
                ext.fmc_spl,
                crate::certs::oid::FMC_SPL,
            ),
        );
    }
    for (component, reported, certified, oid) in checks {
        let certified = certified.ok_or(Error::MissingExtension { role, oid })?;
        if u64::from(reported) != certified {
            return Err(Error::TcbMismatch {
                component,
                reported,
                certified,
            });
        }
    }
    Ok(())
}

impl VerifiedReport {
    /// The verified report (the received bytes and their decoded fields).
    pub fn report(&self) -> &AttestationReport {
        &self.report
    }
    /// The product, agreed between the report and the endorsement chain.
    pub fn product(&self) -> Product {
        self.product
    }
    /// Whether the chain ends in an AMD root or a simulated one.
    pub fn root(&self) -> RootKind {
        self.root
    }
    /// SHA-256 of the VCEK/VLEK certificate that signed the report.
    pub fn vek_fingerprint(&self) -> &str {
        &self.vek_fingerprint
    }
    /// The cloud provider named in a VLEK.
    pub fn csp_id(&self) -> Option<&str> {
        self.csp_id.as_deref()
    }
    /// The Azure HCL variable data, for reports that came wrapped in one.
    pub fn azure(&self) -> Option<&crate::hcl::AzureVarData> {
        self.azure.as_ref()
    }
    /// The typed claims a policy decides on.
    pub fn claims(&self) -> Claims {
        Claims::from_verified(self)
    }
    /// The verified TPM quote, for Azure vTPM evidence.
    pub fn tpm(&self) -> Option<&VerifiedQuote> {
        self.tpm.as_ref()
    }
    /// Checks that the evidence is, byte for byte, bound to `nonce` and `public_key` (see
    /// [`crate::binding`]). Constant time in the compared bytes.
    ///
    /// For a bare SNP report the binding is REPORT_DATA. For Azure vTPM evidence it is both
    /// the quote's qualifying data and the HCL report's `user-data` (which the paravisor
    /// hashes into REPORT_DATA), so the quote and the SNP report are both fresh. An HCL
    /// report without a quote cannot be bound.
    pub fn check_binding(&self, nonce: &[u8], public_key: &[u8]) -> Result<(), Error> {
        let expected = crate::binding::report_data(nonce, public_key);
        self.check_report_data(&expected, &expected)
    }

    /// [`Self::check_binding`] for a request with certificate requests: the version-2
    /// binding of `nonce`, `public_key` and the requests' public keys `spkis`, in order.
    pub fn check_binding_v2(
        &self,
        nonce: &[u8],
        public_key: &[u8],
        spkis: &[&[u8]],
    ) -> Result<(), Error> {
        let expected = crate::binding::report_data_v2(nonce, public_key, spkis);
        self.check_report_data(&expected, &expected)
    }

    /// Checks, in constant time, that the evidence carries exactly these binding values:
    /// `report_data` in a bare report's REPORT_DATA, or `qualifying` as both the TPM quote's
    /// qualifying data and the HCL report's `user-data` for Azure vTPM evidence (whose
    /// REPORT_DATA binds the HCL variable data instead). Front ends with their own binding
    /// (the KBS protocol's) compute the values; [`Self::check_binding`] is the native one.
    pub fn check_report_data(
        &self,
        report_data: &[u8; 64],
        qualifying: &[u8],
    ) -> Result<(), Error> {
        let Some(azure) = &self.azure else {
            return aws_lc_rs::constant_time::verify_slices_are_equal(
                &self.report.report_data(),
                report_data,
            )
            .map_err(|_| Error::BindingMismatch);
        };
        let quote = self.tpm.as_ref().ok_or(Error::QuoteMissing)?;
        aws_lc_rs::constant_time::verify_slices_are_equal(&quote.info.extra_data, qualifying)
            .map_err(|_| Error::QuoteBindingMismatch)?;
        let user_data = azure
            .user_data
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .ok_or(Error::UserDataMismatch)?;
        aws_lc_rs::constant_time::verify_slices_are_equal(&user_data, qualifying)
            .map_err(|_| Error::UserDataMismatch)
    }
}
