//! The key service's decisions, sans-IO: given what the store holds, what to
//! answer and what to write.
//!
//! Both stores (SQLite, PostgreSQL) run the same three steps for a terminal's
//! request, inside one transaction: *fetch* the rows [`fetch_plan`] names (the
//! medium, at most two of its keys, the session, whether the peer has a medium),
//! *decide* with [`decide_grant`] (pure: checks, tag, grant, the writes), *write*
//! what the [`GrantPlan`] says and commit before the answer leaves. Charging is
//! the same with [`decide_charge`]. Keeping the rules here means the two stores
//! cannot drift apart on who gets a key.
//!
//! The rules, in the order they are applied to an authenticated request:
//!
//! 1. Unknown medium → `UnknownMedium`; revoked → `Revoked` (before any key is
//!    looked at: revocation takes effect on the next request).
//! 2. The index against the medium's next expected index and the skip window
//!    (`Replay` below it, `OutOfOrder` past the window), then the two keys it
//!    spends must both be charged (`Exhausted`: "recharge at a charging point"),
//!    then the tag (`BadTag`). Nothing is consumed up to here.
//! 3. From here on the tag verified, so the terminal has destroyed both keys: the
//!    service consumes them too, *whatever it answers*, and the indices stay in
//!    step. Opening a session: an existing session with the same ID must have the
//!    same two parties (then the same key is granted again: a retry), otherwise
//!    `NotAParty`; a new one needs a peer that is a subscriber with an active
//!    medium (`UnknownPeer`), then draws the key. Joining: the session must exist
//!    and not be expired (`UnknownSession`), and the joiner must be its peer
//!    (`NotAParty`).

use qkdnet_crypto::gcm::GcmNonce;
use qkdnet_media::Key256;
use qkdnet_media::proto::{
    AuthRequest, Challenge, ChargeOffer, Identity, KeySource, ProtoError, RefuseReason, Request,
    SESSION_ID_LEN, Session, SessionKeyGrant, check_index, verify_auth,
};
use uuid::Uuid;

/// A medium as the store records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediumRow {
    /// The store's row ID.
    pub rid: i64,
    /// The medium's ID.
    pub id: Uuid,
    /// The subscriber it is bound to.
    pub identity: String,
    /// Revoked (lost, stolen, retired).
    pub revoked: bool,
    /// The next index the service expects.
    pub next: u64,
    /// Keys charged so far (one past the last charged index).
    pub charged: u64,
}

impl MediumRow {
    /// Unused keys the service holds for the medium.
    pub fn remaining(&self) -> u64 {
        self.charged.saturating_sub(self.next)
    }
}

/// A session as the store records it.
#[derive(Debug)]
pub struct SessionRow {
    /// Session ID.
    pub session_id: [u8; SESSION_ID_LEN],
    /// The opener.
    pub a: Identity,
    /// The peer.
    pub b: Identity,
    /// Where the key came from.
    pub source: KeySource,
    /// The session key.
    pub key: Key256,
    /// When it was opened (Unix seconds).
    pub created: u64,
}

/// What the store must read for a request, once it has the medium row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchPlan {
    /// The two key indices the request spends (tag key, wrap key), if the
    /// request's index can be accepted at all.
    pub keys: Option<[u64; 2]>,
}

/// The keys to read for `req` given the medium's row (none if the request is
/// refused before any key is needed).
pub fn fetch_plan(medium: Option<&MediumRow>, req: &AuthRequest, max_skip: u64) -> FetchPlan {
    let keys = medium
        .filter(|m| !m.revoked)
        .filter(|m| check_index(req.key_index, m.next, max_skip).is_ok())
        .map(|_| [req.key_index, req.key_index + 1]);
    FetchPlan { keys }
}

/// What the store read for one request.
pub struct GrantInputs<'a> {
    /// The challenge sent on this connection.
    pub challenge: &'a Challenge,
    /// The request.
    pub req: &'a AuthRequest,
    /// The medium's row.
    pub medium: Option<&'a MediumRow>,
    /// The keys [`fetch_plan`] named, each if charged.
    pub keys: [Option<Key256>; 2],
    /// The session with the request's ID, if one exists and has not expired.
    pub session: Option<SessionRow>,
    /// For an opening request without a session: whether the peer is a
    /// subscriber with an active medium.
    pub peer_active: bool,
    /// The skip window.
    pub max_skip: u64,
    /// Now (Unix seconds).
    pub now: u64,
    /// A random nonce for the wrap.
    pub nonce: GcmNonce,
}

/// Indices to destroy and the medium's new next index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Consume {
    /// The medium's row ID.
    pub rid: i64,
    /// First index destroyed.
    pub first: u64,
    /// Last index destroyed.
    pub last: u64,
    /// The medium's next expected index afterwards.
    pub next: u64,
}

/// What to answer and what to write for one request.
#[derive(Debug)]
pub struct GrantPlan {
    /// The answer.
    pub answer: Result<SessionKeyGrant, RefuseReason>,
    /// Keys to consume (set whenever the tag verified).
    pub consume: Option<Consume>,
    /// A session to insert (a new one was opened).
    pub new_session: Option<SessionRow>,
    /// The audit line (none for requests refused before the tag verified: those
    /// are counted, not recorded, so nobody can fill the trail with garbage).
    pub audit: Option<AuditLine>,
    /// Where the granted key came from, if one was granted.
    pub source: Option<KeySource>,
}

/// One line of the audit trail. Never key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLine {
    /// What happened: `enrol`, `bind`, `charge`, `open`, `join`, `refuse`, `revoke`.
    pub event: &'static str,
    /// The medium concerned.
    pub medium: Option<Uuid>,
    /// The subscriber concerned.
    pub identity: Option<String>,
    /// Details (indices, session ID, reason, charger).
    pub detail: String,
}

fn refused(reason: RefuseReason) -> GrantPlan {
    GrantPlan {
        answer: Err(reason),
        consume: None,
        new_session: None,
        audit: None,
        source: None,
    }
}

/// Decides a terminal's request. `draw` gives a fresh session key and its source;
/// it is called only when a new session is opened.
pub fn decide_grant(inp: GrantInputs<'_>, draw: impl FnOnce() -> (Key256, KeySource)) -> GrantPlan {
    let Some(medium) = inp.medium else {
        return refused(RefuseReason::UnknownMedium);
    };
    if medium.revoked {
        return refused(RefuseReason::Revoked);
    }
    let [auth_key, wrap_key] = inp.keys;
    let auth = match verify_auth(inp.challenge, inp.req, medium.next, inp.max_skip, |_| {
        auth_key
    }) {
        Ok(a) => a,
        Err(e) => return refused(e.refusal().unwrap_or(RefuseReason::Malformed)),
    };
    let Some(wrap_key) = wrap_key else {
        return refused(RefuseReason::Exhausted);
    };
    let consume = Consume {
        rid: medium.rid,
        first: *auth.consumed().start(),
        last: *auth.consumed().end(),
        next: auth.next_expected(),
    };
    let sid_hex = hex(&auth.request().session_id());
    let Ok(me) = Identity::new(medium.identity.clone()) else {
        // A stored identity was checked when it was enrolled; a bad one is the
        // store's fault, and the keys are consumed like any verified request.
        return GrantPlan {
            consume: Some(consume),
            audit: Some(AuditLine {
                event: "refuse",
                medium: Some(medium.id),
                identity: Some(medium.identity.clone()),
                detail: format!("session {sid_hex}: the stored identity is invalid"),
            }),
            ..refused(RefuseReason::Malformed)
        };
    };
    let (event, session, is_new) = match (auth.request(), inp.session) {
        (Request::SessionKey { .. }, Some(s)) => ("open", Ok(s), false),
        (Request::SessionKey { session_id, peer }, None) if inp.peer_active && peer != &me => {
            let (key, source) = draw();
            let s = SessionRow {
                session_id: *session_id,
                a: me.clone(),
                b: peer.clone(),
                source,
                key,
                created: inp.now,
            };
            ("open", Ok(s), true)
        }
        (Request::SessionKey { .. }, None) => ("open", Err(RefuseReason::UnknownPeer), false),
        (Request::JoinSession { .. }, Some(s)) => ("join", Ok(s), false),
        (Request::JoinSession { .. }, None) => ("join", Err(RefuseReason::UnknownSession), false),
        _ => ("refuse", Err(RefuseReason::Malformed), false),
    };
    let granted = session.as_ref().map_err(|r| *r).and_then(|s| {
        auth.grant(
            &Session {
                session_id: s.session_id,
                a: &s.a,
                b: &s.b,
                source: s.source,
                key: &s.key,
            },
            &me,
            &wrap_key,
            inp.nonce,
        )
        .map(|g| (g, s.source))
        .map_err(|e| match e {
            ProtoError::PartyMismatch(_) => RefuseReason::NotAParty,
            e => e.refusal().unwrap_or(RefuseReason::Malformed),
        })
    });
    let (answer, source, detail) = match granted {
        Ok((g, source)) => {
            let src = match source {
                KeySource::Qkd => "qkd",
                _ => "csprng",
            };
            let detail = format!(
                "session {sid_hex} with {}, keys {}..={}, key from {src}",
                if event == "open" {
                    &g.b_identity
                } else {
                    &g.a_identity
                },
                consume.first,
                consume.last
            );
            (Ok(g), Some(source), detail)
        }
        Err(reason) => {
            let detail = format!(
                "session {sid_hex}: {reason}; keys {}..={} consumed",
                consume.first, consume.last
            );
            (Err(reason), None, detail)
        }
    };
    let event = if answer.is_ok() { event } else { "refuse" };
    GrantPlan {
        answer,
        consume: Some(consume),
        new_session: session.ok().filter(|_| is_new && source.is_some()),
        audit: Some(AuditLine {
            event,
            medium: Some(medium.id),
            identity: Some(medium.identity.clone()),
            detail,
        }),
        source,
    }
}

/// What the store read for a charge.
#[derive(Debug)]
pub struct ChargeInputs<'a> {
    /// The offer (its tag verified under the authentication key).
    pub offer: &'a ChargeOffer,
    /// Whether the owner is an enrolled subscriber.
    pub enrolled: bool,
    /// The medium's row, if the service knows it.
    pub medium: Option<&'a MediumRow>,
    /// The owner's active medium, if any.
    pub owner_active: Option<Uuid>,
}

/// What to do with a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargePlan {
    /// Refuse it.
    Refuse(RefuseReason),
    /// Store the keys at `first ..` after dropping any unused keys at or past
    /// `first` (a charge the medium never received), and set `charged`.
    Apply {
        /// Bind a new medium to the owner first.
        bind: bool,
        /// First index of the keys.
        first: u64,
        /// The medium's charged count afterwards.
        charged: u64,
        /// The audit line.
        audit: AuditLine,
    },
}

/// Decides a verified charge offer.
pub fn decide_charge(inp: &ChargeInputs<'_>) -> ChargePlan {
    let o = inp.offer;
    if !inp.enrolled {
        return ChargePlan::Refuse(RefuseReason::NotEnrolled);
    }
    let n = o.terms.key_ids.len() as u64;
    let bind = match inp.medium {
        None => {
            if inp.owner_active.is_some() {
                return ChargePlan::Refuse(RefuseReason::MediumConflict);
            }
            if o.terms.first_index != 0 {
                return ChargePlan::Refuse(RefuseReason::IndexMismatch);
            }
            true
        }
        Some(m) => {
            if m.revoked {
                return ChargePlan::Refuse(RefuseReason::Revoked);
            }
            if m.identity != o.terms.owner.as_str() {
                return ChargePlan::Refuse(RefuseReason::MediumConflict);
            }
            // Keys below `next` are used; keys past `charged` would leave a gap.
            if o.terms.first_index < m.next || o.terms.first_index > m.charged {
                return ChargePlan::Refuse(RefuseReason::IndexMismatch);
            }
            false
        }
    };
    let charged = o.terms.first_index + n;
    ChargePlan::Apply {
        bind,
        first: o.terms.first_index,
        charged,
        audit: AuditLine {
            event: "charge",
            medium: Some(o.terms.medium_id),
            identity: Some(o.terms.owner.as_str().to_owned()),
            detail: format!(
                "{n} keys at {}..={} by charger {}",
                o.terms.first_index,
                charged - 1,
                o.terms.charger
            ),
        },
    }
}

/// Lower-case hex of a session ID, for audit lines and logs.
pub fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl AuditLine {
    /// A subscriber enrolled.
    pub fn enrol(identity: &Identity, name: &str) -> Self {
        Self {
            event: "enrol",
            medium: None,
            identity: Some(identity.as_str().to_owned()),
            detail: format!("name {name:?}"),
        }
    }

    /// A medium bound to its owner at its first charge.
    pub fn bind(offer: &ChargeOffer) -> Self {
        Self {
            event: "bind",
            medium: Some(offer.terms.medium_id),
            identity: Some(offer.terms.owner.as_str().to_owned()),
            detail: format!("bound at its first charge by {}", offer.terms.charger),
        }
    }

    /// A medium revoked.
    pub fn revoke(medium: &MediumRow, reason: &str, destroyed: u64) -> Self {
        Self {
            event: "revoke",
            medium: Some(medium.id),
            identity: Some(medium.identity.clone()),
            detail: format!("{reason}; {destroyed} unused keys destroyed"),
        }
    }
}

/// The medium a revocation applies to: known here and not revoked yet.
pub fn revocable(row: Option<MediumRow>, medium: &Uuid) -> Result<MediumRow, crate::KsError> {
    let row =
        row.ok_or_else(|| crate::KsError::Config(format!("medium {medium} is not known here")))?;
    if row.revoked {
        return Err(crate::KsError::Config(format!(
            "medium {medium} is already revoked"
        )));
    }
    Ok(row)
}

/// The error for a second enrolment of one identity.
pub fn already_enrolled(identity: &Identity) -> crate::KsError {
    crate::KsError::Config(format!("{identity} is already enrolled"))
}
