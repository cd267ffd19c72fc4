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

const ROLE_MASTER: i64 = 0;
const ROLE_SLAVE: i64 = 1;
const REQ_PENDING: i64 = 0;
const REQ_ACCEPTED: i64 = 1;
const REQ_VOIDED: i64 = 2;
const REQ_DELIVERED: i64 = 3;

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blocks(
    link_id TEXT NOT NULL, block_number INTEGER NOT NULL, peer TEXT NOT NULL,
    units INTEGER NOT NULL, eps_sec REAL NOT NULL, eps_cor REAL NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY(link_id, block_number));
CREATE TABLE IF NOT EXISTS units(
    seq INTEGER PRIMARY KEY, uid BLOB NOT NULL UNIQUE, peer TEXT NOT NULL, mine INTEGER NOT NULL,
    material BLOB NOT NULL, key_id BLOB, pos INTEGER);
CREATE INDEX IF NOT EXISTS units_avail ON units(peer, mine, seq) WHERE key_id IS NULL;
CREATE INDEX IF NOT EXISTS units_key ON units(key_id, pos) WHERE key_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS keys(
    key_id BLOB PRIMARY KEY, request_id BLOB NOT NULL, role INTEGER NOT NULL, peer TEXT NOT NULL,
    master TEXT NOT NULL, slave TEXT NOT NULL, size_bits INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS keys_req ON keys(request_id);
CREATE TABLE IF NOT EXISTS pools(
    peer TEXT PRIMARY KEY, total INTEGER NOT NULL, mine_available INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests(
    request_id BLOB PRIMARY KEY, role INTEGER NOT NULL, peer TEXT NOT NULL, state INTEGER NOT NULL,
    voided BLOB, created_ms INTEGER NOT NULL);
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
        conn.pragma_update(None, "cache_size", -131_072)?; // 128 MiB of page cache
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let _: i64 = conn.query_row("PRAGMA mmap_size=268435456", [], |r| r.get(0))?;
        conn.execute_batch(SCHEMA)?;
        // Pool counters are maintained by every operation; recomputing them at open
        // makes them self-healing (one scan per start-up).
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM pools;
             INSERT INTO pools(peer, total, mine_available)
                 SELECT peer, count(*), coalesce(sum(mine = 1 AND key_id IS NULL), 0) FROM units GROUP BY peer;
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
    Ok(n)
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

/// (role, peer, state, voided key IDs) of a request.
type RequestRow = (i64, String, i64, Option<Vec<u8>>);

fn request_row(conn: &Connection, id: &Uuid) -> Result<Option<RequestRow>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT role, peer, state, voided FROM requests WHERE request_id=?1")?
        .query_row(params![&id.as_bytes()[..]], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?)
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
    let mut picked: Vec<(i64, Uuid, Zeroizing<[u8; UNIT_BYTES]>)> = Vec::with_capacity(need);
    {
        let mut sel = conn.prepare_cached(
            "SELECT seq, uid, material FROM units WHERE peer=?1 AND mine=1 AND key_id IS NULL ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = sel.query(params![r.peer.as_str(), i64_of(need as u64)?])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let uid = uuid_of(row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?)?;
            let blob = row.get_ref(2)?.as_blob().map_err(rusqlite::Error::from)?;
            let mut m = Zeroizing::new([0u8; UNIT_BYTES]);
            if blob.len() != UNIT_BYTES {
                return Err(StoreError::Backend("corrupt unit in store".into()));
            }
            m.copy_from_slice(blob);
            picked.push((seq, uid, m));
        }
    }
    if picked.len() < need {
        let available = counts_op(conn, &r.peer)?.mine_available;
        return Err(StoreError::Exhausted {
            available,
            requested: need as u64,
        });
    }
    let mut upd = conn.prepare_cached("UPDATE units SET key_id=?1, pos=?2 WHERE seq=?3")?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO keys(key_id, request_id, role, peer, master, slave, size_bits, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
    )?;
    let mut out = Vec::with_capacity(r.number as usize);
    for chunk in picked.chunks(per_key) {
        let key_id = chunk[0].1;
        let mut material = Zeroizing::new(Vec::with_capacity(per_key * UNIT_BYTES));
        let mut unit_ids = Vec::with_capacity(per_key);
        for (pos, (seq, uid, m)) in chunk.iter().enumerate() {
            upd.execute(params![&key_id.as_bytes()[..], pos as i64, seq])?;
            material.extend_from_slice(&m[..]);
            unit_ids.push(*uid);
        }
        material.truncate(key_bytes);
        ins.execute(params![
            &key_id.as_bytes()[..],
            &r.request_id.as_bytes()[..],
            ROLE_MASTER,
            r.peer.as_str(),
            r.master.as_str(),
            r.slave.as_str(),
            r.size_bits,
            i64_of(r.now_unix_ms)?
        ])?;
        out.push(ReservedKey {
            layout: KeyLayout {
                key_id,
                size_bits: r.size_bits,
                unit_ids,
            },
            material,
        });
    }
    conn.prepare_cached(
        "INSERT INTO requests(request_id, role, peer, state, created_ms) VALUES (?1,?2,?3,?4,?5)",
    )?
    .execute(params![
        &r.request_id.as_bytes()[..],
        ROLE_MASTER,
        r.peer.as_str(),
        REQ_PENDING,
        i64_of(r.now_unix_ms)?
    ])?;
    bump(conn, r.peer.as_str(), 0, -i64_of(need as u64)?)?;
    Ok(out)
}

/// The peer of a pending master-side request.
fn master_pending(conn: &Connection, request_id: &Uuid) -> Result<String, StoreError> {
    match request_row(conn, request_id)? {
        Some((ROLE_MASTER, peer, REQ_PENDING, _)) => Ok(peer),
        _ => Err(StoreError::RequestConflict),
    }
}

fn confirm_op(conn: &Connection, request_id: Uuid) -> Result<(), StoreError> {
    let peer = master_pending(conn, &request_id)?;
    let rid = &request_id.as_bytes()[..];
    let n = conn
        .prepare_cached(
            "DELETE FROM units WHERE key_id IN (SELECT key_id FROM keys WHERE request_id=?1)",
        )?
        .execute(params![rid])?;
    bump(conn, &peer, -(n as i64), 0)?;
    // The key rows stay, without material, as a record of which SAE pair the key
    // went to: a later dec_keys for it at this (the master's) KME is then answered
    // 401 rather than "not found".
    conn.prepare_cached("UPDATE keys SET delivered=1 WHERE request_id=?1")?
        .execute(params![rid])?;
    conn.prepare_cached("UPDATE requests SET state=?2 WHERE request_id=?1")?
        .execute(params![rid, REQ_DELIVERED])?;
    Ok(())
}

fn release_op(conn: &Connection, request_id: Uuid, discard: Vec<Uuid>) -> Result<(), StoreError> {
    let peer = master_pending(conn, &request_id)?;
    let rid = &request_id.as_bytes()[..];
    let mut del = conn.prepare_cached(
        "DELETE FROM units WHERE uid=?1 AND key_id IN (SELECT key_id FROM keys WHERE request_id=?2)",
    )?;
    let mut discarded = 0;
    for u in &discard {
        discarded += del.execute(params![&u.as_bytes()[..], rid])?;
    }
    let returned = conn
        .prepare_cached(
            "UPDATE units SET key_id=NULL, pos=NULL WHERE key_id IN (SELECT key_id FROM keys WHERE request_id=?1)",
        )?
        .execute(params![rid])?;
    bump(conn, &peer, -(discarded as i64), returned as i64)?;
    conn.prepare_cached("DELETE FROM keys WHERE request_id=?1")?
        .execute(params![rid])?;
    conn.prepare_cached("UPDATE requests SET state=?2 WHERE request_id=?1")?
        .execute(params![rid, REQ_VOIDED])?;
    Ok(())
}

fn layouts_of(conn: &Connection, request_id: &Uuid) -> Result<Vec<KeyLayout>, StoreError> {
    let mut keys = Vec::new();
    let mut sel = conn
        .prepare_cached("SELECT key_id, size_bits FROM keys WHERE request_id=?1 ORDER BY rowid")?;
    let mut rows = sel.query(params![&request_id.as_bytes()[..]])?;
    while let Some(row) = rows.next()? {
        let key_id = uuid_of(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?)?;
        let size_bits: u32 = row.get(1)?;
        keys.push(KeyLayout {
            key_id,
            size_bits,
            unit_ids: Vec::new(),
        });
    }
    let mut us = conn.prepare_cached("SELECT uid FROM units WHERE key_id=?1 ORDER BY pos")?;
    for k in &mut keys {
        let mut rows = us.query(params![&k.key_id.as_bytes()[..]])?;
        while let Some(row) = rows.next()? {
            k.unit_ids.push(uuid_of(
                row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?,
            )?);
        }
    }
    Ok(keys)
}

fn pending_op(conn: &Connection) -> Result<Vec<PendingRequest>, StoreError> {
    let mut ids = Vec::new();
    {
        let mut sel = conn
            .prepare_cached("SELECT request_id, peer FROM requests WHERE role=?1 AND state=?2")?;
        let mut rows = sel.query(params![ROLE_MASTER, REQ_PENDING])?;
        while let Some(row) = rows.next()? {
            let id = uuid_of(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?)?;
            let peer: String = row.get(1)?;
            let peer = KmeId::new(&peer)
                .map_err(|_| StoreError::Backend("corrupt peer ID in store".into()))?;
            ids.push((id, peer));
        }
    }
    ids.into_iter()
        .map(|(request_id, peer)| {
            Ok(PendingRequest {
                request_id,
                peer,
                keys: layouts_of(conn, &request_id)?,
            })
        })
        .collect()
}

fn accept_op(conn: &Connection, a: Acceptance) -> Result<AcceptOutcome, StoreError> {
    match request_row(conn, &a.request_id)? {
        None => {}
        Some((ROLE_SLAVE, peer, REQ_ACCEPTED, _)) if peer == a.peer.as_str() => {
            // A retry: accepted iff the layout is the one stored (or already partly delivered).
            return Ok(AcceptOutcome::AlreadyAccepted);
        }
        Some((ROLE_SLAVE, peer, REQ_VOIDED, _)) if peer == a.peer.as_str() => {
            return Err(StoreError::RequestVoided);
        }
        Some(_) => return Err(StoreError::RequestConflict),
    }
    if a.keys.is_empty() {
        return Err(StoreError::InvalidLayout("no keys"));
    }
    let mut unavailable = Vec::new();
    {
        let mut sel = conn.prepare_cached(
            "SELECT seq, mine, key_id IS NULL FROM units WHERE uid=?1 AND peer=?2",
        )?;
        let mut seen = std::collections::HashSet::new();
        for k in &a.keys {
            if k.size_bits == 0 || k.size_bits % 8 != 0 {
                return Err(StoreError::InvalidLayout(
                    "size not a positive multiple of 8",
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
                let row: Option<(i64, bool, bool)> = sel
                    .query_row(params![&u.as_bytes()[..], a.peer.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                match row {
                    // Only the peer's own units (mine = false here), still available.
                    Some((_, false, true)) => {}
                    _ => unavailable.push(*u),
                }
            }
        }
    }
    if !unavailable.is_empty() {
        return Err(StoreError::UnitsUnavailable(unavailable));
    }
    let mut upd = conn.prepare_cached("UPDATE units SET key_id=?1, pos=?2 WHERE uid=?3")?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO keys(key_id, request_id, role, peer, master, slave, size_bits, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
    )?;
    for k in &a.keys {
        for (pos, u) in k.unit_ids.iter().enumerate() {
            upd.execute(params![
                &k.key_id.as_bytes()[..],
                pos as i64,
                &u.as_bytes()[..]
            ])?;
        }
        ins.execute(params![
            &k.key_id.as_bytes()[..],
            &a.request_id.as_bytes()[..],
            ROLE_SLAVE,
            a.peer.as_str(),
            a.master.as_str(),
            a.slave.as_str(),
            k.size_bits,
            i64_of(a.now_unix_ms)?
        ])?;
    }
    conn.prepare_cached(
        "INSERT INTO requests(request_id, role, peer, state, created_ms) VALUES (?1,?2,?3,?4,?5)",
    )?
    .execute(params![
        &a.request_id.as_bytes()[..],
        ROLE_SLAVE,
        a.peer.as_str(),
        REQ_ACCEPTED,
        i64_of(a.now_unix_ms)?
    ])?;
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
    let rid = &request_id.as_bytes()[..];
    match request_row(conn, &request_id)? {
        None => {
            conn.prepare_cached(
                "INSERT INTO requests(request_id, role, peer, state, voided, created_ms) VALUES (?1,?2,?3,?4,NULL,0)",
            )?
            .execute(params![rid, ROLE_SLAVE, peer.as_str(), REQ_VOIDED])?;
            Ok(VoidOutcome {
                was_accepted: false,
                voided_keys: Vec::new(),
            })
        }
        Some((ROLE_SLAVE, p, REQ_VOIDED, voided)) if p == peer.as_str() => {
            // Idempotent: answer what the first void answered.
            let voided_keys = decode_ids(voided.clone())?;
            Ok(VoidOutcome {
                was_accepted: voided.is_some(),
                voided_keys,
            })
        }
        Some((ROLE_SLAVE, p, REQ_ACCEPTED, _)) if p == peer.as_str() => {
            let mut ids = Vec::new();
            {
                let mut sel = conn.prepare_cached("SELECT key_id FROM keys WHERE request_id=?1")?;
                let mut rows = sel.query(params![rid])?;
                while let Some(row) = rows.next()? {
                    ids.push(uuid_of(
                        row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?,
                    )?);
                }
            }
            conn.prepare_cached(
                "UPDATE units SET key_id=NULL, pos=NULL WHERE key_id IN (SELECT key_id FROM keys WHERE request_id=?1)",
            )?
            .execute(params![rid])?;
            conn.prepare_cached("DELETE FROM keys WHERE request_id=?1")?
                .execute(params![rid])?;
            let blob: Vec<u8> = ids
                .iter()
                .flat_map(|u| u.as_bytes().iter().copied())
                .collect();
            conn.prepare_cached("UPDATE requests SET state=?2, voided=?3 WHERE request_id=?1")?
                .execute(params![rid, REQ_VOIDED, blob])?;
            Ok(VoidOutcome {
                was_accepted: true,
                voided_keys: ids,
            })
        }
        Some(_) => Err(StoreError::RequestConflict),
    }
}

fn take_op(
    conn: &Connection,
    caller: SaeId,
    master: SaeId,
    key_ids: Vec<Uuid>,
) -> Result<Vec<DeliveredKey>, StoreError> {
    let mut sizes = Vec::with_capacity(key_ids.len());
    let mut not_found = false;
    let mut unauthorized = false;
    {
        let mut sel = conn.prepare_cached(
            "SELECT master, slave, size_bits, role, delivered, peer FROM keys WHERE key_id=?1",
        )?;
        for id in &key_ids {
            let row: Option<(String, String, u32, i64, bool, String)> = sel
                .query_row(params![&id.as_bytes()[..]], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()?;
            match row {
                None => not_found = true,
                // A key this KME reserved as master: its slave is at the peer KME, so
                // nobody may take it here.
                Some((_, _, _, ROLE_MASTER, _, _)) => unauthorized = true,
                Some((_, _, _, _, true, _)) => not_found = true,
                Some((m, s, size, _, false, peer)) => {
                    if m != master.as_str() || s != caller.as_str() {
                        unauthorized = true;
                    }
                    sizes.push((size, peer));
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
    let mut units =
        conn.prepare_cached("SELECT material FROM units WHERE key_id=?1 ORDER BY pos")?;
    let mut del_units = conn.prepare_cached("DELETE FROM units WHERE key_id=?1")?;
    let mut del_key = conn.prepare_cached("DELETE FROM keys WHERE key_id=?1")?;
    for (id, (size, peer)) in key_ids.iter().zip(sizes) {
        let kid = &id.as_bytes()[..];
        let mut material = Zeroizing::new(Vec::with_capacity(
            units_for_bits(size) as usize * UNIT_BYTES,
        ));
        {
            let mut rows = units.query(params![kid])?;
            while let Some(row) = rows.next()? {
                material
                    .extend_from_slice(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?);
            }
        }
        if material.len() < (size / 8) as usize {
            return Err(StoreError::Backend("key units missing in store".into()));
        }
        material.truncate((size / 8) as usize);
        let n = del_units.execute(params![kid])?;
        bump(conn, &peer, -(n as i64), 0)?;
        del_key.execute(params![kid])?;
        out.push(DeliveredKey {
            key_id: *id,
            material,
        });
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
