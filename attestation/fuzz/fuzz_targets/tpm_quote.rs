//! The TPM quote checks on arbitrary bytes: the TPMS_ATTEST parser, and quote verification
//! with a fixed attestation key over an arbitrary message, signature and PCR list.
#![no_main]

use attestation::hcl::RsaJwk;
use attestation::tpm::{PCR_COUNT, Quote, QuoteInfo, verify_quote};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = QuoteInfo::parse(data);
    // Split the input into a message, a 256-byte "signature" and PCR bytes.
    let (message, rest) = data.split_at(data.len().min(data.len() / 2));
    let (signature, pcr_bytes) = rest.split_at(rest.len().min(256));
    let mut pcrs = [[0u8; 32]; PCR_COUNT];
    for (slot, chunk) in pcrs.iter_mut().zip(pcr_bytes.chunks(32)) {
        slot[..chunk.len()].copy_from_slice(chunk);
    }
    let quote = Quote {
        message: message.to_vec(),
        signature: signature.to_vec(),
        pcrs,
    };
    let ak = RsaJwk {
        kid: "HCLAkPub".into(),
        n: "v5q34gAAqd1KNv4-URtPlGGeoMHjXcYI7hIsgG0ZPlJRAABc9DlvxMQ9Ic1Ut70_5D-s7aLdh74DMpspXtRcjkXcdZyq5oCPmxWabg2ITqadmPz2wP-G1B5DRolZqohyXoW_tA6RfAVTEUikEkf1PMZYSLpW88hhHpsPjHFjjsFkvDBMtc8ij-hFG-X8fXAMdPW6e4UZrXe9hTEo-53-oNXo3vyAwCII5kXnQLVLQp0lVsymC6tCMXVjFJHNd-PSYPe06Kl4Emv6LiD0PK2UwcuBTMB157W1ixp-L5qz0YPsHqxIhSlYWC5JFNXr7BeYI1dOHMG7A8qHpYsDe4uR_w".into(),
        e: "AQAB".into(),
    };
    let _ = verify_quote(&quote, &ak);
});
