//! The KBS evidence decoders (`tee: "snp"`: the `sev` crate's JSON rebuilt into report bytes;
//! `tee: "az-snp-vtpm"` version 2) and the runtime-data binding on arbitrary text.
#![no_main]

use attestation::kbs::{self, HashAlgorithm};
use attestation::protocol::{Evidence, decode_b64};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Evidence::Snp { report, .. }) = kbs::snp_evidence(text) {
        // Whatever is accepted rebuilds into a report that parses.
        let bytes = decode_b64(&report, "report").expect("the decoder wrote base64");
        attestation::AttestationReport::parse(&bytes).expect("an accepted report parses");
    }
    let _ = kbs::az_snp_vtpm_evidence(text);
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        for hash in [HashAlgorithm::Sha384, HashAlgorithm::Sha512] {
            let digest = kbs::runtime_digest("", "nonce", &value, hash)
                .expect("any JSON value canonicalizes");
            let _ = kbs::report_data(&digest);
        }
    }
});
