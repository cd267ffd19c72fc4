//! The key service over TCP on loopback, on both stores: sessions opened and
//! joined, a cloned medium racing its original through two front ends of one
//! PostgreSQL database (each key index served once), a terminal that lost an
//! answer (or died after taking its keys) getting back in step, and
//! revocation taking effect on the next request. Media are charged straight
//! into the store (charging over the QKD network is `tests/keyservice_e2e.rs`
//! at the workspace root).
//!
//! PostgreSQL tests use the server in `QKDNET_TEST_PG` (scripts/postgres.sh);
//! without it they are skipped with a message, and fail when CI is set.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use qkdnet_crypto::sm3::sm3;
use qkdnet_keyservice::TerminalError;
use qkdnet_keyservice::client::{Connection, Terminal};
use qkdnet_keyservice::qkd::KeyPool;
use qkdnet_keyservice::server::{Metrics, ServerConfig, Service, serve};
use qkdnet_keyservice::store::{Durability, Store, direct_offer};
use qkdnet_kms::store::MasterKey;
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};
use qkdnet_media::proto::{Identity, RefuseReason};
use qkdnet_media::{ChargeRecord, Key256, Medium, MemoryMedium};
use uuid::Uuid;

fn key_for(medium: &Uuid, index: u64) -> Key256 {
    Key256::new(sm3(&[&medium.as_bytes()[..], &index.to_be_bytes()].concat()))
}

fn master() -> MasterKey {
    MasterKey::from_bytes([0x33; 32])
}

#[allow(clippy::large_enum_variant)]
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PostgresUrl, SchemaName),
}

impl Backend {
    fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    /// A fresh schema on the test server, or `None` (skip) outside CI.
    fn postgres(name: &str) -> Option<Self> {
        let Ok(url) = std::env::var("QKDNET_TEST_PG") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "QKDNET_TEST_PG is not set in CI: scripts/test.sh starts PostgreSQL"
            );
            eprintln!(
                "skipped: QKDNET_TEST_PG is not set (bash scripts/postgres.sh starts a server)"
            );
            return None;
        };
        let schema = SchemaName::new(&format!("ks_{name}_{}", std::process::id())).expect("schema");
        Some(Self::Postgres(
            url.parse().expect("a PostgreSQL URL"),
            schema,
        ))
    }

    /// A front end on this store: the service's address.
    async fn front_end(&self) -> String {
        let store = match self {
            Self::Sqlite(dir) => Store::sqlite(
                &dir.path().join("ks.db"),
                &master(),
                KeyPool::new().drawer(),
                300,
                Durability::Full,
            )
            .expect("store"),
            Self::Postgres(url, schema) => {
                Store::postgres(url, schema, &master(), KeyPool::new().drawer(), 300, 4)
                    .await
                    .expect("store")
            }
        };
        let service = Arc::new(Service {
            store,
            config: ServerConfig {
                max_skip: 8,
                ..ServerConfig::default()
            },
            kme: None,
            metrics: Metrics::default(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(serve(l, service));
        addr
    }

    /// Enrols `who` and charges a medium of `n` keys for it (store and medium).
    async fn subscriber(&self, who: &str, n: u64) -> MemoryMedium {
        let identity = Identity::new(who).expect("identity");
        let id = Uuid::new_v4();
        let keys: Vec<Key256> = (0..n).map(|i| key_for(&id, i)).collect();
        let offer = direct_offer(id, &identity, 0, n as usize).expect("offer");
        let refused = match self {
            Self::Sqlite(dir) => {
                let mut s = qkdnet_keyservice::sqlite::SqliteStore::open(
                    &dir.path().join("ks.db"),
                    &master(),
                )
                .expect("open");
                s.enrol(&identity, "", 0).expect("enrol");
                s.charge(&offer, &keys, 0).expect("charge")
            }
            Self::Postgres(url, schema) => {
                let s = qkdnet_keyservice::postgres::PgStore::open(url, schema, &master(), 1)
                    .await
                    .expect("open");
                s.enrol(&identity, "", 0).await.expect("enrol");
                s.charge(&offer, &keys, 0).await.expect("charge")
            }
        };
        refused.expect("charged");
        let mut m = MemoryMedium::new(id, who, n);
        m.charge(&keys, ChargeRecord::new("direct", 0).expect("record"))
            .expect("fits");
        m
    }

    async fn revoke(&self, medium: &Uuid) {
        match self {
            Self::Sqlite(dir) => {
                qkdnet_keyservice::sqlite::SqliteStore::open(&dir.path().join("ks.db"), &master())
                    .expect("open")
                    .revoke(medium, "lost", 0)
                    .expect("revoke");
            }
            Self::Postgres(url, schema) => {
                qkdnet_keyservice::postgres::PgStore::open(url, schema, &master(), 1)
                    .await
                    .expect("open")
                    .revoke(medium, "lost", 0)
                    .await
                    .expect("revoke");
            }
        }
    }
}

async fn connect(addr: &str) -> Connection {
    Connection::connect(addr, Duration::from_secs(10))
        .await
        .expect("connect")
}

fn refusal(r: Result<qkdnet_media::proto::SessionKey, TerminalError>) -> RefuseReason {
    match r {
        Err(TerminalError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Opens through one front end, joins through another (the same one for
/// SQLite); retries get the same key; strangers and unknown sessions do not.
async fn open_join_and_refusals(b: &Backend) {
    let fe1 = b.front_end().await;
    let fe2 = match b {
        Backend::Sqlite(_) => fe1.clone(),
        Backend::Postgres(..) => b.front_end().await,
    };
    let mut alice = b.subscriber("sip:alice@test", 20).await;
    let mut bob = b.subscriber("sip:bob@test", 20).await;
    let mut carol = b.subscriber("sip:carol@test", 20).await;
    let bob_id = Identity::new("sip:bob@test").expect("id");
    let sid = [7u8; 16];
    let ka = Terminal::new(&mut alice)
        .expect("terminal")
        .open(&mut connect(&fe1).await, &bob_id, sid)
        .await
        .expect("open");
    let kb = Terminal::new(&mut bob)
        .expect("terminal")
        .join(&mut connect(&fe2).await, sid)
        .await
        .expect("join");
    assert_eq!(ka.key, kb.key);
    assert_eq!(kb.peer.as_str(), "sip:alice@test");
    // A retry of the join (the first answer lost) gets the same key.
    let again = Terminal::new(&mut bob)
        .expect("terminal")
        .join(&mut connect(&fe1).await, sid)
        .await
        .expect("join again");
    assert_eq!(again.key, ka.key);
    // Carol is not the peer; nobody opened session 9.
    let mut c = connect(&fe2).await;
    let mut carol_t = Terminal::new(&mut carol).expect("terminal");
    assert_eq!(
        refusal(carol_t.join(&mut c, sid).await),
        RefuseReason::NotAParty
    );
    assert_eq!(
        refusal(carol_t.join(&mut c, [9; 16]).await),
        RefuseReason::UnknownSession
    );
    // Alice opening the same session with Carol instead: not hers to reuse.
    let carol_id = Identity::new("sip:carol@test").expect("id");
    let r = Terminal::new(&mut alice)
        .expect("terminal")
        .open(&mut connect(&fe1).await, &carol_id, sid)
        .await;
    assert_eq!(refusal(r), RefuseReason::NotAParty);
    // Revocation takes effect on the next request, through any front end.
    b.revoke(&alice.id()).await;
    let r = Terminal::new(&mut alice)
        .expect("terminal")
        .open(&mut connect(&fe2).await, &bob_id, [8; 16])
        .await;
    assert_eq!(refusal(r), RefuseReason::Revoked);
}

/// A terminal killed after taking its two keys (nothing sent), or whose
/// answer was lost, is ahead of the service: the next request is accepted
/// within the window and the skipped keys are destroyed; a medium copied
/// before (a cloned SIM) is then refused as a replay.
async fn a_terminal_ahead_gets_back_in_step(b: &Backend) {
    let fe = b.front_end().await;
    let mut alice = b.subscriber("sip:alice2@test", 40).await;
    let _bob = b.subscriber("sip:bob2@test", 4).await;
    let clone = alice.clone();
    let bob_id = Identity::new("sip:bob2@test").expect("id");
    // Killed after taking keys 0 and 1 (never sent).
    alice.take_next().expect("key 0");
    alice.take_next().expect("key 1");
    let mut c = connect(&fe).await;
    Terminal::new(&mut alice)
        .expect("terminal")
        .open(&mut c, &bob_id, [1; 16])
        .await
        .expect("keys 2 and 3 accepted");
    // The clone still holds keys 0..: refused, and it cannot catch up past the
    // original without a valid tag further on (it has those keys too: it is a
    // clone, so the one that spends first wins, each index once).
    let mut cl = clone;
    let r = Terminal::new(&mut cl)
        .expect("terminal")
        .open(&mut c, &bob_id, [2; 16])
        .await;
    assert_eq!(refusal(r), RefuseReason::Replay);
    // Beyond the window (8 keys): refused as out of order, nothing consumed.
    for _ in 0..10 {
        alice.take_next().expect("skip");
    }
    let r = Terminal::new(&mut alice)
        .expect("terminal")
        .open(&mut c, &bob_id, [3; 16])
        .await;
    assert_eq!(refusal(r), RefuseReason::OutOfOrder);
}

/// A cloned medium and its original race on two front ends: every key index
/// is served at most once across both.
async fn a_cloned_medium_racing_through_two_front_ends_is_served_once_per_index(b: &Backend) {
    let fe1 = b.front_end().await;
    let fe2 = b.front_end().await;
    let original = b.subscriber("sip:dave@test", 64).await;
    let _peer = b.subscriber("sip:erin@test", 4).await;
    let clone = original.clone();
    let peer = Identity::new("sip:erin@test").expect("id");
    let run = |mut m: MemoryMedium, addr: String, tag: u8| {
        let peer = peer.clone();
        tokio::spawn(async move {
            let mut c = connect(&addr).await;
            let mut served = Vec::new();
            for n in 0..32u8 {
                let used = m.status().expect("status").used;
                let r = Terminal::new(&mut m)
                    .expect("terminal")
                    .open(
                        &mut c,
                        &peer,
                        [tag, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    )
                    .await;
                match r {
                    Ok(_) => served.push(used),
                    Err(TerminalError::Refused(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            served
        })
    };
    let a = run(original, fe1, 1);
    let b2 = run(clone, fe2, 2);
    let (a, b2) = (a.await.expect("task"), b2.await.expect("task"));
    let all: Vec<u64> = a.iter().chain(&b2).copied().collect();
    let distinct: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an index served twice: {a:?} {b2:?}"
    );
    assert!(!all.is_empty());
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn sqlite_open_join_and_refusals() {
    rt().block_on(open_join_and_refusals(&Backend::sqlite()));
}

#[test]
fn postgres_open_and_join_through_two_front_ends() {
    if let Some(b) = Backend::postgres("open") {
        rt().block_on(open_join_and_refusals(&b));
    }
}

#[test]
fn sqlite_a_terminal_ahead_gets_back_in_step() {
    rt().block_on(a_terminal_ahead_gets_back_in_step(&Backend::sqlite()));
}

#[test]
fn postgres_a_terminal_ahead_gets_back_in_step() {
    if let Some(b) = Backend::postgres("ahead") {
        rt().block_on(a_terminal_ahead_gets_back_in_step(&b));
    }
}

#[test]
fn sqlite_a_cloned_medium_is_served_once_per_index() {
    rt().block_on(
        a_cloned_medium_racing_through_two_front_ends_is_served_once_per_index(&Backend::sqlite()),
    );
}

#[test]
fn postgres_a_cloned_medium_on_two_front_ends_is_served_once_per_index() {
    if let Some(b) = Backend::postgres("clone") {
        rt().block_on(a_cloned_medium_racing_through_two_front_ends_is_served_once_per_index(&b));
    }
}
