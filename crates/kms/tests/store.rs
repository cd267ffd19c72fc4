//! The SQLite store's state machine: idempotent accept/void, tombstones,
//! exactly-once delivery, durability across an abrupt drop and a SIGKILL.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BLOCK_BYTES, SEED, TempDir, kme, sae};
use qkdnet_kms::block::KeyBlock;
use qkdnet_kms::store::{
    AcceptOutcome, Acceptance, IngestBatch, KeyStore, Reservation, SqliteStore, StoreError,
};
use qkdnet_kms::testkeys::seeded_block;
use uuid::Uuid;

fn batch(me: &str, peer: &str, block: KeyBlock) -> IngestBatch {
    let units = block.cut(&kme(me)).expect("valid block");
    IngestBatch {
        peer: kme(peer),
        link_id: block.link_id.clone(),
        block_number: block.block_number,
        eps_sec: 0.0,
        eps_cor: 0.0,
        created_unix_ms: 0,
        units,
        capacity_units: 1 << 20,
    }
}

async fn fill(store: &SqliteStore, me: &str, peer: &str, blocks: u64) {
    for n in 0..blocks {
        store
            .ingest(batch(
                me,
                peer,
                seeded_block(SEED, "ab", kme(peer), n, BLOCK_BYTES),
            ))
            .await
            .expect("ingest");
    }
}

fn reservation(number: u32) -> Reservation {
    Reservation {
        request_id: Uuid::new_v4(),
        peer: kme("kme-b"),
        master: sae("alice"),
        slave: sae("bob"),
        number,
        size_bits: 256,
        now_unix_ms: 0,
    }
}

#[tokio::test]
async fn reserve_accept_take_void_are_idempotent_and_exactly_once() {
    let dir = TempDir::new("store");
    let a = SqliteStore::open(&dir.0.join("a.sqlite")).expect("open");
    let b = SqliteStore::open(&dir.0.join("b.sqlite")).expect("open");
    fill(&a, "kme-a", "kme-b", 1).await;
    fill(&b, "kme-b", "kme-a", 1).await;
    // Duplicate blocks are refused.
    let dup = a
        .ingest(batch(
            "kme-a",
            "kme-b",
            seeded_block(SEED, "ab", kme("kme-b"), 0, BLOCK_BYTES),
        ))
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateBlock)));

    let r = reservation(3);
    let rid = r.request_id;
    let keys = a.reserve(r).await.expect("reserve");
    let acc = Acceptance {
        request_id: rid,
        peer: kme("kme-a"),
        master: sae("alice"),
        slave: sae("bob"),
        keys: keys.iter().map(|k| k.layout.clone()).collect(),
        now_unix_ms: 0,
    };
    assert_eq!(
        b.accept(acc.clone()).await.expect("accept"),
        AcceptOutcome::Accepted
    );
    assert_eq!(
        b.accept(acc.clone()).await.expect("retry"),
        AcceptOutcome::AlreadyAccepted
    );
    a.confirm(rid).await.expect("confirm");
    assert!(a.confirm(rid).await.is_err(), "confirm twice");

    // Take one key, then void: the other two come back, the taken one is reported delivered.
    let ids: Vec<Uuid> = keys.iter().map(|k| k.layout.key_id).collect();
    assert!(matches!(
        b.take(sae("carol"), sae("alice"), vec![ids[0]]).await,
        Err(StoreError::NotAuthorized)
    ));
    assert!(matches!(
        b.take(sae("bob"), sae("eve"), vec![ids[0]]).await,
        Err(StoreError::NotAuthorized)
    ));
    let got = b
        .take(sae("bob"), sae("alice"), vec![ids[0]])
        .await
        .expect("take");
    assert_eq!(&got[0].material[..], &keys[0].material[..]);
    assert!(matches!(
        b.take(sae("bob"), sae("alice"), vec![ids[0]]).await,
        Err(StoreError::KeysNotFound)
    ));
    let v1 = b.void(kme("kme-a"), rid).await.expect("void");
    assert!(v1.was_accepted);
    assert_eq!(
        v1.voided_keys.iter().copied().collect::<HashSet<_>>(),
        ids[1..].iter().copied().collect()
    );
    assert_eq!(b.void(kme("kme-a"), rid).await.expect("void again"), v1);
    assert!(matches!(
        b.accept(acc).await,
        Err(StoreError::RequestVoided)
    ));
    assert!(matches!(
        b.take(sae("bob"), sae("alice"), vec![ids[1]]).await,
        Err(StoreError::KeysNotFound)
    ));

    // A void that arrives before the reservation leaves a tombstone.
    let r2 = reservation(1);
    let rid2 = r2.request_id;
    let k2 = a.reserve(r2).await.expect("reserve");
    let v = b.void(kme("kme-a"), rid2).await.expect("void first");
    assert!(!v.was_accepted);
    let late = Acceptance {
        request_id: rid2,
        peer: kme("kme-a"),
        master: sae("alice"),
        slave: sae("bob"),
        keys: k2.iter().map(|k| k.layout.clone()).collect(),
        now_unix_ms: 0,
    };
    assert!(matches!(
        b.accept(late).await,
        Err(StoreError::RequestVoided)
    ));
    let before = a
        .pool_counts(kme("kme-b"))
        .await
        .expect("counts")
        .mine_available;
    a.release(rid2, Vec::new()).await.expect("release");
    assert_eq!(
        a.pool_counts(kme("kme-b"))
            .await
            .expect("counts")
            .mine_available,
        before + 1
    );
    // Units owned by A cannot be accepted at A as if B had reserved them.
    let forged = Acceptance {
        request_id: Uuid::new_v4(),
        peer: kme("kme-b"),
        master: sae("bob"),
        slave: sae("alice"),
        keys: k2.iter().map(|k| k.layout.clone()).collect(),
        now_unix_ms: 0,
    };
    assert!(matches!(
        a.accept(forged).await,
        Err(StoreError::UnitsUnavailable(_))
    ));
}

#[tokio::test]
async fn state_survives_an_abrupt_drop() {
    let dir = TempDir::new("store-drop");
    let path = dir.0.join("a.sqlite");
    let (rid, delivered, counts_before) = {
        let a = SqliteStore::open(&path).expect("open");
        fill(&a, "kme-a", "kme-b", 1).await;
        let r1 = reservation(2);
        let rid1 = r1.request_id;
        let delivered: Vec<Uuid> = a
            .reserve(r1)
            .await
            .expect("reserve")
            .iter()
            .map(|k| k.layout.key_id)
            .collect();
        a.confirm(rid1).await.expect("confirm");
        let r2 = reservation(1);
        let rid2 = r2.request_id;
        a.reserve(r2).await.expect("reserve");
        let counts = a.pool_counts(kme("kme-b")).await.expect("counts");
        (rid2, delivered, counts)
        // dropped without any shutdown
    };
    let a = SqliteStore::open(&path).expect("reopen");
    // The maintained counters equal the ones recomputed from the units at open.
    assert_eq!(
        a.pool_counts(kme("kme-b")).await.expect("counts"),
        counts_before
    );
    let pending = a.pending().await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].request_id, rid);
    // 32 units owned by A: 2 delivered, 1 pending.
    assert_eq!(
        a.pool_counts(kme("kme-b"))
            .await
            .expect("counts")
            .mine_available,
        29
    );
    let rest = a.reserve(reservation(29)).await.expect("reserve the rest");
    for k in &rest {
        assert!(!delivered.contains(&k.layout.key_id));
    }
}

/// Child side of the SIGKILL test: reserve and confirm keys in a loop, printing each
/// delivered key ID after its confirmation is durable, until killed.
#[tokio::test]
async fn crash_child() {
    let Ok(path) = std::env::var("QKDNET_KMS_CRASH_CHILD") else {
        return;
    };
    let a = SqliteStore::open(Path::new(&path)).expect("open");
    let a = std::sync::Arc::new(a);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let a = a.clone();
        tasks.spawn(async move {
            loop {
                let r = reservation(1);
                let rid = r.request_id;
                let Ok(k) = a.reserve(r).await else { return };
                if a.confirm(rid).await.is_ok() {
                    println!("KEY {}", k[0].layout.key_id);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[tokio::test]
async fn sigkill_during_load_neither_repeats_nor_loses_keys() {
    let dir = TempDir::new("store-kill");
    let path = dir.0.join("a.sqlite");
    let total = {
        let a = SqliteStore::open(&path).expect("open");
        fill(&a, "kme-a", "kme-b", 32).await; // 1024 units owned by A
        a.pool_counts(kme("kme-b"))
            .await
            .expect("counts")
            .mine_available
    };
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("QKDNET_KMS_CRASH_CHILD", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut delivered = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(id) = line.strip_prefix("KEY ") {
            delivered.push(Uuid::parse_str(id.trim()).expect("uuid"));
            if delivered.len() == 300 {
                child.kill().expect("SIGKILL"); // SIGKILL on Unix
                break;
            }
        }
    }
    let _ = child.wait();
    assert_eq!(
        delivered.len(),
        300,
        "child delivered keys before being killed"
    );
    let a = SqliteStore::open(&path).expect("reopen after SIGKILL");
    let pending = a.pending().await.expect("pending");
    let pending_units: u64 = pending.iter().map(|p| p.keys.len() as u64).sum();
    let available = a
        .pool_counts(kme("kme-b"))
        .await
        .expect("counts")
        .mine_available;
    // Keys confirmed after the last line we read are delivered but unseen: at most
    // the child's 8 workers' worth, plus the lines still in the pipe.
    let accounted = available + pending_units + delivered.len() as u64;
    assert!(
        accounted <= total,
        "more keys than ingested: {accounted} > {total}"
    );
    let rest = a
        .reserve(reservation(available as u32))
        .await
        .expect("reserve everything left");
    let seen: HashSet<Uuid> = delivered.iter().copied().collect();
    assert_eq!(
        seen.len(),
        delivered.len(),
        "a key was delivered twice before the kill"
    );
    for k in &rest {
        assert!(
            !seen.contains(&k.layout.key_id),
            "a delivered key came back after SIGKILL"
        );
    }
    for p in &pending {
        for k in &p.keys {
            assert!(
                !seen.contains(&k.key_id),
                "a delivered key is still pending"
            );
        }
    }
}
