//! Packed bit vectors: the common currency of the post-processing kernels.
//!
//! Every kernel in this crate (parities for Cascade, carry-less products for
//! Toeplitz hashing, polynomial hashing for authentication and verification)
//! works on whole 64-bit words, so keys are stored packed, 64 bits per `u64`,
//! rather than as `Vec<bool>` or bytes. The layout is fixed and documented
//! because it is also the wire layout of parities and the bit order that the
//! Toeplitz convention in [`crate::pa`] refers to:
//!
//! * bit `i` of a [`BitVec`] lives in word `i / 64`, at bit position `i % 64`
//!   counted from the least significant bit (**LSB-first**);
//! * as bytes, bit `i` lives in byte `i / 8` at bit position `i % 8`, again
//!   LSB-first, and words are little-endian — so the byte and word views agree
//!   on every platform;
//! * bits past `len()` in the last word are always zero (an invariant every
//!   method keeps), so whole-word popcounts and XORs never see garbage.
//!
//! Keys are secrets: a `BitVec` is zeroed when dropped and its `Debug` output
//! shows only its length. No crate is used because the operations needed
//! (range parity by popcount, raw word access for the carry-less kernels, a
//! fixed documented byte order and zeroize-on-drop) are small and the
//! available bit-vector crates do not guarantee all of them together.

use core::fmt;

use rand::Rng;
use zeroize::Zeroize;

/// Errors from building or combining bit vectors. All of them are caller
/// misuse or malformed input text; none can come from arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitsError {
    /// A character other than `'0'` or `'1'` in ASCII input.
    #[error("invalid character {found:?} at position {position} (expected '0' or '1')")]
    InvalidChar {
        /// The offending character.
        found: char,
        /// Its character index in the input.
        position: usize,
    },
    /// Two vectors that must have equal length do not.
    #[error("length mismatch: {left} vs {right} bits")]
    LengthMismatch {
        /// Length of the left operand.
        left: usize,
        /// Length of the right operand.
        right: usize,
    },
    /// Fewer bytes or words than the requested bit length needs.
    #[error("{available} bits of storage provided, {requested} requested")]
    TooShort {
        /// Bits requested.
        requested: usize,
        /// Bits available in the provided storage.
        available: usize,
    },
    /// A range that does not lie within the vector.
    #[error("range {start}..{end} out of bounds for {len} bits")]
    OutOfRange {
        /// Range start.
        start: usize,
        /// Range end (exclusive).
        end: usize,
        /// Vector length.
        len: usize,
    },
}

/// A packed, LSB-first vector of bits over `u64` words (see the module docs
/// for the exact layout). Zeroed on drop.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BitVec {
    words: Vec<u64>,
    len: usize,
}

/// Number of `u64` words needed for `bits` bits.
#[inline]
pub(crate) const fn words_for(bits: usize) -> usize {
    bits.div_ceil(64)
}

/// Mask of the valid bits in the last word of an `len`-bit vector.
#[inline]
const fn tail_mask(len: usize) -> u64 {
    match len % 64 {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}

impl BitVec {
    /// An all-zero vector of `len` bits.
    pub fn zeros(len: usize) -> Self {
        Self {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// `len` uniformly random bits drawn from `rng`.
    pub fn random<R: Rng + ?Sized>(len: usize, rng: &mut R) -> Self {
        let mut words = vec![0u64; words_for(len)];
        for w in &mut words {
            *w = rng.next_u64();
        }
        Self::from_words_truncate(words, len)
    }

    /// Takes ownership of `words` as the first `len` bits; bits past `len` are
    /// cleared and surplus words dropped.
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Result<Self, BitsError> {
        if words.len() * 64 < len {
            let available = words.len() * 64;
            words.zeroize();
            return Err(BitsError::TooShort {
                requested: len,
                available,
            });
        }
        Ok(Self::from_words_truncate(words, len))
    }

    /// As [`from_words`](Self::from_words) for callers that already know
    /// `words.len() * 64 >= len`.
    pub(crate) fn from_words_truncate(mut words: Vec<u64>, len: usize) -> Self {
        debug_assert!(words.len() * 64 >= len);
        let n = words_for(len);
        for w in &mut words[n..] {
            *w = 0;
        }
        words.truncate(n);
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(len);
        }
        Self { words, len }
    }

    /// The first `len` bits of `bytes` (LSB-first within each byte).
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<Self, BitsError> {
        if bytes.len() * 8 < len {
            return Err(BitsError::TooShort {
                requested: len,
                available: bytes.len() * 8,
            });
        }
        let mut words = vec![0u64; words_for(len)];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(buf);
            buf.zeroize();
        }
        Ok(Self::from_words_truncate(words, len))
    }

    /// Parses a string of ASCII `'0'`/`'1'`; character `i` becomes bit `i`.
    pub fn from_ascii(s: &str) -> Result<Self, BitsError> {
        let mut v = Self::zeros(s.len());
        for (position, c) in s.chars().enumerate() {
            match c {
                '0' => {}
                '1' => v.set(position, true),
                found => return Err(BitsError::InvalidChar { found, position }),
            }
        }
        Ok(v)
    }

    /// Renders as ASCII `'0'`/`'1'`, bit 0 first. Only for tests and
    /// diagnostics on non-secret data.
    pub fn to_ascii(&self) -> String {
        (0..self.len)
            .map(|i| if self.get(i) { '1' } else { '0' })
            .collect()
    }

    /// The bits as `ceil(len / 8)` bytes, LSB-first; padding bits are zero.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(self.len.div_ceil(8));
        out
    }

    /// Number of bits.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vector holds no bits.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed words; bits past `len()` are zero.
    #[inline]
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }

    /// Bit `i`.
    ///
    /// # Panics
    /// If `i >= len()` (an indexing bug in the caller, like slice indexing).
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit index {i} out of range for {}", self.len);
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets bit `i` to `value`.
    ///
    /// # Panics
    /// If `i >= len()`.
    #[inline]
    pub fn set(&mut self, i: usize, value: bool) {
        assert!(i < self.len, "bit index {i} out of range for {}", self.len);
        let m = 1u64 << (i % 64);
        if value {
            self.words[i / 64] |= m;
        } else {
            self.words[i / 64] &= !m;
        }
    }

    /// Flips bit `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    #[inline]
    pub fn flip(&mut self, i: usize) {
        assert!(i < self.len, "bit index {i} out of range for {}", self.len);
        self.words[i / 64] ^= 1u64 << (i % 64);
    }

    /// Appends one bit.
    pub fn push(&mut self, value: bool) {
        if self.len.is_multiple_of(64) {
            self.words.push(0);
        }
        self.len += 1;
        self.set(self.len - 1, value);
    }

    /// Appends all bits of `other`, a word at a time.
    pub fn append(&mut self, other: &BitVec) {
        let sh = self.len % 64;
        if sh == 0 {
            self.words.truncate(words_for(self.len));
            self.words
                .extend_from_slice(&other.words[..words_for(other.len)]);
        } else {
            for &w in &other.words[..words_for(other.len)] {
                if let Some(last) = self.words.last_mut() {
                    *last |= w << sh;
                }
                self.words.push(w >> (64 - sh));
            }
        }
        self.len += other.len;
        self.words.truncate(words_for(self.len));
        if let Some(last) = self.words.last_mut() {
            *last &= tail_mask(self.len);
        }
    }

    /// Number of one bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Parity (XOR) of all bits.
    pub fn parity(&self) -> bool {
        self.words.iter().fold(0u64, |a, w| a ^ w).count_ones() & 1 == 1
    }

    /// Parity of bits `start..end`, by XOR-folding whole words and one
    /// popcount. Returns an error if the range is not within the vector.
    pub fn parity_range(&self, start: usize, end: usize) -> Result<bool, BitsError> {
        if start > end || end > self.len {
            return Err(BitsError::OutOfRange {
                start,
                end,
                len: self.len,
            });
        }
        Ok(self.parity_range_unchecked(start, end))
    }

    /// Range parity for callers that have already checked
    /// `start <= end <= len()`.
    #[inline]
    pub(crate) fn parity_range_unchecked(&self, start: usize, end: usize) -> bool {
        debug_assert!(start <= end && end <= self.len);
        if start == end {
            return false;
        }
        let (ws, we) = (start / 64, (end - 1) / 64);
        let lo_mask = u64::MAX << (start % 64);
        let hi_mask = u64::MAX >> (63 - (end - 1) % 64);
        if ws == we {
            return (self.words[ws] & lo_mask & hi_mask).count_ones() & 1 == 1;
        }
        let mut acc = (self.words[ws] & lo_mask) ^ (self.words[we] & hi_mask);
        for w in &self.words[ws + 1..we] {
            acc ^= w;
        }
        acc.count_ones() & 1 == 1
    }

    /// `self ^= other`, bit by bit. Lengths must match.
    pub fn xor_assign(&mut self, other: &BitVec) -> Result<(), BitsError> {
        if self.len != other.len {
            return Err(BitsError::LengthMismatch {
                left: self.len,
                right: other.len,
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a ^= b;
        }
        Ok(())
    }

    /// Number of positions where `self` and `other` differ.
    pub fn hamming_distance(&self, other: &BitVec) -> Result<usize, BitsError> {
        if self.len != other.len {
            return Err(BitsError::LengthMismatch {
                left: self.len,
                right: other.len,
            });
        }
        Ok(self
            .words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a ^ b).count_ones() as usize)
            .sum())
    }

    /// A copy of bits `start..end` as a new vector.
    pub fn slice(&self, start: usize, end: usize) -> Result<BitVec, BitsError> {
        if start > end || end > self.len {
            return Err(BitsError::OutOfRange {
                start,
                end,
                len: self.len,
            });
        }
        Ok(BitVec::from_words_truncate(
            extract_bits(&self.words, start, end - start),
            end - start,
        ))
    }
}

/// Copies `len` bits starting at bit `start` of `words` into fresh words
/// (bit `start` becomes bit 0). Reads past the end of `words` count as zero.
pub(crate) fn extract_bits(words: &[u64], start: usize, len: usize) -> Vec<u64> {
    let n = words_for(len);
    let (w0, sh) = (start / 64, start % 64);
    let at = |i: usize| words.get(i).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let lo = at(w0 + i) >> sh;
        let hi = if sh == 0 {
            0
        } else {
            at(w0 + i + 1) << (64 - sh)
        };
        out.push(lo | hi);
    }
    if let Some(last) = out.last_mut() {
        *last &= tail_mask(len);
    }
    out
}

impl Drop for BitVec {
    fn drop(&mut self) {
        self.words.zeroize();
    }
}

impl fmt::Debug for BitVec {
    /// Shows only the length: bit vectors usually hold key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BitVec")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl FromIterator<bool> for BitVec {
    fn from_iter<I: IntoIterator<Item = bool>>(iter: I) -> Self {
        let iter = iter.into_iter();
        let mut words = Vec::with_capacity(words_for(iter.size_hint().0));
        let (mut cur, mut len) = (0u64, 0usize);
        for b in iter {
            cur |= u64::from(b) << (len % 64);
            len += 1;
            if len % 64 == 0 {
                words.push(cur);
                cur = 0;
            }
        }
        if len % 64 != 0 {
            words.push(cur);
        }
        Self { words, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn naive_parity(v: &BitVec, s: usize, e: usize) -> bool {
        (s..e).fold(false, |a, i| a ^ v.get(i))
    }

    #[test]
    fn append_matches_pushing_bit_by_bit() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        let lens = [0usize, 1, 5, 63, 64, 65, 127, 128, 129, 300];
        for &a in &lens {
            for &b in &lens {
                let (x, y) = (BitVec::random(a, &mut rng), BitVec::random(b, &mut rng));
                let mut fast = x.clone();
                fast.append(&y);
                let mut slow = x.clone();
                for i in 0..b {
                    slow.push(y.get(i));
                }
                assert_eq!(fast, slow, "{a} + {b}");
                assert_eq!(fast.as_words().len(), words_for(a + b));
                // Appending again keeps working on the result.
                fast.append(&x);
                for i in 0..a {
                    slow.push(x.get(i));
                }
                assert_eq!(fast, slow, "{a} + {b} + {a}");
            }
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        let v = BitVec::from_ascii("1011").expect("valid ascii");
        assert_eq!(v.as_words(), &[0b1101]);
        assert_eq!(v.to_bytes(), vec![0b1101]);
        let w = BitVec::from_bytes(&[0x01, 0x80], 16).expect("enough bytes");
        assert!(w.get(0) && w.get(15));
        assert_eq!(w.count_ones(), 2);
        assert_eq!(w.as_words(), &[0x8001]);
    }

    #[test]
    fn ascii_roundtrip_and_errors() {
        let s = "0110100111010001011";
        assert_eq!(BitVec::from_ascii(s).expect("valid").to_ascii(), s);
        assert_eq!(
            BitVec::from_ascii("01x"),
            Err(BitsError::InvalidChar {
                found: 'x',
                position: 2
            })
        );
    }

    #[test]
    fn bytes_roundtrip_awkward_lengths() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000] {
            let v = BitVec::random(len, &mut rng);
            let b = v.to_bytes();
            assert_eq!(b.len(), len.div_ceil(8));
            assert_eq!(BitVec::from_bytes(&b, len).expect("enough bytes"), v);
        }
        assert!(matches!(
            BitVec::from_bytes(&[0; 2], 17),
            Err(BitsError::TooShort { .. })
        ));
    }

    #[test]
    fn from_words_clears_tail() {
        let v = BitVec::from_words(vec![u64::MAX, u64::MAX], 70).expect("enough");
        assert_eq!(v.count_ones(), 70);
        assert_eq!(v.as_words()[1], 0x3f);
        assert!(BitVec::from_words(vec![0], 65).is_err());
    }

    #[test]
    fn parity_range_matches_naive() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let v = BitVec::random(517, &mut rng);
        for s in 0..=200 {
            for e in [s, s + 1, s + 63, s + 64, s + 65, s + 130, 517] {
                if e >= s && e <= 517 {
                    assert_eq!(
                        v.parity_range(s, e).expect("in range"),
                        naive_parity(&v, s, e),
                        "{s}..{e}"
                    );
                }
            }
        }
        assert_eq!(v.parity(), naive_parity(&v, 0, 517));
        assert!(v.parity_range(10, 518).is_err());
        assert!(v.parity_range(11, 10).is_err());
    }

    #[test]
    fn xor_and_hamming() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let a = BitVec::random(300, &mut rng);
        let b = BitVec::random(300, &mut rng);
        let mut c = a.clone();
        c.xor_assign(&b).expect("same length");
        for i in 0..300 {
            assert_eq!(c.get(i), a.get(i) ^ b.get(i));
        }
        assert_eq!(a.hamming_distance(&b).expect("same length"), c.count_ones());
        assert!(c.xor_assign(&BitVec::zeros(299)).is_err());
    }

    #[test]
    fn slice_push_flip() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(4);
        let v = BitVec::random(400, &mut rng);
        for (s, e) in [(0, 0), (0, 400), (3, 70), (64, 128), (65, 399), (100, 101)] {
            let sl = v.slice(s, e).expect("in range");
            assert_eq!(sl.len(), e - s);
            for i in s..e {
                assert_eq!(sl.get(i - s), v.get(i));
            }
        }
        let mut p: BitVec = (0..130).map(|i| i % 3 == 0).collect();
        assert_eq!(p.len(), 130);
        assert_eq!(p.count_ones(), 44);
        p.flip(128);
        assert!(p.get(128));
        p.set(0, false);
        assert_eq!(p.count_ones(), 44);
    }

    proptest::proptest! {
        #[test]
        fn prop_bytes_roundtrip_and_range_parity(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            cut in 0usize..320,
            a in 0usize..320,
            b in 0usize..320,
        ) {
            let len = cut.min(bytes.len() * 8);
            let v = BitVec::from_bytes(&bytes, len).expect("enough bytes");
            let back = BitVec::from_bytes(&v.to_bytes(), len).expect("enough bytes");
            proptest::prop_assert_eq!(&back, &v);
            let (s, e) = (a.min(b).min(len), a.max(b).min(len));
            proptest::prop_assert_eq!(v.parity_range(s, e).expect("in range"), naive_parity(&v, s, e));
            let sl = v.slice(s, e).expect("in range");
            proptest::prop_assert_eq!(sl.parity(), naive_parity(&v, s, e));
        }
    }

    #[test]
    fn debug_hides_bits() {
        let v = BitVec::from_ascii("1111").expect("valid");
        assert_eq!(format!("{v:?}"), "BitVec { len: 4, .. }");
    }
}
