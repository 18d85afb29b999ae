//! AMD's endorsement hierarchy: pinned roots, chain verification and revocation.
//!
//! The hierarchy has a fixed shape, ARK → ASK → VCEK or ARK → ASVK → VLEK, so there is no
//! path building: the root is found among the pinned ones by name and must be byte-identical
//! to it; every signature is RSASSA-PSS/SHA-384 with AMD's parameters, checked by aws-lc.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, signature};
use der::Decode;
use x509_cert::Certificate;
use x509_cert::crl::CertificateList;
use x509_cert::name::Name;

use crate::certs::{
    self, AmdExtensions, OID_EC_PUBLIC_KEY, OID_RSA_ENCRYPTION, OID_RSASSA_PSS, OID_SECP384R1,
};
use crate::error::{CertRole, Error};
use crate::report::{Product, SigningKeyKind};

/// Where a trusted root comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKind {
    /// One of AMD's ARKs pinned in this crate.
    Amd,
    /// A simulated root an operator chose to trust by name (tests, demos).
    Simulated,
}

/// AMD's ARKs and the SHA-256 fingerprints of their DER encodings, as published by AMD's KDS
/// (`/vcek/v1/{product}/cert_chain`). The fingerprints are checked when the anchors load.
pub const AMD_ARK_FINGERPRINTS: [(Product, &str); 3] = [
    (
        Product::Milan,
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    ),
    (
        Product::Genoa,
        "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    ),
    (
        Product::Turin,
        "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    ),
];

const AMD_ARKS: [(Product, &[u8]); 3] = [
    (Product::Milan, include_bytes!("../roots/ark_milan.der")),
    (Product::Genoa, include_bytes!("../roots/ark_genoa.der")),
    (Product::Turin, include_bytes!("../roots/ark_turin.der")),
];

/// AMD's intermediates (ASK, ASVK) as published by the KDS. They are a convenience so that a
/// caller need not supply `cert_chain`; they are verified against the pinned ARK like any
/// supplied intermediate.
const AMD_INTERMEDIATES: [&[u8]; 4] = [
    include_bytes!("../roots/ask_milan.der"),
    include_bytes!("../roots/ask_genoa.der"),
    include_bytes!("../roots/ask_turin.der"),
    include_bytes!("../roots/asvk_milan.der"),
];

/// The subject of the built-in AMD certificate whose common name is `cn` (for the
/// simulator's impersonation tests).
#[cfg(feature = "simulator")]
pub(crate) fn builtin_subject(cn: &str) -> Option<Name> {
    AMD_ARKS
        .iter()
        .map(|(_, der)| *der)
        .chain(AMD_INTERMEDIATES)
        .filter_map(|der| Certificate::from_der(der).ok())
        .find(|c| certs::common_name(c.tbs_certificate().subject()).as_deref() == Some(cn))
        .map(|c| c.tbs_certificate().subject().clone())
}

/// SHA-256 of a DER certificate, hex encoded.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

#[derive(Clone, Debug)]
struct Root {
    product: Product,
    kind: RootKind,
    fingerprint: String,
    subject: Name,
    rsa_key: Vec<u8>,
    validity: (u64, u64),
}

#[derive(Clone, Debug)]
struct Intermediate {
    der: Vec<u8>,
}

/// The roots a verifier trusts, and intermediates it may use without their being supplied.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    roots: Vec<Root>,
    intermediates: Vec<Intermediate>,
}

fn unix(at: SystemTime) -> Result<u64, Error> {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| Error::InvalidInput {
            detail: "verification time is before 1970".into(),
        })
}

fn validity(cert: &Certificate) -> (u64, u64) {
    let v = cert.tbs_certificate().validity();
    (
        v.not_before.to_unix_duration().as_secs(),
        v.not_after.to_unix_duration().as_secs(),
    )
}

fn rsa_public_key(cert: &Certificate, role: CertRole) -> Result<Vec<u8>, Error> {
    let spki = cert.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != OID_RSA_ENCRYPTION && spki.algorithm.oid != OID_RSASSA_PSS {
        return Err(Error::CertificateMalformed {
            role,
            detail: "public key is not RSA".into(),
        });
    }
    spki.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::CertificateMalformed {
            role,
            detail: "public key bit string is not byte aligned".into(),
        })
}

fn p384_public_key(cert: &Certificate, role: CertRole) -> Result<Vec<u8>, Error> {
    let spki = cert.tbs_certificate().subject_public_key_info();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<der::oid::ObjectIdentifier>().ok());
    if spki.algorithm.oid != OID_EC_PUBLIC_KEY || curve != Some(OID_SECP384R1) {
        return Err(Error::UnexpectedKeyType { role });
    }
    match spki.subject_public_key.as_bytes() {
        Some(point) if point.len() == 97 && point.first() == Some(&0x04) => Ok(point.to_vec()),
        _ => Err(Error::UnexpectedKeyType { role }),
    }
}

/// Verifies `signed_der` (a certificate or CRL) with an RSA issuer key, AMD's PSS parameters.
fn verify_rsa_pss(
    signed_der: &[u8],
    issuer_key: &[u8],
    role: CertRole,
    issuer: CertRole,
) -> Result<(), Error> {
    let signed = certs::split_signed(signed_der).map_err(|e| Error::CertificateMalformed {
        role,
        detail: e.to_string(),
    })?;
    if !signed.amd_pss {
        return Err(Error::UnexpectedSignatureAlgorithm { role });
    }
    signature::UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, issuer_key)
        .verify(&signed.tbs, &signed.signature)
        .map_err(|_| Error::ChainSignature { role, issuer })
}

fn check_algorithms(cert: &Certificate, role: CertRole) -> Result<(), Error> {
    // The outer and inner algorithm identifiers must both be AMD's PSS (RFC 5280 4.1.1.2).
    if !certs::is_amd_pss_owned(cert.signature_algorithm())
        || !certs::is_amd_pss_owned(cert.tbs_certificate().signature())
    {
        return Err(Error::UnexpectedSignatureAlgorithm { role });
    }
    Ok(())
}

fn check_time(role: CertRole, (not_before, not_after): (u64, u64), at: u64) -> Result<(), Error> {
    if at < not_before || at > not_after {
        return Err(Error::CertificateNotValidAt {
            role,
            not_before,
            not_after,
            at,
        });
    }
    Ok(())
}

fn is_self_issued(cert: &Certificate) -> bool {
    cert.tbs_certificate().subject() == cert.tbs_certificate().issuer()
}

/// ASK or ASVK, by the names AMD gives them ("SEV-Milan", "SEV-VLEK-Milan").
fn intermediate_role(cert: &Certificate) -> CertRole {
    match certs::common_name(cert.tbs_certificate().subject()) {
        Some(cn) if cn.starts_with("SEV-VLEK-") => CertRole::Asvk,
        _ => CertRole::Ask,
    }
}

impl TrustAnchors {
    /// AMD's ARKs for Milan, Genoa and Turin, pinned by SHA-256 fingerprint, and AMD's
    /// published ASKs/ASVK. Simulated roots are not included.
    pub fn amd() -> Result<TrustAnchors, Error> {
        let mut anchors = TrustAnchors {
            roots: Vec::new(),
            intermediates: Vec::new(),
        };
        for ((product, der), (fp_product, fp)) in AMD_ARKS.iter().zip(AMD_ARK_FINGERPRINTS) {
            if *product != fp_product || fingerprint(der) != fp {
                return Err(Error::InvalidInput {
                    detail: format!("built-in {product} ARK does not match its pinned fingerprint"),
                });
            }
            anchors.add_root(der, RootKind::Amd)?;
        }
        for der in AMD_INTERMEDIATES {
            anchors
                .intermediates
                .push(Intermediate { der: der.to_vec() });
        }
        Ok(anchors)
    }

    /// Anchors that trust nothing; add roots with the `dangerous_` methods.
    pub fn empty() -> TrustAnchors {
        TrustAnchors {
            roots: Vec::new(),
            intermediates: Vec::new(),
        }
    }

    /// Trusts a simulated ARK (DER). Reports endorsed by it are accepted as genuine, so this
    /// must only ever be used for tests and demos; claims from it say `root: "simulated"`.
    ///
    /// Only in builds with the `simulator` feature: a production build has no way to trust
    /// any root but AMD's.
    #[cfg(feature = "simulator")]
    pub fn dangerous_trust_simulated_root(mut self, ark_der: &[u8]) -> Result<TrustAnchors, Error> {
        self.add_root(ark_der, RootKind::Simulated)?;
        Ok(self)
    }

    /// Adds an intermediate (ASK or ASVK) that callers need not supply. It is verified
    /// against the roots on every use, so adding one grants no trust.
    pub fn with_intermediate(mut self, der: &[u8]) -> TrustAnchors {
        self.intermediates.push(Intermediate { der: der.to_vec() });
        self
    }

    /// The trusted roots: product, kind and SHA-256 fingerprint.
    pub fn roots(&self) -> impl Iterator<Item = (Product, RootKind, &str)> {
        self.roots
            .iter()
            .map(|r| (r.product, r.kind, r.fingerprint.as_str()))
    }

    fn add_root(&mut self, der: &[u8], kind: RootKind) -> Result<(), Error> {
        let cert = certs::parse_certificate(der, CertRole::Ark)?;
        if !is_self_issued(&cert) {
            return Err(Error::InvalidInput {
                detail: "a root must be self-issued".into(),
            });
        }
        let product = certs::common_name(cert.tbs_certificate().subject())
            .and_then(|cn| cn.strip_prefix("ARK-").and_then(Product::from_name))
            .ok_or_else(|| Error::InvalidInput {
                detail: "root subject CN must be ARK-<product>".into(),
            })?;
        check_algorithms(&cert, CertRole::Ark)?;
        let rsa_key = rsa_public_key(&cert, CertRole::Ark)?;
        // A root must carry a valid self-signature, or it is not the key it claims to be.
        verify_rsa_pss(der, &rsa_key, CertRole::Ark, CertRole::Ark)?;
        self.roots.push(Root {
            product,
            kind,

            fingerprint: fingerprint(der),
            subject: cert.tbs_certificate().subject().clone(),
            rsa_key,
            validity: validity(&cert),
        });
        Ok(())
    }
}

/// Endorsement material supplied with a report: the VCEK or VLEK, optionally the chain
/// (ASK/ASVK and ARK) and CRLs. All DER.
#[derive(Clone, Debug, Default)]
pub struct Endorsements {
    /// The VCEK or VLEK certificate.
    pub vek: Vec<u8>,
    /// Intermediates and, optionally, the ARK (which must be a pinned one).
    pub chain: Vec<Vec<u8>>,
    /// Certificate revocation lists signed by an ARK.
    pub crls: Vec<Vec<u8>>,
}

/// A certificate's role and validity window, kept so a cached chain is re-checked in time.
#[derive(Clone, Copy, Debug)]
struct Window {
    role: CertRole,
    not_before: u64,
    not_after: u64,
}

/// An endorsement chain that verified: ARK → ASK/ASVK → VCEK/VLEK. Only
/// [`crate::Verifier::verify_chain`] builds one. It can be cached and reused for many reports
/// of the same chip and TCB; validity is re-checked at each use.
#[derive(Clone, Debug)]
pub struct VerifiedChain {
    pub(crate) product: Product,
    pub(crate) kind: SigningKeyKind,
    pub(crate) root_kind: RootKind,
    pub(crate) root_fingerprint: String,
    pub(crate) leaf_key: Vec<u8>,
    pub(crate) extensions: AmdExtensions,
    pub(crate) leaf_fingerprint: String,
    windows: Vec<Window>,
    serials: Vec<(CertRole, Vec<u8>)>,
    crl_next_update: Option<u64>,
}

impl VerifiedChain {
    /// The product of the ARK the chain ends in.
    pub fn product(&self) -> Product {
        self.product
    }
    /// VCEK or VLEK.
    pub fn signing_key(&self) -> SigningKeyKind {
        self.kind
    }
    /// AMD or simulated.
    pub fn root_kind(&self) -> RootKind {
        self.root_kind
    }
    /// The AMD extensions of the leaf certificate.
    pub fn extensions(&self) -> &AmdExtensions {
        &self.extensions
    }
    /// SHA-256 of the leaf certificate (hex).
    pub fn leaf_fingerprint(&self) -> &str {
        &self.leaf_fingerprint
    }
    /// Checks that every certificate of the chain is valid at `at` (Unix seconds).
    pub(crate) fn check_time(&self, at: u64) -> Result<(), Error> {
        for w in &self.windows {
            check_time(w.role, (w.not_before, w.not_after), at)?;
        }
        // A cached chain checked against a CRL stays good only while that CRL is current.
        if let Some(next) = self.crl_next_update
            && at > next
        {
            return Err(Error::Crl {
                detail: "out of date (nextUpdate has passed)".into(),
            });
        }
        Ok(())
    }

    /// Whether a CRL was checked for this chain.
    pub fn crl_checked(&self) -> bool {
        self.crl_next_update.is_some()
    }
}

impl TrustAnchors {
    fn root_for(&self, fingerprint: &str) -> Option<&Root> {
        self.roots.iter().find(|r| r.fingerprint == fingerprint)
    }

    /// Whether a chain was verified under a root these anchors hold.
    pub(crate) fn holds(&self, chain: &VerifiedChain) -> bool {
        self.root_for(&chain.root_fingerprint).is_some()
    }

    /// Verifies an endorsement chain at time `at`.
    pub(crate) fn verify_chain(
        &self,
        endorsements: &Endorsements,
        at: SystemTime,
    ) -> Result<VerifiedChain, Error> {
        let at = unix(at)?;
        let leaf = certs::parse_certificate(&endorsements.vek, CertRole::Unknown)?;

        // Sort the supplied chain: self-issued certificates must be pinned roots.
        let mut supplied = Vec::new();
        for der in &endorsements.chain {
            let cert = certs::parse_certificate(der, CertRole::Unknown)?;
            if is_self_issued(&cert) {
                let fp = fingerprint(der);
                if self.root_for(&fp).is_none() {
                    return Err(Error::UntrustedRoot { fingerprint: fp });
                }
            } else {
                supplied.push((der.as_slice(), cert));
            }
        }
        if is_self_issued(&leaf) {
            return Err(Error::UntrustedRoot {
                fingerprint: fingerprint(&endorsements.vek),
            });
        }

        // Candidates for the leaf's issuer: supplied first, then built-in, without repeats.
        let mut candidates: Vec<(&[u8], Certificate)> = Vec::new();
        for (der, cert) in supplied {
            if cert.tbs_certificate().subject() == leaf.tbs_certificate().issuer()
                && !candidates.iter().any(|(d, _)| *d == der)
            {
                candidates.push((der, cert));
            }
        }
        for i in &self.intermediates {
            if candidates.iter().any(|(d, _)| *d == i.der.as_slice()) {
                continue;
            }
            let cert = certs::parse_certificate(&i.der, CertRole::Ask)?;
            if cert.tbs_certificate().subject() == leaf.tbs_certificate().issuer() {
                candidates.push((&i.der, cert));
            }
        }
        let leaf_issuer_cn =
            certs::common_name(leaf.tbs_certificate().issuer()).unwrap_or_default();
        if candidates.is_empty() {
            let role = if leaf_issuer_cn.starts_with("SEV-VLEK-") {
                CertRole::Asvk
            } else {
                CertRole::Ask
            };
            return Err(Error::MissingCertificate { role });
        }

        let mut first_error = None;
        for (der, cert) in &candidates {
            match self.verify_via(der, cert, endorsements, &leaf, at) {
                Ok(chain) => return Ok(chain),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(Error::MissingCertificate {
            role: CertRole::Ask,
        }))
    }

    fn verify_via(
        &self,
        inter_der: &[u8],
        inter: &Certificate,
        endorsements: &Endorsements,
        leaf: &Certificate,
        at: u64,
    ) -> Result<VerifiedChain, Error> {
        let inter_role = intermediate_role(inter);
        let leaf_role = match inter_role {
            CertRole::Asvk => CertRole::Vlek,
            _ => CertRole::Vcek,
        };
        let kind = match leaf_role {
            CertRole::Vlek => SigningKeyKind::Vlek,
            _ => SigningKeyKind::Vcek,
        };

        // Root by issuer name; several roots may share a name (AMD and a simulated one).
        let roots: Vec<&Root> = self
            .roots
            .iter()
            .filter(|r| &r.subject == inter.tbs_certificate().issuer())
            .collect();
        if roots.is_empty() {
            return Err(Error::UnknownIssuer {
                role: inter_role,
                issuer: inter.tbs_certificate().issuer().to_string(),
            });
        }
        check_algorithms(inter, inter_role)?;
        let mut root = None;
        let mut last = None;
        for r in roots {
            match verify_rsa_pss(inter_der, &r.rsa_key, inter_role, CertRole::Ark) {
                Ok(()) => {
                    root = Some(r);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(root) = root else {
            return Err(last.unwrap_or(Error::ChainSignature {
                role: inter_role,
                issuer: CertRole::Ark,
            }));
        };

        check_algorithms(leaf, leaf_role)?;
        let inter_key = rsa_public_key(inter, inter_role)?;
        verify_rsa_pss(&endorsements.vek, &inter_key, leaf_role, inter_role)?;
        let leaf_key = p384_public_key(leaf, leaf_role)?;

        let windows = vec![
            Window {
                role: CertRole::Ark,
                not_before: root.validity.0,
                not_after: root.validity.1,
            },
            window(inter_role, inter),
            window(leaf_role, leaf),
        ];
        for w in &windows {
            check_time(w.role, (w.not_before, w.not_after), at)?;
        }

        let serials = vec![
            (
                inter_role,
                inter.tbs_certificate().serial_number().as_bytes().to_vec(),
            ),
            (
                leaf_role,
                leaf.tbs_certificate().serial_number().as_bytes().to_vec(),
            ),
        ];
        let mut crl_next_update: Option<u64> = None;
        for crl in &endorsements.crls {
            if let Some(next) = check_crl(crl, root, &serials, at)? {
                crl_next_update = Some(crl_next_update.map_or(next, |n| n.min(next)));
            }
        }

        let extensions = AmdExtensions::from_certificate(leaf, leaf_role)?;
        let name = extensions
            .product_name
            .as_deref()
            .ok_or(Error::MissingExtension {
                role: leaf_role,
                oid: certs::oid::PRODUCT_NAME,
            })?;
        if Product::from_name(name) != Some(root.product) {
            return Err(Error::CertificateMalformed {
                role: leaf_role,
                detail: format!(
                    "product name {name:?} does not match the issuing ARK ({})",
                    root.product
                ),
            });
        }
        Ok(VerifiedChain {
            product: root.product,
            kind,
            root_kind: root.kind,
            root_fingerprint: root.fingerprint.clone(),
            leaf_key,
            extensions,
            leaf_fingerprint: fingerprint(&endorsements.vek),
            windows,
            serials,
            crl_next_update,
        })
    }

    /// Checks a CRL (from a cache or AMD's KDS) against an already verified chain.
    pub(crate) fn check_revocation(
        &self,
        chain: &VerifiedChain,
        crl_der: &[u8],
        at: SystemTime,
    ) -> Result<VerifiedChain, Error> {
        let at = unix(at)?;
        let root = self
            .root_for(&chain.root_fingerprint)
            .ok_or(Error::ForeignChain)?;
        let mut out = chain.clone();
        if let Some(next) = check_crl(crl_der, root, &chain.serials, at)? {
            out.crl_next_update = Some(out.crl_next_update.map_or(next, |n| n.min(next)));
        }
        Ok(out)
    }
}

fn window(role: CertRole, cert: &Certificate) -> Window {
    let (not_before, not_after) = validity(cert);
    Window {
        role,
        not_before,
        not_after,
    }
}

/// Checks one CRL. A CRL issued by another root than the chain's is not about this chain
/// and is skipped; one issued by the chain's root must verify and be current.
fn check_crl(
    crl_der: &[u8],
    root: &Root,
    subjects: &[(CertRole, Vec<u8>)],
    at: u64,
) -> Result<Option<u64>, Error> {
    if crl_der.len() > certs::MAX_DER_LEN {
        return Err(Error::Crl {
            detail: "too large".into(),
        });
    }
    let crl = <CertificateList>::from_der(crl_der).map_err(|e| Error::Crl {
        detail: format!("malformed: {e}"),
    })?;
    let tbs = &crl.tbs_cert_list;
    if tbs.issuer != root.subject {
        return Ok(None);
    }
    if !certs::is_amd_pss_owned(&crl.signature_algorithm)
        || !certs::is_amd_pss_owned(&tbs.signature)
    {
        return Err(Error::Crl {
            detail: "unexpected signature algorithm".into(),
        });
    }
    verify_rsa_pss(crl_der, &root.rsa_key, CertRole::Unknown, CertRole::Ark).map_err(|_| {
        Error::Crl {
            detail: format!("not signed by the {} ARK", root.product),
        }
    })?;
    // A CRL issued after the verification time is newer information and still applies;
    // one whose nextUpdate has passed is stale and refused.
    if let Some(next) = tbs.next_update
        && next.to_unix_duration().as_secs() < at
    {
        return Err(Error::Crl {
            detail: "out of date (nextUpdate has passed)".into(),
        });
    }
    for revoked in tbs.revoked_certificates.iter().flatten() {
        for (role, serial) in subjects {
            // Serial numbers are compared within the ARK's CRL scope: ASK/ASVK directly, and
            // leaf certificates named by the ARK (AMD's CRLs cover the whole hierarchy).
            if revoked.serial_number.as_bytes() == serial.as_slice() {
                return Err(Error::Revoked {
                    role: *role,
                    serial: hex::encode(revoked.serial_number.as_bytes()),
                });
            }
        }
    }
    Ok(Some(
        tbs.next_update
            .map(|t| t.to_unix_duration().as_secs())
            .unwrap_or(u64::MAX),
    ))
}
