//! The relying side of OCSP: ask about one certificate (a SHA-1 CertID, no nonce, the form
//! RFC 5019 responders and every stapling server use) and check the answer — signed by the
//! certificate's issuer or by a responder the issuer delegated (`id-kp-OCSPSigning`, issued
//! directly by it), about this certificate, and current at the time given. Times are
//! parameters: nothing here reads the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use der07::asn1::{Null, ObjectIdentifier, OctetString};
use der07::{Decode, Encode};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_cert02::Certificate;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspRequest, OcspResponse, OcspResponseStatus, Request,
    TbsRequest, Version,
};

use crate::Error;

const OID_BASIC: &str = "1.3.6.1.5.5.7.48.1.1";
const OID_AIA: &str = "1.3.6.1.5.5.7.1.1";
const OID_AD_OCSP: &str = "1.3.6.1.5.5.7.48.1";
/// id-kp-OCSPSigning (1.3.6.1.5.5.7.3.9), the DER contents of the OID.
const EKU_OCSP_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x09];
/// The largest response accepted (DER bytes): what a fetcher reads at most.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How far a responder's clock may run ahead of ours.
const CLOCK_SKEW_SECS: u64 = 300;

/// The status a response gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateStatus {
    /// Not revoked.
    Good,
    /// Revoked at (seconds since the epoch), with the RFC 5280 reason code if given.
    Revoked {
        /// When.
        at: u64,
        /// The reason code.
        reason: Option<u8>,
    },
    /// The responder does not know the certificate.
    Unknown,
}

/// A response that passed every check, and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The certificate's status.
    pub status: CertificateStatus,
    /// Its thisUpdate (seconds since the epoch).
    pub this_update: u64,
    /// Its nextUpdate: the response must not be relied on (or stapled) after it.
    pub next_update: u64,
}

impl Checked {
    /// When a stapler should fetch a fresh response: half way through the validity.
    pub fn refresh_at(&self) -> u64 {
        self.this_update + self.next_update.saturating_sub(self.this_update) / 2
    }
}

/// A certificate and the CA certificate that issued it (checked): what an OCSP request asks
/// about and a response must answer for.
#[derive(Clone, Debug)]
pub struct Subject {
    id: CertId,
    issuer: Vec<u8>,
    /// The issuer's name and key hashes, to match the CertIDs of a response.
    hashes: super::IssuerHashes,
    serial: String,
}

fn malformed(detail: impl std::fmt::Display) -> Error {
    Error::OcspMalformed {
        detail: detail.to_string(),
    }
}

fn invalid(detail: impl std::fmt::Display) -> Error {
    Error::InvalidInput {
        detail: detail.to_string(),
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The signature algorithms (webpki's) an X.509 signature algorithm OID may use, to be tried
/// in order against the signer's key.
fn algorithms(
    oid: &ObjectIdentifier,
) -> Vec<&'static dyn rustls_pki_types::SignatureVerificationAlgorithm> {
    use webpki::aws_lc_rs as alg;
    match oid.to_string().as_str() {
        "1.2.840.10045.4.3.2" => vec![alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
        "1.2.840.10045.4.3.3" => vec![alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
        "1.2.840.10045.4.3.4" => vec![alg::ECDSA_P521_SHA512, alg::ECDSA_P384_SHA512],
        "1.2.840.113549.1.1.11" => vec![alg::RSA_PKCS1_2048_8192_SHA256],
        "1.2.840.113549.1.1.12" => vec![alg::RSA_PKCS1_2048_8192_SHA384],
        "1.2.840.113549.1.1.13" => vec![alg::RSA_PKCS1_2048_8192_SHA512],
        "1.3.101.112" => vec![alg::ED25519],
        _ => Vec::new(),
    }
}

/// Verifies `signature` over `message` with the key of `signer` (DER certificate).
fn verify_signature(
    signer: &[u8],
    algorithm: &ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let der = CertificateDer::from(signer);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("signer: {e}"))?;
    let candidates = algorithms(algorithm);
    if candidates.is_empty() {
        return Err(format!("unsupported signature algorithm {algorithm}"));
    }
    if candidates
        .iter()
        .any(|alg| cert.verify_signature(*alg, message, signature).is_ok())
    {
        Ok(())
    } else {
        Err("the signature does not verify".into())
    }
}

/// The OCSP responder URL in a certificate's AuthorityInfoAccess extension (the first
/// `http`/`https` one), if it names one.
pub fn responder_url(cert_der: &[u8]) -> Result<Option<String>, Error> {
    use x509_cert02::ext::pkix::AuthorityInfoAccessSyntax;
    use x509_cert02::ext::pkix::name::GeneralName;
    let cert = Certificate::from_der(cert_der).map_err(invalid)?;
    let Some(ext) = cert
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id.to_string() == OID_AIA)
    else {
        return Ok(None);
    };
    let aia = AuthorityInfoAccessSyntax::from_der(ext.extn_value.as_bytes())
        .map_err(|e| invalid(format!("AuthorityInfoAccess: {e}")))?;
    Ok(aia.0.iter().find_map(|ad| match &ad.access_location {
        GeneralName::UniformResourceIdentifier(uri)
            if ad.access_method.to_string() == OID_AD_OCSP
                && (uri.as_str().starts_with("http://")
                    || uri.as_str().starts_with("https://")) =>
        {
            Some(uri.to_string())
        }
        _ => None,
    }))
}

/// Of `candidates` (DER certificates), the one that issued `cert_der`: its subject is the
/// certificate's issuer and its key verifies the certificate's signature.
pub fn find_issuer<'a>(cert_der: &[u8], candidates: &'a [Vec<u8>]) -> Option<&'a [u8]> {
    candidates
        .iter()
        .find(|c| issued_by(cert_der, c).is_ok())
        .map(Vec::as_slice)
}

fn issued_by(cert_der: &[u8], issuer_der: &[u8]) -> Result<(), Error> {
    let cert = Certificate::from_der(cert_der).map_err(invalid)?;
    let issuer = Certificate::from_der(issuer_der).map_err(invalid)?;
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(invalid(
            "the issuer's subject is not the certificate's issuer",
        ));
    }
    let tbs = cert.tbs_certificate.to_der().map_err(invalid)?;
    verify_signature(
        issuer_der,
        &cert.signature_algorithm.oid,
        &tbs,
        cert.signature.raw_bytes(),
    )
    .map_err(|e| invalid(format!("not issued by the issuer given: {e}")))
}

impl Subject {
    /// `cert_der` issued by `issuer_der` (checked: names and signature).
    pub fn new(cert_der: &[u8], issuer_der: &[u8]) -> Result<Subject, Error> {
        issued_by(cert_der, issuer_der)?;
        let cert = Certificate::from_der(cert_der).map_err(invalid)?;
        Subject::with_serial(issuer_der, cert.tbs_certificate.serial_number)
    }

    /// A certificate known only by its serial (big-endian bytes, as encoded in it) and its
    /// issuer, as `openssl ocsp -serial` asks; the issuer is not checked against a
    /// certificate.
    pub fn for_serial(issuer_der: &[u8], serial: &[u8]) -> Result<Subject, Error> {
        let serial = x509_cert02::serial_number::SerialNumber::new(serial).map_err(invalid)?;
        Subject::with_serial(issuer_der, serial)
    }

    /// The SHA-1 CertID of `serial_number` under the CA certificate `issuer_der`.
    fn with_serial(
        issuer_der: &[u8],
        serial_number: x509_cert02::serial_number::SerialNumber,
    ) -> Result<Subject, Error> {
        let hashes = super::IssuerHashes::of(issuer_der).map_err(invalid)?;
        let id = CertId {
            hash_algorithm: x509_cert02::spki::AlgorithmIdentifierOwned {
                oid: super::OID_SHA1.parse().map_err(invalid)?,
                parameters: Some(Null.into()),
            },
            issuer_name_hash: OctetString::new(hashes.sha1.0.to_vec()).map_err(invalid)?,
            issuer_key_hash: OctetString::new(hashes.sha1.1.to_vec()).map_err(invalid)?,
            serial_number,
        };
        Ok(Subject {
            serial: hex::encode(id.serial_number.as_bytes()),
            id,
            issuer: issuer_der.to_vec(),
            hashes,
        })
    }

    /// The certificate's serial (hex, as encoded).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The OCSP request (DER) for this certificate.
    pub fn request(&self) -> Result<Vec<u8>, Error> {
        OcspRequest {
            tbs_request: TbsRequest {
                version: Version::V1,
                requestor_name: None,
                request_list: vec![Request {
                    req_cert: self.id.clone(),
                    single_request_extensions: None,
                }],
                request_extensions: None,
            },
            optional_signature: None,
        }
        .to_der()
        .map_err(invalid)
    }

    /// Checks `response` (DER) answers for this certificate, is signed by its issuer or a
    /// responder the issuer delegated, and is current at `now`.
    pub fn check(&self, response: &[u8], now: SystemTime) -> Result<Checked, Error> {
        if response.len() > MAX_RESPONSE_BYTES {
            return Err(malformed(format!("larger than {MAX_RESPONSE_BYTES} bytes")));
        }
        let response = OcspResponse::from_der(response).map_err(malformed)?;
        if response.response_status != OcspResponseStatus::Successful {
            return Err(Error::OcspNotSuccessful {
                status: format!("{:?}", response.response_status),
            });
        }
        let bytes = response
            .response_bytes
            .ok_or_else(|| malformed("successful without a response"))?;
        if bytes.response_type.to_string() != OID_BASIC {
            return Err(malformed(format!(
                "response type {} is not id-pkix-ocsp-basic",
                bytes.response_type
            )));
        }
        let basic = BasicOcspResponse::from_der(bytes.response.as_bytes()).map_err(malformed)?;
        self.check_signature(&basic, now)?;
        let single = basic
            .tbs_response_data
            .responses
            .iter()
            .find(|r| self.answers(&r.cert_id))
            .ok_or_else(|| Error::OcspNoAnswer {
                serial: self.serial.clone(),
            })?;
        let this_update = secs(single.this_update.0.to_system_time());
        let next_update = single.next_update.map(|t| secs(t.0.to_system_time()));
        let now = secs(now);
        let current = this_update <= now + CLOCK_SKEW_SECS && next_update.is_some_and(|n| now < n);
        let (true, Some(next_update)) = (current, next_update) else {
            return Err(Error::OcspNotCurrent {
                this_update,
                next_update,
                now,
            });
        };
        let status = match &single.cert_status {
            CertStatus::Good(_) => CertificateStatus::Good,
            CertStatus::Unknown(_) => CertificateStatus::Unknown,
            CertStatus::Revoked(info) => CertificateStatus::Revoked {
                at: secs(info.revocation_time.0.to_system_time()),
                reason: info.revocation_reason.map(|r| r as u8),
            },
        };
        Ok(Checked {
            status,
            this_update,
            next_update,
        })
    }

    /// A CertID in a response names this certificate: same serial and issuer, by SHA-1 or
    /// SHA-256.
    fn answers(&self, id: &CertId) -> bool {
        id.serial_number == self.id.serial_number && self.hashes.matches(id)
    }

    /// The issuer signed the response, or a certificate in it that the issuer issued for OCSP
    /// signing (valid at `now`) did.
    fn check_signature(&self, basic: &BasicOcspResponse, now: SystemTime) -> Result<(), Error> {
        let tbs = basic.tbs_response_data.to_der().map_err(malformed)?;
        let signature = basic
            .signature
            .as_bytes()
            .ok_or_else(|| malformed("signature is not whole bytes"))?;
        let alg = &basic.signature_algorithm.oid;
        if verify_signature(&self.issuer, alg, &tbs, signature).is_ok() {
            return Ok(());
        }
        let issuer = CertificateDer::from(self.issuer.as_slice());
        let anchor =
            webpki::anchor_from_trusted_cert(&issuer).map_err(|e| Error::OcspSignature {
                detail: format!("issuer: {e}"),
            })?;
        let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let mut last = "neither the issuer nor a certificate in the response signed it".to_string();
        for responder in basic.certs.iter().flatten() {
            let der = responder.to_der().map_err(malformed)?;
            let cert_der = CertificateDer::from(der.as_slice());
            let Ok(cert) = webpki::EndEntityCert::try_from(&cert_der) else {
                continue;
            };
            if let Err(e) = cert.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                at,
                webpki::KeyUsage::required(EKU_OCSP_SIGNING),
                None,
                None,
            ) {
                last = format!("the responder certificate is not the issuer's OCSP signer: {e}");
                continue;
            }
            match verify_signature(&der, alg, &tbs, signature) {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("responder: {e}"),
            }
        }
        Err(Error::OcspSignature { detail: last })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der07::asn1::{BitString, GeneralizedTime};
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use std::time::Duration;
    use x509_ocsp::{OcspGeneralizedTime, ResponderId, ResponseData, RevokedInfo, SingleResponse};

    const T0: u64 = 1_800_000_000;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn ca(name: &str) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = time::OffsetDateTime::from(at(T0 - 86_400));
        params.not_after = time::OffsetDateTime::from(at(T0 + 86_400));
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), Issuer::new(params, key))
    }

    fn leaf(
        issuer: &Issuer<'_, KeyPair>,
        serial: u64,
        eku: Vec<ExtendedKeyUsagePurpose>,
        ocsp_url: Option<&str>,
    ) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["leaf.example".to_string()]).unwrap();
        params.serial_number = Some(serial.into());
        params.extended_key_usages = eku;
        params.not_before = time::OffsetDateTime::from(at(T0 - 3600));
        params.not_after = time::OffsetDateTime::from(at(T0 + 3600));
        if let Some(url) = ocsp_url {
            // AuthorityInfoAccess with one id-ad-ocsp URI.
            let uri = url.as_bytes();
            let mut ad = vec![
                0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x86,
            ];
            ad.push(u8::try_from(uri.len()).unwrap());
            ad.extend_from_slice(uri);
            let mut seq = vec![0x30, u8::try_from(ad.len()).unwrap()];
            seq.extend(ad);
            let mut outer = vec![0x30, u8::try_from(seq.len()).unwrap()];
            outer.extend(seq);
            params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                outer,
            )];
        }
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.der().to_vec(), key)
    }

    /// A response about `id`, signed by `signer` (with `certs` attached).
    fn respond(
        id: &CertId,
        status: CertStatus,
        this_update: u64,
        next_update: Option<u64>,
        signer: &KeyPair,
        certs: Vec<Vec<u8>>,
    ) -> Vec<u8> {
        let t = |s: u64| {
            OcspGeneralizedTime(
                GeneralizedTime::from_unix_duration(Duration::from_secs(s)).unwrap(),
            )
        };
        let tbs = ResponseData {
            version: Version::V1,
            responder_id: ResponderId::ByKey(OctetString::new(vec![1; 20]).unwrap()),
            produced_at: t(this_update),
            responses: vec![SingleResponse {
                cert_id: id.clone(),
                cert_status: status,
                this_update: t(this_update),
                next_update: next_update.map(t),
                single_extensions: None,
            }],
            response_extensions: None,
        };
        let signature = rcgen::SigningKey::sign(signer, &tbs.to_der().unwrap()).unwrap();
        let basic = BasicOcspResponse {
            tbs_response_data: tbs,
            signature_algorithm: x509_cert02::spki::AlgorithmIdentifierOwned {
                oid: "1.2.840.10045.4.3.2".parse().unwrap(),
                parameters: None,
            },
            signature: BitString::from_bytes(&signature).unwrap(),
            certs: Some(
                certs
                    .iter()
                    .map(|c| Certificate::from_der(c).unwrap())
                    .collect(),
            ),
        };
        OcspResponse::successful(basic).unwrap().to_der().unwrap()
    }

    struct Fixture {
        ca: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
        subject: Subject,
    }

    fn fixture() -> Fixture {
        let (ca, issuer) = ca("Test CA");
        let (cert, _) = leaf(&issuer, 0x1234, vec![], Some("https://ca.example/ocsp"));
        let subject = Subject::new(&cert, &ca).unwrap();
        Fixture {
            ca,
            issuer,
            subject,
        }
    }

    fn good(f: &Fixture, signer: &KeyPair, certs: Vec<Vec<u8>>) -> Vec<u8> {
        respond(
            &f.subject.id,
            CertStatus::good(),
            T0,
            Some(T0 + 3600),
            signer,
            certs,
        )
    }

    #[test]
    fn a_response_signed_by_the_issuer_is_checked() {
        let f = fixture();
        let response = good(&f, f.issuer.key(), vec![]);
        let checked = f.subject.check(&response, at(T0 + 10)).unwrap();
        assert_eq!(checked.status, CertificateStatus::Good);
        assert_eq!((checked.this_update, checked.next_update), (T0, T0 + 3600));
        assert_eq!(checked.refresh_at(), T0 + 1800);
        assert_eq!(f.subject.serial(), "1234");
        let by_serial = Subject::for_serial(&f.ca, &[0x12, 0x34]).unwrap();
        assert_eq!(by_serial.request().unwrap(), f.subject.request().unwrap());
        // The request asks about this certificate, as a responder parses it.
        let query = super::super::parse(&f.subject.request().unwrap()).unwrap();
        assert_eq!(query.serials(), vec!["1234".to_string()]);
        let hashes = super::super::IssuerHashes::of(&f.ca).unwrap();
        assert_eq!(query.issuers(&[hashes]), vec![Some(0)]);
    }

    #[test]
    fn a_delegated_responder_must_be_the_issuers_ocsp_signer() {
        let f = fixture();
        let (responder, key) = leaf(
            &f.issuer,
            7,
            vec![ExtendedKeyUsagePurpose::OcspSigning],
            None,
        );
        let checked = f
            .subject
            .check(&good(&f, &key, vec![responder]), at(T0 + 10))
            .unwrap();
        assert_eq!(checked.status, CertificateStatus::Good);

        // Twin: the same CA's certificate without id-kp-OCSPSigning.
        let (server, key) = leaf(
            &f.issuer,
            8,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            None,
        );
        assert!(matches!(
            f.subject.check(&good(&f, &key, vec![server]), at(T0 + 10)),
            Err(Error::OcspSignature { .. })
        ));
        // Twin: an OCSP signer of another CA.
        let (_, other) = ca("Other CA");
        let (foreign, key) = leaf(&other, 9, vec![ExtendedKeyUsagePurpose::OcspSigning], None);
        assert!(matches!(
            f.subject.check(&good(&f, &key, vec![foreign]), at(T0 + 10)),
            Err(Error::OcspSignature { .. })
        ));
        // Twin: the issuer's OCSP signer, expired.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
        params.not_before = time::OffsetDateTime::from(at(T0 - 7200));
        params.not_after = time::OffsetDateTime::from(at(T0 - 3600));
        let expired = params.signed_by(&key, &f.issuer).unwrap().der().to_vec();
        assert!(matches!(
            f.subject.check(&good(&f, &key, vec![expired]), at(T0 + 10)),
            Err(Error::OcspSignature { .. })
        ));
        // Twin: a key with no certificate at all.
        let stranger = KeyPair::generate().unwrap();
        assert!(matches!(
            f.subject.check(&good(&f, &stranger, vec![]), at(T0 + 10)),
            Err(Error::OcspSignature { .. })
        ));
    }

    #[test]
    fn a_changed_byte_breaks_the_signature() {
        let f = fixture();
        let response = good(&f, f.issuer.key(), vec![]);
        // A byte of the signed data: the responder ID (twenty 0x01 bytes in this fixture),
        // changed without breaking the encoding.
        let at_id = response
            .windows(20)
            .position(|w| w.iter().all(|b| *b == 1))
            .unwrap();
        let mut tampered = response.clone();
        tampered[at_id + 3] = 2;
        assert!(matches!(
            f.subject.check(&tampered, at(T0 + 10)),
            Err(Error::OcspSignature { .. })
        ));
        // The last byte is in the signature itself.
        let mut tampered = response;
        let end = tampered.len() - 1;
        tampered[end] ^= 1;
        assert!(matches!(
            f.subject.check(&tampered, at(T0 + 10)),
            Err(Error::OcspSignature { .. } | Error::OcspMalformed { .. })
        ));
    }

    #[test]
    fn the_serial_alone_is_not_enough_the_issuer_must_match() {
        let f = fixture();
        // The same serial under another CA's name and key, signed by our issuer.
        let (other, _) = ca("Other CA");
        let foreign = Subject::for_serial(&other, &[0x12, 0x34]).unwrap();
        let response = respond(
            &foreign.id,
            CertStatus::good(),
            T0,
            Some(T0 + 3600),
            f.issuer.key(),
            vec![],
        );
        assert!(matches!(
            f.subject.check(&response, at(T0 + 10)),
            Err(Error::OcspNoAnswer { .. })
        ));
    }

    #[test]
    fn a_response_about_another_certificate_says_nothing() {
        let f = fixture();
        let mut other = f.subject.id.clone();
        other.serial_number = 0x9999u64.into();
        let response = respond(
            &other,
            CertStatus::good(),
            T0,
            Some(T0 + 3600),
            f.issuer.key(),
            vec![],
        );
        assert_eq!(
            f.subject.check(&response, at(T0 + 10)).unwrap_err().check(),
            "ocsp_no_answer"
        );
    }

    #[test]
    fn only_current_responses_are_accepted() {
        let f = fixture();
        let response = good(&f, f.issuer.key(), vec![]);
        assert!(matches!(
            f.subject.check(&response, at(T0 + 3600)),
            Err(Error::OcspNotCurrent { next_update: Some(n), .. }) if n == T0 + 3600
        ));
        assert!(matches!(
            f.subject.check(&response, at(T0 - CLOCK_SKEW_SECS - 1)),
            Err(Error::OcspNotCurrent { .. })
        ));
        assert!(f.subject.check(&response, at(T0 - 60)).is_ok());
        let open_ended = respond(
            &f.subject.id,
            CertStatus::good(),
            T0,
            None,
            f.issuer.key(),
            vec![],
        );
        assert!(matches!(
            f.subject.check(&open_ended, at(T0 + 10)),
            Err(Error::OcspNotCurrent {
                next_update: None,
                ..
            })
        ));
    }

    #[test]
    fn revoked_and_unknown_are_statuses_not_errors() {
        let f = fixture();
        let revoked = respond(
            &f.subject.id,
            CertStatus::Revoked(RevokedInfo {
                revocation_time: OcspGeneralizedTime(
                    GeneralizedTime::from_unix_duration(Duration::from_secs(T0 - 5)).unwrap(),
                ),
                revocation_reason: Some(x509_cert02::ext::pkix::crl::CrlReason::KeyCompromise),
            }),
            T0,
            Some(T0 + 3600),
            f.issuer.key(),
            vec![],
        );
        assert_eq!(
            f.subject.check(&revoked, at(T0 + 1)).unwrap().status,
            CertificateStatus::Revoked {
                at: T0 - 5,
                reason: Some(1)
            }
        );
        let unknown = respond(
            &f.subject.id,
            CertStatus::Unknown(Null),
            T0,
            Some(T0 + 3600),
            f.issuer.key(),
            vec![],
        );
        assert_eq!(
            f.subject.check(&unknown, at(T0 + 1)).unwrap().status,
            CertificateStatus::Unknown
        );
    }

    #[test]
    fn refusals_and_garbage() {
        let f = fixture();
        let unauthorized = OcspResponse {
            response_status: OcspResponseStatus::Unauthorized,
            response_bytes: None,
        }
        .to_der()
        .unwrap();
        assert!(matches!(
            f.subject.check(&unauthorized, at(T0)),
            Err(Error::OcspNotSuccessful { status }) if status == "Unauthorized"
        ));
        let oversized = vec![0x30; MAX_RESPONSE_BYTES + 1];
        for garbage in [&[][..], &[0x30, 0x00], b"<html>", &oversized] {
            assert!(matches!(
                f.subject.check(garbage, at(T0)),
                Err(Error::OcspMalformed { .. })
            ));
        }
    }

    #[test]
    fn the_issuer_must_have_issued_the_certificate() {
        let f = fixture();
        let (other, _) = ca("Test CA");
        let (cert, _) = leaf(&f.issuer, 5, vec![], None);
        assert!(matches!(
            Subject::new(&cert, &other),
            Err(Error::InvalidInput { .. })
        ));
        let candidates = vec![other, f.ca.clone()];
        assert_eq!(find_issuer(&cert, &candidates), Some(f.ca.as_slice()));
    }

    #[test]
    fn the_responder_url_comes_from_authority_information_access() {
        let f = fixture();
        let (with, _) = leaf(&f.issuer, 1, vec![], Some("https://ca.example/ocsp"));
        assert_eq!(
            responder_url(&with).unwrap().as_deref(),
            Some("https://ca.example/ocsp")
        );
        let (without, _) = leaf(&f.issuer, 2, vec![], None);
        assert_eq!(responder_url(&without).unwrap(), None);
        assert!(responder_url(b"junk").is_err());
    }
}
