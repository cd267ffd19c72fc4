//! A security medium file (`qkdnet_media::format`), read back from a card or disk
//! where anyone may have changed it: any bytes give an error or a verified medium,
//! never a panic. A header that decodes re-encodes to the same bytes. With the
//! seed corpus's PIN (`fuzz`) and Argon2id at its cheapest, the counter record,
//! charge log and key slots are decoded too; costlier KDF parameters are skipped
//! so that one input cannot stall the fuzzer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_crypto::secret::SecretBytes;
use qkdnet_media::ChargeRecord;
use qkdnet_media::format::{
    HEADER_LEN, Header, SLOT_LEN, open_slot, plan_charge, record_for, unlock_metadata,
};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    assert_eq!(header.encode(), &data[..HEADER_LEN]);
    let kdf = header.spec.kdf;
    if kdf.memory_kib() > 64 || kdf.passes() > 1 || kdf.lanes() > 1 {
        return;
    }
    let Ok(m) = unlock_metadata(data, &SecretBytes::from_slice(b"fuzz")) else {
        return;
    };
    let layout = m.header.layout();
    let id = m.header.spec.id;
    let s = m.state;
    assert!(s.next <= s.end && s.end - s.next <= m.header.spec.capacity);
    for index in s.next..s.end.min(s.next + 64) {
        let record = record_for(&m.records, index).expect("live keys have a record");
        let at = usize::try_from(layout.slot_offset(index)).expect("small");
        let slot = data.get(at..at + SLOT_LEN).unwrap_or_default();
        let _ = open_slot(&m.keys, &id, record.epoch, index, slot);
    }
    let charge = ChargeRecord::new("fuzz", 0).expect("valid");
    let n = usize::from(data[data.len() - 1]);
    if let Ok(plan) = plan_charge(&m.header, &s, &m.records, n, charge) {
        assert!(plan.begin.seq > s.seq && plan.commit.seq > plan.begin.seq);
        assert_eq!(plan.commit.end, s.end + n as u64);
    }
});
