//! The link-state database of one KME: how many units each KME of the network
//! owns on each of its links, as last advertised, and which neighbours did not
//! answer the last poll (see [`crate::relay`] for how routes use it).
//!
//! Pure data: the caller passes the time in (`now`), so ageing is tested without
//! waiting.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::ids::KmeId;
use crate::kme_wire::LinkState;

/// Link state older than this is ignored, and its KME presumed down.
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// The link-state database of one KME.
#[derive(Default)]
pub(crate) struct Lsdb {
    /// Each KME's latest advertisement and when it was merged.
    entries: HashMap<KmeId, (LinkState, Instant)>,
    /// Neighbours whose last poll failed.
    pub(crate) down: BTreeSet<KmeId>,
}

fn fresh_at(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < STALE_AFTER
}

impl Lsdb {
    /// Merges advertisements received at `now` (newer sequence numbers replace
    /// older; this KME's own entry, `me`, is never taken from a peer).
    pub(crate) fn merge(&mut self, states: Vec<LinkState>, me: &KmeId, now: Instant) {
        for st in states {
            if &st.kme == me {
                continue;
            }
            match self.entries.get(&st.kme) {
                Some((old, _)) if old.seq >= st.seq => {}
                _ => {
                    self.entries.insert(st.kme.clone(), (st, now));
                }
            }
        }
    }

    fn fresh(&self, kme: &KmeId, now: Instant) -> Option<&LinkState> {
        self.entries
            .get(kme)
            .filter(|(_, at)| fresh_at(*at, now))
            .map(|(s, _)| s)
    }

    /// A neighbour that did not answer, or a KME that advertised once but went quiet.
    pub(crate) fn presumed_down(&self, kme: &KmeId, now: Instant) -> bool {
        self.down.contains(kme)
            || self
                .entries
                .get(kme)
                .is_some_and(|(_, at)| !fresh_at(*at, now))
    }

    /// Units `from` owns on its link to `to`, if known and fresh.
    pub(crate) fn avail(&self, from: &KmeId, to: &KmeId, now: Instant) -> Option<u64> {
        self.fresh(from, now)?
            .links
            .iter()
            .find(|l| &l.peer == to)
            .map(|l| l.units)
    }

    /// The fresh advertisements, sorted by KME.
    pub(crate) fn snapshot(&self, now: Instant) -> Vec<LinkState> {
        let mut v: Vec<LinkState> = self
            .entries
            .values()
            .filter(|(_, at)| fresh_at(*at, now))
            .map(|(s, _)| s.clone())
            .collect();
        v.sort_by(|a, b| a.kme.cmp(&b.kme));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kme_wire::LinkAvail;

    fn k(s: &str) -> KmeId {
        KmeId::new(s).expect("valid")
    }

    #[test]
    fn link_state_merges_newer_and_ages_out() {
        let t0 = Instant::now();
        let mut db = Lsdb::default();
        let st = |seq, units| LinkState {
            kme: k("b"),
            seq,
            links: vec![LinkAvail {
                peer: k("c"),
                units,
            }],
        };
        db.merge(vec![st(10, 5)], &k("a"), t0);
        db.merge(vec![st(9, 1)], &k("a"), t0); // older: ignored
        assert_eq!(db.avail(&k("b"), &k("c"), t0), Some(5));
        db.merge(vec![st(11, 7)], &k("a"), t0);
        assert_eq!(db.avail(&k("b"), &k("c"), t0), Some(7));
        assert_eq!(db.avail(&k("c"), &k("b"), t0), None);
        db.merge(
            vec![LinkState {
                kme: k("a"),
                seq: 99,
                links: vec![],
            }],
            &k("a"),
            t0,
        ); // own entry from a peer: ignored
        assert!(db.fresh(&k("a"), t0).is_none());
        assert!(!db.presumed_down(&k("b"), t0));
        assert_eq!(db.snapshot(t0).len(), 1);
        let later = t0 + STALE_AFTER + Duration::from_secs(1);
        assert!(db.presumed_down(&k("b"), later));
        assert_eq!(db.avail(&k("b"), &k("c"), later), None);
        assert!(db.snapshot(later).is_empty());
    }
}
