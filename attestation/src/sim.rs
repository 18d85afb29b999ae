//! A simulated SEV-SNP platform for tests, benchmarks and demos (feature `simulator`).
//!
//! It generates a test hierarchy shaped like AMD's — an RSA-4096 ARK, ASK and ASVK signing
//! with RSASSA-PSS/SHA-384 and AMD's parameter encoding, ECDSA P-384 VCEKs and VLEKs with
//! AMD's extensions — issues CRLs, and signs reports with chosen fields. Every certificate's
//! subject carries `OU=SIMULATED`. Nothing here is trusted unless a caller passes the
//! simulated ARK to [`crate::TrustAnchors::dangerous_trust_simulated_root`].

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PSS_SHA384,
};
use der::asn1::{BitString, Ia5StringRef, OctetString, Uint};
use der::{Any, Decode, Encode, Sequence};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use crate::certs::{
    AMD_PSS_PARAMS, OID_EC_PUBLIC_KEY, OID_RSA_ENCRYPTION, OID_RSASSA_PSS, OID_SECP384R1, oid,
};
use crate::error::Error;
use crate::report::{Product, REPORT_LEN, SIGNED_LEN, SigningKeyKind, Tcb};

fn sim_err(detail: impl Into<String>) -> Error {
    Error::InvalidInput {
        detail: format!("simulator: {}", detail.into()),
    }
}

fn der_err(e: der::Error) -> Error {
    sim_err(e.to_string())
}

const YEAR: u64 = 365 * 24 * 3600;

fn x509_time(secs: u64) -> Result<Time, Error> {
    let d = Duration::from_secs(secs);
    // RFC 5280: UTCTime through 2049, GeneralizedTime from 2050.
    if secs < 2_524_608_000 {
        Ok(Time::UtcTime(
            der::asn1::UtcTime::from_unix_duration(d).map_err(der_err)?,
        ))
    } else {
        Ok(Time::GeneralTime(
            der::asn1::GeneralizedTime::from_unix_duration(d).map_err(der_err)?,
        ))
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn pss_algorithm() -> Result<AlgorithmIdentifierOwned, Error> {
    Ok(AlgorithmIdentifierOwned {
        oid: OID_RSASSA_PSS,
        parameters: Some(Any::from_der(AMD_PSS_PARAMS).map_err(der_err)?),
    })
}

fn name(product: Product, cn: &str) -> Result<Name, Error> {
    // Same attribute set as AMD's names, marked as simulated.
    let _ = product;
    Name::from_str(&format!(
        "CN={cn},O=Simulated SEV-SNP platform (not AMD),OU=SIMULATED,C=US"
    ))
    .map_err(der_err)
}

/// RFC 5280 TBSCertificate, for encoding (x509-cert's own type is decode-only here).
#[derive(Sequence)]
struct TbsCertificate {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    version: u8,
    serial: Uint,
    signature: AlgorithmIdentifierOwned,
    issuer: Name,
    validity: Validity,
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT")]
    extensions: Vec<Extension>,
}

#[derive(Sequence)]
struct SignedStructure {
    tbs: Any,
    algorithm: AlgorithmIdentifierOwned,
    signature: BitString,
}

fn ext(id: &str, critical: bool, value: Vec<u8>) -> Result<Extension, Error> {
    Ok(Extension {
        extn_id: der::oid::ObjectIdentifier::new(id).map_err(|e| sim_err(e.to_string()))?,
        critical,
        extn_value: OctetString::new(value).map_err(der_err)?,
    })
}

fn ca_extensions() -> Result<Vec<Extension>, Error> {
    Ok(vec![
        // basicConstraints CA:TRUE; keyUsage keyCertSign, cRLSign.
        ext("2.5.29.19", true, vec![0x30, 0x03, 0x01, 0x01, 0xff])?,
        ext("2.5.29.15", true, vec![0x03, 0x02, 0x01, 0x06])?,
    ])
}

/// An RSA signer of the simulated hierarchy (ARK, ASK or ASVK).
struct RsaSigner {
    key: RsaKeyPair,
    name: Name,
}

impl RsaSigner {
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, Error> {
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PSS_SHA384, &SystemRandom::new(), tbs, &mut sig)
            .map_err(|_| sim_err("RSA signing failed"))?;
        Ok(sig)
    }

    fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, Error> {
        Ok(SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_RSA_ENCRYPTION,
                parameters: Some(Any::null()),
            },
            subject_public_key: BitString::from_bytes(self.key.public_key().as_ref())
                .map_err(der_err)?,
        })
    }

    /// Signs a TBS structure and wraps it as a certificate or CRL.
    fn assemble(&self, tbs_der: Vec<u8>) -> Result<Vec<u8>, Error> {
        self.assemble_with(tbs_der, pss_algorithm()?)
    }

    fn assemble_with(
        &self,
        tbs_der: Vec<u8>,
        algorithm: AlgorithmIdentifierOwned,
    ) -> Result<Vec<u8>, Error> {
        let signature = self.sign(&tbs_der)?;
        SignedStructure {
            tbs: Any::from_der(&tbs_der).map_err(der_err)?,
            algorithm,
            signature: BitString::from_bytes(&signature).map_err(der_err)?,
        }
        .to_der()
        .map_err(der_err)
    }

    fn issue(
        &self,
        serial: &[u8],
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        not_before: u64,
        not_after: u64,
        extensions: Vec<Extension>,
    ) -> Result<Vec<u8>, Error> {
        self.issue_with(
            serial,
            subject,
            spki,
            (not_before, not_after),
            extensions,
            pss_algorithm()?,
        )
    }

    fn issue_with(
        &self,
        serial: &[u8],
        subject: Name,
        spki: SubjectPublicKeyInfoOwned,
        (not_before, not_after): (u64, u64),
        extensions: Vec<Extension>,
        algorithm: AlgorithmIdentifierOwned,
    ) -> Result<Vec<u8>, Error> {
        let tbs = TbsCertificate {
            version: 2,
            serial: Uint::new(serial).map_err(der_err)?,
            signature: algorithm.clone(),
            issuer: self.name.clone(),
            validity: Validity::new(x509_time(not_before)?, x509_time(not_after)?),
            subject,
            spki,
            extensions,
        };
        self.assemble_with(tbs.to_der().map_err(der_err)?, algorithm)
    }
}

fn random_serial() -> Result<[u8; 16], Error> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| sim_err("no randomness"))?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

/// A simulated AMD hierarchy for one product: ARK, ASK and ASVK.
pub struct SimulatedAmd {
    product: Product,
    ark: RsaSigner,
    ask: RsaSigner,
    asvk: RsaSigner,
    ark_der: Vec<u8>,
    ask_der: Vec<u8>,
    asvk_der: Vec<u8>,
}

impl std::fmt::Debug for SimulatedAmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedAmd")
            .field("product", &self.product)
            .finish_non_exhaustive()
    }
}

impl SimulatedAmd {
    /// Generates a fresh hierarchy (three RSA-4096 keys), valid from `now` − 1 day for 25 years.
    pub fn generate(product: Product, now: SystemTime) -> Result<SimulatedAmd, Error> {
        let gen_key = || RsaKeyPair::generate(KeySize::Rsa4096).map_err(|_| sim_err("RSA keygen"));
        SimulatedAmd::from_keys(product, gen_key()?, gen_key()?, gen_key()?, now)
    }

    /// Builds a hierarchy from existing PKCS#8 RSA keys (ARK, ASK, ASVK), e.g. a fake AMD
    /// key set published for tests.
    pub fn from_pkcs8(
        product: Product,
        ark: &[u8],
        ask: &[u8],
        asvk: &[u8],
        now: SystemTime,
    ) -> Result<SimulatedAmd, Error> {
        let load = |der: &[u8]| {
            RsaKeyPair::from_pkcs8(der).map_err(|e| sim_err(format!("RSA key rejected: {e}")))
        };
        SimulatedAmd::from_keys(product, load(ark)?, load(ask)?, load(asvk)?, now)
    }

    /// Like [`SimulatedAmd::from_pkcs8`] but naming the certificates exactly as AMD does
    /// (`CN=ARK-Milan`, `CN=SEV-Milan`, …, without the SIMULATED marker): the chains look
    /// like AMD's in every way except the keys. Used to check that roots are pinned.
    pub fn impersonating_amd(
        product: Product,
        ark: &[u8],
        ask: &[u8],
        asvk: &[u8],
        now: SystemTime,
    ) -> Result<SimulatedAmd, Error> {
        let load = |der: &[u8]| {
            RsaKeyPair::from_pkcs8(der).map_err(|e| sim_err(format!("RSA key rejected: {e}")))
        };
        let amd = |cn: String| {
            crate::chain::builtin_subject(&cn)
                .ok_or_else(|| sim_err(format!("no built-in AMD certificate named {cn}")))
        };
        let p = product.name();
        let names = [
            amd(format!("ARK-{p}"))?,
            amd(format!("SEV-{p}"))?,
            amd(format!("SEV-VLEK-{p}"))?,
        ];
        SimulatedAmd::build(product, [load(ark)?, load(ask)?, load(asvk)?], names, now)
    }

    /// Reloads a hierarchy saved with [`SimulatedAmd::private_keys_pkcs8`] and the
    /// certificate accessors, byte for byte (so a verifier that trusts the saved ARK trusts it).
    pub fn load(
        product: Product,
        keys: [&[u8]; 3],
        certs: [&[u8]; 3],
    ) -> Result<SimulatedAmd, Error> {
        let load = |der: &[u8]| {
            RsaKeyPair::from_pkcs8(der).map_err(|e| sim_err(format!("RSA key rejected: {e}")))
        };
        let subject = |der: &[u8]| -> Result<Name, Error> {
            let cert = x509_cert::Certificate::from_der(der).map_err(der_err)?;
            Ok(cert.tbs_certificate().subject().clone())
        };
        let [ark_k, ask_k, asvk_k] = keys;
        let [ark_c, ask_c, asvk_c] = certs;
        Ok(SimulatedAmd {
            product,
            ark: RsaSigner {
                key: load(ark_k)?,
                name: subject(ark_c)?,
            },
            ask: RsaSigner {
                key: load(ask_k)?,
                name: subject(ask_c)?,
            },
            asvk: RsaSigner {
                key: load(asvk_k)?,
                name: subject(asvk_c)?,
            },
            ark_der: ark_c.to_vec(),
            ask_der: ask_c.to_vec(),
            asvk_der: asvk_c.to_vec(),
        })
    }

    fn from_keys(
        product: Product,
        ark: RsaKeyPair,
        ask: RsaKeyPair,
        asvk: RsaKeyPair,
        now: SystemTime,
    ) -> Result<SimulatedAmd, Error> {
        let p = product.name();
        let names = [
            name(product, &format!("ARK-{p}"))?,
            name(product, &format!("SEV-{p}"))?,
            name(product, &format!("SEV-VLEK-{p}"))?,
        ];
        SimulatedAmd::build(product, [ark, ask, asvk], names, now)
    }

    fn build(
        product: Product,
        [ark, ask, asvk]: [RsaKeyPair; 3],
        [ark_name, ask_name, asvk_name]: [Name; 3],
        now: SystemTime,
    ) -> Result<SimulatedAmd, Error> {
        let start = unix(now).saturating_sub(24 * 3600);
        let end = start + 25 * YEAR;
        let ark = RsaSigner {
            key: ark,
            name: ark_name,
        };
        let ask = RsaSigner {
            key: ask,
            name: ask_name,
        };
        let asvk = RsaSigner {
            key: asvk,
            name: asvk_name,
        };
        let ark_der = ark.issue(
            &random_serial()?,
            ark.name.clone(),
            ark.spki()?,
            start,
            end,
            ca_extensions()?,
        )?;
        let ask_der = ark.issue(
            &random_serial()?,
            ask.name.clone(),
            ask.spki()?,
            start,
            end,
            ca_extensions()?,
        )?;
        let asvk_der = ark.issue(
            &random_serial()?,
            asvk.name.clone(),
            asvk.spki()?,
            start,
            end,
            ca_extensions()?,
        )?;
        Ok(SimulatedAmd {
            product,
            ark,
            ask,
            asvk,
            ark_der,
            ask_der,
            asvk_der,
        })
    }

    /// The product this hierarchy is for.
    pub fn product(&self) -> Product {
        self.product
    }
    /// The simulated ARK (DER). Trust it only with `dangerous_trust_simulated_root`.
    pub fn ark_der(&self) -> &[u8] {
        &self.ark_der
    }
    /// The simulated ASK (DER).
    pub fn ask_der(&self) -> &[u8] {
        &self.ask_der
    }
    /// The simulated ASVK (DER).
    pub fn asvk_der(&self) -> &[u8] {
        &self.asvk_der
    }
    /// PKCS#8 of the ARK, ASK and ASVK private keys, to persist a hierarchy.
    pub fn private_keys_pkcs8(&self) -> Result<[Vec<u8>; 3], Error> {
        let der = |k: &RsaKeyPair| {
            k.as_der()
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| sim_err("RSA key export"))
        };
        Ok([
            der(&self.ark.key)?,
            der(&self.ask.key)?,
            der(&self.asvk.key)?,
        ])
    }

    /// Issues a VCEK for `chip_id` at `tcb`, valid for 7 years from `not_before`.
    pub fn issue_vcek(
        &self,
        chip_id: &[u8; 64],
        tcb: Tcb,
        not_before: SystemTime,
    ) -> Result<SimulatedKey, Error> {
        let key = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .map_err(|_| sim_err("ECDSA keygen"))?;
        self.issue_vcek_for(key, chip_id, tcb, not_before)
    }

    /// Issues a VCEK for an existing P-384 key (PKCS#8).
    pub fn issue_vcek_with_key(
        &self,
        pkcs8: &[u8],
        chip_id: &[u8; 64],
        tcb: Tcb,
        not_before: SystemTime,
    ) -> Result<SimulatedKey, Error> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8)
            .map_err(|e| sim_err(format!("ECDSA key rejected: {e}")))?;
        self.issue_vcek_for(key, chip_id, tcb, not_before)
    }

    fn issue_vcek_for(
        &self,
        key: EcdsaKeyPair,
        chip_id: &[u8; 64],
        tcb: Tcb,
        not_before: SystemTime,
    ) -> Result<SimulatedKey, Error> {
        let hwid = chip_id
            .get(..self.product.hwid_len())
            .unwrap_or(&[])
            .to_vec();
        let mut exts = self.tcb_extensions(tcb)?;
        exts.push(ext(oid::HWID, false, hwid)?);
        let start = unix(not_before);
        let cert_der = self.ask.issue(
            &[0],
            name(self.product, "SEV-VCEK")?,
            p384_spki(&key)?,
            start,
            start + 7 * YEAR,
            exts,
        )?;
        Ok(SimulatedKey {
            kind: SigningKeyKind::Vcek,
            key,
            cert_der,
        })
    }

    /// Issues a VCEK with deliberate defects (see [`VcekTweak`]), for negative tests.
    pub fn issue_vcek_tweaked(
        &self,
        chip_id: &[u8; 64],
        tcb: Tcb,
        not_before: SystemTime,
        tweak: &VcekTweak,
    ) -> Result<SimulatedKey, Error> {
        let alg = if tweak.p256_key {
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING
        } else {
            &ECDSA_P384_SHA384_FIXED_SIGNING
        };
        let key = EcdsaKeyPair::generate(alg).map_err(|_| sim_err("ECDSA keygen"))?;
        let hwid = chip_id
            .get(..self.product.hwid_len())
            .unwrap_or(&[])
            .to_vec();
        let mut exts = self.tcb_extensions(tcb)?;
        exts.push(ext(oid::HWID, false, hwid)?);
        exts.retain(|e| !tweak.omit.contains(&e.extn_id.to_string().as_str()));
        for (id, value) in &tweak.replace {
            exts.retain(|e| e.extn_id.to_string() != *id);
            exts.push(ext(id, false, value.clone())?);
        }
        let spki = if tweak.p256_key {
            SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: OID_EC_PUBLIC_KEY,
                    parameters: Some(
                        Any::encode_from(&der::oid::ObjectIdentifier::new_unwrap(
                            "1.2.840.10045.3.1.7",
                        ))
                        .map_err(der_err)?,
                    ),
                },
                subject_public_key: BitString::from_bytes(key.public_key().as_ref())
                    .map_err(der_err)?,
            }
        } else {
            p384_spki(&key)?
        };
        let algorithm = match &tweak.signature_params {
            Some(params) => AlgorithmIdentifierOwned {
                oid: OID_RSASSA_PSS,
                parameters: Some(Any::from_der(params).map_err(der_err)?),
            },
            None => pss_algorithm()?,
        };
        let start = unix(not_before);
        let cert_der = self.ask.issue_with(
            &[0],
            name(self.product, "SEV-VCEK")?,
            spki,
            (start, start + 7 * YEAR),
            exts,
            algorithm,
        )?;
        Ok(SimulatedKey {
            kind: SigningKeyKind::Vcek,
            key,
            cert_der,
        })
    }

    /// Issues a VLEK for a cloud provider `csp_id` at `tcb`, valid for one year.
    pub fn issue_vlek(
        &self,
        tcb: Tcb,
        csp_id: &str,
        not_before: SystemTime,
    ) -> Result<SimulatedKey, Error> {
        let key = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .map_err(|_| sim_err("ECDSA keygen"))?;
        let mut exts = self.tcb_extensions(tcb)?;
        let csp = Ia5StringRef::new(csp_id)
            .map_err(der_err)?
            .to_der()
            .map_err(der_err)?;
        exts.push(ext(oid::CSP_ID, false, csp)?);
        let start = unix(not_before);
        let cert_der = self.asvk.issue(
            &random_serial()?,
            name(self.product, "SEV-VLEK")?,
            p384_spki(&key)?,
            start,
            start + YEAR,
            exts,
        )?;
        Ok(SimulatedKey {
            kind: SigningKeyKind::Vlek,
            key,
            cert_der,
        })
    }

    fn tcb_extensions(&self, tcb: Tcb) -> Result<Vec<Extension>, Error> {
        let int = |v: u8| u64::from(v).to_der().map_err(der_err);
        let product_name = match self.product {
            Product::Milan => "Milan-B0",
            Product::Genoa => "Genoa-B1",
            Product::Turin => "Turin",
        };
        let mut exts = vec![
            ext(oid::STRUCT_VERSION, false, 1u64.to_der().map_err(der_err)?)?,
            ext(
                oid::PRODUCT_NAME,
                false,
                Ia5StringRef::new(product_name)
                    .map_err(der_err)?
                    .to_der()
                    .map_err(der_err)?,
            )?,
            ext(oid::BL_SPL, false, int(tcb.bootloader)?)?,
            ext(oid::TEE_SPL, false, int(tcb.tee)?)?,
            ext(oid::SNP_SPL, false, int(tcb.snp)?)?,
            ext(oid::UCODE_SPL, false, int(tcb.microcode)?)?,
        ];
        if self.product == Product::Turin {
            exts.push(ext(oid::FMC_SPL, false, int(tcb.fmc.unwrap_or(0))?)?);
        }
        Ok(exts)
    }

    /// A CRL signed by the ARK that revokes the certificates with the given serial numbers.
    pub fn crl(
        &self,
        revoked_serials: &[Vec<u8>],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, Error> {
        let this = x509_time(unix(this_update))?;
        let mut revoked: Vec<RevokedCert> = Vec::new();
        for serial in revoked_serials {
            revoked.push(RevokedCert {
                serial_number: SerialNumber::<x509_cert::certificate::Rfc5280>::new(serial)
                    .map_err(der_err)?,
                revocation_date: this,
                crl_entry_extensions: None,
            });
        }
        let tbs: TbsCertList = TbsCertList {
            version: x509_cert::certificate::Version::V2,
            signature: pss_algorithm()?,
            issuer: self.ark.name.clone(),
            this_update: this,
            next_update: Some(x509_time(unix(next_update))?),
            revoked_certificates: (!revoked.is_empty()).then_some(revoked),
            crl_extensions: None,
        };
        let der = self.ark.assemble(tbs.to_der().map_err(der_err)?)?;
        // Round-trip through the decoder so a simulator bug shows here, not in a verifier.
        <CertificateList>::from_der(&der).map_err(der_err)?;
        Ok(der)
    }

    /// The KDS `cert_chain` PEM for VCEKs (ASK then ARK) or VLEKs (ASVK then ARK).
    pub fn cert_chain_pem(&self, kind: SigningKeyKind) -> String {
        let inter = match kind {
            SigningKeyKind::Vcek => &self.ask_der,
            SigningKeyKind::Vlek => &self.asvk_der,
        };
        format!("{}{}", to_pem(inter), to_pem(&self.ark_der))
    }
}

/// Deliberate defects for a simulated VCEK, each the broken twin of a verifier check.
#[derive(Clone, Debug, Default)]
pub struct VcekTweak {
    /// Extensions (by OID, see [`crate::certs::oid`]) to leave out.
    pub omit: Vec<&'static str>,
    /// Extensions to replace with these raw values.
    pub replace: Vec<(&'static str, Vec<u8>)>,
    /// RSASSA-PSS parameters (DER) to declare instead of AMD's; the signature itself is
    /// always PSS/SHA-384 with a 48-byte salt.
    pub signature_params: Option<Vec<u8>>,
    /// A P-256 key instead of P-384.
    pub p256_key: bool,
}

pub use crate::certs::to_pem;

fn p384_spki(key: &EcdsaKeyPair) -> Result<SubjectPublicKeyInfoOwned, Error> {
    Ok(SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: OID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&OID_SECP384R1).map_err(der_err)?),
        },
        subject_public_key: BitString::from_bytes(key.public_key().as_ref()).map_err(der_err)?,
    })
}

/// A simulated VCEK or VLEK: its private key and certificate.
pub struct SimulatedKey {
    kind: SigningKeyKind,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for SimulatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The fields of a simulated report. Start from [`ReportFields::new`] and change what matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFields {
    /// Report version (2, 3 or 5).
    pub version: u32,
    /// Product (for CPUID fields and the TCB layout).
    pub product: Product,
    /// GUEST_SVN.
    pub guest_svn: u32,
    /// Guest policy.
    pub policy: u64,
    /// FAMILY_ID.
    pub family_id: [u8; 16],
    /// IMAGE_ID.
    pub image_id: [u8; 16],
    /// VMPL.
    pub vmpl: u32,
    /// PLATFORM_INFO.
    pub platform_info: u64,
    /// REPORT_DATA.
    pub report_data: [u8; 64],
    /// MEASUREMENT.
    pub measurement: [u8; 48],
    /// HOST_DATA.
    pub host_data: [u8; 32],
    /// ID_KEY_DIGEST.
    pub id_key_digest: [u8; 48],
    /// AUTHOR_KEY_DIGEST.
    pub author_key_digest: [u8; 48],
    /// REPORT_ID.
    pub report_id: [u8; 32],
    /// CHIP_ID (zero to mask).
    pub chip_id: [u8; 64],
    /// The TCB used for REPORTED, COMMITTED, LAUNCH and CURRENT TCB.
    pub tcb: Tcb,
}

impl ReportFields {
    /// Plausible defaults: version 5 on Turin, 3 on Genoa, 2 on Milan; policy with SMT
    /// allowed, debug and migration off; VMPL 0; a fixed chip id.
    pub fn new(product: Product) -> ReportFields {
        let version = match product {
            Product::Milan => 2,
            Product::Genoa => 3,
            Product::Turin => 5,
        };
        let mut chip_id = [0u8; 64];
        for (i, b) in chip_id.iter_mut().enumerate().take(product.hwid_len()) {
            *b = 0xC0 ^ (i as u8);
        }
        ReportFields {
            version,
            product,
            guest_svn: 0,
            policy: 0x3_0000,
            family_id: [0; 16],
            image_id: [0; 16],
            vmpl: 0,
            platform_info: 0x1,
            report_data: [0; 64],
            measurement: [0x5A; 48],
            host_data: [0; 32],
            id_key_digest: [0; 48],
            author_key_digest: [0; 48],
            report_id: [0x11; 32],
            chip_id,
            tcb: Tcb {
                fmc: (product == Product::Turin).then_some(1),
                bootloader: 9,
                tee: 0,
                snp: 23,
                microcode: 72,
            },
        }
    }

    /// The unsigned report bytes with `key_kind` in the key-selection field.
    pub fn encode(&self, key_kind: SigningKeyKind) -> [u8; REPORT_LEN] {
        let mut r = [0u8; REPORT_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            if let Some(dst) = r.get_mut(offset..offset + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        let tcb = self.tcb.encode(self.product);
        put(0x00, &self.version.to_le_bytes());
        put(0x04, &self.guest_svn.to_le_bytes());
        put(0x08, &self.policy.to_le_bytes());
        put(0x10, &self.family_id);
        put(0x20, &self.image_id);
        put(0x30, &self.vmpl.to_le_bytes());
        put(0x34, &1u32.to_le_bytes());
        put(0x38, &tcb);
        put(0x40, &self.platform_info.to_le_bytes());
        let signing = match key_kind {
            SigningKeyKind::Vcek => 0u32,
            SigningKeyKind::Vlek => 1,
        };
        put(0x48, &(signing << 2).to_le_bytes());
        put(0x50, &self.report_data);
        put(0x90, &self.measurement);
        put(0xC0, &self.host_data);
        put(0xE0, &self.id_key_digest);
        put(0x110, &self.author_key_digest);
        put(0x140, &self.report_id);
        put(0x160, &[0xFF; 32]);
        put(0x180, &tcb);
        if self.version >= 3 {
            let (family, model, stepping) = match self.product {
                Product::Milan => (0x19, 0x01, 0x01),
                Product::Genoa => (0x19, 0x11, 0x01),
                Product::Turin => (0x1A, 0x02, 0x00),
            };
            put(0x188, &[family, model, stepping]);
        }
        put(0x1A0, &self.chip_id);
        put(0x1E0, &tcb);
        put(0x1E8, &[3, 55, 1]);
        put(0x1EC, &[3, 55, 1]);
        put(0x1F0, &tcb);
        if self.version >= 5 {
            put(0x1F8, &1u64.to_le_bytes());
            put(0x200, &1u64.to_le_bytes());
        }
        r
    }
}

impl SimulatedKey {
    /// VCEK or VLEK.
    pub fn kind(&self) -> SigningKeyKind {
        self.kind
    }
    /// The certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// The private key as PKCS#8, to persist it.
    pub fn private_key_pkcs8(&self) -> Result<Vec<u8>, Error> {
        self.key
            .to_pkcs8v1()
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| sim_err("ECDSA key export"))
    }
    /// Loads a key saved with [`SimulatedKey::private_key_pkcs8`] with its certificate.
    pub fn from_parts(
        kind: SigningKeyKind,
        pkcs8: &[u8],
        cert_der: Vec<u8>,
    ) -> Result<SimulatedKey, Error> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8)
            .map_err(|e| sim_err(format!("ECDSA key rejected: {e}")))?;
        Ok(SimulatedKey {
            kind,
            key,
            cert_der,
        })
    }

    /// Signs a report with these fields. The signature covers `[0x000, 0x2A0)`.
    pub fn sign_report(&self, fields: &ReportFields) -> Result<Vec<u8>, Error> {
        let mut report = fields.encode(self.kind);
        self.sign_raw(&mut report)?;
        Ok(report.to_vec())
    }

    /// Signs arbitrary report bytes in place (for building malformed-but-signed reports).
    pub fn sign_raw(&self, report: &mut [u8; REPORT_LEN]) -> Result<(), Error> {
        let signed = report.get(..SIGNED_LEN).unwrap_or(&[]);
        let sig = self
            .key
            .sign(&SystemRandom::new(), signed)
            .map_err(|_| sim_err("ECDSA signing failed"))?;
        let sig = sig.as_ref();
        let (r, s) = sig.split_at(48);
        for (offset, component) in [(0x2A0usize, r), (0x2E8usize, s)] {
            for (i, byte) in component.iter().rev().enumerate() {
                if let Some(slot) = report.get_mut(offset + i) {
                    *slot = *byte;
                }
            }
        }
        Ok(())
    }
}

/// The settings an Azure paravisor writes into the HCL variable data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureVmConfig {
    /// `vm-configuration.secure-boot`.
    pub secure_boot: bool,
    /// `vm-configuration.tpm-enabled`.
    pub tpm_enabled: bool,
    /// `vm-configuration.console-enabled`.
    pub console_enabled: bool,
    /// `vm-configuration.vmUniqueId`.
    pub vm_id: String,
}

impl Default for AzureVmConfig {
    fn default() -> AzureVmConfig {
        AzureVmConfig {
            secure_boot: true,
            tpm_enabled: true,
            console_enabled: false,
            vm_id: "00000000-5349-4d55-4c41-544544000001".into(),
        }
    }
}

/// Builds HCL variable data the way Azure's paravisor lays it out: the attestation key as
/// an RSA JWK (`HCLAkPub`), the VM configuration and `user-data` (upper-case hex). It leaves
/// out the endorsement key to stay within an emulated NV index (swtpm allows 2048 bytes).
pub fn azure_var_data(
    ak_modulus: &[u8],
    ak_exponent: &[u8],
    user_data: &[u8],
    vm: &AzureVmConfig,
) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let doc = serde_json::json!({
        "keys": [{
            "kid": "HCLAkPub",
            "key_ops": ["sign"],
            "kty": "RSA",
            "e": b64.encode(ak_exponent),
            "n": b64.encode(ak_modulus),
        }],
        "vm-configuration": {
            "console-enabled": vm.console_enabled,
            "secure-boot": vm.secure_boot,
            "tpm-enabled": vm.tpm_enabled,
            "tpm-persisted": true,
            "vmUniqueId": vm.vm_id,
        },
        "user-data": hex::encode_upper(user_data),
    });
    doc.to_string().into_bytes()
}

/// The REPORT_DATA an Azure paravisor puts in the SNP report for `var_data`:
/// SHA-256 of it, zero-padded.
pub fn azure_report_data(var_data: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, var_data);
    out[..32].copy_from_slice(d.as_ref());
    out
}

/// Wraps a signed SNP report and variable data in an HCL report (header "HCLA", version 2,
/// IGVM request data with report type SNP and hash type SHA-256).
pub fn build_hcl(report: &[u8], var_data: &[u8]) -> Vec<u8> {
    let var_len = u32::try_from(var_data.len()).unwrap_or(u32::MAX);
    let total = 0x20 + report.len() + 20 + var_data.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"HCLA");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes()); // request type
    out.extend_from_slice(&[0u8; 16]); // status, reserved
    out.extend_from_slice(report);
    out.extend_from_slice(&(var_len.saturating_add(20)).to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // version
    out.extend_from_slice(&2u32.to_le_bytes()); // report type: SNP
    out.extend_from_slice(&1u32.to_le_bytes()); // hash type: SHA-256
    out.extend_from_slice(&var_len.to_le_bytes());
    out.extend_from_slice(var_data);
    out
}

/// A software stand-in for an Azure vTPM (for unit tests and benchmarks; the swtpm-based
/// emulator in the end-to-end tests runs a real TPM): an RSA-2048 attestation key that
/// signs quotes, and PCR values.
pub struct SimulatedVtpm {
    ak: RsaKeyPair,
    /// SHA-256 PCR values 0-23.
    pub pcrs: [[u8; 32]; crate::tpm::PCR_COUNT],
    /// The VM configuration the paravisor reports.
    pub vm: AzureVmConfig,
}

impl std::fmt::Debug for SimulatedVtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedVtpm").finish_non_exhaustive()
    }
}

impl SimulatedVtpm {
    /// A vTPM with a fresh attestation key and PCRs holding their index in the first byte.
    pub fn generate() -> Result<SimulatedVtpm, Error> {
        let ak = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| sim_err("RSA keygen"))?;
        let mut pcrs = [[0u8; 32]; crate::tpm::PCR_COUNT];
        for (i, p) in pcrs.iter_mut().enumerate() {
            p[0] = u8::try_from(i).unwrap_or(0);
        }
        Ok(SimulatedVtpm {
            ak,
            pcrs,
            vm: AzureVmConfig::default(),
        })
    }

    /// The attestation key's modulus and exponent (big-endian).
    pub fn ak_public(&self) -> (Vec<u8>, Vec<u8>) {
        let pk = aws_lc_rs::signature::KeyPair::public_key(&self.ak);
        (
            pk.modulus().big_endian_without_leading_zero().to_vec(),
            pk.exponent().big_endian_without_leading_zero().to_vec(),
        )
    }

    /// The HCL report the paravisor produces after `user_data` is written: variable data
    /// carrying this vTPM's key, and an SNP report with `fields` whose REPORT_DATA hashes it.
    pub fn hcl_report(
        &self,
        signer: &SimulatedKey,
        fields: &ReportFields,
        user_data: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let (n, e) = self.ak_public();
        let var_data = azure_var_data(&n, &e, user_data, &self.vm);
        let mut fields = fields.clone();
        fields.report_data = azure_report_data(&var_data);
        let report = signer.sign_report(&fields)?;
        Ok(build_hcl(&report, &var_data))
    }

    /// A quote of the SHA-256 PCRs 0-23 with `qualifying_data`, signed by the attestation key.
    pub fn quote(&self, qualifying_data: &[u8]) -> Result<crate::tpm::Quote, Error> {
        let message = crate::tpm::encode_quote_attest(qualifying_data, &self.pcrs);
        let mut signature = vec![0u8; self.ak.public_modulus_len()];
        self.ak
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                &message,
                &mut signature,
            )
            .map_err(|_| sim_err("RSA signing failed"))?;
        Ok(crate::tpm::Quote {
            message,
            signature,
            pcrs: self.pcrs,
        })
    }
}
