//! PostgreSQL implementation of [`KeyStore`], for KMEs that keep their keys on a
//! database server instead of an embedded file.
//!
//! It has the SQLite store's schema and the same state transitions, one
//! transaction each; what differs is how concurrent transactions are kept apart.
//! SQLite has one writer, so its transactions are serial by construction. Here
//! several connections write at once, so every transaction that changes a peer's
//! pool first locks that pool's row in `pools` (`SELECT … FOR UPDATE`, creating
//! the row if needed), and only then reads the state it decides on. Transitions of
//! one pool are therefore serial, exactly as in SQLite, and each later statement
//! (`READ COMMITTED` takes a fresh snapshot per statement) sees everything the
//! previous holder of the lock committed: two `reserve`s cannot pick the same
//! unit, two `take`s cannot both deliver a key, and an `accept` racing a `void`
//! sees the other's result. Operations that learn the pool from the data
//! (`confirm`, `release`, `take`) look the pool up, lock it, then read again and
//! start over if the set of pools changed in between. A unit's pool never changes
//! once ingested. This was chosen over `SERIALIZABLE`: every transition also updates
//! the pool's counters, so under `SERIALIZABLE` concurrent transitions of one pool
//! would nearly always conflict and be retried, each waiter once per commit
//! before it. Conflicts that remain (a unique key raced by two pools, a deadlock, a
//! serialization failure) are retried a bounded number of times; a commit whose
//! outcome is unknown (the connection broke) is never retried, so a lost answer
//! can lose a key but never hand it out twice. `pending` reads one
//! `REPEATABLE READ` snapshot.
//!
//! Each operation runs on a Tokio task of its own: as with the SQLite writer
//! thread, a transition that has started runs to its end even if the caller stops
//! waiting, so an HTTP request cancelled mid-`take` cannot leave half a delivery.
//!
//! Connections come from a small hand-rolled pool: at most `pool_size` connections,
//! a semaphore for the waiting callers (FIFO), idle connections reused unless
//! closed, each with its own cache of prepared statements. That is all the store
//! needs; a general pool crate (deadpool) would add its runtime abstraction, config
//! layer and recycling policies for nothing, and the semaphore keeps the behaviour
//! under load obvious.
//!
//! Each KME's tables live in a schema of their own ([`SchemaName`], by default
//! `kms_<kme ID>`), so several KMEs (and tests) can share one server and database;
//! the tables are created on open if missing and the pool counters are recomputed
//! from the units, as in SQLite. Only one process should use a schema at a time.
//!
//! The connection is plain TCP (or a Unix socket) **without TLS**: the database is
//! expected on loopback or a trusted network, and `sslmode=require` in the URL
//! makes the connection fail. Key material travels to the server in bind
//! parameters; keep the server's statement logging off (`log_statement = 'none'`,
//! the default), and as with SQLite deleted material lingers in table pages and WAL
//! until vacuumed and overwritten, so the data directory belongs on an encrypted
//! volume. Material read back is copied into zeroizing buffers, but the client's
//! network buffers are not zeroized.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::cipher::{self, KeyRecord, MasterKey, Plan, UnitCipher};
use super::{
    AcceptOutcome, Acceptance, DeliveredKey, IngestBatch, KeyLayout, KeyStore, PendingRequest,
    PoolCounts, REPLAY_WINDOW_MS, Replay, ReplayRequest, Reservation, ReservedKey, StoreError,
    StoreFuture, VoidOutcome, VoidRoute,
};
use crate::block::{UNIT_BYTES, units_for_bits};
use crate::ids::{KmeId, SaeId};

const ROLE_MASTER: i16 = 0;
const ROLE_SLAVE: i16 = 1;
const REQ_PENDING: i16 = 0;
const REQ_ACCEPTED: i16 = 1;
const REQ_VOIDED: i16 = 2;
const REQ_DELIVERED: i16 = 3;
/// Master side: delivered to the master SAE, keys kept for one replay (the
/// `qkdnet_request_id` extension) until [`REPLAY_WINDOW_MS`]; as in SQLite.
const REQ_ANSWERED: i16 = 5;

/// Most answered requests past their replay window expired per ingested block.
const EXPIRE_LIMIT: i64 = 4096;

/// Attempts of one operation that hit a serialization failure, deadlock or raced
/// unique key before it gives up.
const MAX_ATTEMPTS: u32 = 12;

/// Longest schema name PostgreSQL keeps (longer names are silently truncated,
/// which could make two KMEs share tables).
const MAX_SCHEMA_LEN: usize = 63;

/// The tables, created in the KME's schema (the connection's `search_path`).
/// `seq` and `ord` give units and keys the insertion order SQLite's rowid gives.
/// `meta` holds the encryption record (`cipher`, `salt`, `check`, see
/// [`super::cipher`]) of a store whose material is encrypted; a unit's material
/// is then encrypted at position (`seq`, 0): `seq` values are drawn from the
/// identity's sequence before the insert, so never reused.
/// `units_free` has exactly the reservation query's predicate: with the earlier
/// `(peer, mine, seq) WHERE key_id IS NULL`, the generic plan of the prepared
/// reservation query walked the primary key from its start instead (EXPLAIN on a
/// filled store), through every spent and foreign unit.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blocks(
    link_id TEXT NOT NULL, block_number BIGINT NOT NULL, peer TEXT NOT NULL,
    units BIGINT NOT NULL, eps_sec DOUBLE PRECISION NOT NULL, eps_cor DOUBLE PRECISION NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY(link_id, block_number));
CREATE TABLE IF NOT EXISTS units(
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, uid UUID NOT NULL UNIQUE,
    peer TEXT NOT NULL, mine BOOLEAN NOT NULL, material BYTEA NOT NULL, key_id UUID, pos INTEGER);
DROP INDEX IF EXISTS units_avail;
CREATE INDEX IF NOT EXISTS units_free ON units(peer, seq) WHERE mine AND key_id IS NULL;
CREATE INDEX IF NOT EXISTS units_key ON units(key_id, pos) WHERE key_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS keys(
    key_id UUID PRIMARY KEY, request_id UUID NOT NULL, role SMALLINT NOT NULL, peer TEXT NOT NULL,
    master TEXT NOT NULL, slave TEXT NOT NULL, size_bits INTEGER NOT NULL, created_ms BIGINT NOT NULL,
    delivered BOOLEAN NOT NULL DEFAULT FALSE, ord BIGINT GENERATED ALWAYS AS IDENTITY);
CREATE INDEX IF NOT EXISTS keys_req ON keys(request_id);
CREATE TABLE IF NOT EXISTS pools(
    peer TEXT PRIMARY KEY, total BIGINT NOT NULL, mine_available BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS requests(
    request_id UUID PRIMARY KEY, role SMALLINT NOT NULL, peer TEXT NOT NULL, state SMALLINT NOT NULL,
    voided UUID[], created_ms BIGINT NOT NULL);
ALTER TABLE requests ADD COLUMN IF NOT EXISTS void_route TEXT;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS replay_key UUID;
CREATE INDEX IF NOT EXISTS requests_replay ON requests(replay_key) WHERE replay_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_answered ON requests(peer, created_ms) WHERE state = 5;
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v BYTEA NOT NULL);
";

/// Recomputes the pool counters from the units (at open), with the pools locked
/// against concurrent transitions.
const RECOUNT: &str = "
LOCK TABLE pools IN EXCLUSIVE MODE;
DELETE FROM pools;
INSERT INTO pools(peer, total, mine_available)
    SELECT peer, count(*), count(*) FILTER (WHERE mine AND key_id IS NULL) FROM units GROUP BY peer;
";

/// A PostgreSQL connection string (`postgres://user[:password]@host[:port]/db`, or
/// the `key=value` form), parsed when read. Its `Debug` output shows no password.
#[derive(Clone)]
pub struct PostgresUrl {
    text: Zeroizing<String>,
    config: tokio_postgres::Config,
}

impl PostgresUrl {
    /// The text as written (contains the password, if any).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed connection settings (for other stores of the node).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl FromStr for PostgresUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        // The parser's message never repeats the text, which may hold a password.
        let config = tokio_postgres::Config::from_str(s)
            .map_err(|e| StoreError::Backend(format!("PostgreSQL URL: {e}")))?;
        if config.get_hosts().is_empty() {
            return Err(StoreError::Backend("PostgreSQL URL names no host".into()));
        }
        Ok(Self {
            text: Zeroizing::new(s.to_owned()),
            config,
        })
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_tuple("PostgresUrl").field(&self.config).finish()
    }
}

impl Serialize for PostgresUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for PostgresUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The PostgreSQL schema holding one KME's tables: 1 to 63 characters of
/// `A-Z a-z 0-9 _ . -`, not starting with `pg_` (reserved by PostgreSQL). Always
/// quoted in SQL, so case is kept.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct SchemaName(String);

impl SchemaName {
    /// Parses a schema name.
    pub fn new(s: &str) -> Result<Self, StoreError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SCHEMA_LEN
            && !s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("pg_"))
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(StoreError::Backend(format!(
                "invalid PostgreSQL schema name {s:?}: 1 to {MAX_SCHEMA_LEN} of A-Z a-z 0-9 _ . -, not starting with pg_"
            )))
        }
    }

    /// The default schema of KME `kme`: `kms_<kme ID>`.
    pub fn for_kme(kme: &KmeId) -> Result<Self, StoreError> {
        Self::new(&format!("kms_{}", kme.as_str()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier (the alphabet has no `"`).
    fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SchemaName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SchemaName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// Tuning of the PostgreSQL store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Most connections open at once (at least 1). Transitions of one peer's pool
    /// are serial anyway; more connections help with several peers and with reads.
    pub pool_size: usize,
    /// Connect timeout used when the URL sets none.
    pub connect_timeout: Duration,
    /// The node master key: key material is encrypted under it (a store in the
    /// clear is encrypted at open); `None` keeps it in the clear and refuses an
    /// encrypted store. See [`super::cipher`].
    pub master_key: Option<MasterKey>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            master_key: None,
        }
    }
}

/// The PostgreSQL key store. Cheap to share (`Arc`); dropping the last handle closes
/// the idle connections once the operations already started have finished.
pub struct PostgresStore {
    pool: Arc<Pool>,
}

impl PostgresStore {
    /// Connects to `url`, creates the tables in `schema` if missing, recomputes the
    /// pool counters, and returns the store.
    pub async fn open(
        url: &PostgresUrl,
        schema: &SchemaName,
        options: PostgresOptions,
    ) -> Result<Self, StoreError> {
        let mut config = url.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("qkdnet-kms");
        }
        let pool = Arc::new(Pool {
            config,
            set_search_path: format!("SET search_path TO {}", schema.quoted()),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(options.pool_size.max(1))),
            cipher: OnceLock::new(),
        });
        let mut lease = pool.get().await?;
        let cipher = lease
            .setup(schema, options.master_key.as_ref())
            .await
            .map_err(|e| match e {
                OpError::Store(e) => e,
                OpError::Pg(e) => pg_backend(&e),
                OpError::Retry => StoreError::Backend("schema setup interrupted".into()),
            })?;
        drop(lease);
        match cipher {
            Some(c) => {
                let _ = pool.cipher.set(c);
            }
            None => tracing::warn!(
                schema = %schema,
                "no node master key (store_key): key material is stored in the clear"
            ),
        }
        Ok(Self { pool })
    }

    /// Runs `op` on a task of its own, retrying conflicts.
    fn submit<O: Op>(&self, op: O) -> StoreFuture<'_, O::Out> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let rt = tokio::runtime::Handle::try_current().map_err(|_| {
                StoreError::Backend("the PostgreSQL store needs a Tokio runtime".into())
            })?;
            match rt.spawn(async move { execute(&pool, &op).await }).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(StoreError::Backend("store task panicked".into())),
                Err(_) => Err(StoreError::Closed),
            }
        })
    }
}

// ---------------------------------------------------------------------------
// Connection pool

struct Pool {
    config: tokio_postgres::Config,
    set_search_path: String,
    idle: Mutex<Vec<PgConn>>,
    permits: Arc<Semaphore>,
    /// The unit cipher, set once at open if the store is encrypted.
    cipher: OnceLock<UnitCipher>,
}

/// A connection and its prepared statements (named statements survive rollbacks).
struct PgConn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

impl Pool {
    async fn get(self: &Arc<Self>) -> Result<Lease, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.client.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let conn = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Lease {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<PgConn, StoreError> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| pg_backend(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        client
            .batch_execute(&self.set_search_path)
            .await
            .map_err(|e| pg_backend(&e))?;
        Ok(PgConn {
            client,
            stmts: HashMap::new(),
        })
    }
}

/// A connection taken from the pool; goes back to it on drop unless closed.
struct Lease {
    conn: Option<PgConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !c.client.is_closed()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
        }
    }
}

impl Lease {
    fn conn(&mut self) -> Result<&mut PgConn, OpError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Backend("connection discarded".into()).into())
    }

    /// Forgets the connection (closes it) instead of returning it to the pool.
    fn discard(&mut self) {
        self.conn = None;
    }

    /// Runs `op` in one transaction and commits it.
    async fn transact<O: Op>(&mut self, op: &O) -> Result<O::Out, OpError> {
        let pool = self.pool.clone();
        let conn = self.conn()?;
        let isolation = if O::READ_ONLY {
            IsolationLevel::RepeatableRead
        } else {
            IsolationLevel::ReadCommitted
        };
        let tx = conn
            .client
            .build_transaction()
            .isolation_level(isolation)
            .read_only(O::READ_ONLY)
            .start()
            .await?;
        let mut cx = Ctx {
            tx,
            stmts: &mut conn.stmts,
            cipher: pool.cipher.get(),
        };
        // On an error the transaction is dropped, which rolls it back.
        let out = op.run(&mut cx).await?;
        cx.tx.commit().await?;
        Ok(out)
    }

    /// Creates the tables, recounts the pools and checks (or, for a store in the
    /// clear and a key, performs) the encryption, in one transaction.
    async fn setup(
        &mut self,
        schema: &SchemaName,
        master: Option<&MasterKey>,
    ) -> Result<Option<UnitCipher>, OpError> {
        let conn = self.conn()?;
        let tx = conn.client.transaction().await?;
        // Two processes opening the same schema at once take turns.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&schema.as_str()],
        )
        .await?;
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()))
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.batch_execute(RECOUNT).await?;
        let mut meta = HashMap::new();
        for row in tx.query("SELECT k, v FROM meta", &[]).await? {
            meta.insert(row.try_get::<_, String>(0)?, row.try_get::<_, Vec<u8>>(1)?);
        }
        let record = match meta.remove("cipher") {
            None => None,
            Some(name) if name == cipher::CIPHER_NAME.as_bytes() => {
                match (meta.remove("salt"), meta.remove("check")) {
                    (Some(salt), Some(check)) => Some(KeyRecord { salt, check }),
                    _ => return Err(corrupt("encryption record incomplete").into()),
                }
            }
            Some(name) => {
                return Err(StoreError::MasterKey(format!(
                    "the store is encrypted with {:?}, which this qkdnet does not know",
                    String::from_utf8_lossy(&name)
                ))
                .into());
            }
        };
        let what = format!("PostgreSQL schema {schema}");
        let cipher = match cipher::plan(&what, record, master)? {
            Plan::Plain => None,
            Plan::Use(c) => Some(c),
            Plan::Encrypt(c, record) => {
                let rows = tx.query("SELECT seq, material FROM units", &[]).await?;
                let mut seqs = Vec::with_capacity(rows.len());
                let mut material = Vec::with_capacity(rows.len());
                for row in &rows {
                    let seq: i64 = row.try_get(0)?;
                    let mut m = Zeroizing::new(row.try_get::<_, Vec<u8>>(1)?);
                    if m.len() != UNIT_BYTES {
                        return Err(corrupt("unit length").into());
                    }
                    c.apply(u64_of(seq)?, 0, &mut m);
                    seqs.push(seq);
                    material.push(m);
                }
                let refs: Vec<&[u8]> = material.iter().map(|m| &m[..]).collect();
                tx.execute(
                    "UPDATE units SET material = t.m
                     FROM unnest($1::bigint[], $2::bytea[]) AS t(s, m) WHERE units.seq = t.s",
                    &[&seqs, &refs],
                )
                .await?;
                let name = cipher::CIPHER_NAME.as_bytes();
                tx.execute(
                    "INSERT INTO meta(k, v) VALUES ('cipher', $1), ('salt', $2), ('check', $3)",
                    &[&name, &record.salt, &record.check],
                )
                .await?;
                tracing::info!(%schema, units = seqs.len(), "key material encrypted under the node master key");
                Some(c)
            }
        };
        tx.commit().await?;
        Ok(cipher)
    }
}

/// Runs `op`, retrying conflicts with a short growing pause.
async fn execute<O: Op>(pool: &Arc<Pool>, op: &O) -> Result<O::Out, StoreError> {
    let mut attempt = 1;
    loop {
        let mut lease = pool.get().await?;
        match lease.transact(op).await {
            Ok(v) => return Ok(v),
            Err(OpError::Store(e)) => return Err(e),
            Err(OpError::Retry) if attempt < MAX_ATTEMPTS => {}
            Err(OpError::Pg(e)) if retryable(&e) && attempt < MAX_ATTEMPTS => {}
            Err(OpError::Retry) => {
                return Err(StoreError::Backend(format!(
                    "gave up after {MAX_ATTEMPTS} conflicting attempts"
                )));
            }
            Err(OpError::Pg(e)) => {
                if e.as_db_error().is_none() {
                    // I/O or protocol trouble: do not hand this connection out again.
                    lease.discard();
                }
                return Err(pg_backend(&e));
            }
        }
        drop(lease);
        tracing::debug!(attempt, "store transaction conflicted; retrying");
        tokio::time::sleep(Duration::from_millis(1 << attempt.min(6))).await;
        attempt += 1;
    }
}

/// Conflicts that a new attempt resolves: serialization failure, deadlock, and a
/// unique key inserted concurrently (the next attempt sees the row and answers as
/// if it had come second).
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    })
}

/// A backend error message: the server's message and SQLSTATE, never its DETAIL
/// (which can quote row values).
fn pg_backend(e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Backend(format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        )),
        None => StoreError::Backend(format!("PostgreSQL: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Operations

enum OpError {
    /// The operation's answer (the transaction is rolled back).
    Store(StoreError),
    /// The database failed or conflicted.
    Pg(tokio_postgres::Error),
    /// The rows locked turned out not to be the ones needed; start over.
    Retry,
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::Store(e)
    }
}

impl From<tokio_postgres::Error> for OpError {
    fn from(e: tokio_postgres::Error) -> Self {
        OpError::Pg(e)
    }
}

/// An open transaction and the connection's statement cache.
struct Ctx<'a> {
    tx: Transaction<'a>,
    stmts: &'a mut HashMap<&'static str, Statement>,
    /// The store's unit cipher (`None`: material in the clear).
    cipher: Option<&'a UnitCipher>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Ctx<'_> {
    async fn stmt(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).await?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    async fn query(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let s = self.stmt(sql).await?;
        self.tx.query(&s, params).await
    }

    async fn query_opt(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let s = self.stmt(sql).await?;
        self.tx.query_opt(&s, params).await
    }

    async fn execute(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        let s = self.stmt(sql).await?;
        self.tx.execute(&s, params).await
    }
}

/// One store operation, run in one transaction (possibly several times).
trait Op: Send + Sync + 'static {
    type Out: Send + 'static;
    /// Reads only: one `REPEATABLE READ READ ONLY` snapshot.
    const READ_ONLY: bool = false;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<Self::Out, OpError>> + Send + 'c;
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend("value exceeds i64".into()))
}

fn i32_of_size(size_bits: u32) -> Result<i32, StoreError> {
    i32::try_from(size_bits).map_err(|_| StoreError::InvalidLayout("key size too large"))
}

fn u32_of_size(size_bits: i32) -> Result<u32, StoreError> {
    u32::try_from(size_bits).map_err(|_| StoreError::Backend("corrupt key size in store".into()))
}

fn u64_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt("negative value"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt key store: {what}"))
}

fn count_of(v: i64) -> u64 {
    v.max(0) as u64
}

/// Locks `peer`'s pool row (creating it if needed); returns (total, mine_available).
async fn lock_pool(cx: &mut Ctx<'_>, peer: &str) -> Result<(i64, i64), OpError> {
    const LOCK: &str = "SELECT total, mine_available FROM pools WHERE peer = $1 FOR UPDATE";
    if let Some(row) = cx.query_opt(LOCK, &[&peer]).await? {
        return Ok((row.try_get(0)?, row.try_get(1)?));
    }
    cx.execute(
        "INSERT INTO pools(peer, total, mine_available) VALUES ($1, 0, 0) ON CONFLICT (peer) DO NOTHING",
        &[&peer],
    )
    .await?;
    match cx.query_opt(LOCK, &[&peer]).await? {
        Some(row) => Ok((row.try_get(0)?, row.try_get(1)?)),
        None => Err(OpError::Retry),
    }
}

/// Adds to a peer's pool counters (its row is locked).
async fn bump(cx: &mut Ctx<'_>, peer: &str, d_total: i64, d_mine: i64) -> Result<(), OpError> {
    if d_total == 0 && d_mine == 0 {
        return Ok(());
    }
    cx.execute(
        "UPDATE pools SET total = total + $2, mine_available = mine_available + $3 WHERE peer = $1",
        &[&peer, &d_total, &d_mine],
    )
    .await?;
    Ok(())
}

/// (role, peer, state, voided key IDs) of a request.
struct RequestRow {
    role: i16,
    peer: String,
    state: i16,
    voided: Option<Vec<Uuid>>,
}

async fn request_row(cx: &mut Ctx<'_>, id: &Uuid) -> Result<Option<RequestRow>, OpError> {
    let row = cx
        .query_opt(
            "SELECT role, peer, state, voided FROM requests WHERE request_id = $1",
            &[id],
        )
        .await?;
    Ok(match row {
        None => None,
        Some(r) => Some(RequestRow {
            role: r.try_get(0)?,
            peer: r.try_get(1)?,
            state: r.try_get(2)?,
            voided: r.try_get(3)?,
        }),
    })
}

/// Locks the pool of request `id` and returns its row (read after the lock).
async fn locked_request(cx: &mut Ctx<'_>, id: &Uuid) -> Result<Option<RequestRow>, OpError> {
    let Some(first) = request_row(cx, id).await? else {
        return Ok(None);
    };
    lock_pool(cx, &first.peer).await?;
    // A request's peer never changes; its state may have.
    request_row(cx, id).await
}

/// The peer of a pending master-side request, its pool locked.
async fn master_pending(cx: &mut Ctx<'_>, id: &Uuid) -> Result<String, OpError> {
    match locked_request(cx, id).await? {
        Some(RequestRow {
            role: ROLE_MASTER,
            peer,
            state: REQ_PENDING,
            ..
        }) => Ok(peer),
        _ => Err(StoreError::RequestConflict.into()),
    }
}

struct Ingest(IngestBatch);

impl Op for Ingest {
    type Out = u64;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<u64, OpError>> + Send + 'c {
        ingest_op(cx, &self.0)
    }
}

async fn ingest_op(cx: &mut Ctx<'_>, b: &IngestBatch) -> Result<u64, OpError> {
    let peer = b.peer.as_str();
    let (total, _) = lock_pool(cx, peer).await?;
    let block_number = i64_of(b.block_number)?;
    let seen = cx
        .query_opt(
            "SELECT 1 FROM blocks WHERE link_id = $1 AND block_number = $2",
            &[&b.link_id, &block_number],
        )
        .await?;
    if seen.is_some() {
        return Err(StoreError::DuplicateBlock.into());
    }
    let n = b.units.len() as u64;
    if count_of(total).saturating_add(n) > b.capacity_units {
        return Err(StoreError::PoolFull {
            capacity_units: b.capacity_units,
        }
        .into());
    }
    cx.execute(
        "INSERT INTO blocks(link_id, block_number, peer, units, eps_sec, eps_cor, created_ms) VALUES ($1,$2,$3,$4,$5,$6,$7)",
        &[
            &b.link_id,
            &block_number,
            &peer,
            &i64_of(n)?,
            &b.eps_sec,
            &b.eps_cor,
            &i64_of(b.created_unix_ms)?,
        ],
    )
    .await?;
    let ids: Vec<Uuid> = b.units.iter().map(|u| u.id).collect();
    let mine: Vec<bool> = b.units.iter().map(|u| u.mine).collect();
    // Each unit's `seq` is drawn first: it is the unit's place in the cipher.
    let mut seqs: Vec<i64> = cx
        .query(
            "SELECT nextval(pg_get_serial_sequence('units', 'seq')) FROM generate_series(1, $1::bigint)",
            &[&i64_of(n)?],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    seqs.sort_unstable();
    if seqs.len() != b.units.len() {
        return Err(StoreError::Backend("sequence returned too few values".into()).into());
    }
    let mut material: Vec<Zeroizing<[u8; UNIT_BYTES]>> =
        b.units.iter().map(|u| u.material.clone()).collect();
    if let Some(cipher) = cx.cipher {
        for (m, seq) in material.iter_mut().zip(&seqs) {
            cipher.apply(u64_of(*seq)?, 0, &mut m[..]);
        }
    }
    let material: Vec<&[u8]> = material.iter().map(|m| &m[..]).collect();
    let inserted = cx
        .execute(
            "INSERT INTO units(seq, uid, peer, mine, material) OVERRIDING SYSTEM VALUE
             SELECT t.seq, t.uid, $2, t.mine, t.material
             FROM unnest($5::bigint[], $1::uuid[], $3::bool[], $4::bytea[])
                 WITH ORDINALITY AS t(seq, uid, mine, material, i)
             ORDER BY t.i",
            &[&ids, &peer, &mine, &material, &seqs],
        )
        .await;
    match inserted {
        // A unit ID collision means the same block content under another number.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(StoreError::DuplicateBlock.into());
        }
        r => r?,
    };
    let n_mine = mine.iter().filter(|m| **m).count() as u64;
    bump(cx, peer, i64_of(n)?, i64_of(n_mine)?).await?;
    // Answered requests of this pool (locked already) past their replay window
    // lose their kept keys.
    let cutoff = i64_of(b.created_unix_ms.saturating_sub(REPLAY_WINDOW_MS))?;
    let expired = cx
        .query(
            "SELECT request_id FROM requests WHERE state = 5 AND peer = $1 AND created_ms < $2 LIMIT $3",
            &[&peer, &cutoff, &EXPIRE_LIMIT],
        )
        .await?;
    for row in &expired {
        consume_request(cx, &row.try_get(0)?, peer).await?;
    }
    Ok(n)
}

struct Counts(KmeId);

impl Op for Counts {
    type Out = PoolCounts;
    const READ_ONLY: bool = true;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<PoolCounts, OpError>> + Send + 'c {
        counts_op(cx, &self.0)
    }
}

async fn counts_op(cx: &mut Ctx<'_>, peer: &KmeId) -> Result<PoolCounts, OpError> {
    let row = cx
        .query_opt(
            "SELECT total, mine_available FROM pools WHERE peer = $1",
            &[&peer.as_str()],
        )
        .await?;
    let (total, mine): (i64, i64) = match row {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, 0),
    };
    Ok(PoolCounts {
        mine_available: count_of(mine),
        total_units: count_of(total),
    })
}

struct Reserve(Reservation);

impl Op for Reserve {
    type Out = Vec<ReservedKey>;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<Vec<ReservedKey>, OpError>> + Send + 'c {
        reserve_op(cx, &self.0)
    }
}

async fn reserve_op(cx: &mut Ctx<'_>, r: &Reservation) -> Result<Vec<ReservedKey>, OpError> {
    let peer = r.peer.as_str();
    let (_, mine_available) = lock_pool(cx, peer).await?;
    if request_row(cx, &r.request_id).await?.is_some() {
        return Err(StoreError::RequestConflict.into());
    }
    let per_key = units_for_bits(r.size_bits) as usize;
    let key_bytes = (r.size_bits / 8) as usize;
    let need = per_key * r.number as usize;
    if need == 0 {
        return Err(StoreError::InvalidLayout("empty reservation").into());
    }
    let size_bits = i32_of_size(r.size_bits)?;
    let rows = cx
        .query(
            "SELECT seq, uid, material FROM units WHERE peer = $1 AND mine AND key_id IS NULL
             ORDER BY seq LIMIT $2 FOR UPDATE",
            &[&peer, &i64_of(need as u64)?],
        )
        .await?;
    if rows.len() < need {
        return Err(StoreError::Exhausted {
            available: count_of(mine_available),
            requested: need as u64,
        }
        .into());
    }
    let mut seqs = Vec::with_capacity(need);
    let mut unit_keys = Vec::with_capacity(need);
    let mut positions = Vec::with_capacity(need);
    let mut key_ids = Vec::with_capacity(r.number as usize);
    let mut out = Vec::with_capacity(r.number as usize);
    for chunk in rows.chunks(per_key) {
        let key_id: Uuid = chunk[0].try_get(1)?;
        let mut material = Zeroizing::new(Vec::with_capacity(per_key * UNIT_BYTES));
        let mut unit_ids = Vec::with_capacity(per_key);
        for (pos, row) in chunk.iter().enumerate() {
            let m: &[u8] = row.try_get(2)?;
            if m.len() != UNIT_BYTES {
                return Err(StoreError::Backend("corrupt unit in store".into()).into());
            }
            let seq = row.try_get::<_, i64>(0)?;
            let at = material.len();
            material.extend_from_slice(m);
            if let Some(cipher) = cx.cipher {
                cipher.apply(u64_of(seq)?, 0, &mut material[at..]);
            }
            seqs.push(seq);
            unit_ids.push(row.try_get::<_, Uuid>(1)?);
            unit_keys.push(key_id);
            positions.push(pos as i32);
        }
        material.truncate(key_bytes);
        key_ids.push(key_id);
        out.push(ReservedKey {
            layout: KeyLayout {
                key_id,
                size_bits: r.size_bits,
                unit_ids,
            },
            material,
        });
    }
    cx.execute(
        "UPDATE units SET key_id = t.k, pos = t.p
         FROM unnest($1::bigint[], $2::uuid[], $3::int[]) AS t(s, k, p) WHERE units.seq = t.s",
        &[&seqs, &unit_keys, &positions],
    )
    .await?;
    let now = i64_of(r.now_unix_ms)?;
    cx.execute(
        "INSERT INTO keys(key_id, request_id, role, peer, master, slave, size_bits, created_ms)
         SELECT t.k, $2, $3, $4, $5, $6, $7, $8
         FROM unnest($1::uuid[]) WITH ORDINALITY AS t(k, i) ORDER BY t.i",
        &[
            &key_ids,
            &r.request_id,
            &ROLE_MASTER,
            &peer,
            &r.master.as_str(),
            &r.slave.as_str(),
            &size_bits,
            &now,
        ],
    )
    .await?;
    let route = r.void_route.as_ref().map(VoidRoute::encode);
    cx.execute(
        "INSERT INTO requests(request_id, role, peer, state, created_ms, void_route, replay_key)
         VALUES ($1,$2,$3,$4,$5,$6,$7)",
        &[
            &r.request_id,
            &ROLE_MASTER,
            &peer,
            &REQ_PENDING,
            &now,
            &route,
            &r.replay_key,
        ],
    )
    .await?;
    bump(cx, peer, 0, -i64_of(need as u64)?).await?;
    Ok(out)
}

struct Confirm(Uuid);

impl Op for Confirm {
    type Out = ();
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<(), OpError>> + Send + 'c {
        confirm_op(cx, &self.0)
    }
}

async fn confirm_op(cx: &mut Ctx<'_>, rid: &Uuid) -> Result<(), OpError> {
    let peer = master_pending(cx, rid).await?;
    consume_request(cx, rid, &peer).await
}

/// Deletes the units of master-side request `rid` (its pool `peer` locked) and
/// marks it delivered: a confirmation, a replay, an expired answer.
async fn consume_request(cx: &mut Ctx<'_>, rid: &Uuid, peer: &str) -> Result<(), OpError> {
    let n = cx
        .execute(
            "DELETE FROM units WHERE key_id IN (SELECT key_id FROM keys WHERE request_id = $1)",
            &[rid],
        )
        .await?;
    bump(cx, peer, -i64_of(n)?, 0).await?;
    // The key rows stay, without material, as a record of which SAE pair
    // the key went to (a later dec_keys for it here is then answered 401).
    cx.execute(
        "UPDATE keys SET delivered = TRUE WHERE request_id = $1",
        &[rid],
    )
    .await?;
    cx.execute(
        "UPDATE requests SET state = $2 WHERE request_id = $1",
        &[rid, &REQ_DELIVERED],
    )
    .await?;
    Ok(())
}

struct Answer(Vec<Uuid>);

impl Op for Answer {
    type Out = ();
    async fn run<'c>(&'c self, cx: &'c mut Ctx<'_>) -> Result<(), OpError> {
        for rid in &self.0 {
            master_pending(cx, rid).await?;
            cx.execute(
                "UPDATE requests SET state = $2 WHERE request_id = $1",
                &[rid, &REQ_ANSWERED],
            )
            .await?;
        }
        Ok(())
    }
}

struct ReplayOp(ReplayRequest);

impl Op for ReplayOp {
    type Out = Replay;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<Replay, OpError>> + Send + 'c {
        replay_op(cx, &self.0)
    }
}

/// The requests under a replay key that were not voided, their pools locked
/// (sorted, as in `take_op`), then read again under the locks.
async fn replay_rows(cx: &mut Ctx<'_>, key: &Uuid) -> Result<Vec<Row>, OpError> {
    const ROWS: &str = "SELECT request_id, role, peer, state, created_ms FROM requests
        WHERE replay_key = $1 AND state <> 2";
    let first = cx.query(ROWS, &[key]).await?;
    let mut peers = BTreeSet::new();
    for r in &first {
        peers.insert(r.try_get::<_, String>(2)?);
    }
    for p in &peers {
        lock_pool(cx, p).await?;
    }
    let rows = cx.query(ROWS, &[key]).await?;
    for r in &rows {
        if !peers.contains(&r.try_get::<_, String>(2)?) {
            return Err(OpError::Retry);
        }
    }
    Ok(rows)
}

async fn replay_op(cx: &mut Ctx<'_>, r: &ReplayRequest) -> Result<Replay, OpError> {
    let rows = replay_rows(cx, &r.replay_key).await?;
    if rows.is_empty() {
        return Ok(Replay::Unknown);
    }
    let size_bits = i32_of_size(r.size_bits)?;
    // (first key's order, request ID, peer, created) of each answered request.
    let (mut answered, mut pending, mut spent) = (Vec::new(), false, false);
    for row in &rows {
        let rid: Uuid = row.try_get(0)?;
        let keys = cx
            .query(
                "SELECT master, slave, size_bits, ord FROM keys WHERE request_id = $1 ORDER BY ord",
                &[&rid],
            )
            .await?;
        let role: i16 = row.try_get(1)?;
        let mismatch = role != ROLE_MASTER
            || keys.len() != r.number as usize
            || keys.iter().any(|k| {
                k.try_get::<_, &str>(0).ok() != Some(r.master.as_str())
                    || k.try_get::<_, &str>(1).ok() != Some(r.slave.as_str())
                    || k.try_get::<_, i32>(2).ok() != Some(size_bits)
            });
        let state: i16 = row.try_get(3)?;
        match state {
            _ if mismatch && !keys.is_empty() => return Ok(Replay::Mismatch),
            REQ_PENDING => pending = true,
            REQ_ANSWERED if !mismatch => {
                let ord: i64 = keys[0].try_get(3)?;
                let created: i64 = row.try_get(4)?;
                answered.push((ord, rid, row.try_get::<_, String>(2)?, created));
            }
            _ => spent = true,
        }
    }
    if let Some(outcome) = Replay::unless_answered(spent, pending, !answered.is_empty()) {
        return Ok(outcome);
    }
    answered.sort_by_key(|a| a.0);
    let expired = answered.iter().any(|a| {
        u64::try_from(a.3).map_or(true, |c| c.saturating_add(REPLAY_WINDOW_MS) < r.now_unix_ms)
    });
    let key_bytes = (r.size_bits / 8) as usize;
    let mut shares = Vec::with_capacity(answered.len());
    for (_, rid, peer, _) in &answered {
        if !expired {
            shares.push(answered_keys(cx, rid, key_bytes).await?);
        }
        consume_request(cx, rid, peer).await?;
    }
    Ok(if expired {
        Replay::Spent
    } else {
        Replay::Keys(shares)
    })
}

/// The keys (with their material) of answered request `rid`, in key order.
async fn answered_keys(
    cx: &mut Ctx<'_>,
    rid: &Uuid,
    key_bytes: usize,
) -> Result<Vec<DeliveredKey>, OpError> {
    let units = cx
        .query(
            "SELECT k.key_id, u.material, u.seq FROM keys k JOIN units u ON u.key_id = k.key_id
             WHERE k.request_id = $1 ORDER BY k.ord, u.pos",
            &[rid],
        )
        .await?;
    let mut out: Vec<DeliveredKey> = Vec::new();
    for row in &units {
        let kid: Uuid = row.try_get(0)?;
        let m: &[u8] = row.try_get(1)?;
        if m.len() != UNIT_BYTES {
            return Err(StoreError::Backend("corrupt unit in store".into()).into());
        }
        if out.last().is_none_or(|k| k.key_id != kid) {
            out.push(DeliveredKey {
                key_id: kid,
                material: Zeroizing::new(Vec::with_capacity(
                    key_bytes.div_ceil(UNIT_BYTES) * UNIT_BYTES,
                )),
            });
        }
        let Some(key) = out.last_mut() else {
            return Err(corrupt("replayed key").into());
        };
        let at = key.material.len();
        key.material.extend_from_slice(m);
        if let Some(cipher) = cx.cipher {
            cipher.apply(u64_of(row.try_get(2)?)?, 0, &mut key.material[at..]);
        }
    }
    for k in &mut out {
        if k.material.len() < key_bytes {
            return Err(StoreError::Backend("key units missing in store".into()).into());
        }
        k.material.truncate(key_bytes);
    }
    Ok(out)
}

struct Release(Uuid, Vec<Uuid>);

impl Op for Release {
    type Out = ();
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<(), OpError>> + Send + 'c {
        release_op(cx, &self.0, &self.1)
    }
}

async fn release_op(cx: &mut Ctx<'_>, rid: &Uuid, discard: &[Uuid]) -> Result<(), OpError> {
    let peer = master_pending(cx, rid).await?;
    let discarded = cx
        .execute(
            "DELETE FROM units WHERE uid = ANY($1)
                 AND key_id IN (SELECT key_id FROM keys WHERE request_id = $2)",
            &[&discard, rid],
        )
        .await?;
    let returned = cx
        .execute(
            "UPDATE units SET key_id = NULL, pos = NULL
                 WHERE key_id IN (SELECT key_id FROM keys WHERE request_id = $1)",
            &[rid],
        )
        .await?;
    bump(cx, &peer, -i64_of(discarded)?, i64_of(returned)?).await?;
    cx.execute("DELETE FROM keys WHERE request_id = $1", &[rid])
        .await?;
    cx.execute(
        "UPDATE requests SET state = $2 WHERE request_id = $1",
        &[rid, &REQ_VOIDED],
    )
    .await?;
    Ok(())
}

struct Pending;

impl Op for Pending {
    type Out = Vec<PendingRequest>;
    const READ_ONLY: bool = true;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<Vec<PendingRequest>, OpError>> + Send + 'c {
        pending_op(cx)
    }
}

async fn pending_op(cx: &mut Ctx<'_>) -> Result<Vec<PendingRequest>, OpError> {
    let rows = cx
        .query(
            "SELECT r.request_id, r.peer, k.key_id, k.size_bits, u.uid, r.void_route
             FROM requests r
             LEFT JOIN keys k ON k.request_id = r.request_id
             LEFT JOIN units u ON u.key_id = k.key_id
             WHERE r.role = $1 AND r.state = $2
             ORDER BY r.created_ms, r.request_id, k.ord, u.pos",
            &[&ROLE_MASTER, &REQ_PENDING],
        )
        .await?;
    let mut out: Vec<PendingRequest> = Vec::new();
    for row in &rows {
        let request_id: Uuid = row.try_get(0)?;
        if out.last().is_none_or(|p| p.request_id != request_id) {
            let peer: String = row.try_get(1)?;
            let peer = KmeId::new(&peer)
                .map_err(|_| StoreError::Backend("corrupt peer ID in store".into()))?;
            out.push(PendingRequest {
                request_id,
                peer,
                keys: Vec::new(),
                void_route: match row.try_get::<_, Option<String>>(5)? {
                    Some(v) => Some(VoidRoute::decode(&v)?),
                    None => None,
                },
            });
        }
        let Some(p) = out.last_mut() else { continue };
        let Some(key_id) = row.try_get::<_, Option<Uuid>>(2)? else {
            continue;
        };
        if p.keys.last().is_none_or(|k| k.key_id != key_id) {
            let size_bits: i32 = row.try_get(3)?;
            p.keys.push(KeyLayout {
                key_id,
                size_bits: u32_of_size(size_bits)?,
                unit_ids: Vec::new(),
            });
        }
        if let (Some(k), Some(uid)) = (p.keys.last_mut(), row.try_get::<_, Option<Uuid>>(4)?) {
            k.unit_ids.push(uid);
        }
    }
    Ok(out)
}

struct Accept(Acceptance);

impl Op for Accept {
    type Out = AcceptOutcome;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<AcceptOutcome, OpError>> + Send + 'c {
        accept_op(cx, &self.0)
    }
}

async fn accept_op(cx: &mut Ctx<'_>, a: &Acceptance) -> Result<AcceptOutcome, OpError> {
    let peer = a.peer.as_str();
    lock_pool(cx, peer).await?;
    match request_row(cx, &a.request_id).await? {
        None => {}
        Some(RequestRow {
            role: ROLE_SLAVE,
            peer: p,
            state: REQ_ACCEPTED,
            ..
        }) if p == peer => return Ok(AcceptOutcome::AlreadyAccepted),
        Some(RequestRow {
            role: ROLE_SLAVE,
            peer: p,
            state: REQ_VOIDED,
            ..
        }) if p == peer => return Err(StoreError::RequestVoided.into()),
        Some(_) => return Err(StoreError::RequestConflict.into()),
    }
    if a.keys.is_empty() {
        return Err(StoreError::InvalidLayout("no keys").into());
    }
    // The layout checks of the SQLite store, in its order.
    let mut seen = HashSet::new();
    let mut all_units = Vec::new();
    let mut unit_keys = Vec::new();
    let mut positions = Vec::new();
    let mut key_ids = Vec::with_capacity(a.keys.len());
    let mut sizes = Vec::with_capacity(a.keys.len());
    for k in &a.keys {
        if k.size_bits == 0 || k.size_bits % 8 != 0 {
            return Err(StoreError::InvalidLayout("size not a positive multiple of 8").into());
        }
        if k.unit_ids.len() != units_for_bits(k.size_bits) as usize {
            return Err(StoreError::InvalidLayout("unit count does not match size").into());
        }
        if k.unit_ids.first() != Some(&k.key_id) {
            return Err(StoreError::InvalidLayout("key ID is not the first unit's ID").into());
        }
        for (pos, u) in k.unit_ids.iter().enumerate() {
            if !seen.insert(*u) {
                return Err(StoreError::InvalidLayout("unit listed twice").into());
            }
            all_units.push(*u);
            unit_keys.push(k.key_id);
            positions
                .push(i32::try_from(pos).map_err(|_| StoreError::InvalidLayout("key too large"))?);
        }
        key_ids.push(k.key_id);
        sizes.push(i32_of_size(k.size_bits)?);
    }
    let rows = cx
        .query(
            "SELECT uid, mine, key_id IS NULL FROM units WHERE uid = ANY($1) AND peer = $2 FOR UPDATE",
            &[&all_units, &peer],
        )
        .await?;
    let mut state = HashMap::with_capacity(rows.len());
    for row in &rows {
        let uid: Uuid = row.try_get(0)?;
        let mine: bool = row.try_get(1)?;
        let free: bool = row.try_get(2)?;
        state.insert(uid, (mine, free));
    }
    // Only the peer's own units (mine = false here), still available.
    let unavailable: Vec<Uuid> = all_units
        .iter()
        .filter(|u| state.get(*u) != Some(&(false, true)))
        .copied()
        .collect();
    if !unavailable.is_empty() {
        return Err(StoreError::UnitsUnavailable(unavailable).into());
    }
    cx.execute(
        "UPDATE units SET key_id = t.k, pos = t.p
         FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS t(u, k, p) WHERE units.uid = t.u",
        &[&all_units, &unit_keys, &positions],
    )
    .await?;
    let now = i64_of(a.now_unix_ms)?;
    cx.execute(
        "INSERT INTO keys(key_id, request_id, role, peer, master, slave, size_bits, created_ms)
         SELECT t.k, $3, $4, $5, $6, $7, t.s, $8
         FROM unnest($1::uuid[], $2::int[]) WITH ORDINALITY AS t(k, s, i) ORDER BY t.i",
        &[
            &key_ids,
            &sizes,
            &a.request_id,
            &ROLE_SLAVE,
            &peer,
            &a.master.as_str(),
            &a.slave.as_str(),
            &now,
        ],
    )
    .await?;
    cx.execute(
        "INSERT INTO requests(request_id, role, peer, state, created_ms) VALUES ($1,$2,$3,$4,$5)",
        &[&a.request_id, &ROLE_SLAVE, &peer, &REQ_ACCEPTED, &now],
    )
    .await?;
    Ok(AcceptOutcome::Accepted)
}

struct Void(KmeId, Uuid, u64);

impl Op for Void {
    type Out = VoidOutcome;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<VoidOutcome, OpError>> + Send + 'c {
        void_op(cx, self.0.as_str(), &self.1, self.2)
    }
}

async fn void_op(
    cx: &mut Ctx<'_>,
    peer: &str,
    rid: &Uuid,
    now_unix_ms: u64,
) -> Result<VoidOutcome, OpError> {
    lock_pool(cx, peer).await?;
    match request_row(cx, rid).await? {
        None => {
            cx.execute(
                "INSERT INTO requests(request_id, role, peer, state, voided, created_ms) VALUES ($1,$2,$3,$4,NULL,$5)",
                &[rid, &ROLE_SLAVE, &peer, &REQ_VOIDED, &i64_of(now_unix_ms)?],
            )
            .await?;
            Ok(VoidOutcome {
                was_accepted: false,
                voided_keys: Vec::new(),
            })
        }
        Some(RequestRow {
            role: ROLE_SLAVE,
            peer: p,
            state: REQ_VOIDED,
            voided,
        }) if p == peer => {
            // Idempotent: answer what the first void answered.
            Ok(VoidOutcome {
                was_accepted: voided.is_some(),
                voided_keys: voided.unwrap_or_default(),
            })
        }
        Some(RequestRow {
            role: ROLE_SLAVE,
            peer: p,
            state: REQ_ACCEPTED,
            ..
        }) if p == peer => {
            let rows = cx
                .query(
                    "SELECT key_id FROM keys WHERE request_id = $1 ORDER BY ord",
                    &[rid],
                )
                .await?;
            let ids = rows
                .iter()
                .map(|r| r.try_get::<_, Uuid>(0))
                .collect::<Result<Vec<_>, _>>()?;
            cx.execute(
                "UPDATE units SET key_id = NULL, pos = NULL
                 WHERE key_id IN (SELECT key_id FROM keys WHERE request_id = $1)",
                &[rid],
            )
            .await?;
            cx.execute("DELETE FROM keys WHERE request_id = $1", &[rid])
                .await?;
            cx.execute(
                "UPDATE requests SET state = $2, voided = $3 WHERE request_id = $1",
                &[rid, &REQ_VOIDED, &ids],
            )
            .await?;
            Ok(VoidOutcome {
                was_accepted: true,
                voided_keys: ids,
            })
        }
        Some(_) => Err(StoreError::RequestConflict.into()),
    }
}

struct AcceptTake(Acceptance);

impl Op for AcceptTake {
    type Out = Vec<DeliveredKey>;
    async fn run<'c>(&'c self, cx: &'c mut Ctx<'_>) -> Result<Vec<DeliveredKey>, OpError> {
        let a = &self.0;
        accept_op(cx, a).await?;
        let ids: Vec<Uuid> = a.keys.iter().map(|k| k.key_id).collect();
        take_op(cx, &a.slave, &a.master, &ids).await
    }
}

struct Take(SaeId, SaeId, Vec<Uuid>);

impl Op for Take {
    type Out = Vec<DeliveredKey>;
    fn run<'c>(
        &'c self,
        cx: &'c mut Ctx<'_>,
    ) -> impl Future<Output = Result<Vec<DeliveredKey>, OpError>> + Send + 'c {
        take_op(cx, &self.0, &self.1, &self.2)
    }
}

/// (master, slave, size_bits, role, delivered, peer) of a key.
type KeyRow = (String, String, i32, i16, bool, String);

async fn take_op(
    cx: &mut Ctx<'_>,
    caller: &SaeId,
    master: &SaeId,
    key_ids: &[Uuid],
) -> Result<Vec<DeliveredKey>, OpError> {
    if key_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Lock the pools of the keys (sorted, so two takes cannot deadlock), then read
    // the keys again under the locks.
    let peers = cx
        .query(
            "SELECT DISTINCT peer FROM keys WHERE key_id = ANY($1) ORDER BY peer",
            &[&key_ids],
        )
        .await?;
    let mut locked = BTreeSet::new();
    for row in &peers {
        locked.insert(row.try_get::<_, String>(0)?);
    }
    for p in &locked {
        lock_pool(cx, p).await?;
    }
    let rows = cx
        .query(
            "SELECT key_id, master, slave, size_bits, role, delivered, peer FROM keys WHERE key_id = ANY($1)",
            &[&key_ids],
        )
        .await?;
    let mut found: HashMap<Uuid, KeyRow> = HashMap::with_capacity(rows.len());
    for r in &rows {
        found.insert(
            r.try_get(0)?,
            (
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
                r.try_get(5)?,
                r.try_get(6)?,
            ),
        );
    }
    let mut not_found = false;
    let mut unauthorized = false;
    let mut sizes = Vec::with_capacity(key_ids.len());
    for id in key_ids {
        match found.get(id) {
            None => not_found = true,
            Some((_, _, _, _, _, p)) if !locked.contains(p) => return Err(OpError::Retry),
            // A key this KME reserved as master: its slave is at the peer KME, so
            // nobody may take it here.
            Some((_, _, _, ROLE_MASTER, _, _)) => unauthorized = true,
            Some((_, _, _, _, true, _)) => not_found = true,
            Some((m, s, size, _, false, _)) => {
                if m != master.as_str() || s != caller.as_str() {
                    unauthorized = true;
                }
                sizes.push(u32_of_size(*size)?);
            }
        }
    }
    if unauthorized {
        return Err(StoreError::NotAuthorized.into());
    }
    if not_found {
        return Err(StoreError::KeysNotFound.into());
    }
    if key_ids.iter().collect::<HashSet<_>>().len() != key_ids.len() {
        // SQLite fails the same request (the second copy finds its units gone).
        return Err(StoreError::Backend("key ID listed twice".into()).into());
    }
    let units = cx
        .query(
            "SELECT key_id, material, seq FROM units WHERE key_id = ANY($1) ORDER BY key_id, pos",
            &[&key_ids],
        )
        .await?;
    let mut material: HashMap<Uuid, Zeroizing<Vec<u8>>> = HashMap::with_capacity(key_ids.len());
    for row in &units {
        let kid: Uuid = row.try_get(0)?;
        let m: &[u8] = row.try_get(1)?;
        if m.len() != UNIT_BYTES {
            return Err(StoreError::Backend("corrupt unit in store".into()).into());
        }
        let out = material
            .entry(kid)
            .or_insert_with(|| Zeroizing::new(Vec::new()));
        let at = out.len();
        out.extend_from_slice(m);
        if let Some(cipher) = cx.cipher {
            cipher.apply(u64_of(row.try_get(2)?)?, 0, &mut out[at..]);
        }
    }
    let mut out = Vec::with_capacity(key_ids.len());
    for (id, size) in key_ids.iter().zip(sizes) {
        let mut m = material
            .remove(id)
            .unwrap_or_else(|| Zeroizing::new(Vec::new()));
        if m.len() < (size / 8) as usize {
            return Err(StoreError::Backend("key units missing in store".into()).into());
        }
        m.truncate((size / 8) as usize);
        out.push(DeliveredKey {
            key_id: *id,
            material: m,
        });
    }
    let deleted = cx
        .query(
            "WITH d AS (DELETE FROM units WHERE key_id = ANY($1) RETURNING peer)
             SELECT peer, count(*) FROM d GROUP BY peer",
            &[&key_ids],
        )
        .await?;
    for row in &deleted {
        let peer: String = row.try_get(0)?;
        let n: i64 = row.try_get(1)?;
        bump(cx, &peer, -n, 0).await?;
    }
    cx.execute("DELETE FROM keys WHERE key_id = ANY($1)", &[&key_ids])
        .await?;
    Ok(out)
}

impl KeyStore for PostgresStore {
    fn ingest(&self, batch: IngestBatch) -> StoreFuture<'_, u64> {
        self.submit(Ingest(batch))
    }

    fn pool_counts(&self, peer: KmeId) -> StoreFuture<'_, PoolCounts> {
        self.submit(Counts(peer))
    }

    fn reserve(&self, r: Reservation) -> StoreFuture<'_, Vec<ReservedKey>> {
        self.submit(Reserve(r))
    }

    fn confirm(&self, request_id: Uuid) -> StoreFuture<'_, ()> {
        self.submit(Confirm(request_id))
    }

    fn release(&self, request_id: Uuid, discard: Vec<Uuid>) -> StoreFuture<'_, ()> {
        self.submit(Release(request_id, discard))
    }

    fn pending(&self) -> StoreFuture<'_, Vec<PendingRequest>> {
        self.submit(Pending)
    }

    fn accept(&self, a: Acceptance) -> StoreFuture<'_, AcceptOutcome> {
        self.submit(Accept(a))
    }

    fn accept_take(&self, a: Acceptance) -> StoreFuture<'_, Vec<DeliveredKey>> {
        self.submit(AcceptTake(a))
    }

    fn void(
        &self,
        peer: KmeId,
        request_id: Uuid,
        now_unix_ms: u64,
    ) -> StoreFuture<'_, VoidOutcome> {
        self.submit(Void(peer, request_id, now_unix_ms))
    }

    fn take(
        &self,
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<Uuid>,
    ) -> StoreFuture<'_, Vec<DeliveredKey>> {
        self.submit(Take(caller, master, key_ids))
    }

    fn keeps_replies(&self) -> bool {
        true
    }

    fn answer(&self, request_ids: Vec<Uuid>) -> StoreFuture<'_, ()> {
        self.submit(Answer(request_ids))
    }

    fn replay(&self, r: ReplayRequest) -> StoreFuture<'_, Replay> {
        self.submit(ReplayOp(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_restricted() {
        assert!(SchemaName::new("kms_kme-a").is_ok());
        assert!(SchemaName::new("").is_err());
        assert!(SchemaName::new("pg_temp").is_err());
        assert!(SchemaName::new("PG_x").is_err());
        assert!(SchemaName::new("a\"b").is_err());
        assert!(SchemaName::new("a b").is_err());
        assert!(SchemaName::new(&"x".repeat(63)).is_ok());
        assert!(SchemaName::new(&"x".repeat(64)).is_err());
        let long = KmeId::new(&"k".repeat(64)).expect("valid KME ID");
        assert!(SchemaName::for_kme(&long).is_err());
    }

    #[test]
    fn url_debug_and_errors_hide_the_password() {
        let u: PostgresUrl = "postgres://kms:s3cr3t-pw@127.0.0.1:5433/qkd"
            .parse()
            .expect("valid URL");
        assert!(!format!("{u:?}").contains("s3cr3t-pw"));
        assert_eq!(u.as_str(), "postgres://kms:s3cr3t-pw@127.0.0.1:5433/qkd");
        let e = "postgres://kms:s3cr3t-pw@127.0.0.1:notaport/qkd"
            .parse::<PostgresUrl>()
            .expect_err("bad port");
        assert!(!e.to_string().contains("s3cr3t-pw"));
        assert!("postgres:///qkd".parse::<PostgresUrl>().is_err());
    }
}
