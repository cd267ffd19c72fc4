//! SQLite implementation of [`KeyStore`]: WAL, `synchronous=FULL`, group commit.
//!
//! SQLite allows one writer at a time, and with `synchronous=FULL` every commit
//! waits for the disk. Doing one transaction per HTTP request would make the disk's
//! flush latency the KME's throughput limit. So one dedicated thread owns the
//! connection and runs operations in *batches*: it takes every operation waiting in
//! its queue, runs each inside its own `SAVEPOINT` (so a refused operation rolls
//! back alone), commits the batch once, and only then answers the callers. A caller
//! therefore never sees a result that is not durable, while concurrent requests
//! share one flush. `secure_delete=FAST` zeroes deleted key material in pages
//! that are written anyway (full `ON` costs extra I/O on every delete; copies may
//! also persist in the WAL until the next checkpoint and in the file system's free
//! space, so an encrypted volume is the production answer either way).
//!
//! Each operation is a handful of statements whatever the number of keys: units
//! are not rows but ranges (*extents*) of a block, see [`SCHEMA`]. A reservation
//! cuts its units from the head of the pool's free list and records them as one
//! or two held extents; the peer's acceptance cuts the same units out of its own
//! free list; delivery overwrites the units' bytes in the key-material rows with
//! zeros (see BENCHMARKS.md, KME, for what each design measured).
//!
//! Pool counts (for status and the capacity check) are counters in a `pools` table
//! updated by each operation, not `count(*)` scans, and are recomputed from the
//! blocks' `remaining` counts and the free runs at every open. Key material read from SQLite is copied straight into
//! zeroizing buffers.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::cipher::{self, KeyRecord, MasterKey, Plan, UnitCipher};
use super::{
    AcceptOutcome, Acceptance, DeliveredKey, IngestBatch, KeyLayout, KeyStore, PendingRequest,
    PoolCounts, REPLAY_WINDOW_MS, Replay, ReplayRequest, Reservation, ReservedKey, StoreError,
    StoreFuture, VoidOutcome, VoidRoute,
};
use crate::block::{KeyUnit, UNIT_BYTES, decode_unit_id, link_tag, unit_id_tagged, units_for_bits};
use crate::ids::{KmeId, SaeId};

const ROLE_MASTER: i64 = 0;
const ROLE_SLAVE: i64 = 1;
const REQ_PENDING: i64 = 0;
const REQ_ACCEPTED: i64 = 1;
const REQ_VOIDED: i64 = 2;
const REQ_DELIVERED: i64 = 3;
/// Master side: acknowledged by the peer, keys kept for later enc_keys (the
/// value is written out in `stocked` and in the `requests_stock` index).
const REQ_STOCKED: i64 = 4;
/// Master side: delivered to the master SAE, keys kept for one replay of the
/// request (the `qkdnet_request_id` extension) until [`REPLAY_WINDOW_MS`].
const REQ_ANSWERED: i64 = 5;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// Schema version kept in `PRAGMA user_version`. Version 4 added `meta` (the
/// store's encryption record), version 5 `requests.void_route` (a relay
/// origin's route, see [`super::VoidRoute`]), version 6 `requests.replay_key`
/// (see [`super::Reservation::replay_key`]); version 3 to 5 stores are upgraded
/// at open.
const SCHEMA_VERSION: i64 = 6;

/// Units per row of key material (2 KiB: two rows fit in a 4 KiB page).
const CHUNK_UNITS: u64 = 64;

/// How long finished requests (and the master's record of keys it delivered) are
/// kept: retries and voids of a request older than this are no longer recognised.
const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Most finished requests pruned per ingested block (bounds the extra work).
const PRUNE_LIMIT: i64 = 4096;

/// Key material lives in `chunks` of [`CHUNK_UNITS`] units per block; who may use
/// which unit is kept as *extents*, runs of units of one block: `free` runs per
/// pool side (`mine` = this KME may reserve them for its masters) and `held` runs
/// per request (`pos` = position of the run's first unit in the request). In a
/// block the two ends own alternate units (`stride` 2, this KME's are those with
/// `i % 2 == mine_side`) or one end owns all (`stride` 1, `mine_side` 0 if this
/// KME, 1 if the peer). A unit's ID is computed from (`tag`, `block_number`,
/// index) ([`unit_id_tagged`]) and decoded back ([`decode_unit_id`]); units that
/// arrived with other IDs (relayed keys, `tag` NULL) have rows in `aliases`.
/// A slave-side request marks the keys taken so far in the `taken` bitmap. A
/// master-side request keeps its `held` runs after confirmation, so that a later
/// dec_keys for one of its keys at this (the master's) KME is answered "not
/// authorised" instead of "not found", until the request is pruned. A request of
/// 64 keys is then a handful of rows, where one row per key made every request
/// hundreds of B-tree writes (see BENCHMARKS.md, KME). `meta` holds the store's
/// encryption record (`cipher`, `salt`, `check`: see [`super::cipher`]) when its
/// material is encrypted; unit `i` of block `bid` is then encrypted at position
/// (`bid`, `i`). `blocks` rows are never deleted, so a `bid` is never reused for
/// other material (the cipher relies on it).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blocks(
    bid INTEGER PRIMARY KEY, link_id TEXT NOT NULL, block_number INTEGER NOT NULL,
    peer TEXT NOT NULL, tag INTEGER, stride INTEGER NOT NULL, mine_side INTEGER NOT NULL,
    units INTEGER NOT NULL, remaining INTEGER NOT NULL,
    eps_sec REAL NOT NULL, eps_cor REAL NOT NULL, created_ms INTEGER NOT NULL,
    UNIQUE(link_id, block_number));
CREATE UNIQUE INDEX IF NOT EXISTS blocks_tag ON blocks(tag, block_number) WHERE tag IS NOT NULL;
CREATE TABLE IF NOT EXISTS chunks(
    bid INTEGER NOT NULL, c INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(bid, c)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aliases(
    uid BLOB PRIMARY KEY, bid INTEGER NOT NULL, i INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_at ON aliases(bid, i);
CREATE TABLE IF NOT EXISTS free(
    peer TEXT NOT NULL, mine INTEGER NOT NULL, bid INTEGER NOT NULL, lo INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY(peer, mine, bid, lo)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held(
    rid INTEGER NOT NULL, pos INTEGER NOT NULL, bid INTEGER NOT NULL, side INTEGER NOT NULL,
    lo INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY(rid, pos)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS held_at ON held(bid, side, lo);
CREATE TABLE IF NOT EXISTS requests(
    rid INTEGER PRIMARY KEY, request_id BLOB NOT NULL UNIQUE, role INTEGER NOT NULL,
    peer TEXT NOT NULL, state INTEGER NOT NULL, master TEXT NOT NULL DEFAULT '',
    slave TEXT NOT NULL DEFAULT '', size_bits INTEGER NOT NULL DEFAULT 0, voided BLOB,
    taken BLOB, created_ms INTEGER NOT NULL, void_route TEXT, replay_key BLOB);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state, created_ms);
CREATE INDEX IF NOT EXISTS requests_stock ON requests(master, slave, size_bits) WHERE state = 4;
CREATE TABLE IF NOT EXISTS pools(
    peer TEXT PRIMARY KEY, total INTEGER NOT NULL, mine_available INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
";

/// Durability level of the SQLite store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives power loss (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: a commit survives a process crash but may be lost on
    /// power loss. For benchmarks and tests that want to compare.
    Normal,
}

/// The writer's connection and the store's unit cipher (`None`: material in the
/// clear). Dereferences to the connection, so helpers that never touch material
/// take a `&Connection`.
pub(crate) struct Db {
    conn: Connection,
    cipher: Option<UnitCipher>,
}

impl std::ops::Deref for Db {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

trait Job: Send {
    /// Runs the operation inside the open transaction; `true` if it succeeded.
    fn run(&mut self, conn: &Db) -> bool;
    /// Sends the result once the batch is committed (or failed).
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

struct OpJob<T, F> {
    op: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send, F: FnOnce(&Db) -> Result<T, StoreError> + Send> Job for OpJob<T, F> {
    fn run(&mut self, conn: &Db) -> bool {
        let Some(op) = self.op.take() else {
            return false;
        };
        let r = op(conn);
        let ok = r.is_ok();
        self.out = Some(r);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        let out = match (self.out, commit) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(e)) => Err(e),
            (None, Ok(())) => Err(StoreError::Backend("operation did not run".into())),
        };
        // The caller may have gone away (request cancelled); the transition is durable anyway.
        let _ = self.reply.send(out);
    }
}

/// The SQLite key store. Cheap to share (`Arc`); dropping the last handle stops the
/// writer thread after the operations already queued.
pub struct SqliteStore {
    tx: mpsc::Sender<Box<dyn Job>>,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: mpsc::Sender<()>,
}

/// How often the checkpointer thread copies the WAL into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// Copies committed WAL frames into the database file every [`CHECKPOINT_EVERY`]
/// on its own connection, until `stop` is dropped. SQLite's automatic checkpoint
/// runs inside the committing writer, so every few megabytes of WAL one request
/// would wait for a copy and a database flush; a PASSIVE checkpoint here runs
/// beside the writer instead (it never blocks it), and the writer then reuses
/// the WAL from its start.
///
/// Under load without pauses the writer may never find the WAL fully copied
/// when it starts a transaction, and so never wraps to its start; once the WAL
/// holds more than [`WAL_RESTART_FRAMES`] frames, a RESTART checkpoint (which
/// holds the writer back for the copy of what the last PASSIVE left, at most
/// [`CHECKPOINT_EVERY`] of writes) makes it wrap.
fn checkpointer(conn: Connection, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let frames = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
        let r = match frames {
            Ok(n) if n > WAL_RESTART_FRAMES => conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .map(|_| ()),
            r => r.map(|_| ()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "SQLite checkpoint failed");
        }
    }
}

/// WAL length (4 KiB frames, 16 MiB) above which the checkpointer resets it.
const WAL_RESTART_FRAMES: i64 = 4_096;

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens the store with the given durability, key material in the clear
    /// (refused if the store is encrypted).
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_keyed(path, durability, None)
    }

    /// Opens the store with the given durability; with `master`, key material is
    /// encrypted under it (a store in the clear is encrypted now, in one
    /// transaction), and a store encrypted under another key (or under one when
    /// `master` is `None`) is refused. See [`super::cipher`].
    pub fn open_keyed(
        path: &Path,
        durability: Durability,
        master: Option<&MasterKey>,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement of the operations stays prepared (rusqlite keeps 16 by
        // default, fewer than the operations use, and re-parsing cost 5 % of CPU).
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "could not enable WAL (journal_mode={mode})"
            )));
        }
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "secure_delete", "FAST")?;
        // A small page cache: the hot pages are the ends of the indexes (IDs grow),
        // and SQLite walks its whole page-cache hash at every commit, so 128 MiB
        // cost ~8 % of the samples in `perf`; kme_bench at 64 SAEs went from 100k
        // (128 MiB) to 122k (16 MiB) to 128k keys/s (4 MiB), two runs each.
        conn.pragma_update(None, "cache_size", -4_096)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let _: i64 = conn.query_row("PRAGMA mmap_size=268435456", [], |r| r.get(0))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        let known = (3..=SCHEMA_VERSION).contains(&version) || (version == 0 && tables == 0);
        if !known {
            return Err(StoreError::Backend(format!(
                "{} has key-store schema {version}, this qkdnet uses {SCHEMA_VERSION}; \
                 a store of an older qkdnet cannot be opened (its layout differs): \
                 move it away and let the link refill a new one",
                path.display()
            )));
        }
        // Schema, version and encryption (a store in the clear is encrypted here
        // when a key is configured) change in one transaction; pages freed meanwhile
        // are zeroed (`secure_delete=ON`), so no plaintext is left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let setup = (|| -> Result<(Option<UnitCipher>, bool), StoreError> {
            conn.execute_batch(SCHEMA)?;
            let has_route: i64 = conn.query_row(
                "SELECT count(*) FROM pragma_table_info('requests') WHERE name = 'void_route'",
                [],
                |r| r.get(0),
            )?;
            if has_route == 0 {
                conn.execute_batch("ALTER TABLE requests ADD COLUMN void_route TEXT")?;
            }
            let has_replay: i64 = conn.query_row(
                "SELECT count(*) FROM pragma_table_info('requests') WHERE name = 'replay_key'",
                [],
                |r| r.get(0),
            )?;
            if has_replay == 0 {
                // Version 5 found an answered request by its own ID, derived
                // from the SAE's key: that ID is its replay key.
                conn.execute_batch(
                    "ALTER TABLE requests ADD COLUMN replay_key BLOB;
                     UPDATE requests SET replay_key = request_id WHERE state = 5;",
                )?;
            }
            conn.execute_batch(
                "CREATE INDEX IF NOT EXISTS requests_replay ON requests(replay_key) WHERE replay_key IS NOT NULL",
            )?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            let record = key_record(&conn)?;
            Ok(
                match cipher::plan(&path.display().to_string(), record, master)? {
                    Plan::Plain => (None, false),
                    Plan::Use(c) => (Some(c), false),
                    Plan::Encrypt(c, record) => {
                        encrypt_in_place(&conn, &c)?;
                        let mut ins = conn.prepare("INSERT INTO meta(k, v) VALUES (?1, ?2)")?;
                        ins.execute(params!["cipher", cipher::CIPHER_NAME.as_bytes()])?;
                        ins.execute(params!["salt", record.salt])?;
                        ins.execute(params!["check", record.check])?;
                        (Some(c), true)
                    }
                },
            )
        })();
        let (cipher, migrated) = match setup {
            Ok(v) => {
                conn.execute_batch("COMMIT")?;
                v
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        conn.pragma_update(None, "secure_delete", "FAST")?;
        if migrated {
            // The plaintext's pages are in the WAL until it is copied and cut.
            let _: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            tracing::info!(store = %path.display(), "key material encrypted under the node master key");
        } else if cipher.is_none() {
            tracing::warn!(
                store = %path.display(),
                "no node master key (store_key): key material is stored in the clear"
            );
        }
        // Pool counters are maintained by every operation; recomputing them at open
        // makes them self-healing (one scan per start-up).
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM pools;
             INSERT INTO pools(peer, total, mine_available)
                 SELECT b.peer, sum(b.remaining), coalesce((SELECT sum(f.n) FROM free f
                     WHERE f.peer = b.peer AND f.mine = 1), 0)
                 FROM blocks b GROUP BY b.peer;
             COMMIT;",
        )?;
        // Checkpoints run on their own thread and connection (see `checkpointer`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let ckpt = Connection::open(path)?;
        ckpt.busy_timeout(std::time::Duration::from_secs(5))?;
        ckpt.pragma_update(None, "synchronous", sync)?;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kms-sqlite-ckpt".into())
            .spawn(move || checkpointer(ckpt, stopped))
            .map_err(|e| StoreError::Backend(format!("spawn checkpoint thread: {e}")))?;
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("kms-sqlite".into())
            .spawn(move || writer(Db { conn, cipher }, rx))
            .map_err(|e| StoreError::Backend(format!("spawn writer thread: {e}")))?;
        Ok(Self {
            tx,
            _checkpointer: stop,
        })
    }

    fn submit<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(OpJob {
            op: Some(op),
            out: None,
            reply,
        });
        let sent = self.tx.send(job).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        })
    }
}

fn writer(conn: Db, rx: mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let commit = run_batch(&conn, &mut batch);
        for job in batch {
            job.finish(commit.clone());
        }
    }
}

/// Runs one cached statement (the transaction and savepoint statements are
/// prepared once instead of parsed at every use).
fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn run_batch(conn: &Db, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    exec(conn, "BEGIN IMMEDIATE")?;
    let body = (|| -> Result<(), StoreError> {
        for job in batch.iter_mut() {
            exec(conn, "SAVEPOINT op")?;
            if !job.run(conn) {
                exec(conn, "ROLLBACK TO op")?;
            }
            exec(conn, "RELEASE op")?;
        }
        exec(conn, "COMMIT")
    })();
    if body.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    body
}

/// The store's encryption record, if its material is encrypted.
fn key_record(conn: &Connection) -> Result<Option<KeyRecord>, StoreError> {
    let mut get = conn.prepare("SELECT v FROM meta WHERE k = ?1")?;
    let mut value = |k: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get.query_row(params![k], |r| r.get(0)).optional()?)
    };
    let Some(name) = value("cipher")? else {
        return Ok(None);
    };
    if name != cipher::CIPHER_NAME.as_bytes() {
        return Err(StoreError::MasterKey(format!(
            "the store is encrypted with {:?}, which this qkdnet does not know",
            String::from_utf8_lossy(&name)
        )));
    }
    match (value("salt")?, value("check")?) {
        (Some(salt), Some(check)) => Ok(Some(KeyRecord { salt, check })),
        _ => Err(corrupt("encryption record incomplete")),
    }
}

/// Encrypts every chunk's units in place (a store in the clear gets a key).
/// Units already delivered are zeros; encrypting them too is harmless.
fn encrypt_in_place(conn: &Connection, cipher: &UnitCipher) -> Result<(), StoreError> {
    let rows: Vec<(i64, i64)> = conn
        .prepare("SELECT bid, c FROM chunks")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut sel = conn.prepare("SELECT data FROM chunks WHERE bid=?1 AND c=?2")?;
    let mut upd = conn.prepare("UPDATE chunks SET data=?3 WHERE bid=?1 AND c=?2")?;
    for (bid, c) in rows {
        let mut data: Zeroizing<Vec<u8>> =
            Zeroizing::new(sel.query_row(params![bid, c], |r| r.get(0))?);
        if !data.len().is_multiple_of(UNIT_BYTES) {
            return Err(corrupt("chunk length"));
        }
        let first = u64_of(c)? * CHUNK_UNITS;
        for (k, unit) in data.chunks_mut(UNIT_BYTES).enumerate() {
            cipher.apply(u64_of(bid)?, first + k as u64, unit);
        }
        upd.execute(params![bid, c, &data[..]])?;
    }
    Ok(())
}

/// Adds to a peer's pool counters.
fn bump(conn: &Connection, peer: &str, d_total: i64, d_mine: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO pools(peer, total, mine_available) VALUES (?1, ?2, ?3)
         ON CONFLICT(peer) DO UPDATE SET total = total + ?2, mine_available = mine_available + ?3",
    )?
    .execute(params![peer, d_total, d_mine])?;
    Ok(())
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend("value exceeds i64".into()))
}

fn u64_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Backend("negative value in store".into()))
}

fn uuid_of(b: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(b).map_err(|_| StoreError::Backend("corrupt UUID in store".into()))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt key store: {what}"))
}

/// What the operations need to know about a stored block.
#[derive(Clone)]
struct Block {
    bid: i64,
    /// Link tag of a block whose unit IDs are [`unit_id_tagged`]'s; `None` when
    /// its units came with other IDs (relayed keys), kept in `aliases`.
    tag: Option<[u8; 4]>,
    number: u64,
    /// 2 when the two ends own alternate units, 1 when one end owns them all.
    stride: u64,
    /// Unit `i` is this KME's iff `i % stride == mine_side`.
    mine_side: u64,
    peer: String,
}

impl Block {
    fn is_mine(&self, i: u64) -> bool {
        i % self.stride == self.mine_side
    }

    /// Index of the `t`-th unit of the extent starting at `lo`.
    fn at(&self, lo: u64, t: u64) -> u64 {
        lo + t * self.stride
    }
}

/// The blocks one operation has looked up, by row ID.
#[derive(Default)]
struct Blocks(Vec<Block>);

impl Blocks {
    fn get(&mut self, conn: &Connection, bid: i64) -> Result<Block, StoreError> {
        if let Some(b) = self.0.iter().find(|b| b.bid == bid) {
            return Ok(b.clone());
        }
        let b = conn
            .prepare_cached(
                "SELECT tag, block_number, stride, mine_side, peer FROM blocks WHERE bid=?1",
            )?
            .query_row(params![bid], |r| {
                Ok((
                    r.get::<_, Option<i64>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?
            .ok_or_else(|| corrupt("extent of a missing block"))?;
        let tag = match b.0 {
            Some(t) => Some(
                u32::try_from(t)
                    .map_err(|_| corrupt("link tag"))?
                    .to_be_bytes(),
            ),
            None => None,
        };
        let block = Block {
            bid,
            tag,
            number: u64_of(b.1)?,
            stride: u64_of(b.2)?,
            mine_side: u64_of(b.3)?,
            peer: b.4,
        };
        if !(1..=2).contains(&block.stride) || block.mine_side > 1 {
            return Err(corrupt("block layout"));
        }
        self.0.push(block.clone());
        Ok(block)
    }

    /// The ID of unit `i` of `block`.
    fn uid(conn: &Connection, block: &Block, i: u64) -> Result<Uuid, StoreError> {
        match &block.tag {
            Some(tag) => Ok(unit_id_tagged(tag, block.number, i)),
            None => {
                let b: Vec<u8> = conn
                    .prepare_cached("SELECT uid FROM aliases WHERE bid=?1 AND i=?2")?
                    .query_row(params![block.bid, i64_of(i)?], |r| r.get(0))
                    .optional()?
                    .ok_or_else(|| corrupt("unit without ID"))?;
                uuid_of(&b)
            }
        }
    }
}

/// Finds where units are stored: (block row ID, unit index). Aliases come first:
/// a relayed key may carry the ID of a canonical unit that was delivered here
/// before (a multipath key keeps its first share's ID). Block lookups are
/// cached, and alias lookups are skipped while the store holds no aliases (no
/// relayed keys) when the locator is made.
struct Locator {
    aliases: bool,
    /// (link tag, block number) → (block row ID, units), if stored.
    blocks: std::collections::HashMap<([u8; 4], u64), Option<BlockSpot>>,
}

/// A block's row ID and unit count.
type BlockSpot = (i64, u64);

impl Locator {
    fn new(conn: &Connection) -> Result<Self, StoreError> {
        let aliases = conn
            .prepare_cached("SELECT 1 FROM aliases LIMIT 1")?
            .query_row([], |_| Ok(()))
            .optional()?
            .is_some();
        Ok(Self {
            aliases,
            blocks: Default::default(),
        })
    }

    fn locate(&mut self, conn: &Connection, id: &Uuid) -> Result<Option<(i64, u64)>, StoreError> {
        if self.aliases {
            let hit: Option<(i64, i64)> = conn
                .prepare_cached("SELECT bid, i FROM aliases WHERE uid=?1")?
                .query_row(params![&id.as_bytes()[..]], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((bid, i)) = hit {
                return Ok(Some((bid, u64_of(i)?)));
            }
        }
        let Some((tag, number, i)) = decode_unit_id(id) else {
            return Ok(None);
        };
        let block = match self.blocks.get(&(tag, number)) {
            Some(b) => *b,
            None => {
                // Block numbers beyond i64 cannot be stored, so cannot be found either.
                let hit: Option<(i64, i64)> = match i64::try_from(number) {
                    Ok(n) => conn
                        .prepare_cached(
                            "SELECT bid, units FROM blocks WHERE tag=?1 AND block_number=?2",
                        )?
                        .query_row(params![i64::from(u32::from_be_bytes(tag)), n], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()?,
                    Err(_) => None,
                };
                let b = hit
                    .map(|(bid, units)| Ok::<_, StoreError>((bid, u64_of(units)?)))
                    .transpose()?;
                self.blocks.insert((tag, number), b);
                b
            }
        };
        Ok(block.and_then(|(bid, units)| (i < units).then_some((bid, i))))
    }
}

/// Whether unit `i` of `block` still has its material: free, reserved, or
/// accepted and not yet delivered.
fn live(conn: &Connection, block: &Block, i: u64) -> Result<bool, StoreError> {
    if let Some((lo, n)) = free_run_before(conn, block, block.is_mine(i), i)?
        && (i - lo).is_multiple_of(block.stride)
        && (i - lo) / block.stride < n
    {
        return Ok(true);
    }
    let Some((rid, pos)) = holder(conn, block, i)? else {
        return Ok(false);
    };
    let (role, state, size_bits): (i64, i64, u32) = conn
        .prepare_cached("SELECT role, state, size_bits FROM requests WHERE rid=?1")?
        .query_row(params![rid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let per_key = u64::from(units_for_bits(size_bits).max(1));
    Ok(match (role, state) {
        (ROLE_MASTER, REQ_PENDING) => true,
        (ROLE_MASTER, REQ_STOCKED) | (ROLE_SLAVE, _) => {
            !bit(&taken_of(conn, rid)?, (pos / per_key) as usize)
        }
        _ => false,
    })
}

/// A run of units of one block held by a request: units `lo, lo + stride, …`
/// (`n` of them) at positions `pos ..` of the request.
#[derive(Clone, Copy, Debug)]
struct Extent {
    pos: u64,
    bid: i64,
    lo: u64,
    n: u64,
}

fn held_of(conn: &Connection, rid: i64) -> Result<Vec<Extent>, StoreError> {
    let mut sel =
        conn.prepare_cached("SELECT pos, bid, lo, n FROM held WHERE rid=?1 ORDER BY pos")?;
    let mut rows = sel.query(params![rid])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(Extent {
            pos: u64_of(row.get(0)?)?,
            bid: row.get(1)?,
            lo: u64_of(row.get(2)?)?,
            n: u64_of(row.get(3)?)?,
        });
    }
    Ok(out)
}

fn insert_held(conn: &Connection, rid: i64, block: &Block, e: &Extent) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO held(rid, pos, bid, side, lo, n) VALUES (?1,?2,?3,?4,?5,?6)")?
        .execute(params![
            rid,
            i64_of(e.pos)?,
            e.bid,
            i64_of(e.lo % block.stride)?,
            i64_of(e.lo)?,
            i64_of(e.n)?
        ])?;
    Ok(())
}

/// Appends runs `(block, first index, count)` for unit `i` of `block`, extending
/// the last run when `i` follows it.
fn push_run(runs: &mut Vec<(Block, u64, u64)>, block: &Block, i: u64) {
    if let Some((b, lo, n)) = runs.last_mut()
        && b.bid == block.bid
        && block.at(*lo, *n) == i
    {
        *n += 1;
        return;
    }
    runs.push((block.clone(), i, 1));
}

/// Units (block, index) at positions `from .. to` of a request holding `extents`.
fn units_at(
    extents: &[Extent],
    blocks: &mut Blocks,
    conn: &Connection,
    from: u64,
    to: u64,
) -> Result<Vec<(Block, u64)>, StoreError> {
    let mut out = Vec::with_capacity((to - from) as usize);
    for e in extents {
        let (a, b) = (from.max(e.pos), to.min(e.pos + e.n));
        if a < b {
            let block = blocks.get(conn, e.bid)?;
            for p in a..b {
                out.push((block.clone(), block.at(e.lo, p - e.pos)));
            }
        }
    }
    if out.len() as u64 != to - from {
        return Err(corrupt("request extents"));
    }
    Ok(out)
}

/// Byte range of unit `i` within chunk `i / CHUNK_UNITS`.
fn in_chunk(i: u64) -> std::ops::Range<usize> {
    let o = (i % CHUNK_UNITS) as usize * UNIT_BYTES;
    o..o + UNIT_BYTES
}

/// Appends the material of units `lo, lo + stride, …` (`n` of them) of `block`.
fn read_units(
    conn: &Db,
    block: &Block,
    lo: u64,
    n: u64,
    out: &mut Zeroizing<Vec<u8>>,
) -> Result<(), StoreError> {
    if n == 0 {
        return Ok(());
    }
    let last = block.at(lo, n - 1);
    let group = u64_of(block.bid)?;
    let mut sel = conn
        .prepare_cached("SELECT c, data FROM chunks WHERE bid=?1 AND c>=?2 AND c<=?3 ORDER BY c")?;
    let mut rows = sel.query(params![
        block.bid,
        i64_of(lo / CHUNK_UNITS)?,
        i64_of(last / CHUNK_UNITS)?
    ])?;
    let mut next = lo;
    while let Some(row) = rows.next()? {
        let c = u64_of(row.get(0)?)?;
        let data = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
        while next <= last && next / CHUNK_UNITS == c {
            let bytes = data
                .get(in_chunk(next))
                .ok_or_else(|| corrupt("short chunk"))?;
            let at = out.len();
            out.extend_from_slice(bytes);
            if let Some(cipher) = &conn.cipher {
                cipher.apply(group, next, &mut out[at..]);
            }
            next += block.stride;
        }
    }
    if next <= last {
        return Err(StoreError::Backend("key units missing in store".into()));
    }
    Ok(())
}

/// Deletes the material of units `lo, lo + stride, …` (`n` of them) of `block`:
/// their bytes in the chunk rows are overwritten with zeros, and once every unit
/// of the block is gone its chunks are deleted.
fn consume(conn: &Connection, block: &Block, lo: u64, n: u64) -> Result<(), StoreError> {
    if n == 0 {
        return Ok(());
    }
    let remaining: i64 = conn
        .prepare_cached(
            "UPDATE blocks SET remaining = remaining - ?2 WHERE bid=?1 RETURNING remaining",
        )?
        .query_row(params![block.bid, i64_of(n)?], |r| r.get(0))?;
    if remaining < 0 {
        return Err(corrupt("unit consumed twice"));
    }
    if remaining == 0 {
        conn.prepare_cached("DELETE FROM chunks WHERE bid=?1")?
            .execute(params![block.bid])?;
        conn.prepare_cached("DELETE FROM aliases WHERE bid=?1")?
            .execute(params![block.bid])?;
        return Ok(());
    }
    if block.tag.is_none() {
        // A delivered relayed unit's ID is free for reuse (see `Locator`).
        let mut del = conn.prepare_cached("DELETE FROM aliases WHERE bid=?1 AND i=?2")?;
        for t in 0..n {
            del.execute(params![block.bid, i64_of(block.at(lo, t))?])?;
        }
    }
    let last = block.at(lo, n - 1);
    let mut upd = conn.prepare_cached("UPDATE chunks SET data=?3 WHERE bid=?1 AND c=?2")?;
    let mut sel = conn.prepare_cached("SELECT data FROM chunks WHERE bid=?1 AND c=?2")?;
    let mut next = lo;
    while next <= last {
        let c = next / CHUNK_UNITS;
        let mut data: Zeroizing<Vec<u8>> = Zeroizing::new(
            sel.query_row(params![block.bid, i64_of(c)?], |r| r.get(0))
                .optional()?
                .ok_or_else(|| corrupt("missing chunk"))?,
        );
        while next <= last && next / CHUNK_UNITS == c {
            data.get_mut(in_chunk(next))
                .ok_or_else(|| corrupt("short chunk"))?
                .fill(0);
            next += block.stride;
        }
        upd.execute(params![block.bid, i64_of(c)?, &data[..]])?;
    }
    Ok(())
}

/// The free run of `mine`'s side of `block` that starts at or before unit `i`
/// (it may end before `i`): (first index, count).
fn free_run_before(
    conn: &Connection,
    block: &Block,
    mine: bool,
    i: u64,
) -> Result<Option<(u64, u64)>, StoreError> {
    let hit: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT lo, n FROM free WHERE peer=?1 AND mine=?2 AND bid=?3 AND lo<=?4 ORDER BY lo DESC LIMIT 1",
        )?
        .query_row(
            params![block.peer.as_str(), i64::from(mine), block.bid, i64_of(i)?],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    hit.map(|(lo, n)| Ok((u64_of(lo)?, u64_of(n)?))).transpose()
}

/// Returns units `lo, lo + stride, …` (`n` of them) of `block` to the free list
/// of its pool side, merged with adjacent free runs.
fn free_insert(
    conn: &Connection,
    block: &Block,
    mine: bool,
    mut lo: u64,
    mut n: u64,
) -> Result<(), StoreError> {
    if n == 0 {
        return Ok(());
    }
    let key = (block.peer.as_str(), i64::from(mine), block.bid);
    let before = match lo.checked_sub(1) {
        Some(i) => free_run_before(conn, block, mine, i)?,
        None => None,
    };
    let mut del =
        conn.prepare_cached("DELETE FROM free WHERE peer=?1 AND mine=?2 AND bid=?3 AND lo=?4")?;
    if let Some((blo, bn)) = before {
        let end = block.at(blo, bn);
        if end > lo {
            return Err(corrupt("unit freed twice"));
        }
        if end == lo {
            del.execute(params![key.0, key.1, key.2, i64_of(blo)?])?;
            lo = blo;
            n += bn;
        }
    }
    let after_lo = block.at(lo, n);
    let after: Option<i64> = conn
        .prepare_cached("SELECT n FROM free WHERE peer=?1 AND mine=?2 AND bid=?3 AND lo=?4")?
        .query_row(params![key.0, key.1, key.2, i64_of(after_lo)?], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(an) = after {
        del.execute(params![key.0, key.1, key.2, i64_of(after_lo)?])?;
        n += u64_of(an)?;
    }
    conn.prepare_cached("INSERT INTO free(peer, mine, bid, lo, n) VALUES (?1,?2,?3,?4,?5)")?
        .execute(params![key.0, key.1, key.2, i64_of(lo)?, i64_of(n)?])
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                corrupt("unit freed twice")
            }
            e => e.into(),
        })?;
    Ok(())
}

/// Removes units `lo, lo + stride, …` (`n` of them) of `block` from the free list
/// of `mine`'s side; `false` (and nothing changed) unless they are all free.
fn free_take(
    conn: &Connection,
    block: &Block,
    mine: bool,
    lo: u64,
    n: u64,
) -> Result<bool, StoreError> {
    let key = (block.peer.as_str(), i64::from(mine), block.bid);
    let Some((flo, fn_)) = free_run_before(conn, block, mine, lo)? else {
        return Ok(false);
    };
    if !(lo - flo).is_multiple_of(block.stride) {
        return Ok(false);
    }
    let skip = (lo - flo) / block.stride;
    if skip + n > fn_ {
        return Ok(false);
    }
    conn.prepare_cached("DELETE FROM free WHERE peer=?1 AND mine=?2 AND bid=?3 AND lo=?4")?
        .execute(params![key.0, key.1, key.2, i64_of(flo)?])?;
    let mut ins =
        conn.prepare_cached("INSERT INTO free(peer, mine, bid, lo, n) VALUES (?1,?2,?3,?4,?5)")?;
    if skip > 0 {
        ins.execute(params![key.0, key.1, key.2, i64_of(flo)?, i64_of(skip)?])?;
    }
    let rest = fn_ - skip - n;
    if rest > 0 {
        ins.execute(params![
            key.0,
            key.1,
            key.2,
            i64_of(block.at(lo, n))?,
            i64_of(rest)?
        ])?;
    }
    Ok(true)
}

/// How the owners of a block's units are laid out: (stride, mine_side), see
/// [`Block`]. The link cuts blocks with alternate owners; relayed keys arrive
/// as batches that are wholly the peer's.
fn owner_layout(units: &[KeyUnit]) -> Result<(u64, u64), StoreError> {
    let Some(first) = units.first() else {
        return Err(StoreError::InvalidLayout("block without units"));
    };
    if units.iter().all(|u| u.mine == first.mine) {
        return Ok((1, if first.mine { 0 } else { 1 }));
    }
    let mine_side = if first.mine { 0 } else { 1 };
    if units
        .iter()
        .enumerate()
        .all(|(i, u)| u.mine == (i as u64 % 2 == mine_side))
    {
        return Ok((2, mine_side));
    }
    Err(StoreError::InvalidLayout(
        "unit owners neither alternate nor agree",
    ))
}

fn duplicate(e: rusqlite::Error) -> StoreError {
    match e {
        // A unit ID collision means the same block content under another number.
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::DuplicateBlock
        }
        e => e.into(),
    }
}

fn ingest_op(conn: &Db, b: IngestBatch) -> Result<u64, StoreError> {
    let seen: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM blocks WHERE link_id=?1 AND block_number=?2")?
        .query_row(params![b.link_id, i64_of(b.block_number)?], |r| r.get(0))
        .optional()?;
    if seen.is_some() {
        return Err(StoreError::DuplicateBlock);
    }
    let held = counts_op(conn, &b.peer)?.total_units;
    let n = b.units.len() as u64;
    if held.saturating_add(n) > b.capacity_units {
        return Err(StoreError::PoolFull {
            capacity_units: b.capacity_units,
        });
    }
    let (stride, mine_side) = owner_layout(&b.units)?;
    let tag = link_tag(&b.link_id);
    let canonical = b
        .units
        .iter()
        .enumerate()
        .all(|(i, u)| u.id == unit_id_tagged(&tag, b.block_number, i as u64));
    conn.prepare_cached(
        "INSERT INTO blocks(link_id, block_number, peer, tag, stride, mine_side, units, remaining,
             eps_sec, eps_cor, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?7,?8,?9,?10)",
    )?
    .execute(params![
        b.link_id,
        i64_of(b.block_number)?,
        b.peer.as_str(),
        canonical.then(|| i64::from(u32::from_be_bytes(tag))),
        i64_of(stride)?,
        i64_of(mine_side)?,
        i64_of(n)?,
        b.eps_sec,
        b.eps_cor,
        i64_of(b.created_unix_ms)?
    ])
    .map_err(duplicate)?;
    let bid = conn.last_insert_rowid();
    let mut blocks = Blocks::default();
    let block = blocks.get(conn, bid)?;
    // No unit ID may be stored twice: canonical IDs are unique by (tag, block),
    // and aliases must not collide with either kind.
    if canonical {
        let (first, last) = (
            unit_id_tagged(&tag, b.block_number, 0),
            unit_id_tagged(&tag, b.block_number, n - 1),
        );
        let clash: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM aliases WHERE uid>=?1 AND uid<=?2 LIMIT 1")?
            .query_row(params![&first.as_bytes()[..], &last.as_bytes()[..]], |r| {
                r.get(0)
            })
            .optional()?;
        if clash.is_some() {
            return Err(StoreError::DuplicateBlock);
        }
    } else {
        let mut ins = conn.prepare_cached("INSERT INTO aliases(uid, bid, i) VALUES (?1,?2,?3)")?;
        // IDs repeated within the batch are refused by the primary key.
        let mut locator = Locator::new(conn)?;
        for (i, u) in b.units.iter().enumerate() {
            // The ID of a unit delivered here before may be reused (see `Locator`).
            if let Some((other, j)) = locator.locate(conn, &u.id)?
                && live(conn, &blocks.get(conn, other)?, j)?
            {
                return Err(StoreError::DuplicateBlock);
            }
            ins.execute(params![&u.id.as_bytes()[..], bid, i as i64])
                .map_err(duplicate)?;
        }
    }
    let mut ins = conn.prepare_cached("INSERT INTO chunks(bid, c, data) VALUES (?1,?2,?3)")?;
    let group = u64_of(bid)?;
    for (c, units) in b.units.chunks(CHUNK_UNITS as usize).enumerate() {
        let mut data = Zeroizing::new(Vec::with_capacity(units.len() * UNIT_BYTES));
        for (k, u) in units.iter().enumerate() {
            let at = data.len();
            data.extend_from_slice(&u.material[..]);
            if let Some(cipher) = &conn.cipher {
                let i = c as u64 * CHUNK_UNITS + k as u64;
                cipher.apply(group, i, &mut data[at..]);
            }
        }
        ins.execute(params![bid, c as i64, &data[..]])?;
    }
    let mut mine_units = 0;
    for side in 0..stride {
        let count = (n + stride - 1 - side) / stride;
        let mine = side == mine_side;
        if mine {
            mine_units = count;
        }
        free_insert(conn, &block, mine, side, count)?;
    }
    bump(conn, b.peer.as_str(), i64_of(n)?, i64_of(mine_units)?)?;
    prune_op(conn, b.created_unix_ms)?;
    Ok(n)
}

/// Forgets finished requests older than [`RETENTION_MS`] (and the master's
/// records of which keys they delivered), at most [`PRUNE_LIMIT`] per call.
/// Keeps an acknowledged request's keys for one replay (see [`REQ_ANSWERED`]).
fn answer_op(conn: &Connection, request_ids: &[Uuid]) -> Result<(), StoreError> {
    for request_id in request_ids {
        let req = master_pending(conn, request_id)?;
        conn.prepare_cached("UPDATE requests SET state=?2 WHERE rid=?1")?
            .execute(params![req.rid, REQ_ANSWERED])?;
    }
    Ok(())
}

fn replay_op(conn: &Db, r: ReplayRequest) -> Result<Replay, StoreError> {
    let rows: Vec<(i64, i64, String, i64, String, String, u32, i64)> = conn
        .prepare_cached(
            "SELECT rid, role, peer, state, master, slave, size_bits, created_ms FROM requests
             WHERE replay_key=?1 AND state != ?2 ORDER BY rid",
        )?
        .query_map(params![&r.replay_key.as_bytes()[..], REQ_VOIDED], |x| {
            Ok((
                x.get(0)?,
                x.get(1)?,
                x.get(2)?,
                x.get(3)?,
                x.get(4)?,
                x.get(5)?,
                x.get(6)?,
                x.get(7)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    if rows.is_empty() {
        return Ok(Replay::Unknown);
    }
    let per_key = u64::from(units_for_bits(r.size_bits).max(1));
    let (mut answered, mut pending, mut spent) = (Vec::new(), false, false);
    for (rid, role, peer, state, master, slave, size_bits, created_ms) in rows {
        if role != ROLE_MASTER
            || master != r.master.as_str()
            || slave != r.slave.as_str()
            || size_bits != r.size_bits
        {
            return Ok(Replay::Mismatch);
        }
        match state {
            REQ_PENDING => pending = true,
            REQ_ANSWERED => {
                let extents = held_of(conn, rid)?;
                let units: u64 = extents.iter().map(|e| e.n).sum();
                if units / per_key != u64::from(r.number) {
                    return Ok(Replay::Mismatch);
                }
                answered.push((rid, peer, created_ms, extents, units));
            }
            _ => spent = true,
        }
    }
    if let Some(outcome) = Replay::unless_answered(spent, pending, !answered.is_empty()) {
        return Ok(outcome);
    }
    let expired = answered
        .iter()
        .any(|a| u64_of(a.2).map_or(true, |c| c.saturating_add(REPLAY_WINDOW_MS) < r.now_unix_ms));
    let all: Vec<u64> = (0..u64::from(r.number)).collect();
    let mut shares = Vec::with_capacity(answered.len());
    for (rid, peer, _, extents, units) in answered {
        if expired {
            consume_held(conn, &peer, &extents)?;
        } else {
            let mut taken = Vec::new();
            shares.push(deliver_keys(
                conn,
                &mut Blocks::default(),
                &extents,
                &mut taken,
                &all,
                r.size_bits,
            )?);
            bump(conn, &peer, -i64_of(units)?, 0)?;
        }
        delivered_at(conn, rid, r.now_unix_ms)?;
    }
    Ok(if expired {
        Replay::Spent
    } else {
        Replay::Keys(shares)
    })
}

fn prune_op(conn: &Connection, now: u64) -> Result<(), StoreError> {
    // Answered requests past their replay window lose their kept keys first.
    let replay_cutoff = i64_of(now.saturating_sub(REPLAY_WINDOW_MS))?;
    let answered: Vec<(i64, String)> = conn
        .prepare_cached(
            "SELECT rid, peer FROM requests WHERE state = ?1 AND created_ms < ?2 LIMIT ?3",
        )?
        .query_map(params![REQ_ANSWERED, replay_cutoff, PRUNE_LIMIT], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    for (rid, peer) in answered {
        consume_held(conn, &peer, &held_of(conn, rid)?)?;
        delivered_at(conn, rid, now)?;
    }
    let cutoff = i64_of(now.saturating_sub(RETENTION_MS))?;
    let old: Vec<i64> = conn
        .prepare_cached(
            "SELECT rid FROM requests WHERE state IN (?1, ?2) AND created_ms < ?3 LIMIT ?4",
        )?
        .query_map(
            params![REQ_VOIDED, REQ_DELIVERED, cutoff, PRUNE_LIMIT],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    let mut del_held = conn.prepare_cached("DELETE FROM held WHERE rid=?1")?;
    let mut del_req = conn.prepare_cached("DELETE FROM requests WHERE rid=?1")?;
    for rid in old {
        del_held.execute(params![rid])?;
        del_req.execute(params![rid])?;
    }
    Ok(())
}

fn counts_op(conn: &Connection, peer: &KmeId) -> Result<PoolCounts, StoreError> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT total, mine_available FROM pools WHERE peer=?1")?
        .query_row(params![peer.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (total, mine) = row.unwrap_or((0, 0));
    Ok(PoolCounts {
        mine_available: mine.max(0) as u64,
        total_units: total.max(0) as u64,
    })
}

/// A request's row.
struct RequestRow {
    rid: i64,
    role: i64,
    peer: String,
    state: i64,
    size_bits: u32,
    voided: Option<Vec<u8>>,
}

fn request_row(conn: &Connection, id: &Uuid) -> Result<Option<RequestRow>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT rid, role, peer, state, size_bits, voided FROM requests WHERE request_id=?1",
        )?
        .query_row(params![&id.as_bytes()[..]], |r| {
            Ok(RequestRow {
                rid: r.get(0)?,
                role: r.get(1)?,
                peer: r.get(2)?,
                state: r.get(3)?,
                size_bits: r.get(4)?,
                voided: r.get(5)?,
            })
        })
        .optional()?)
}

/// Inserts a request row and returns its row ID.
fn insert_request(
    conn: &Connection,
    id: &Uuid,
    role: i64,
    peer: &str,
    state: i64,
    (master, slave, size_bits): (&str, &str, u32),
    now_unix_ms: u64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO requests(request_id, role, peer, state, master, slave, size_bits, created_ms)
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
    )?
    .execute(params![
        &id.as_bytes()[..],
        role,
        peer,
        state,
        master,
        slave,
        size_bits,
        i64_of(now_unix_ms)?
    ])
    .map_err(|e| match e {
        // The request ID exists already (a concurrent retry of an idempotent request).
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::RequestConflict
        }
        e => e.into(),
    })?;
    Ok(conn.last_insert_rowid())
}

fn set_state(conn: &Connection, rid: i64, state: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE requests SET state=?2 WHERE rid=?1")?
        .execute(params![rid, state])?;
    Ok(())
}

fn reserve_op(conn: &Db, r: Reservation) -> Result<Vec<ReservedKey>, StoreError> {
    if request_row(conn, &r.request_id)?.is_some() {
        return Err(StoreError::RequestConflict);
    }
    let per_key = u64::from(units_for_bits(r.size_bits));
    let key_bytes = (r.size_bits / 8) as usize;
    let need = per_key * u64::from(r.number);
    if need == 0 {
        return Err(StoreError::InvalidLayout("empty reservation"));
    }
    // The oldest free runs of this KME's units; each has at least one unit.
    let runs: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT bid, lo, n FROM free WHERE peer=?1 AND mine=1 ORDER BY bid, lo LIMIT ?2",
        )?
        .query_map(params![r.peer.as_str(), i64_of(need)?], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let free: u64 = runs.iter().map(|x| x.2.max(0) as u64).sum();
    if free < need {
        let available = counts_op(conn, &r.peer)?.mine_available;
        return Err(StoreError::Exhausted {
            available,
            requested: need,
        });
    }
    let rid = insert_request(
        conn,
        &r.request_id,
        ROLE_MASTER,
        r.peer.as_str(),
        REQ_PENDING,
        (r.master.as_str(), r.slave.as_str(), r.size_bits),
        r.now_unix_ms,
    )?;
    if r.void_route.is_some() || r.replay_key.is_some() {
        conn.prepare_cached("UPDATE requests SET void_route=?2, replay_key=?3 WHERE rid=?1")?
            .execute(params![
                rid,
                r.void_route.as_ref().map(VoidRoute::encode),
                r.replay_key.as_ref().map(|k| &k.as_bytes()[..]),
            ])?;
    }
    let mut blocks = Blocks::default();
    let mut material = Zeroizing::new(Vec::with_capacity(need as usize * UNIT_BYTES));
    let mut ids = Vec::with_capacity(need as usize);
    let mut pos = 0;
    for (bid, lo, n) in runs {
        if pos == need {
            break;
        }
        let block = blocks.get(conn, bid)?;
        let (lo, n) = (u64_of(lo)?, u64_of(n)?);
        let k = n.min(need - pos);
        if !free_take(conn, &block, true, lo, k)? {
            return Err(corrupt("free list"));
        }
        insert_held(conn, rid, &block, &Extent { pos, bid, lo, n: k })?;
        read_units(conn, &block, lo, k, &mut material)?;
        for t in 0..k {
            ids.push(Blocks::uid(conn, &block, block.at(lo, t))?);
        }
        pos += k;
    }
    let out = ids
        .chunks(per_key as usize)
        .zip(material.chunks(per_key as usize * UNIT_BYTES))
        .map(|(units, bytes)| ReservedKey {
            layout: KeyLayout {
                key_id: units[0],
                size_bits: r.size_bits,
                unit_ids: units.to_vec(),
            },
            material: Zeroizing::new(bytes[..key_bytes].to_vec()),
        })
        .collect();
    bump(conn, r.peer.as_str(), 0, -i64_of(need)?)?;
    Ok(out)
}

/// The row of a pending master-side request.
fn master_pending(conn: &Connection, request_id: &Uuid) -> Result<RequestRow, StoreError> {
    match request_row(conn, request_id)? {
        Some(row) if row.role == ROLE_MASTER && row.state == REQ_PENDING => Ok(row),
        _ => Err(StoreError::RequestConflict),
    }
}

fn confirm_op(conn: &Connection, request_id: Uuid) -> Result<(), StoreError> {
    let req = master_pending(conn, &request_id)?;
    // The held extents stay, without material, as a record of which SAE pair the
    // keys went to: a later dec_keys for one at this (the master's) KME is then
    // answered 401 rather than "not found". Pruned with the request.
    consume_held(conn, &req.peer, &held_of(conn, req.rid)?)?;
    set_state(conn, req.rid, REQ_DELIVERED)
}

/// Deletes the material of a request's held units and takes them out of the
/// pool's total (the extents stay as the request's record).
fn consume_held(conn: &Connection, peer: &str, extents: &[Extent]) -> Result<(), StoreError> {
    let mut blocks = Blocks::default();
    let mut n = 0;
    for e in extents {
        consume(conn, &blocks.get(conn, e.bid)?, e.lo, e.n)?;
        n += e.n;
    }
    bump(conn, peer, -i64_of(n)?, 0)
}

/// Marks a request delivered at `now` (retention counts from then).
fn delivered_at(conn: &Connection, rid: i64, now: u64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE requests SET state=?2, created_ms=?3 WHERE rid=?1")?
        .execute(params![rid, REQ_DELIVERED, i64_of(now)?])?;
    Ok(())
}

fn release_op(conn: &Connection, request_id: Uuid, discard: Vec<Uuid>) -> Result<(), StoreError> {
    let req = master_pending(conn, &request_id)?;
    let discard: std::collections::HashSet<Uuid> = discard.into_iter().collect();
    let mut blocks = Blocks::default();
    let (mut discarded, mut returned) = (0, 0);
    for e in held_of(conn, req.rid)? {
        let block = blocks.get(conn, e.bid)?;
        // Runs of units that go back (or are deleted) together.
        let mut run: Option<(bool, u64, u64)> = None;
        for t in 0..=e.n {
            let here = if t < e.n {
                let i = block.at(e.lo, t);
                Some((discard.contains(&Blocks::uid(conn, &block, i)?), i))
            } else {
                None
            };
            match (&mut run, here) {
                (Some((d, lo, n)), Some((dd, i))) if *d == dd && block.at(*lo, *n) == i => *n += 1,
                _ => {
                    if let Some((d, lo, n)) = run.take() {
                        if d {
                            consume(conn, &block, lo, n)?;
                            discarded += n;
                        } else {
                            free_insert(conn, &block, true, lo, n)?;
                            returned += n;
                        }
                    }
                    run = here.map(|(d, i)| (d, i, 1));
                }
            }
        }
    }
    conn.prepare_cached("DELETE FROM held WHERE rid=?1")?
        .execute(params![req.rid])?;
    bump(conn, &req.peer, -i64_of(discarded)?, i64_of(returned)?)?;
    set_state(conn, req.rid, REQ_VOIDED)
}

/// Key layouts of a request holding `extents` (keys of `size_bits`).
fn layouts_of(
    conn: &Connection,
    blocks: &mut Blocks,
    extents: &[Extent],
    size_bits: u32,
) -> Result<Vec<KeyLayout>, StoreError> {
    let per_key = (units_for_bits(size_bits) as usize).max(1);
    let mut ids = Vec::new();
    for e in extents {
        let block = blocks.get(conn, e.bid)?;
        for t in 0..e.n {
            ids.push(Blocks::uid(conn, &block, block.at(e.lo, t))?);
        }
    }
    Ok(ids
        .chunks(per_key)
        .map(|c| KeyLayout {
            key_id: c[0],
            size_bits,
            unit_ids: c.to_vec(),
        })
        .collect())
}

fn pending_op(conn: &Connection) -> Result<Vec<PendingRequest>, StoreError> {
    let mut reqs = Vec::new();
    {
        let mut sel = conn.prepare_cached(
            "SELECT rid, request_id, peer, size_bits, void_route FROM requests WHERE state=?2 AND role=?1",
        )?;
        let mut rows = sel.query(params![ROLE_MASTER, REQ_PENDING])?;
        while let Some(row) = rows.next()? {
            let rid: i64 = row.get(0)?;
            let id = uuid_of(blob(row, 1)?)?;
            let peer: String = row.get(2)?;
            let peer = KmeId::new(&peer)
                .map_err(|_| StoreError::Backend("corrupt peer ID in store".into()))?;
            let route = match row.get::<_, Option<String>>(4)? {
                Some(s) => Some(VoidRoute::decode(&s)?),
                None => None,
            };
            reqs.push((rid, id, peer, row.get::<_, u32>(3)?, route));
        }
    }
    let mut blocks = Blocks::default();
    reqs.into_iter()
        .map(|(rid, request_id, peer, size_bits, void_route)| {
            let keys = layouts_of(conn, &mut blocks, &held_of(conn, rid)?, size_bits)?;
            Ok(PendingRequest {
                request_id,
                peer,
                keys,
                void_route,
            })
        })
        .collect()
}

fn blob<'a>(row: &'a rusqlite::Row<'_>, i: usize) -> Result<&'a [u8], StoreError> {
    Ok(row.get_ref(i)?.as_blob().map_err(rusqlite::Error::from)?)
}

fn accept_op(conn: &Connection, a: Acceptance) -> Result<AcceptOutcome, StoreError> {
    match request_row(conn, &a.request_id)? {
        None => {}
        Some(row) if row.role == ROLE_SLAVE && row.peer == a.peer.as_str() => {
            return match row.state {
                // A retry of an accepted (possibly since delivered) request.
                REQ_ACCEPTED | REQ_DELIVERED => Ok(AcceptOutcome::AlreadyAccepted),
                REQ_VOIDED => Err(StoreError::RequestVoided),
                _ => Err(StoreError::RequestConflict),
            };
        }
        Some(_) => return Err(StoreError::RequestConflict),
    }
    let Some(size_bits) = a.keys.first().map(|k| k.size_bits) else {
        return Err(StoreError::InvalidLayout("no keys"));
    };
    let mut seen = std::collections::HashSet::new();
    for k in &a.keys {
        if k.size_bits == 0 || k.size_bits % 8 != 0 {
            return Err(StoreError::InvalidLayout(
                "size not a positive multiple of 8",
            ));
        }
        if k.size_bits != size_bits {
            return Err(StoreError::InvalidLayout(
                "keys of one request differ in size",
            ));
        }
        if k.unit_ids.len() != units_for_bits(k.size_bits) as usize {
            return Err(StoreError::InvalidLayout("unit count does not match size"));
        }
        if k.unit_ids.first() != Some(&k.key_id) {
            return Err(StoreError::InvalidLayout(
                "key ID is not the first unit's ID",
            ));
        }
        for u in &k.unit_ids {
            if !seen.insert(*u) {
                return Err(StoreError::InvalidLayout("unit listed twice"));
            }
        }
    }
    let rid = insert_request(
        conn,
        &a.request_id,
        ROLE_SLAVE,
        a.peer.as_str(),
        REQ_ACCEPTED,
        (a.master.as_str(), a.slave.as_str(), size_bits),
        a.now_unix_ms,
    )?;
    // Only the peer's own units of this pool, still free; a unit that does not
    // match changes nothing and is reported (the savepoint then rolls back).
    let mut blocks = Blocks::default();
    let mut unavailable = Vec::new();
    // Runs of consecutive units (block, first index, count, their IDs).
    let mut runs: Vec<(Block, u64, u64, Vec<Uuid>)> = Vec::new();
    let mut broken = false;
    let mut locator = Locator::new(conn)?;
    for u in a.keys.iter().flat_map(|k| &k.unit_ids) {
        let found = match locator.locate(conn, u)? {
            Some((bid, i)) => {
                let b = blocks.get(conn, bid)?;
                (b.peer == a.peer.as_str() && !b.is_mine(i)).then_some((b, i))
            }
            None => None,
        };
        let Some((block, i)) = found else {
            unavailable.push(*u);
            broken = true;
            continue;
        };
        match runs.last_mut() {
            Some((b, lo, n, ids)) if !broken && b.bid == block.bid && block.at(*lo, *n) == i => {
                *n += 1;
                ids.push(*u);
            }
            _ => runs.push((block, i, 1, vec![*u])),
        }
        broken = false;
    }
    let mut pos = 0;
    for (block, lo, n, ids) in &runs {
        if free_take(conn, block, false, *lo, *n)? {
            insert_held(
                conn,
                rid,
                block,
                &Extent {
                    pos,
                    bid: block.bid,
                    lo: *lo,
                    n: *n,
                },
            )?;
        } else {
            // Unit by unit (rare: a reservation that conflicts, or a run whose
            // units lie in two free runs): those not free are reported.
            for (t, u) in (0..).zip(ids) {
                let i = block.at(*lo, t);
                if free_take(conn, block, false, i, 1)? {
                    let e = Extent {
                        pos: pos + t,
                        bid: block.bid,
                        lo: i,
                        n: 1,
                    };
                    insert_held(conn, rid, block, &e)?;
                } else {
                    unavailable.push(*u);
                }
            }
        }
        pos += n;
    }
    if !unavailable.is_empty() {
        return Err(StoreError::UnitsUnavailable(unavailable));
    }
    let keys = a.keys.len();
    conn.prepare_cached("UPDATE requests SET taken=?2 WHERE rid=?1")?
        .execute(params![rid, vec![0u8; keys.div_ceil(8)]])?;
    Ok(AcceptOutcome::Accepted)
}

fn decode_ids(blob: Option<Vec<u8>>) -> Result<Vec<Uuid>, StoreError> {
    let blob = blob.unwrap_or_default();
    if !blob.len().is_multiple_of(16) {
        return Err(StoreError::Backend("corrupt voided list".into()));
    }
    blob.chunks_exact(16).map(uuid_of).collect()
}

fn taken_of(conn: &Connection, rid: i64) -> Result<Vec<u8>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT taken FROM requests WHERE rid=?1")?
        .query_row(params![rid], |r| r.get::<_, Option<Vec<u8>>>(0))?
        .unwrap_or_default())
}

fn bit(bits: &[u8], k: usize) -> bool {
    bits.get(k / 8).is_some_and(|b| b >> (k % 8) & 1 == 1)
}

fn void_op(
    conn: &Connection,
    peer: KmeId,
    request_id: Uuid,
    now_unix_ms: u64,
) -> Result<VoidOutcome, StoreError> {
    let row = match request_row(conn, &request_id)? {
        None => {
            insert_request(
                conn,
                &request_id,
                ROLE_SLAVE,
                peer.as_str(),
                REQ_VOIDED,
                ("", "", 0),
                now_unix_ms,
            )?;
            return Ok(VoidOutcome {
                was_accepted: false,
                voided_keys: Vec::new(),
            });
        }
        Some(row) if row.role == ROLE_SLAVE && row.peer == peer.as_str() => row,
        Some(_) => return Err(StoreError::RequestConflict),
    };
    match row.state {
        REQ_VOIDED => {
            // Idempotent: answer what the first void answered.
            let was_accepted = row.voided.is_some();
            Ok(VoidOutcome {
                was_accepted,
                voided_keys: decode_ids(row.voided)?,
            })
        }
        REQ_ACCEPTED | REQ_DELIVERED => {
            // Keys not delivered yet go back to the pool (delivered ones are gone).
            let per_key = u64::from(units_for_bits(row.size_bits).max(1));
            let extents = held_of(conn, row.rid)?;
            let taken = taken_of(conn, row.rid)?;
            let units: u64 = extents.iter().map(|e| e.n).sum();
            let mut blocks = Blocks::default();
            let mut ids = Vec::new();
            let mut back: Vec<(Block, u64, u64)> = Vec::new();
            for k in 0..units / per_key {
                if bit(&taken, k as usize) {
                    continue;
                }
                let units = units_at(&extents, &mut blocks, conn, k * per_key, (k + 1) * per_key)?;
                if let Some((b, i)) = units.first() {
                    ids.push(Blocks::uid(conn, b, *i)?);
                }
                for (b, i) in &units {
                    push_run(&mut back, b, *i);
                }
            }
            for (b, lo, n) in &back {
                free_insert(conn, b, false, *lo, *n)?;
            }
            conn.prepare_cached("DELETE FROM held WHERE rid=?1")?
                .execute(params![row.rid])?;
            let blob: Vec<u8> = ids
                .iter()
                .flat_map(|u| u.as_bytes().iter().copied())
                .collect();
            conn.prepare_cached("UPDATE requests SET state=?2, voided=?3 WHERE rid=?1")?
                .execute(params![row.rid, REQ_VOIDED, blob])?;
            Ok(VoidOutcome {
                was_accepted: true,
                voided_keys: ids,
            })
        }
        _ => Err(StoreError::RequestConflict),
    }
}

/// A request a take touches, loaded once per operation.
struct TakeRequest {
    rid: i64,
    role: i64,
    master: String,
    slave: String,
    size_bits: u32,
    peer: String,
    taken: Vec<u8>,
    extents: Vec<Extent>,
}

fn take_request(conn: &Connection, rid: i64) -> Result<TakeRequest, StoreError> {
    let (role, master, slave, size_bits, peer) = conn
        .prepare_cached("SELECT role, master, slave, size_bits, peer FROM requests WHERE rid=?1")?
        .query_row(params![rid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?
        .ok_or_else(|| corrupt("extent of a missing request"))?;
    Ok(TakeRequest {
        rid,
        role,
        master,
        slave,
        size_bits,
        peer,
        taken: taken_of(conn, rid)?,
        extents: held_of(conn, rid)?,
    })
}

/// The request holding unit `i` of `block`, and the unit's position in it.
fn holder(conn: &Connection, block: &Block, i: u64) -> Result<Option<(i64, u64)>, StoreError> {
    let hit: Option<(i64, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT rid, pos, lo, n FROM held WHERE bid=?1 AND side=?2 AND lo<=?3 ORDER BY lo DESC LIMIT 1",
        )?
        .query_row(
            params![block.bid, i64_of(i % block.stride)?, i64_of(i)?],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((rid, pos, lo, n)) = hit else {
        return Ok(None);
    };
    let (pos, lo, n) = (u64_of(pos)?, u64_of(lo)?, u64_of(n)?);
    let t = (i - lo) / block.stride;
    Ok((t < n).then_some((rid, pos + t)))
}

/// Delivers keys `keys` (indexes in the request, in this order) of a request
/// holding `extents`: reads their bytes and deletes their units, run by run
/// (consecutive keys make one run), and marks them in the `taken` bitmap.
fn deliver_keys(
    conn: &Db,
    blocks: &mut Blocks,
    extents: &[Extent],
    taken: &mut Vec<u8>,
    keys: &[u64],
    size_bits: u32,
) -> Result<Vec<DeliveredKey>, StoreError> {
    let per_key = u64::from(units_for_bits(size_bits).max(1));
    let mut runs: Vec<(Block, u64, u64)> = Vec::new();
    let mut key_ids = Vec::with_capacity(keys.len());
    for &k in keys {
        let units = units_at(extents, blocks, conn, k * per_key, (k + 1) * per_key)?;
        match units.first() {
            Some((b, i)) => key_ids.push(Blocks::uid(conn, b, *i)?),
            None => return Err(corrupt("empty key")),
        }
        for (b, i) in &units {
            push_run(&mut runs, b, *i);
        }
        let byte = (k / 8) as usize;
        if taken.len() <= byte {
            taken.resize(byte + 1, 0);
        }
        taken[byte] |= 1 << (k % 8);
    }
    let mut material = Zeroizing::new(Vec::with_capacity(
        keys.len() * per_key as usize * UNIT_BYTES,
    ));
    for (b, lo, n) in &runs {
        read_units(conn, b, *lo, *n, &mut material)?;
        consume(conn, b, *lo, *n)?;
    }
    let key_bytes = (size_bits / 8) as usize;
    Ok(key_ids
        .into_iter()
        .zip(material.chunks(per_key as usize * UNIT_BYTES))
        .map(|(key_id, m)| DeliveredKey {
            key_id,
            material: Zeroizing::new(m[..key_bytes.min(m.len())].to_vec()),
        })
        .collect())
}

fn take_op(
    conn: &Db,
    caller: SaeId,
    master: SaeId,
    key_ids: Vec<Uuid>,
) -> Result<Vec<DeliveredKey>, StoreError> {
    let mut blocks = Blocks::default();
    let mut reqs: Vec<TakeRequest> = Vec::new();
    // (request index, key index) per key ID.
    let mut spots: Vec<(usize, u64)> = Vec::with_capacity(key_ids.len());
    let mut not_found = false;
    let mut unauthorized = false;
    let mut seen = std::collections::HashSet::new();
    let mut locator = Locator::new(conn)?;
    for id in &key_ids {
        if !seen.insert(*id) {
            not_found = true;
            continue;
        }
        let Some((bid, i)) = locator.locate(conn, id)? else {
            not_found = true;
            continue;
        };
        let block = blocks.get(conn, bid)?;
        let Some((rid, pos)) = holder(conn, &block, i)? else {
            not_found = true;
            continue;
        };
        let r = match reqs.iter().position(|r| r.rid == rid) {
            Some(r) => r,
            None => {
                reqs.push(take_request(conn, rid)?);
                reqs.len() - 1
            }
        };
        let req = &reqs[r];
        let per_key = u64::from(units_for_bits(req.size_bits).max(1));
        if req.role == ROLE_MASTER {
            // A key this KME reserved as master: its slave is at the peer KME, so
            // nobody may take it here.
            unauthorized = true;
        } else if pos % per_key != 0 || bit(&req.taken, (pos / per_key) as usize) {
            // A unit inside a key (not a key ID), or a key delivered already.
            not_found = true;
        } else if req.master != master.as_str() || req.slave != caller.as_str() {
            unauthorized = true;
        } else {
            spots.push((r, pos / per_key));
        }
    }
    if unauthorized {
        return Err(StoreError::NotAuthorized);
    }
    if not_found {
        return Err(StoreError::KeysNotFound);
    }
    // Request by request (their keys batched), then back into the asked order.
    let mut out: Vec<Option<DeliveredKey>> = (0..spots.len()).map(|_| None).collect();
    let mut freed: Vec<(String, i64)> = Vec::new();
    for (r, req) in reqs.iter_mut().enumerate() {
        let (slots, keys): (Vec<usize>, Vec<u64>) = spots
            .iter()
            .enumerate()
            .filter(|(_, (rr, _))| *rr == r)
            .map(|(slot, (_, k))| (slot, *k))
            .unzip();
        if keys.is_empty() {
            continue;
        }
        let got = deliver_keys(
            conn,
            &mut blocks,
            &req.extents,
            &mut req.taken,
            &keys,
            req.size_bits,
        )?;
        for (slot, key) in slots.into_iter().zip(got) {
            out[slot] = Some(key);
        }
        let n = i64_of(keys.len() as u64 * u64::from(units_for_bits(req.size_bits).max(1)))?;
        match freed.iter_mut().find(|(p, _)| *p == req.peer) {
            Some((_, c)) => *c += n,
            None => freed.push((req.peer.clone(), n)),
        }
    }
    let out: Vec<DeliveredKey> = out.into_iter().flatten().collect();
    if out.len() != key_ids.len() {
        return Err(corrupt("key delivered without its request"));
    }
    for (peer, n) in freed {
        bump(conn, &peer, -n, 0)?;
    }
    // A slave-side request whose keys are all delivered is finished (and prunable).
    for req in &reqs {
        if req.role == ROLE_MASTER {
            continue;
        }
        let per_key = u64::from(units_for_bits(req.size_bits).max(1));
        let keys = req.extents.iter().map(|e| e.n).sum::<u64>() / per_key;
        let done = (0..keys as usize).all(|k| bit(&req.taken, k));
        conn.prepare_cached("UPDATE requests SET taken=?2, state=?3 WHERE rid=?1")?
            .execute(params![
                req.rid,
                &req.taken[..],
                if done { REQ_DELIVERED } else { REQ_ACCEPTED }
            ])?;
    }
    Ok(out)
}

fn stock_op(conn: &Connection, request_id: Uuid) -> Result<(), StoreError> {
    let req = master_pending(conn, &request_id)?;
    let per_key = u64::from(units_for_bits(req.size_bits).max(1));
    let keys = held_of(conn, req.rid)?.iter().map(|e| e.n).sum::<u64>() / per_key;
    conn.prepare_cached("UPDATE requests SET state=?2, taken=?3 WHERE rid=?1")?
        .execute(params![
            req.rid,
            REQ_STOCKED,
            vec![0u8; (keys as usize).div_ceil(8)]
        ])?;
    Ok(())
}

/// A stocked request, as the stock operations see it.
struct Stocked {
    rid: i64,
    extents: Vec<Extent>,
    /// Bitmap of the keys delivered so far.
    taken: Vec<u8>,
    keys: u64,
    peer: String,
}

impl Stocked {
    /// Keys delivered so far.
    fn used(&self) -> u64 {
        (0..self.keys as usize)
            .filter(|k| bit(&self.taken, *k))
            .count() as u64
    }
}

/// Stocked requests of (master, slave, size), oldest first.
fn stocked(
    conn: &Connection,
    master: &SaeId,
    slave: &SaeId,
    size_bits: u32,
) -> Result<Vec<Stocked>, StoreError> {
    let rows: Vec<(i64, Option<Vec<u8>>, String)> = conn
        .prepare_cached(
            // `state = 4` (REQ_STOCKED) written out, so that the partial index
            // `requests_stock` applies.
            "SELECT rid, taken, peer FROM requests WHERE master=?2 AND slave=?3 AND size_bits=?4
                 AND state = 4 AND role=?1 ORDER BY rid",
        )?
        .query_map(
            params![ROLE_MASTER, master.as_str(), slave.as_str(), size_bits],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
        .collect::<Result<_, _>>()?;
    let per_key = u64::from(units_for_bits(size_bits).max(1));
    rows.into_iter()
        .map(|(rid, taken, peer)| {
            let extents = held_of(conn, rid)?;
            let keys = extents.iter().map(|e| e.n).sum::<u64>() / per_key;
            Ok(Stocked {
                rid,
                extents,
                taken: taken.unwrap_or_default(),
                keys,
                peer,
            })
        })
        .collect()
}

/// Keys not delivered yet of `stocked` requests.
fn untaken(stocked: &[Stocked]) -> u64 {
    stocked.iter().map(|s| s.keys - s.used()).sum()
}

fn stock_count_op(
    conn: &Connection,
    master: &SaeId,
    slave: &SaeId,
    size_bits: u32,
) -> Result<u64, StoreError> {
    Ok(untaken(&stocked(conn, master, slave, size_bits)?))
}

fn take_stock_op(
    conn: &Db,
    master: &SaeId,
    slave: &SaeId,
    size_bits: u32,
    number: u32,
    now_unix_ms: u64,
) -> Result<(Option<Vec<DeliveredKey>>, u64), StoreError> {
    let per_key = u64::from(units_for_bits(size_bits).max(1));
    let mut reqs = stocked(conn, master, slave, size_bits)?;
    let have = untaken(&reqs);
    if have < u64::from(number) || number == 0 {
        return Ok((None, have));
    }
    let before: Vec<u64> = reqs.iter().map(Stocked::used).collect();
    // Oldest keys first.
    let mut blocks = Blocks::default();
    let mut out = Vec::with_capacity(number as usize);
    for req in &mut reqs {
        let want = number as usize - out.len();
        let keys: Vec<u64> = (0..req.keys)
            .filter(|k| !bit(&req.taken, *k as usize))
            .take(want)
            .collect();
        if keys.is_empty() {
            continue;
        }
        out.extend(deliver_keys(
            conn,
            &mut blocks,
            &req.extents,
            &mut req.taken,
            &keys,
            size_bits,
        )?);
    }
    let mut freed: Vec<(String, i64)> = Vec::new();
    for (req, before) in reqs.iter().zip(before) {
        let used = req.used();
        if used == before {
            continue;
        }
        if used == req.keys {
            // Retention counts from the last delivery, not from the stocking.
            conn.prepare_cached(
                "UPDATE requests SET taken=?2, state=?3, created_ms=?4 WHERE rid=?1",
            )?
            .execute(params![
                req.rid,
                &req.taken[..],
                REQ_DELIVERED,
                i64_of(now_unix_ms)?
            ])?;
        } else {
            conn.prepare_cached("UPDATE requests SET taken=?2 WHERE rid=?1")?
                .execute(params![req.rid, &req.taken[..]])?;
        }
        let n = i64_of((used - before) * per_key)?;
        match freed.iter_mut().find(|(p, _)| *p == req.peer) {
            Some((_, c)) => *c += n,
            None => freed.push((req.peer.clone(), n)),
        }
    }
    for (peer, n) in freed {
        bump(conn, &peer, -n, 0)?;
    }
    Ok((Some(out), have - u64::from(number)))
}

impl KeyStore for SqliteStore {
    fn ingest(&self, batch: IngestBatch) -> StoreFuture<'_, u64> {
        self.submit(move |c| ingest_op(c, batch))
    }

    fn pool_counts(&self, peer: KmeId) -> StoreFuture<'_, PoolCounts> {
        self.submit(move |c| counts_op(c, &peer))
    }

    fn reserve(&self, r: Reservation) -> StoreFuture<'_, Vec<ReservedKey>> {
        self.submit(move |c| reserve_op(c, r))
    }

    fn confirm(&self, request_id: Uuid) -> StoreFuture<'_, ()> {
        self.submit(move |c| confirm_op(c, request_id))
    }

    fn release(&self, request_id: Uuid, discard: Vec<Uuid>) -> StoreFuture<'_, ()> {
        self.submit(move |c| release_op(c, request_id, discard))
    }

    fn pending(&self) -> StoreFuture<'_, Vec<PendingRequest>> {
        self.submit(|c| pending_op(c))
    }

    fn accept(&self, a: Acceptance) -> StoreFuture<'_, AcceptOutcome> {
        self.submit(move |c| accept_op(c, a))
    }

    fn accept_take(&self, a: Acceptance) -> StoreFuture<'_, Vec<DeliveredKey>> {
        self.submit(move |c| {
            let (slave, master) = (a.slave.clone(), a.master.clone());
            let ids = a.keys.iter().map(|k| k.key_id).collect();
            accept_op(c, a)?;
            take_op(c, slave, master, ids)
        })
    }

    fn void(
        &self,
        peer: KmeId,
        request_id: Uuid,
        now_unix_ms: u64,
    ) -> StoreFuture<'_, VoidOutcome> {
        self.submit(move |c| void_op(c, peer, request_id, now_unix_ms))
    }

    fn take(
        &self,
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<Uuid>,
    ) -> StoreFuture<'_, Vec<DeliveredKey>> {
        self.submit(move |c| take_op(c, caller, master, key_ids))
    }

    fn keeps_stock(&self) -> bool {
        true
    }

    fn keeps_replies(&self) -> bool {
        true
    }

    fn answer(&self, request_ids: Vec<Uuid>) -> StoreFuture<'_, ()> {
        self.submit(move |c| answer_op(c, &request_ids))
    }

    fn replay(&self, r: ReplayRequest) -> StoreFuture<'_, Replay> {
        self.submit(move |c| replay_op(c, r))
    }

    fn stock(&self, request_id: Uuid) -> StoreFuture<'_, ()> {
        self.submit(move |c| stock_op(c, request_id))
    }

    fn take_stock(
        &self,
        master: SaeId,
        slave: SaeId,
        size_bits: u32,
        number: u32,
        now_unix_ms: u64,
    ) -> StoreFuture<'_, (Option<Vec<DeliveredKey>>, u64)> {
        self.submit(move |c| take_stock_op(c, &master, &slave, size_bits, number, now_unix_ms))
    }

    fn stock_count(&self, master: SaeId, slave: SaeId, size_bits: u32) -> StoreFuture<'_, u64> {
        self.submit(move |c| stock_count_op(c, &master, &slave, size_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkeys::seeded_block;

    fn kme(s: &str) -> KmeId {
        KmeId::new(s).expect("invariant: valid test ID")
    }

    fn sae(s: &str) -> SaeId {
        SaeId::new(s).expect("invariant: valid test ID")
    }

    fn fresh() -> Db {
        let c = Db {
            conn: Connection::open_in_memory().expect("in-memory SQLite"),
            cipher: None,
        };
        c.execute_batch(SCHEMA).expect("schema");
        let block = seeded_block(1, "ab", kme("kme-b"), 0, 4096);
        let units = block.cut(&kme("kme-a")).expect("valid block");
        ingest_op(
            &c,
            IngestBatch {
                peer: kme("kme-b"),
                link_id: block.link_id.clone(),
                block_number: 0,
                eps_sec: 0.0,
                eps_cor: 0.0,
                created_unix_ms: 0,
                units,
                capacity_units: 1 << 20,
            },
        )
        .expect("ingest");
        c
    }

    fn reserve(c: &Db, id: Uuid) -> Vec<ReservedKey> {
        reserve_under(c, id, id)
    }

    /// Reserves two 256-bit keys for alice → bob under request `id` and replay `key`.
    fn reserve_under(c: &Db, id: Uuid, key: Uuid) -> Vec<ReservedKey> {
        reserve_op(
            c,
            Reservation {
                request_id: id,
                peer: kme("kme-b"),
                master: sae("alice"),
                slave: sae("bob"),
                number: 2,
                size_bits: 256,
                now_unix_ms: crate::clock::now_ms(),
                void_route: None,
                replay_key: Some(key),
            },
        )
        .expect("reserve")
    }

    fn rows(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    fn replay(c: &Db, id: Uuid, number: u32, size_bits: u32, now: u64) -> Replay {
        replay_op(
            c,
            ReplayRequest {
                replay_key: id,
                master: sae("alice"),
                slave: sae("bob"),
                size_bits,
                number,
                now_unix_ms: now,
            },
        )
        .expect("replay")
    }

    #[test]
    fn an_answered_request_replays_its_keys_once_within_the_window() {
        let c = fresh();
        let now = crate::clock::now_ms();
        let (id, pending, unknown) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let before = counts_op(&c, &kme("kme-b")).expect("counts");
        let keys = reserve(&c, id);
        assert!(matches!(replay(&c, id, 2, 256, now), Replay::InProgress));
        answer_op(&c, &[id]).expect("answer");
        assert!(matches!(replay(&c, unknown, 2, 256, now), Replay::Unknown));
        assert!(matches!(replay(&c, id, 3, 256, now), Replay::Mismatch));
        assert!(matches!(replay(&c, id, 1, 512, now), Replay::Mismatch));
        let Replay::Keys(mut shares) = replay(&c, id, 2, 256, now) else {
            panic!("the answered keys");
        };
        let again = shares.pop().expect("one share");
        assert!(shares.is_empty());
        assert_eq!(again.len(), 2);
        for (a, k) in again.iter().zip(&keys) {
            assert_eq!(a.key_id, k.layout.key_id);
            assert_eq!(a.material[..], k.material[..]);
        }
        assert!(matches!(replay(&c, id, 2, 256, now), Replay::Spent));
        // The replayed units are gone from the pool's total, like confirmed ones.
        let after = counts_op(&c, &kme("kme-b")).expect("counts");
        assert_eq!(after.total_units, before.total_units - 2);
        assert_eq!(after.mine_available, before.mine_available - 2);
        // Past the window: the kept keys are deleted (on replay or by pruning).
        let late = reserve(&c, pending);
        drop(late);
        answer_op(&c, &[pending]).expect("answer");
        assert!(matches!(
            replay(&c, pending, 2, 256, now + REPLAY_WINDOW_MS + 60_000),
            Replay::Spent
        ));
        let expired = Uuid::now_v7();
        reserve(&c, expired);
        answer_op(&c, &[expired]).expect("answer");
        prune_op(&c, now + REPLAY_WINDOW_MS + 60_000).expect("prune");
        assert!(matches!(replay(&c, expired, 2, 256, now), Replay::Spent));
        let end = counts_op(&c, &kme("kme-b")).expect("counts");
        assert_eq!(end.total_units, before.total_units - 6);
        // A second reservation under an existing request ID is a conflict.
        assert!(matches!(
            reserve_op(
                &c,
                Reservation {
                    request_id: id,
                    peer: kme("kme-b"),
                    master: sae("alice"),
                    slave: sae("bob"),
                    number: 1,
                    size_bits: 256,
                    now_unix_ms: now,
                    void_route: None,
                    replay_key: None,
                },
            ),
            Err(StoreError::RequestConflict)
        ));
    }

    #[test]
    fn prune_forgets_only_finished_requests_past_retention() {
        let c = fresh();
        let (done, pending, tomb) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let keys = reserve(&c, done);
        confirm_op(&c, done).expect("confirm");
        reserve(&c, pending);
        void_op(&c, kme("kme-b"), tomb, crate::clock::now_ms()).expect("tombstone");
        let counts = counts_op(&c, &kme("kme-b")).expect("counts");
        // Within retention nothing goes, and the master still knows whose key it was.
        prune_op(&c, crate::clock::now_ms()).expect("prune");
        assert_eq!(rows(&c, "SELECT count(*) FROM requests"), 3);
        assert!(matches!(
            take_op(&c, sae("bob"), sae("alice"), vec![keys[0].layout.key_id]),
            Err(StoreError::NotAuthorized)
        ));
        prune_op(&c, crate::clock::now_ms() + RETENTION_MS + 60_000).expect("prune");
        assert_eq!(
            rows(&c, "SELECT count(*) FROM requests"),
            1,
            "pending stays"
        );
        assert!(request_row(&c, &pending).expect("row").is_some());
        assert_eq!(
            rows(&c, "SELECT count(*) FROM held"),
            1,
            "the delivered keys' records are gone, the pending request's stay"
        );
        assert_eq!(counts_op(&c, &kme("kme-b")).expect("counts"), counts);
        assert!(matches!(
            take_op(&c, sae("bob"), sae("alice"), vec![keys[0].layout.key_id]),
            Err(StoreError::KeysNotFound)
        ));
    }

    #[test]
    fn a_store_of_the_old_schema_is_refused_with_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("qkdnet-sqlite-schema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("old.sqlite");
        {
            let c = Connection::open(&path).expect("create");
            c.execute_batch("CREATE TABLE keys(key_id BLOB PRIMARY KEY);")
                .expect("old table");
        }
        let Err(e) = SqliteStore::open(&path) else {
            panic!("an old store opened")
        };
        assert!(e.to_string().contains("schema 0"), "{e}");
        // A new store reopens fine.
        let path = dir.join("new.sqlite");
        drop(SqliteStore::open(&path).expect("create"));
        drop(SqliteStore::open(&path).expect("reopen"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
