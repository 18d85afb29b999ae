//! Chain input: arbitrary bytes as VCEK, as chain (DER or PEM) and as CRL, verified
//! against AMD's pinned roots. Never a panic, and never a chain that verifies.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use attestation::certs::decode_pem_or_der;
use attestation::{Endorsements, TrustAnchors, Verifier};
use libfuzzer_sys::fuzz_target;

const VCEK: &[u8] = include_bytes!("../../tests/data/trustee-milan-v2/vek.der");
/// Every genuine VCEK/VLEK the corpus is seeded with: only these may verify.
const GENUINE: [&[u8]; 7] = [
    include_bytes!("../../tests/data/trustee-milan-v2/vek.der"),
    include_bytes!("../../tests/data/virtee-sev-milan-v2/vek.der"),
    include_bytes!("../../tests/data/go-sev-guest-milan-v2/vek.der"),
    include_bytes!("../../tests/data/trustee-aws-vlek-milan-v3/vek.der"),
    include_bytes!("../../tests/data/trustee-azure-hcl-milan-v2/vek.der"),
    include_bytes!("../../tests/data/trustee-azure-genoa-v3/vek.der"),
    include_bytes!("../../tests/data/trustee-e2e-genoa-v3/vek.der"),
];

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(TrustAnchors::amd().expect("pinned roots load")))
}

fuzz_target!(|data: &[u8]| {
    let at = UNIX_EPOCH + Duration::from_secs(1_756_684_800);
    let v = verifier();
    let as_vek = Endorsements {
        vek: data.to_vec(),
        ..Default::default()
    };
    if v.verify_chain(&as_vek, at).is_ok() {
        assert!(
            GENUINE.contains(&data),
            "a certificate other than a genuine one verified"
        );
    }
    let chain = decode_pem_or_der(data, "fuzz").unwrap_or_default();
    let as_chain = Endorsements {
        vek: VCEK.to_vec(),
        chain,
        crls: vec![data.to_vec()],
    };
    let _ = v.verify_chain(&as_chain, at);
});
