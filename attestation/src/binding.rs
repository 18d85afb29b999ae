//! The binding between a broker challenge, the guest's ephemeral key and REPORT_DATA.
//!
//! `REPORT_DATA = SHA-512(DOMAIN || u32be(len(nonce)) || nonce || u32be(len(key)) || key)`.
//! The domain string and the length prefixes make the encoding injective, so no other pair
//! of nonce and key yields the same input. SHA-512 fills the 64 bytes exactly: there is no
//! padding to tolerate.

use aws_lc_rs::{constant_time, digest};

use crate::error::Error;

/// Domain separation string of the binding (version 1).
pub const DOMAIN: &[u8] = b"snp-key-broker/v1/report-data\0";

/// Computes the 64-byte REPORT_DATA that binds `nonce` and `public_key`.
pub fn report_data(nonce: &[u8], public_key: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(DOMAIN);
    for part in [nonce, public_key] {
        // Inputs are bounded by the protocol (nonce and public key are short); a length
        // beyond u32 would be a caller bug, and saturating keeps the encoding total.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ctx.update(&len.to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Checks, in constant time, that `report_data` is the binding of `nonce` and `public_key`.
pub fn check(report_data_field: &[u8; 64], nonce: &[u8], public_key: &[u8]) -> Result<(), Error> {
    let expected = report_data(nonce, public_key);
    constant_time::verify_slices_are_equal(report_data_field, &expected)
        .map_err(|_| Error::BindingMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_is_injective_over_the_split() {
        // Moving a byte from the nonce to the key changes the result.
        assert_ne!(report_data(b"ab", b"c"), report_data(b"a", b"bc"));
        assert_ne!(report_data(b"", b"abc"), report_data(b"abc", b""));
        let rd = report_data(b"nonce", b"key");
        assert!(check(&rd, b"nonce", b"key").is_ok());
        assert_eq!(check(&rd, b"nonce", b"kez"), Err(Error::BindingMismatch));
        let mut flipped = rd;
        flipped[63] ^= 1;
        assert_eq!(
            check(&flipped, b"nonce", b"key"),
            Err(Error::BindingMismatch)
        );
    }
}
