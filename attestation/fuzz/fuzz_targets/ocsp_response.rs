//! An OCSP response as a stapler or the guest agent receives it from a responder over the
//! network: decoding, the signature and delegation checks, matching the CertID, currency.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use attestation::ocsp::status::Subject;
use libfuzzer_sys::fuzz_target;

/// A CA and a certificate it issued (made once).
fn subject() -> &'static Subject {
    static SUBJECT: OnceLock<Subject> = OnceLock::new();
    SUBJECT.get_or_init(|| {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["web.internal".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Subject::new(leaf.der(), ca_cert.der()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(checked) = subject().check(data, now) {
        // Only a response signed by the CA could pass; the fuzzer cannot make one.
        panic!("accepted a response no CA signed: {checked:?}");
    }
});
