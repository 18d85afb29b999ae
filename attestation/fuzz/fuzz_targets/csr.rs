//! A guest's certificate signing request (PKCS#10 DER) as the broker checks it: parsing,
//! the key type, the signature (proof of possession) and the names asked for.
#![no_main]

use attestation::protocol::{CertificateRequest, encode_b64};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let request = CertificateRequest {
        profile: "web".into(),
        csr: encode_b64(data),
    };
    if let Ok(verified) = attestation::csr::verify_request(&request) {
        // What passes names something, under the profile asked, for a key it carries.
        assert!(!verified.names.is_empty());
        assert!(!verified.spki.is_empty());
        assert_eq!(verified.profile, "web");
    }
});
