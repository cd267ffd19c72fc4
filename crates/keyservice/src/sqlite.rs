//! The key service's store in SQLite: WAL, `synchronous=FULL`, group commit.
//!
//! One writer thread owns the connection (the server's store handle feeds it);
//! requests that arrive together are decided and written in one transaction, and
//! their answers leave only after the commit (so an answer never names keys the
//! store could still hand out again after a crash). Admin commands (`qkdnet
//! keyservice enrol`, `media revoke`) open the same file from another process;
//! SQLite's lock and a busy timeout serialise them with the server, and the
//! server reads the medium row in every transaction, so a revocation takes
//! effect with the next request.
//!
//! Tables: `meta` (schema version, salt, check value), `subscribers`, `media`
//! (bound identity, state, next index, charged count; at most one active medium
//! per subscriber), `media_keys` (sealed keys by medium and index, deleted when
//! used), `sessions` (sealed session key, parties, creation time), `audit`.
//! `PRAGMA secure_delete` overwrites deleted rows in the database file.
//!
//! The server's writer commits with `synchronous=NORMAL` ([`SqliteStore::defer_sync`])
//! and a second thread makes each group durable with one `fdatasync` of the WAL
//! ([`WalSync`]) before any of its answers leaves: the writer decides and
//! commits the next group while the disk syncs the last, and an answer still
//! never leaves before its commit is on disk.

use std::path::Path;
use std::time::Duration;

use qkdnet_kms::store::MasterKey;
use qkdnet_kms::store::sqlite::Durability;
use qkdnet_media::Key256;
use qkdnet_media::proto::{ChargeOffer, Identity, KeySource, RefuseReason};
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use crate::core::{
    AuditLine, ChargeInputs, ChargePlan, GrantInputs, GrantPlan, MediumRow, SessionRow,
    already_enrolled, decide_charge, decide_grant, fetch_plan, revocable,
};
use crate::error::{KsError, Result};
use crate::records::{GrantOp, MediumInfo, Revocation, SessionKeys, SubscriberInfo};
use crate::seal::Sealer;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS subscribers (
    identity TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS media (
    rid INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    identity TEXT NOT NULL REFERENCES subscribers(identity),
    revoked INTEGER NOT NULL DEFAULT 0,
    next INTEGER NOT NULL,
    charged INTEGER NOT NULL,
    bound_at INTEGER NOT NULL,
    revoked_at INTEGER,
    revoke_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS media_active ON media(identity) WHERE revoked = 0;
CREATE TABLE IF NOT EXISTS media_keys (
    rid INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (rid, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    sid BLOB PRIMARY KEY,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    source INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_created ON sessions(created);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    event TEXT NOT NULL,
    medium BLOB,
    identity TEXT,
    detail TEXT NOT NULL
);
";

/// Makes the commits of a [`SqliteStore::defer_sync`] connection durable.
#[derive(Debug, Clone)]
pub struct WalSync {
    wal: Option<std::path::PathBuf>,
}

impl WalSync {
    /// Flushes the WAL to disk: every transaction committed before this call
    /// survives a power loss once it returns `Ok`. The file is opened anew
    /// each time (a checkpoint may have reset it; fsync flushes a file's
    /// pages whichever descriptor asks).
    pub fn sync(&self) -> Result<()> {
        let Some(wal) = &self.wal else { return Ok(()) };
        let f = std::fs::File::open(wal)
            .map_err(|e| KsError::Store(format!("{}: {e}", wal.display())))?;
        f.sync_data()
            .map_err(|e| KsError::Store(format!("syncing {}: {e}", wal.display())))
    }
}

/// The store.
pub struct SqliteStore {
    conn: Connection,
    sealer: Sealer,
}

impl core::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| KsError::Store(format!("{what} {v} out of range")))
}

fn to_u64(v: i64, what: &str) -> rusqlite::Result<u64> {
    u64::try_from(v).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Integer,
            format!("negative {what}").into(),
        )
    })
}

fn source_byte(s: KeySource) -> i64 {
    match s {
        KeySource::Qkd => 1,
        _ => 2,
    }
}

fn source_of(b: i64) -> KeySource {
    if b == 1 {
        KeySource::Qkd
    } else {
        KeySource::Csprng
    }
}

fn medium_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MediumRow> {
    let id: Vec<u8> = r.get(1)?;
    Ok(MediumRow {
        rid: r.get(0)?,
        id: Uuid::from_slice(&id).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, e.into())
        })?,
        identity: r.get(2)?,
        revoked: r.get::<_, i64>(3)? != 0,
        next: to_u64(r.get(4)?, "next index")?,
        charged: to_u64(r.get(5)?, "charged count")?,
    })
}

const MEDIUM_COLS: &str = "rid, id, identity, revoked, next, charged";

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, its keys sealed under
    /// `master`.
    pub fn open(path: &Path, master: &MasterKey) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| KsError::Store(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let tx = conn.unchecked_transaction()?;
        let version: Option<i64> = tx
            .query_row("SELECT v FROM meta WHERE k = 'schema'", [], |r| r.get(0))
            .optional()?;
        match version {
            None => {
                let mut salt = [0u8; 32];
                getrandom::fill(&mut salt).expect("invariant: the OS CSPRNG works");
                let sealer = Sealer::new(master, &salt);
                tx.execute(
                    "INSERT INTO meta (k, v) VALUES ('schema', ?1), ('salt', ?2), ('check', ?3)",
                    params![SCHEMA_VERSION, &salt[..], &sealer.check_value()[..]],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(KsError::Store(format!(
                    "{}: schema version {v}; this build knows version {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        tx.commit()?;
        let salt: Vec<u8> =
            conn.query_row("SELECT v FROM meta WHERE k = 'salt'", [], |r| r.get(0))?;
        let check: Vec<u8> =
            conn.query_row("SELECT v FROM meta WHERE k = 'check'", [], |r| r.get(0))?;
        let sealer = Sealer::new(master, &salt);
        sealer.verify_check(&check)?;
        Ok(Self { conn, sealer })
    }

    /// Switches this connection to commits that do not wait for the disk
    /// (`synchronous=NORMAL`; a commit then survives a crash of the process but
    /// not yet a power loss). The caller must make every commit durable with
    /// the returned [`WalSync`] before it answers anybody on its strength.
    ///
    /// With [`Durability::Normal`] the returned `WalSync` does nothing: commits
    /// survive a crash of the process but may be lost with power (an operator's
    /// choice, as for the KME's store; a lost commit makes keys the terminals
    /// have destroyed usable again at the service).
    pub fn defer_sync(&mut self, path: &Path, durability: Durability) -> Result<WalSync> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(WalSync {
            wal: (durability == Durability::Full).then(|| wal.into()),
        })
    }

    fn audit(tx: &Connection, now: u64, line: &AuditLine) -> Result<()> {
        tx.prepare_cached(
            "INSERT INTO audit (at, event, medium, identity, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            to_i64(now, "time")?,
            line.event,
            line.medium.as_ref().map(|m| m.as_bytes().to_vec()),
            line.identity,
            line.detail
        ])?;
        Ok(())
    }

    /// Enrols a subscriber (a SIP URI or a device ID). Enrolling one twice is
    /// an error.
    pub fn enrol(&mut self, identity: &Identity, name: &str, now: u64) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT INTO subscribers (identity, name, enrolled_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
            params![identity.as_str(), name, to_i64(now, "time")?],
        )?;
        if n == 0 {
            return Err(already_enrolled(identity));
        }
        Self::audit(&tx, now, &AuditLine::enrol(identity, name))?;
        tx.commit()?;
        Ok(())
    }

    /// Revokes a medium (lost, stolen, retired): its keys are destroyed at once
    /// and every later request or charge with it is refused.
    pub fn revoke(&mut self, medium: &Uuid, reason: &str, now: u64) -> Result<Revocation> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!("SELECT {MEDIUM_COLS} FROM media WHERE id = ?1"),
                [medium.as_bytes()],
                medium_row,
            )
            .optional()?;
        let row = revocable(row, medium)?;
        tx.execute(
            "UPDATE media SET revoked = 1, revoked_at = ?2, revoke_reason = ?3 WHERE rid = ?1",
            params![row.rid, to_i64(now, "time")?, reason],
        )?;
        let destroyed = tx.execute("DELETE FROM media_keys WHERE rid = ?1", [row.rid])?;
        Self::audit(&tx, now, &AuditLine::revoke(&row, reason, destroyed as u64))?;
        tx.commit()?;
        Ok(Revocation {
            identity: row.identity,
            destroyed: destroyed as u64,
        })
    }

    /// Every subscriber, with its active medium.
    pub fn subscribers(&self) -> Result<Vec<SubscriberInfo>> {
        let mut st = self.conn.prepare(
            "SELECT s.identity, s.name, s.enrolled_at, m.id FROM subscribers s
             LEFT JOIN media m ON m.identity = s.identity AND m.revoked = 0
             ORDER BY s.identity",
        )?;
        let rows = st.query_map([], |r| {
            let m: Option<Vec<u8>> = r.get(3)?;
            Ok(SubscriberInfo {
                identity: r.get(0)?,
                name: r.get(1)?,
                enrolled_at: to_u64(r.get(2)?, "time")?,
                medium: m.and_then(|b| Uuid::from_slice(&b).ok()),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every medium the service knows.
    pub fn media(&self) -> Result<Vec<MediumInfo>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {MEDIUM_COLS}, bound_at, revoked_at, revoke_reason FROM media ORDER BY rid"
        ))?;
        let rows = st.query_map([], |r| {
            Ok(MediumInfo {
                row: medium_row(r)?,
                bound_at: to_u64(r.get(6)?, "time")?,
                revoked_at: r.get::<_, Option<i64>>(7)?.map(|t| t.max(0) as u64),
                revoke_reason: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The last `limit` audit lines, oldest first: (time, event, medium, identity, detail).
    pub fn audit_tail(&self, limit: u32) -> Result<Vec<crate::records::AuditEntry>> {
        let mut st = self.conn.prepare(
            "SELECT seq, at, event, medium, identity, detail FROM
             (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = st.query_map([limit], |r| {
            let m: Option<Vec<u8>> = r.get(3)?;
            Ok(crate::records::AuditEntry {
                seq: to_u64(r.get(0)?, "sequence")?,
                at: to_u64(r.get(1)?, "time")?,
                event: r.get(2)?,
                medium: m.and_then(|b| Uuid::from_slice(&b).ok()),
                identity: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn medium_by_id(tx: &Connection, id: &Uuid) -> Result<Option<MediumRow>> {
        Ok(tx
            .prepare_cached(&format!("SELECT {MEDIUM_COLS} FROM media WHERE id = ?1"))?
            .query_row([id.as_bytes()], medium_row)
            .optional()?)
    }

    /// The keys at indices `idx` (one statement), each if charged.
    fn keys_at(
        &self,
        tx: &Connection,
        m: &MediumRow,
        idx: [u64; 2],
    ) -> Result<[Option<Key256>; 2]> {
        let mut st = tx.prepare_cached(
            "SELECT idx, sealed FROM media_keys WHERE rid = ?1 AND idx IN (?2, ?3)",
        )?;
        let mut rows = st.query(params![
            m.rid,
            to_i64(idx[0], "index")?,
            to_i64(idx[1], "index")?
        ])?;
        let mut out = [None, None];
        while let Some(r) = rows.next()? {
            let i = to_u64(r.get(0)?, "index")?;
            let sealed: Vec<u8> = r.get(1)?;
            if let Some(p) = idx.iter().position(|x| *x == i) {
                out[p] = Some(self.sealer.open_medium_key(&m.id, i, &sealed)?);
            }
        }
        Ok(out)
    }

    fn session(&self, tx: &Connection, sid: &[u8], not_before: u64) -> Result<Option<SessionRow>> {
        let row: Option<(String, String, i64, Vec<u8>, i64)> = tx
            .prepare_cached(
                "SELECT a, b, source, sealed, created FROM sessions WHERE sid = ?1 AND created >= ?2",
            )?
            .query_row(params![sid, to_i64(not_before, "time")?], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?;
        let Some((a, b, source, sealed, created)) = row else {
            return Ok(None);
        };
        let bad = |_| KsError::Store("a stored session has an invalid identity".into());
        Ok(Some(SessionRow {
            session_id: sid
                .try_into()
                .map_err(|_| KsError::Store("bad session ID".into()))?,
            a: Identity::new(a).map_err(bad)?,
            b: Identity::new(b).map_err(bad)?,
            source: source_of(source),
            key: self.sealer.open_session_key(sid, &sealed)?,
            created: created.max(0) as u64,
        }))
    }

    fn has_active_medium(tx: &Connection, identity: &str) -> Result<bool> {
        Ok(tx
            .prepare_cached("SELECT 1 FROM media WHERE identity = ?1 AND revoked = 0")?
            .query_row([identity], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Decides and writes a batch of requests in one transaction; the answers
    /// are valid only once this returns `Ok` (the commit happened). A request
    /// whose rows cannot be read (a stored key that does not open) fails alone:
    /// nothing of it was written yet. A failed write fails the whole group.
    pub fn grant_batch(
        &mut self,
        ops: &[GrantOp],
        keys: &mut dyn SessionKeys,
        now: u64,
    ) -> Result<Vec<Result<GrantPlan>>> {
        // IMMEDIATE: the write lock is taken before anything is read, so another
        // writer of the same file (a second front end, an admin command) cannot
        // change a medium between this group's read and its write.
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut run = || -> Result<Vec<Result<GrantPlan>>> {
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                match self.grant_one(&self.conn, op, keys, now) {
                    Ok(plan) => {
                        self.write_plan(&self.conn, &plan, now)?;
                        out.push(Ok(plan));
                    }
                    Err(e) => out.push(Err(e)),
                }
            }
            Ok(out)
        };
        match run().and_then(|out| {
            self.conn.execute_batch("COMMIT")?;
            Ok(out)
        }) {
            Ok(out) => Ok(out),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn grant_one(
        &self,
        tx: &Connection,
        op: &GrantOp,
        keys: &mut dyn SessionKeys,
        now: u64,
    ) -> Result<GrantPlan> {
        let medium = Self::medium_by_id(tx, &op.req.medium_id)?;
        let fetch = fetch_plan(medium.as_ref(), &op.req, op.max_skip);
        let keys_read = match (fetch.keys, &medium) {
            (Some(idx), Some(m)) => self.keys_at(tx, m, idx)?,
            _ => [None, None],
        };
        let sid = op.req.request.session_id();
        let session = self.session(tx, &sid, now.saturating_sub(op.session_ttl))?;
        let peer_active = match &op.req.request {
            qkdnet_media::proto::Request::SessionKey { peer, .. } if session.is_none() => {
                Self::has_active_medium(tx, peer.as_str())?
            }
            _ => false,
        };
        Ok(decide_grant(
            GrantInputs {
                challenge: &op.challenge,
                req: &op.req,
                medium: medium.as_ref(),
                keys: keys_read,
                session,
                peer_active,
                max_skip: op.max_skip,
                now,
                nonce: op.nonce,
            },
            || keys.draw(),
        ))
    }

    fn write_plan(&self, tx: &Connection, plan: &GrantPlan, now: u64) -> Result<()> {
        if let Some(c) = plan.consume {
            tx.prepare_cached("DELETE FROM media_keys WHERE rid = ?1 AND idx BETWEEN ?2 AND ?3")?
                .execute(params![
                    c.rid,
                    to_i64(c.first, "index")?,
                    to_i64(c.last, "index")?
                ])?;
            tx.prepare_cached("UPDATE media SET next = ?2 WHERE rid = ?1")?
                .execute(params![c.rid, to_i64(c.next, "index")?])?;
        }
        if let Some(s) = &plan.new_session {
            tx.prepare_cached(
                "INSERT INTO sessions (sid, a, b, source, sealed, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (sid) DO UPDATE SET a = ?2, b = ?3, source = ?4, sealed = ?5, created = ?6",
            )?
            .execute(params![
                &s.session_id[..],
                s.a.as_str(),
                s.b.as_str(),
                source_byte(s.source),
                self.sealer.seal_session_key(&s.session_id, &s.key),
                to_i64(s.created, "time")?
            ])?;
        }
        if let Some(line) = &plan.audit {
            Self::audit(tx, now, line)?;
        }
        Ok(())
    }

    /// Deletes sessions opened before `before` (expired); returns how many.
    pub fn purge_sessions(&mut self, before: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM sessions WHERE created < ?1",
            [to_i64(before, "time")?],
        )?)
    }

    /// Stores the keys of a verified charge offer (`keys[i]` at index
    /// `first_index + i`), all or nothing. The refusal, if the rules refuse it.
    pub fn charge(
        &mut self,
        offer: &ChargeOffer,
        keys: &[Key256],
        now: u64,
    ) -> Result<Result<(), RefuseReason>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let enrolled = tx
            .query_row(
                "SELECT 1 FROM subscribers WHERE identity = ?1",
                [offer.terms.owner.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let medium = Self::medium_by_id(&tx, &offer.terms.medium_id)?;
        let owner_active: Option<Vec<u8>> = tx
            .query_row(
                "SELECT id FROM media WHERE identity = ?1 AND revoked = 0",
                [offer.terms.owner.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        let plan = decide_charge(&ChargeInputs {
            offer,
            enrolled,
            medium: medium.as_ref(),
            owner_active: owner_active.and_then(|b| Uuid::from_slice(&b).ok()),
        });
        let ChargePlan::Apply {
            bind,
            first,
            charged,
            audit,
        } = plan
        else {
            let ChargePlan::Refuse(reason) = plan else {
                unreachable!("two variants")
            };
            return Ok(Err(reason));
        };
        let rid = if bind {
            tx.execute(
                "INSERT INTO media (id, identity, next, charged, bound_at) VALUES (?1, ?2, 0, 0, ?3)",
                params![
                    offer.terms.medium_id.as_bytes(),
                    offer.terms.owner.as_str(),
                    to_i64(now, "time")?
                ],
            )?;
            let rid = tx.last_insert_rowid();
            Self::audit(&tx, now, &AuditLine::bind(offer))?;
            rid
        } else {
            medium
                .as_ref()
                .map(|m| m.rid)
                .expect("invariant: not bind ⇒ known")
        };
        tx.execute(
            "DELETE FROM media_keys WHERE rid = ?1 AND idx >= ?2",
            params![rid, to_i64(first, "index")?],
        )?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO media_keys (rid, idx, sealed) VALUES (?1, ?2, ?3)")?;
            for (i, k) in keys.iter().enumerate() {
                let idx = first + i as u64;
                ins.execute(params![
                    rid,
                    to_i64(idx, "index")?,
                    self.sealer.seal_medium_key(&offer.terms.medium_id, idx, k)
                ])?;
            }
        }
        tx.execute(
            "UPDATE media SET charged = ?2 WHERE rid = ?1",
            params![rid, to_i64(charged, "index")?],
        )?;
        Self::audit(&tx, now, &audit)?;
        tx.commit()?;
        Ok(Ok(()))
    }
}
