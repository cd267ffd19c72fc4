//! The PKCS#11 medium's objects, version 1: what each token object says, and
//! the pure rules that decide, from the objects a token holds, which keys are
//! live, which objects a crash left behind, and what a charge creates.
//!
//! Everything here works on values and does no PKCS#11 call ([`crate::pkcs11`]
//! lists, reads, creates and destroys the objects this module describes), so
//! the label parser can be fuzzed and the recovery rules tested without a token.
//!
//! # Why it is shaped this way
//!
//! A PKCS#11 token offers few ways to change what it holds, and each costs
//! something different. On SoftHSM2 (file back end) a data object's
//! `CKA_VALUE` cannot be changed once created (the standard marks it
//! read-only; SoftHSM2 answers `CKR_ATTRIBUTE_READ_ONLY`), `CKA_LABEL` can,
//! creating an object costs a file, and destroying one re-lists the whole token
//! directory. Both grow with the number of objects in the token: with 200,
//! creating took 3.5 ms and destroying 3.7 ms on the project's machine; with
//! 2,000, 15 ms and 36 ms. One object per key would, extrapolating, take hours
//! to charge 130,000 keys and seconds to take each. So:
//!
//! - **Keys are packed**: a *key group* object holds up to [`GROUP_KEYS`]
//!   consecutive keys of one charge, 32 bytes each, in its `CKA_VALUE`
//!   (130,000 keys: 127 objects, 4.2 MB in SoftHSM2's directory). A charge
//!   never touches an existing group. Groups of 1,024 keys charge 130,000 keys
//!   three times faster than groups of 256 and take a key as fast as groups of
//!   4,096, which rewrite four times as many bytes per key taken
//!   (BENCHMARKS.md has the runs).
//! - **A used key is erased by shrinking its group.** Taking key `i` creates a
//!   copy of its group that starts at `i + 1` and then destroys the old group
//!   (or only destroys it, if `i` was its last key). No object on the token
//!   holds a key below the counter once `take_next` returns.
//! - **The counter lives in two labels.** Two *state* objects carry the
//!   counter record as their `CKA_LABEL`, the one modifiable attribute of a
//!   data object; state `seq` is written to the object not holding the newest
//!   state, so a write torn by a crash (SoftHSM2 truncates an object's file and
//!   rewrites it, and an emptied file becomes an invisible, invalid object)
//!   leaves the other state in force, exactly as the file medium's two counter
//!   copies do.
//! - **Every object carries its own description** in its label, readable with
//!   any PKCS#11 tool, so opening a medium reads labels only (one short
//!   attribute per object) and no key bytes.
//! - **A charge is live once the state says so.** Charge `e` (the state's
//!   `epoch` after it) first creates its groups and its charge record, all
//!   tagged `epoch=e`, and then writes the state with `epoch=e` and the new
//!   `end`. Objects of an epoch above the state's are leftovers of a charge that
//!   did not commit and are destroyed before anything else happens.
//!
//! # Labels
//!
//! All objects are private token objects of class `CKO_DATA` with
//! `CKA_APPLICATION` = [`APPLICATION`]. The label names the medium (its UUID,
//! hyphenated, lower case) and the object's role; numbers are decimal without
//! leading zeros; the free-text field, if any, comes last and runs to the end.
//!
//! | object | label | value |
//! |---|---|---|
//! | header (one) | `<id> medium capacity=<C> charges=<L> owner=<owner>` | empty |
//! | state (two) | `<id> state seq=<s> next=<n> end=<e> epoch=<p>` | empty |
//! | charge record (one per live charge) | `<id> charge epoch=<p> first=<f> count=<c> at=<t> by=<charger>` | empty |
//! | key group | `<id> keys epoch=<p> first=<f> count=<c>` | `c` keys of 32 bytes, key `f` first |
//!
//! `C` is the capacity (most unused keys), `L` the most charges with unused
//! keys at once; `next` is the next key to hand out, `end` one past the last key
//! charged, `epoch` the number of the last committed charge.
//!
//! # Opening: what a crash can leave and what becomes of it
//!
//! | found | cause | action |
//! |---|---|---|
//! | one state object, or a torn one | killed while writing the state | the valid one rules; a second is created |
//! | objects with `epoch` above the state's | killed while charging | destroyed |
//! | a group or charge all of whose keys are below `next` | killed after the counter moved | destroyed |
//! | two groups of one epoch ending at the same key | killed while shrinking a group | the shorter one is kept |
//! | a group starting below `next` | killed between the counter and the erasure | shrunk to start at `next` |
//! | no group for key `next` | the counter rolled back after its key was erased | `take_next` reports [`MediaError::KeyMissing`] and moves on |

use uuid::Uuid;

use crate::error::{MediaError, Result};
use crate::format::{MAX_CAPACITY, MAX_LOG_RECORDS, MediumSpec};
use crate::medium::{
    ChargeEntry, ChargeRecord, KEY_LEN, MAX_CHARGER_LEN, MAX_OWNER_LEN, check_charge, check_text,
};

/// `CKA_APPLICATION` of every object of every medium.
pub const APPLICATION: &[u8] = b"qkdnet-media/v1";

/// Most keys in one key group object (32 KiB of value).
pub const GROUP_KEYS: u64 = 1024;

/// Longest label this version writes (a header with the longest owner).
pub const MAX_LABEL_LEN: usize =
    36 + " medium capacity= charges= owner=".len() + 20 + 10 + MAX_OWNER_LEN;

/// What the header object says: the medium's identity and sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Most unused keys the medium holds at once.
    pub capacity: u64,
    /// Most charges with unused keys at once.
    pub charges: u32,
    /// The owner (e.g. a SIP URI).
    pub owner: String,
}

impl Header {
    /// The header of a new medium described by `spec` (whose Argon2id
    /// parameters a token does not use: the token checks its own PIN).
    pub fn from_spec(spec: &MediumSpec) -> Result<Self> {
        spec.check()?;
        Ok(Self {
            capacity: spec.capacity,
            charges: spec.log_capacity,
            owner: spec.owner.clone(),
        })
    }
}

/// The counter record a state object carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Sequence number: each write of the state increments it.
    pub seq: u64,
    /// Index of the next key to hand out.
    pub next: u64,
    /// One past the last key charged.
    pub end: u64,
    /// Number of the last committed charge (0: none yet).
    pub epoch: u64,
}

impl State {
    /// The state to write next, with `seq` advanced.
    pub fn successor(&self) -> Result<Self> {
        Ok(Self {
            seq: self
                .seq
                .checked_add(1)
                .ok_or(MediaError::Inconsistent("counter sequence exhausted"))?,
            ..*self
        })
    }
}

/// A charge as its record object describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// The charge's number.
    pub epoch: u64,
    /// Index of its first key.
    pub first: u64,
    /// Number of keys (at least 1).
    pub count: u64,
    /// Who charged and when.
    pub record: ChargeRecord,
}

impl Charge {
    /// One past its last key.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }

    /// The charge as status reports it.
    pub fn entry(&self) -> ChargeEntry {
        ChargeEntry {
            record: self.record.clone(),
            count: self.count,
            first: self.first,
            last: self.end() - 1,
        }
    }
}

/// A key group: which keys its value holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// The charge the keys came with.
    pub epoch: u64,
    /// Index of the first key in the value.
    pub first: u64,
    /// Number of keys (at least 1).
    pub count: u64,
}

impl Group {
    /// One past its last key.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }

    /// Length of its value in bytes.
    pub fn value_len(&self) -> usize {
        // count <= GROUP_KEYS for groups this crate writes; decode bounds it by
        // MAX_CAPACITY (2^24), so the product fits.
        self.count as usize * KEY_LEN
    }

    /// The group that is left once the keys before `from` are erased, if any
    /// key is left.
    pub fn from(&self, from: u64) -> Option<Self> {
        (from < self.end()).then(|| Self {
            epoch: self.epoch,
            first: from.max(self.first),
            count: self.end() - from.max(self.first),
        })
    }

    /// The bytes of key `index` within the group's value, which must have
    /// [`Self::value_len`] bytes.
    pub fn key_range(&self, index: u64) -> Option<core::ops::Range<usize>> {
        if index < self.first || index >= self.end() {
            return None;
        }
        let at = (index - self.first) as usize * KEY_LEN;
        Some(at..at + KEY_LEN)
    }
}

/// What an object is, by its label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The medium's header.
    Header(Header),
    /// One of the two state objects.
    State(State),
    /// A charge record.
    Charge(Charge),
    /// A key group.
    Keys(Group),
}

/// A decoded label: which medium an object belongs to and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The medium's ID.
    pub id: Uuid,
    /// The object's role.
    pub role: Role,
}

impl Label {
    /// The label's bytes (ASCII but for the owner and charger, which are UTF-8).
    pub fn encode(&self) -> Vec<u8> {
        let id = self.id.hyphenated();
        match &self.role {
            Role::Header(h) => format!(
                "{id} medium capacity={} charges={} owner={}",
                h.capacity, h.charges, h.owner
            ),
            Role::State(s) => format!(
                "{id} state seq={} next={} end={} epoch={}",
                s.seq, s.next, s.end, s.epoch
            ),
            Role::Charge(c) => format!(
                "{id} charge epoch={} first={} count={} at={} by={}",
                c.epoch,
                c.first,
                c.count,
                c.record.charged_at(),
                c.record.charger()
            ),
            Role::Keys(g) => format!(
                "{id} keys epoch={} first={} count={}",
                g.epoch, g.first, g.count
            ),
        }
        .into_bytes()
    }

    /// Decodes a label. Strict: exactly the form [`Self::encode`] writes, so
    /// that a decoded label re-encodes to the same bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_LABEL_LEN {
            return Err(MediaError::BadLabel("too long"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| MediaError::BadLabel("not UTF-8"))?;
        let mut f = Fields(text);
        let id_text = f.word()?;
        let id = Uuid::try_parse(id_text).map_err(|_| MediaError::BadLabel("not a medium ID"))?;
        if id.hyphenated().to_string() != id_text {
            return Err(MediaError::BadLabel(
                "the medium ID is not hyphenated lower case",
            ));
        }
        let role = match f.word()? {
            "medium" => {
                let capacity = f.number("capacity")?;
                let charges = f.number("charges")?;
                let owner = f.rest("owner")?;
                check_text(owner, MAX_OWNER_LEN).map_err(|_| MediaError::BadLabel("owner"))?;
                if capacity == 0 || capacity > MAX_CAPACITY {
                    return Err(MediaError::BadLabel("capacity"));
                }
                let charges = u32::try_from(charges)
                    .ok()
                    .filter(|c| (1..=MAX_LOG_RECORDS).contains(c))
                    .ok_or(MediaError::BadLabel("charges"))?;
                Role::Header(Header {
                    capacity,
                    charges,
                    owner: owner.to_owned(),
                })
            }
            "state" => {
                let s = State {
                    seq: f.number("seq")?,
                    next: f.number("next")?,
                    end: f.number("end")?,
                    epoch: f.number("epoch")?,
                };
                f.finish()?;
                if s.next > s.end {
                    return Err(MediaError::BadLabel("more keys used than charged"));
                }
                Role::State(s)
            }
            "charge" => {
                let epoch = f.number("epoch")?;
                let (first, count) = range(&mut f)?;
                let at = f.number("at")?;
                let by = f.rest("by")?;
                check_text(by, MAX_CHARGER_LEN).map_err(|_| MediaError::BadLabel("charger"))?;
                let record =
                    ChargeRecord::new(by, at).map_err(|_| MediaError::BadLabel("charger"))?;
                Role::Charge(Charge {
                    epoch,
                    first,
                    count,
                    record,
                })
            }
            "keys" => {
                let epoch = f.number("epoch")?;
                let (first, count) = range(&mut f)?;
                f.finish()?;
                Role::Keys(Group {
                    epoch,
                    first,
                    count,
                })
            }
            _ => return Err(MediaError::BadLabel("unknown object role")),
        };
        Ok(Self { id, role })
    }
}

/// `first=<f> count=<c>` with `1 <= c <= MAX_CAPACITY` and no overflow.
fn range(f: &mut Fields<'_>) -> Result<(u64, u64)> {
    let first = f.number("first")?;
    let count = f.number("count")?;
    if count == 0 || count > MAX_CAPACITY || first.checked_add(count).is_none() {
        return Err(MediaError::BadLabel("key range"));
    }
    Ok((first, count))
}

/// A cursor over a label's space-separated fields.
struct Fields<'a>(&'a str);

impl<'a> Fields<'a> {
    /// The next field, up to a space or the end.
    fn word(&mut self) -> Result<&'a str> {
        let (word, rest) = match self.0.split_once(' ') {
            Some((w, r)) if !r.is_empty() => (w, r),
            Some(_) => return Err(MediaError::BadLabel("trailing space")),
            None => (self.0, ""),
        };
        if word.is_empty() {
            return Err(MediaError::BadLabel("missing field"));
        }
        self.0 = rest;
        Ok(word)
    }

    /// `key=<decimal u64>`, no sign, no leading zeros.
    fn number(&mut self, key: &str) -> Result<u64> {
        let value = self
            .word()?
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix('='))
            .ok_or(MediaError::BadLabel("unexpected field"))?;
        let canonical = !value.is_empty()
            && value.bytes().all(|b| b.is_ascii_digit())
            && (value == "0" || !value.starts_with('0'));
        if !canonical {
            return Err(MediaError::BadLabel("not a decimal number"));
        }
        value
            .parse()
            .map_err(|_| MediaError::BadLabel("number too large"))
    }

    /// `key=<text>` running to the end of the label.
    fn rest(&mut self, key: &str) -> Result<&'a str> {
        let text = self
            .0
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix('='))
            .ok_or(MediaError::BadLabel("unexpected field"))?;
        self.0 = "";
        Ok(text)
    }

    /// Nothing may follow.
    fn finish(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(MediaError::BadLabel("trailing fields"))
        }
    }
}

/// A medium as found on a token: what is live, and what to destroy or repair
/// before anything is handed out. `H` is the token's object handle.
#[derive(Debug)]
pub struct Survey<H> {
    /// The header object and what it says.
    pub header: (H, Header),
    /// The newest valid state.
    pub state: State,
    /// The object holding [`Self::state`], and the other state object if there
    /// is one (a torn write can leave only one).
    pub state_objects: (H, Option<H>),
    /// Live key groups in key order, disjoint, each holding a key at or above
    /// `next`. The first may start below `next` (the erasure of a used key was
    /// cut short): it must be shrunk before a key is taken.
    pub groups: Vec<(H, Group)>,
    /// Live charges (with a key at or above `next`) in key order.
    pub charges: Vec<(H, Charge)>,
    /// Objects to destroy: leftovers of uncommitted charges, used groups and
    /// charges, groups a shrink replaced, surplus state objects.
    pub destroy: Vec<H>,
}

/// Sorts out the objects of medium `id` (labels already decoded; objects of
/// other media are ignored) as the table in the [module](self) documentation
/// says. Fails with [`MediaError::NoMedium`] if the header is missing (no
/// medium, or a creation cut short), [`MediaError::CorruptState`] if no state
/// object is valid, and [`MediaError::Inconsistent`] for objects that no crash
/// can produce.
pub fn survey<H: Copy>(id: Uuid, objects: &[(H, Label)]) -> Result<Survey<H>> {
    let mut headers = Vec::new();
    let mut states = Vec::new();
    let mut groups = Vec::new();
    let mut charges = Vec::new();
    for (h, label) in objects.iter().filter(|(_, l)| l.id == id) {
        match &label.role {
            Role::Header(x) => headers.push((*h, x.clone())),
            Role::State(s) => states.push((*h, *s)),
            Role::Charge(c) => charges.push((*h, c.clone())),
            Role::Keys(g) => groups.push((*h, *g)),
        }
    }
    let header = match headers.len() {
        0 => return Err(MediaError::NoMedium { id: Some(id) }),
        1 => headers.remove(0),
        _ => return Err(MediaError::Inconsistent("several medium headers")),
    };
    let mut destroy = Vec::new();
    // The newest state rules; one other state object is kept to write to.
    states.sort_by_key(|(_, s)| core::cmp::Reverse(s.seq));
    let mut states = states.into_iter();
    let (newest, state) = states.next().ok_or(MediaError::CorruptState)?;
    let other = states.next().map(|(h, _)| h);
    destroy.extend(states.map(|(h, _)| h));
    if state.end - state.next > header.1.capacity {
        return Err(MediaError::Inconsistent(
            "more unused keys than the capacity",
        ));
    }

    let live = |epoch: u64, end: u64, destroy: &mut Vec<H>, h: H| -> Result<bool> {
        if epoch > state.epoch || end <= state.next {
            destroy.push(h);
            return Ok(false);
        }
        if end > state.end {
            return Err(MediaError::Inconsistent(
                "a committed object holds keys beyond the charged ones",
            ));
        }
        Ok(true)
    };

    let mut kept: Vec<(H, Group)> = Vec::new();
    groups.sort_by_key(|(_, g)| g.first);
    for (h, g) in groups {
        if !live(g.epoch, g.end(), &mut destroy, h)? {
            continue;
        }
        match kept.last_mut() {
            Some((kh, k)) if g.first < k.end() => {
                // A shrink cut short leaves the old group and its shorter copy:
                // same charge, same last key. The shorter one is newer.
                if g.end() != k.end() || g.epoch != k.epoch {
                    return Err(MediaError::Inconsistent("key groups overlap"));
                }
                destroy.push(*kh);
                *kh = h;
                *k = g;
            }
            _ => kept.push((h, g)),
        }
    }

    let mut live_charges: Vec<(H, Charge)> = Vec::new();
    charges.sort_by_key(|(_, c)| c.first);
    for (h, c) in charges {
        if !live(c.epoch, c.end(), &mut destroy, h)? {
            continue;
        }
        if live_charges.last().is_some_and(|(_, p)| c.first < p.end()) {
            return Err(MediaError::Inconsistent("charge records overlap"));
        }
        live_charges.push((h, c));
    }

    Ok(Survey {
        header,
        state,
        state_objects: (newest, other),
        groups: kept,
        charges: live_charges,
        destroy,
    })
}

/// What a charge creates and writes, in order: the `groups` and the `charge`
/// record (all tagged with the new epoch), then `commit`, the state that makes
/// them live.
#[derive(Debug)]
pub struct ChargePlan {
    /// The key groups, in key order, at most [`GROUP_KEYS`] keys each.
    pub groups: Vec<Group>,
    /// The charge record.
    pub charge: Charge,
    /// The state that makes the charge live.
    pub commit: State,
}

/// Plans charging `count` keys: checks the capacity and the number of live
/// charges (`live_charges`, those with unused keys), numbers the charge and
/// splits its keys into groups.
pub fn plan_charge(
    header: &Header,
    state: &State,
    live_charges: usize,
    count: usize,
    record: ChargeRecord,
) -> Result<ChargePlan> {
    let requested = check_charge(count, header.capacity, state.end - state.next)?;
    if live_charges >= header.charges as usize {
        return Err(MediaError::ChargeLogFull {
            records: header.charges,
        });
    }
    let epoch = state
        .epoch
        .checked_add(1)
        .ok_or(MediaError::Inconsistent("charge numbers exhausted"))?;
    let first = state.end;
    let end = first
        .checked_add(requested)
        .ok_or(MediaError::Inconsistent("key indices exhausted"))?;
    let groups = (first..end)
        .step_by(GROUP_KEYS as usize)
        .map(|f| Group {
            epoch,
            first: f,
            count: GROUP_KEYS.min(end - f),
        })
        .collect();
    let mut commit = state.successor()?;
    commit.end = end;
    commit.epoch = epoch;
    Ok(ChargePlan {
        groups,
        charge: Charge {
            epoch,
            first,
            count: requested,
            record,
        },
        commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    const OTHER: Uuid = Uuid::from_u128(7);

    fn header() -> Header {
        Header {
            capacity: 100,
            charges: 4,
            owner: "sip:alice@example.org".into(),
        }
    }

    fn label(role: Role) -> Label {
        Label { id: ID, role }
    }

    fn state(seq: u64, next: u64, end: u64, epoch: u64) -> Role {
        Role::State(State {
            seq,
            next,
            end,
            epoch,
        })
    }

    fn keys(epoch: u64, first: u64, count: u64) -> Role {
        Role::Keys(Group {
            epoch,
            first,
            count,
        })
    }

    fn charge(epoch: u64, first: u64, count: u64) -> Role {
        Role::Charge(Charge {
            epoch,
            first,
            count,
            record: ChargeRecord::new("charger 1", 1_750_000_000).expect("valid"),
        })
    }

    #[test]
    fn labels_read_as_documented_and_round_trip() {
        let cases = [
            (
                Role::Header(header()),
                "01234567-89ab-cdef-0123-456789abcdef medium capacity=100 charges=4 owner=sip:alice@example.org",
            ),
            (
                state(7, 3, 10, 2),
                "01234567-89ab-cdef-0123-456789abcdef state seq=7 next=3 end=10 epoch=2",
            ),
            (
                charge(2, 0, 10),
                "01234567-89ab-cdef-0123-456789abcdef charge epoch=2 first=0 count=10 at=1750000000 by=charger 1",
            ),
            (
                keys(2, 3, 7),
                "01234567-89ab-cdef-0123-456789abcdef keys epoch=2 first=3 count=7",
            ),
        ];
        for (role, text) in cases {
            let l = label(role);
            assert_eq!(String::from_utf8(l.encode()).expect("utf-8"), text);
            assert_eq!(Label::decode(text.as_bytes()).expect(text), l);
        }
        let longest = label(Role::Header(Header {
            capacity: MAX_CAPACITY,
            charges: MAX_LOG_RECORDS,
            owner: "ö".repeat(MAX_OWNER_LEN / 2),
        }));
        assert!(longest.encode().len() <= MAX_LABEL_LEN);
        assert_eq!(Label::decode(&longest.encode()).expect("longest"), longest);
    }

    #[test]
    fn malformed_labels_are_refused() {
        let id = "01234567-89ab-cdef-0123-456789abcdef";
        let bad = [
            String::new(),
            id.to_owned(),
            format!("{id} state"),
            format!("{id} state seq=1 next=0 end=0"),
            format!("{id} state seq=1 next=0 end=0 epoch=0 more"),
            format!("{id} state seq=1 next=0 end=0 epoch=0 "),
            format!("{id} keys epoch=1 first=0 count=1 "),
            format!("{id} state seq=01 next=0 end=0 epoch=0"),
            format!("{id} state seq=+1 next=0 end=0 epoch=0"),
            format!("{id} state seq=1 next=1 end=0 epoch=0"),
            format!("{id} state seq=18446744073709551616 next=0 end=0 epoch=0"),
            format!("{id} state  seq=1 next=0 end=0 epoch=0"),
            format!("{id} state next=0 seq=1 end=0 epoch=0"),
            format!("{id} keys epoch=1 first=0 count=0"),
            format!("{id} keys epoch=1 first=18446744073709551615 count=1"),
            format!("{id} keys epoch=1 first=0 count=16777217"),
            format!("{id} charge epoch=1 first=0 count=1 at=0 by="),
            format!("{id} charge epoch=1 first=0 count=1 at=0 by=a\u{7}"),
            format!("{id} medium capacity=0 charges=1 owner=a"),
            format!("{id} medium capacity=1 charges=0 owner=a"),
            format!("{id} medium capacity=1 charges=1 owner="),
            format!("{id} medium capacity=1 charges=1"),
            format!("{id} vault"),
            "01234567-89AB-CDEF-0123-456789ABCDEF keys epoch=1 first=0 count=1".into(),
            "0123456789abcdef0123456789abcdef keys epoch=1 first=0 count=1".into(),
            format!("{id} medium capacity=1 charges=1 owner={}", "x".repeat(300)),
        ];
        for text in bad {
            assert!(
                matches!(Label::decode(text.as_bytes()), Err(MediaError::BadLabel(_))),
                "accepted: {text:?}"
            );
        }
        assert!(Label::decode(&[0xff, 0xfe]).is_err());
    }

    fn objects(roles: Vec<Role>) -> Vec<(u32, Label)> {
        let mut v: Vec<(u32, Label)> = (0u32..).zip(roles.into_iter().map(label)).collect();
        // Another medium's objects are ignored.
        v.push((
            99,
            Label {
                id: OTHER,
                role: state(100, 0, 0, 0),
            },
        ));
        v
    }

    #[test]
    fn a_clean_medium_is_surveyed_as_it_is() {
        let objs = objects(vec![
            Role::Header(header()),
            state(4, 3, 12, 2),
            state(3, 0, 12, 2),
            keys(1, 3, 7),
            keys(2, 10, 2),
            charge(1, 0, 10),
            charge(2, 10, 2),
        ]);
        let s = survey(ID, &objs).expect("survey");
        assert_eq!(s.header, (0, header()));
        assert_eq!((s.state.seq, s.state.next), (4, 3));
        assert_eq!(s.state_objects, (1, Some(2)));
        assert_eq!(
            s.groups.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(
            s.charges.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert!(s.destroy.is_empty());
    }

    #[test]
    fn leftovers_of_crashes_are_destroyed_or_repaired() {
        let objs = objects(vec![
            Role::Header(header()), // 0
            state(9, 6, 12, 2),     // 1: the only state (the other was torn)
            keys(1, 0, 3),          // 2: all used
            keys(1, 3, 7),          // 3: a shrink cut short left the old group ...
            keys(1, 6, 4),          // 4: ... and its shorter copy
            keys(2, 10, 2),         // 5: live
            keys(3, 12, 5),         // 6: a charge that did not commit
            charge(1, 0, 10),       // 7: live (keys 6..10 unused)
            charge(2, 10, 2),       // 8: live
            charge(3, 12, 5),       // 9: did not commit
        ]);
        let s = survey(ID, &objs).expect("survey");
        assert_eq!(s.state_objects, (1, None));
        let mut destroyed = s.destroy.clone();
        destroyed.sort_unstable();
        assert_eq!(destroyed, vec![2, 3, 6, 9]);
        let groups: Vec<_> = s.groups.iter().map(|(h, g)| (*h, g.first)).collect();
        assert_eq!(groups, vec![(4, 6), (5, 10)]);
        assert_eq!(s.charges.len(), 2);

        // A counter that rolled back after key 5 was erased: no group holds key
        // 5, which the survey leaves to take_next to report.
        let objs = objects(vec![
            Role::Header(header()),
            state(2, 5, 10, 1),
            keys(1, 6, 4),
            charge(1, 0, 10),
        ]);
        let s = survey(ID, &objs).expect("survey");
        assert_eq!(s.groups[0].1.first, 6);
        assert!(s.destroy.is_empty());

        // A group straddling next is kept, to be shrunk by the caller.
        let objs = objects(vec![
            Role::Header(header()),
            state(2, 4, 10, 1),
            keys(1, 0, 10),
            charge(1, 0, 10),
        ]);
        let s = survey(ID, &objs).expect("survey");
        assert_eq!(
            s.groups,
            vec![(
                2,
                Group {
                    epoch: 1,
                    first: 0,
                    count: 10
                }
            )]
        );
        assert!(s.destroy.is_empty());
    }

    #[test]
    fn what_no_crash_can_produce_is_refused() {
        let no_header = objects(vec![state(1, 0, 0, 0)]);
        assert!(matches!(
            survey(ID, &no_header),
            Err(MediaError::NoMedium { id: Some(ID) })
        ));
        let no_state = objects(vec![Role::Header(header())]);
        assert!(matches!(
            survey(ID, &no_state),
            Err(MediaError::CorruptState)
        ));
        let cases = [
            vec![
                Role::Header(header()),
                Role::Header(header()),
                state(1, 0, 0, 0),
            ],
            vec![Role::Header(header()), state(1, 0, 101, 1)],
            vec![
                Role::Header(header()),
                state(1, 0, 10, 1),
                keys(1, 0, 6),
                keys(1, 4, 3),
            ],
            vec![Role::Header(header()), state(1, 0, 10, 1), keys(1, 5, 6)],
            vec![
                Role::Header(header()),
                state(1, 0, 10, 2),
                charge(1, 0, 6),
                charge(2, 4, 6),
            ],
        ];
        for roles in cases {
            let objs = objects(roles.clone());
            assert!(
                matches!(survey(ID, &objs), Err(MediaError::Inconsistent(_))),
                "{roles:?}"
            );
        }
    }

    #[test]
    fn a_charge_is_split_into_groups_and_checked_against_capacity_and_charges() {
        let h = Header {
            capacity: 5000,
            charges: 2,
            owner: "o".into(),
        };
        let s = State {
            seq: 3,
            next: 10,
            end: 10,
            epoch: 1,
        };
        let r = || ChargeRecord::new("c", 0).expect("valid");
        let p = plan_charge(&h, &s, 0, 2500, r()).expect("plan");
        let g: Vec<_> = p
            .groups
            .iter()
            .map(|g| (g.epoch, g.first, g.count))
            .collect();
        assert_eq!(g, vec![(2, 10, 1024), (2, 1034, 1024), (2, 2058, 452)]);
        assert_eq!(
            (p.charge.first, p.charge.count, p.charge.epoch),
            (10, 2500, 2)
        );
        assert_eq!(
            p.commit,
            State {
                seq: 4,
                next: 10,
                end: 2510,
                epoch: 2
            }
        );
        assert!(matches!(
            plan_charge(&h, &s, 0, 0, r()),
            Err(MediaError::EmptyCharge)
        ));
        assert!(matches!(
            plan_charge(&h, &s, 0, 5001, r()),
            Err(MediaError::CapacityExceeded {
                requested: 5001,
                free: 5000
            })
        ));
        assert!(matches!(
            plan_charge(&h, &s, 2, 1, r()),
            Err(MediaError::ChargeLogFull { records: 2 })
        ));
    }

    #[test]
    fn a_group_shrinks_to_the_keys_left() {
        let g = Group {
            epoch: 1,
            first: 10,
            count: 3,
        };
        assert_eq!(g.from(5), Some(g));
        assert_eq!(
            g.from(11),
            Some(Group {
                epoch: 1,
                first: 11,
                count: 2
            })
        );
        assert_eq!(g.from(13), None);
        assert_eq!(g.key_range(9), None);
        assert_eq!(g.key_range(11), Some(32..64));
        assert_eq!(g.key_range(13), None);
        assert_eq!(g.value_len(), 96);
    }
}
