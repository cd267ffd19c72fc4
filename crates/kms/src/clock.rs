//! The wall clock, read in one place.
//!
//! The store and the link-state database never read the clock themselves: the
//! KME logic reads it here and passes the time in (`now_unix_ms` in the store's
//! requests, `now` to [`crate::lsdb::Lsdb`]), so both stay deterministic under
//! test.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
