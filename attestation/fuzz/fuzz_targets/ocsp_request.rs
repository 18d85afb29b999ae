//! An OCSP request as the broker's responder receives it from anyone: parsing with its
//! bounds, the serials, and matching CertIDs to a CA.
#![no_main]

use attestation::ocsp::{IssuerHashes, MAX_REQUESTS, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(query) = parse(data) {
        let serials = query.serials();
        assert!(!serials.is_empty() && serials.len() <= MAX_REQUESTS);
        // A CA no request can name: the empty list matches nothing.
        let none: [IssuerHashes; 0] = [];
        assert!(query.issuers(&none).iter().all(Option::is_none));
        let _ = query.nonce();
    }
});
