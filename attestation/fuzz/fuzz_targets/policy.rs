//! The release policy loader (JSON parsing, the repeated-key check, every field's checks) on
//! arbitrary text.
#![no_main]

use attestation::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let strict = Policy::from_json(text);
    let stored = Policy::from_stored_json(text);
    // Whatever the strict loader accepts, the loader of stored documents accepts too.
    assert!(strict.is_err() || stored.is_ok());
    if let Ok(policy) = strict {
        let _ = (
            policy.rules().count(),
            policy.secrets().count(),
            policy.to_json(),
        );
    }
});
