//! The binding between a broker challenge, the guest's ephemeral key and REPORT_DATA.
//!
//! Version 1: `REPORT_DATA = SHA-512(DOMAIN || u32be(len(nonce)) || nonce || u32be(len(key))
//! || key)`. The domain string and the length prefixes make the encoding injective, so no
//! other pair of nonce and key yields the same input. SHA-512 fills the 64 bytes exactly:
//! there is no padding to tolerate.
//!
//! Version 2, for an attest request that carries certificate requests: the same over
//! [`DOMAIN_V2`], the nonce, the key, then `u32be(n)` and each request's public key (DER
//! SubjectPublicKeyInfo), length-prefixed, in request order. Only the guest that holds the
//! evidence chose those keys. A request without certificate requests keeps version 1.

use aws_lc_rs::{constant_time, digest};

use crate::error::Error;

/// Domain separation string of the binding (version 1).
pub const DOMAIN: &[u8] = b"snp-key-broker/v1/report-data\0";

/// Domain separation string of the binding with certificate requests (version 2).
pub const DOMAIN_V2: &[u8] = b"snp-key-broker/v2/report-data\0";

// Inputs are bounded by the protocol (nonce, keys and requests are short); a length beyond
// u32 would be a caller bug, and saturating keeps the encoding total.
fn length(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

fn prefixed(ctx: &mut digest::Context, part: &[u8]) {
    ctx.update(&length(part.len()));
    ctx.update(part);
}

fn finish(ctx: digest::Context) -> [u8; 64] {
    let mut out = [0u8; 64];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Computes the 64-byte REPORT_DATA that binds `nonce` and `public_key`.
pub fn report_data(nonce: &[u8], public_key: &[u8]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(DOMAIN);
    prefixed(&mut ctx, nonce);
    prefixed(&mut ctx, public_key);
    finish(ctx)
}

/// Computes the version-2 REPORT_DATA: `nonce`, `public_key` and the certificate requests'
/// public keys (`spkis`, DER SubjectPublicKeyInfo, in request order).
pub fn report_data_v2(nonce: &[u8], public_key: &[u8], spkis: &[&[u8]]) -> [u8; 64] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    ctx.update(DOMAIN_V2);
    prefixed(&mut ctx, nonce);
    prefixed(&mut ctx, public_key);
    ctx.update(&length(spkis.len()));
    for spki in spkis {
        prefixed(&mut ctx, spki);
    }
    finish(ctx)
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

    #[test]
    fn version_two_binds_every_request_key_in_order() {
        let v2 = report_data_v2(b"nonce", b"key", &[b"a", b"b"]);
        for other in [
            report_data_v2(b"nonce", b"key", &[b"b", b"a"]),
            report_data_v2(b"nonce", b"key", &[b"ab"]),
            report_data_v2(b"nonce", b"key", &[b"a", b"b", b""]),
            report_data_v2(b"nonce", b"kez", &[b"a", b"b"]),
            report_data(b"nonce", b"key"),
        ] {
            assert_ne!(v2, other);
        }
        // Without requests it is still not version 1: the domain differs.
        assert_ne!(report_data_v2(b"n", b"k", &[]), report_data(b"n", b"k"));
    }
}
