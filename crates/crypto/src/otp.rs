//! The one-time pad, as used for hop-by-hop key relay between trusted nodes.
//!
//! Information-theoretic security holds only if each pad byte is used once and the
//! pad is exactly as long as the data. Both rules are enforced by the signature:
//! the pad is taken by value (it is consumed, and zeroized when this function
//! returns), and a length mismatch is an error rather than a silent truncation or
//! a cycled key.

use crate::error::{CryptoError, Result};
use crate::secret::SecretBytes;

/// XORs `pad` into `data` in place, consuming (and zeroizing) the pad.
///
/// Errors, leaving `data` untouched, unless `pad.len() == data.len()`.
/// The same call decrypts.
pub fn one_time_pad(pad: SecretBytes, data: &mut [u8]) -> Result<()> {
    if pad.len() != data.len() {
        return Err(CryptoError::PadLengthMismatch {
            key: pad.len(),
            data: data.len(),
        });
    }
    for (d, k) in data.iter_mut().zip(pad.expose_secret()) {
        *d ^= k;
    }
    Ok(())
    // `pad` is dropped here and zeroized.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_unpads() {
        let pad = SecretBytes::from_slice(&[0xFF, 0x0F, 0x00]);
        let mut data = [0x12, 0x34, 0x56];
        one_time_pad(pad.clone(), &mut data).expect("same length");
        assert_eq!(data, [0xED, 0x3B, 0x56]);
        one_time_pad(pad, &mut data).expect("same length");
        assert_eq!(data, [0x12, 0x34, 0x56]);
    }

    #[test]
    fn length_mismatch_is_an_error_and_leaves_data() {
        let mut data = [1u8, 2, 3];
        let e = one_time_pad(SecretBytes::from_slice(&[9; 4]), &mut data).expect_err("longer pad");
        assert_eq!(e, CryptoError::PadLengthMismatch { key: 4, data: 3 });
        assert!(one_time_pad(SecretBytes::from_slice(&[9; 2]), &mut data).is_err());
        assert_eq!(data, [1, 2, 3]);
    }
}
