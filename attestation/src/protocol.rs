//! The broker's native protocol (`/v1`): wire types, the binding input, and HPKE sealing of
//! released secrets. Shared by the broker and the guest agent, so both sides encode the same.
//!
//! Binary fields are standard base64 (RFC 4648 §4, padded). Unknown fields are rejected.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::Error;

/// HPKE `info` of every sealed secret.
pub const HPKE_INFO: &[u8] = b"snp-key-broker/v1 release";
/// Domain string of the associated data of a sealed secret.
const AAD_DOMAIN: &[u8] = b"snp-key-broker/v1 secret\0";

/// Response of `POST /v1/challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeResponse {
    /// The nonce (opaque, base64url); bind it into REPORT_DATA and send it back once.
    pub nonce: String,
    /// When the broker stops accepting it (RFC 3339).
    pub expires_at: String,
}

/// A certificate or CRL sent with the evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateEntry {
    /// `vcek`, `vlek`, `ask`, `asvk`, `ark` or `crl`.
    pub kind: String,
    /// DER, base64.
    pub der: String,
}

/// The evidence of an attestation request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum Evidence {
    /// A bare SEV-SNP report (`/dev/sev-guest`, configfs-tsm, simulator).
    #[serde(rename = "snp")]
    Snp {
        /// The raw 1184-byte report, base64.
        report: String,
        /// The guest's certificate table entries (VCEK/VLEK, ASK/ASVK, ARK), if it has them.
        #[serde(default)]
        certificates: Vec<CertificateEntry>,
    },
    /// Azure confidential VM evidence: the HCL report from the vTPM and a TPM quote.
    #[serde(rename = "az-snp-vtpm")]
    AzSnpVtpm {
        /// The HCL report read from vTPM NV index 0x01400001, base64 (trailing NV padding
        /// allowed).
        hcl_report: String,
        /// A quote by the vTPM attestation key over the SHA-256 PCRs 0-23, with the binding
        /// as qualifying data.
        quote: TpmQuote,
        /// VCEK and chain from Azure's THIM endpoint, if the guest could reach it.
        #[serde(default)]
        certificates: Vec<CertificateEntry>,
    },
}

/// A TPM quote on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmQuote {
    /// The marshalled TPMS_ATTEST, exactly as the TPM signed it, base64.
    pub message: String,
    /// The RSASSA-PKCS1-v1_5 SHA-256 signature, base64.
    pub signature: String,
    /// The SHA-256 PCR values 0-23, in order, hex.
    pub pcrs: Vec<String>,
}

impl TpmQuote {
    /// The wire form of a quote.
    pub fn encode(quote: &crate::tpm::Quote) -> TpmQuote {
        TpmQuote {
            message: encode_b64(&quote.message),
            signature: encode_b64(&quote.signature),
            pcrs: quote.pcrs.iter().map(hex::encode).collect(),
        }
    }

    /// Decodes the wire form, with bounds on every field.
    pub fn decode(&self) -> Result<crate::tpm::Quote, Error> {
        let bad = |detail: String| Error::QuoteMalformed { detail };
        if self.message.len() > crate::tpm::MAX_ATTEST_LEN * 2 || self.signature.len() > 1024 {
            return Err(bad("quote message or signature too long".into()));
        }
        let message = decode_b64(&self.message, "evidence.quote.message")?;
        let signature = decode_b64(&self.signature, "evidence.quote.signature")?;
        if self.pcrs.len() != crate::tpm::PCR_COUNT {
            return Err(bad(format!(
                "{} PCR values, expected {}",
                self.pcrs.len(),
                crate::tpm::PCR_COUNT
            )));
        }
        let mut pcrs = [[0u8; 32]; crate::tpm::PCR_COUNT];
        for (i, (slot, text)) in pcrs.iter_mut().zip(&self.pcrs).enumerate() {
            let bytes = hex::decode(text)
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| bad(format!("PCR {i} is not 32 bytes of hex")))?;
            slot.copy_from_slice(&bytes);
        }
        Ok(crate::tpm::Quote {
            message,
            signature,
            pcrs,
        })
    }
}

/// The HPKE KEM of the guest's ephemeral key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kem {
    /// DHKEM(X25519, HKDF-SHA256), sealed with HKDF-SHA256 and AES-256-GCM (the default).
    #[serde(rename = "x25519-hkdf-sha256")]
    X25519,
    /// DHKEM(P-384, HKDF-SHA384), sealed with HKDF-SHA384 and AES-256-GCM.
    #[serde(rename = "p384-hkdf-sha384")]
    P384,
}

impl Kem {
    /// The RFC 9180 KEM identifier.
    pub fn id(self) -> u16 {
        match self {
            Kem::X25519 => 0x0020,
            Kem::P384 => 0x0011,
        }
    }
    /// The suite a secret sealed to this KEM uses.
    pub fn suite(self) -> Suite {
        match self {
            Kem::X25519 => Suite {
                kem: Kem::X25519,
                kdf: "hkdf-sha256".into(),
                aead: "aes-256-gcm".into(),
            },
            Kem::P384 => Suite {
                kem: Kem::P384,
                kdf: "hkdf-sha384".into(),
                aead: "aes-256-gcm".into(),
            },
        }
    }
}

/// The guest's ephemeral public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Which KEM.
    pub kem: Kem,
    /// The encoded public key (32 bytes for X25519, 97-byte uncompressed point for P-384),
    /// base64.
    pub key: String,
}

impl PublicKey {
    /// The bytes bound into REPORT_DATA with the nonce: the KEM id (big-endian) then the key,
    /// so a key cannot be reinterpreted under another KEM.
    pub fn binding_bytes(&self) -> Result<Vec<u8>, Error> {
        let key = decode_b64(&self.key, "public_key.key")?;
        let mut out = self.kem.id().to_be_bytes().to_vec();
        out.extend_from_slice(&key);
        Ok(out)
    }
}

/// Request of `POST /v1/attest`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The nonce from `/v1/challenge`.
    pub nonce: String,
    /// The evidence.
    pub evidence: Evidence,
    /// The ephemeral key the secrets are sealed to.
    pub public_key: PublicKey,
    /// Names of the secrets wanted. All are released, or none.
    pub secrets: Vec<String>,
    /// Certificates wanted from the broker's CA, one per request (docs/pki.md). With any,
    /// REPORT_DATA is the version-2 binding ([`crate::binding::report_data_v2`]) of the
    /// requests' public keys too. All are issued with the secrets, or nothing is released.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateRequest>,
}

/// At most this many certificate requests in one attest request.
pub const MAX_CERTIFICATE_REQUESTS: usize = 8;

/// Largest certificate signing request (DER bytes).
pub const MAX_CSR_BYTES: usize = 8192;

/// A certificate wanted from the broker's CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// The policy's certificate profile it asks under.
    pub profile: String,
    /// A PKCS#10 certificate signing request (DER, base64), signed by the key to certify.
    /// The names it asks for are its subjectAltName extension request's.
    pub csr: String,
}

/// A certificate the broker's CA issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCertificate {
    /// The profile it was issued under.
    pub profile: String,
    /// Its serial number (hex).
    pub serial: String,
    /// The certificate (PEM).
    pub certificate: String,
    /// The CA certificate that issued it and those above it, the root last (PEM).
    pub chain: Vec<String>,
    /// The end of its validity (seconds since the epoch).
    pub not_after: i64,
}

/// Request of `POST /v1/token`: an attestation whose result is a signed token, with nothing
/// released.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The nonce from `/v1/challenge`.
    pub nonce: String,
    /// The evidence.
    pub evidence: Evidence,
    /// The guest's key bound with the nonce (as in [`AttestRequest`]); the token names it.
    pub public_key: PublicKey,
}

/// Response of `POST /v1/token`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    /// The attestation result: an EAR JWT signed by the broker (see `docs/kbs.md`).
    pub token: String,
    /// The claims it was appraised on.
    pub claims: serde_json::Value,
}

/// The HPKE suite of a sealed secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// KEM.
    pub kem: Kem,
    /// KDF.
    pub kdf: String,
    /// AEAD.
    pub aead: String,
}

/// One released secret, sealed to the guest's ephemeral key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSecret {
    /// Secret name.
    pub name: String,
    /// Secret version (bound as associated data).
    pub version: u64,
    /// `tls-key`, `data-key` or `opaque`.
    pub kind: String,
    /// The HPKE suite.
    pub suite: Suite,
    /// The encapsulated key, base64.
    pub enc: String,
    /// The ciphertext with its tag, base64.
    pub ciphertext: String,
}

/// Response of `POST /v1/attest`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestResponse {
    /// The claims the decision was made on.
    pub claims: serde_json::Value,
    /// The released secrets.
    pub secrets: Vec<SealedSecret>,
    /// The issued certificates, in request order (absent when none was asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<IssuedCertificate>,
}

/// Decodes a base64 field, naming it on error.
pub fn decode_b64(s: &str, field: &str) -> Result<Vec<u8>, Error> {
    B64.decode(s).map_err(|_| Error::InvalidInput {
        detail: format!("{field} is not valid base64"),
    })
}

/// Encodes bytes as standard base64.
pub fn encode_b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The associated data of a sealed secret: its name and version.
pub fn secret_aad(name: &str, version: u64) -> Vec<u8> {
    let mut aad = AAD_DOMAIN.to_vec();
    aad.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn hpke_err(detail: impl std::fmt::Display) -> Error {
    Error::InvalidInput {
        detail: format!("HPKE: {detail}"),
    }
}

/// Seals `plaintext` to `recipient` (HPKE base mode), binding `name` and `version`.
pub fn seal(
    recipient: &PublicKey,
    name: &str,
    version: u64,
    kind: &str,
    plaintext: &[u8],
) -> Result<SealedSecret, Error> {
    let key = decode_b64(&recipient.key, "public_key.key")?;
    let aad = secret_aad(name, version);
    let (enc, ct) = match recipient.kem {
        Kem::X25519 => {
            seal_with::<hpke::kdf::HkdfSha256, hpke::kem::X25519HkdfSha256>(&key, &aad, plaintext)?
        }
        Kem::P384 => {
            seal_with::<hpke::kdf::HkdfSha384, hpke::kem::DhP384HkdfSha384>(&key, &aad, plaintext)?
        }
    };
    Ok(SealedSecret {
        name: name.to_string(),
        version,
        kind: kind.to_string(),
        suite: recipient.kem.suite(),
        enc: encode_b64(&enc),
        ciphertext: encode_b64(&ct),
    })
}

fn seal_with<Kdf: hpke::kdf::Kdf, K: hpke::Kem>(
    key: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pk = K::PublicKey::from_bytes(key).map_err(|_| Error::InvalidInput {
        detail: "public_key.key is not a valid key for its KEM".into(),
    })?;
    let (enc, ct) = hpke::single_shot_seal::<hpke::aead::AesGcm256, Kdf, K>(
        &OpModeS::Base,
        &pk,
        HPKE_INFO,
        plaintext,
        aad,
    )
    .map_err(hpke_err)?;
    Ok((enc.to_bytes().to_vec(), ct))
}

/// An ephemeral key pair held by the guest for one attestation.
pub struct EphemeralKey {
    kem: Kem,
    private: Zeroizing<Vec<u8>>,
    public: Vec<u8>,
}

impl std::fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralKey")
            .field("kem", &self.kem)
            .finish_non_exhaustive()
    }
}

impl EphemeralKey {
    /// Generates a key pair for `kem`.
    pub fn generate(kem: Kem) -> EphemeralKey {
        let (private, public) = match kem {
            Kem::X25519 => {
                let (sk, pk) = <hpke::kem::X25519HkdfSha256 as hpke::Kem>::gen_keypair();
                (sk.to_bytes().to_vec(), pk.to_bytes().to_vec())
            }
            Kem::P384 => {
                let (sk, pk) = <hpke::kem::DhP384HkdfSha384 as hpke::Kem>::gen_keypair();
                (sk.to_bytes().to_vec(), pk.to_bytes().to_vec())
            }
        };
        EphemeralKey {
            kem,
            private: Zeroizing::new(private),
            public,
        }
    }

    /// The public half, as sent in the request.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kem: self.kem,
            key: encode_b64(&self.public),
        }
    }

    /// Opens a sealed secret, checking that it is bound to its name and version.
    pub fn open(&self, sealed: &SealedSecret) -> Result<Zeroizing<Vec<u8>>, Error> {
        if sealed.suite != self.kem.suite() {
            return Err(hpke_err("suite does not match the ephemeral key"));
        }
        let enc = decode_b64(&sealed.enc, "enc")?;
        let ct = decode_b64(&sealed.ciphertext, "ciphertext")?;
        let aad = secret_aad(&sealed.name, sealed.version);
        let pt = match self.kem {
            Kem::X25519 => open_with::<hpke::kdf::HkdfSha256, hpke::kem::X25519HkdfSha256>(
                &self.private,
                &enc,
                &ct,
                &aad,
            )?,
            Kem::P384 => open_with::<hpke::kdf::HkdfSha384, hpke::kem::DhP384HkdfSha384>(
                &self.private,
                &enc,
                &ct,
                &aad,
            )?,
        };
        Ok(Zeroizing::new(pt))
    }
}

fn open_with<Kdf: hpke::kdf::Kdf, K: hpke::Kem>(
    sk: &[u8],
    enc: &[u8],
    ct: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, Error> {
    let sk = K::PrivateKey::from_bytes(sk).map_err(hpke_err)?;
    let enc = K::EncappedKey::from_bytes(enc).map_err(hpke_err)?;
    hpke::single_shot_open::<hpke::aead::AesGcm256, Kdf, K>(
        &OpModeR::Base,
        &sk,
        &enc,
        HPKE_INFO,
        ct,
        aad,
    )
    .map_err(hpke_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_both_suites_and_refuse_tampering() {
        for kem in [Kem::X25519, Kem::P384] {
            let key = EphemeralKey::generate(kem);
            let sealed = seal(&key.public_key(), "web-tls", 3, "tls-key", b"secret bytes").unwrap();
            assert_eq!(&key.open(&sealed).unwrap()[..], b"secret bytes");

            // Name and version are bound.
            let mut renamed = sealed.clone();
            renamed.name = "other".into();
            assert!(key.open(&renamed).is_err());
            let mut older = sealed.clone();
            older.version = 2;
            assert!(key.open(&older).is_err());
            // Another key cannot open it.
            assert!(EphemeralKey::generate(kem).open(&sealed).is_err());
            // Flipped ciphertext.
            let mut ct = decode_b64(&sealed.ciphertext, "ct").unwrap();
            ct[0] ^= 1;
            let mut flipped = sealed.clone();
            flipped.ciphertext = encode_b64(&ct);
            assert!(key.open(&flipped).is_err());
        }
    }

    #[test]
    fn wire_format_is_strict() {
        let key = EphemeralKey::generate(Kem::X25519);
        let req = AttestRequest {
            nonce: "n".into(),
            evidence: Evidence::Snp {
                report: encode_b64(&[0; 4]),
                certificates: vec![],
            },
            public_key: key.public_key(),
            secrets: vec!["a".into()],
            certificates: Vec::new(),
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["evidence"]["kind"], "snp");
        assert_eq!(json["public_key"]["kem"], "x25519-hkdf-sha256");
        let back: AttestRequest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, req);
        let mut extra = json.clone();
        extra["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<AttestRequest>(extra).is_err());
        let mut az = json;
        let pcrs = vec!["00".repeat(32); 24];
        az["evidence"] = serde_json::json!({"kind": "az-snp-vtpm", "hcl_report": "AA==",
            "quote": {"message": "AA==", "signature": "AA==", "pcrs": pcrs}});
        let parsed: AttestRequest = serde_json::from_value(az.clone()).unwrap();
        let Evidence::AzSnpVtpm { quote, .. } = &parsed.evidence else {
            panic!("not az-snp-vtpm")
        };
        assert_eq!(quote.decode().unwrap().pcrs, [[0u8; 32]; 24]);
        let mut short = quote.clone();
        short.pcrs.pop();
        assert!(matches!(short.decode(), Err(Error::QuoteMalformed { .. })));
        az["evidence"]["quote"]["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<AttestRequest>(az).is_err());
    }

    #[test]
    fn binding_bytes_carry_the_kem() {
        let key = EphemeralKey::generate(Kem::P384);
        let pk = key.public_key();
        let b = pk.binding_bytes().unwrap();
        assert_eq!(&b[..2], &[0x00, 0x11]);
        assert_eq!(b.len(), 2 + 97);
        assert!(
            seal(
                &PublicKey {
                    kem: Kem::X25519,
                    key: pk.key
                },
                "n",
                1,
                "opaque",
                b"x"
            )
            .is_err()
        );
    }
}
