//! Anti-replay window for sequence-numbered packets (RFC 4303 § 3.4.3 style).
//!
//! A receiver of authenticated datagrams keeps the highest sequence number it
//! accepted and a bitmap of the `64 · WORDS` numbers below it. A number is
//! *possibly new* when it is above the highest or inside the window and not yet
//! seen; the receiver checks that before spending a decryption on the packet and
//! marks it seen only after the packet authenticated, so a forged packet cannot
//! move the window.

/// Highest accepted sequence number and the bitmap below it (bit `k` of the map:
/// `highest - k` was accepted).
#[derive(Debug, Clone)]
pub struct ReplayWindow<const WORDS: usize> {
    started: bool,
    highest: u64,
    seen: [u64; WORDS],
}

impl<const WORDS: usize> Default for ReplayWindow<WORDS> {
    fn default() -> Self {
        Self {
            started: false,
            highest: 0,
            seen: [0; WORDS],
        }
    }
}

/// Why a sequence number is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Accepted before.
    Duplicate,
    /// Older than the window reaches.
    TooOld,
}

impl<const WORDS: usize> ReplayWindow<WORDS> {
    /// Sequence numbers the window remembers below the highest.
    pub const SIZE: u64 = 64 * WORDS as u64;

    fn bit(&self, back: u64) -> bool {
        let (w, b) = ((back / 64) as usize, back % 64);
        self.seen[w] >> b & 1 == 1
    }

    /// Whether `seq` may be new (check before authenticating).
    pub fn check(&self, seq: u64) -> Result<(), Replay> {
        if !self.started || seq > self.highest {
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= Self::SIZE {
            Err(Replay::TooOld)
        } else if self.bit(back) {
            Err(Replay::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Marks `seq` seen (after it authenticated); `check` must have passed.
    pub fn accept(&mut self, seq: u64) {
        if !self.started {
            self.started = true;
            self.highest = seq;
            self.seen = [0; WORDS];
            self.seen[0] = 1;
            return;
        }
        if seq > self.highest {
            self.shift(seq - self.highest);
            self.highest = seq;
            self.seen[0] |= 1;
        } else {
            let back = self.highest - seq;
            if back < Self::SIZE {
                self.seen[(back / 64) as usize] |= 1 << (back % 64);
            }
        }
    }

    /// Moves every bit `by` places towards older.
    fn shift(&mut self, by: u64) {
        if by >= Self::SIZE {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let carry = match (bits, i.checked_sub(words + 1)) {
                (0, _) | (_, None) => 0,
                (b, Some(j)) => self.seen[j] >> (64 - b),
            };
            self.seen[i] = (lo << bits) | carry;
        }
    }

    /// The highest accepted sequence number, if any.
    pub fn highest(&self) -> Option<u64> {
        self.started.then_some(self.highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Differential test against the obvious model: a set of accepted numbers.
    #[test]
    fn matches_a_set_model_under_random_arrivals() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut w = ReplayWindow::<4>::default();
        let mut model = BTreeSet::new();
        let mut top = 0u64;
        for _ in 0..20_000 {
            let r = next();
            let seq = match r % 4 {
                0 => top + 1 + r % 300,
                _ => top.saturating_sub(r % 400),
            };
            let want = if model.is_empty() || seq > top {
                Ok(())
            } else if top - seq >= 256 {
                Err(Replay::TooOld)
            } else if model.contains(&seq) {
                Err(Replay::Duplicate)
            } else {
                Ok(())
            };
            assert_eq!(w.check(seq), want, "seq {seq} top {top}");
            if want.is_ok() {
                w.accept(seq);
                model.insert(seq);
                top = top.max(seq);
            }
        }
    }

    #[test]
    fn first_packet_may_be_any_number_and_duplicates_are_refused() {
        let mut w = ReplayWindow::<1>::default();
        assert_eq!(w.highest(), None);
        w.accept(1000);
        assert_eq!(w.check(1000), Err(Replay::Duplicate));
        assert_eq!(w.check(999), Ok(()));
        assert_eq!(w.check(1000 - 64), Err(Replay::TooOld));
        w.accept(1000 + 500);
        assert_eq!(w.check(1000), Err(Replay::TooOld));
    }
}
