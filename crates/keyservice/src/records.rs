//! What the stores and the server exchange: the request handed to a store,
//! where session keys come from, and the records the admin commands list.
//! Apart from the stores ([`crate::sqlite`], [`crate::postgres`]) so that
//! neither imports the module that drives them ([`crate::store`]).

use std::time::{SystemTime, UNIX_EPOCH};

use qkdnet_crypto::gcm::GcmNonce;
use qkdnet_media::Key256;
use qkdnet_media::proto::{AuthRequest, Challenge, KeySource};
use uuid::Uuid;

use crate::core::MediumRow;

/// One terminal request, as the server hands it to the store.
#[derive(Debug)]
pub struct GrantOp {
    /// The challenge sent on the connection.
    pub challenge: Challenge,
    /// The request.
    pub req: AuthRequest,
    /// A random nonce for the wrap.
    pub nonce: GcmNonce,
    /// The skip window.
    pub max_skip: u64,
    /// How long a session can be joined, in seconds.
    pub session_ttl: u64,
}

/// Where new session keys come from.
pub trait SessionKeys: Send {
    /// A fresh 256-bit session key and where it came from.
    fn draw(&mut self) -> (Key256, KeySource);
}

/// A revocation's effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The subscriber whose medium it was.
    pub identity: String,
    /// Unused keys destroyed.
    pub destroyed: u64,
}

/// A subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberInfo {
    /// SIP URI or device ID.
    pub identity: String,
    /// Display name.
    pub name: String,
    /// When enrolled (Unix seconds).
    pub enrolled_at: u64,
    /// The active medium, if any.
    pub medium: Option<Uuid>,
}

/// A medium as the service records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediumInfo {
    /// Its row.
    pub row: MediumRow,
    /// When it was bound (first charged).
    pub bound_at: u64,
    /// When it was revoked.
    pub revoked_at: Option<u64>,
    /// Why.
    pub revoke_reason: Option<String>,
}

/// One audit line as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Sequence number.
    pub seq: u64,
    /// When (Unix seconds).
    pub at: u64,
    /// What.
    pub event: String,
    /// Which medium.
    pub medium: Option<Uuid>,
    /// Which subscriber.
    pub identity: Option<String>,
    /// Details.
    pub detail: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
