//! The store's one error type (kept apart so that the domain errors above can
//! wrap it without depending on the store's implementation).

use uuid::Uuid;

/// Why the store refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// This (link ID, block number) was ingested before.
    #[error("block already ingested")]
    DuplicateBlock,
    /// Ingesting the block would exceed the pool's capacity.
    #[error("pool full: capacity {capacity_units} units")]
    PoolFull {
        /// Capacity in units.
        capacity_units: u64,
    },
    /// Too few available units.
    #[error("not enough key material: {available} units available, {requested} needed")]
    Exhausted {
        /// Units available.
        available: u64,
        /// Units needed.
        requested: u64,
    },
    /// One or more key IDs are unknown (or not deliverable) here.
    #[error("one or more keys not found")]
    KeysNotFound,
    /// The keys exist but belong to another SAE pair.
    #[error("keys belong to another SAE pair")]
    NotAuthorized,
    /// A peer's reservation names units this store does not hold as available.
    #[error("{} unit(s) unknown or unavailable", .0.len())]
    UnitsUnavailable(Vec<Uuid>),
    /// The request was voided before; it cannot be accepted any more.
    #[error("request was voided")]
    RequestVoided,
    /// A request ID is reused with different content, or is unknown to an operation
    /// that needs it.
    #[error("request ID conflict or unknown request")]
    RequestConflict,
    /// A peer's key layout is inconsistent (key ID, size and units do not match).
    #[error("invalid key layout: {0}")]
    InvalidLayout(&'static str),
    /// The storage backend failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The store has shut down.
    #[error("store closed")]
    Closed,
    /// The store's encryption does not match the configured node master key
    /// (another key, or none), see [`super::cipher`].
    #[error("{0}")]
    MasterKey(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}
