//! The store as the server sees it: one writer thread that owns the SQLite
//! connection and commits requests in groups.
//!
//! Requests are queued to the thread; it takes every request waiting (up to
//! [`MAX_BATCH`]) and decides and writes them in one transaction. The commit
//! does not wait for the disk: the group goes to a second thread, which syncs
//! the WAL (one `fdatasync` for every group waiting) and only then hands each
//! connection its answer, while the writer goes on with the next group. Under
//! load the groups grow and the cost of the sync is shared; alone, a request
//! commits and syncs by itself. A failed transaction fails every request of its group with
//! [`KsError::Store`] (the server answers "unavailable: retry"); none of their
//! answers has left, and the terminals' next requests fit the skip window. A
//! request whose own rows cannot be read (a stored key that does not open)
//! fails alone; the rest of its group is served.

use std::path::Path;
use std::sync::{Arc, mpsc};

use qkdnet_kms::store::MasterKey;
pub use qkdnet_kms::store::sqlite::Durability;
use qkdnet_media::Key256;
use qkdnet_media::proto::{Challenge, ChargeOffer, ChargeTerms, Identity, RefuseReason};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::core::GrantPlan;
use crate::error::{KsError, Result};
use crate::postgres::PgStore;
pub use crate::records::{
    AuditEntry, GrantOp, MediumInfo, Revocation, SessionKeys, SubscriberInfo, unix_now,
};
use crate::sqlite::{SqliteStore, WalSync};
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};

/// Most requests committed in one transaction.
pub const MAX_BATCH: usize = 512;

type ChargeReply = oneshot::Sender<Result<Result<(), RefuseReason>>>;

enum Job {
    Grant(Box<GrantOp>, oneshot::Sender<Result<GrantPlan>>),
    Charge(Box<ChargeOffer>, Vec<Key256>, ChargeReply),
}

/// An answer committed but not yet known to be on disk.
enum Reply {
    Grant(oneshot::Sender<Result<GrantPlan>>, Result<GrantPlan>),
    Charge(ChargeReply, Result<Result<(), RefuseReason>>),
}

/// Answers committed groups once a sync of the WAL that began after their
/// commit has returned; a failed sync fails them (the terminals retry).
fn syncer(wal: &WalSync, groups: &mpsc::Receiver<Vec<Reply>>) {
    while let Ok(mut answers) = groups.recv() {
        while let Ok(more) = groups.try_recv() {
            answers.extend(more);
        }
        let synced = wal.sync();
        if let Err(e) = &synced {
            tracing::error!("key service store: {e}");
        }
        for answer in answers {
            match (answer, &synced) {
                (Reply::Grant(r, plan), Ok(())) => drop(r.send(plan)),
                (Reply::Charge(r, done), Ok(())) => drop(r.send(done)),
                (Reply::Grant(r, _), Err(e)) => drop(r.send(Err(KsError::Store(e.to_string())))),
                (Reply::Charge(r, _), Err(e)) => drop(r.send(Err(KsError::Store(e.to_string())))),
            }
        }
    }
}

/// The server's handle on the store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    inner: Inner,
}

type SharedKeys = Arc<std::sync::Mutex<Box<dyn SessionKeys>>>;

#[derive(Clone)]
enum Inner {
    Sqlite(mpsc::SyncSender<Job>),
    Postgres(Arc<PgStore>, SharedKeys),
}

impl core::fmt::Debug for Store {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the SQLite store at `path` and starts its writer and sync
    /// threads. `keys` draws new session keys; expired sessions (older than
    /// `session_ttl` seconds) are purged every few seconds. With
    /// [`Durability::Full`] (the default to choose) an answer leaves once its
    /// commit is on disk; with `Normal`, once committed (see
    /// [`SqliteStore::defer_sync`]).
    pub fn sqlite(
        path: &Path,
        master: &MasterKey,
        mut keys: Box<dyn SessionKeys>,
        session_ttl: u64,
        durability: Durability,
    ) -> Result<Self> {
        let mut store = SqliteStore::open(path, master)?;
        let wal = store.defer_sync(path, durability)?;
        let (tx, rx) = mpsc::sync_channel::<Job>(4 * MAX_BATCH);
        // Committed groups go to the syncer, which answers them after the
        // fdatasync that makes them durable; several groups share one sync.
        let (synced_tx, synced_rx) = mpsc::channel::<Vec<Reply>>();
        std::thread::Builder::new()
            .name("keyservice-sync".into())
            .spawn(move || syncer(&wal, &synced_rx))
            .map_err(|e| KsError::Store(format!("cannot start the sync thread: {e}")))?;
        std::thread::Builder::new()
            .name("keyservice-store".into())
            .spawn(move || {
                let mut last_purge = unix_now();
                while let Ok(first) = rx.recv() {
                    let mut grants = Vec::new();
                    let mut answers = Vec::new();
                    let mut next = Some(first);
                    while let Some(job) = next.take() {
                        match job {
                            Job::Grant(op, reply) => grants.push((op, reply)),
                            Job::Charge(offer, ks, reply) => {
                                let done = store.charge(&offer, &ks, unix_now());
                                answers.push(Reply::Charge(reply, done));
                            }
                        }
                        if grants.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    if !grants.is_empty() {
                        let now = unix_now();
                        let (ops, replies): (Vec<GrantOp>, Vec<_>) =
                            grants.into_iter().map(|(op, r)| (*op, r)).unzip();
                        match store.grant_batch(&ops, keys.as_mut(), now) {
                            Ok(plans) => {
                                for (plan, reply) in plans.into_iter().zip(replies) {
                                    if let Err(e) = &plan {
                                        tracing::error!("key service store: a request failed: {e}");
                                    }
                                    answers.push(Reply::Grant(reply, plan));
                                }
                            }
                            Err(e) => {
                                tracing::error!(
                                    "key service store: a group of {} requests failed: {e}",
                                    ops.len()
                                );
                                for reply in replies {
                                    let _ = reply.send(Err(KsError::Store(e.to_string())));
                                }
                            }
                        }
                    }
                    if !answers.is_empty() && synced_tx.send(answers).is_err() {
                        tracing::error!("key service store: the sync thread has stopped");
                        return;
                    }
                    let now = unix_now();
                    if now >= last_purge + 5 {
                        last_purge = now;
                        if let Err(e) = store.purge_sessions(now.saturating_sub(session_ttl)) {
                            tracing::warn!("key service store: purging expired sessions: {e}");
                        }
                    }
                }
            })
            .map_err(|e| KsError::Store(format!("cannot start the store thread: {e}")))?;
        Ok(Self {
            inner: Inner::Sqlite(tx),
        })
    }

    /// Connects to the PostgreSQL store at `url` (shared with other front
    /// ends) with up to `pool_size` connections; expired sessions are purged
    /// every few seconds.
    pub async fn postgres(
        url: &PostgresUrl,
        schema: &SchemaName,
        master: &MasterKey,
        keys: Box<dyn SessionKeys>,
        session_ttl: u64,
        pool_size: usize,
    ) -> Result<Self> {
        let db = Arc::new(PgStore::open(url, schema, master, pool_size).await?);
        let purge = Arc::downgrade(&db);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                let Some(db) = purge.upgrade() else { return };
                if let Err(e) = db
                    .purge_sessions(unix_now().saturating_sub(session_ttl))
                    .await
                {
                    tracing::warn!("key service store: purging expired sessions: {e}");
                }
            }
        });
        Ok(Self {
            inner: Inner::Postgres(db, Arc::new(std::sync::Mutex::new(keys))),
        })
    }

    fn send(&self, job: Job) -> Result<()> {
        let Inner::Sqlite(jobs) = &self.inner else {
            return Err(KsError::Store("not a SQLite store".into()));
        };
        jobs.send(job)
            .map_err(|_| KsError::Store("the store thread has stopped".into()))
    }

    /// Decides and commits a terminal's request.
    pub async fn grant(&self, op: GrantOp) -> Result<GrantPlan> {
        let jobs = match &self.inner {
            Inner::Sqlite(jobs) => jobs.clone(),
            Inner::Postgres(db, keys) => return db.grant(&op, keys, unix_now()).await,
        };
        let (tx, rx) = oneshot::channel();
        // A full queue blocks: do that off the async threads.
        let job = Job::Grant(Box::new(op), tx);
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || jobs.send(job))
                    .await
                    .map_err(|e| KsError::Store(e.to_string()))?
                    .map_err(|_| KsError::Store("the store thread has stopped".into()))?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(KsError::Store("the store thread has stopped".into()));
            }
        }
        rx.await
            .map_err(|_| KsError::Store("the store thread has stopped".into()))?
    }

    /// Stores a verified charge.
    pub async fn charge(
        &self,
        offer: ChargeOffer,
        keys: Vec<Key256>,
    ) -> Result<Result<(), RefuseReason>> {
        if let Inner::Postgres(db, _) = &self.inner {
            return db.charge(&offer, &keys, unix_now()).await;
        }
        let (tx, rx) = oneshot::channel();
        let jobs = self.clone();
        tokio::task::spawn_blocking(move || jobs.send(Job::Charge(Box::new(offer), keys, tx)))
            .await
            .map_err(|e| KsError::Store(e.to_string()))??;
        rx.await
            .map_err(|_| KsError::Store("the store thread has stopped".into()))?
    }
}

/// An offer for `n` keys of `medium` at `first ..`, as a charging point would
/// make it but with made-up key IDs and tag: for loading keys straight into a
/// store ([`Store::charge`], [`SqliteStore::charge`]) in tests and benchmarks,
/// where no QKD network hands the keys over. The store does not check an
/// offer's tag (the server does, before it stores anything).
pub fn direct_offer(medium: Uuid, owner: &Identity, first: u64, n: usize) -> Result<ChargeOffer> {
    let ids = (0..n).map(|_| Uuid::new_v4()).collect();
    Ok(ChargeOffer::sign(
        ChargeTerms {
            medium_id: medium,
            owner: owner.clone(),
            charger: "direct".into(),
            first_index: first,
            auth_key_id: Uuid::new_v4(),
            key_ids: ids,
        },
        &Challenge { challenge: [0; 32] },
        &Key256::new([0; 32]),
    )?)
}
