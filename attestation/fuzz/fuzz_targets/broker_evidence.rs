//! A broker's own evidence as a caller receives it (`GET /v1/broker/evidence`): the JSON
//! decoded and verified against AMD's roots, a policy and a binding; and the certificate
//! key extraction the binding starts from, on arbitrary bytes.
#![no_main]

use std::time::{Duration, SystemTime};

use attestation::broker_evidence::{BrokerEvidence, spki_of, verify};
use attestation::policy::Policy;
use attestation::{Error, TrustAnchors};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spki_of(data);
    let Ok(evidence) = serde_json::from_slice::<BrokerEvidence>(data) else {
        return;
    };
    let (Ok(anchors), Ok(policy)) = (
        TrustAnchors::amd(),
        Policy::from_json(
            r#"{"rules":{"any":{"allOf":[{"claim":"vmpl","equals":0}]}},"secrets":{"broker":["any"]}}"#,
        ),
    ) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    match verify(&evidence, &anchors, &policy, b"spki", &[0; 32], now) {
        // A random report cannot be bound to this key and nonce.
        Ok(_) => panic!("unbound evidence accepted"),
        Err(Error::UntrustedBroker { .. }) => {}
        Err(other) => panic!("refusal outside UntrustedBroker: {other}"),
    }
});
