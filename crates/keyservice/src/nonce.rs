//! Public random values (challenges, GCM nonces) without a system call each.
//!
//! A request needs a 32-byte challenge and one or two 12-byte nonces; drawing
//! each with its own `getrandom(2)` was 6 % of the store thread's time. These
//! values are sent in the clear, so a per-thread buffer of 4 KiB from the OS
//! CSPRNG, handed out and never reused, gives the same unpredictability for a
//! system call every ~90 requests. Secret values (CSPRNG session keys, salts)
//! still come straight from `getrandom`.

use std::cell::RefCell;

const BUF: usize = 4096;

thread_local! {
    static POOL: RefCell<([u8; BUF], usize)> = const { RefCell::new(([0; BUF], BUF)) };
}

/// Fills `out` with fresh random bytes (for values that are sent in the clear).
pub fn fill_public(out: &mut [u8]) {
    POOL.with(|p| {
        let (buf, used) = &mut *p.borrow_mut();
        let mut done = 0;
        while done < out.len() {
            if *used == BUF {
                getrandom::fill(&mut buf[..]).expect("invariant: the OS CSPRNG works");
                *used = 0;
            }
            let n = (out.len() - done).min(BUF - *used);
            out[done..done + n].copy_from_slice(&buf[*used..*used + n]);
            // Handed out once: wipe it from the buffer.
            buf[*used..*used + n].fill(0);
            *used += n;
            done += n;
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_never_repeat_and_span_refills() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut v = [0u8; 12];
            super::fill_public(&mut v);
            assert!(seen.insert(v), "a nonce repeated");
        }
        let mut big = vec![0u8; 3 * super::BUF + 5];
        super::fill_public(&mut big);
        assert!(big.iter().filter(|b| **b == 0).count() < big.len() / 64);
    }
}
