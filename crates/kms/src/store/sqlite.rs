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
//! Each operation is a handful of statements whatever the number of keys: a
//! reservation marks its units with one `UPDATE … RETURNING`, a confirmation
//! clears their material with one `UPDATE`, and a unit carries the row ID of the
//! request that holds it (`req`, `pos`) instead of a per-key row, so a key
//! touches a few B-tree pages near the ends of the indexes rather than several
//! random ones (see BENCHMARKS.md, KME, for what each change measured).
//!
//! Pool counts (for status and the capacity check) are counters in a `pools` table
//! updated by each operation, not `count(*)` scans, and are recomputed from the
//! units at every open. Key material read from SQLite is copied straight into
//! zeroizing buffers.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{
    AcceptOutcome, Acceptance, DeliveredKey, IngestBatch, KeyLayout, KeyStore, PendingRequest,
    PoolCounts, Reservation, ReservedKey, StoreError, StoreFuture, VoidOutcome,
};
use crate::block::{UNIT_BYTES, units_for_bits};
use crate::ids::{KmeId, SaeId};
use crate::service::now_ms;

const ROLE_MASTER: i64 = 0;
const ROLE_SLAVE: i64 = 1;
const REQ_PENDING: i64 = 0;
const REQ_ACCEPTED: i64 = 1;
const REQ_VOIDED: i64 = 2;
const REQ_DELIVERED: i64 = 3;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

/// How long finished requests (and the master's record of keys it delivered) are
/// kept: retries and voids of a request older than this are no longer recognised.
const RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Most finished requests pruned per ingested block (bounds the extra work).
const PRUNE_LIMIT: i64 = 4096;

/// Units are rows keyed by ingest order; a unit's `req`/`pos` say which request
/// holds it and where (a key of `k` units is `k` consecutive units in `pos` order,
/// starting at a `pos` that is a multiple of `k`). A master-side unit whose key was
/// delivered keeps its row without material (`material IS NULL`) until the request
/// is pruned, so that a later dec_keys for it at this KME is answered "not
/// authorised" instead of "not found". Unit IDs of one link sort by (block, index)
/// ([`crate::block::unit_id`]) and request row IDs grow, so every index below is
/// written near its end.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blocks(
    link_id TEXT NOT NULL, block_number INTEGER NOT NULL, peer TEXT NOT NULL,
    units INTEGER NOT NULL, eps_sec REAL NOT NULL, eps_cor REAL NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY(link_id, block_number));
CREATE TABLE IF NOT EXISTS units(
    seq INTEGER PRIMARY KEY, uid BLOB NOT NULL UNIQUE, peer TEXT NOT NULL, mine INTEGER NOT NULL,
    material BLOB, req INTEGER, pos INTEGER);
CREATE INDEX IF NOT EXISTS units_avail ON units(peer, mine, seq) WHERE req IS NULL;
CREATE INDEX IF NOT EXISTS units_req ON units(req, pos) WHERE req IS NOT NULL;
CREATE TABLE IF NOT EXISTS requests(
    rid INTEGER PRIMARY KEY, request_id BLOB NOT NULL UNIQUE, role INTEGER NOT NULL,
    peer TEXT NOT NULL, state INTEGER NOT NULL, master TEXT NOT NULL DEFAULT '',
    slave TEXT NOT NULL DEFAULT '', size_bits INTEGER NOT NULL DEFAULT 0, voided BLOB,
    created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state, created_ms);
CREATE TABLE IF NOT EXISTS pools(
    peer TEXT PRIMARY KEY, total INTEGER NOT NULL, mine_available INTEGER NOT NULL);
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

trait Job: Send {
    /// Runs the operation inside the open transaction; `true` if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the result once the batch is committed (or failed).
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

struct OpJob<T, F> {
    op: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send, F: FnOnce(&Connection) -> Result<T, StoreError> + Send> Job for OpJob<T, F> {
    fn run(&mut self, conn: &Connection) -> bool {
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
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with `synchronous=FULL`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens the store with the given durability.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        if version != SCHEMA_VERSION && !(version == 0 && tables == 0) {
            return Err(StoreError::Backend(format!(
                "{} has key-store schema {version}, this qkdnet uses {SCHEMA_VERSION}; \
                 a store of an older qkdnet cannot be opened (its key IDs differ too): \
                 move it away and let the link refill a new one",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // Pool counters are maintained by every operation; recomputing them at open
        // makes them self-healing (one scan per start-up).
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM pools;
             INSERT INTO pools(peer, total, mine_available)
                 SELECT peer, count(*), coalesce(sum(mine = 1 AND req IS NULL), 0)
                 FROM units WHERE material IS NOT NULL GROUP BY peer;
             COMMIT;",
        )?;
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("kms-sqlite".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| StoreError::Backend(format!("spawn writer thread: {e}")))?;
        Ok(Self { tx })
    }

    fn submit<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
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

fn writer(conn: Connection, rx: mpsc::Receiver<Box<dyn Job>>) {
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

fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let body = (|| -> Result<(), StoreError> {
        for job in batch.iter_mut() {
            conn.execute_batch("SAVEPOINT op")?;
            if job.run(conn) {
                conn.execute_batch("RELEASE op")?;
            } else {
                conn.execute_batch("ROLLBACK TO op; RELEASE op")?;
            }
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    })();
    if body.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    body
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

fn uuid_of(b: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(b).map_err(|_| StoreError::Backend("corrupt UUID in store".into()))
}

fn ingest_op(conn: &Connection, b: IngestBatch) -> Result<u64, StoreError> {
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
    conn.prepare_cached(
        "INSERT INTO blocks(link_id, block_number, peer, units, eps_sec, eps_cor, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7)",
    )?
    .execute(params![
        b.link_id,
        i64_of(b.block_number)?,
        b.peer.as_str(),
        i64_of(n)?,
        b.eps_sec,
        b.eps_cor,
        i64_of(b.created_unix_ms)?
    ])?;
    let mut ins =
        conn.prepare_cached("INSERT INTO units(uid, peer, mine, material) VALUES (?1,?2,?3,?4)")?;
    for u in &b.units {
        ins.execute(params![
            &u.id.as_bytes()[..],
            b.peer.as_str(),
            u.mine,
            &u.material[..]
        ])
        .map_err(|e| match e {
            // A unit ID collision means the same block content under another number.
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::DuplicateBlock
            }
            e => e.into(),
        })?;
    }
    let mine = b.units.iter().filter(|u| u.mine).count() as i64;
    bump(conn, b.peer.as_str(), i64_of(n)?, mine)?;
    prune_op(conn, now_ms())?;
    Ok(n)
}

/// Forgets finished requests older than [`RETENTION_MS`] (and the master's
/// material-less records of their keys), at most [`PRUNE_LIMIT`] per call.
fn prune_op(conn: &Connection, now: u64) -> Result<(), StoreError> {
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
    let mut del_units = conn.prepare_cached("DELETE FROM units WHERE req=?1")?;
    let mut del_req = conn.prepare_cached("DELETE FROM requests WHERE rid=?1")?;
    for rid in old {
        del_units.execute(params![rid])?;
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
        i64_of(now_ms())?
    ])?;
    Ok(conn.last_insert_rowid())
}

fn set_state(conn: &Connection, rid: i64, state: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE requests SET state=?2 WHERE rid=?1")?
        .execute(params![rid, state])?;
    Ok(())
}

fn blob<'a>(row: &'a rusqlite::Row<'_>, i: usize) -> Result<&'a [u8], StoreError> {
    Ok(row.get_ref(i)?.as_blob().map_err(rusqlite::Error::from)?)
}

fn reserve_op(conn: &Connection, r: Reservation) -> Result<Vec<ReservedKey>, StoreError> {
    if request_row(conn, &r.request_id)?.is_some() {
        return Err(StoreError::RequestConflict);
    }
    let per_key = units_for_bits(r.size_bits) as usize;
    let key_bytes = (r.size_bits / 8) as usize;
    let need = per_key * r.number as usize;
    if need == 0 {
        return Err(StoreError::InvalidLayout("empty reservation"));
    }
    let rid = insert_request(
        conn,
        &r.request_id,
        ROLE_MASTER,
        r.peer.as_str(),
        REQ_PENDING,
        (r.master.as_str(), r.slave.as_str(), r.size_bits),
    )?;
    // One statement marks the oldest `need` available units and returns them; a
    // key's units are consecutive in `pos` (= ingest order).
    let mut picked: Vec<(i64, Uuid, Zeroizing<[u8; UNIT_BYTES]>)> = Vec::with_capacity(need);
    {
        let mut upd = conn.prepare_cached(
            "UPDATE units SET req=?1, pos=seq WHERE seq IN
                (SELECT seq FROM units WHERE peer=?2 AND mine=1 AND req IS NULL ORDER BY seq LIMIT ?3)
             RETURNING seq, uid, material",
        )?;
        let mut rows = upd.query(params![rid, r.peer.as_str(), i64_of(need as u64)?])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let uid = uuid_of(blob(row, 1)?)?;
            let m = blob(row, 2)?;
            if m.len() != UNIT_BYTES {
                return Err(StoreError::Backend("corrupt unit in store".into()));
            }
            let mut material = Zeroizing::new([0u8; UNIT_BYTES]);
            material.copy_from_slice(m);
            picked.push((seq, uid, material));
        }
    }
    if picked.len() < need {
        // Returning the error rolls the savepoint back, marks included.
        let available = counts_op(conn, &r.peer)?.mine_available;
        return Err(StoreError::Exhausted {
            available,
            requested: need as u64,
        });
    }
    picked.sort_unstable_by_key(|p| p.0);
    let out = picked
        .chunks(per_key)
        .map(|chunk| {
            let mut material = Zeroizing::new(Vec::with_capacity(per_key * UNIT_BYTES));
            for (_, _, m) in chunk {
                material.extend_from_slice(&m[..]);
            }
            material.truncate(key_bytes);
            ReservedKey {
                layout: KeyLayout {
                    key_id: chunk[0].1,
                    size_bits: r.size_bits,
                    unit_ids: chunk.iter().map(|c| c.1).collect(),
                },
                material,
            }
        })
        .collect();
    bump(conn, r.peer.as_str(), 0, -i64_of(need as u64)?)?;
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
    // The unit rows stay, without material, as a record of which SAE pair the keys
    // went to: a later dec_keys for one at this (the master's) KME is then
    // answered 401 rather than "not found". Pruned with the request.
    let n = conn
        .prepare_cached("UPDATE units SET material=NULL WHERE req=?1")?
        .execute(params![req.rid])?;
    bump(conn, &req.peer, -(n as i64), 0)?;
    set_state(conn, req.rid, REQ_DELIVERED)
}

fn release_op(conn: &Connection, request_id: Uuid, discard: Vec<Uuid>) -> Result<(), StoreError> {
    let req = master_pending(conn, &request_id)?;
    let mut del = conn.prepare_cached("DELETE FROM units WHERE uid=?1 AND req=?2")?;
    let mut discarded = 0;
    for u in &discard {
        discarded += del.execute(params![&u.as_bytes()[..], req.rid])?;
    }
    let returned = conn
        .prepare_cached("UPDATE units SET req=NULL, pos=NULL WHERE req=?1")?
        .execute(params![req.rid])?;
    bump(conn, &req.peer, -(discarded as i64), returned as i64)?;
    set_state(conn, req.rid, REQ_VOIDED)
}

/// The unit IDs a request holds, in key order.
fn units_of(conn: &Connection, rid: i64) -> Result<Vec<(i64, Uuid)>, StoreError> {
    let mut sel = conn.prepare_cached("SELECT pos, uid FROM units WHERE req=?1 ORDER BY pos")?;
    let mut rows = sel.query(params![rid])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push((row.get(0)?, uuid_of(blob(row, 1)?)?));
    }
    Ok(out)
}

fn pending_op(conn: &Connection) -> Result<Vec<PendingRequest>, StoreError> {
    let mut reqs = Vec::new();
    {
        let mut sel = conn.prepare_cached(
            "SELECT rid, request_id, peer, size_bits FROM requests WHERE state=?2 AND role=?1",
        )?;
        let mut rows = sel.query(params![ROLE_MASTER, REQ_PENDING])?;
        while let Some(row) = rows.next()? {
            let rid: i64 = row.get(0)?;
            let id = uuid_of(blob(row, 1)?)?;
            let peer: String = row.get(2)?;
            let peer = KmeId::new(&peer)
                .map_err(|_| StoreError::Backend("corrupt peer ID in store".into()))?;
            reqs.push((rid, id, peer, row.get::<_, u32>(3)?));
        }
    }
    reqs.into_iter()
        .map(|(rid, request_id, peer, size_bits)| {
            let per_key = (units_for_bits(size_bits) as usize).max(1);
            let units = units_of(conn, rid)?;
            let keys = units
                .chunks(per_key)
                .map(|c| KeyLayout {
                    key_id: c[0].1,
                    size_bits,
                    unit_ids: c.iter().map(|u| u.1).collect(),
                })
                .collect();
            Ok(PendingRequest {
                request_id,
                peer,
                keys,
            })
        })
        .collect()
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
    )?;
    // Only the peer's own units (mine = 0 here), still available; a unit that does
    // not match changes nothing and is reported (the savepoint then rolls back).
    let mut upd = conn.prepare_cached(
        "UPDATE units SET req=?1, pos=?2 WHERE uid=?3 AND peer=?4 AND mine=0 AND req IS NULL",
    )?;
    let mut unavailable = Vec::new();
    let mut pos: i64 = 0;
    for k in &a.keys {
        for u in &k.unit_ids {
            if upd.execute(params![rid, pos, &u.as_bytes()[..], a.peer.as_str()])? == 0 {
                unavailable.push(*u);
            }
            pos += 1;
        }
    }
    if !unavailable.is_empty() {
        return Err(StoreError::UnitsUnavailable(unavailable));
    }
    Ok(AcceptOutcome::Accepted)
}

fn decode_ids(blob: Option<Vec<u8>>) -> Result<Vec<Uuid>, StoreError> {
    let blob = blob.unwrap_or_default();
    if !blob.len().is_multiple_of(16) {
        return Err(StoreError::Backend("corrupt voided list".into()));
    }
    blob.chunks_exact(16).map(uuid_of).collect()
}

fn void_op(conn: &Connection, peer: KmeId, request_id: Uuid) -> Result<VoidOutcome, StoreError> {
    let row = match request_row(conn, &request_id)? {
        None => {
            insert_request(
                conn,
                &request_id,
                ROLE_SLAVE,
                peer.as_str(),
                REQ_VOIDED,
                ("", "", 0),
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
            let per_key = i64::from(units_for_bits(row.size_bits).max(1));
            // Keys still here are those not yet delivered (take removes whole keys).
            let ids: Vec<Uuid> = units_of(conn, row.rid)?
                .into_iter()
                .filter(|(pos, _)| pos % per_key == 0)
                .map(|(_, u)| u)
                .collect();
            conn.prepare_cached("UPDATE units SET req=NULL, pos=NULL WHERE req=?1")?
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

/// Where a key to take lives: its request row, first position, unit count, size
/// and peer.
struct KeySpot {
    rid: i64,
    pos: i64,
    per_key: i64,
    size_bits: u32,
    peer: String,
}

fn take_op(
    conn: &Connection,
    caller: SaeId,
    master: SaeId,
    key_ids: Vec<Uuid>,
) -> Result<Vec<DeliveredKey>, StoreError> {
    let mut spots = Vec::with_capacity(key_ids.len());
    let mut not_found = false;
    let mut unauthorized = false;
    {
        let mut sel = conn.prepare_cached(
            "SELECT u.req, u.pos, r.role, r.master, r.slave, r.size_bits, r.peer
             FROM units u JOIN requests r ON r.rid = u.req WHERE u.uid=?1",
        )?;
        let mut seen = std::collections::HashSet::new();
        for id in &key_ids {
            if !seen.insert(*id) {
                not_found = true;
                continue;
            }
            let row: Option<(i64, i64, i64, String, String, u32, String)> = sel
                .query_row(params![&id.as_bytes()[..]], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .optional()?;
            match row {
                None => not_found = true,
                // A key this KME reserved as master: its slave is at the peer KME, so
                // nobody may take it here.
                Some((_, _, ROLE_MASTER, ..)) => unauthorized = true,
                Some((rid, pos, _, m, s, size_bits, peer)) => {
                    let per_key = i64::from(units_for_bits(size_bits).max(1));
                    if pos % per_key != 0 {
                        // A unit inside a key, not a key ID.
                        not_found = true;
                    } else if m != master.as_str() || s != caller.as_str() {
                        unauthorized = true;
                    } else {
                        spots.push(KeySpot {
                            rid,
                            pos,
                            per_key,
                            size_bits,
                            peer,
                        });
                    }
                }
            }
        }
    }
    if unauthorized {
        return Err(StoreError::NotAuthorized);
    }
    if not_found {
        return Err(StoreError::KeysNotFound);
    }
    let mut out = Vec::with_capacity(key_ids.len());
    let mut units = conn.prepare_cached(
        "SELECT material FROM units WHERE req=?1 AND pos>=?2 AND pos<?3 ORDER BY pos",
    )?;
    let mut del = conn.prepare_cached("DELETE FROM units WHERE req=?1 AND pos>=?2 AND pos<?3")?;
    let mut freed: Vec<(String, i64)> = Vec::new();
    let mut requests: Vec<i64> = Vec::new();
    for (id, k) in key_ids.iter().zip(spots) {
        let range = params![k.rid, k.pos, k.pos + k.per_key];
        let mut material = Zeroizing::new(Vec::with_capacity(k.per_key as usize * UNIT_BYTES));
        {
            let mut rows = units.query(range)?;
            while let Some(row) = rows.next()? {
                material.extend_from_slice(blob(row, 0)?);
            }
        }
        if material.len() < (k.size_bits / 8) as usize {
            return Err(StoreError::Backend("key units missing in store".into()));
        }
        material.truncate((k.size_bits / 8) as usize);
        let n = del.execute(range)? as i64;
        match freed.iter_mut().find(|(p, _)| *p == k.peer) {
            Some((_, c)) => *c += n,
            None => freed.push((k.peer, n)),
        }
        if !requests.contains(&k.rid) {
            requests.push(k.rid);
        }
        out.push(DeliveredKey {
            key_id: *id,
            material,
        });
    }
    for (peer, n) in freed {
        bump(conn, &peer, -n, 0)?;
    }
    // A slave-side request whose keys are all delivered is finished (and prunable).
    let mut left = conn.prepare_cached("SELECT 1 FROM units WHERE req=?1 LIMIT 1")?;
    for rid in requests {
        if left
            .query_row(params![rid], |_| Ok(()))
            .optional()?
            .is_none()
        {
            set_state(conn, rid, REQ_DELIVERED)?;
        }
    }
    Ok(out)
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
        self.submit(pending_op)
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

    fn void(&self, peer: KmeId, request_id: Uuid) -> StoreFuture<'_, VoidOutcome> {
        self.submit(move |c| void_op(c, peer, request_id))
    }

    fn take(
        &self,
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<Uuid>,
    ) -> StoreFuture<'_, Vec<DeliveredKey>> {
        self.submit(move |c| take_op(c, caller, master, key_ids))
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

    fn fresh() -> Connection {
        let c = Connection::open_in_memory().expect("in-memory SQLite");
        c.execute_batch(SCHEMA).expect("schema");
        let units = seeded_block(1, "ab", kme("kme-b"), 0, 4096)
            .cut(&kme("kme-a"))
            .expect("valid block");
        ingest_op(
            &c,
            IngestBatch {
                peer: kme("kme-b"),
                link_id: "ab".into(),
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

    fn reserve(c: &Connection, id: Uuid) -> Vec<ReservedKey> {
        reserve_op(
            c,
            Reservation {
                request_id: id,
                peer: kme("kme-b"),
                master: sae("alice"),
                slave: sae("bob"),
                number: 2,
                size_bits: 256,
                now_unix_ms: 0,
            },
        )
        .expect("reserve")
    }

    fn rows(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    #[test]
    fn prune_forgets_only_finished_requests_past_retention() {
        let c = fresh();
        let (done, pending, tomb) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let keys = reserve(&c, done);
        confirm_op(&c, done).expect("confirm");
        reserve(&c, pending);
        void_op(&c, kme("kme-b"), tomb).expect("tombstone");
        let counts = counts_op(&c, &kme("kme-b")).expect("counts");
        // Within retention nothing goes, and the master still knows whose key it was.
        prune_op(&c, now_ms()).expect("prune");
        assert_eq!(rows(&c, "SELECT count(*) FROM requests"), 3);
        assert!(matches!(
            take_op(&c, sae("bob"), sae("alice"), vec![keys[0].layout.key_id]),
            Err(StoreError::NotAuthorized)
        ));
        prune_op(&c, now_ms() + RETENTION_MS + 60_000).expect("prune");
        assert_eq!(
            rows(&c, "SELECT count(*) FROM requests"),
            1,
            "pending stays"
        );
        assert!(request_row(&c, &pending).expect("row").is_some());
        assert_eq!(
            rows(&c, "SELECT count(*) FROM units WHERE material IS NULL"),
            0,
            "the delivered keys' records are gone"
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
