//! The key store's state machine on both backends: idempotent accept/void,
//! tombstones, exactly-once delivery under concurrency, durability across an abrupt
//! drop, and two KMEs' stores killed with SIGKILL under load, recovered, and checked
//! to agree on which keys remain.
//!
//! Each behaviour is one `async fn` taking a [`Backend`]; `on_both_backends!` turns
//! it into `<name>::sqlite` (always run) and `<name>::postgres` (run against the
//! server in `QKDNET_TEST_PG`, which scripts/postgres.sh starts; skipped with a
//! message when unset, and a failure when unset in CI).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{BLOCK_BYTES, Net, SEED, TempDir, key_ids_body, keys_of, kme, sae};
use hyper::StatusCode;
use qkdnet_kms::block::KeyBlock;
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::store::MasterKey;

use qkdnet_kms::store::postgres::{PostgresOptions, PostgresUrl, SchemaName};
use qkdnet_kms::store::sqlite::Durability;
use qkdnet_kms::store::{
    AcceptOutcome, Acceptance, IngestBatch, KeyStore, PostgresStore, REPLAY_WINDOW_MS, Replay,
    ReplayRequest, Reservation, ReservedKey, SqliteStore, StoreError,
};
use qkdnet_kms::testkeys::seeded_block;
use uuid::Uuid;

/// The wall clock, as the KME passes it into the store.
fn now() -> u64 {
    qkdnet_kms::clock::now_ms()
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::sqlite(stringify!($name))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(b) = super::Backend::postgres(stringify!($name)).await {
                    super::$name(b).await
                }
            }
        }
    )*};
}

on_both_backends!(
    reserve_accept_take_void_are_idempotent_and_exactly_once,
    state_survives_an_abrupt_drop,
    concurrent_transitions_never_hand_a_unit_twice,
    sigkill_during_load_neither_repeats_nor_loses_keys,
    accept_take_spends_a_relay_hop_in_one_step,
    keys_of_several_units_keep_their_layout,
    units_return_in_any_order_and_keys_cross_blocks,
    issue_18_item_8_a_copy_of_the_store_holds_no_key_material,
    issue_18_item_8_another_master_key_or_none_is_refused,
    issue_18_item_8_a_plaintext_store_is_encrypted_at_open_and_keeps_its_keys,
    answered_requests_replay_once_under_their_replay_key,
);

/// Where a test's stores live: files in a temporary directory, or schemas on the
/// test PostgreSQL server. A store is named (`"a"`, `"b"`) within the backend.
#[derive(Clone)]
enum Backend {
    Sqlite {
        dir: PathBuf,
        /// Removes the directory when the last clone goes (absent in a crash child,
        /// which must leave the parent's files alone).
        _owner: Option<Arc<TempDir>>,
    },
    Postgres {
        url: String,
        /// Schema prefix, unique per test.
        prefix: String,
    },
}

impl Backend {
    fn sqlite(test: &str) -> Self {
        let dir = TempDir::new(&format!("store-{:08x}", fnv32(test)));
        Backend::Sqlite {
            dir: dir.0.clone(),
            _owner: Some(Arc::new(dir)),
        }
    }

    /// The PostgreSQL backend, with this test's schemas from earlier runs dropped.
    async fn postgres(test: &str) -> Option<Self> {
        let url = common::test_pg_url(&format!("{test}::postgres"))?;
        let prefix = format!("t{:08x}", fnv32(test));
        let client = raw_pg(&url).await;
        let stale = client
            .query(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                &[&format!("{prefix}\\_%")],
            )
            .await
            .expect("list schemas");
        for row in stale {
            let name: String = row.get(0);
            client
                .batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE"))
                .await
                .expect("drop stale schema");
        }
        Some(Backend::Postgres { url, prefix })
    }

    /// Opens store `name`, its material encrypted under [`test_master_key`].
    async fn open(&self, name: &str) -> Arc<dyn KeyStore> {
        self.open_keyed(name, Some(test_master_key()))
            .await
            .expect("open store")
    }

    /// Opens store `name` with `master` (`None`: material in the clear).
    async fn open_keyed(
        &self,
        name: &str,
        master: Option<MasterKey>,
    ) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(match self {
            Backend::Sqlite { dir, .. } => Arc::new(SqliteStore::open_keyed(
                &dir.join(format!("{name}.sqlite")),
                Durability::Full,
                master.as_ref(),
            )?),
            Backend::Postgres { url, prefix } => {
                let url: PostgresUrl = url.parse().expect("QKDNET_TEST_PG is a PostgreSQL URL");
                let schema = SchemaName::new(&format!("{prefix}_{name}")).expect("schema");
                let mut opts = PostgresOptions::default();
                opts.pool_size = 4;
                opts.master_key = master;
                Arc::new(PostgresStore::open(&url, &schema, opts).await?)
            }
        })
    }

    /// What an attacker with a copy of closed store `name` reads: the SQLite
    /// file and its WAL byte for byte, or PostgreSQL's raw `material` values.
    async fn raw_bytes(&self, name: &str) -> Vec<u8> {
        match self {
            Backend::Sqlite { dir, .. } => {
                let mut out = std::fs::read(dir.join(format!("{name}.sqlite"))).expect("file");
                if let Ok(wal) = std::fs::read(dir.join(format!("{name}.sqlite-wal"))) {
                    out.extend_from_slice(&wal);
                }
                out
            }
            Backend::Postgres { url, prefix } => {
                let c = raw_pg(url).await;
                c.query(
                    &format!("SELECT material FROM \"{prefix}_{name}\".units"),
                    &[],
                )
                .await
                .expect("raw material")
                .iter()
                .flat_map(|r| r.get::<_, Vec<u8>>(0))
                .collect()
            }
        }
    }

    /// A string for a crash child to rebuild this backend from.
    fn spec(&self) -> String {
        match self {
            Backend::Sqlite { dir, .. } => format!("sqlite:{}", dir.display()),
            Backend::Postgres { prefix, .. } => format!("postgres:{prefix}"),
        }
    }

    fn from_spec(spec: &str) -> Self {
        if let Some(dir) = spec.strip_prefix("sqlite:") {
            Backend::Sqlite {
                dir: PathBuf::from(dir),
                _owner: None,
            }
        } else if let Some(prefix) = spec.strip_prefix("postgres:") {
            Backend::Postgres {
                url: std::env::var("QKDNET_TEST_PG").expect("QKDNET_TEST_PG in the child"),
                prefix: prefix.to_owned(),
            }
        } else {
            panic!("bad backend spec {spec:?}")
        }
    }

    /// Checks, with plain SQL on the closed store `name`, that its pool counters
    /// match its units and that no unit is reserved for a key that does not exist.
    /// (Opening a store recomputes the counters, so this must run before.)
    async fn check_tables(&self, name: &str) {
        // The SQLite schema (3) keeps units as extents of blocks (`free`, `held`) and
        // counts a block's undelivered units in `remaining`; PostgreSQL keeps rows.
        const SQLITE_COUNTERS: &str = "SELECT p.peer, p.total, p.mine_available,
                (SELECT coalesce(sum(b.remaining), 0) FROM blocks b WHERE b.peer = p.peer),
                (SELECT coalesce(sum(f.n), 0) FROM free f WHERE f.peer = p.peer AND f.mine = 1)
            FROM pools p";
        const SQLITE_STRAY: &str = "SELECT
                (SELECT count(*) FROM free f WHERE f.peer NOT IN (SELECT peer FROM pools)),
                (SELECT count(*) FROM held h
                    WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE r.rid = h.rid))";
        const COUNTERS: &str = "SELECT p.peer, p.total, p.mine_available,
                (SELECT count(*) FROM units u WHERE u.peer = p.peer),
                (SELECT count(*) FROM units u WHERE u.peer = p.peer AND u.mine AND u.key_id IS NULL)
            FROM pools p";
        const STRAY: &str = "SELECT
                (SELECT count(*) FROM units u WHERE u.peer NOT IN (SELECT peer FROM pools)),
                (SELECT count(*) FROM units u WHERE u.key_id IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM keys k WHERE k.key_id = u.key_id))";
        let (counters, stray): (Vec<(String, [i64; 4])>, [i64; 2]) = match self {
            Backend::Sqlite { dir, .. } => {
                let c = rusqlite::Connection::open(dir.join(format!("{name}.sqlite")))
                    .expect("open SQLite file");
                let mut st = c.prepare(SQLITE_COUNTERS).expect("prepare");
                let counters = st
                    .query_map([], |r| {
                        Ok((r.get(0)?, [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?]))
                    })
                    .expect("query")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("rows");
                let stray = c
                    .query_row(SQLITE_STRAY, [], |r| Ok([r.get(0)?, r.get(1)?]))
                    .expect("query");
                (counters, stray)
            }
            Backend::Postgres { url, prefix } => {
                let c = raw_pg(url).await;
                c.batch_execute(&format!("SET search_path TO \"{prefix}_{name}\""))
                    .await
                    .expect("search_path");
                let counters = c
                    .query(COUNTERS, &[])
                    .await
                    .expect("query")
                    .iter()
                    .map(|r| (r.get(0), [r.get(1), r.get(2), r.get(3), r.get(4)]))
                    .collect();
                let r = c.query_one(STRAY, &[]).await.expect("query");
                (counters, [r.get(0), r.get(1)])
            }
        };
        for (peer, [total, mine, real_total, real_mine]) in counters {
            assert_eq!(
                (total, mine),
                (real_total, real_mine),
                "store {name}: pool counters of {peer} disagree with its units"
            );
        }
        assert_eq!(
            stray,
            [0, 0],
            "store {name}: units outside pools / orphaned"
        );
    }
}

/// The master key of the store tests' stores.
fn test_master_key() -> MasterKey {
    MasterKey::from_bytes([0x5a; 32])
}

/// How many of the units of blocks `0..blocks` (as `me` stores them) have any
/// 16 consecutive bytes of their material somewhere in `raw`.
fn units_visible_in(raw: &[u8], me: &str, peer: &str, blocks: u64) -> usize {
    let windows: HashSet<&[u8]> = raw.windows(16).collect();
    (0..blocks)
        .flat_map(|n| {
            seeded_block(SEED, "ab", kme(peer), n, BLOCK_BYTES)
                .cut(&kme(me))
                .expect("valid block")
        })
        .filter(|u| u.material.windows(16).any(|w| windows.contains(w)))
        .count()
}

/// Issue #18, item 8: a copy of a store (file, WAL, or the database's raw
/// column values) taken while it holds keys, some delivered, shows no 16
/// consecutive bytes of any unit's material.
async fn issue_18_item_8_a_copy_of_the_store_holds_no_key_material(backend: Backend) {
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, 2).await;
    let r = reservation(8);
    let keys = a.reserve(r.clone()).await.expect("reserve");
    b.accept(acceptance("kme-a", &r, &keys))
        .await
        .expect("accept");
    a.confirm(r.request_id).await.expect("confirm");
    drop((a, b));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for (name, me, peer) in [("a", "kme-a", "kme-b"), ("b", "kme-b", "kme-a")] {
        let raw = backend.raw_bytes(name).await;
        assert!(raw.len() > BLOCK_BYTES, "the copy holds the ciphertext");
        assert_eq!(
            units_visible_in(&raw, me, peer, 2),
            0,
            "plaintext in store {name}"
        );
    }
    // Reopened under the key, the keys still come out.
    let b = backend.open("b").await;
    let got = b
        .take(
            sae("bob"),
            sae("alice"),
            keys.iter().map(|k| k.layout.key_id).collect(),
        )
        .await
        .expect("take");
    for (k, g) in keys.iter().zip(&got) {
        assert_eq!(k.material[..], g.material[..]);
    }
}

/// Issue #18, item 8: an encrypted store opened with another master key, or
/// with none, is refused with a clear error (and not changed).
async fn issue_18_item_8_another_master_key_or_none_is_refused(backend: Backend) {
    let a = backend.open("a").await;
    fill(&*a, "kme-a", "kme-b", 1).await;
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let other = MasterKey::from_bytes([0xa5; 32]);
    let Err(e) = backend.open_keyed("a", Some(other)).await else {
        panic!("a store opened under another master key")
    };
    assert!(
        e.to_string()
            .contains("this store was encrypted under a different node master key"),
        "{e}"
    );
    let Err(e) = backend.open_keyed("a", None).await else {
        panic!("an encrypted store opened without a key")
    };
    assert!(e.to_string().contains("none is configured"), "{e}");
    // The right key still opens it, and its keys are intact.
    let a = backend.open("a").await;
    let keys = a.reserve(reservation(4)).await.expect("reserve");
    let block = seeded_block(SEED, "ab", kme("kme-b"), 0, BLOCK_BYTES)
        .cut(&kme("kme-a"))
        .expect("valid block");
    let mine: Vec<_> = block.iter().filter(|u| u.mine).collect();
    for (k, u) in keys.iter().zip(mine) {
        assert_eq!(k.layout.key_id, u.id);
        assert_eq!(k.material[..], u.material[..]);
    }
}

/// Issue #18, item 8: a store written in the clear (no key, as before) is
/// encrypted when opened with a key, and hands out the same keys as a twin
/// store that stayed in the clear.
async fn issue_18_item_8_a_plaintext_store_is_encrypted_at_open_and_keeps_its_keys(
    backend: Backend,
) {
    for name in ["plain", "migrated"] {
        let s = backend
            .open_keyed(name, None)
            .await
            .expect("open in the clear");
        fill(&*s, "kme-a", "kme-b", 2).await;
        // Some keys already delivered before the migration.
        let r = reservation(3);
        s.reserve(r.clone()).await.expect("reserve");
        s.confirm(r.request_id).await.expect("confirm");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let raw = backend.raw_bytes("migrated").await;
    assert!(
        units_visible_in(&raw, "kme-a", "kme-b", 2) > 0,
        "a store in the clear shows its material (the check sees plaintext)"
    );
    let migrated = backend
        .open_keyed("migrated", Some(test_master_key()))
        .await
        .expect("encrypt at open");
    let plain = backend.open_keyed("plain", None).await.expect("reopen");
    let r = reservation(40);
    let want = plain.reserve(r.clone()).await.expect("reserve");
    let got = migrated.reserve(r).await.expect("reserve");
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.layout, g.layout);
        assert_eq!(w.material[..], g.material[..], "same keys after encryption");
    }
    drop((migrated, plain));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let raw = backend.raw_bytes("migrated").await;
    assert_eq!(
        units_visible_in(&raw, "kme-a", "kme-b", 2),
        0,
        "plaintext left after encryption at open"
    );
    // Now encrypted: refused without the key.
    assert!(backend.open_keyed("migrated", None).await.is_err());
}

/// Issue #18, item 8: a master key file that group or others may read is refused.
#[test]
fn issue_18_item_8_a_master_key_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("master-key-mode");
    let path = dir.0.join("master.key");
    MasterKey::create_file(&path).expect("create");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "created 0600");
    MasterKey::read_file(&path).expect("0600 is accepted");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = MasterKey::read_file(&path).expect_err("0644 refused");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    assert!(e.to_string().contains("0644"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&path, [1u8; 16]).expect("short key");
    assert!(MasterKey::read_file(&path).is_err(), "wrong length refused");
    // A second create never overwrites.
    assert!(MasterKey::create_file(&path).is_err());
}

fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

async fn raw_pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to QKDNET_TEST_PG");
    tokio::spawn(conn);
    client
}

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

/// Ingests blocks `0..blocks` of link "ab" into `me`'s store for `peer`.
async fn fill(store: &dyn KeyStore, me: &str, peer: &str, blocks: u64) {
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

/// Fills A (kme-a) and B (kme-b) with the same `blocks` blocks.
async fn fill_both(a: &dyn KeyStore, b: &dyn KeyStore, blocks: u64) {
    fill(a, "kme-a", "kme-b", blocks).await;
    fill(b, "kme-b", "kme-a", blocks).await;
}

/// IDs of the units of blocks `0..blocks` that `me` owns.
fn owned_units(me: &str, peer: &str, blocks: u64) -> Vec<Uuid> {
    (0..blocks)
        .flat_map(|n| {
            seeded_block(SEED, "ab", kme(peer), n, BLOCK_BYTES)
                .cut(&kme(me))
                .expect("valid block")
        })
        .filter(|u| u.mine)
        .map(|u| u.id)
        .collect()
}

/// A reservation by `master` at its KME for `slave` at the other one.
fn reservation_by(peer: &str, master: &str, slave: &str, number: u32) -> Reservation {
    Reservation {
        request_id: Uuid::new_v4(),
        peer: kme(peer),
        master: sae(master),
        slave: sae(slave),
        number,
        size_bits: 256,
        now_unix_ms: now(),
        void_route: None,
        replay_key: None,
    }
}

/// The route of a relay from kme-a over kme-b to kme-c.
fn relay_route() -> qkdnet_kms::store::VoidRoute {
    qkdnet_kms::store::VoidRoute {
        request_id: Uuid::from_u128(0x0192_f3a4_5b6c_7d8e_9fa0_b1c2_d3e4_f506),
        route: vec![kme("kme-a"), kme("kme-b"), kme("kme-c")],
    }
}

/// alice at A reserves for bob at B.
fn reservation(number: u32) -> Reservation {
    reservation_by("kme-b", "alice", "bob", number)
}

/// The acceptance at the other KME of reservation `r`, made by `from`.
fn acceptance(from: &str, r: &Reservation, keys: &[ReservedKey]) -> Acceptance {
    Acceptance {
        request_id: r.request_id,
        peer: kme(from),
        master: r.master.clone(),
        slave: r.slave.clone(),
        keys: keys.iter().map(|k| k.layout.clone()).collect(),
        now_unix_ms: 0,
    }
}

/// The `qkdnet_request_id` extension's store side: the requests reserved under
/// one replay key (attempts, multipath shares) replay together, once; voided
/// ones do not count; answered keys never replayed go after the window.
async fn answered_requests_replay_once_under_their_replay_key(backend: Backend) {
    let a = backend.open("a").await;
    fill(&*a, "kme-a", "kme-b", 1).await;
    let key = Uuid::new_v4();
    let under = |key: Uuid| Reservation {
        replay_key: Some(key),
        ..reservation(2)
    };
    let replay = |key: Uuid, number: u32, slave: &str, now: u64| ReplayRequest {
        replay_key: key,
        master: sae("alice"),
        slave: sae(slave),
        size_bits: 256,
        number,
        now_unix_ms: now,
    };
    let state = async |r: ReplayRequest| a.replay(r).await.expect("replay");
    assert!(matches!(
        state(replay(key, 2, "bob", now())).await,
        Replay::Unknown
    ));
    // A failed attempt (voided) does not count.
    let failed = under(key);
    a.reserve(failed.clone()).await.expect("reserve");
    a.release(failed.request_id, Vec::new())
        .await
        .expect("release");
    assert!(matches!(
        state(replay(key, 2, "bob", now())).await,
        Replay::Unknown
    ));
    // Two shares of a multipath key, answered once both were acknowledged.
    let (s1, s2) = (under(key), under(key));
    let k1 = a.reserve(s1.clone()).await.expect("reserve");
    assert!(matches!(
        state(replay(key, 2, "bob", now())).await,
        Replay::InProgress
    ));
    let k2 = a.reserve(s2.clone()).await.expect("reserve");
    // An attempt that failed, its void not settled yet: still pending.
    a.reserve(under(key)).await.expect("reserve");
    a.answer(vec![s1.request_id, s2.request_id])
        .await
        .expect("answer");
    let before = a.pool_counts(kme("kme-b")).await.expect("counts");
    assert!(matches!(
        state(replay(key, 3, "bob", now())).await,
        Replay::Mismatch
    ));
    assert!(matches!(
        state(replay(key, 2, "carol", now())).await,
        Replay::Mismatch
    ));
    let Replay::Keys(shares) = state(replay(key, 2, "bob", now())).await else {
        panic!("the answered shares");
    };
    assert_eq!(shares.len(), 2);
    for (share, reserved) in shares.iter().zip([&k1, &k2]) {
        assert_eq!(share.len(), reserved.len());
        for (got, want) in share.iter().zip(reserved.iter()) {
            assert_eq!(got.key_id, want.layout.key_id, "in reservation order");
            assert_eq!(got.material[..], want.material[..]);
        }
    }
    assert!(matches!(
        state(replay(key, 2, "bob", now())).await,
        Replay::Spent
    ));
    let after = a.pool_counts(kme("kme-b")).await.expect("counts");
    assert_eq!(
        after.total_units,
        before.total_units - 4,
        "replayed units are spent"
    );
    // Answered, never replayed: its keys go with the first block after the window.
    let late = Uuid::new_v4();
    let old = Reservation {
        now_unix_ms: now() - REPLAY_WINDOW_MS - 60_000,
        ..under(late)
    };
    a.reserve(old.clone()).await.expect("reserve");
    a.answer(vec![old.request_id]).await.expect("answer");
    let mut next = batch(
        "kme-a",
        "kme-b",
        seeded_block(SEED, "ab", kme("kme-b"), 1, BLOCK_BYTES),
    );
    next.created_unix_ms = now();
    let added = a.ingest(next).await.expect("ingest");
    assert!(matches!(
        state(replay(late, 2, "bob", now())).await,
        Replay::Spent
    ));
    let end = a.pool_counts(kme("kme-b")).await.expect("counts");
    assert_eq!(end.total_units, after.total_units + added - 2);
}

async fn reserve_accept_take_void_are_idempotent_and_exactly_once(backend: Backend) {
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, 1).await;
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
    let keys = a.reserve(r.clone()).await.expect("reserve");
    // A request ID is used once.
    assert!(matches!(
        a.reserve(r.clone()).await,
        Err(StoreError::RequestConflict)
    ));
    let acc = acceptance("kme-a", &r, &keys);
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
    // The master's KME never hands out a key it reserved.
    assert!(matches!(
        a.take(sae("bob"), sae("alice"), vec![ids[0]]).await,
        Err(StoreError::NotAuthorized)
    ));
    // All or nothing: one unknown ID fails the whole request.
    assert!(matches!(
        b.take(sae("bob"), sae("alice"), vec![ids[0], Uuid::new_v4()])
            .await,
        Err(StoreError::KeysNotFound)
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
    let v1 = b.void(kme("kme-a"), rid, now()).await.expect("void");
    assert!(v1.was_accepted);
    assert_eq!(
        v1.voided_keys.iter().copied().collect::<HashSet<_>>(),
        ids[1..].iter().copied().collect()
    );
    assert_eq!(
        b.void(kme("kme-a"), rid, now()).await.expect("void again"),
        v1
    );
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
    let k2 = a.reserve(r2.clone()).await.expect("reserve");
    let v = b.void(kme("kme-a"), rid2, now()).await.expect("void first");
    assert!(!v.was_accepted);
    assert!(matches!(
        b.accept(acceptance("kme-a", &r2, &k2)).await,
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
    // Layouts are checked before any unit is looked at.
    let mut bad = acceptance("kme-a", &reservation(1), &k2);
    let first = bad.keys[0].key_id;
    bad.keys[0].unit_ids.push(first);
    assert!(matches!(
        b.accept(bad).await,
        Err(StoreError::InvalidLayout(_))
    ));
    // A request ID a peer used for a void cannot be reused by another peer.
    assert!(matches!(
        b.void(kme("kme-c"), rid2, now()).await,
        Err(StoreError::RequestConflict)
    ));
    // Capacity is enforced per pool.
    let mut full = batch(
        "kme-a",
        "kme-b",
        seeded_block(SEED, "ab", kme("kme-b"), 1, BLOCK_BYTES),
    );
    full.capacity_units = 64;
    assert!(matches!(
        a.ingest(full).await,
        Err(StoreError::PoolFull { capacity_units: 64 })
    ));
    drop((a, b));
    backend.check_tables("a").await;
    backend.check_tables("b").await;
}

/// The relay hop operation: accept and deliver at once; the hop key is gone at
/// both ends afterwards, a repeat finds nothing, a void reports it delivered,
/// and units the peer does not hold are refused without accepting anything.
async fn accept_take_spends_a_relay_hop_in_one_step(backend: Backend) {
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, 1).await;
    let before = b.pool_counts(kme("kme-a")).await.expect("counts");
    let r = reservation(2);
    let keys = a.reserve(r.clone()).await.expect("reserve");
    let acc = acceptance("kme-a", &r, &keys);
    let got = b.accept_take(acc.clone()).await.expect("accept_take");
    assert_eq!(got.len(), 2);
    for (k, g) in keys.iter().zip(&got) {
        assert_eq!(k.layout.key_id, g.key_id);
        assert_eq!(
            &k.material[..],
            &g.material[..],
            "same hop key at both ends"
        );
    }
    let after = b.pool_counts(kme("kme-a")).await.expect("counts");
    assert_eq!(before.total_units - after.total_units, 2);
    assert!(b.accept_take(acc).await.is_err(), "a hop key is spent once");
    let v = b
        .void(kme("kme-a"), r.request_id, now())
        .await
        .expect("void");
    assert!(v.was_accepted && v.voided_keys.is_empty(), "{v:?}");
    a.confirm(r.request_id).await.expect("confirm");
    // Units the peer never had: refused, and nothing accepted.
    let mut bogus = reservation(1);
    bogus.request_id = Uuid::new_v4();
    let fake = vec![qkdnet_kms::store::KeyLayout {
        key_id: Uuid::from_u128(1),
        size_bits: 256,
        unit_ids: vec![Uuid::from_u128(1)],
    }];
    let acc = Acceptance {
        keys: fake,
        ..acceptance("kme-a", &bogus, &[])
    };
    assert!(matches!(
        b.accept_take(acc).await,
        Err(StoreError::UnitsUnavailable(_))
    ));
    assert_eq!(b.pool_counts(kme("kme-a")).await.expect("counts"), after);
}

/// Keys longer than one unit: both ends assemble the same bytes from the listed
/// units, only a key's first unit ID names it, a restart lists the pending
/// request with the same layout, and a void returns the undelivered keys whole.
async fn keys_of_several_units_keep_their_layout(backend: Backend) {
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, 1).await;
    let mut r = reservation(3);
    r.size_bits = 600; // 3 units, the last one cut to 600 - 512 = 88 bits
    let keys = a.reserve(r.clone()).await.expect("reserve");
    assert_eq!(keys.len(), 3);
    for k in &keys {
        assert_eq!(k.layout.unit_ids.len(), 3);
        assert_eq!(k.layout.key_id, k.layout.unit_ids[0]);
        assert_eq!(k.material.len(), 75);
    }
    drop(a);
    let a = backend.open("a").await;
    let pending = a.pending().await.expect("pending");
    assert_eq!(pending.len(), 1);
    let listed: Vec<_> = keys.iter().map(|k| k.layout.clone()).collect();
    assert_eq!(pending[0].keys, listed, "a restart lists the same layout");
    b.accept(acceptance("kme-a", &r, &keys))
        .await
        .expect("accept");
    a.confirm(r.request_id).await.expect("confirm");
    // A unit inside a key is not a key ID.
    assert!(matches!(
        b.take(sae("bob"), sae("alice"), vec![keys[1].layout.unit_ids[1]])
            .await,
        Err(StoreError::KeysNotFound)
    ));
    let got = b
        .take(sae("bob"), sae("alice"), vec![keys[1].layout.key_id])
        .await
        .expect("take the middle key");
    assert_eq!(&got[0].material[..], &keys[1].material[..]);
    let v = b
        .void(kme("kme-a"), r.request_id, now())
        .await
        .expect("void");
    assert_eq!(
        v.voided_keys.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([keys[0].layout.key_id, keys[2].layout.key_id])
    );
    drop((a, b));
    backend.check_tables("a").await;
    backend.check_tables("b").await;
}

/// Acceptances out of order, a voided request between accepted ones whose units
/// go back and are reserved again first, and keys whose units straddle two
/// blocks: every key taken at B is the key A reserved, and the pools end even.
async fn units_return_in_any_order_and_keys_cross_blocks(backend: Backend) {
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, 2).await;
    let before = (
        a.pool_counts(kme("kme-b")).await.expect("counts"),
        b.pool_counts(kme("kme-a")).await.expect("counts"),
    );
    let owned = owned_units("kme-a", "kme-b", 1).len() as u32;
    let mut rs = Vec::new();
    for number in [2, 3, 2] {
        let mut r = reservation(number);
        r.size_bits = 768; // 3 units
        let keys = a.reserve(r.clone()).await.expect("reserve");
        rs.push((r, keys));
    }
    // B hears of the third request first; the second is voided before it arrives.
    for i in [2, 0] {
        let (r, keys) = &rs[i];
        b.accept(acceptance("kme-a", r, keys))
            .await
            .expect("accept");
        a.confirm(r.request_id).await.expect("confirm");
    }
    let (r1, k1) = &rs[1];
    assert!(
        !b.void(kme("kme-a"), r1.request_id, now())
            .await
            .expect("void")
            .was_accepted
    );
    a.release(r1.request_id, Vec::new()).await.expect("release");
    // The next request gets the released units first, then runs on into block 1.
    let mut r3 = reservation(owned / 3 + 1);
    r3.size_bits = 768;
    let k3 = a.reserve(r3.clone()).await.expect("reserve");
    assert_eq!(
        k3[0].layout.unit_ids, k1[0].layout.unit_ids,
        "released units come first"
    );
    b.accept(acceptance("kme-a", &r3, &k3))
        .await
        .expect("accept");
    a.confirm(r3.request_id).await.expect("confirm");
    for (r, keys) in [(&rs[0].0, &rs[0].1), (&rs[2].0, &rs[2].1), (&r3, &k3)] {
        let got = b
            .take(
                sae("bob"),
                sae("alice"),
                keys.iter().rev().map(|k| k.layout.key_id).collect(),
            )
            .await
            .unwrap_or_else(|e| panic!("take {}: {e}", r.request_id));
        for (g, k) in got.iter().zip(keys.iter().rev()) {
            assert_eq!(g.key_id, k.layout.key_id);
            assert_eq!(&g.material[..], &k.material[..]);
        }
    }
    let spent = 3 * (2 + 2 + u64::from(owned / 3 + 1));
    let after = (
        a.pool_counts(kme("kme-b")).await.expect("counts"),
        b.pool_counts(kme("kme-a")).await.expect("counts"),
    );
    assert_eq!(before.0.total_units - after.0.total_units, spent);
    assert_eq!(before.0.mine_available - after.0.mine_available, spent);
    assert_eq!(before.1.total_units - after.1.total_units, spent);
    assert_eq!(before.1.mine_available, after.1.mine_available);
    drop((a, b));
    backend.check_tables("a").await;
    backend.check_tables("b").await;
}

async fn state_survives_an_abrupt_drop(backend: Backend) {
    let (rid, delivered, counts_before) = {
        let a = backend.open("a").await;
        fill(&*a, "kme-a", "kme-b", 1).await;
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
        // A relay's first hop: the route to void it along is kept with it.
        let r2 = Reservation {
            void_route: Some(relay_route()),
            replay_key: None,
            ..reservation(1)
        };
        let rid2 = r2.request_id;
        a.reserve(r2).await.expect("reserve");
        let counts = a.pool_counts(kme("kme-b")).await.expect("counts");
        (rid2, delivered, counts)
        // dropped without any shutdown
    };
    backend.check_tables("a").await;
    let a = backend.open("a").await;
    // The maintained counters equal the ones recomputed from the units at open.
    assert_eq!(
        a.pool_counts(kme("kme-b")).await.expect("counts"),
        counts_before
    );
    let pending = a.pending().await.expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].request_id, rid);
    assert_eq!(pending[0].void_route, Some(relay_route()));
    assert_eq!(pending[0].keys.len(), 1);
    assert_eq!(pending[0].keys[0].unit_ids, vec![pending[0].keys[0].key_id]);
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
    assert!(matches!(
        a.reserve(reservation(1)).await,
        Err(StoreError::Exhausted {
            available: 0,
            requested: 1
        })
    ));
}

/// What one side handed out: key ID → bytes.
type Handed = Vec<(Uuid, Vec<u8>)>;

/// One full exchange, master at `m` and slave at `s`: reserve, accept, confirm,
/// take. Returns what the master got and what the slave got.
async fn exchange(
    m: &dyn KeyStore,
    s: &dyn KeyStore,
    r: Reservation,
    from: &str,
) -> (Handed, Vec<Uuid>, Handed) {
    let keys = m.reserve(r.clone()).await.expect("reserve");
    let units = keys
        .iter()
        .flat_map(|k| k.layout.unit_ids.iter().copied())
        .collect();
    assert_eq!(
        s.accept(acceptance(from, &r, &keys)).await.expect("accept"),
        AcceptOutcome::Accepted
    );
    m.confirm(r.request_id).await.expect("confirm");
    let ids = keys.iter().map(|k| k.layout.key_id).collect();
    let got = s
        .take(r.slave.clone(), r.master.clone(), ids)
        .await
        .expect("take");
    (
        keys.iter()
            .map(|k| (k.layout.key_id, k.material.to_vec()))
            .collect(),
        units,
        got.iter()
            .map(|k| (k.key_id, k.material.to_vec()))
            .collect(),
    )
}

async fn concurrent_transitions_never_hand_a_unit_twice(backend: Backend) {
    const BLOCKS: u64 = 8; // 256 units owned by each side
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    fill_both(&*a, &*b, BLOCKS).await;

    // Many exchanges in both directions at once: masters at A (alice → bob) and at
    // B (bob → alice) share each store's single pool.
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16u32 {
        let (a, b) = (a.clone(), b.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in 0..6u32 {
                let n = 1 + (w + i) % 2;
                out.push(if w % 2 == 0 {
                    exchange(&*a, &*b, reservation(n), "kme-a").await
                } else {
                    exchange(
                        &*b,
                        &*a,
                        reservation_by("kme-a", "bob", "alice", n),
                        "kme-b",
                    )
                    .await
                });
            }
            out
        });
    }
    let mut units = HashSet::new();
    let mut master_keys = HashMap::new();
    let mut slave_keys = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for (m, u, s) in r.expect("worker") {
            for id in u {
                assert!(units.insert(id), "unit {id} reserved twice");
            }
            for (id, bytes) in m {
                assert!(
                    master_keys.insert(id, bytes).is_none(),
                    "master got {id} twice"
                );
            }
            for (id, bytes) in s {
                assert!(
                    slave_keys.insert(id, bytes).is_none(),
                    "slave got {id} twice"
                );
            }
        }
    }
    assert_eq!(master_keys, slave_keys, "both SAEs got the same keys");
    let used = 16 * 6 * 3 / 2 / 2; // units per side: half the workers, 1 or 2 each
    for (store, peer) in [(&a, "kme-b"), (&b, "kme-a")] {
        let c = store.pool_counts(kme(peer)).await.expect("counts");
        assert_eq!(c.mine_available, 256 - used);
        assert_eq!(c.total_units, 512 - 2 * used);
    }

    // Races on one key: concurrent takes, accepts, and voids against takes.
    for round in 0..6u32 {
        let r = reservation(2);
        let keys = a.reserve(r.clone()).await.expect("reserve");
        let acc = acceptance("kme-a", &r, &keys);
        let accepts: Vec<_> = (0..4)
            .map(|_| {
                let (b, acc) = (b.clone(), acc.clone());
                tokio::spawn(async move { b.accept(acc).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in accepts {
            outcomes.push(t.await.expect("task").expect("accept"));
        }
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == AcceptOutcome::Accepted)
                .count(),
            1,
            "exactly one accept wins"
        );
        a.confirm(r.request_id).await.expect("confirm");
        let ids: Vec<Uuid> = keys.iter().map(|k| k.layout.key_id).collect();
        let mut racers = tokio::task::JoinSet::new();
        for t in 0..4u32 {
            let (b, ids) = (b.clone(), ids.clone());
            racers.spawn(async move {
                (
                    t,
                    b.take(sae("bob"), sae("alice"), vec![ids[0]])
                        .await
                        .map(|k| k.len()),
                )
            });
        }
        if round % 2 == 0 {
            // A void racing the takes of the other key.
            for _ in 0..2 {
                let (b, rid) = (b.clone(), r.request_id);
                racers.spawn(async move {
                    (
                        99,
                        b.void(kme("kme-a"), rid, now())
                            .await
                            .map(|v| v.voided_keys.len()),
                    )
                });
            }
        }
        for _ in 0..2 {
            let (b, ids) = (b.clone(), ids.clone());
            racers.spawn(async move {
                (
                    100,
                    b.take(sae("bob"), sae("alice"), vec![ids[1]])
                        .await
                        .map(|k| k.len()),
                )
            });
        }
        let mut first_taken = 0;
        let mut second_taken = 0;
        let mut voided = Vec::new();
        while let Some(res) = racers.join_next().await {
            match res.expect("task") {
                (99, Ok(n)) => voided.push(n),
                (100, Ok(_)) => second_taken += 1,
                (_, Ok(_)) => first_taken += 1,
                (_, Err(StoreError::KeysNotFound)) => {}
                (t, Err(e)) => panic!("racer {t}: unexpected {e}"),
            }
        }
        assert!(second_taken <= 1, "second key delivered twice");
        if round % 2 == 0 {
            // Both voids answer the same; a key is either delivered or voided.
            assert_eq!(voided.len(), 2);
            assert_eq!(voided[0], voided[1]);
            assert_eq!(first_taken + second_taken + voided[0], 2, "round {round}");
            assert!(first_taken <= 1);
        } else {
            assert_eq!((first_taken, second_taken), (1, 1), "round {round}");
        }
    }
    drop((a, b));
    backend.check_tables("a").await;
    backend.check_tables("b").await;
}

/// Child side of the SIGKILL test: A and B exchange keys in a loop (alice at A
/// for bob at B), printing `M <id>` once the master's confirmation is durable,
/// `T <id>` before the slave's take and `S <id>` once it is durable, until killed. Some requests are voided at B
/// and released at A instead, as a master does when its peer does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(spec) = std::env::var("QKDNET_KMS_CRASH_CHILD") else {
        return;
    };
    // libtest has printed "test crash_child ... " without a newline: end that line
    // so that the first key's line is read whole.
    println!();
    let backend = Backend::from_spec(&spec);
    let a = backend.open("a").await;
    let b = backend.open("b").await;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..6u32 {
        let (a, b) = (a.clone(), b.clone());
        if w >= 4 && a.keeps_stock() {
            // Key stock: reserve → B accepts → stock at A, then the master takes
            // the stock a key or two at a time.
            tasks.spawn(async move {
                for i in 0u32.. {
                    let r = reservation(4 + (w + i) % 3);
                    let Ok(keys) = a.reserve(r.clone()).await else {
                        return;
                    };
                    if b.accept(acceptance("kme-a", &r, &keys)).await.is_err()
                        || a.stock(r.request_id).await.is_err()
                    {
                        return;
                    }
                    loop {
                        let n = 1 + (w + i) % 2;
                        let Ok((Some(got), _)) =
                            a.take_stock(sae("alice"), sae("bob"), 256, n, now()).await
                        else {
                            break;
                        };
                        for k in &got {
                            println!("M {}", k.key_id);
                        }
                        for k in &got {
                            println!("T {}", k.key_id);
                        }
                        let ids = got.iter().map(|k| k.key_id).collect();
                        let Ok(at_b) = b.take(sae("bob"), sae("alice"), ids).await else {
                            return;
                        };
                        for (k, g) in at_b.iter().zip(&got) {
                            assert_eq!(&k.material[..], &g.material[..], "the two ends agree");
                            println!("S {}", k.key_id);
                        }
                    }
                }
            });
            continue;
        }
        tasks.spawn(async move {
            for i in 0u32.. {
                let r = reservation(1 + (w + i) % 3);
                let rid = r.request_id;
                let Ok(keys) = a.reserve(r.clone()).await else {
                    return;
                };
                let give_up = (w + i) % 7 == 3;
                let early_void = (w + i) % 11 == 5;
                if !early_void && b.accept(acceptance("kme-a", &r, &keys)).await.is_err() {
                    return;
                }
                if give_up || early_void {
                    let Ok(v) = b.void(kme("kme-a"), rid, now()).await else {
                        return;
                    };
                    if a.release(rid, Vec::new()).await.is_err() || v.voided_keys.len() > keys.len()
                    {
                        return;
                    }
                    continue;
                }
                if a.confirm(rid).await.is_err() {
                    return;
                }
                for k in &keys {
                    println!("M {}", k.layout.key_id);
                }
                for k in &keys {
                    println!("T {}", k.layout.key_id);
                }
                let ids = keys.iter().map(|k| k.layout.key_id).collect();
                let Ok(got) = b.take(sae("bob"), sae("alice"), ids).await else {
                    return;
                };
                for k in &got {
                    println!("S {}", k.key_id);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// What the parent read from one child before killing it.
struct Seen {
    master: Vec<Uuid>,
    taking: Vec<Uuid>,
    slave: Vec<Uuid>,
}

/// Runs a crash child on `backend` and kills it (SIGKILL) after it has printed
/// `kill_after` master deliveries.
async fn run_and_kill(backend: &Backend, kill_after: usize) -> Seen {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("QKDNET_KMS_CRASH_CHILD", backend.spec())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    tokio::task::spawn_blocking(move || {
        let mut seen = Seen {
            master: Vec::new(),
            taking: Vec::new(),
            slave: Vec::new(),
        };
        // After the kill, read on to the end of the pipe: what the child printed
        // before it died tells which takes it had started.
        let mut killed = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // A line cut short by the kill does not parse and is ignored: its
            // action had not started.
            let parsed = |p: &str| {
                line.strip_prefix(p)
                    .and_then(|id| Uuid::parse_str(id.trim()).ok())
            };
            if let Some(id) = parsed("M ") {
                seen.master.push(id);
                if !killed && seen.master.len() >= kill_after {
                    child.kill().expect("SIGKILL"); // SIGKILL on Unix
                    killed = true;
                }
            } else if let Some(id) = parsed("T ") {
                seen.taking.push(id);
            } else if let Some(id) = parsed("S ") {
                seen.slave.push(id);
            }
        }
        assert!(killed, "the child stopped before it was killed");
        let _ = child.wait();
        seen
    })
    .await
    .expect("reader")
}

/// What a restarted KME A does (`Kme::recover`): void each request it left
/// pending at B, then release it, discarding the units of keys B had delivered.
async fn recover(a: &dyn KeyStore, b: &dyn KeyStore) -> usize {
    let pending = a.pending().await.expect("pending");
    for p in &pending {
        let reply = b
            .void(kme("kme-a"), p.request_id, now())
            .await
            .expect("void");
        let mut discard = Vec::new();
        if reply.was_accepted {
            for k in &p.keys {
                if !reply.voided_keys.contains(&k.key_id) {
                    discard.extend(k.unit_ids.iter().copied());
                }
            }
        }
        a.release(p.request_id, discard).await.expect("release");
    }
    pending.len()
}

async fn sigkill_during_load_neither_repeats_nor_loses_keys(backend: Backend) {
    const BLOCKS: u64 = 16; // 512 units owned by each side
    let (a_owned, b_owned) = {
        let a = backend.open("a").await;
        let b = backend.open("b").await;
        fill_both(&*a, &*b, BLOCKS).await;
        let a_owned = a.pool_counts(kme("kme-b")).await.expect("counts");
        let b_owned = b.pool_counts(kme("kme-a")).await.expect("counts");
        (a_owned.mine_available, b_owned.mine_available)
    };
    assert_eq!(a_owned, 512);
    let mut master = Vec::new();
    let mut taking = HashSet::new();
    let mut slave = Vec::new();
    // Three crashes at different depths, each followed by a restart and recovery.
    for kill_after in [60, 90, 40] {
        let seen = run_and_kill(&backend, kill_after).await;

        master.extend(seen.master);
        taking.extend(seen.taking);
        slave.extend(seen.slave);
        // The tables as the crash left them: counters consistent, nothing orphaned.
        backend.check_tables("a").await;
        backend.check_tables("b").await;
        let a = backend.open("a").await;
        let b = backend.open("b").await;
        recover(&*a, &*b).await;
        assert!(a.pending().await.expect("pending").is_empty());
    }

    let a = backend.open("a").await;
    let b = backend.open("b").await;
    let master_set: HashSet<Uuid> = master.iter().copied().collect();
    assert_eq!(master_set.len(), master.len(), "a master got a key twice");
    let mut slave_set: HashSet<Uuid> = slave.iter().copied().collect();
    assert_eq!(slave_set.len(), slave.len(), "a slave got a key twice");
    assert!(
        slave_set.is_subset(&master_set),
        "the slave got a key its master never confirmed"
    );
    // Bob fetches whatever is still reserved for him at B (keys confirmed at A whose
    // take the crash interrupted, printed or not): each exactly once.
    for u in owned_units("kme-a", "kme-b", BLOCKS) {
        if let Ok(got) = b.take(sae("bob"), sae("alice"), vec![u]).await {
            assert_eq!(got.len(), 1);
            assert!(slave_set.insert(u), "key {u} delivered to the slave twice");
        }
    }
    // Keys whose take the child started but did not report may have been delivered
    // unseen; every other key confirmed to the master reached the slave.
    let unseen: HashSet<Uuid> = taking.difference(&slave_set).copied().collect();
    assert!(
        master_set
            .iter()
            .all(|k| slave_set.contains(k) || unseen.contains(k)),
        "a key confirmed to the master can no longer be delivered to the slave"
    );
    // A's units are those it still has plus those delivered, nothing else.
    let left = a
        .pool_counts(kme("kme-b"))
        .await
        .expect("counts")
        .mine_available;
    assert_eq!(
        left + (slave_set.len() + unseen.len()) as u64,
        a_owned,
        "A's remaining keys plus the delivered ones make up all of A's units"
    );
    let r = reservation(u32::try_from(left).expect("small"));
    let rest = a.reserve(r.clone()).await.expect("reserve everything left");
    for k in &rest {
        assert!(
            !slave_set.contains(&k.layout.key_id) && !unseen.contains(&k.layout.key_id),
            "a delivered key came back after SIGKILL"
        );
    }
    assert_eq!(
        b.accept(acceptance("kme-a", &r, &rest))
            .await
            .expect("B holds every unit A still has"),
        AcceptOutcome::Accepted
    );
    let at_b = b.pool_counts(kme("kme-a")).await.expect("counts");
    assert_eq!(at_b.mine_available, b_owned, "B's own units untouched");
    assert_eq!(
        at_b.total_units - at_b.mine_available,
        left,
        "B holds no unit of A's that A does not"
    );
}

/// Two KMEs launched from configurations with `store_url` (`launch_with_tls`)
/// serve enc_keys/dec_keys from PostgreSQL, exactly once, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmes_configured_with_store_url_serve_keys_from_postgres() {
    let Some(Backend::Postgres { url, prefix }) =
        Backend::postgres("kmes_configured_with_store_url").await
    else {
        return;
    };
    let mut net = Net::start_configured(2, Limits::default(), |c| {
        c.store = PathBuf::new();
        c.store_url = Some(url.parse().expect("QKDNET_TEST_PG is a PostgreSQL URL"));
        c.store_schema = Some(SchemaName::new(&format!("{prefix}_{}", c.kme_id)).expect("schema"));
        c.store_choice().expect("a PostgreSQL store");
    })
    .await;
    let (alice, bob) = (net.sae_client("alice"), net.sae_client("bob"));
    let enc = format!("{}/api/v1/keys/bob/enc_keys", net.url_a());
    // With the idempotency extension (mandatory: PostgreSQL keeps replies too).
    let body = serde_json::json!({"number": 2, "size": 256,
        "extension_mandatory": [{"qkdnet_request_id": "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f530"}]});
    let (s, v) = alice.post(&enc, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = keys_of(&v);
    let ids: Vec<String> = got.iter().map(|(i, _)| i.clone()).collect();
    // The keys are in PostgreSQL, not in A's memory: a restart of A changes
    // nothing, and the SAE's retry of the lost answer gets the same keys, once.
    net.restart_a().await;
    let (s, v) = alice.post(&enc, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
    let (s, v) = alice.post(&enc, &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let dec = format!("{}/api/v1/keys/alice/dec_keys", net.url_b());
    let (s, v) = bob.post(&dec, &key_ids_body(&ids)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
    let (s, _) = bob.post(&dec, &key_ids_body(&ids)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "delivered once");
    let (s, v) = alice
        .get(&format!("{}/api/v1/keys/bob/status", net.url_a()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // 2 blocks of 64 units, half of them A's, 2 delivered.
    assert_eq!(v["stored_key_count"], 62, "{v}");
}
