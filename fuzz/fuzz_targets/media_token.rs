//! The labels of a PKCS#11 medium's objects (`qkdnet_media::token`), read back
//! from a token that any program logged in to it may have written to: any bytes
//! give an error or a label that re-encodes to the same bytes, never a panic.
//! The input is also read as one label per line, the objects of a token, and
//! sorted out by `survey` into a medium or an error, never a panic; a medium
//! keeps the survey's promises (live groups and charges in order, disjoint,
//! above the counter, within the charged keys), and a charge planned on it
//! tiles the keys after the last one charged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_media::ChargeRecord;
use qkdnet_media::token::{GROUP_KEYS, Label, plan_charge, survey};

fuzz_target!(|data: &[u8]| {
    let mut objects = Vec::new();
    for (handle, line) in data.split(|&b| b == b'\n').enumerate() {
        if let Ok(label) = Label::decode(line) {
            assert_eq!(label.encode(), line);
            objects.push((handle, label));
        }
    }
    let Some(id) = objects.first().map(|(_, l)| l.id) else {
        return;
    };
    let Ok(s) = survey(id, &objects) else {
        return;
    };
    let st = s.state;
    assert!(st.next <= st.end && st.end - st.next <= s.header.1.capacity);
    for w in s.groups.windows(2) {
        assert!(w[0].1.end() <= w[1].1.first);
    }
    for w in s.charges.windows(2) {
        assert!(w[0].1.end() <= w[1].1.first);
    }
    for (h, g) in &s.groups {
        assert!(g.end() > st.next && g.end() <= st.end && g.epoch <= st.epoch);
        assert!(!s.destroy.contains(h));
    }
    for (h, c) in &s.charges {
        assert!(c.end() > st.next && c.end() <= st.end && c.epoch <= st.epoch);
        assert!(!s.destroy.contains(h));
    }
    let n = data.len() % 3000;
    let record = ChargeRecord::new("fuzz", 0).expect("valid");
    if let Ok(plan) = plan_charge(&s.header.1, &st, s.charges.len(), n, record) {
        assert_eq!(plan.commit.end, st.end + n as u64);
        assert!(plan.commit.seq > st.seq && plan.commit.epoch > st.epoch);
        let mut at = st.end;
        for g in &plan.groups {
            assert!(g.first == at && g.count >= 1 && g.count <= GROUP_KEYS);
            at = g.end();
        }
        assert_eq!(at, plan.commit.end);
    }
});
