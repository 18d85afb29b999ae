//! The report parser and the full verifier on arbitrary bytes: never a panic, and never a
//! verified report from bytes that are not the genuine one.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use attestation::{AttestationReport, Endorsements, TrustAnchors, VerifiedChain, Verifier};
use libfuzzer_sys::fuzz_target;

const GENUINE: &[u8] = include_bytes!("../../tests/data/trustee-milan-v2/report.bin");
const VCEK: &[u8] = include_bytes!("../../tests/data/trustee-milan-v2/vek.der");

fn setup() -> &'static (Verifier, VerifiedChain) {
    static S: OnceLock<(Verifier, VerifiedChain)> = OnceLock::new();
    S.get_or_init(|| {
        let v = Verifier::new(TrustAnchors::amd().expect("pinned roots load"));
        let e = Endorsements {
            vek: VCEK.to_vec(),
            ..Default::default()
        };
        let chain = v.verify_chain(&e, at()).expect("genuine chain");
        (v, chain)
    })
}

fn at() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_756_684_800)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = AttestationReport::parse(data) {
        let _ = report.signature_fixed();
    }
    let (verifier, chain) = setup();
    if verifier.verify_report(data, chain, at()).is_ok() {
        assert_eq!(
            data, GENUINE,
            "a report other than the genuine one verified"
        );
    }
});
