//! The GHCB certificate table parser on arbitrary bytes.
#![no_main]

use attestation::{Endorsements, cert_table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = cert_table::parse(data) {
        // What parses must rebuild into a table that parses to the same entries.
        let rebuilt = cert_table::build(&entries);
        assert_eq!(cert_table::parse(&rebuilt).ok(), Some(entries));
    }
    let _ = Endorsements::from_cert_table(data);
});
