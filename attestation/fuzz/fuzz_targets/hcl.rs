//! The Azure HCL report parser and its variable-data decoding on arbitrary bytes.
#![no_main]

use attestation::HclReport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hcl) = HclReport::parse(data) {
        let _ = hcl.snp_report();
        let _ = hcl.check_var_data_digest(&[0; 64]);
        let _ = hcl.var_data_claims();
    }
});
